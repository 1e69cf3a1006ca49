"""``-g``: GPU ids or ``cpu``; bad specs are one-line UserErrors."""

from __future__ import annotations

import pytest
import torch

from relaylearn import devices
from relaylearn.config import LightningConfig
from relaylearn.devices import inference_device, parse_devices, resolve_precision
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


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_it_runs_natively(monkeypatch, native):
    monkeypatch.setattr(devices, "native_bf16", lambda accelerator: native)
    expected = "bf16-mixed" if native else "32"
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("auto", "gpu") == expected
    with pytest.warns(UserWarning, match="16-mixed is not supported on the CPU"):
        assert resolve_precision("16-mixed", "cpu") == expected
    assert resolve_precision("16-mixed", "gpu") == "16-mixed"
    assert resolve_precision("32", "cpu") == "32"


def test_bf16_by_name_is_kept_with_a_warning_where_it_is_slow(monkeypatch, recwarn):
    monkeypatch.setattr(devices, "native_bf16", lambda accelerator: False)
    with pytest.warns(UserWarning, match="no native bf16 kernels"):
        assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    assert resolve_precision("bf16-mixed", "cpu", warn=False) == "bf16-mixed"
    monkeypatch.setattr(devices, "native_bf16", lambda accelerator: True)
    assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    assert not recwarn.list


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert devices.native_bf16("cpu") is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert devices.native_bf16("cpu") is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert devices.native_bf16("gpu") is False, "a GPU that only emulates bf16: fp32"
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert devices.native_bf16("cpu") is False, "a torch without the checks: fp32"


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


CHURN = """
import ctypes, resource, sys
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
from relaylearn.devices import keep_freed_host_memory
print(keep_freed_host_memory())
def rounds(n, size=9 << 20):  # two 9 MiB buffers, written and freed: a training step's weight gradients
    for _ in range(n):
        a = libc.malloc(size); libc.memset(a, 1, size); b = libc.malloc(size); libc.memset(b, 1, size)
        libc.free(a); libc.free(b)
rounds(2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(10)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def _churn(env_value: str) -> tuple[str, float]:
    """(whether keep_freed_host_memory took effect, page faults per round) in a fresh process."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    env["RELAYLEARN_KEEP_FREED_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", CHURN], env=env, capture_output=True, text=True, check=True).stdout.split()
    return out[0], float(out[1])


def test_keep_freed_host_memory_stops_the_page_faults_of_reallocation():
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    tuned, faults_tuned = _churn("1")
    untuned, faults_default = _churn("0")
    assert (tuned, untuned) == ("True", "False")
    if faults_default < 200:  # 4 608 pages a round with 4 KiB pages; far fewer with huge pages
        pytest.skip(f"glibc's defaults faulted only {faults_default:.0f} pages a round here (transparent huge pages?)")
    assert faults_tuned < faults_default / 20, "with the setting the freed blocks are reused without faulting in again"


def test_keep_freed_host_memory_leaves_the_users_malloc_settings_alone(monkeypatch):
    for name, value in (("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0"), ("MALLOC_ARENA_MAX_", "1"), ("RELAYLEARN_KEEP_FREED_MEMORY", "0")):
        with monkeypatch.context() as m:
            m.setattr(devices, "_allocator_tuned", None)
            m.setenv(name, value)
            assert devices.keep_freed_host_memory() is False, name


# ----- run_beside --------------------------------------------------------------------------------
def test_run_beside_runs_side_in_another_thread_with_the_callers_settings():
    import threading

    seen = {}

    def side():
        seen["thread"] = threading.get_ident()
        seen["threads"] = torch.get_num_threads()
        seen["grad"] = torch.is_grad_enabled()
        seen["autocast"] = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
        return torch.ones(2, 2) @ torch.ones(2, 2)

    def main():
        seen["main_threads"] = torch.get_num_threads()
        return "main"

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            first, second = devices.run_beside(main, side)
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)
    assert first == "main" and second.dtype == torch.bfloat16 and second[0, 0].item() == 2
    assert seen["thread"] != threading.get_ident()
    assert seen["threads"] == 1 and seen["main_threads"] == 1
    assert seen["grad"] is False and seen["autocast"] == (True, torch.bfloat16)


def test_run_beside_waits_for_both_and_raises_either_failure():
    import threading
    import time

    done = threading.Event()

    def slow_side():
        time.sleep(0.2)
        done.set()
        return 1

    def failing_main():
        raise ValueError("main failed")

    before = torch.get_num_threads()
    with pytest.raises(ValueError, match="main failed"):
        devices.run_beside(failing_main, slow_side)
    assert done.is_set()  # the helper was not left running
    assert torch.get_num_threads() == before

    def failing_side():
        raise KeyError("side failed")

    with pytest.raises(KeyError, match="side failed"):
        devices.run_beside(lambda: 0, failing_side)
