"""benchmarks/gpu_check.sh and its Python parts: the small-size mode runs every step on the CPU and
writes one JSON line per measurement; the summary names every variant; speed.py --compare runs
two checkouts side by side; the profile's timers count nested parts once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, TINY, load_benchmark, tiny_config

BENCH = ROOT / "benchmarks"


def test_variants_parse_into_switches_and_unknown_names_fail():
    speed = load_benchmark("speed")
    fp32, combo = speed.parse_variants("fp32;bf16,channels_last,fused_adam")
    assert fp32 == speed.Switches()
    assert (combo.precision, combo.channels_last, combo.fused_adam, combo.compile) == ("bf16", True, True, False)
    with pytest.raises(SystemExit, match="unknown switch 'fp16'"):
        speed.parse_variants("fp16")
    assert speed.forwarded_args(["--compare", "main", "--quick", "--reps=3", "--only", "sequential"]) == ["--quick", "--only", "sequential"]


def test_summary_lists_each_variant_and_says_when_the_fidelity_is_missing():
    summary = load_benchmark("gpu_summary").summarize(
        [
            json.dumps(
                {
                    "name": "relay_replay",
                    "device": "cuda:H100",
                    "config": "fundus/relay",
                    "batch": 128,
                    "img_size": [64, 64],
                    "precision": "bf16",
                    "channels_last": True,
                    "compile": False,
                    "fused_adam": False,
                    "replay_per_substep": False,
                    "aug_device": "none",
                    "ms_per_iter": 101.5,
                    "ms_by_iteration_kind": {"plain": {"n": 7, "median_ms": 60.0, "mean_ms": 61.0}, "pl": {"n": 3, "median_ms": 200.0, "mean_ms": 200.0}},
                    "peak_mem_bytes": 2**31,
                    "tflops": 20.0,
                }
            ),
            json.dumps({"name": "sequential", "precision": "fp32", "error": "RuntimeError: boom"}),
            "not json",
            json.dumps(
                {
                    "name": "replay_smoke",
                    "config": "fundus/relay",
                    "img_size": [64, 64],
                    "batch": 128,
                    "steps_per_site": 9,
                    "wall_s": 1.0,
                    "matrix": {"R": [[0.5]], "sites": ["A"]},
                    "replay_fidelity": None,
                    "replay_fidelity_note": "absent",
                }
            ),
            json.dumps({"name": "replay_smoke_exit", "note": "the smoke wrote its result but exited with 124"}),
        ]
    )
    assert "| `relay_replay` | bf16+channels_last | 101.5 | plain 60.0 (×7), pl 200.0 (×3) | 2.00 | 20.00 |" in summary
    assert "| `sequential` | fp32 | error: RuntimeError: boom |" in summary
    assert "replay fidelity: not measured (absent)" in summary and "9 batches per site" in summary
    assert "replay smoke: the smoke wrote its result but exited with 124" in summary


def test_smoke_steps_fill_the_budget_and_never_go_below_two():
    smoke = load_benchmark("replay_smoke")
    assert smoke.steps_for(200, 100) == int(200 * (1 - smoke.OVERHEAD_SHARE) / 2 / 0.1)
    assert smoke.steps_for(1, 10_000) == 2


def test_exclusive_timers_count_nested_parts_once():
    timers = load_benchmark("profile_site").ExclusiveTimers()
    inner = timers.wrap("inner", lambda: time.sleep(0.02))
    outer = timers.wrap("outer", lambda: (time.sleep(0.02), inner()))
    outer()
    parts = timers.reset()
    assert 0.015 < parts["inner"] < 0.2 and 0.015 < parts["outer"] < 0.2
    assert parts["outer"] < parts["inner"] + 0.015  # the inner sleep is not counted twice


@pytest.mark.slow
def test_compare_runs_two_checkouts_side_by_side(tmp_path):
    config = tiny_config(tmp_path, tmp_path, strategy="relay", strategy_kwargs=TINY)
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "speed.py"),
            "--compare",
            str(ROOT),
            "--config",
            str(config),
            "--batch",
            "2",
            "--warmup",
            "0",
            "--iters",
            "1",
            "--reps",
            "2",
            "--threads",
            "1",
            "--only",
            "sequential,relay_site1",
            "--as-trained",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert [r["name"] for r in records] == ["sequential", "relay_site1"]
    for r in records:
        assert r["ref_root"] == r["this_root"] == str(ROOT)
        assert len(r["ref_ms_all"]) == len(r["this_ms_all"]) == len(r["speedup_per_rep"]) == 2
        assert r["speedup"] > 0 and r["as_trained"] is True


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils timeout")
def test_small_mode_runs_every_step_and_writes_json_lines(tmp_path, tiny_fundus):
    config = tiny_config(tmp_path, tiny_fundus, strategy="relay", strategy_kwargs=TINY)
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "RESULTS_DIR": str(tmp_path / "results"),
        "SMALL_CONFIG": str(config),
        "DATA_ROOT": str(tiny_fundus),
        "COMPILE_TIMEOUT": "1",
    }
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--small"], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = (tmp_path / "results").glob("gpu_check_*_small.jsonl")
    records = [json.loads(line) for line in results.read_text().splitlines()]
    speed = [r for r in records if r["name"] in ("relay_site1", "relay_replay", "sequential")]
    assert len(speed) == 5 * 3 and not [r for r in speed if "error" in r]
    assert {(r["precision"], r["channels_last"], r["fused_adam"], r["cudnn_benchmark"]) for r in speed} == {
        ("fp32", False, False, False),
        ("bf16", False, False, False),
        ("bf16", False, False, True),
        ("bf16", True, True, False),
        ("fp32", False, False, True),
    }
    assert all(sum(k["n"] for k in r["ms_by_iteration_kind"].values()) == r["iters"] for r in speed)
    assert all(r["tflops"] > 0 and r["peak_mem_bytes"] > 0 for r in speed)
    assert [r for r in records if r["name"] == "compile"]  # 1 s is too short to compile: recorded, not fatal
    (scaling,) = [r for r in records if r["name"] == "scaling"]
    assert "error" not in scaling and list(scaling["iter_ms"]) == ["1", "2"]
    (smoke,) = [r for r in records if r["name"] == "replay_smoke"]
    assert smoke["steps_per_site"] == 2 and len(smoke["matrix"]["R"]) == 2
    assert "replay_fidelity" in smoke
    assert "| `relay_replay` | bf16+channels_last+fused_adam |" in proc.stdout


def test_site_profile_times_the_generator_average_snapshots_fidelity_and_audit(monkeypatch):
    from relaylearn.replay_fidelity import FidelityRecorder
    from relaylearn.runner import RelayRun
    from relaylearn.strategies.relay import Relay

    profile_site = load_benchmark("profile_site")
    parts = {
        (Relay, "_update_generator_ema"): "generator average",
        (Relay, "_take_generator_snapshot"): "generator snapshots",
        (Relay, "_select_generator_snapshot"): "generator snapshots",
        (RelayRun, "_privacy_audit"): "privacy audit",
        (FidelityRecorder, "record"): "replay fidelity",
    }
    for owner, attr in parts:
        monkeypatch.setattr(owner, attr, lambda *args: time.sleep(0.01))
    stand_ins = {key: getattr(*key) for key in parts}
    timers = profile_site.ExclusiveTimers()
    undo = profile_site.install(timers)
    try:
        for owner, attr in parts:
            getattr(owner, attr)(None)
        seconds = timers.reset()
    finally:
        profile_site.uninstall(undo)
    for name in set(parts.values()):
        assert seconds[name] >= 0.009 * list(parts.values()).count(name), name
    assert {key: getattr(*key) for key in parts} == stand_ins, "uninstall puts every method back"


def test_without_a_matrix_timing_the_smoke_budget_fallback_is_recorded(tmp_path):
    """gpu_check.sh sizes the smoke from the fastest fp32 relay_replay timing; when the matrix gave
    none it assumes 1000 ms per iteration, and now writes that into the results (and the summary)."""
    script = (BENCH / "gpu_check.sh").read_text()
    start = script.index("MS=$($PY - \"$RESULTS\" <<'EOF'\n") + len("MS=$($PY - \"$RESULTS\" <<'EOF'\n")
    snippet = script[start : script.index("\nEOF\n", start)]
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps({"name": "relay_replay", "precision": "fp32", "error": "timed out"}) + "\n")
    proc = subprocess.run([sys.executable, "-", str(results)], input=snippet, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and float(proc.stdout) == 1000.0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert rows[-1]["name"] == "replay_smoke_ms_fallback" and "1000 ms" in rows[-1]["note"]
    assert "assumed 1000 ms" in load_benchmark("gpu_summary").summarize(results.read_text().splitlines())
