"""Whether a forward pass of the solver at an image size fits this machine's memory, checked before
it runs; and one line instead of a crash when an allocation fails anyway.

A signed bundle may state any ``img_size`` up to 4096 per side, and a trusted signer is not trusted
with the machine: ``predict``, ``export``, ``test`` and ``train --in`` estimate what the solver
needs at the bundle's size and refuse (exit 3) before allocating it; a size from the local config
is refused with exit 2. The estimate is batch × pixels × bytes per pixel, measured for the built-in
U-Net (peak resident memory of one fp32 CPU pass, 3 channels, batches of 1–4 at 64–256 px):
inference 1.4–1.9 KB per pixel, training (forward and backward) 2.5–3.2 KB per pixel.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from relaylearn.errors import ConfigError, UserError, VerificationError

INFERENCE_BYTES_PER_PIXEL = 2048
TRAINING_BYTES_PER_PIXEL = 3072
OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "cannot allocate memory")


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def available_host_memory() -> int | None:
    """Bytes of memory available to a new allocation: Linux's MemAvailable (free + reclaimable
    cache), else the free physical pages; None where unknown."""
    import os

    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes free for a new allocation on ``device`` (a CUDA GPU's free memory, else the host's)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except (RuntimeError, AssertionError):
            return None
    return available_host_memory()


def forward_bytes(batch: int, img_size: Sequence[int], training: bool = False) -> int:
    """About the memory a pass of the solver over ``batch`` images of ``img_size`` takes."""
    height, width = img_size
    return batch * height * width * (TRAINING_BYTES_PER_PIXEL if training else INFERENCE_BYTES_PER_PIXEL)


def require_memory(
    img_size: Sequence[int],
    batch: int,
    device: torch.device | str = "cpu",
    *,
    training: bool = False,
    bundle: str | Path | None = None,
    key: str = "common.dataset.kwargs.img_size",
    path: str | Path | None = None,
) -> None:
    """Refuse before allocating when the solver at ``img_size`` would not fit: VerificationError
    (exit 3) naming ``bundle`` when the size came from it, else ConfigError (exit 2) naming ``key``."""
    need, have = forward_bytes(batch, img_size, training), available_memory(device)
    if have is None or need <= have:
        return
    height, width = img_size
    work = f"{'train on' if training else 'run'} a batch of {batch}"
    where = "GPU" if torch.device(device).type == "cuda" else "machine"
    facts = f"at {height}x{width} needs about {format_bytes(need)} to {work}, this {where} has {format_bytes(have)} available"
    if bundle is not None:
        raise VerificationError(f"the bundle's model {facts}", bundle)
    raise ConfigError(f"{key}: the model {facts}; use a smaller img_size or batch size", path)


def fitting_batch(img_size: Sequence[int], most: int, device: torch.device | str = "cpu", **where) -> int:
    """The largest batch up to ``most`` whose inference fits; :func:`require_memory` refuses
    (``where``: its ``bundle`` / ``key`` / ``path``) when not even one image does."""
    require_memory(img_size, 1, device, **where)
    have = available_memory(device)
    return most if have is None else max(1, min(most, have // forward_bytes(1, img_size)))


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failed (host or GPU)."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc).lower() for text in OUT_OF_MEMORY)


@contextmanager
def out_of_memory_as_error(what: str, img_size: Sequence[int], batch: int) -> Iterator[None]:
    """An allocation failure inside becomes one UserError line (exit 2) suggesting a smaller size."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - only allocation failures are turned into a UserError
        if not is_out_of_memory(exc):
            raise
        height, width = img_size
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(
            f"out of memory while {what} at {height}x{width} with a batch of {batch} ({first}); use a smaller img_size or batch size, or a machine with more memory"
        ) from None
