"""``relaylearn tune``: grids, the pick by validation ACC, outputs, resume, ``compare --tuned`` and
bad input (exit 2)."""

from __future__ import annotations

import json

import pytest

from relaylearn.cli import main
from relaylearn.compare import with_strategy_kwargs
from relaylearn.config import load_config
from relaylearn.errors import ConfigError
from relaylearn.tune import GRIDS, apply_picks, grid_points, load_grids, pick_best, point_folder, run_scores
from tests.conftest import tiny_config


def test_grid_points_cover_the_product_and_skip_unknown_keys(tmp_path, tiny_fundus):
    cfg = load_config(str(tiny_config(tmp_path, tiny_fundus, strategy="si")))
    points, skipped = grid_points(cfg, {"c": [0.5, 5.0], "xi": [1e-3, 1e-1, 1.0], "no_such_option": [1]})
    assert skipped == ["no_such_option"] and len(points) == 6
    assert {(p["c"], p["xi"]) for p in points} == {(c, x) for c in (0.5, 5.0) for x in (1e-3, 1e-1, 1.0)}
    assert point_folder({"c": 0.5, "xi": 0.001}) == "c=0.5_xi=0.001"
    assert set(GRIDS) >= {"ewc", "si", "lwf", "owm", "relay"}


def test_grid_values_the_option_reads_as_one_value_are_refused(tmp_path, tiny_fundus):
    """YAML loads 1e4 as the text "1e4" and 10000.0 as a number: the option reads both as 10000.0."""
    cfg = load_config(str(tiny_config(tmp_path, tiny_fundus, strategy="ewc")))
    (tmp_path / "grid.yaml").write_text("ewc: {lambda_: [1e4, 10000.0]}\n")
    grid = load_grids(str(tmp_path / "grid.yaml"))["ewc"]
    with pytest.raises(ConfigError, match=r"ewc.lambda_: the value 10000.0 is listed twice"):
        grid_points(cfg, grid, tmp_path / "grid.yaml")
    assert len(grid_points(cfg, {"lambda_": ["1e4", 1e5]})[0]) == 2  # different values stay


def test_pick_best_is_the_highest_mean_score_first_on_ties():
    points = [{"score_mean": 0.4}, {"score_mean": 0.6}, {"score_mean": None}, {"score_mean": 0.6}]
    assert pick_best(points) == 1
    assert pick_best([{"score_mean": None}]) is None


def test_run_scores_select_on_test_scores_the_test_matrix_and_val_the_validation_parts():
    run = {
        "matrix": {"acc": 0.7, "forgetting": 0.1, "bwt": -0.1, "validation": {"acc": 0.5, "forgetting": 0.2, "bwt": -0.2}},
        "wall_seconds": 3.0,
    }
    on_test = run_scores(run, "test")
    assert (on_test["score"], on_test["forgetting"], on_test["bwt"]) == (0.7, 0.1, -0.1)
    on_val = run_scores(run, "val")
    assert (on_val["score"], on_val["forgetting"], on_val["bwt"]) == (0.5, 0.2, -0.2)
    assert on_test["test_acc"] == on_val["test_acc"] == 0.7 and on_val["wall_seconds"] == 3.0
    assert run_scores({"matrix": {"acc": 0.7}, "wall_seconds": 1.0}, "val")["score"] is None, "no validation parts: no score"


def test_strategy_values_replace_aliases(tmp_path, tiny_fundus):
    cfg = load_config(str(tiny_config(tmp_path, tiny_fundus, strategy="ewc", strategy_kwargs={"lambda": 5.0, "fisher_samples": 2})))
    tuned = with_strategy_kwargs(cfg, {"lambda_": 100.0})
    assert all(t.strategy.kwargs == {"lambda_": 100.0, "fisher_samples": 2} for t in tuned.tasks)
    assert tuned.raw["common"]["strategy"]["kwargs"] == {"lambda_": 100.0, "fisher_samples": 2}
    assert cfg.tasks[0].strategy.kwargs == {"lambda": 5.0, "fisher_samples": 2}, "the original is unchanged"


