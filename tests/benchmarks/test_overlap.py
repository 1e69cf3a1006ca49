"""benchmarks/overlap.py: half the batches run the last G+D step beside the solver step, half in
turn, matched on their regularisation work, and the JSON line gives both medians (timings are not
asserted)."""

from __future__ import annotations

import json

import torch

from tests.conftest import TINY, load_benchmark, tiny_config


def test_both_halves_hold_the_same_regularisation_work(tmp_path, tiny_fundus, monkeypatch, capsys):
    """With one G+D step per batch and R1, path length and ADA every second G+D step, even / odd
    alternation put all the regularisation in one half; the halves now hold the same amount."""
    import relaylearn.strategies.relay as relay

    batches = []  # per batch: [local step, [(gan_step, beside the solver step), ...]]
    real_step, real_gan = relay.Relay.training_step, relay.Relay._gan_step

    def training_step(self, batch, step):
        batches.append([step.step, []])
        return real_step(self, batch, step)

    def gan_step(self, mixed, real, step, unwrapped=False):
        batches[-1][1].append((self.gan_step, unwrapped))
        return real_gan(self, mixed, real, step, unwrapped=unwrapped)

    monkeypatch.setattr(relay.Relay, "training_step", training_step)
    monkeypatch.setattr(relay.Relay, "_gan_step", gan_step)
    kwargs = {**TINY, "gan_pairs_side_by_side": False, "gan_steps_per_solver_step": 1, "d_reg_interval": 2, "g_reg_interval": 2, "ada_interval": 2}
    config = tiny_config(tmp_path, tiny_fundus, strategy="relay", task_ids=(1, 2), strategy_kwargs=kwargs)
    before = torch.get_num_threads()
    try:
        assert load_benchmark("overlap").main(["--config", str(config), "--sites", "1", "--batches", "10", "--threads", "2"]) == 0
    finally:
        torch.set_num_threads(before)
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    regularised = {True: 0, False: 0}  # G+D steps with R1 (and path length and ADA) per half
    for local, steps in batches:
        on = any(beside for _, beside in steps)
        if local >= 2:
            regularised[on] += sum((g + 1) % 2 == 0 for g, _ in steps)
    assert [sum(any(b for _, b in steps) for local, steps in batches if local >= 2)] == [4]
    assert regularised[True] == regularised[False] == 2
    assert record["what"] == "overlap" and record["sites"] == 1 and record["threads"] == 2
    assert record["n"] == [4, 4] and record.get("unpaired") == 0  # batches 2 to 9 timed, all paired
    assert record["overlap_ms"] > 0 and record["in_turn_ms"] > 0
    assert relay.Relay._overlaps_solver_step.__name__ == "_overlaps_solver_step"  # patches undone


def test_with_pairs_on_batches_run_the_gan_pairs_side_by_side(tmp_path, tiny_fundus, monkeypatch, capsys):
    import relaylearn.strategies.relay as relay

    calls = []
    real = relay.run_beside
    monkeypatch.setattr(relay, "run_beside", lambda main, side: (calls.append(1), real(main, side))[1])
    seen = []
    decides = relay.Relay._pairs_side_by_side
    monkeypatch.setattr(relay.Relay, "_pairs_side_by_side", lambda self, step, device: (seen.append((step.step, decides(self, step, device))), seen[-1][1])[1])
    # every batch the same regularisation work (one R1, path-length and ADA step of its two), so
    # batch 2 runs on and batch 3 off
    kwargs = {**TINY, "gan_steps_per_solver_step": 2, "overlap_solver_step": False, "d_reg_interval": 2, "g_reg_interval": 2, "ada_interval": 2}
    config = tiny_config(tmp_path, tiny_fundus, strategy="relay", task_ids=(1, 2), strategy_kwargs=kwargs)
    before = torch.get_num_threads()
    try:
        assert load_benchmark("overlap").main(["--config", str(config), "--sites", "1", "--batches", "4", "--threads", "2", "--what", "pairs"]) == 0
    finally:
        torch.set_num_threads(before)
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["what"] == "pairs" and record["sites"] == 1 and record["n"] == [1, 1]  # batches 2 and 3 timed
    # the benchmark's patch asks the relay (the lambda above) on the "on" batches only (0 and 2)
    assert {index for index, _ in seen} == {0, 2} and all(beside for _, beside in seen)
    assert len(calls) == 2 * len(seen)  # a G step and a D step each time
    assert relay.Relay._pairs_side_by_side.__name__ == "<lambda>"  # the benchmark's own patch undone
