import pytest
import yaml

from relaylearn.config import CONFIG_DIR, deep_merge, load_config, parse_set
from relaylearn.errors import ConfigError
from tests.conftest import tiny_config


def test_deep_merge_source_wins_and_lists_replace():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    out = deep_merge(base, {"a": {"c": [3]}, "d": None})
    assert out == {"a": {"b": 1, "c": [3]}, "d": None}
    assert base["a"]["c"] == [1, 2]  # not mutated


def test_tasks_resolve_in_order_with_per_site_dataset(tmp_path):
    cfg = load_config(str(tiny_config(tmp_path, tmp_path, task_ids=(2, 1))))
    assert [t.dataset.site for t in cfg.tasks] == ["Domain2", "Domain1"]
    assert [d.site for d in cfg.test_datasets] == ["Domain1", "Domain2", "Domain3"]
    assert cfg.tasks[0].dataset.kwargs.img_folder == "Domain2"


def test_set_overrides_common_with_yaml_scalars(tmp_path):
    cfg = load_config(str(tiny_config(tmp_path, tmp_path)), ["train.batch_size=16", "train.precision=bf16-mixed", "random_seed=3"])
    assert cfg.tasks[0].train.batch_size == 16
    assert cfg.tasks[0].train.precision == "bf16-mixed"
    assert cfg.tasks[0].random_seed == 3


