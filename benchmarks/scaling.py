"""Does the relay get slower, bigger or hungrier as sites join? It should not.

For k earlier sites (default k = 1, 2, 4, 8, 16), a relay strategy registers k finished sites
(synthetic: random data, no training), starts site k + 1 after its mid-site switch (replay on), and
measures:

* ``iter_ms``: the median time of a training iteration with replay (G, D and solver steps);
* ``peak_mem_bytes``: peak memory over those iterations (``peak_mem_kind`` as in speed.py:
  CUDA max allocated on a GPU, the process's peak resident set on Linux CPUs);
* ``bundle_bytes``: the size of the bundle written at the end of that site (``state_to_bundle``
  → ``relaylearn.bundle.write_bundle``), and ``bundle_tensor_bytes``, the tensors in it.

By design none of these depends on k: the replay share of a batch is fixed, the generators are
conditioned on a one-hot site id of fixed size (``site_capacity``), only the previous site's
networks are kept as frozen copies, and the site registry is a few bytes of JSON per site. The
output gives the ratios k = max / k = min and ``flat`` (every ratio ≤ 1.2).

Tiny settings by default (``demo/relay`` with small GANs, batch 8) so it runs on a CPU in about a
minute; pass ``--config`` / ``--set`` / ``--batch`` for other sizes.

    python benchmarks/scaling.py            # a table, then the JSON line
    python benchmarks/scaling.py --json     # only {"iter_ms": {"1": ..., "16": ...}, "bundle_bytes": {...}, ...}
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import ROOT, PeakMemory, device_label, site_context, synchronize  # noqa: E402,F401 - ROOT puts the checkout on sys.path

from relaylearn.bundle import utc_now, write_bundle  # noqa: E402
from relaylearn.config import TaskConfig, load_config  # noqa: E402

try:  # relaylearn.assembly since the code-layering refactor; older checkouts keep them in runner
    from relaylearn.assembly import build_strategy, shipped_config  # noqa: E402
except ImportError:
    from relaylearn.runner import build_strategy, shipped_config  # noqa: E402
from relaylearn.strategies.base import StepContext  # noqa: E402

TINY_GANS = {
    "z_img": 16,
    "z_label": 8,
    "w_img": 32,
    "w_label": 16,
    "spade_hidden": 8,
    "g_img": {"mapping_layers": 1, "channel_base": 256, "channel_max": 32},
    "g_label": {"mapping_layers": 1, "channel_base": 128, "channel_max": 16},
    "d_img": {"channel_base": 256, "channel_max": 32, "mapping_layers": 1},
    "d_label": {"channel_base": 128, "channel_max": 16, "mapping_layers": 1},
}
FLAT = 1.2  # allowed ratio from the fewest to the most earlier sites


def scaling_task(config: str | None, sets: list[str], batch: int, max_sites: int) -> TaskConfig:
    """The relay config to measure: ``demo/relay`` with tiny GANs unless ``config`` is given;
    the site capacity is raised to fit ``max_sites`` earlier sites plus the current one."""
    task = load_config(config or "demo/relay", sets).tasks[0]
    data = task.model_dump(mode="python")
    if data["strategy"]["name"] != "relay":
        raise SystemExit(f"scaling.py: needs a relay config (this one trains '{data['strategy']['name']}')")
    kwargs = data["strategy"]["kwargs"]
    if config is None:
        kwargs.update(TINY_GANS)
    kwargs["site_capacity"] = max(kwargs.get("site_capacity", 32), max_sites + 1)
    data["train"]["batch_size"] = batch
    return TaskConfig.model_validate(data)


def measure_sites(task: TaskConfig, earlier: int, device: torch.device, warmup: int, iters: int, out_dir: Path) -> dict:
    """Iteration time, peak memory and bundle size with ``earlier`` sites registered before this one."""
    torch.manual_seed(0)
    k = task.dataset.kwargs
    b, (h, w) = task.train.batch_size, k.img_size
    lo, hi = k.out_range
    images = (torch.rand(b, k.channels, h, w) * (hi - lo) + lo).to(device)
    labels = torch.randint(0, k.num_classes, (b, h, w)).to(device)

    strategy = build_strategy(task, load_pretrained=False).to(device)
    for position in range(earlier):  # finished sites: registered, nothing trained
        site = site_context(f"site{position + 1}", position, images, labels)
        strategy.on_site_start(site)
        strategy.on_site_end(site)
    site = site_context(f"site{earlier + 1}", earlier, images, labels)
    strategy.on_site_start(site)
    strategy.stage = 2  # after the mid-site switch: half of every batch is replay
    strategy.train()
    strategy.optimizers = strategy.configure_optimizers()
    assert strategy.replaying and len(strategy.registry_previous) == earlier

    def step(i: int) -> None:
        strategy.training_step((images, labels), StepContext(step=i, global_step=i, epoch=0, site=site))  # noqa: F821 - runs before `del strategy` below

    for i in range(warmup):
        step(i)
    synchronize(device)
    memory = PeakMemory(device)
    memory.reset()
    times = []
    for i in range(warmup, warmup + iters):
        began = time.perf_counter()
        step(i)
        synchronize(device)
        times.append((time.perf_counter() - began) * 1000)
    peak = memory.read()

    strategy.on_site_end(site)
    state = strategy.state_to_bundle()
    path = write_bundle(
        out_dir / f"sites_{earlier}.relay",
        {n: t.cpu() for n, t in state.tensors.items()},
        strategy="relay",
        config=shipped_config(task),
        registry=state.meta,
        site=site.name,
        hop_started_utc=utc_now(),
        parent=None,
        signing_key=None,
    )
    result = {
        "iter_ms": round(statistics.median(times), 3),
        "peak_mem_bytes": peak,
        "peak_mem_kind": memory.kind,
        "bundle_bytes": path.stat().st_size,
        "bundle_tensor_bytes": sum(t.numel() * t.element_size() for t in state.tensors.values()),
        "registered_sites": len(state.meta["site_registry"]),
    }
    del strategy, state
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def run(task: TaskConfig, sites: list[int], device: torch.device, warmup: int, iters: int) -> dict:
    per_k = {}
    with tempfile.TemporaryDirectory(prefix="relay-scaling-") as tmp:
        for earlier in sites:
            per_k[str(earlier)] = measure_sites(task, earlier, device, warmup, iters, Path(tmp))
    keys = ("iter_ms", "bundle_bytes", "bundle_tensor_bytes", "peak_mem_bytes")
    out: dict = {"name": "scaling"}
    out.update({key: {k: r[key] for k, r in per_k.items()} for key in keys})
    first, last = str(sites[0]), str(sites[-1])
    out["ratio"] = {key: round(out[key][last] / out[key][first], 4) for key in keys}
    out["flat"] = all(r <= FLAT for r in out["ratio"].values())
    out.update(
        peak_mem_kind=per_k[first]["peak_mem_kind"],
        device=device_label(device),
        batch=task.train.batch_size,
        img_size=list(task.dataset.kwargs.img_size),
        warmup=warmup,
        iters=iters,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.add_argument("--sites", default="1,2,4,8,16", help="numbers of earlier sites, comma-separated, ascending")
    p.add_argument("--config", help="a relay config (default: demo/relay with tiny GANs)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=6, help="timed iterations per point (the median is reported)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)
    try:
        sites = [int(s) for s in args.sites.split(",")]
    except ValueError:
        p.error(f"--sites {args.sites!r}: expected comma-separated integers")
    if not sites or min(sites) < 1 or sites != sorted(sites) or args.iters < 1 or args.warmup < 0:
        p.error("--sites must be ascending positive integers, --iters >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    task = scaling_task(args.config, args.sets, args.batch, max(sites))
    out = run(task, sites, device, args.warmup, args.iters)
    if not args.json:
        print(f"{'earlier sites':>13} {'ms/iter':>9} {'peak mem MiB':>13} {'bundle bytes':>13}")
        for k in out["iter_ms"]:
            print(f"{k:>13} {out['iter_ms'][k]:>9.1f} {out['peak_mem_bytes'][k] / 2**20:>13.1f} {out['bundle_bytes'][k]:>13}")
        print(
            f"ratio {sites[-1]}/{sites[0]}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in out["ratio"].items())
            + f"  -> {'flat' if out['flat'] else 'NOT flat'} (limit {FLAT})"
        )
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
