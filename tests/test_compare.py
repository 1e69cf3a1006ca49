"""``relaylearn compare``: orders, statistics, and a tiny 2 strategies × 2 orders × 1 seed run
through the command line, including the resume after an interruption."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from relaylearn.cli import main
from relaylearn.compare import markdown_table, mean_std, site_orders, summarise
from relaylearn.config import load_config
from relaylearn.errors import UserError
from relaylearn.results import external_dice
from tests.conftest import stopped_training, tiny_config


def test_site_orders_are_given_reversed_then_distinct_seeded_permutations():
    orders = site_orders([1, 2, 3, 4], 5)
    assert orders[:2] == [[1, 2, 3, 4], [4, 3, 2, 1]]
    assert len({tuple(o) for o in orders}) == 5 and all(sorted(o) == [1, 2, 3, 4] for o in orders)
    assert site_orders([1, 2, 3, 4], 5) == orders, "deterministic"
    assert site_orders([3, 1], 1) == [[3, 1]]
    with pytest.raises(UserError, match="only 2 distinct"):
        site_orders([1, 2], 3)
    with pytest.raises(UserError, match="at least 1"):
        site_orders([1, 2], 0)


def test_statistics_and_external_sites():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))
    assert mean_std([0.5]) == (0.5, None)
    assert mean_std([]) == (None, None)
    matrix = {"sites": ["A", "B", "C", "D"], "trained": ["B", "A"], "R": [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.9]], "acc": 0.55}
    assert external_dice(matrix) == pytest.approx(0.8)
    assert external_dice({**matrix, "trained": ["A+B+C+D"]}) is None
    runs = {
        "order0_seed0": {"matrix": {**matrix, "bwt": -0.1, "forgetting": 0.2}, "wall_seconds": 10.0},
        "order1_seed0": {"matrix": {**matrix, "acc": 0.65, "bwt": 0.1, "forgetting": 0.0}, "wall_seconds": 20.0},
    }
    (row,) = summarise({"ewc": runs}, {"ewc": "others/ewc"})
    assert row["acc_mean"] == pytest.approx(0.6) and row["acc_std"] == pytest.approx(0.1 / 2**0.5)
    assert row["bwt_mean"] == pytest.approx(0.0) and row["wall_s_total"] == 30.0
    table = markdown_table([row])
    assert "| ewc | 2 | 0.600 ± 0.071 | +0.000 ± 0.141 | 0.100 ± 0.141 | 0.800 ± 0.000 | n/a | n/a | 15 ± 7 |" in table
    runs["order0_seed0"]["mia_auc"], runs["order1_seed0"]["mia_auc"] = 0.5, 0.7  # a strategy whose bundles carry generators
    runs["order0_seed0"]["replay_fidelity"], runs["order1_seed0"]["replay_fidelity"] = 0.4, 0.8
    (row,) = summarise({"relay": runs}, {"relay": "demo/relay"})
    assert row["mia_auc_mean"] == pytest.approx(0.6) and row["fidelity_mean"] == pytest.approx(0.6)
    assert "| 0.800 ± 0.000 | 0.600 ± 0.283 | 0.600 ± 0.141 | 15 ± 7 |" in markdown_table([row])


@pytest.mark.slow
def test_compare_two_strategies_two_orders(tmp_path, tiny_fundus, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    configs = [
        str(tiny_config(tmp_path, tiny_fundus, strategy=s, steps=1, strategy_kwargs=kw)) for s, kw in (("sequential", {}), ("ewc", {"fisher_samples": 2}))
    ]
    assert main(["compare", "-c", *configs, "-n", "tiny", "--orders", "2", "--seeds", "1", "-q"]) == 0
    printed = capsys.readouterr().out
    root = tmp_path / "exps" / "compare" / "tiny"
    matrices = json.loads((root / "matrices.json").read_text())
    assert set(matrices) == {"sequential", "ewc"}
    for label, runs in matrices.items():
        assert set(runs) == {"order0_seed0", "order1_seed0"}
        assert runs["order0_seed0"]["order"] == [1, 2] and runs["order1_seed0"]["order"] == [2, 1]
        assert runs["order1_seed0"]["matrix"]["trained"] == ["Domain2", "Domain1"]
        assert runs["order0_seed0"]["seed"] == 7 and runs["order0_seed0"]["wall_seconds"] > 0
        run_dir = root / label / "order1_seed0" / label / "tiny-o1-s0"
        assert json.loads((run_dir / "metrics" / "matrix.json").read_text()) == runs["order1_seed0"]["matrix"]
    csv_lines = (root / "table.csv").read_text().splitlines()
    assert csv_lines[0].startswith("strategy,config,runs,acc_mean,acc_std") and len(csv_lines) == 3
    table = (root / "table.md").read_text()
    assert "| sequential | 2 |" in table and "| ewc | 2 |" in table and table.split("\n\n")[1] in printed
    ewc_row = next(line for line in table.splitlines() if line.startswith("| ewc | 2 |"))
    assert ewc_row.split("|")[6].strip() != "n/a", "Domain3 is an external site with a Dice"
    assert "No paired test" in table, "no relay config here"
    assert json.loads((root / "paired_test.json").read_text()) is None
    assert (root / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (root / "report.html").read_text()  # the comparison's own report: table, paired test, plot
    assert "comparison tiny" in page and "<td>ewc</td>" in page and "<td>sequential</td>" in page
    assert "No paired test" in page and "data:image/png;base64," in page and "report: exps/compare/tiny/report.html" in printed

    # simulate an interruption after site 1 of one run: only that site is trained again
    run_dir = root / "ewc" / "order0_seed0" / "ewc" / "tiny-o0-s0"
    matrix_path = run_dir / "metrics" / "matrix.json"
    full = json.loads(matrix_path.read_text())
    matrix_path.write_text(json.dumps({**full, "R": full["R"][:1], "trained": full["trained"][:1]}))
    (run_dir / "bundles" / "task_2.relay").unlink()
    untouched = (root / "sequential" / "order0_seed0" / "sequential" / "tiny-o0-s0" / "metrics" / "matrix.json").stat().st_mtime_ns
    assert main(["compare", "-c", *configs, "-n", "tiny", "--orders", "2", "-q"]) == 0
    resumed = json.loads(matrix_path.read_text())
    assert len(resumed["R"]) == 2 and resumed["R"][0] == full["R"][0]
    assert (run_dir / "bundles" / "task_2.relay").is_file()
    assert (root / "sequential" / "order0_seed0" / "sequential" / "tiny-o0-s0" / "metrics" / "matrix.json").stat().st_mtime_ns == untouched


def test_bad_arguments_are_one_line_errors(tmp_path, tiny_fundus, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(tiny_config(tmp_path, tiny_fundus))
    assert main(["compare", "-c", config, config, "-n", "x"]) == 2
    assert "listed twice" in capsys.readouterr().err
    assert main(["compare", "-c", config, "-n", "x", "--orders", "3"]) == 2
    assert "only 2 distinct order(s)" in capsys.readouterr().err
    assert main(["compare", "-c", config, "-n", "x", "-g", "banana"]) == 2  # before the first run, not inside it
    assert capsys.readouterr().err == "relaylearn: error: -g 'banana': expected GPU ids such as 0 or 0,1, or 'cpu'\n"
    assert main(["compare", "-c", config, "-n", "x", "--data-root", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err == f"relaylearn: error: {tmp_path / 'none'}: data root not found\n"
    assert not (tmp_path / "exps").exists()


def test_paired_test_on_hand_made_numbers():
    from relaylearn.compare import paired_test

    # differences 0.3, -0.1, 0.2, 0.4, 0.5: signed ranks +3 −1 +2 +4 +5, W− = 1; exact two-sided
    # p = 2·P(W ≤ 1) = 2·2/2⁵ = 0.125
    relay, other = [0.8, 0.5, 0.7, 0.9, 1.0], [0.5, 0.6, 0.5, 0.5, 0.5]
    test = paired_test(relay, other)
    assert test["n"] == 5 and test["mean_difference"] == pytest.approx(0.26)
    assert test["wilcoxon_p"] == pytest.approx(0.125)
    # differences 0.1, 0.2, 0.3: t = 0.2 / (0.1/√3) = √12; with 2 degrees of freedom the two-sided
    # p is 1 − |t|/√(t² + 2) = 1 − √12/√14
    assert paired_test([1.1, 1.2, 1.3], [1.0, 1.0, 1.0])["t_test_p"] == pytest.approx(1 - (12 / 14) ** 0.5)
    assert paired_test([0.5, 0.5], [0.5, 0.5])["wilcoxon_p"] is None, "no differences: no test"
    assert paired_test([0.5], [0.4])["t_test_p"] is None
    a = [0.8, 0.7, 0.6, 0.5, 0.9]  # the same difference on every run, up to float rounding: t is undefined, not p ≈ 0
    assert paired_test(a, [x - 0.1 for x in a])["t_test_p"] is None


def test_relay_is_tested_against_the_best_non_pooled_method():
    from relaylearn.compare import paired_markdown, relay_vs_best_other

    def runs(accs, forgetting=0.1):
        return {f"order{k}_seed0": {"matrix": {"acc": a, "forgetting": forgetting}} for k, a in enumerate(accs)}

    results = {"relay": runs([0.7, 0.8, 0.75]), "joint": runs([0.95, 0.9, 0.92]), "ewc": runs([0.5, 0.55, 0.6]), "lwf": runs([0.6, 0.65, 0.62], 0.3)}
    paired = relay_vs_best_other(results, {"relay": "relay", "joint": "joint", "ewc": "ewc", "lwf": "lwf"})
    assert paired["other"] == "lwf", "joint pools the data: not a candidate"
    assert paired["acc"]["mean_difference"] == pytest.approx((0.1 + 0.15 + 0.13) / 3)
    assert paired["forgetting"]["mean_difference"] == pytest.approx(-0.2)
    assert "| acc | +0.127 ± 0.025 | 0.25 |" in paired_markdown(paired)
    assert "With 3 pairs the smallest possible Wilcoxon p is 0.25 (more orders or seeds are needed to reach 0.05)." in paired_markdown(paired)
    assert relay_vs_best_other({"ewc": results["ewc"]}, {"ewc": "ewc"}) is None


def test_runs_are_paired_by_their_order_and_seed_not_their_position():
    from relaylearn.compare import paired_markdown, relay_vs_best_other

    def runs(seed, accs):
        return {f"order{k}_seed0": {"order": [1, 2, 3], "seed": seed + k % 2, "matrix": {"acc": a, "forgetting": 0.1}} for k, a in enumerate(accs)}

    results = {
        "relay": runs(1314, [0.7, 0.8, 0.75]),
        "lwf": {**runs(1314, [0.6, 0.65, 0.62]), "order1_seed0": {"order": [1, 2, 3], "seed": 7, "matrix": {"acc": 0.6}}},
    }
    paired = relay_vs_best_other(results, {"relay": "relay", "lwf": "lwf"})
    assert paired["runs"] == ["order0_seed0", "order2_seed0"] and paired["unpaired"] == ["order1_seed0"]
    assert paired["acc"]["n"] == 2
    assert "Left out (the two configs' site orders or seeds differ there): order1_seed0." in paired_markdown(paired)


def test_seeds_are_consecutive_from_the_configs_seed(tmp_path, tiny_fundus):
    from relaylearn.compare import plan_runs

    cfg = load_config(str(tiny_config(tmp_path, tiny_fundus)))  # random_seed 7
    runs = plan_runs([cfg], 1, 3)
    assert [r.seed_index for r in runs] == [0, 1, 2]
    assert [r.key for r in runs] == ["order0_seed0", "order0_seed1", "order0_seed2"]
    for run, seed in zip(runs, (7, 8, 9)):
        assert [t.random_seed for t in run.config.tasks] == [seed, seed]
        assert run.config.raw["common"]["random_seed"] == seed


def _training_that_writes(matrix):
    """A stand-in for ``run_training`` that only writes ``matrix`` as the run's matrix.json."""

    class Result:
        def __init__(self):
            self.matrix = matrix

    def fake_training(config, run_name, options):
        folder = options.exps_root / config.name / run_name / "metrics"
        folder.mkdir(parents=True)
        (folder / "matrix.json").write_text(json.dumps(matrix))
        return Result()

    return fake_training


