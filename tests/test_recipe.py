"""Recipe vs site: a site joining with ``--in`` adopts the bundle's recipe where its config is
silent, refuses keys it sets otherwise (naming them all), or keeps its own with ``--recipe local``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from relaylearn.config import TaskConfig, _rows, load_config
from relaylearn.errors import ConfigError, VerificationError
from relaylearn.recipe import RECIPE_KEYS, SITE_KEYS, _under, is_recipe_key, reconcile
from relaylearn.runner import shipped_config
from tests.conftest import make_bundle, one_line_error, run_cli, tiny_config


def bundle_of(task: TaskConfig, **edits) -> SimpleNamespace:
    """A stand-in for a verified bundle: the config a site with ``task`` ships, ``edits`` applied
    (dotted keys)."""
    config = shipped_config(task)
    for key, value in edits.items():
        node = config
        *parents, last = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    return SimpleNamespace(manifest={"config": config}, path=Path("incoming.relay"))


def site_config(tmp_path: Path, sets=(), **kwargs):
    return load_config(str(tiny_config(tmp_path, tmp_path, task_ids=(2,), **kwargs)), list(sets))


def test_every_config_key_is_recipe_or_site():
    for key, *_ in _rows(TaskConfig, ""):
        assert _under(key, RECIPE_KEYS) or _under(key, SITE_KEYS), f"{key} is neither recipe nor site"
    assert is_recipe_key("train.optimizer.lr") and is_recipe_key("strategy.kwargs.distil_weight")
    assert not is_recipe_key("model.kwargs.pretrained_path") and not is_recipe_key("dataset.kwargs.root_path")
    assert not is_recipe_key("train.precision") and not is_recipe_key("train.optimizer.fused")


def test_identical_recipe_passes_unchanged(tmp_path):
    cfg = site_config(tmp_path)
    incoming = load_config(str(tiny_config(tmp_path / "a", tmp_path, task_ids=(1,)))).tasks[0]
    same, record = reconcile(cfg, bundle_of(incoming))
    assert same.tasks == cfg.tasks and record == {"source": "bundle", "adopted": {}, "differs": {}}


def test_a_differing_lr_is_an_error_naming_the_key_and_both_values(tmp_path):
    cfg = site_config(tmp_path, ["train.optimizer.lr=0.01", "train.batch_size=2"])
    incoming = load_config(str(tiny_config(tmp_path / "a", tmp_path, task_ids=(1,)))).tasks[0]
    with pytest.raises(ConfigError) as err:
        reconcile(cfg, bundle_of(incoming))
    message = str(err.value)
    assert "train.optimizer.lr: 0.01 here, 0.001 in the bundle" in message
    assert "train.batch_size: 2 here, 4 in the bundle" in message  # every differing key, not the first
    assert "--recipe local" in message and err.value.exit_code == 2


def test_keys_left_unset_adopt_the_bundles_values_test_sites_included(tmp_path):
    cfg = site_config(tmp_path, strategy="ewc")  # sets no lr, no EWC option, no augmentation
    incoming = load_config(
        str(tiny_config(tmp_path / "a", tmp_path, task_ids=(1,), strategy="ewc", strategy_kwargs={"lambda": 7.0})),
        ["train.optimizer.lr=0.005", "dataset.kwargs.augment=light"],
    ).tasks[0]
    adopted, record = reconcile(cfg, bundle_of(incoming))
    task = adopted.tasks[0]
    assert task.train.optimizer.lr == 0.005 and task.strategy.kwargs["lambda_"] == 7.0
    assert task.dataset.kwargs.augment == "light" and task.dataset.site == "Domain2"  # site keys stay local
    assert {d.kwargs.augment for d in adopted.test_datasets} == {"light"}
    assert record["adopted"] == {"train.optimizer.lr": "0.005", "strategy.kwargs.lambda_": "7.0", "dataset.kwargs.augment": '"light"'}


def test_an_adopted_air_class_must_fit_the_local_slices(tmp_path):
    """The bundle's add_bg_label lands on a ct_slices site whose PNGs hold nothing below hu_min −160 HU."""
    slices = ["dataset.name=ct_slices", "dataset.kwargs.channels=1"]
    cfg = site_config(tmp_path, slices)
    incoming = load_config(
        str(tiny_config(tmp_path / "a", tmp_path, task_ids=(1,))), [*slices, "dataset.kwargs.add_bg_label=true", "dataset.kwargs.hu_min=-1024"]
    )
    with pytest.raises(ConfigError, match=r"\(bundle recipe adopted\) common\.dataset: kwargs\.add_bg_label: .* kwargs\.hu_min=-160 "):
        reconcile(cfg, bundle_of(incoming.tasks[0]))


