"""benchmarks/overlap.py: even batches run the last G+D step beside the solver step, odd ones in
turn, and the JSON line gives both medians (timings are not asserted)."""

from __future__ import annotations

import json

import torch

from tests.conftest import TINY, load_benchmark, tiny_config


def test_even_batches_overlap_and_odd_ones_run_in_turn(tmp_path, tiny_fundus, monkeypatch, capsys):
    import relaylearn.strategies.relay as relay

    overlapped = []
    real = relay.run_beside
    monkeypatch.setattr(relay, "run_beside", lambda main, side: (overlapped.append(1), real(main, side))[1])
    kwargs = {**TINY, "gan_pairs_side_by_side": False}  # only the overlap runs beside anything
    config = tiny_config(tmp_path, tiny_fundus, strategy="relay", task_ids=(1, 2), strategy_kwargs=kwargs)
    before = torch.get_num_threads()
    try:
        assert load_benchmark("overlap").main(["--config", str(config), "--batches", "4", "--threads", "2"]) == 0
    finally:
        torch.set_num_threads(before)
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(overlapped) == 2 * 2  # batches 0 and 2 of each of the two sites
    assert record["what"] == "overlap" and record["sites"] == 2 and record["threads"] == 2 and record["n"] == [2, 2]  # batches 2 and 3 timed per site
    assert record["overlap_ms"] > 0 and record["in_turn_ms"] > 0
    assert relay.Relay._overlaps_solver_step.__name__ == "_overlaps_solver_step"  # patches undone


def test_with_pairs_even_batches_run_the_gan_pairs_side_by_side(tmp_path, tiny_fundus, monkeypatch, capsys):
    import relaylearn.strategies.relay as relay

    calls = []
    real = relay.run_beside
    monkeypatch.setattr(relay, "run_beside", lambda main, side: (calls.append(1), real(main, side))[1])
    seen = []
    decides = relay.Relay._pairs_side_by_side
    monkeypatch.setattr(relay.Relay, "_pairs_side_by_side", lambda self, step, device: (seen.append((step.step, decides(self, step, device))), seen[-1][1])[1])
    kwargs = {**TINY, "gan_steps_per_solver_step": 2, "overlap_solver_step": False}
    config = tiny_config(tmp_path, tiny_fundus, strategy="relay", task_ids=(1, 2), strategy_kwargs=kwargs)
    before = torch.get_num_threads()
    try:
        assert load_benchmark("overlap").main(["--config", str(config), "--sites", "1", "--batches", "4", "--threads", "2", "--what", "pairs"]) == 0
    finally:
        torch.set_num_threads(before)
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["what"] == "pairs" and record["sites"] == 1 and record["n"] == [1, 1]  # batches 2 and 3 timed
    # the benchmark's patch asks the relay (the lambda above) on even batches only, odd ones run in turn
    assert {index for index, _ in seen} == {0, 2} and all(beside for _, beside in seen)
    assert len(calls) == 2 * len(seen)  # a G step and a D step each time
    assert relay.Relay._pairs_side_by_side.__name__ == "<lambda>"  # the benchmark's own patch undone