def test_memory_is_released_after_each_trained_run_not_after_a_skipped_one(tmp_path, tiny_fundus, monkeypatch):
    import relaylearn.compare as compare

    cfg = load_config(str(tiny_config(tmp_path, tiny_fundus)))
    run = compare.plan_runs([cfg], 1, 1)[0]
    matrix = {"R": [[0.5, 0.1], [0.4, 0.6]], "acc": 0.5}
    released = []

    monkeypatch.setattr(compare, "run_training", _training_that_writes(matrix))
    monkeypatch.setattr(compare, "release_memory", lambda: released.append(True))
    assert compare.train_or_resume(run, tmp_path / "r", "n")["matrix"] == matrix
    assert released == [True]
    compare.train_or_resume(run, tmp_path / "r", "n")  # complete: skipped, nothing to release
    assert released == [True]


def test_the_wall_time_of_a_run_counts_the_time_before_it_was_stopped(tmp_path, tiny_fundus, monkeypatch):
    """Ctrl-C after 0.3 s of training, then a re-run that trains 0.2 s more: 0.5 s or more are stored."""
    import time

    import relaylearn.compare as compare

    cfg = load_config(str(tiny_config(tmp_path, tiny_fundus)))
    run = compare.plan_runs([cfg], 1, 1)[0]
    finish = _training_that_writes({"R": [[0.5, 0.1], [0.4, 0.6]], "acc": 0.5})

    def stopped_training(*args):
        time.sleep(0.3)
        raise KeyboardInterrupt

    def finished_training(*args):
        time.sleep(0.2)
        return finish(*args)

    monkeypatch.setattr(compare, "release_memory", lambda: None)
    monkeypatch.setattr(compare, "run_training", stopped_training)
    with pytest.raises(KeyboardInterrupt):
        compare.train_or_resume(run, tmp_path / "r", "n")
    assert json.loads((tmp_path / "r" / "wall_seconds.json").read_text())["wall_seconds"] >= 0.3
    monkeypatch.setattr(compare, "run_training", finished_training)
    assert compare.train_or_resume(run, tmp_path / "r", "n")["wall_seconds"] >= 0.5
    assert json.loads((tmp_path / "r" / "wall_seconds.json").read_text())["wall_seconds"] >= 0.5


