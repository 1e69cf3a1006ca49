"""Milliseconds per training iteration of the relay and of the sequential baseline.

Three measurements, each in this one process, strategies built directly (no Lightning):

* ``relay_site1``   – the relay at its first site: a G step, a D step and a solver step on local data;
* ``relay_replay``  – the relay at a later site after the mid-site switch: half of every batch is
  replayed by the previous site's frozen generators, plus distillation from the previous solver;
* ``sequential``    – the sequential baseline: one solver step (the same U-Net and loss).

Each runs ``--warmup`` iterations, then ``--iters`` timed ones (CUDA events after
``torch.cuda.synchronize`` on a GPU, ``time.perf_counter`` on the CPU) on one random batch of the
config's shape that lives in host memory (pinned on a GPU) and is copied to the device every
iteration, as in training. Every switch is independent: ``--precision bf16`` (autocast),
``--channels-last``, ``--compile`` (``nn.Module.compile`` of the solver and generators),
``--fused-adam``, ``--replay-per-substep`` (the original's three replays per batch) and
``--aug-device cpu|same`` (augment real batches on the host before the copy, or on the device).
An iteration is one G+D step and one solver step, whatever the config's GAN budget, so that every
checkout does the same work; ``--gan-budget config`` times one batch of training as the config
budgets it instead (``gan_steps_per_solver_step`` G+D steps, then the solver step).

One JSON line per measurement on stdout::

    {"name", "device", "config", "batch", "img_size", "precision", "channels_last", "compile",
     "fused_adam", "replay_per_substep", "aug_device", "cudnn_benchmark", "warmup", "iters",
     "ms_per_iter", "ms_by_iteration_kind", "peak_mem_bytes", "peak_mem_kind", "flops_per_iter",
     "flop_iters", "tflops", ...}

``ms_per_iter`` is the mean over the timed iterations; ``ms_by_iteration_kind`` splits them by the
relay's lazy regularisers ({"plain" | "pl" | "r1" | "pl+r1": {"n", "median_ms", "mean_ms"}}), so
the cost of the path-length and R1 iterations shows apart from the plain ones.

``peak_mem_kind``: ``cuda_max_allocated`` (``torch.cuda.max_memory_allocated`` over the timed
iterations) on a GPU; ``process_peak_rss`` on Linux CPUs (the process's resident-set high-water
mark VmHWM, reset through ``/proc/self/clear_refs`` before the timed iterations: it includes the
interpreter, the networks and everything else resident); ``process_max_rss`` elsewhere (never
reset, so only the first measurement is meaningful). ``flops_per_iter`` is counted with
``torch.utils.flop_counter.FlopCounterMode`` (forward and backward, eager) over ``flop_iters``
iterations — a whole regularisation cycle of the relay (lazy R1 / path-length steps) unless
``--quick``; ``tflops`` = flops_per_iter / time per iteration.

    python benchmarks/speed.py --quick                  # CPU smoke run (one thread), < 1 minute
    python benchmarks/speed.py                          # GPU: fundus/relay (paper sizes), batch 128
    python benchmarks/speed.py --matrix                 # every switch toggled once against the baseline
    python benchmarks/speed.py --precision bf16 --channels-last --fused-adam --only relay_replay
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import resource
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# --code-root DIR (the workers of --compare): measure the relaylearn of another checkout with this harness
CODE_ROOT = Path(sys.argv[sys.argv.index("--code-root") + 1]).resolve() if "--code-root" in sys.argv[:-1] else ROOT
if str(CODE_ROOT) not in sys.path[:1]:  # run from a checkout without installing
    sys.path.insert(0, str(CODE_ROOT))

from relaylearn.config import TaskConfig, load_config  # noqa: E402

try:  # relaylearn.assembly since the code-layering refactor; older checkouts (--code-root) keep it in runner
    from relaylearn.assembly import build_strategy  # noqa: E402
except ImportError:
    from relaylearn.runner import build_strategy  # noqa: E402
from relaylearn.strategies.base import SiteContext, StepContext, Strategy  # noqa: E402

MEASUREMENTS = ("relay_site1", "relay_replay", "sequential")
LONG_SITE = 10**9  # steps per site: the mid-site merge never falls into a measured window


@dataclass(frozen=True)
class Switches:
    """The optimisations that can be switched on, one by one."""

    precision: str = "fp32"  # fp32 | bf16 (autocast)
    channels_last: bool = False
    compile: bool = False
    fused_adam: bool = False
    replay_per_substep: bool = False  # relay: a fresh replay for each of the G, D and solver steps
    aug_device: str = "none"  # none | cpu (host, before the copy) | same (on the training device)
    cudnn_benchmark: bool = False  # torch.backends.cudnn.benchmark (GPU: autotuned convolution algorithms)

    def toggled(self) -> list[Switches]:
        """Every variant that differs from this one in exactly one switch."""
        out = [replace(self, precision="bf16" if self.precision == "fp32" else "fp32")]
        out += [replace(self, **{f.name: not getattr(self, f.name)}) for f in fields(self) if f.type in (bool, "bool")]
        out += [replace(self, aug_device=a) for a in ("none", "cpu", "same") if a != self.aug_device]
        return out


# ----- measuring ---------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory of a block: CUDA ``max_memory_allocated``, or the process's peak resident set."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "process_max_rss"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # Linux: "5" resets VmHWM to the current resident set
            Path("/proc/self/clear_refs").write_text("5")
            self.kind = "process_peak_rss"
        except OSError:
            self.kind = "process_max_rss"

    def read(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind == "process_peak_rss":
            match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
            if match:
                return int(match.group(1)) * 1024
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def iteration_times(
    step: Callable[[int], None], first: int, count: int, device: torch.device, label: Callable[[], str] | None = None
) -> list[tuple[float, str]]:
    """Milliseconds of each call of ``step(i)`` for i in [first, first + count), with the label
    ``label()`` gives after the call (CUDA events per iteration on a GPU, read at the end)."""
    synchronize(device)
    labels = []
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(count + 1)]
        events[0].record()
        for k, i in enumerate(range(first, first + count)):
            step(i)
            events[k + 1].record()
            labels.append(label() if label else "")
        events[-1].synchronize()
        return [(a.elapsed_time(b), lab) for a, b, lab in zip(events[:-1], events[1:], labels)]
    out = []
    for i in range(first, first + count):
        began = time.perf_counter()
        step(i)
        out.append(((time.perf_counter() - began) * 1000, label() if label else ""))
    return out


def regularisation_label(strategy: Strategy) -> Callable[[], str]:
    """For the relay: which lazy regularisers the iteration just run included ("pl", "r1",
    "pl+r1" or "plain"), from the strategy's GAN-step counter; "plain" for other strategies."""
    options = getattr(strategy, "options", None)
    if options is None or not hasattr(strategy, "gan_step"):
        return lambda: "plain"
    seen = {"gan_step": strategy.gan_step}

    def label() -> str:
        before, after = seen["gan_step"], strategy.gan_step
        seen["gan_step"] = after
        steps = range(before, after)
        regularisers = (("pl", options.g_reg_interval, options.pl_weight), ("r1", options.d_reg_interval, options.r1_gamma))
        parts = [name for name, interval, weight in regularisers if weight > 0 and any((s + 1) % interval == 0 for s in steps)]
        return "+".join(parts) or "plain"

    return label