def test_apply_picks_by_config_then_by_strategy(tmp_path, tiny_fundus):
    ewc = load_config(str(tiny_config(tmp_path / "a", tiny_fundus, strategy="ewc")))
    lwf = load_config(str(tiny_config(tmp_path / "b", tiny_fundus, strategy="lwf")))
    seq = load_config(str(tiny_config(tmp_path / "c", tiny_fundus, strategy="sequential")))
    summary = {
        "strategies": {
            "ewc": {"config": ewc.name, "strategy": "ewc", "complete": True, "pick": {"lambda_": 1e4}},
            "lwf": {"config": "demo/lwf", "strategy": "lwf", "complete": True, "pick": {"alpha": 2.0, "tau": 1.0}},
        }
    }
    (tmp_path / "tune.json").write_text(json.dumps(summary))
    (tuned_ewc, tuned_lwf, same_seq), note = apply_picks([ewc, lwf, seq], tmp_path)
    assert tuned_ewc.tasks[0].strategy.kwargs["lambda_"] == 1e4
    assert tuned_lwf.tasks[1].strategy.kwargs == {"alpha": 2.0, "tau": 1.0}
    assert same_seq is seq and "alpha=2.0, tau=1.0 (tuned on demo/lwf, selection split not recorded)" in note


def test_tuned_values_say_their_selection_split_and_a_tuning_at_another_budget_is_warned_of(tmp_path, tiny_fundus, capsys):
    ewc = load_config(str(tiny_config(tmp_path, tiny_fundus, strategy="ewc")))
    pick = {"config": "demo/ewc", "strategy": "ewc", "complete": True, "pick": {"lambda_": 1e3}}
    for select_on, words in [("test", "selected on the TEST split: optimistic"), ("val", "selected on the validation parts")]:
        summary = {"select_on": select_on, "overrides": ["train.num_steps=999"], "strategies": {"ewc": pick}}
        (tmp_path / "tune.json").write_text(json.dumps(summary))
        _, note = apply_picks([ewc], tmp_path, ["train.num_steps=2"])
        assert f"lambda_=1000.0 (tuned on demo/ewc, {words})" in note
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("WARNING: --tuned:"), err
        assert "--set train.num_steps=999" in err[0] and "--set train.num_steps=2" in err[0]
    apply_picks([ewc], tmp_path, ["train.num_steps=999"])  # the tuning's own budget: nothing to warn of
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_tune_picks_by_validation_acc_writes_outputs_and_resumes(tmp_path, tiny_fundus, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = str(tiny_config(tmp_path, tiny_fundus, strategy="lwf", steps=2))
    (tmp_path / "grid.yaml").write_text("lwf: {alpha: [0.0, 4.0]}\n")
    args = ["tune", "-c", config, "-n", "t", "--grid", "grid.yaml", "-q"]
    assert main(args) == 0
    root = tmp_path / "exps" / "tune" / "t"
    summary = json.loads((root / "tune.json").read_text())
    entry = summary["strategies"]["lwf"]
    assert entry["grid"] == {"alpha": [0.0, 4.0]} and entry["complete"] and summary["select_on"] == "val"
    scores = []
    for point in entry["points"]:  # the score is the validation ACC read back from each run's matrix
        matrix_path = root / "lwf" / point["folder"] / "order0_seed0" / "lwf" / "t-o0-s0" / "metrics" / "matrix.json"
        matrix = json.loads(matrix_path.read_text())
        assert matrix["validation"]["sites"] == ["Domain1", "Domain2"] and len(matrix["validation"]["R"]) == 2
        assert point["score_mean"] == pytest.approx(matrix["validation"]["acc"])
        assert point["test_acc_mean"] == pytest.approx(matrix["acc"])
        scores.append(matrix["validation"]["acc"])
    assert scores[0] != scores[1], "the two strengths train different models"
    best = max(range(2), key=lambda i: (scores[i], -i))
    assert entry["pick_index"] == best and entry["pick"] == {"alpha": [0.0, 4.0][best]}
    assert "**pick**" in (root / "tune.md").read_text() and "| alpha=4.0" in capsys.readouterr().out

    # resume: finished runs are skipped; a missing one is trained again
    kept = root / "lwf" / entry["points"][best]["folder"] / "order0_seed0" / "lwf" / "t-o0-s0" / "metrics" / "matrix.json"
    stamp = kept.stat().st_mtime_ns
    other = root / "lwf" / entry["points"][1 - best]["folder"]
    (other / "order0_seed0" / "lwf" / "t-o0-s0" / "metrics" / "matrix.json").unlink()
    for bundle in (other / "order0_seed0" / "lwf" / "t-o0-s0" / "bundles").iterdir():
        bundle.unlink()
    assert main(args) == 0
    assert kept.stat().st_mtime_ns == stamp
    again = json.loads((root / "tune.json").read_text())["strategies"]["lwf"]
    assert [p["score_mean"] for p in again["points"]] == pytest.approx(scores), "seeded: the rerun gives the same score"

    # compare --tuned trains at the pick
    assert main(["compare", "-c", config, "-n", "c", "--orders", "1", "--tuned", str(root), "-q"]) == 0
    table = (tmp_path / "exps" / "compare" / "c" / "table.md").read_text()
    assert f"alpha={[0.0, 4.0][best]}" in table
    run_config = tmp_path / "exps" / "compare" / "c" / "lwf" / "order0_seed0" / "lwf" / "c-o0-s0" / "resolved_config.yaml"
    assert f"alpha: {[0.0, 4.0][best]}" in run_config.read_text()


def test_bad_input_exits_2(tmp_path, tiny_fundus, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lwf = str(tiny_config(tmp_path / "l", tiny_fundus, strategy="lwf"))
    cases = [
        (["tune", "-c", lwf, "-n", "a/b"], "without spaces or slashes"),
        (["tune", "-c", lwf, "-n", "x", "--select-on", "train"], "invalid choice"),
        (["tune", "-c", lwf, "-n", "x", "--set", "dataset.kwargs.val_fraction=0"], "no validation part"),
        (["tune", "-c", lwf, "-n", "x", "--grid", str(tmp_path / "missing.yaml")], "cannot read YAML"),
        (["compare", "-c", lwf, "-n", "x", "--tuned", str(tmp_path / "nowhere")], "no tune.json in"),
    ]
    (tmp_path / "bad_value.yaml").write_text("lwf: {alpha: [-1.0]}\n")
    cases.append((["tune", "-c", lwf, "-n", "x", "--grid", str(tmp_path / "bad_value.yaml")], "alpha"))
    (tmp_path / "bad_shape.yaml").write_text("lwf: {alpha: 0.5}\n")
    cases.append((["tune", "-c", lwf, "-n", "x", "--grid", str(tmp_path / "bad_shape.yaml")], "lwf.alpha: expected a non-empty list"))
    (tmp_path / "none_known.yaml").write_text("lwf: {beta: [1, 2]}\n")
    cases.append((["tune", "-c", lwf, "-n", "x", "--grid", str(tmp_path / "none_known.yaml")], "has none of the grid's options"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    monkeypatch.setattr("relaylearn.tune.GRIDS", {k: v for k, v in GRIDS.items() if k != "lwf"})  # a strategy with no grid
    assert main(["tune", "-c", lwf, "-n", "x"]) == 2
    err = capsys.readouterr().err
    assert "has no grid" in err and err.count("\n") == 1
    assert not (tmp_path / "exps").exists()


def test_a_strategy_without_strength_is_a_reference_trained_once_beside_the_picks(tmp_path, tiny_fundus, monkeypatch):
    import relaylearn.tune as tune

    seq = str(tiny_config(tmp_path / "s", tiny_fundus, strategy="sequential"))
    lwf = str(tiny_config(tmp_path / "l", tiny_fundus, strategy="lwf"))
    (tmp_path / "grid.yaml").write_text("lwf: {alpha: [0.5, 4.0]}\n")
    trained = []

    def fake_train(run, root, name, **kwargs):  # validation ACC / forgetting by strategy and alpha
        alpha = run.config.tasks[0].strategy.kwargs.get("alpha")
        trained.append((run.config.tasks[0].strategy.name, alpha))
        acc, forgetting = {None: (0.40, 0.60), 0.5: (0.55, 0.45), 4.0: (0.30, 0.20)}[alpha]
        return {"wall_seconds": 1.0, "matrix": {"acc": acc, "validation": {"acc": acc, "forgetting": forgetting, "bwt": -forgetting}}}

    monkeypatch.setattr(tune, "train_or_resume", fake_train)
    path = tune.tune_strategies([lwf, seq], "t", grid_file=str(tmp_path / "grid.yaml"), quiet=True, exps_root=tmp_path / "exps")
    summary = json.loads(path.read_text())
    assert sorted(trained, key=str) == sorted([("lwf", 0.5), ("lwf", 4.0), ("sequential", None)], key=str)
    reference = summary["strategies"]["sequential"]
    assert reference["reference"] and reference["pick"] is None and [p["folder"] for p in reference["points"]] == ["preset"]
    assert summary["strategies"]["lwf"]["pick"] == {"alpha": 0.5}
    md = (path.parent / "tune.md").read_text()
    assert "## Picks against the references" in md
    assert "| lwf | alpha=0.5 | 0.550 | 0.450 | -0.150 |" in md  # 0.45 − 0.60
    configs, _ = apply_picks([load_config(seq), load_config(lwf)], path)  # the reference has no pick to apply
    assert configs[0].tasks[0].strategy.kwargs == load_config(seq).tasks[0].strategy.kwargs


def test_a_tune_helper_trains_only_unclaimed_points_and_writes_nothing(tmp_path, tiny_fundus, monkeypatch):
    import relaylearn.tune as tune

    lwf = str(tiny_config(tmp_path / "l", tiny_fundus, strategy="lwf"))
    (tmp_path / "grid.yaml").write_text("lwf: {alpha: [0.5, 4.0]}\n")
    trained = []
    monkeypatch.setattr(tune, "train_or_resume", lambda run, root, name, **kw: trained.append(run.config.tasks[0].strategy.kwargs["alpha"]))
    root = tmp_path / "exps" / "tune" / "t"
    (root / ".claims" / "lwf__alpha=4.0__order0_seed0").mkdir(parents=True)
    out = tune.tune_strategies([lwf], "t", grid_file=str(tmp_path / "grid.yaml"), quiet=True, exps_root=tmp_path / "exps", claim_only=True)
    assert trained == [0.5] and not out.exists()


def test_relative_grid_values_scale_the_configs_own_value(tmp_path, tiny_fundus):
    cfg = load_config(str(tiny_config(tmp_path, tiny_fundus, strategy="relay", strategy_kwargs={"gan_steps_per_solver_step": 8})))
    points, _ = grid_points(cfg, {"gan_steps_per_solver_step": ["x0.5", "x1", "x2", 8]})
    assert [p["gan_steps_per_solver_step"] for p in points] == [4, 8, 16]  # 8 given twice is kept once
    default = load_config(str(tiny_config(tmp_path / "d", tiny_fundus, strategy="relay")))  # the paper default, 1 step
    points, _ = grid_points(default, GRIDS["relay"])
    assert sorted({p["gan_steps_per_solver_step"] for p in points}) == [1, 2] and len(points) == 8
    points, _ = grid_points(default, {"distil_weight": ["x2"]})
    assert points == [{"distil_weight": 2 * 0.5}]


@pytest.fixture
def no_training(monkeypatch, tmp_path):
    """tune in ``tmp_path`` where training any run fails the test."""
    import relaylearn.tune as tune

    def trained(*args, **kwargs):
        raise AssertionError("trained")

    monkeypatch.setattr(tune, "train_or_resume", trained)
    monkeypatch.chdir(tmp_path)


def test_bad_grids_and_names_are_refused_before_anything_trains(tmp_path, tiny_fundus, capsys, no_training):
    lwf = str(tiny_config(tmp_path / "l", tiny_fundus, strategy="lwf"))
    ewc = str(tiny_config(tmp_path / "e", tiny_fundus, strategy="ewc"))
    relay = str(tiny_config(tmp_path / "r", tiny_fundus, strategy="relay"))
    cases = [
        ([lwf], ".", None, "not . or .."),
        ([lwf], "..", None, "not . or .."),
        ([lwf], "x", "lwff: {alpha: [0.0]}", "lwff: unknown strategy (known: "),
        ([ewc], "x", "ewc: {lambda: [1.0], lambda_: [2.0]}", "ewc.lambda_: names the option 'lambda_' another key"),
        ([relay], "x", "relay: {solver_lr: [x2]}", "relay.solver_lr: a relative value needs a numeric config value"),
        ([relay], "x", "relay: {ship_discriminators: [x2]}", "relay.ship_discriminators: a relative value needs a numeric config value"),
    ]
    for i, (configs, name, grid, message) in enumerate(cases):
        argv = ["tune", *(a for c in configs for a in ("-c", c)), "-n", name, "-q"]
        if grid is not None:
            (tmp_path / f"grid{i}.yaml").write_text(grid + "\n")
            argv += ["--grid", f"grid{i}.yaml"]
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
        assert grid is None or f"grid{i}.yaml: " in err, err
    assert not (tmp_path / "exps").exists()


def test_bad_gpus_and_data_root_are_refused_before_the_first_run_and_errors_leave_the_bar(tmp_path, tiny_fundus, capsys, monkeypatch, no_training):
    import relaylearn.tune as tune
    from relaylearn.errors import UserError

    lwf = str(tiny_config(tmp_path / "l", tiny_fundus, strategy="lwf"))
    for extra, message in ((["-g", "banana"], "-g 'banana': expected GPU ids"), (["--data-root", "nonexist"], "nonexist: data root not found")):
        assert main(["tune", "-c", lwf, "-n", "x", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (extra, err)

    def failing(*args, **kwargs):
        raise UserError("disk full")

    monkeypatch.setattr(tune, "train_or_resume", failing)
    assert main(["tune", "-c", lwf, "-n", "x"]) == 2
    last = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
    assert last == "relaylearn: error: disk full"  # on a line of its own, not on the progress bar's