def test_workers_share_the_runs_and_give_the_same_table(tmp_path, tiny_fundus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(tiny_config(tmp_path, tiny_fundus, strategy="sequential", steps=1))
    common = ["compare", "-c", config, "--orders", "2", "--seeds", "1", "-q"]
    import torch

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    threads = torch.get_num_threads()
    assert main([*common, "-n", "two", "--workers", "2"]) == 0  # one thread per worker
    assert torch.get_num_threads() == threads, "the caller gets its threads back"
    torch.set_num_threads(1)
    try:
        assert main([*common, "-n", "one"]) == 0  # one worker at the same thread count
    finally:
        torch.set_num_threads(threads)
    root = tmp_path / "exps" / "compare"
    claims = sorted(p.name for p in (root / "two" / ".claims").iterdir() if p.is_dir())
    assert claims == ["sequential__order0_seed0", "sequential__order1_seed0"]  # each run claimed once
    assert (root / "two" / ".claims" / "helper1.log").is_file()
    two, one = (json.loads((root / n / "matrices.json").read_text()) for n in ("two", "one"))
    for key in ("order0_seed0", "order1_seed0"):
        assert two["sequential"][key]["matrix"]["R"] == one["sequential"][key]["matrix"]["R"], "seeded: where a run trains does not matter"
        assert json.loads((root / "two" / "sequential" / key / "sequential" / f"two-o{key[5]}-s0" / "run.json").read_text())["threads"] == 1
    assert (root / "two" / "report.html").is_file()
    assert main([*common, "-n", "bad", "--workers", "0"]) == 2


def test_a_helper_trains_what_it_claims_and_writes_no_table(tmp_path, tiny_fundus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(tiny_config(tmp_path, tiny_fundus, strategy="sequential", steps=1))
    root = tmp_path / "exps" / "compare" / "h"
    (root / ".claims" / "sequential__order1_seed0").mkdir(parents=True)  # another process has this run
    assert main(["compare", "-c", config, "-n", "h", "--orders", "2", "--claim-only", "-q"]) == 0
    assert (root / "sequential" / "order0_seed0" / "wall_seconds.json").is_file()
    assert not (root / "sequential" / "order1_seed0").exists() and not (root / "table.md").exists()


def test_comparison_plot_shows_negative_forgetting(tmp_path, monkeypatch):
    from relaylearn.compare import plot_comparison
    from relaylearn.report import plots

    figures, new_figure = [], plots.new_figure
    monkeypatch.setattr(plots, "new_figure", lambda *size: figures.append(new_figure(*size)) or figures[-1])
    row = {
        "strategy": "sequential",
        "acc_mean": 0.5,
        "acc_std": 0.1,
        "forgetting_mean": -0.3,
        "forgetting_std": 0.05,
        "external_dice_mean": None,
        "external_dice_std": None,
    }
    plot_comparison([row], tmp_path / "comparison.png")
    acc, forgetting, external = figures[0].axes
    assert forgetting.get_xlim()[0] <= -0.35 < 0 < 1 <= forgetting.get_xlim()[1], "the bar and its whisker are inside the axis"
    assert acc.get_xlim() == external.get_xlim() == (0.0, 1.0)
    assert any(tuple(line.get_xdata()) == (0.0, 0.0) for line in forgetting.lines), "a line at zero"


def test_the_docs_name_every_table_column_and_matrices_entry(tmp_path, tiny_fundus, monkeypatch):
    import relaylearn.compare as compare

    run = compare.plan_runs([load_config(str(tiny_config(tmp_path, tiny_fundus)))], 1, 1)[0]
    folder = tmp_path / "r" / run.config.name / "n-o0-s0" / "metrics"
    folder.mkdir(parents=True)
    sites = [d.site for d in run.config.test_datasets]
    matrix = {"sites": sites, "trained": sites[:1] * len(run.order), "R": [[0.5] * len(sites)] * len(run.order), "acc": 0.5}
    (folder / "matrix.json").write_text(json.dumps(matrix))
    entry = compare.train_or_resume(run, tmp_path / "r", "n")  # complete: read, not trained
    assert all(f'"{key}"' in compare.__doc__ for key in entry), "matrices.json entries"
    (row,) = summarise({"relay": {run.key: entry}}, {"relay": "demo/relay"})
    for column in row:
        metric = column.removesuffix("_mean").removesuffix("_std")
        assert f"``{column}``" in compare.__doc__ or (metric != column and f"``{metric}``" in compare.__doc__), column
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text().split("## Comparing strategies")[1].split("\n\n|")[0]
    assert all(name in readme for name in ("`config`", "`wall_s_total`", "replay fidelity", "MIA AUC", "`matrices.json`"))


def test_a_finished_comparison_re_run_with_another_budget_is_refused(tmp_path, tiny_fundus, monkeypatch, capsys):
    """The old runs are not relabelled with the new seed or budget."""
    monkeypatch.chdir(tmp_path)
    config = str(tiny_config(tmp_path, tiny_fundus, strategy="sequential", steps=1, task_ids=(1,)))
    common = ["compare", "-c", config, "-n", "c", "--orders", "1", "--seeds", "1", "-q", "-g", "cpu"]
    assert main(common) == 0
    assert main(common) == 0, "the same command: finished runs are skipped"
    capsys.readouterr()
    assert main([*common, "--set", "random_seed=99"]) == 2
    assert "random_seed: 99 now, 7 before" in capsys.readouterr().err


def test_an_interrupted_run_says_how_its_command_continues(tmp_path, tiny_fundus, monkeypatch, capsys):
    """train takes --resume; compare and tune resume by running the same command again (they
    have no --resume), so their line must not send the user to it."""
    import relaylearn.runner as runner

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runner, "run_training", stopped_training)
    monkeypatch.setattr("relaylearn.compare.run_training", stopped_training)
    lwf = str(tiny_config(tmp_path, tiny_fundus, strategy="lwf"))
    (tmp_path / "grid.yaml").write_text("lwf: {alpha: [0.5]}\n")
    for argv, resume in [
        (["train", "-c", lwf, "-n", "t", "-q"], True),
        (["compare", "-c", lwf, "-n", "c", "-q"], False),
        (["tune", "-c", lwf, "-n", "u", "--grid", "grid.yaml", "-q"], False),
    ]:
        assert main(argv) == 143, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "terminated (SIGTERM) while site Domain1 trained" in err[0], err
        assert ("--resume" in err[0]) == resume and "run the same command again" in err[0], err
