"""Replay fidelity: the score itself on hand-made pairs, drift, and replay.json of a 3-site relay run."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from relaylearn.config import load_config
from relaylearn.replay_fidelity import class_fractions, final_fidelity, mean_final_fidelity, replay_drift, replay_fidelity
from relaylearn.runner import TrainOptions, run_training
from tests.conftest import TINY, tiny_config


class _ChannelOracle(nn.Module):
    """'Segments' an image by reading the class id written into its first channel."""

    def forward(self, x):
        return F.one_hot(x[:, 0].round().long().clamp(0, 2), 3).permute(0, 3, 1, 2).float()


class _Source:
    """Generates masks and images that show them (``honest``) or show another mask."""

    def __init__(self, honest: bool):
        self.honest = honest

    def generate_replay(self, site, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        masks = torch.zeros(n, 8, 8, dtype=torch.long)
        masks[:, 2:6, 2:6] = 1
        masks[:, 3:5, 3:5] = 2
        shown = masks if self.honest else torch.roll(masks, shifts=3, dims=2)
        images = shown.unsqueeze(1).float().repeat(1, 3, 1, 1) + 0.01 * torch.randn(n, 3, 8, 8, generator=g)
        return images, masks


def test_fidelity_is_one_for_pairs_that_agree_and_low_for_pairs_that_do_not():
    good = replay_fidelity(_Source(True), "A", _ChannelOracle(), num_classes=3, n=10)
    bad = replay_fidelity(_Source(False), "A", _ChannelOracle(), num_classes=3, n=10)
    assert good.fidelity == pytest.approx(1.0) and good.per_sample.shape == (10,)
    assert bad.fidelity < 0.5
    assert good.class_fractions == pytest.approx([48 / 64, 12 / 64, 4 / 64])


class _HidesTheTumour(_Source):
    """Images show the tumour (class 2) of the masks as the helper class 1."""

    def generate_replay(self, site, n, seed=0):
        images, masks = super().generate_replay(site, n, seed)
        return images.clamp(max=1.0), masks


def test_fidelity_scores_the_classes_from_first_class(tmp_path):
    from relaylearn.replay_fidelity import FidelityRecorder

    helper = replay_fidelity(_HidesTheTumour(True), "A", _ChannelOracle(), num_classes=3, n=4)
    tumour = replay_fidelity(_HidesTheTumour(True), "A", _ChannelOracle(), num_classes=3, n=4, first_class=2)
    assert tumour.fidelity == 0.0 < helper.fidelity

    class Strategy(_HidesTheTumour, nn.Module):
        def __init__(self):
            nn.Module.__init__(self)
            _HidesTheTumour.__init__(self, True)
            self.solver = nn.Sequential(nn.Identity(), _ChannelOracle())

    recorder = FidelityRecorder(tmp_path, 3, samples=4, first_class=2)
    masks = torch.zeros(2, 8, 8, dtype=torch.long)
    recorder.record(0, "A", Strategy(), None, masks)
    assert recorder.record(1, "B", Strategy(), None, masks)["fidelity"][1] == [0.0, None]


def test_class_fractions_drift_and_mean_final_fidelity():
    assert class_fractions(torch.tensor([[0, 0, 1, 2]]), 4) == pytest.approx([0.5, 0.25, 0.25, 0.0])
    F_ = [[None, None, None], [0.8, None, None], [0.6, 0.7, None]]
    assert replay_drift(F_, ["A", "B", "C"]) == {"A": pytest.approx(0.2)}
    replay = {"fidelity": F_, "reference": [0.9, 0.7, 0.8]}
    assert mean_final_fidelity(replay) == pytest.approx(0.65)
    assert mean_final_fidelity(replay, relative=True) == pytest.approx((0.6 / 0.9 + 1.0) / 2)
    assert mean_final_fidelity({"fidelity": []}) is None
    named = {**replay, "sites": ["A", "B", "C"], "reference": [0.9, 0.0, 0.8]}
    assert final_fidelity(named) == {"A": pytest.approx(0.6), "B": pytest.approx(0.7)}
    assert final_fidelity(named, relative=True) == {"A": pytest.approx(0.6 / 0.9)}  # B has no usable reference


def test_relay_run_writes_replay_json_and_keeps_oracles_out_of_bundles(tmp_path, tiny_fundus):
    from relaylearn.bundle import read_bundle

    path = tiny_config(tmp_path, tiny_fundus, strategy="relay", task_ids=(1, 2, 3), steps=2, strategy_kwargs=TINY)
    cfg = load_config(str(path), overrides=["test.replay_fidelity_samples=6"])
    result = run_training(cfg, "r", TrainOptions(quiet=True, exps_root=tmp_path / "exps"))
    replay = json.loads((result.run_dir / "metrics" / "replay.json").read_text())
    assert replay["sites"] == ["Domain1", "Domain2", "Domain3"] == result.matrix["trained"]
    F_ = replay["fidelity"]
    assert [[v is None for v in row] for row in F_] == [[True] * 3, [False, True, True], [False, False, True]]
    assert all(0 <= v <= 1 for row in F_ for v in row if v is not None)
    R = result.matrix["R"]
    assert replay["reference"] == pytest.approx([R[k][k] for k in range(3)])  # the oracle's Dice on its site
    assert len(replay["class_fractions"]["real"]) == 3 and replay["class_fractions"]["generated"][2][2] is None
    assert sum(replay["class_fractions"]["generated"][2][0]) == pytest.approx(1.0)
    assert sorted(p.name for p in (result.run_dir / "oracles").iterdir()) == [f"site_{k}.safetensors" for k in range(3)]
    assert (result.run_dir / "metrics" / "replay_samples" / "hop3_site1.png").is_file()
    for b in result.bundles:  # oracles never travel
        bundle = read_bundle(b, trust=None, allow_unsigned=True)
        assert not any("oracle" in k for k in bundle.tensors) and "oracle" not in json.dumps(bundle.manifest)
    # the oracle of site 1 is the solver that left site 1
    from safetensors.torch import load_file

    b1 = read_bundle(result.bundles[0], trust=None, allow_unsigned=True)
    oracle = load_file(str(result.run_dir / "oracles" / "site_0.safetensors"))
    assert all(torch.equal(oracle[k], b1.tensors[f"solver.{k}"]) for k in oracle)


def test_no_replay_json_for_strategies_without_replay(tmp_path, tiny_fundus):
    cfg = load_config(str(tiny_config(tmp_path, tiny_fundus, strategy="sequential", steps=1)))
    result = run_training(cfg, "s", TrainOptions(quiet=True, exps_root=tmp_path / "exps"))
    assert not (result.run_dir / "metrics" / "replay.json").exists() and not (result.run_dir / "oracles").exists()


def test_sample_grid_of_one_channel_images_is_rgb():
    from relaylearn.replay_fidelity import sample_grid

    images = torch.rand(3, 1, 8, 8) * 2 - 1  # CT-like: one channel in [-1, 1]
    masks = torch.randint(0, 2, (3, 8, 8))
    grid = sample_grid(images, masks, (-1.0, 1.0))
    assert grid.shape == (16, 24, 3) and grid.dtype.name == "uint8"
    assert (grid[:8, :, 0] == grid[:8, :, 1]).all()  # grey top row
