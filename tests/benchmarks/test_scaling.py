"""benchmarks/scaling.py: the JSON has one entry per number of earlier sites, and the bundle does
not grow with them (the networks' size is fixed; the site registry is a little JSON). Iteration
time is measured but not asserted (shared CI machines are noisy)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCALING = ROOT / "benchmarks" / "scaling.py"


@pytest.mark.slow
def test_scaling_json_has_every_site_count_and_the_bundle_stays_the_same_size():
    proc = subprocess.run(
        [sys.executable, str(SCALING), "--json", "--sites", "1,2,5", "--batch", "2", "--warmup", "0", "--iters", "1", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1  # --json: only the JSON line
    out = json.loads(lines[0])
    for key in ("iter_ms", "bundle_bytes", "bundle_tensor_bytes", "peak_mem_bytes"):
        assert set(out[key]) == {"1", "2", "5"}, key
        assert all(v > 0 for v in out[key].values()), key
    assert len(set(out["bundle_tensor_bytes"].values())) == 1  # same tensors, whatever the number of sites
    sizes = out["bundle_bytes"]
    assert 0 <= sizes["5"] - sizes["1"] <= 200 * 4  # only the registry's JSON grows, by < 200 bytes a site
    assert set(out["ratio"]) == {"iter_ms", "bundle_bytes", "bundle_tensor_bytes", "peak_mem_bytes"}
    assert out["ratio"]["bundle_bytes"] < 1.001 and isinstance(out["flat"], bool)
