"""Where one relay iteration's device time goes, and how the FIR filter could run faster.

Three parts, each on the step that ``speed.prepare`` builds (no Lightning, one random batch):

1. ``parts``: exclusive time per part of the iteration (the ``profile_site.py`` parts plus the
   generator, discriminator, ADA and U-Net forwards), measured with a device synchronisation at
   every part boundary (so the parts add up to the iteration, which runs slower than unsynchronised),
   one part after another (the relay's ``overlap_solver_step`` and ``gan_pairs_side_by_side`` off,
   also for the profiler);
2. ``kernels``: ``torch.profiler`` over the same iterations: the operators with the most self
   device time (ms per iteration, calls per iteration), and how busy the device was
   (summed kernel time / wall time: well below 1 means the host cannot feed it);
3. ``fir`` (with ``--fir``): every FIR filter call of one iteration (shapes recorded), timed forward + gradient +
   gradient of the gradient (what R1 and the path-length penalty do) with each implementation in
   :data:`FIR_IMPLEMENTATIONS`, checked against the shipped one.

One JSON line per result on stdout; with ``--tables DIR`` the profiler tables are written there.

    python benchmarks/gpu_profile.py                                  # GPU: fundus/relay, batch 128
    python benchmarks/gpu_profile.py --only relay_replay --precisions fp32 --fir --tables out/
    python benchmarks/gpu_profile.py --device cpu --config demo/relay --batch 2 --iters 1   # smoke
    python benchmarks/gpu_profile.py --device cpu --batch 16 --as-trained --threads 2           # the demo as trained
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_site  # noqa: E402
import speed  # noqa: E402  (puts the checkout on sys.path)

from relaylearn.models.gan import layers  # noqa: E402


# ----- 1. exclusive time per part, synchronised ---------------------------------------------------
class DeviceTimers(profile_site.ExclusiveTimers):
    """:class:`profile_site.ExclusiveTimers` that wait for the device at each boundary, so the
    time of a part is the device work it queued (waiting for the parent's work happens outside)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def wrap(self, name, fn):
        sync = lambda: speed.synchronize(self.device)  # noqa: E731

        def finished(*args, **kwargs):
            out = fn(*args, **kwargs)
            sync()
            return out

        timed = super().wrap(name, finished)

        def call(*args, **kwargs):
            sync()
            return timed(*args, **kwargs)

        return call


def network_parts() -> list[tuple]:
    """(owner, "forward", part name) of the networks timed on their own."""
    from relaylearn.models.gan import ada, discriminator, generator
    from relaylearn.models.unet import UNetResNet18

    return [
        (generator.LabelGenerator, "forward", "label generator forward"),
        (generator.ImageGenerator, "forward", "image generator forward"),
        (discriminator.ProjectionDiscriminator, "forward", "discriminator forward"),
        (ada.AdaptiveAugment, "forward", "ADA augmentation"),
        (UNetResNet18, "forward", "U-Net forward"),
    ]


def time_parts(prepared, first: int, iters: int, device: torch.device) -> dict:
    timers = DeviceTimers(device)
    undo = profile_site.install(timers)
    undo += profile_site.patch(timers, network_parts())
    try:
        timers.reset()
        speed.synchronize(device)
        began = time.perf_counter()
        for i in range(first, first + iters):
            timers.wrap("(rest of the step)", prepared.step)(i)
        wall = time.perf_counter() - began
    finally:
        profile_site.uninstall(undo)
    parts = {k: round(v * 1000 / iters, 2) for k, v in sorted(timers.reset().items(), key=lambda kv: -kv[1])}
    return {"ms_per_iter_synced": round(wall * 1000 / iters, 2), "ms_per_iter_by_part": parts}


# ----- 2. operators by device time ----------------------------------------------------------------
def _self_us(event, device: torch.device) -> float:
    """Self time of a profiler row in µs: device time on a GPU, host time on the CPU."""
    names = ("self_device_time_total", "self_cuda_time_total") if device.type == "cuda" else ("self_cpu_time_total",)
    for attr in names:
        if hasattr(event, attr):
            return float(getattr(event, attr))
    return 0.0


def profile_kernels(prepared, first: int, iters: int, device: torch.device, top: int, table_path: Path | None) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    speed.synchronize(device)
    with profile(activities=activities) as prof:
        began = time.perf_counter()
        for i in range(first, first + iters):
            prepared.step(i)
        speed.synchronize(device)
        wall = time.perf_counter() - began
    averages = prof.key_averages()
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    if table_path is not None:
        table_path.write_text(averages.table(sort_by=sort_key, row_limit=60))
    rows = sorted(averages, key=lambda e: _self_us(e, device), reverse=True)
    # kernels (device-side events) vs operators: on a GPU the device time of an operator is the sum of its kernels
    total_device_ms = (
        sum(_self_us(e, device) for e in rows if device.type == "cuda" and getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA) / 1000
    )
    return {
        "wall_ms_per_iter": round(wall * 1000 / iters, 2),
        "device_busy_fraction": round(total_device_ms / (wall * 1000), 3) if device.type == "cuda" else None,
        "launches_per_iter": round(sum(e.count for e in rows if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA) / iters, 1)
        if device.type == "cuda"
        else None,
        "top": [
            {"op": e.key[:120], "ms_per_iter": round(_self_us(e, device) / 1000 / iters, 3), "calls_per_iter": round(e.count / iters, 1)} for e in rows[:top]
        ],
    }


# ----- 3. FIR filter implementations --------------------------------------------------------------
def fir_shipped(x, kernel, padding, gain):
    return layers.fir_filter2d(x, kernel, padding, gain)


def fir_separable(x, kernel, padding, gain):
    """Two 1-D depthwise passes (rank-1 kernel): 2k instead of k² taps."""
    taps = kernel.sum(dim=0)  # [k]: the kernel is the outer product taps ⊗ taps / (Σtaps)²·…
    taps = taps / taps.sum()
    scale = kernel.sum() * gain
    c = x.shape[1]
    x = F.pad(x, padding)
    rows = (taps * scale).to(x.dtype)[None, None, None, :].expand(c, 1, 1, -1)
    cols = taps.to(x.dtype)[None, None, :, None].expand(c, 1, -1, 1)
    return layers.depthwise_correlate(layers.depthwise_correlate(x, rows), cols)


def fir_shifts(x, kernel, padding, gain):
    """Separable, as sums of shifted slices (element-wise only; no convolution kernel)."""
    taps = kernel.sum(dim=0)
    taps = (taps / taps.sum()).tolist()
    scale = float(kernel.sum()) * gain
    x = F.pad(x, padding)
    k = len(taps)
    w_out, h_out = x.shape[-1] - k + 1, x.shape[-2] - k + 1
    x = sum(t * x[..., j : j + w_out] for j, t in enumerate(taps))
    x = sum(t * x[..., j : j + h_out, :] for j, t in enumerate(taps))
    return x * scale


# (channels folded into the batch for one single-channel dense convolution ran 100× slower on an H200: left out)
FIR_IMPLEMENTATIONS = {"shipped": fir_shipped, "separable": fir_separable, "shifts": fir_shifts}


def record_fir_calls(prepared, i: int) -> Counter:
    calls: Counter = Counter()
    original = layers.fir_filter2d

    def recording(x, kernel, padding, gain=1.0):
        calls[(tuple(x.shape), str(x.dtype).removeprefix("torch."), tuple(padding), float(gain), tuple(kernel.shape))] += 1
        return original(x, kernel, padding, gain)

    layers.fir_filter2d = recording
    try:
        prepared.step(i)
    finally:
        layers.fir_filter2d = original
    return calls


def time_fir(calls: Counter, device: torch.device, reps: int) -> dict:
    """ms per iteration of every FIR call (forward, its gradient, and the gradient's gradient)."""
    kernel = layers.make_resample_kernel().to(device)
    out = {}
    for name, fn in FIR_IMPLEMENTATIONS.items():
        total, worst_error = 0.0, 0.0
        try:
            for (shape, dtype, padding, gain, _), count in calls.items():
                x = torch.randn(shape, device=device, dtype=getattr(torch, dtype), requires_grad=True)

                def run(f=fn, x=x, padding=padding, gain=gain):
                    y = f(x, kernel, padding, gain)
                    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
                    (gg,) = torch.autograd.grad(g.square().sum(), x)
                    return y, gg

                ref_y, ref_gg = run(fir_shipped)
                y, gg = run()
                worst_error = max(worst_error, float(((y - ref_y).abs().max() / ref_y.abs().max().clamp_min(1e-12)).detach()))
                worst_error = max(worst_error, float((gg - ref_gg).abs().max() / ref_gg.abs().max().clamp_min(1e-12)))
                speed.synchronize(device)
                began = time.perf_counter()
                for _ in range(reps):
                    run()
                speed.synchronize(device)
                total += (time.perf_counter() - began) / reps * count
            out[name] = {"ms_per_iter": round(total * 1000, 3), "max_rel_error": float(f"{worst_error:.3g}")}
        except Exception as exc:  # noqa: BLE001 - an implementation that fails is a result
            out[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    return out


# ----- driver ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="default: fundus/relay on a GPU, demo/relay on the CPU")
    p.add_argument("--device", default=None)
    p.add_argument("--batch", type=int, default=None, help="default: 128 on a GPU, 2 on the CPU")
    p.add_argument("--only", default="relay_replay,relay_site1,sequential")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument(
        "--as-trained", action="store_true", help="one setting per measurement: precision, channels_last and fused Adam as training applies the config's"
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=None, help="iterations per part (default: one regularisation cycle)")
    p.add_argument("--prof-iters", type=int, default=4, help="iterations under torch.profiler (default 4)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--fir", action="store_true", help="also time the FIR filter implementations")
    p.add_argument("--fir-reps", type=int, default=5)
    p.add_argument("--tables", type=Path, default=None, help="write the profiler tables into this folder")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = args.config or ("fundus/relay" if device.type == "cuda" else "demo/relay")
    batch = args.batch or (128 if device.type == "cuda" else 2)
    base = load_config_common(config)
    if args.tables:
        args.tables.mkdir(parents=True, exist_ok=True)
    fir_done = set()
    for measurement in args.only.split(","):
        precisions = args.precisions.split(",")
        for precision in precisions:
            skip = (precision != precisions[0]) if args.as_trained else (measurement == "sequential" and precision != "fp32")
            if skip:  # --as-trained: one setting; else the sequential baseline has no GAN to cast
                continue
            record = {
                "name": measurement,
                "precision": precision,
                "config": config,
                "batch": batch,
                "device": speed.device_label(device),
                "torch": torch.__version__,
            }
            try:
                if args.as_trained:  # precision, memory format and optimizer kernels from the config
                    task = speed.task_for(base, measurement, speed.Switches(), batch, trained=True)
                    switches = speed.as_trained(task, device)
                    record.update(precision=switches.precision, as_trained=True)
                else:
                    switches = speed.Switches(precision=precision)
                    task = speed.task_for(base, measurement, switches, batch)
                profile_site.one_part_at_a_time([task])  # the parts are timed one after another
                prepared = speed.prepare(measurement, task, switches, device, trained=args.as_trained)
                for i in range(args.warmup):
                    prepared.step(i)
                first = args.warmup
                iters = args.iters or speed.timing_cycle(prepared, first)  # a whole cycle: its share of the replay stock's refills too
                record["parts"] = time_parts(prepared, first, iters, device)
                first += iters
                table = args.tables / f"{measurement}_{precision}.txt" if args.tables else None
                record["kernels"] = profile_kernels(prepared, first, args.prof_iters, device, args.top, table)
                first += args.prof_iters
                if args.fir and measurement != "sequential" and precision not in fir_done:
                    calls = record_fir_calls(prepared, first)
                    record["fir_calls_per_iter"] = sum(calls.values())
                    record["fir"] = time_fir(calls, device, args.fir_reps)
                    fir_done.add(precision)
            except Exception as exc:  # noqa: BLE001 - report and go on with the next measurement
                record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            print(json.dumps(record), flush=True)
            del record
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


def load_config_common(config: str):
    from relaylearn.config import load_config

    return load_config(config, []).tasks[0]


if __name__ == "__main__":
    raise SystemExit(main())
