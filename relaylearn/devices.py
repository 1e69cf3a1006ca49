"""Device selection from ``-g``: the one parser of GPU ids shared by training and inference; the
precision a device trains in (:func:`resolve_precision`); the host allocator's settings for CPU
training (:func:`keep_freed_host_memory`); two pieces of CPU work side by side
(:func:`run_beside`); and handing a finished run's memory back (:func:`release_memory`)."""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, TypeVar

import torch

from relaylearn.errors import UserError


def parse_devices(spec: str | None, lightning_cfg=None) -> tuple[str, Any]:
    """``-g`` → (accelerator, devices). ``cpu``; GPU ids ``0`` / ``0,1``; None = GPU 0 if any, else
    CPU. ``devices`` is a list of GPU ids, or a count (``train.lightning.devices``, default 1)."""
    count = (lightning_cfg.devices if lightning_cfg is not None else None) or 1
    if spec is None:
        return ("gpu" if torch.cuda.is_available() else "cpu"), count
    spec = spec.strip().lstrip("=")
    if spec.lower() == "cpu":
        return "cpu", count
    try:
        ids = [int(x) for x in spec.split(",") if x.strip() != ""]
    except ValueError:
        raise UserError(f"-g {spec!r}: expected GPU ids such as 0 or 0,1, or 'cpu'") from None
    if not ids:
        raise UserError(f"-g {spec!r}: no GPU id given")
    if not torch.cuda.is_available():
        raise UserError(f"-g {spec}: no CUDA GPU is available on this machine (use -g cpu)")
    if max(ids) >= torch.cuda.device_count():
        raise UserError(f"-g {spec}: this machine has {torch.cuda.device_count()} GPU(s)")
    return "gpu", ids


def native_bf16(accelerator: str) -> bool:
    """Whether bf16 matrix products and convolutions run on native kernels here: a CUDA GPU with
    bf16 support, or an x86 CPU with AVX512-BF16 or AMX. Elsewhere (an AVX2-only CPU, say) PyTorch
    computes bf16 convolutions with slow reference kernels: a demo relay iteration took 10 s in
    bf16 against 0.66 s in fp32 on such a CPU."""
    if accelerator == "gpu":  # emulated bf16 (pre-Ampere GPUs) is slower than fp32
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(check is not None and bool(check()) for check in checks)


def resolve_precision(precision: str, accelerator: str, warn: bool = True) -> str:
    """The Lightning precision ``train.precision`` means on ``accelerator`` ("cpu" / "gpu").

    ``auto`` is ``bf16-mixed`` where :func:`native_bf16`, else ``32``; ``16-mixed`` (GPU only) is
    ``auto`` on the CPU. ``bf16-mixed`` asked for by name is kept everywhere, with a warning where
    it would run on slow kernels (``warn``: say so)."""
    if accelerator == "cpu" and precision == "16-mixed":
        if warn:
            warnings.warn("train.precision 16-mixed is not supported on the CPU; using auto", stacklevel=2)
        precision = "auto"
    if precision == "auto":
        return "bf16-mixed" if native_bf16(accelerator) else "32"
    if warn and precision == "bf16-mixed" and not native_bf16(accelerator):
        warnings.warn(
            f"train.precision bf16-mixed: this {accelerator.upper()} has no native bf16 kernels, so training runs much slower than "
            "in 32 (use train.precision auto or 32)",
            stacklevel=2,
        )
    return precision


def inference_device(spec: str | None, lightning_cfg=None) -> torch.device:
    """The one device ``test`` / ``predict`` run on: the first GPU of ``-g``, else the CPU."""
    accelerator, devices = parse_devices(spec, lightning_cfg)
    if accelerator == "gpu":
        return torch.device("cuda", devices[0] if isinstance(devices, list) else 0)
    return torch.device("cpu")


