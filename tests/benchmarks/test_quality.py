"""benchmarks/quality.py (and replay_ablation.py): a zero external Dice stays 0.0, and both scripts
import the relaylearn of the checkout they live in."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import ROOT, load_benchmark


def test_a_zero_external_dice_is_averaged_as_zero_and_a_missing_one_as_nan(tmp_path, monkeypatch, capsys):
    quality = load_benchmark("quality")
    matrix = {"sites": ["A", "B", "X"], "trained": ["A", "B"], "R": [[0.9, 0.2, 0.4], [0.8, 0.9, 0.0]], "acc": 0.85, "bwt": -0.1, "forgetting": 0.1}
    no_external = {**matrix, "sites": ["A", "B"], "R": [[0.9, 0.2], [0.8, 0.9]]}
    runs = {"relay": [matrix, {**matrix, "R": [[0.9, 0.2, 0.4], [0.8, 0.9, 0.5]]}], "sequential": [no_external]}

    def compare_strategies(specs, name, **_):
        label = specs[0].split("/")[-1]
        table = tmp_path / label / "table.md"
        table.parent.mkdir()
        data = {label: {f"order0_seed{i}": {"wall_seconds": 1.0, "matrix": m} for i, m in enumerate(runs[label])}}
        (table.parent / "matrices.json").write_text(json.dumps(data))
        return table

    monkeypatch.setattr(quality, "compare_strategies", compare_strategies)
    assert quality.main(["--configs", "demo/relay", "demo/sequential", "-q"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["summary"]
    assert summary["relay"]["external_dice"] == pytest.approx(0.25)  # (0.0 + 0.5) / 2, not nan
    assert math.isnan(summary["sequential"]["external_dice"])  # no external site


@pytest.mark.parametrize("script", ["quality", "replay_ablation"])
def test_the_script_imports_the_relaylearn_of_its_own_checkout(tmp_path, script):
    """Another relaylearn first on PYTHONPATH (another checkout, an installed one) is not used."""
    other = tmp_path / "relaylearn"
    other.mkdir()
    (other / "__init__.py").write_text("raise ImportError('the other checkout was imported')\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--help"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "the other checkout was imported" not in proc.stderr
    assert proc.returncode == 0, proc.stderr[-2000:]