def split_by_label(times: list[tuple[float, str]]) -> dict[str, dict[str, float]]:
    """``{label: {"n", "median_ms", "mean_ms"}}`` of :func:`iteration_times`' output."""
    import statistics

    out = {}
    for lab in sorted({lab for _, lab in times}):
        ms = [t for t, other in times if other == lab]
        out[lab] = {"n": len(ms), "median_ms": round(statistics.median(ms), 3), "mean_ms": round(sum(ms) / len(ms), 3)}
    return out


def time_iterations(step: Callable[[int], None], first: int, count: int, device: torch.device) -> float:
    """Milliseconds per call of ``step(i)`` for i in [first, first + count) (mean of :func:`iteration_times`)."""
    return sum(ms for ms, _ in iteration_times(step, first, count, device)) / count


class _GlobalScopeOnly:
    """Stands in for ``FlopCounterMode``'s per-module tracker, whose backward hooks make
    ``torch.autograd.grad`` fail (the relay's R1 and path-length penalties); only the total is needed."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def count_flops(step: Callable[[int], None], first: int, count: int) -> float:
    """Floating-point operations per call of ``step`` (forward and backward), averaged."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalScopeOnly()
    with counter:
        for i in range(first, first + count):
            step(i)
    return counter.get_total_flops() / count


