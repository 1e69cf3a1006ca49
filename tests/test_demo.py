"""relaylearn.demo: the summary names each relay's mean and lowest final replay fidelity."""

from __future__ import annotations

import json
from types import SimpleNamespace

import relaylearn.demo as demo
import relaylearn.report as report


def test_summary_gives_mean_and_lowest_replay_fidelity(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    matrix = {
        "sites": ["A", "B", "C", "X"],
        "trained": ["A", "B", "C"],
        "R": [[0.9, 0.1, 0.1, 0.5], [0.8, 0.9, 0.2, 0.6], [0.7, 0.8, 0.9, 0.7]],
        "acc": 0.8,
        "bwt": -0.15,
        "forgetting": 0.15,
    }
    replay = {"sites": ["A", "B", "C"], "fidelity": [[None] * 3, [0.8, None, None], [0.45, 0.85, None]], "reference": [0.9, 0.85, 0.9]}

    def fake_training(cfg, name, options):
        run_dir = tmp_path / "runs" / cfg.name
        if cfg.tasks[0].strategy.name == "relay":
            (run_dir / "metrics").mkdir(parents=True)
            (run_dir / "metrics" / "replay.json").write_text(json.dumps(replay))
        return SimpleNamespace(matrix=matrix, run_dir=run_dir, wall_seconds=12.0)

    monkeypatch.setattr(demo, "run_training", fake_training)
    monkeypatch.setattr(report, "write_report", lambda root, name: root / "report.html")
    assert demo.main(["--only", "sequential,relay", "--name", "t", "-q"]) == 0
    out = capsys.readouterr().out
    assert "0.75, 0.50 (A)" in out  # mean of 0.45/0.9 and 0.85/0.85; lowest is site A
    summary = {row["strategy"]: row for row in json.loads((tmp_path / "exps" / "demo" / "summary_t.json").read_text())}
    assert summary["relay"]["lowest_replay_site"] == "A" and abs(summary["relay"]["lowest_replay_fidelity_x_reference"] - 0.5) < 1e-9
    assert summary["sequential"]["replay_fidelity_x_reference"] is None and summary["sequential"]["lowest_replay_site"] is None


def test_an_interrupted_demo_says_run_it_again(tmp_path, monkeypatch, capsys):
    """The demo resumes when run again; it has no --resume to send the user to."""
    from tests.conftest import stopped_training

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "run_training", stopped_training)
    assert demo.main(["--only", "sequential", "-q"]) == 143
    err = capsys.readouterr().err
    assert "run the same command again" in err and "--resume" not in err
