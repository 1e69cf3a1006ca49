"""Command-line hygiene: bad input exits 2 with one line naming the file, key or path; no traceback."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from relaylearn.cli import build_parser
from relaylearn.predict import Inputs, skipped_note
from tests.conftest import one_line_error, run_cli, tiny_config


@pytest.fixture
def config(tmp_path, tiny_fundus) -> Path:
    return tiny_config(tmp_path, tiny_fundus, task_ids=(1,), steps=1)


def test_missing_config_names_the_file(tmp_path):
    result = run_cli(tmp_path, "train", "-c", "no/such/config.yaml", "-n", "x")
    assert result.code == 2
    line = one_line_error(result.err)
    assert "no/such/config.yaml" in line and "not found" in line
    assert not (tmp_path / "exps").exists()


def test_unknown_key_in_set_names_the_key(tmp_path, config):
    result = run_cli(tmp_path, "train", "-c", config, "-n", "x", "--set", "train.bacth_size=4")
    assert result.code == 2
    line = one_line_error(result.err)
    assert line == "relaylearn: error: --set train.bacth_size=4: unknown key (did you mean train.batch_size?)"  # not the file: it has no such key


def test_bad_value_in_set_names_the_key_and_value(tmp_path, config):
    result = run_cli(tmp_path, "train", "-c", config, "-n", "x", "--set", "train.batch_size=many")
    assert result.code == 2
    line = one_line_error(result.err)
    assert "train.batch_size" in line and "'many'" in line


@pytest.mark.parametrize(
    "strategy, option, says",
    [
        ("sequential", "strategy.kwargs.lamda=3", "relaylearn: error: --set strategy.kwargs.lamda=3: unknown key (strategy 'sequential')"),
        (
            "relay",
            "strategy.kwargs.gan_pairs_side_by_side=maybe",
            "--set strategy.kwargs.gan_pairs_side_by_side=maybe: Input should be 'auto' or a valid boolean (got 'maybe')",
        ),
        ("sequential", "strategy.kwargs={bogus: 1}", "--set strategy.kwargs={bogus: 1}: common.strategy.kwargs.bogus: unknown key (strategy 'sequential')"),
    ],
)
def test_bad_strategy_option_names_the_set_item_before_anything_is_written(tmp_path, tiny_fundus, strategy, option, says):
    """The option came from --set: the line names that item, not the config file (which has no such key)."""
    config = tiny_config(tmp_path, tiny_fundus, strategy=strategy, task_ids=(1,), steps=1)
    result = run_cli(tmp_path, "train", "-c", config, "-n", "x", "-q", "--set", option)
    assert result.code == 2
    line = one_line_error(result.err)
    assert says in line and str(config) not in line
    assert not (tmp_path / "exps").exists()


def test_bad_strategy_option_in_the_file_names_the_config(tmp_path, tiny_fundus):
    config = tiny_config(tmp_path, tiny_fundus, task_ids=(1,), steps=1, strategy_kwargs={"lamda": 3})
    result = run_cli(tmp_path, "train", "-c", config, "-n", "x", "-q")
    assert result.code == 2
    assert one_line_error(result.err) == f"relaylearn: error: {config}: common.strategy.kwargs.lamda: unknown key (strategy 'sequential')"
    assert not (tmp_path / "exps").exists()


def test_missing_data_folder_names_the_path(tmp_path, config):
    missing = tmp_path / "no-data-here"
    result = run_cli(tmp_path, "train", "-c", config, "-n", "x", "-g", "cpu", "-q", "--data-root", missing)
    assert result.code == 2
    line = one_line_error(result.err)
    assert str(missing) in line and "not found" in line
    assert not list((tmp_path / "exps").rglob("*.relay"))


@pytest.mark.parametrize("gpus", ["abc", "0,x", ",", "99"])
def test_bad_gpu_spec_is_refused_before_anything_is_written(tmp_path, config, gpus):
    result = run_cli(tmp_path, "train", "-c", config, "-n", "x", "-g", gpus, "-q")
    assert result.code == 2
    line = one_line_error(result.err)
    assert "-g" in line
    assert not (tmp_path / "exps").exists()


def test_missing_key_and_trust_folder_name_the_path(tmp_path, config):
    result = run_cli(tmp_path, "train", "-c", config, "-n", "x", "--key", tmp_path / "nokey.key")
    assert result.code == 2 and "nokey.key" in one_line_error(result.err)
    result = run_cli(tmp_path, "train", "-c", config, "-n", "y", "--in", tmp_path / "b.relay", "--trust", tmp_path / "nokeys")
    assert result.code == 2 and "nokeys" in one_line_error(result.err)
    result = run_cli(tmp_path, "train", "-c", config, "-n", "z", "--in", tmp_path / "b.relay")
    assert result.code == 2 and "--trust" in one_line_error(result.err)


def test_usage_errors_through_the_console_script(tmp_path):
    """The installed ``relaylearn`` script: argparse mistakes are exit 2, one line, no traceback."""
    script = Path(sys.executable).with_name("relaylearn")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "relaylearn"]
    for args, expected in [
        (["train", "-n", "x"], "-c/--config"),
        (["frobnicate"], "frobnicate"),
        (["train", "-c", "x", "-n", "x", "--bogus"], "--bogus"),
    ]:
        result = subprocess.run(command + args, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (args, result.stderr)
        assert expected in one_line_error(result.stderr)


def test_a_run_name_with_control_characters_is_refused(tmp_path, config):
    result = run_cli(tmp_path, "train", "-c", config, "-n", "x\x1b[31m", "-q")
    assert result.code == 2
    line = one_line_error(result.err)
    assert "printable" in line and "\x1b" not in line
    assert not (tmp_path / "exps").exists()


@pytest.mark.parametrize("command", ["train", "test", "compare", "tune"])
@pytest.mark.parametrize("name", ["..", ".", "/tmp/elsewhere"])
def test_a_run_name_that_leaves_the_run_folder_is_refused_by_every_command(tmp_path, config, command, name):
    result = run_cli(tmp_path, command, "-c", config, "-n", name, *(["-q"] if command in ("train", "compare") else []))
    assert result.code == 2
    assert "name must be" in one_line_error(result.err)
    assert not (tmp_path / "exps").exists()


def test_a_file_system_error_at_a_chosen_path_is_one_line_and_exit_2(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run_cli(tmp_path, "data", "synth", blocker / "synth", "--size", "32")
    assert result.code == 2
    line = one_line_error(result.err)
    assert "a_file" in line and "internal error" not in line


def test_a_hold_out_that_leaves_one_training_image_is_one_line(tmp_path, config):
    result = run_cli(tmp_path, "train", "-c", config, "-n", "x", "-q", "-g", "cpu", "--set", "dataset.kwargs.val_fraction=0.99")
    assert result.code == 2
    line = one_line_error(result.err)
    assert "val_fraction" in line and "at least 2" in line
    assert not (tmp_path / "exps").exists(), "found before the run folder is written (and before a ledger would move)"


@pytest.mark.parametrize(
    "override, says",
    [
        ("train.loss.kwargs.foo=1", "--set train.loss.kwargs.foo=1: unknown key"),
        ("train.lightning.devices=abc", "--set train.lightning.devices=abc: Input should be a valid integer"),
        ("dataset.kwargs.augment={params: 3}", "augment.params: expected a mapping, got 3"),
        ("common=5", "--set 'common=5': empty key"),
        ("train..batch_size=4", "--set 'train..batch_size=4': empty key segment"),
        ("train.batch_size=true", "--set train.batch_size=true: Input should be a number, not a boolean"),
        ("strategy.kwargs.bogus=1", "relaylearn: error: --set strategy.kwargs.bogus=1: unknown key (strategy 'sequential')"),
        (
            "strategy.kwargs={bogus: 1}",
            "relaylearn: error: --set strategy.kwargs={bogus: 1}: common.strategy.kwargs.bogus: unknown key (strategy 'sequential')",
        ),
    ],
)
def test_free_form_and_malformed_overrides_are_one_line_before_anything_is_written(tmp_path, config, override, says):
    """These were internal errors (exit 1) when training started, or silently accepted."""
    result = run_cli(tmp_path, "train", "-c", config, "-n", "x", "-q", "-g", "cpu", "--set", override)
    assert result.code == 2
    assert says in one_line_error(result.err)
    assert not (tmp_path / "exps").exists()


def test_a_yaml_syntax_error_names_the_line_and_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("common:\n\trandom_seed: 1\n")
    result = run_cli(tmp_path, "train", "-c", bad, "-n", "x", "-q")
    assert result.code == 2
    assert f"{bad}: cannot read YAML at line 2, column 1: found character '\\t' that cannot start any token" in one_line_error(result.err)


@pytest.mark.parametrize(
    ("option", "says"),
    [
        ("dataset.kwargs.img_size=[24,24]", "common.dataset.kwargs.img_size: image size 24x24 is not divisible by 32"),
        ("train.batch_size=1", "common.train.batch_size: 1 image(s) of 32x32"),
        ("model.kwargs.pretrained_path=/nonexistent.pth", "common.model.kwargs.pretrained_path: pretrained weights file not found (/nonexistent.pth)"),
    ],
)
def test_a_config_the_solver_cannot_train_with_is_one_line_before_anything_is_written(tmp_path, config, option, says):
    """Found by building the networks before the run folder is written (was a crash, or a message
    without the config file, after it: config.yaml, run.json, checkpoints/ left behind)."""
    result = run_cli(tmp_path, "train", "-c", config, "-n", "x", "-q", "-g", "cpu", "--set", option)
    assert result.code == 2
    line = one_line_error(result.err)
    assert f"{config}: {says}" in line
    assert not (tmp_path / "exps").exists()


def _console(args: list[str], cwd: Path, stdout) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relaylearn", *args], cwd=cwd, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120)


def test_a_closed_standard_output_ends_quietly_with_exit_1(tmp_path):
    """``relaylearn ... | head -1``: no 'internal error', no traceback (Python's note on SIGPIPE)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = _console(["keygen", str(tmp_path / "keys"), "--site", "a"], tmp_path, write_end)
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (1, "")


def test_a_full_standard_output_is_one_line_and_exit_2(tmp_path):
    with open("/dev/full", "w") as full:
        result = _console(["keygen", str(tmp_path / "keys"), "--site", "a"], tmp_path, full)
    assert result.returncode == 2
    assert "cannot write to standard output: No space left on device" in one_line_error(result.stderr)


def _subparsers(parser: argparse.ArgumentParser):
    """Every (sub)command parser below ``parser``, ``parser`` included."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield from _subparsers(child)


def test_every_option_of_every_command_is_explained_with_its_default():
    for parser in _subparsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
                continue
            where = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{where}: no help"
            if action.default not in (None, False, []):
                assert any(f in action.help for f in (f"default {action.default}", f"{action.default} (default", f"'{action.default}' (default")), (
                    f"{where}: default unsaid"
                )
            assert action.dest != "sets" or action.metavar == "KEY=VALUE", where


def test_abbreviated_options_are_refused(tmp_path):
    result = run_cli(tmp_path, "data", "synth", tmp_path / "d", "--overwrit")
    assert result.code == 2
    assert "data synth: unrecognized arguments: --overwrit" in one_line_error(result.err)


@pytest.mark.parametrize(
    "args, says",
    [
        ([], "relaylearn: error: the following arguments are required: COMMAND"),
        (["data"], "relaylearn: error: data: the following arguments are required: COMMAND"),
        (["train", "-c", "x", "-n", "x", "--bogus"], "relaylearn: error: train: unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors_name_the_subcommand_once(tmp_path, args, says):
    result = run_cli(tmp_path, *args)
    assert result.code == 2
    assert one_line_error(result.err).startswith(says)


def test_data_synth_quiet_turns_the_bar_off(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("relaylearn.data.write_synthetic_benchmark", lambda *args, **kwargs: seen.update(kwargs) or {})
    assert run_cli(tmp_path, "data", "synth", tmp_path / "d", "-q").code == 0
    assert seen["progress"] is False


def test_data_synth_prints_one_line_per_site(tmp_path):
    result = run_cli(tmp_path, "data", "synth", tmp_path / "d", "--kind", "ct", "--size", "32", "--studies", "2")
    assert result.code == 0
    assert "{" not in result.out and "  CT1: studies 2, slices" in result.out


def test_data_synth_ct_slices_layout_writes_png_study_folders(tmp_path):
    result = run_cli(tmp_path, "data", "synth", tmp_path / "d", "--kind", "ct", "--layout", "slices", "--size", "16", "--studies", "2")
    assert result.code == 0, result.err
    assert "(slices)" in result.out
    assert not list((tmp_path / "d").rglob("*.nii.gz"))
    for site in ("CT1", "CT2", "CT3", "CT4"):
        studies = [p for p in (tmp_path / "d" / site).iterdir() if p.is_dir()]
        assert len(studies) == 2, studies
        assert list(studies[0].glob("[0-9]*.png")) and list(studies[0].glob("mask_*.png"))


def test_no_progress_bar_when_standard_error_is_not_a_terminal(tmp_path):
    result = run_cli(tmp_path, "data", "synth", tmp_path / "d", "--size", "32")
    assert result.code == 0 and result.err == ""
    assert "  Domain1: train " in result.out


def test_test_quiet_is_passed_on(monkeypatch, tmp_path, config):
    seen = {}
    monkeypatch.setattr("relaylearn.evaluate.run_test", lambda *args, **kwargs: seen.update(kwargs) or tmp_path / "r.csv")
    assert run_cli(tmp_path, "test", "-c", config, "-n", "x", "-q").code == 0
    assert seen["quiet"] is True


def test_a_data_root_that_is_a_file_says_so(tmp_path, config):
    (tmp_path / "r.sh").write_text("")
    result = run_cli(tmp_path, "train", "-c", config, "-n", "x", "-q", "-g", "cpu", "--data-root", tmp_path / "r.sh")
    assert result.code == 2
    assert "r.sh: data root is a file, not a folder" in one_line_error(result.err)


@pytest.mark.parametrize("spec, says", [("", "config name is empty"), ("c4.yaml", "c4.yaml: is a folder, not a config file")])
def test_an_empty_or_folder_config_says_so(tmp_path, spec, says):
    (tmp_path / "c4.yaml").mkdir()
    result = run_cli(tmp_path, "train", "-c", spec, "-n", "x")
    assert result.code == 2
    assert says in one_line_error(result.err)


def test_a_config_listed_twice_is_named(tmp_path, config):
    result = run_cli(tmp_path, "compare", "-c", config, config, "-n", "x")
    assert result.code == 2
    assert f"the config {config} is listed twice" in one_line_error(result.err)


def test_a_missing_tune_folder_leaks_no_exception_name(tmp_path, config):
    result = run_cli(tmp_path, "compare", "-c", config, "-n", "x", "--tuned", tmp_path / "nonexist")
    assert result.code == 2
    line = one_line_error(result.err)
    assert "no tune.json in" in line and "Error" not in line


def test_a_very_long_run_name_is_refused_before_anything_is_written(tmp_path, config):
    result = run_cli(tmp_path, "train", "-c", config, "-n", "a" * 300, "-q")
    assert result.code == 2
    assert "300 characters long; at most 100" in one_line_error(result.err)
    assert not (tmp_path / "exps").exists()


def test_the_skipped_note_leaves_out_zero_parts():
    assert skipped_note(Inputs([], 0, 1)) == "note: skipped 1 sub-folder(s) (folders are not read recursively)"
    assert skipped_note(Inputs([], 2, 0)) == "note: skipped 2 file(s) that are neither images nor NIfTI volumes"


@pytest.mark.parametrize("extra", [["--studies", "3"], ["--layout", "slices"], ["--studies", "3", "--layout", "nifti"]])
def test_data_synth_refuses_ct_options_for_the_fundus_benchmark(tmp_path, extra):
    result = run_cli(tmp_path, "data", "synth", tmp_path / "d", "--size", "32", *extra)
    assert result.code == 2
    assert "only for --kind ct" in one_line_error(result.err)
    assert not (tmp_path / "d").exists()


def test_data_synth_ct_refuses_too_many_studies_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr("relaylearn.data.synth_ct._render_study", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rendered")))
    result = run_cli(tmp_path, "data", "synth", tmp_path / "d", "--kind", "ct", "--studies", "10001")
    assert result.code == 2
    assert "at most 10000 studies" in one_line_error(result.err)
