"""Assembling a strategy from a bundle: what its recipe asks for is measured before it is built."""

from __future__ import annotations

import pytest
import torch

from relaylearn import assembly, memory
from relaylearn.bundle import read_bundle
from relaylearn.config import TaskConfig
from relaylearn.errors import VerificationError
from relaylearn.strategies import available_strategies
from tests.conftest import make_bundle


def test_networks_that_do_not_fit_the_available_memory_are_refused_before_they_are_built(tmp_path, monkeypatch):
    bundle = read_bundle(make_bundle(tmp_path / "b.relay"), trust=None, allow_unsigned=True)
    built = []
    real_build = assembly.build_strategy
    monkeypatch.setattr(assembly, "build_strategy", lambda *a, **k: built.append(str(assembly.torch.get_default_device())) or real_build(*a, **k))
    monkeypatch.setattr(memory, "available_host_memory", lambda: 10 << 20)
    with pytest.raises(VerificationError, match=r"the networks of the bundle's recipe take about [0-9.]+ MB, this machine has 10.5 MB available") as refused:
        assembly.strategy_from_bundle(bundle)
    assert refused.value.path == str(bundle.path)
    assert built == ["meta"], "measured on the meta device only"
    monkeypatch.setattr(memory, "available_host_memory", lambda: None)  # unknown: not refused
    assembly.strategy_from_bundle(bundle)
    assert built == ["meta", "meta", "cpu"]


@pytest.mark.parametrize("name", sorted(available_strategies()))
def test_every_built_in_strategy_builds_on_the_meta_device(name):
    """A bundle's recipe is measured by building it on the meta device; a built-in strategy that
    cannot (a constant read back from a tensor) would refuse every bundle it wrote."""
    task = TaskConfig.model_validate({
        "train": {"num_steps": 1},
        "strategy": {"name": name},
        "dataset": {"name": "fundus", "kwargs": {"img_size": [64, 64], "num_classes": 3, "channels": 3, "task_id": 1, "task_name": "Site1"}},
    })  # fmt: skip
    with torch.device("meta"):
        probe = assembly.build_strategy(task, load_pretrained=False)
        shipped = probe.state_to_bundle().tensors
    real = assembly.build_strategy(task, load_pretrained=False).state_to_bundle().tensors
    assert {n: (t.shape, t.dtype) for n, t in shipped.items()} == {n: (t.shape, t.dtype) for n, t in real.items()}