def test_a_strategy_option_set_under_its_alias_counts_as_set(tmp_path):
    cfg = site_config(tmp_path, strategy="ewc", strategy_kwargs={"lambda": 100.0})
    incoming = load_config(str(tiny_config(tmp_path / "a", tmp_path, task_ids=(1,), strategy="ewc", strategy_kwargs={"lambda": 7.0}))).tasks[0]
    with pytest.raises(ConfigError, match=r"strategy\.kwargs\.lambda_: 100\.0 here, 7\.0 in the bundle"):
        reconcile(cfg, bundle_of(incoming))


def test_local_recipe_opt_out_keeps_it_and_records_the_differences(tmp_path):
    cfg = site_config(tmp_path, ["train.optimizer.lr=0.01"])
    incoming = load_config(str(tiny_config(tmp_path / "a", tmp_path, task_ids=(1,)))).tasks[0]
    kept, record = reconcile(cfg, bundle_of(incoming), source="local")
    assert kept.tasks[0].train.optimizer.lr == 0.01
    assert record["source"] == "local" and record["differs"] == {"train.optimizer.lr": {"local": "0.01", "bundle": "0.001"}}


def test_bundle_values_are_escaped_in_the_error(tmp_path):
    cfg = site_config(tmp_path, ["dataset.kwargs.augment=light"])
    incoming = load_config(str(tiny_config(tmp_path / "a", tmp_path, task_ids=(1,)))).tasks[0]
    with pytest.raises(ConfigError) as err:
        reconcile(cfg, bundle_of(incoming, **{"dataset.kwargs.augment": "\x1b[2J\nrm -rf"}))
    message = str(err.value)
    assert "\x1b" not in message and "\n" not in message and "dataset.kwargs.augment" in message


def test_a_bundle_naming_a_plug_in_picks_no_code(tmp_path):
    cfg = site_config(tmp_path)
    incoming = load_config(str(tiny_config(tmp_path / "a", tmp_path, task_ids=(1,)))).tasks[0]
    for key in ("strategy.name", "model.name"):
        with pytest.raises(VerificationError, match="never imported"):
            reconcile(cfg, bundle_of(incoming, **{key: "recipe_test_evil_module:Thing"}))
    assert "recipe_test_evil_module" not in sys.modules
    with pytest.raises(VerificationError, match="unknown strategy"):
        reconcile(cfg, bundle_of(incoming, **{"strategy.name": "no_such_strategy"}))


def test_a_bundle_from_before_the_unused_keys_were_removed_still_reads(tmp_path):
    cfg = site_config(tmp_path)
    incoming = load_config(str(tiny_config(tmp_path / "a", tmp_path, task_ids=(1,)))).tasks[0]
    old = bundle_of(incoming, **{"num_workers": 0, "train.check_val_every_n_epoch": 10, "test.save_predictions": False})
    assert reconcile(cfg, old)[0].tasks == cfg.tasks


# ----- end to end through the command line --------------------------------------------------------
@pytest.fixture(scope="module")
def hop1(tmp_path_factory, tiny_fundus) -> Path:
    folder = tmp_path_factory.mktemp("site1")
    config = tiny_config(folder, tiny_fundus, task_ids=(1,), steps=1)
    result = run_cli(folder, "train", "-c", config, "-n", "one", "-g", "cpu", "-q")
    assert result.code == 0, result.err
    return folder / "exps" / "sequential" / "one" / "bundles" / "task_1.relay"


