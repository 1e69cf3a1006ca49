"""A bundle's ``img_size`` is checked against this machine's memory before any pass (exit 3; exit 2
when the size is the local config's), predict batches shrink to what fits, and an allocation that
fails anyway is one line (exit 2), never an internal error.

Memory is never exhausted here: the available memory is patched down to a few MB and the bundles
are 32–256 px, so even the code before these checks only ran small passes."""

from __future__ import annotations

import pytest
import torch
import yaml
from PIL import Image

from relaylearn import memory
from relaylearn.errors import UserError
from tests.conftest import make_bundle, only_line, run_cli, tiny_config

MB = 1 << 20
ALLOCATION_FAILED = "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes"


@pytest.fixture
def little_memory(monkeypatch):
    """This machine has 64 MB available: a 256-px U-Net pass (about 128 MB) does not fit, 32 px does."""
    monkeypatch.setattr(memory, "available_host_memory", lambda: 64 * MB)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("big") / "task_1.relay", img=256)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("small") / "task_1.relay")


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "images" / "eye.png"
    path.parent.mkdir()
    Image.new("RGB", (40, 40), (120, 40, 20)).save(path)
    return path


def test_predict_refuses_a_bundle_too_big_for_this_machine_before_any_pass(big, image, tmp_path, little_memory):
    out = tmp_path / "out"
    result = run_cli(tmp_path, "predict", "--bundle", big, "--out", out, "-g", "cpu", "--no-verify", image)
    assert result.code == 3, result.err
    line = only_line(result.err)
    assert "256x256 needs about" in line and "67.1 MB available" in line and str(big) in line
    assert not out.exists()


def test_predict_batches_shrink_to_what_fits(monkeypatch):
    monkeypatch.setattr(memory, "available_host_memory", lambda: memory.forward_bytes(3, (32, 32)) + 1)
    assert memory.fitting_batch((32, 32), 8) == 3
    assert memory.fitting_batch((32, 32), 2) == 2


def test_an_allocation_failure_in_predict_is_one_line_exit_2_and_leaves_no_staging(small, image, tmp_path, monkeypatch):
    from relaylearn.models.unet import UNetResNet18

    def fail(self, x):
        raise RuntimeError(ALLOCATION_FAILED)

    monkeypatch.setattr(UNetResNet18, "forward", fail)
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli(tmp_path, "predict", "--bundle", small, "--out", out, "-g", "cpu", "--no-verify", image)
    assert result.code == 2, result.err
    line = only_line(result.err)
    assert "out of memory" in line and "smaller img_size" in line and "internal error" not in line
    assert list(out.iterdir()) == [], "no staging folder is left behind"


def test_only_allocation_failures_become_a_user_error():
    for exc in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), RuntimeError(ALLOCATION_FAILED), MemoryError()):
        with pytest.raises(UserError, match="out of memory while testing at 64x64 with a batch of 4"):
            with memory.out_of_memory_as_error("testing", (64, 64), 4):
                raise exc
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with memory.out_of_memory_as_error("testing", (64, 64), 4):
            raise RuntimeError("shape mismatch")


def test_export_refuses_a_bundle_too_big_for_this_machine(big, tmp_path, little_memory):
    out = tmp_path / "m.pt"
    result = run_cli(tmp_path, "export", "--bundle", big, "--no-verify", "--format", "torchscript", "--out", out)
    assert result.code == 3, result.err
    assert "256x256 needs about" in only_line(result.err)
    assert not out.exists()


def _config_without_img_size(tmp_path, data, task_ids=(1,)):
    path = tiny_config(tmp_path, data, task_ids=task_ids, steps=1)
    raw = yaml.safe_load(path.read_text())
    del raw["common"]["dataset"]["kwargs"]["img_size"]  # the site adopts the bundle's
    path.write_text(yaml.safe_dump(raw))
    return path


def test_test_refuses_a_bundle_size_too_big_for_this_machine(big, tmp_path, tiny_fundus, little_memory):
    config = _config_without_img_size(tmp_path, tiny_fundus)
    result = run_cli(tmp_path, "test", "-c", config, "-n", "t", "-g", "cpu", "--bundle", big, "--no-verify")
    assert result.code == 3, result.err
    assert "256x256 needs about" in only_line(result.err)


def test_train_in_refuses_an_adopted_size_too_big_for_this_machine(tmp_path, tiny_fundus, monkeypatch):
    monkeypatch.setattr(memory, "available_host_memory", lambda: 200 * MB)  # the local 64 px fit, 256 px batches of 4 do not
    big = make_bundle(tmp_path / "in.relay", img=256, train={"num_steps": 1, "batch_size": 4})  # the local recipe but img_size
    config = _config_without_img_size(tmp_path, tiny_fundus, task_ids=(2,))
    result = run_cli(tmp_path, "train", "-c", config, "-n", "r", "-g", "cpu", "-q", "--in", big, "--insecure-unsigned")
    assert result.code == 3, result.err
    line = result.err.splitlines()[-1]  # after the --insecure-unsigned warning
    assert "the bundle's model at 256x256 needs about" in line and "to train on a batch of 4" in line and "internal error" not in result.err
    assert not (tmp_path / "exps" / config.stem / "r" / "bundles").exists()


def test_a_local_img_size_too_big_for_this_machine_is_exit_2(tmp_path, tiny_fundus, little_memory):
    config = tiny_config(tmp_path, tiny_fundus, task_ids=(1,), steps=1)
    result = run_cli(tmp_path, "train", "-c", config, "-n", "r", "-g", "cpu", "-q", "--set", "dataset.kwargs.img_size=[256,256]")
    assert result.code == 2, result.err
    line = only_line(result.err)
    assert "common.dataset.kwargs.img_size: the model at 256x256 needs about" in line and str(config) in line


def test_a_local_training_batch_over_the_estimate_is_a_warning_not_a_refusal(tmp_path, tiny_fundus, monkeypatch):
    """The local config's own sizes: the fp32 estimate can be too high (mixed precision, a GPU),
    so training goes on after one warning; the inference check of the build still refuses."""
    monkeypatch.setattr(memory, "available_host_memory", lambda: 3 * MB)  # 32 px: a batch of 2 needs 4 MB
    config = tiny_config(tmp_path, tiny_fundus, task_ids=(1,), steps=1)
    assert run_cli(tmp_path, "train", "-c", config, "-n", "r", "-g", "cpu", "-q").code == 2
    monkeypatch.setattr(memory, "available_host_memory", lambda: 6 * MB)  # a batch of 4 for training needs 12 MB
    result = run_cli(tmp_path, "train", "-c", config, "-n", "r", "-g", "cpu", "-q")
    assert result.code == 0, result.err
    assert "WARNING: common.dataset.kwargs.img_size: the model at 32x32 needs about 12.6 MB to train on a batch of 4" in result.err


def test_an_allocation_failure_in_training_is_one_line_exit_2(tmp_path, tiny_fundus, monkeypatch):
    from relaylearn import runner

    def fail(*args, **kwargs):
        raise RuntimeError(ALLOCATION_FAILED)

    monkeypatch.setattr(runner, "fit_site", fail)
    config = tiny_config(tmp_path, tiny_fundus, task_ids=(1,), steps=1)
    result = run_cli(tmp_path, "train", "-c", config, "-n", "r", "-g", "cpu", "-q")
    assert result.code == 2, result.err
    assert "out of memory while training at 32x32 with a batch of 4" in only_line(result.err)
