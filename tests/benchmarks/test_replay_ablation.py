"""benchmarks/replay_ablation.py: the summary, targets and table from finished compare runs."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_benchmark


def _write(root, variant, label, runs):
    base = root / f"abl-{variant}"
    data = {label: {}}
    for i, (matrix, replay) in enumerate(runs):
        key = f"order0_seed{i}"
        data[label][key] = {"order": [1, 2], "seed": i, "wall_seconds": 100.0 + i, "matrix": matrix}
        if replay is not None:
            (base / label / key / label / f"abl-{variant}-o0-s{i}" / "metrics").mkdir(parents=True)
            (base / label / key / label / f"abl-{variant}-o0-s{i}" / "metrics" / "replay.json").write_text(json.dumps(replay))
    base.mkdir(parents=True, exist_ok=True)
    (base / "matrices.json").write_text(json.dumps(data))


def test_summary_targets_and_table(tmp_path):
    m = load_benchmark("replay_ablation")
    matrix = {"sites": ["A", "B", "X"], "trained": ["A", "B"], "R": [[0.9, 0.2, 0.3], [0.8, 0.9, 0.5]], "acc": 0.85, "bwt": -0.1, "forgetting": 0.1}
    replay = {"sites": ["A", "B"], "fidelity": [[None, None], [0.72, None]], "reference": [0.9, 0.9]}
    _write(tmp_path, "relay_replay_only", "relay", [(matrix, replay), ({**matrix, "forgetting": 0.2}, {**replay, "fidelity": [[None, None], [0.81, None]]})])
    _write(tmp_path, "sequential", "sequential", [({**matrix, "forgetting": 0.6}, None)])
    summary = m.summarise(tmp_path / "abl", "abl", ["relay_replay_only", "sequential", "joint"])
    only = summary["relay_replay_only"]
    assert only["runs"] == 2 and only["forgetting"][0] == pytest.approx(0.15) and only["external_dice"][0] == pytest.approx(0.5)
    assert only["fidelity"][0] == pytest.approx(0.765) and only["final_fidelity_ratio_per_site"] == {"A": pytest.approx(0.85)}
    assert summary["sequential"]["fidelity"] == (None, None) and "joint" not in summary
    t = m.targets(summary)
    assert t["replay_only_fidelity_ge_0.8x_every_site"] and t["replay_only_forgetting_le_third_of_sequential"]
    assert t["replay_only_forgetting_over_sequential"] == pytest.approx(0.25)
    table = m.markdown(summary, "# t")
    assert (
        "| relay_replay_only | 2 | 0.850 ± 0.000 | -0.100 ± 0.000 | 0.150 ± 0.071 | 0.500 ± 0.000 | 0.765 ± 0.064 | 0.85 ± 0.07 | 0.85 (A) | 100 ± 1 |" in table
    )
    assert "| sequential | 1 |" in table and "| – |" in table
