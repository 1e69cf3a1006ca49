"""benchmarks/overlap.py: even batches run the last G+D step beside the solver step, odd ones in
turn, and the JSON line gives both medians (timings are not asserted)."""

from __future__ import annotations

import json

import torch

from tests.conftest import load_benchmark, tiny_config
from tests.strategies.test_relay import TINY


def test_even_batches_overlap_and_odd_ones_run_in_turn(tmp_path, tiny_fundus, monkeypatch, capsys):
    import relaylearn.strategies.relay as relay

    overlapped = []
    real = relay.run_beside
    monkeypatch.setattr(relay, "run_beside", lambda main, side: (overlapped.append(1), real(main, side))[1])
    config = tiny_config(tmp_path, tiny_fundus, strategy="relay", task_ids=(1, 2), strategy_kwargs=TINY)
    before = torch.get_num_threads()
    try:
        assert load_benchmark("overlap").main(["--config", str(config), "--batches", "4", "--threads", "2"]) == 0
    finally:
        torch.set_num_threads(before)
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(overlapped) == 2 * 2  # batches 0 and 2 of each of the two sites
    assert record["sites"] == 2 and record["threads"] == 2 and record["n"] == [2, 2]  # batches 2 and 3 timed per site
    assert record["overlap_ms"] > 0 and record["in_turn_ms"] > 0
    assert relay.Relay._overlaps_solver_step.__name__ == "_overlaps_solver_step"  # patches undone