def test_cli_differing_recipe_exits_2_with_one_line_and_writes_nothing(tmp_path, tiny_fundus, hop1):
    config = tiny_config(tmp_path, tiny_fundus, task_ids=(2,), steps=1)
    result = run_cli(tmp_path, "train", "-c", config, "-n", "two", "-g", "cpu", "-q", "--in", hop1, "--insecure-unsigned",
                     "--set", "train.optimizer.lr=0.01")  # fmt: skip
    assert result.code == 2
    line = one_line_error(result.err.replace(next(ln for ln in result.err.splitlines() if "WARNING" in ln), ""))
    assert "train.optimizer.lr: 0.01 here, 0.001 in the bundle" in line
    assert not (tmp_path / "exps").exists()


def test_cli_recipe_local_trains_and_records_it_in_run_json(tmp_path, tiny_fundus, hop1):
    config = tiny_config(tmp_path, tiny_fundus, task_ids=(2,), steps=1)
    result = run_cli(tmp_path, "train", "-c", config, "-n", "two", "-g", "cpu", "-q", "--in", hop1, "--insecure-unsigned",
                     "--set", "train.optimizer.lr=0.01", "--recipe", "local")  # fmt: skip
    assert result.code == 0, result.err
    run_dir = tmp_path / "exps" / "sequential" / "two"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["recipe"]["source"] == "local"
    assert info["recipe"]["differs"]["train.optimizer.lr"] == {"local": "0.01", "bundle": "0.001"}
    resolved = yaml.safe_load((run_dir / "resolved_config.yaml").read_text())
    assert resolved[0]["train"]["optimizer"]["lr"] == 0.01


# ----- relaylearn test --bundle: the test sites are prepared as the bundle's model was trained ------
def test_cli_test_names_a_preprocessing_key_set_otherwise_than_the_bundles(tmp_path, tiny_fundus):

    grey = make_bundle(tmp_path / "grey.relay", channels=1)
    config = tiny_config(tmp_path, tiny_fundus, task_ids=(1,))
    for sets, key, here, there in (
        (["dataset.kwargs.channels=3"], "dataset.kwargs.channels", "3", "1"),  # crashed in the first convolution
        (["dataset.kwargs.channels=1", "dataset.kwargs.img_size=[64,64]"], "dataset.kwargs.img_size", "[64, 64]", "[32, 32]"),  # evaluated silently
        (["dataset.kwargs.channels=1", "dataset.kwargs.out_range=[0,1]"], "dataset.kwargs.out_range", "[0.0, 1.0]", "[-1.0, 1.0]"),
    ):
        overrides = [a for s in sets for a in ("--set", s)]
        result = run_cli(tmp_path, "test", "-c", config, "-n", "t", "-g", "cpu", "--bundle", grey, "--no-verify", *overrides)
        assert result.code == 2, result.err
        line = one_line_error(result.err)
        assert f"test site Domain1: {key}: {here} here, {there} in the bundle" in line and "internal error" not in line
    assert not (tmp_path / "exps" / config.stem / "t" / "test_results").exists()


def test_cli_test_adopts_the_bundles_preprocessing_where_the_config_is_silent(tmp_path, tiny_fundus):

    bundle = make_bundle(tmp_path / "b.relay")  # 32 px
    config = tiny_config(tmp_path, tiny_fundus, task_ids=(1,))
    raw = yaml.safe_load(config.read_text())
    del raw["common"]["dataset"]["kwargs"]["img_size"]  # the default, 64, is not the model's
    silent = tmp_path / "silent.yaml"
    silent.write_text(yaml.safe_dump(raw))
    adopted = run_cli(tmp_path, "test", "-c", silent, "-n", "t", "-g", "cpu", "--bundle", bundle, "--no-verify")
    assert adopted.code == 0, adopted.err
    assert "note: testing with the bundle's dataset.kwargs.img_size [32, 32]" in adopted.out
    stated = run_cli(tmp_path, "test", "-c", config, "-n", "t", "-g", "cpu", "--bundle", bundle, "--no-verify")
    dice = lambda out: [line for line in out.splitlines() if "Dice" in line]  # noqa: E731
    assert dice(adopted.out) == dice(stated.out), "tested at the model's 32 px, as a config stating it"
