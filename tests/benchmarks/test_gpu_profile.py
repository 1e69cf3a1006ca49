"""benchmarks/gpu_profile.py on the CPU with a tiny relay: every part of the iteration is
timed once, the profiler rows are real operators, and the FIR implementations agree."""

from __future__ import annotations

import json

from tests.conftest import TINY, load_benchmark, tiny_config


def test_profile_times_the_parts_lists_operators_and_checks_the_fir_variants(tmp_path, capsys):
    from relaylearn.models.gan import generator
    from relaylearn.strategies.relay import Relay

    gpu_profile = load_benchmark("gpu_profile")
    originals = (generator.ImageGenerator.forward, Relay.replay)
    config = tiny_config(tmp_path, tmp_path, strategy="relay", strategy_kwargs=TINY)
    args = ["--device", "cpu", "--config", str(config), "--batch", "4", "--only", "relay_replay,sequential", "--precisions", "fp32"]
    assert gpu_profile.main([*args, "--iters", "2", "--prof-iters", "1", "--warmup", "1", "--fir", "--fir-reps", "1", "--tables", str(tmp_path / "t")]) == 0
    replay, sequential = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert "error" not in replay and "error" not in sequential
    parts = replay["parts"]["ms_per_iter_by_part"]
    for part in ("G: backward + Adam", "D: backward + Adam", "solver: backward + Adam", "image generator forward", "replay generation", "U-Net forward"):
        assert parts[part] > 0, part
    assert sum(parts.values()) <= replay["parts"]["ms_per_iter_synced"] * 1.05  # exclusive parts add up to the iteration
    assert set(sequential["parts"]["ms_per_iter_by_part"]) <= {"solver: backward + Adam", "U-Net forward", "(rest of the step)"}
    ops = [row["op"] for row in replay["kernels"]["top"]]
    assert any("conv" in op for op in ops)
    assert replay["fir_calls_per_iter"] > 0
    assert set(replay["fir"]) == {"shipped", "separable", "shifts"}
    for name, result in replay["fir"].items():
        assert result["ms_per_iter"] > 0 and result["max_rel_error"] < 1e-4, name
    assert (tmp_path / "t" / "relay_replay_fp32.txt").read_text().count("aten::") > 5
    assert (generator.ImageGenerator.forward, Relay.replay) == originals  # the timing patches are undone


def test_as_trained_profiles_the_config_s_own_setting_once(tmp_path, capsys):
    gpu_profile = load_benchmark("gpu_profile")
    config = tiny_config(tmp_path, tmp_path, strategy="relay", strategy_kwargs=TINY)
    args = ["--device", "cpu", "--config", str(config), "--batch", "4", "--only", "relay_site1", "--precisions", "fp32,bf16", "--as-trained"]
    assert gpu_profile.main([*args, "--iters", "1", "--prof-iters", "1", "--warmup", "0"]) == 0
    (record,) = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert "error" not in record and record["as_trained"] is True
    assert record["precision"] == "fp32", "the tiny config trains in 32"
    assert record["parts"]["ms_per_iter_by_part"]["G: backward + Adam"] > 0