def test_data_root_replaces_every_site_root(tmp_path):
    cfg = load_config(str(tiny_config(tmp_path, tmp_path)), data_root="/elsewhere")
    assert {d.root for d in cfg.test_datasets} == {"/elsewhere"}
    assert cfg.tasks[0].dataset.root == "/elsewhere"


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.batch_sze=3", "common.train.batch_sze: unknown key"),
        ("train.batch_size=many", "common.train.batch_size"),
        ("dataset.kwargs.num_classes=1", "common.dataset.kwargs.num_classes"),
        (
            "train.num_epochs=3",
            "exactly one of num_epochs / num_mimgs / num_steps must be set (got ['num_epochs', 'num_steps']); keep one, e.g. --set train.num_epochs=null",
        ),
        ("test.save_predictions=true", "common.test.save_predictions: not supported by this version; write predicted masks with 'relaylearn predict'"),
        ("train.compile_me=true", "common.train.compile_me: unknown key"),
        ("train.gradient_clip=-1", "common.train.gradient_clip"),
        ("dataset.kwargs.img_size=[0,0]", "common.dataset.kwargs.img_size: each side must be between 1 and 4096 pixels"),
        ("dataset.kwargs.img_size=[20000,20000]", "common.dataset.kwargs.img_size: each side must be between 1 and 4096 pixels"),
        ("dataset.kwargs.out_range=[1,1]", "common.dataset.kwargs.out_range: the lower bound must be below the upper one"),
        ("dataset.kwargs.hu_window=[240,-160]", "common.dataset.kwargs.hu_window: the lower bound must be below the upper one"),
        ("train.optimizer.lr=.inf", "common.train.optimizer.lr: Input should be a finite number"),
        ("dataset.kwargs.channels=300000", "common.dataset.kwargs.channels: Input should be less than or equal to 64"),
        ("dataset.kwargs.num_classes=100000", "common.dataset.kwargs.num_classes: Input should be less than or equal to 256"),
        # free-form blocks that used to fail as internal errors when training started, or train silently wrong
        ("train.loss.kwargs.foo=1", "common.train.loss.kwargs.foo: unknown key"),
        ("train.loss.kwargs.gamma=abc", "common.train.loss.kwargs.gamma: Input should be a valid number"),
        ("train.loss.kwargs.dice_weight=.nan", "common.train.loss.kwargs.dice_weight: Input should be a finite number"),
        ("train.loss.kwargs.ce_weight=[1,-2,2]", "common.train.loss.kwargs.ce_weight.1: Input should be greater than 0"),
        ("train.loss.kwargs={dice_weight: 0, ce_weight_total: 0}", "common.train.loss.kwargs: dice_weight and ce_weight_total are both 0"),
        ("model.kwargs.in_channels=2.5", "common.model.kwargs.in_channels: Input should be a valid integer"),
        ("model.kwargs.bilinear=maybe", "common.model.kwargs.bilinear: Input should be a valid boolean"),
        ("model.kwargs.width=8", "common.model.kwargs.width: unknown key"),
        ("train.lightning.devices=abc", "common.train.lightning.devices: Input should be a valid integer"),
        ("train.lightning.devices=0", "common.train.lightning.devices: Input should be greater than or equal to 1"),
        ("train.lightning.strategy=bogus", "common.train.lightning.strategy: Input should be 'auto', 'ddp' or 'ddp_find_unused_parameters_true'"),
        # lax pydantic read true as 1
        ("train.batch_size=true", "common.train.batch_size: Input should be a number, not a boolean (got True)"),
        ("train.optimizer.lr=true", "common.train.optimizer.lr: Input should be a number, not a boolean"),
        ("train.optimizer.betas=[0.9, false]", "common.train.optimizer.betas: Input should be a number, not a boolean"),
        ("train.lightning.devices=true", "common.train.lightning.devices: Input should be a number, not a boolean"),
        ("dataset.kwargs.num_replica=1000000000", "common.dataset.kwargs.num_replica: Input should be less than or equal to 10000"),
        ("audit.n_generated=99999999999", "common.audit.n_generated: Input should be less than or equal to 100000"),
    ],
)
def test_bad_set_values_name_the_set_item_not_the_file(tmp_path, override, key):
    """The file holds no such key: the error names the --set item (and the problem)."""
    path = tiny_config(tmp_path, tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(str(path), [override])
    assert str(err.value).startswith(f"--set {override}: ")
    assert key.split(": ", 1)[-1] in str(err.value) if ": " in key else True
    assert str(path) not in str(err.value)
    assert err.value.exit_code == 2


def test_bad_keys_in_the_file_name_the_file_and_suggest_a_known_key(tmp_path):
    path = tiny_config(tmp_path, tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["common"]["test"]["bootstap"] = 200
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_config(str(path), ["train.batch_size=2"])  # a --set elsewhere is not blamed
    assert str(err.value) == f"{path}: common.test.bootstap: unknown key (did you mean test.bootstrap?)"


def test_original_local_typo_is_an_error_not_silently_sequential(tmp_path):
    """The original's local.yaml misspelled an option and silently became 'sequential'."""
    path = tiny_config(tmp_path, tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["common"]["strategy"]["load_state_dict_from_previous_task"] = False
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="load_state_dict_from_previous_task: unknown key"):
        load_config(str(path))


def test_unknown_task_id_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no dataset in all_tasks_datasets has task_id 9"):
        load_config(str(tiny_config(tmp_path, tmp_path, task_ids=(9,))))
    with pytest.raises(ConfigError, match="config not found"):
        load_config(str(tmp_path / "nope"))


def test_set_needs_key_value():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set(["train.batch_size"])


@pytest.mark.parametrize("item", ["common=5", "common.=1", "train..batch_size=4", ".train.batch_size=4", "train.batch_size.=4", "=4"])
def test_set_refuses_an_empty_key_or_segment(item):
    """``common=5`` was an internal error (IndexError); ``train..batch_size=4`` set train.batch_size."""
    with pytest.raises(ConfigError, match="empty key") as err:
        parse_set([item])
    assert repr(item) in str(err.value) and err.value.exit_code == 2
    assert parse_set(["common.train.batch_size=4"]) == [(["train", "batch_size"], 4)]


def test_a_site_listed_twice_in_task_ids_is_refused(tmp_path):
    """Its second hop overwrote the first one's bundle, and BWT compared the site with itself."""
    path = tiny_config(tmp_path, tmp_path, task_ids=(1, 2, 1))
    with pytest.raises(ConfigError, match=r"config\.current_tasks\.task_ids: task id 1 is listed twice") as err:
        load_config(str(path))
    assert str(path) in str(err.value)


def test_the_default_class_weights_follow_the_classes_and_a_given_list_must_match_them(tmp_path):
    """ce_weight defaulted to [1, 2, 2]: any other class count failed once training started."""
    path = tiny_config(tmp_path, tmp_path)
    assert "ce_weight" not in load_config(str(path), ["dataset.kwargs.num_classes=2"]).tasks[0].train.loss.kwargs  # "auto"
    two = load_config(str(path), ["dataset.kwargs.num_classes=2", "train.loss.kwargs.ce_weight=[1, 3]"])
    assert two.tasks[0].train.loss.kwargs == {"ce_weight": [1.0, 3.0]}
    with pytest.raises(ConfigError, match=r"current_tasks\.task_confs\.1: train\.loss\.kwargs\.ce_weight: 3 entries, but dataset\.kwargs\.num_classes is 5"):
        load_config(str(path), ["dataset.kwargs.num_classes=5", "train.loss.kwargs.ce_weight=[1, 2, 2]"])


def test_typed_model_and_loss_options_keep_only_the_keys_given_with_their_values_checked(tmp_path):
    path = tiny_config(tmp_path, tmp_path)
    task = load_config(str(path), ["model.kwargs.in_channels=3.0", "model.kwargs.bilinear=no", "train.loss.kwargs.gamma=1"]).tasks[0]
    assert task.model.kwargs == {"in_channels": 3, "bilinear": False} and type(task.model.kwargs["in_channels"]) is int
    assert task.train.loss.kwargs == {"gamma": 1.0}
    quoted = load_config(str(path), ['model.kwargs.bilinear="no"']).tasks[0]
    assert quoted.model.kwargs["bilinear"] is False  # was passed on as the string "no", which is true
    own = load_config(str(path), ["model.name=examples.tiny_net:TinyNet", "model.kwargs.width=8"]).tasks[0]
    assert own.model.kwargs == {"width": 8}  # your own model's keyword arguments stay free


def test_the_loss_options_are_the_losses_keyword_arguments():
    """ExpLogOptions validates what ExpLogLoss takes: the same names and defaults."""
    import inspect

    from relaylearn.config import ExpLogOptions
    from relaylearn.losses import ExpLogLoss

    signature = inspect.signature(ExpLogLoss).parameters
    assert list(signature) == list(ExpLogOptions.model_fields)
    assert {name: p.default for name, p in signature.items()} == {name: f.default for name, f in ExpLogOptions.model_fields.items()}


def test_booleans_are_not_numbers_in_strategy_options_and_site_lists(tmp_path):
    from relaylearn.strategies.base import parse_options
    from relaylearn.strategies.relay import Relay

    with pytest.raises(ConfigError, match=r"z_img: Input should be a number, not a boolean \(got True\)"):
        parse_options(Relay, {"z_img": True})
    assert parse_options(Relay, {"gan_pairs_side_by_side": True}).gan_pairs_side_by_side is True  # a boolean where one is taken
    raw = yaml.safe_load(tiny_config(tmp_path, tmp_path).read_text())
    raw["current_tasks"]["task_ids"] = [True]
    path = tmp_path / "bool.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"config\.current_tasks\.task_ids: Input should be a number, not a boolean"):
        load_config(str(path))


@pytest.mark.parametrize("path", sorted(p for p in CONFIG_DIR.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_shipped_configs_validate(path):
    name = str(path.relative_to(CONFIG_DIR).with_suffix(""))
    cfg = load_config(name)
    assert cfg.tasks
    from relaylearn.strategies import get_strategy_class
    from relaylearn.strategies.base import parse_options

    cls = get_strategy_class(cfg.tasks[0].strategy.name)
    parse_options(cls, cfg.tasks[0].strategy.kwargs)
    # bf16 by name runs on slow reference kernels on CPUs without native bf16 (15x slower than fp32)
    assert all(t.train.precision != "bf16-mixed" for t in cfg.tasks), "shipped configs say auto or 32, never bf16-mixed by name"


def test_precision_32_may_be_written_as_a_number(tmp_path, tiny_fundus):
    from relaylearn.config import load_config

    cfg = load_config(str(tiny_config(tmp_path, tiny_fundus)), overrides=["train.precision=32"])
    assert cfg.tasks[0].train.precision == "32"


def test_keys_of_the_original_that_change_nothing_load_with_a_warning_and_are_dropped(tmp_path):
    """``num_workers`` / ``check_val_every_n_epoch`` from the original's files: accepted, said to be ignored."""
    path = tiny_config(tmp_path, tmp_path)
    with pytest.warns(UserWarning, match=r"common\.num_workers is ignored"):
        cfg = load_config(str(path), ["num_workers=4"])
    assert "num_workers" not in cfg.tasks[0].model_dump()
    with pytest.warns(UserWarning, match=r"common\.train\.check_val_every_n_epoch is ignored"):
        load_config(str(path), ["train.check_val_every_n_epoch=10"])


def test_checkpoint_resume_in_a_task_is_refused_with_the_replacement(tmp_path):
    path = tiny_config(tmp_path, tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["current_tasks"]["task_confs"] = {1: {"checkpoint": {"resume": "last.ckpt"}}}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"current_tasks\.task_confs\.1\.checkpoint\.resume: not supported.*--resume"):
        load_config(str(path))


def test_gradient_clip_with_loss_scaled_fp16_is_an_error(tmp_path):
    path = tiny_config(tmp_path, tmp_path)
    with pytest.raises(ConfigError, match="gradient_clip does not work with precision 16-mixed"):
        load_config(str(path), ["train.gradient_clip=1", "train.precision=16-mixed"])
    assert load_config(str(path), ["train.gradient_clip=1", "train.precision=bf16-mixed"]).tasks[0].train.gradient_clip == 1


@pytest.mark.parametrize("name", ["fundus/relay", "fundus/relay_deploy", "fundus/relay_test", "ct/relay", "ct/sequential"])
def test_the_original_style_configs_keep_loading_with_the_originals_keys(name, tmp_path):
    """The paper configs, with the two keys the original's files also had (dropped here as inert)."""
    raw = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    raw["common"]["num_workers"] = 4
    raw["common"]["train"]["check_val_every_n_epoch"] = 10
    path = tmp_path / "original.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.warns(UserWarning, match="is ignored"):
        assert load_config(str(path)).tasks == load_config(name).tasks


def test_the_quality_preset_is_the_previous_demo_relay_preset_with_more_gan_steps():
    """The README's comparison of the two presets attributes every difference to the GAN budget;
    the demo preset has since taken the generator average, snapshots, distillation weight 2 and the
    D step on the G step's fakes (the previous preset = replay_ablation's PREVIOUS_DEMO overrides)."""
    demo = load_config("demo/relay").tasks[0].model_dump()
    quality = load_config("demo/relay_quality").tasks[0].model_dump()
    demo_kwargs, quality_kwargs = demo["strategy"]["kwargs"], quality["strategy"]["kwargs"]
    assert (demo_kwargs.pop("gan_steps_per_solver_step"), quality_kwargs.pop("gan_steps_per_solver_step")) == (5, 16)
    assert (demo_kwargs.pop("distil_weight"), quality_kwargs.pop("distil_weight")) == (2, 0.5)
    assert (demo_kwargs.pop("generator_ema_steps"), quality_kwargs.pop("generator_ema_steps", 0)) == (30, 0)
    assert (demo_kwargs.pop("generator_snapshots"), quality_kwargs.pop("generator_snapshots", 0)) == (5, 0)
    assert (demo_kwargs.pop("d_step_fakes"), quality_kwargs.pop("d_step_fakes", "fresh")) == ("reuse", "fresh")
    assert quality == demo


def test_the_ablation_benchmarks_previous_demo_preset_is_the_quality_presets_base():
    """replay_ablation's variants start from PREVIOUS_DEMO, the preset the README measured them on."""
    from tests.conftest import load_benchmark

    ablation = load_benchmark("replay_ablation")
    previous = load_config("demo/relay", ablation.PREVIOUS_DEMO).tasks[0].model_dump()
    quality = load_config("demo/relay_quality").tasks[0].model_dump()
    for preset in (previous, quality):
        kwargs = preset["strategy"]["kwargs"]
        kwargs.pop("gan_steps_per_solver_step")
        assert (kwargs.pop("generator_ema_steps", 0), kwargs.pop("generator_snapshots", 0), kwargs.pop("d_step_fakes", "fresh")) == (0, 0, "fresh")
    assert quality == previous


def test_the_long_quality_preset_is_the_quality_preset_with_more_batches_the_generator_average_and_no_discriminators():
    """The README attributes the long preset's results to these three changes (measured apart)."""
    quality = load_config("demo/relay_quality").tasks[0].model_dump()
    long = load_config("demo/relay_quality_long").tasks[0].model_dump()
    assert (quality["train"].pop("num_steps"), long["train"].pop("num_steps")) == (60, 120)
    assert (quality["strategy"]["kwargs"].pop("generator_ema_steps", 0), long["strategy"]["kwargs"].pop("generator_ema_steps")) == (0, 100)
    assert (quality["strategy"]["kwargs"].pop("ship_discriminators", True), long["strategy"]["kwargs"].pop("ship_discriminators")) == (True, False)
    assert long == quality


def test_a_strategy_option_that_fits_no_member_of_its_union_names_them_all():
    from relaylearn.strategies.base import parse_options
    from relaylearn.strategies.relay import Relay

    with pytest.raises(ConfigError) as err:
        parse_options(Relay, {"gan_pairs_side_by_side": "maybe"})
    want = "common.strategy.kwargs.gan_pairs_side_by_side: Input should be 'auto' or a valid boolean (got 'maybe') (strategy 'relay')"
    assert str(err.value) == want  # not the first member's tag and message alone
    with pytest.raises(
        ConfigError, match=r"common\.strategy\.kwargs\.overlap_solver_stepp: unknown key \(did you mean overlap_solver_step\?\) \(strategy 'relay'\)"
    ):
        parse_options(Relay, {"overlap_solver_stepp": True})


def test_a_key_given_twice_a_syntax_error_or_a_file_that_is_not_utf8_is_an_error_naming_the_file_and_line(tmp_path):
    """A syntax error kept only the parser's state ("while scanning for the next token"), not the problem or the line."""
    path = tiny_config(tmp_path, tmp_path)
    text = path.read_text()
    twice = tmp_path / "twice.yaml"
    twice.write_text(text.replace("common:\n", "common:\n  random_seed: 1\n  random_seed: 2\n", 1))
    with pytest.raises(ConfigError, match=r"at line \d+, column 3: key 'random_seed' appears twice") as err:
        load_config(str(twice))
    assert str(twice) in str(err.value)
    tab = tmp_path / "tab.yaml"
    tab.write_text("common:\n\trandom_seed: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(tab))
    assert str(err.value) == f"{tab}: cannot read YAML at line 2, column 1: found character '\\t' that cannot start any token"
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe common: {}")
    with pytest.raises(ConfigError, match="cannot read YAML") as err:
        load_config(str(binary))
    assert str(binary) in str(err.value)


def test_a_strategy_option_must_be_finite():
    from relaylearn.strategies.base import parse_options
    from relaylearn.strategies.relay import Relay

    with pytest.raises(ConfigError, match="distil_tau: Input should be a finite number"):
        parse_options(Relay, {"distil_tau": float("inf")})


def test_network_sizes_are_bounded_so_building_them_cannot_exhaust_memory():
    from relaylearn.strategies.base import parse_options
    from relaylearn.strategies.relay import Relay

    for kwargs, says in (({"g_img": {"channel_max": 10**6}}, "g_img.channel_max"), ({"z_img": 10**7}, "z_img"), ({"site_capacity": 10**6}, "site_capacity")):
        with pytest.raises(ConfigError, match=says):
            parse_options(Relay, kwargs)


def test_the_models_in_channels_must_match_the_datasets_channels():
    from relaylearn.models import build_solver

    with pytest.raises(ConfigError, match="in_channels: 300000 does not match the dataset's channels 3"):
        build_solver("unet", {"in_channels": 300000}, in_channels=3, num_classes=3, load_pretrained=False)


def test_the_air_class_needs_ct_slices_that_can_hold_air(tmp_path):
    """A 16-bit ct_slices PNG holds HU − hu_min: with hu_min −160 no pixel lies below −500 HU, so
    add_bg_label's class would never be trained. Refused when the config loads, naming the site."""
    from relaylearn.recipe import shipped_task_config

    path = tiny_config(tmp_path, tmp_path)
    air = ["dataset.name=ct_slices", "dataset.kwargs.channels=1", "dataset.kwargs.add_bg_label=true"]
    with pytest.raises(
        ConfigError, match=r"all_tasks_datasets\[0\]: kwargs\.add_bg_label: air \(< -500 HU\) never occurs in ct_slices with kwargs\.hu_min=-160 "
    ):
        load_config(str(path), air)
    assert load_config(str(path), [*air, "dataset.kwargs.hu_min=-1024"]).tasks[0].dataset.kwargs.add_bg_label
    assert (
        load_config(str(path), ["dataset.name=ct_nifti", "dataset.kwargs.channels=1", "dataset.kwargs.add_bg_label=true"]).tasks[0].dataset.kwargs.add_bg_label
    )
    raw = yaml.safe_load(path.read_text())  # hu_min per site: common's default is no site's
    for site in raw["all_tasks_datasets"]:
        site["kwargs"]["hu_min"] = -1024
    raw["all_tasks_datasets"][2]["kwargs"]["hu_min"] = -500
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"all_tasks_datasets\[2\]: kwargs\.add_bg_label: .* kwargs\.hu_min=-500 "):
        load_config(str(path), air)
    shipped = load_config(str(path), air[:2]).tasks[0].model_dump(mode="json")  # a bundle written before the check still reads
    shipped["dataset"]["kwargs"].update(add_bg_label=True, hu_min=-160)
    assert shipped_task_config(shipped).dataset.kwargs.add_bg_label


@pytest.mark.parametrize("bad", ["random_seed=-5", "random_seed=4294967294", "dataset.kwargs.task_id=-1"])
def test_seeds_outside_numpys_range_are_config_errors(tmp_path, tiny_fundus, bad):
    """They used to fail as an internal error when a site started (after earlier sites trained)."""
    from tests.conftest import tiny_config

    with pytest.raises(ConfigError, match=bad.split("=")[0].split(".")[-1]):
        load_config(str(tiny_config(tmp_path, tiny_fundus)), [bad])


def test_a_seed_option_out_of_range_is_a_usage_error(tmp_path, capsys):
    from relaylearn.cli import main

    assert main(["data", "synth", str(tmp_path / "out"), "--seed", "-1", "--size", "32"]) == 2
    assert "is not a seed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_config_without_a_strategy_is_refused(tmp_path):
    """It trained the unprotected sequential baseline without a word (the reference said required)."""
    path = tmp_path / "c.yaml"
    common = {"dataset": {"name": "fundus", "kwargs": {"root_path": str(tmp_path), "num_classes": 3}}, "train": {"num_steps": 2}}
    path.write_text(yaml.safe_dump({"common": common, "all_tasks_datasets": [{"kwargs": {"task_id": 1}}], "current_tasks": {"task_ids": [1]}}))
    with pytest.raises(ConfigError, match="common.strategy: Field required"):
        load_config(str(path))


@pytest.mark.parametrize("kwargs", [{"task_name": "B+C"}, {"img_folder": "B+C"}])
def test_a_site_name_with_a_plus_is_refused(tmp_path, kwargs):
    """'+' joins the sites of a pooled row (A+B): a site B+C would be read as the sites B and C."""
    raw = yaml.safe_load(tiny_config(tmp_path, tmp_path).read_text())
    raw["all_tasks_datasets"][1]["kwargs"] = {"task_id": 2, **kwargs}
    (tmp_path / "plus.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"all_tasks_datasets\[1\].*site name 'B\+C'.*contains '\+'.*task_name"):
        load_config(str(tmp_path / "plus.yaml"))
