"""benchmarks/speed.py: the --quick run gives one valid JSON record per measurement (timings are
not asserted), and --matrix toggles exactly one switch per variant."""

from __future__ import annotations

import json
import subprocess
import sys
from argparse import Namespace

import pytest

from tests.conftest import ROOT, TINY, load_benchmark, tiny_config

SPEED = ROOT / "benchmarks" / "speed.py"


@pytest.mark.slow
def test_quick_run_prints_one_record_per_measurement_with_the_switches_applied(tmp_path):
    config = tiny_config(tmp_path, tmp_path, strategy="relay", strategy_kwargs=TINY)  # data is random: nothing is read
    switches = ["--precision", "bf16", "--channels-last", "--fused-adam", "--replay-per-substep", "--aug-device", "same"]
    proc = subprocess.run(
        [sys.executable, str(SPEED), "--quick", "--config", str(config), "--batch", "2", "--threads", "1", *switches],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert [r["name"] for r in records] == ["relay_site1", "relay_replay", "sequential"]
    for r in records:
        assert "error" not in r, r["error"]
        assert r["device"] == "cpu" and r["batch"] == 2 and r["iters"] == 2 and r["flop_iters"] == 1
        assert (r["precision"], r["channels_last"], r["fused_adam"], r["replay_per_substep"], r["aug_device"], r["compile"]) == (
            "bf16",
            True,
            True,
            True,
            "same",
            False,
        )
        assert r["fused_effective"] is True  # the optimisers really use the fused kernel
        assert r["ms_per_iter"] > 0 and r["tflops"] > 0
        assert isinstance(r["peak_mem_bytes"], int) and r["peak_mem_bytes"] > 0 and r["peak_mem_kind"].startswith("process_")
    flops = {r["name"]: r["flops_per_iter"] for r in records}
    # the relay adds G and D steps to the solver step; replay adds generation and the teacher's forward pass
    assert flops["relay_replay"] > flops["relay_site1"] > flops["sequential"] > 0


def test_matrix_toggles_one_switch_at_a_time_against_the_baseline():
    speed = load_benchmark("speed")
    args = Namespace(
        precision="fp32",
        channels_last=False,
        compile=False,
        fused_adam=False,
        replay_per_substep=False,
        aug_device="none",
        cudnn_benchmark=False,
        matrix=True,
        only="relay_site1,relay_replay,sequential",
    )
    runs = list(speed.plan(args))
    baseline = speed.Switches()
    assert runs[:3] == [(name, baseline) for name in speed.MEASUREMENTS]
    variants = {s for _, s in runs[3:]}
    assert len(variants) == 8  # bf16, channels_last, compile, fused_adam, replay_per_substep, aug cpu, aug same, cudnn_benchmark
    for s in variants:
        changed = [k for k, v in vars(s).items() if v != getattr(baseline, k)]
        assert len(changed) == 1
    assert [name for name, s in runs if s.replay_per_substep] == ["relay_replay"]  # only the replay measurement replays


def test_iterations_are_split_by_the_lazy_regularisers_they_ran():
    speed = load_benchmark("speed")

    class Options:
        g_reg_interval, d_reg_interval, pl_weight, r1_gamma = 4, 8, 2.0, 0.1

    class Relay:
        options, gan_step = Options(), 0

    relay = Relay()

    def step(i):  # one GAN step per iteration, as the paper preset
        relay.gan_step += 1

    times = speed.iteration_times(step, 0, 8, speed.torch.device("cpu"), speed.regularisation_label(relay))
    assert [lab for _, lab in times] == ["plain", "plain", "plain", "pl", "plain", "plain", "plain", "pl+r1"]
    split = speed.split_by_label(times)
    assert {k: v["n"] for k, v in split.items()} == {"plain": 6, "pl": 1, "pl+r1": 1}
    Options.pl_weight = 0.0  # a regulariser with zero weight does not run, so it is not a label
    relay.gan_step = 0
    times = speed.iteration_times(step, 0, 4, speed.torch.device("cpu"), speed.regularisation_label(relay))
    assert [lab for _, lab in times] == ["plain"] * 4


def test_timing_windows_hold_whole_refills_of_the_replay_stock(tmp_path):
    """With a replay stock of 12 pairs and 2 replayed pairs per iteration (batch 4), the stock
    refills every 6 iterations: a timing window is a multiple of lcm(regularisation cycle, 6)."""
    import math

    speed = load_benchmark("speed")
    cycles = {}
    for stock in (12, 0):
        config = tiny_config(tmp_path / str(stock), tmp_path, strategy="relay", strategy_kwargs={**TINY, "replay_stock": stock})
        task = speed.task_for(speed.load_config(str(config)).tasks[0], "relay_replay", speed.Switches(), 4)
        prepared = speed.prepare("relay_replay", task, speed.Switches(), speed.torch.device("cpu"))
        for i in range(3):
            prepared.step(i)
        cycles[stock] = (speed.timing_cycle(prepared, 3), prepared.flop_cycle)
    assert cycles[12][0] == math.lcm(cycles[12][1], 6) > cycles[12][1]
    assert cycles[0][0] == cycles[0][1]  # no stock: the regularisation cycle
    assert [speed.whole_cycles(n, 24) for n in (1, 24, 25)] == [24, 24, 48]


def test_a_relay_iteration_is_one_gan_step_and_one_solver_step_whatever_the_gan_budget(tmp_path):
    """Checkouts with and without a GAN budget of their own measure the same work per iteration."""
    speed = load_benchmark("speed")
    config = tiny_config(tmp_path, tmp_path, strategy="relay", strategy_kwargs={**TINY, "gan_steps_per_solver_step": 8, "gan_warmup_steps": 5})
    base = speed.load_config(str(config)).tasks[0]
    for trained in (False, True):
        task = speed.task_for(base, "relay_replay", speed.Switches(), 4, trained=trained)
        assert task.strategy.kwargs["gan_steps_per_solver_step"] == 1
        assert task.strategy.kwargs["gan_warmup_steps"] == 0
    assert speed.task_for(base, "sequential", speed.Switches(), 4).strategy.name == "sequential"
    # --gan-budget config: one batch of training, as the config budgets it
    kwargs = speed.task_for(base, "relay_replay", speed.Switches(), 4, trained=True, gan_budget="config").strategy.kwargs
    assert kwargs["gan_steps_per_solver_step"] == 8 and kwargs["gan_warmup_steps"] == 5


def test_the_sequential_baseline_is_fused_only_when_the_switch_says_so(tmp_path):
    """A config with ``optimizer.fused: true`` (the demo's) no longer makes the sequential baseline
    fused when ``--fused-adam`` is off; the trained preset keeps the config's flag."""
    speed = load_benchmark("speed")
    config = tiny_config(tmp_path, tmp_path, strategy="relay", strategy_kwargs=TINY)
    data = speed.load_config(str(config)).tasks[0].model_dump(mode="python")
    data["train"]["optimizer"]["fused"] = True
    base = speed.TaskConfig.model_validate(data)
    assert speed.task_for(base, "sequential", speed.Switches(), 4).train.optimizer.fused is False
    assert speed.task_for(base, "sequential", speed.Switches(fused_adam=True), 4).train.optimizer.fused is True
    assert speed.task_for(base, "sequential", speed.Switches(), 4, trained=True).train.optimizer.fused is True


def test_variants_that_reuse_the_flop_count_find_the_same_timing_cycle(tmp_path, capsys):
    """The second variant reuses the first one's FLOP count and runs no FLOP iterations; its refill
    period was found as if it had (16 / (2 pairs over 2 iterations) = 16 against 8)."""
    speed = load_benchmark("speed")
    config = tiny_config(tmp_path, tmp_path, strategy="relay", strategy_kwargs={**TINY, "replay_stock": 16})
    args = ["--device", "cpu", "--config", str(config), "--threads", "1", "--batch", "2", "--warmup", "1", "--iters", "1", "--flop-iters", "1"]
    before = speed.torch.get_num_threads()
    try:
        speed.main([*args, "--only", "relay_replay", "--variants", "fp32;channels_last"])
    finally:
        speed.torch.set_num_threads(before)
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(records) == 2 and all("error" not in r for r in records), records
    assert records[0]["cycle"] == records[1]["cycle"]


def test_a_compared_checkout_comes_first_on_the_path_and_installed_packages_stay():
    speed = load_benchmark("speed")
    env = speed.worker_environment(ROOT / "ref", {"PYTHONPATH": "/tmp/site", "HOME": "/h"})
    assert env["PYTHONPATH"].split(":") == [str(ROOT / "ref"), "/tmp/site"]
    assert env["HOME"] == "/h"
    assert speed.worker_environment(ROOT, {})["PYTHONPATH"] == str(ROOT)


@pytest.mark.parametrize("native", [True, False])
def test_as_trained_resolves_auto_precision_as_training_does(tmp_path, monkeypatch, native):
    from relaylearn import devices

    speed = load_benchmark("speed")
    monkeypatch.setattr(devices, "native_bf16", lambda accelerator: native)
    config = tiny_config(tmp_path, tmp_path, strategy="relay", strategy_kwargs=TINY)
    base = speed.load_config(str(config), ["train.precision=auto", "train.channels_last=true"]).tasks[0]
    switches = speed.as_trained(speed.task_for(base, "relay_site1", speed.Switches(), 4, trained=True), speed.torch.device("cpu"))
    assert switches.precision == ("bf16" if native else "fp32") and switches.channels_last


def test_a_bf16_step_runs_under_autocast_as_lightning_runs_it(tmp_path, monkeypatch):
    """bf16 autocast without its cast cache, as Lightning's bf16-mixed; and the CPU allocator set
    up as CPU training sets it (prepared as trained)."""
    from relaylearn import devices

    speed = load_benchmark("speed")
    allocator = []
    monkeypatch.setattr(devices, "keep_freed_host_memory", lambda: allocator.append(1) or True)
    config = tiny_config(tmp_path, tmp_path, strategy="sequential")
    base = speed.load_config(str(config), ["train.precision=bf16-mixed"]).tasks[0]
    switches = speed.Switches(precision="bf16")
    task = speed.task_for(base, "sequential", switches, 4, trained=True)
    prepared = speed.prepare("sequential", task, switches, speed.torch.device("cpu"), trained=True)
    seen = []
    step = prepared.strategy.training_step
    monkeypatch.setattr(
        prepared.strategy,
        "training_step",
        lambda *a: seen.append((speed.torch.is_autocast_enabled("cpu"), speed.torch.is_autocast_cache_enabled())) or step(*a),
    )
    prepared.step(0)
    assert seen == [(True, False)]
    assert allocator == [1]
