"""``-g``: GPU ids or ``cpu``; bad specs are one-line UserErrors."""

from __future__ import annotations

import pytest
import torch

from relaylearn.config import LightningConfig
from relaylearn.devices import inference_device, parse_devices
from relaylearn.errors import UserError


def test_cpu_and_bad_specs():
    assert parse_devices("cpu") == ("cpu", 1)
    assert parse_devices("=cpu", LightningConfig(devices=2)) == ("cpu", 2)
    assert inference_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="expected GPU ids"):
        parse_devices("x")
    with pytest.raises(UserError, match="no GPU id"):
        parse_devices(",")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            parse_devices("0")
        assert inference_device(None) == torch.device("cpu")


def test_release_memory_returns_freed_heap_pages():
    import re
    from pathlib import Path

    from relaylearn.devices import release_memory

    status = Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("no /proc on this system")

    def rss() -> int:
        return int(re.search(r"VmRSS:\s+(\d+)", status.read_text()).group(1)) * 1024

    chunks = [bytearray(64 * 1024) for _ in range(4096)]  # 256 MiB in small heap blocks (below mmap's threshold)
    del chunks[::2]  # free every other block: the heap cannot shrink from its top, only trimming returns the holes
    before = rss()
    release_memory()
    assert before - rss() > 64 * 2**20
