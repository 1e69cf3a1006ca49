"""Which random generator the replay GAN's layers draw from, per thread.

The GAN's own draws (noise inputs, style-mixing cut-offs, ADA's transforms, the path-length
probe) come from :func:`current_generator`: PyTorch's default generator unless a caller set one for
this thread with :func:`drawing_from`. The relay gives the image pair (image generator and
discriminator) and the label-map pair one generator each, seeded from the default generator, so
the two pairs draw the same numbers whether they run one after the other or side by side in two
threads (the default generator is shared by all threads, and the order of two threads' draws from
it would depend on timing).

The wrappers take the same arguments as their ``torch`` namesakes (no ``generator``) and draw the
same numbers as they do when no generator is set.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

_thread = threading.local()


def current_generator() -> torch.Generator | None:
    """The generator set for this thread by :func:`drawing_from`, else None (PyTorch's default)."""
    return getattr(_thread, "generator", None)


@contextmanager
def drawing_from(generator: torch.Generator | None) -> Iterator[None]:
    """Within the block, the GAN layers of this thread draw from ``generator`` (None: the default)."""
    previous = current_generator()
    _thread.generator = generator
    try:
        yield
    finally:
        _thread.generator = previous


def rand(*size: int, device: torch.device | str | None = None) -> Tensor:
    """``torch.rand`` from :func:`current_generator`."""
    return torch.rand(*size, device=device, generator=current_generator())


def randn(*size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """``torch.randn`` from :func:`current_generator`."""
    return torch.randn(*size, device=device, dtype=dtype, generator=current_generator())


def randint(low: int, high: int, size: tuple[int, ...], device: torch.device | str | None = None) -> Tensor:
    """``torch.randint`` from :func:`current_generator`."""
    return torch.randint(low, high, size, device=device, generator=current_generator())


def randn_like(x: Tensor) -> Tensor:
    """``torch.randn_like`` (same shape, dtype, device and memory format) from :func:`current_generator`."""
    generator = current_generator()
    return torch.randn_like(x) if generator is None else torch.empty_like(x).normal_(generator=generator)