#: glibc ``mallopt`` parameters and the values CPU training sets (:func:`keep_freed_host_memory`)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest: blocks up to 32 MiB come from the heap
TRIM_THRESHOLD_BYTES = 256 << 20  # free memory kept at the heap's top before it goes back
_allocator_tuned: bool | None = None


def keep_freed_host_memory() -> bool:
    """Let glibc's ``malloc`` keep freed blocks of up to 32 MiB (and up to 256 MiB of free heap)
    in the process instead of handing them back to the system. Returns whether it is in effect.

    A CPU training step frees and re-allocates the same multi-megabyte buffers every iteration
    (weight gradients, activations); by default glibc serves such blocks with fresh ``mmap``s or
    trims them off the heap, so every re-allocation page-faults on first touch. The demo relay
    (AVX512-BF16 CPU, two threads, two runs each way): 4.5–4.9 M → 0.6–0.7 M page faults, 10–11 →
    4.2–4.3 s of system time, the same results; wall time −3 % / +0.4 % (within noise).

    Once per process; nothing on other C libraries, and nothing where the user set glibc's malloc
    tunables (``GLIBC_TUNABLES``, ``MALLOC_*_``) or ``RELAYLEARN_KEEP_FREED_MEMORY=0``.
    :func:`release_memory` still returns it all after a run."""
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    user_tuned = "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ)
    mallopt = None if user_tuned or os.environ.get("RELAYLEARN_KEEP_FREED_MEMORY", "1") == "0" else _glibc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _allocator_tuned = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    return _allocator_tuned


T = TypeVar("T")
U = TypeVar("U")
_helper_thread: tuple[int, ThreadPoolExecutor] | None = None  # (process id, executor)


def run_beside(main: Callable[[], T], side: Callable[[], U]) -> tuple[T, U]:
    """Run ``side`` in a helper thread while ``main`` runs in this one; return both results.

    For two independent pieces of CPU work that keep two cores busier side by side than one after
    the other (e.g. thousands of small operators, which gain little from a second intra-op thread,
    beside a few large convolutions): each runs with one intra-op thread, and the caller's count is
    restored afterwards. The helper thread gets the caller's grad mode and CPU
    autocast settings (both are per thread). An exception in either is raised once both are done.

    At most one of the two may draw random numbers or change the global random state: the
    generator is shared by all threads, so the order of draws would otherwise depend on timing.
    ``side`` should not call into a training loop's hooks (they are not thread-safe). Memory that
    ``side`` allocates comes from another ``malloc`` arena than the main thread's, one that gives
    freed blocks back to the system more eagerly: leave the big allocations to ``main``."""
    global _helper_thread
    if _helper_thread is None or _helper_thread[0] != os.getpid():  # a forked child has no such thread
        _helper_thread = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="relaylearn-beside"))
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    autocast = {"enabled": torch.is_autocast_enabled("cpu"), "dtype": torch.get_autocast_dtype("cpu"), "cache_enabled": torch.is_autocast_cache_enabled()}

    def in_helper() -> U:
        torch.set_num_threads(1)
        with torch.set_grad_enabled(grad), torch.autocast("cpu", **autocast):
            return side()

    torch.set_num_threads(1)  # before the helper starts: one thread each from the first operator
    future = _helper_thread[1].submit(in_helper)
    try:
        first = main()
    finally:
        wait([future])  # both touch the caller's objects: never leave the helper running
        torch.set_num_threads(threads)
    return first, future.result()


def release_memory() -> None:
    """Hand the memory of a finished run back before the next one in the same process.

    Collects reference cycles (the trainer, the module and the loggers refer to each other), empties
    the CUDA cache, and on glibc asks ``malloc_trim`` to return freed heap pages to the system.
    Without it a process that trains run after run (``relaylearn compare`` / ``tune``) held about
    1 GB more per finished demo run; with it, it stays flat (README, "Fair baselines")."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    malloc_trim = _glibc_function("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)


def _glibc_function(name: str):
    """glibc's function ``name`` through ctypes, or None (not Linux, or another C library: musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None