# ----- building a measured training step ----------------------------------------------------------
def site_context(name: str, position: int, images: torch.Tensor, labels: torch.Tensor) -> SiteContext:
    return SiteContext(
        name=name,
        task_id=position + 1,
        position=position,
        num_images=len(images),
        num_epochs=1,
        steps_per_epoch=LONG_SITE,
        train_images=images,
        train_labels=labels,
        batch_size=len(images),
    )


def task_for(base: TaskConfig, measurement: str, switches: Switches, batch: int, trained: bool = False, gan_budget: str = "one") -> TaskConfig:
    """The config of one measurement: the relay's or the sequential baseline's, with the switches
    (the relay's ``fused_optimizers`` and the optimizer's ``fused`` flag among them) unless
    ``trained``: as configured. ``gan_budget``: "one" G+D step per solver step
    (comparable across checkouts), or the "config"'s own budget (what a batch of training does)."""
    data = base.model_dump(mode="python")
    data["train"]["batch_size"] = batch
    if not trained and "fused" in data["train"].get("optimizer", {}):
        # the switch decides, not the config's own flag (demo configs set ``fused: true``)
        data["train"]["optimizer"]["fused"] = switches.fused_adam
    if measurement == "sequential":
        data["strategy"] = {"name": "sequential", "kwargs": {}}
    else:
        if data["strategy"]["name"] != "relay":
            raise SystemExit(f"speed.py: {measurement} needs a relay config (this one trains '{data['strategy']['name']}')")
        if not trained:
            data["strategy"]["kwargs"].update(replay_once_per_batch=not switches.replay_per_substep, fused_optimizers=switches.fused_adam)
        if gan_budget == "one":
            data["strategy"]["kwargs"].update(one_gan_step_per_iteration())
    return TaskConfig.model_validate(data)


def one_gan_step_per_iteration() -> dict:
    """Keys that make a relay iteration one G+D step and one solver step, whatever GAN budget the
    config gives (``gan_steps_per_solver_step`` and the warm-ups), so checkouts from before
    and after that budget existed measure the same work; empty where the measured checkout's
    relay has no such keys."""
    from relaylearn.strategies.relay import RelayOptions

    fields = RelayOptions.model_fields
    budget = {"gan_steps_per_solver_step": 1, "gan_warmup_steps": 0, "gan_first_site_warmup_steps": 0}
    return {k: v for k, v in budget.items() if k in fields}


