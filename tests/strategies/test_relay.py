"""Relay strategy: merge formula, replay mixing, site registry, bundle state, a 2-site run."""

import json

import pytest
import torch
from torch import nn

from relaylearn.config import load_config
from relaylearn.errors import ConfigError
from relaylearn.runner import TrainOptions, build_strategy, run_training
from relaylearn.strategies.base import SiteContext
from relaylearn.strategies.relay import decode_labels, encode_labels, merge_parameters
from tests.conftest import tiny_config

TINY = {
    "z_img": 8, "z_label": 8, "w_img": 16, "w_label": 16, "site_capacity": 3, "spade_hidden": 8,
    "g_img": {"mapping_layers": 1, "channel_base": 128, "channel_max": 16},
    "g_label": {"mapping_layers": 1, "channel_base": 64, "channel_max": 8},
    "d_img": {"channel_base": 128, "channel_max": 16, "mapping_layers": 1},
    "d_label": {"channel_base": 64, "channel_max": 8, "mapping_layers": 1},
    "ada_kimg": 1, "replay_augment": "light",
}


def _strategy(tmp_path, data, **kw):
    cfg = load_config(str(tiny_config(tmp_path, data, strategy="relay", strategy_kwargs={**TINY, **kw})))
    return build_strategy(cfg.tasks[0], load_pretrained=False), cfg


def _site(name, position, n=8, steps=4):
    return SiteContext(name=name, task_id=position + 1, position=position, num_images=n, num_epochs=1, steps_per_epoch=steps,
                       train_images=torch.zeros(n, 3, 32, 32), train_labels=torch.zeros(n, 32, 32, dtype=torch.long), batch_size=4)


def test_label_encoding_round_trips():
    labels = torch.randint(0, 3, (2, 5, 5))
    enc = encode_labels(labels, 3)
    assert enc.shape == (2, 1, 5, 5) and set(enc.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.equal(decode_labels(enc + 0.02 * torch.randn_like(enc), 3), labels)


def test_merge_formula_on_tiny_tensors():
    cur, prev = nn.Linear(1, 1), nn.Linear(1, 1)
    with torch.no_grad():
        cur.weight.fill_(1.0), cur.bias.fill_(4.0), prev.weight.fill_(3.0), prev.bias.fill_(0.0)
    merge_parameters(cur, prev, previous_weight=150.0, current_weight=50.0)  # (150·p_prev + 50·p_cur) / 200
    assert cur.weight.item() == pytest.approx(2.5)
    assert cur.bias.item() == pytest.approx(1.0)


def test_registry_grows_and_capacity_is_enforced(tmp_path, tiny_fundus):
    strategy, _ = _strategy(tmp_path, tiny_fundus)
    for position, name in enumerate(["A", "B", "C"]):
        strategy.on_site_start(_site(name, position))
        strategy.on_site_end(_site(name, position))
    assert {k: v["id"] for k, v in strategy.registry_previous.items()} == {"A": 0, "B": 1, "C": 2}
    with pytest.raises(ConfigError, match="site_capacity"):
        strategy.on_site_start(_site("D", 3))
    strategy.on_site_start(_site("B", 3))  # a returning site keeps its id
    assert strategy.registry_current["B"]["id"] == 1


def test_replay_takes_half_of_the_batch_from_earlier_sites(tmp_path, tiny_fundus):
    strategy, _ = _strategy(tmp_path, tiny_fundus)
    strategy.on_site_start(_site("A", 0))
    strategy.on_site_end(_site("A", 0))
    strategy.on_site_start(_site("B", 1))
    strategy.stage = 2
    images, labels = torch.rand(10, 3, 32, 32) * 2 - 1, torch.randint(0, 3, (10, 32, 32))
    x, y, ids, n_real = strategy.mix_with_replay(images, labels)
    assert x.shape == images.shape and y.shape == labels.shape and n_real == 5
    assert ids[:5].tolist() == [1] * 5 and ids[5:].tolist() == [0] * 5  # replay carries site A's id
    assert y.min() >= 0 and y.max() <= 2 and x.min() >= -1 and x.max() <= 1
    strategy.stage = 1
    assert strategy.mix_with_replay(images, labels)[3] == 10  # stage 1: local data only


def test_frozen_generators_replay_in_eval_mode_and_do_not_drift(tmp_path, tiny_fundus):
    strategy, _ = _strategy(tmp_path, tiny_fundus)
    strategy.on_site_start(_site("A", 0))
    strategy.on_site_end(_site("A", 0))
    strategy.on_site_start(_site("B", 1))
    strategy.train()
    assert not strategy.previous.training and strategy.g_img.training
    before = {k: v.clone() for k, v in strategy.previous.state_dict().items()}
    strategy.stage = 2
    strategy.mix_with_replay(torch.zeros(6, 3, 32, 32), torch.zeros(6, 32, 32, dtype=torch.long))
    after = strategy.previous.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bundle_state_has_no_old_copies_and_round_trips(tmp_path, tiny_fundus):
    strategy, cfg = _strategy(tmp_path, tiny_fundus, ship_discriminators=False)
    strategy.on_site_start(_site("A", 0))
    strategy.on_site_end(_site("A", 0))
    state = strategy.state_to_bundle()
    assert not any(k.startswith(("previous.", "d_img.", "d_label.")) for k in state.tensors)
    assert {k.split(".")[0] for k in state.tensors} >= {"solver", "g_img", "g_label", "ada_img", "ada_label"}
    json.dumps(state.meta)  # JSON-able
    other = build_strategy(cfg.tasks[0], load_pretrained=False)
    other.state_from_bundle(state)
    assert other.registry_previous == strategy.registry_previous
    for k, v in other.g_img.state_dict().items():
        assert torch.equal(v, strategy.g_img.state_dict()[k])


def test_two_site_relay_run_writes_bundles_the_next_site_resumes_from(tmp_path, tiny_fundus):
    cfg = load_config(str(tiny_config(tmp_path, tiny_fundus, strategy="relay", steps=4, strategy_kwargs=TINY)))
    result = run_training(cfg, "r", TrainOptions(quiet=True, exps_root=tmp_path / "exps"))
    assert len(result.matrix["R"]) == 2
    from relaylearn.bundle import read_bundle

    b2 = read_bundle(result.bundles[1], trust=None, allow_unsigned=True)
    assert b2.manifest["strategy"] == "relay"
    assert [h["site"] for h in b2.manifest["hops"]] == ["Domain1", "Domain2"]
    registry = b2.manifest["registry"]["site_registry"]
    assert set(registry) == {"Domain1", "Domain2"} and registry["Domain2"]["id"] == 1
    # a third site continues from the second site's bundle
    cfg3 = load_config(str(tiny_config(tmp_path, tiny_fundus, strategy="relay", steps=2, task_ids=(3,), strategy_kwargs=TINY)))
    r3 = run_training(cfg3, "r3", TrainOptions(quiet=True, exps_root=tmp_path / "exps", in_bundle=str(result.bundles[1]), insecure_unsigned=True))
    b3 = read_bundle(r3.bundles[0], trust=None, allow_unsigned=True)
    assert [h["site"] for h in b3.manifest["hops"]] == ["Domain1", "Domain2", "Domain3"]