def with_fused_kernel(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same optimizer (class, groups, settings) rebuilt with ``fused=True``."""
    groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in optimizer.param_groups]
    return type(optimizer)(groups, fused=True)


def compile_networks(strategy: Strategy) -> None:
    """``nn.Module.compile`` (in place, state-dict keys unchanged) of the solver and generators,
    the previous site's frozen copies included (compile after they were copied)."""
    owners = [strategy] + ([strategy.previous] if getattr(strategy, "previous", None) is not None else [])
    for owner in owners:
        for name in ("solver", "g_img", "g_label"):
            module = owner[name] if isinstance(owner, torch.nn.ModuleDict) else getattr(owner, name, None)
            if module is not None:
                module.compile()


@dataclass
class Prepared:
    strategy: Strategy
    step: Callable[[int], None]
    flop_cycle: int  # iterations after which the relay's lazy regularisation pattern repeats


def timing_cycle(prepared: Prepared, iterations_run: int) -> int:
    """Iterations after which the timed work repeats: the lazy-regularisation cycle and, for a relay
    with a replay stock (``replay_stock`` pairs generated in one call every so many iterations),
    the iterations between two refills at the same point of the stock, found from the pairs the
    first ``iterations_run`` iterations took. Timing a whole number of cycles gives every
    iteration its share of the refills."""
    strategy = prepared.strategy
    size = getattr(getattr(strategy, "options", None), "replay_stock", 0)
    per_iteration = getattr(strategy, "_stock_drawn", 0) // max(iterations_run, 1)
    refill_period = size // math.gcd(size, per_iteration) if size and per_iteration else 1
    return math.lcm(prepared.flop_cycle, refill_period)


def whole_cycles(iters: int, cycle: int) -> int:
    """``iters`` rounded up to a whole number of ``cycle``-iteration cycles."""
    return -(-iters // cycle) * cycle


def as_trained(task: TaskConfig, device: torch.device) -> Switches:
    """The switches training applies for this config on ``device`` (``train.precision``, ``auto``
    resolved as the measured checkout resolves it; ``train.channels_last``, ``train.compile``;
    memory format and compile as the measured checkout's engine applies them)."""
    precision = task.train.precision
    if precision == "auto":
        from relaylearn.devices import resolve_precision

        precision = resolve_precision(precision, "gpu" if device.type == "cuda" else "cpu", warn=False)
    fused = task.strategy.kwargs.get("fused_optimizers", False) if task.strategy.name == "relay" else task.train.optimizer.fused
    return Switches(
        precision="bf16" if precision == "bf16-mixed" else "fp32",
        channels_last=task.train.channels_last,
        compile=task.train.compile,
        fused_adam=bool(fused),
    )


def prepare_like_training(strategy: Strategy, task: TaskConfig) -> None:
    """What the engine does before a site starts (the networks' layout; on the CPU, the allocator's
    settings), in the measured checkout."""
    import relaylearn.devices as devices
    import relaylearn.engine as engine

    if next(strategy.parameters()).device.type == "cpu" and hasattr(devices, "keep_freed_host_memory"):
        devices.keep_freed_host_memory()  # the allocator's settings of CPU training (engine.fit_site)
    if hasattr(engine, "prepare_networks"):
        engine.prepare_networks(strategy, task.train)
    elif task.train.channels_last:  # engines before prepare_networks: the solver only
        strategy.solver.to(memory_format=torch.channels_last)


def prepare(measurement: str, task: TaskConfig, switches: Switches, device: torch.device, seed: int = 0, trained: bool = False) -> Prepared:
    """A strategy at the measured point of a relay and a ``step(i)`` that trains iteration i.

    ``trained``: networks prepared as training prepares them for ``task`` (``prepare_like_training``)
    instead of by the switches (``switches`` must then be ``as_trained(task, device)``)."""
    torch.manual_seed(seed)
    k = task.dataset.kwargs
    b, (h, w) = task.train.batch_size, k.img_size
    lo, hi = k.out_range
    images = torch.rand(b, k.channels, h, w) * (hi - lo) + lo
    labels = torch.randint(0, k.num_classes, (b, h, w))
    if device.type == "cuda":
        images, labels = images.pin_memory(), labels.pin_memory()

    strategy = build_strategy(task, load_pretrained=False).to(device)
    if trained:
        prepare_like_training(strategy, task)
    if measurement == "relay_replay":  # one earlier site, then the current one after its mid-site switch
        earlier = site_context("earlier", 0, images, labels)
        strategy.on_site_start(earlier)
        strategy.on_site_end(earlier)
        site = site_context("current", 1, images, labels)
        strategy.on_site_start(site)
        strategy.stage = 2
        assert strategy.replaying
    else:
        site = site_context("current", 0, images, labels)
        strategy.on_site_start(site)
    strategy.train()
    if switches.channels_last and not trained:
        strategy.to(memory_format=torch.channels_last)
    optimizers = strategy.configure_optimizers()
    if switches.fused_adam and measurement == "sequential" and not trained:
        optimizers = [with_fused_kernel(o) for o in optimizers]
    strategy.optimizers = optimizers

    augment = None
    if switches.aug_device != "none":
        from relaylearn.data.augment import from_config

        augment = from_config(k.augment if k.augment not in (None, "none") else "original", tuple(k.out_range))
        augment.to(device if switches.aug_device == "same" else "cpu")
    # as Lightning's bf16-mixed: no cast cache (a cached cast would outlive the optimizer steps inside the step)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)) if switches.precision == "bf16" else contextlib.nullcontext

    def step(i: int) -> None:
        x, y = images, labels
        if augment is not None and switches.aug_device == "cpu":
            x, y = augment(x, y)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if augment is not None and switches.aug_device == "same":
            x, y = augment(x, y)
        if switches.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            strategy.training_step((x, y), StepContext(step=i, global_step=i, epoch=0, site=site))

    cycle = 1
    if measurement != "sequential":
        o = strategy.options
        cycle = math.lcm(o.g_reg_interval, o.d_reg_interval, o.ada_interval)
    return Prepared(strategy, step, cycle)


def measure(
    measurement: str,
    base: TaskConfig,
    config_name: str,
    switches: Switches,
    device: torch.device,
    batch: int,
    warmup: int,
    iters: int,
    flop_iters: int | None,
    trained: bool = False,
    flop_cache: dict | None = None,
    round_to_cycle: bool = True,
    gan_budget: str = "one",
) -> dict:
    """One JSON-able record; ``error`` (one line) instead of numbers where the variant fails.
    ``trained``: the switches training applies (``as_trained``) instead of ``switches``.
    ``round_to_cycle``: time a whole number of ``timing_cycle`` cycles (``iters`` rounded up)."""
    if trained:
        switches = as_trained(task_for(base, measurement, Switches(), batch, trained=True, gan_budget=gan_budget), device)
    record = {
        "name": measurement,
        "device": device_label(device),
        "config": config_name,
        "batch": batch,
        "img_size": list(base.dataset.kwargs.img_size),
        **asdict(switches),
        "as_trained": trained,
        "gan_budget": gan_budget,
        "warmup": warmup,
        "iters": iters,
    }
    memory = PeakMemory(device)
    torch.backends.cudnn.benchmark = switches.cudnn_benchmark
    try:
        task = task_for(base, measurement, switches, batch, trained=trained, gan_budget=gan_budget)
        prepared = prepare(measurement, task, switches, device, trained=trained)
        record["fused_effective"] = all(bool(g.get("fused")) for o in prepared.strategy.optimizers for g in o.param_groups)
        n_flop = flop_iters if flop_iters is not None else prepared.flop_cycle
        key = (measurement, switches.replay_per_substep, switches.aug_device, n_flop)
        counted_now = 0  # iterations the FLOP count ran here (none when another variant's count is reused)
        if flop_cache is not None and key in flop_cache:  # the same work in another precision / layout
            flops = flop_cache[key]
        else:
            flops = count_flops(prepared.step, 0, n_flop) if n_flop else float("nan")  # eager, before any compilation
            counted_now = n_flop
            if flop_cache is not None:
                flop_cache[key] = flops
        if switches.compile and not trained:
            compile_networks(prepared.strategy)
        first = n_flop
        for i in range(first, first + warmup):
            prepared.step(i)
        ran = counted_now + warmup
        cycle_key = ("cycle", *key)
        if ran == 0 and flop_cache is not None and cycle_key in flop_cache:  # nothing ran here to tell the refill period
            cycle = flop_cache[cycle_key]
        else:
            cycle = timing_cycle(prepared, ran)
            if flop_cache is not None and ran:
                flop_cache.setdefault(cycle_key, cycle)
        if round_to_cycle:
            iters = whole_cycles(iters, cycle)
        record.update(iters=iters, cycle=cycle)
        synchronize(device)
        memory.reset()
        times = iteration_times(prepared.step, first + warmup, iters, device, regularisation_label(prepared.strategy))
        ms = sum(t for t, _ in times) / len(times)
        counted = not math.isnan(flops)
        record.update(
            ms_per_iter=round(ms, 3),
            ms_by_iteration_kind=split_by_label(times),
            peak_mem_bytes=memory.read(),
            peak_mem_kind=memory.kind,
            flops_per_iter=int(flops) if counted else None,
            flop_iters=n_flop,
            tflops=round(flops / (ms / 1000) / 1e12, 4) if counted else None,
        )
    except Exception as exc:  # noqa: BLE001 - a failing variant (e.g. compile without a compiler) is a result
        message = str(exc).strip().splitlines()
        record["error"] = f"{type(exc).__name__}: {message[0] if message else ''}"[:500]
    finally:
        torch.backends.cudnn.benchmark = False
        if switches.compile:
            torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return record


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return "cpu"


# ----- two checkouts side by side ----------------------------------------------------------------
def worker(args: argparse.Namespace, base: TaskConfig, config_name: str, device: torch.device, batch: int) -> int:
    """``--code-root``: prepare every measurement, then answer ``NAME COUNT`` lines on stdin with
    ``{"name", "ms_per_iter", "cycle"}`` lines (COUNT more iterations of NAME, timed; its
    ``timing_cycle`` so far)."""
    import relaylearn

    names = args.only.split(",")
    prepared, next_step = {}, {}
    for name in names:
        switches = switches_from(args)
        task = task_for(base, name, switches, batch, trained=args.as_trained, gan_budget=args.gan_budget)
        switches = as_trained(task, device) if args.as_trained else switches
        prepared[name] = prepare(name, task, switches, device, trained=args.as_trained)
        if switches.compile and not args.as_trained:
            compile_networks(prepared[name].strategy)
        next_step[name] = 0
    print(json.dumps({"ready": str(Path(relaylearn.__file__).resolve().parent.parent)}), flush=True)
    for line in sys.stdin:
        name, count = line.split()
        ms = time_iterations(prepared[name].step, next_step[name], int(count), device)
        next_step[name] += int(count)
        print(json.dumps({"name": name, "ms_per_iter": ms, "cycle": timing_cycle(prepared[name], next_step[name])}), flush=True)
    return 0


def worker_environment(root: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with ``root`` first on PYTHONPATH, so the worker imports that checkout; the
    paths already there stay after it (packages installed with ``pip --target``, say)."""
    return {**environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), environ.get("PYTHONPATH")]))}


class Side:
    """One checkout measured by a worker process of this harness."""

    def __init__(self, label: str, root: Path, forwarded: list[str]):
        import subprocess

        self.label, self.root = label, root
        env = worker_environment(root, os.environ)
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--code-root", str(root), *forwarded],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        ready = self._read()
        self.imported_from = ready["ready"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"speed.py: the worker for {self.label} ({self.root}) stopped (see its error above)")
        return json.loads(line)

    def run(self, name: str, count: int) -> dict:
        """``count`` more timed iterations of ``name``: ``{"ms_per_iter", "cycle", ...}``."""
        self.proc.stdin.write(f"{name} {count}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@contextlib.contextmanager
def checkout_of(ref: str) -> Iterator[Path]:
    """A directory with the code of ``ref``: the directory itself, or a temporary ``git worktree`` of a commit."""
    import subprocess
    import tempfile

    if Path(ref).is_dir():
        yield Path(ref).resolve()
        return
    with tempfile.TemporaryDirectory(prefix="speed-ref-") as tmp:
        path = Path(tmp) / "ref"
        proc = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), ref], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"speed.py: --compare {ref}: neither a directory nor a commit of this repository ({proc.stderr.strip().splitlines()[-1:]})")
        try:
            yield path
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], capture_output=True)


def forwarded_args(argv: list[str]) -> list[str]:
    """The command line without ``--compare REF`` / ``--reps N`` (for the workers)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--compare", "--reps"):
            skip = True
        elif not a.startswith(("--compare=", "--reps=")):
            out.append(a)
    return out


def compare(args: argparse.Namespace, argv: list[str], warmup: int, iters: int) -> int:
    """Both checkouts in one run: workers prepared once, then ``--reps`` rounds of ``iters`` timed
    iterations per measurement, alternating which checkout goes first. One JSON line per
    measurement with the median ms/iter of each and ``speedup`` = ref / this. Without
    ``--quick`` a round times a whole number of both checkouts' ``timing_cycle`` (``iters``
    rounded up; known after the warm-up, which is at least one iteration)."""
    from statistics import median

    names = args.only.split(",")
    with checkout_of(args.compare) as ref_root:
        sides = [Side("ref", ref_root, forwarded_args(argv)), Side("this", ROOT, forwarded_args(argv))]
        try:
            cycles: dict[str, int] = {}
            for side in sides:
                for name in names:
                    cycles[name] = math.lcm(cycles.get(name, 1), side.run(name, max(warmup, 1))["cycle"])
            per_round = {name: iters if args.quick else whole_cycles(iters, cycles[name]) for name in names}
            times: dict[tuple[str, str], list[float]] = {}
            for rep in range(args.reps):
                for name in names:
                    for side in sides if rep % 2 == 0 else sides[::-1]:
                        times.setdefault((side.label, name), []).append(side.run(name, per_round[name])["ms_per_iter"])
        finally:
            for side in sides:
                side.close()
    for name in names:
        ref, this = times[("ref", name)], times[("this", name)]
        record = {
            "name": name,
            "ref": args.compare,
            "ref_root": sides[0].imported_from,
            "this_root": sides[1].imported_from,
            "as_trained": args.as_trained,
            "gan_budget": args.gan_budget,
            "reps": args.reps,
            "iters": per_round[name],
            "cycle": cycles[name],
            "warmup": max(warmup, 1),
            "ref_ms": round(median(ref), 1),
            "this_ms": round(median(this), 1),
            "speedup": round(median(ref) / median(this), 3),
            "speedup_per_rep": [round(r / t, 3) for r, t in zip(ref, this)],
            "ref_ms_all": [round(v, 1) for v in ref],
            "this_ms_all": [round(v, 1) for v in this],
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
        print(json.dumps(record), flush=True)
    return 0


# ----- command line ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="config name under configs/ or a path (default: fundus/relay on a GPU, demo/relay on the CPU)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="override a key of the config's common section")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--batch", type=int, help="batch size (default: 128 on a GPU, the config's on the CPU, 4 with --quick)")
    p.add_argument("--warmup", type=int, help="untimed iterations first (default: 10 GPU, 2 CPU, 1 quick)")
    p.add_argument(
        "--iters",
        type=int,
        help="timed iterations (default: 40 GPU, 8 CPU, 2 quick), rounded up to whole cycles of the measured work except with --quick (see benchmarks/README.md)",
    )
    p.add_argument(
        "--gan-budget",
        choices=("one", "config"),
        default="one",
        help="one: an iteration is one G+D step and one solver step (default; the same work for every checkout); config: the config's own G+D steps per solver step, i.e. one batch of training",
    )
    p.add_argument("--only", default=",".join(MEASUREMENTS), help=f"comma-separated subset of {', '.join(MEASUREMENTS)}")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="tiny batch, 1 warm-up + 2 timed iterations, FLOPs of 1 iteration, 1 CPU thread unless --threads")
    p.add_argument("--matrix", action="store_true", help="the baseline, then every switch toggled one at a time")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--fused-adam", action="store_true")
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True (GPU)")
    p.add_argument("--replay-per-substep", action="store_true")
    p.add_argument("--aug-device", choices=["none", "cpu", "same"], default="none")
    p.add_argument(
        "--variants",
        help="semicolon-separated switch sets measured one after the other, each a comma list of "
        "bf16, channels_last, compile, fused_adam, replay_per_substep, aug_cpu, aug_same, or fp32 (none), e.g. 'fp32;bf16;bf16,channels_last'",
    )
    p.add_argument("--flop-iters", type=int, help="iterations the FLOP count averages over (default: one regularisation cycle, 1 with --quick; 0: no count)")
    p.add_argument(
        "--as-trained",
        action="store_true",
        help="precision, memory format and compile from the config's train section, applied as training does (instead of the switches)",
    )
    p.add_argument(
        "--compare",
        metavar="REF",
        help="measure another checkout (a directory, or a commit checked out in a temporary git worktree) side by side: one JSON line per measurement with both medians and the speed-up",
    )
    p.add_argument("--reps", type=int, default=5, help="--compare: rounds of timed iterations, alternating the order (default 5)")
    p.add_argument("--code-root", help=argparse.SUPPRESS)  # a --compare worker: relaylearn of this checkout
    args = p.parse_args(argv)
    unknown = sorted(set(args.only.split(",")) - set(MEASUREMENTS))
    if unknown:
        p.error(f"--only: unknown measurement '{unknown[0]}'")
    return args


def switches_from(args: argparse.Namespace) -> Switches:
    return Switches(args.precision, args.channels_last, args.compile, args.fused_adam, args.replay_per_substep, args.aug_device, args.cudnn_benchmark)


VARIANT_WORDS = {
    "fp32": {},
    "bf16": {"precision": "bf16"},
    "channels_last": {"channels_last": True},
    "compile": {"compile": True},
    "fused_adam": {"fused_adam": True},
    "replay_per_substep": {"replay_per_substep": True},
    "aug_cpu": {"aug_device": "cpu"},
    "aug_same": {"aug_device": "same"},
    "cudnn_benchmark": {"cudnn_benchmark": True},
}


def parse_variants(spec: str) -> list[Switches]:
    """'fp32;bf16,channels_last' → [Switches(), Switches(precision='bf16', channels_last=True)]."""
    out = []
    for part in spec.split(";"):
        changes: dict = {}
        for word in filter(None, (w.strip() for w in part.split(","))):
            if word not in VARIANT_WORDS:
                raise SystemExit(f"speed.py: --variants: unknown switch '{word}' (one of {', '.join(VARIANT_WORDS)})")
            changes.update(VARIANT_WORDS[word])
        out.append(replace(Switches(), **changes))
    return out


def plan(args: argparse.Namespace) -> Iterator[tuple[str, Switches]]:
    """(measurement, switches) pairs to run, in order."""
    baseline = switches_from(args)
    if getattr(args, "variants", None):
        for switches in parse_variants(args.variants):
            for name in args.only.split(","):
                if not switches.replay_per_substep or name == "relay_replay":
                    yield name, switches
        return
    variants = [baseline] + (baseline.toggled() if args.matrix else [])
    for switches in variants:
        for name in args.only.split(","):
            if switches.replay_per_substep != baseline.replay_per_substep and name != "relay_replay":
                continue  # only the replay measurement replays
            yield name, switches


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads or args.quick:  # quick: one thread, as busy shared CPUs stall multi-threaded kernels
        torch.set_num_threads(args.threads or 1)
    config = args.config or ("fundus/relay" if device.type == "cuda" else "demo/relay")
    base = load_config(config, args.sets).tasks[0]
    cpu = device.type == "cpu"
    batch = args.batch or (4 if args.quick else (base.train.batch_size if cpu else 128))
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else (2 if cpu else 10))
    iters = args.iters or (2 if args.quick else (8 if cpu else 40))
    flop_iters = args.flop_iters if args.flop_iters is not None else (1 if args.quick else None)
    if args.code_root:
        return worker(args, base, config, device, batch)
    if args.compare:
        if args.matrix:
            raise SystemExit("speed.py: --compare measures one setting; leave out --matrix")
        return compare(args, list(sys.argv[1:] if argv is None else argv), warmup, iters)
    flop_cache: dict = {}
    for name, switches in plan(args):
        record = measure(
            name,
            base,
            config,
            switches,
            device,
            batch,
            warmup,
            iters,
            flop_iters,
            trained=args.as_trained,
            flop_cache=flop_cache,
            round_to_cycle=not args.quick,
            gan_budget=args.gan_budget,
        )
        record["torch"] = torch.__version__
        record["threads"] = torch.get_num_threads()
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
