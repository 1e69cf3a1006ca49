"""Relay strategy: merge formula, replay mixing, site registry, bundle state, a 2-site run."""

import json
import pickle

import pytest
import torch
from torch import nn

from relaylearn.assembly import build_strategy
from relaylearn.config import load_config
from relaylearn.errors import ConfigError
from relaylearn.models.gan.loss import alignment_loss_image, alignment_loss_label, alignment_references, merge_styles
from relaylearn.runner import TrainOptions, run_training
from relaylearn.strategies.base import SiteContext
from relaylearn.strategies.relay import decode_labels, encode_labels, merge_parameters
from tests.conftest import TINY, tiny_config


def _strategy(tmp_path, data, **kw):
    cfg = load_config(str(tiny_config(tmp_path, data, strategy="relay", strategy_kwargs={**TINY, **kw})))
    return build_strategy(cfg.tasks[0], load_pretrained=False), cfg


def _site(name, position, n=8, steps=4):
    return SiteContext(
        name=name,
        task_id=position + 1,
        position=position,
        num_images=n,
        num_epochs=1,
        steps_per_epoch=steps,
        train_images=torch.zeros(n, 3, 32, 32),
        train_labels=torch.zeros(n, 32, 32, dtype=torch.long),
        batch_size=4,
    )


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


def _walk_site(strategy, site):
    """on_site_start, the stage switch as every batch of the site calls it, on_site_end."""
    from relaylearn.strategies.base import StepContext

    strategy.on_site_start(site)
    for i in range(site.total_steps):
        strategy._maybe_switch_stage(StepContext(step=i, global_step=i, epoch=0, site=site))
    strategy.on_site_end(site)


@pytest.mark.parametrize("num_stages", [1, 2])
def test_merge_weight_grows_by_each_sites_images_once(tmp_path, tiny_fundus, num_stages):
    strategy, _ = _strategy(tmp_path, tiny_fundus, num_stages=num_stages)
    _walk_site(strategy, _site("A", 0, n=8, steps=10))
    assert strategy.merge_weight == 8  # the first site has no merge: its weight counts once
    _walk_site(strategy, _site("B", 1, n=5, steps=10))
    assert strategy.merge_weight == 13
    _walk_site(strategy, _site("C", 2, n=7, steps=3))
    assert strategy.merge_weight == 20


def test_mid_site_merge_weighs_the_previous_sites_by_their_images(tmp_path, tiny_fundus):
    from relaylearn.strategies.base import StepContext

    strategy, _ = _strategy(tmp_path, tiny_fundus, num_stages=2)
    _walk_site(strategy, _site("A", 0, n=8, steps=10))
    site = _site("B", 1, n=24, steps=10)
    strategy.on_site_start(site)
    solver = next(strategy.solver.parameters())
    previous = solver.detach().clone()
    with torch.no_grad():
        solver.add_(1.0)  # what site B's first half "learned"
    for i in range(6):
        strategy._maybe_switch_stage(StepContext(step=i, global_step=i, epoch=0, site=site))
    assert strategy.stage == 2
    torch.testing.assert_close(solver.detach(), previous + 24 / (8 + 24))  # (8·p_prev + 24·p_cur) / 32


def test_discriminators_that_did_not_travel_are_not_merged(tmp_path, tiny_fundus):
    from relaylearn.strategies.base import StepContext

    strategy, _ = _strategy(tmp_path, tiny_fundus, num_stages=2, ship_discriminators=False)
    _walk_site(strategy, _site("A", 0))
    site = _site("B", 1, steps=4)
    strategy.on_site_start(site)
    with torch.no_grad():
        for net in (strategy.d_img, strategy.solver):
            for p in net.parameters():
                p.add_(1.0)
    trained_d = {k: v.clone() for k, v in strategy.d_img.state_dict().items()}
    trained_solver = next(strategy.solver.parameters()).detach().clone()
    for i in range(3):
        strategy._maybe_switch_stage(StepContext(step=i, global_step=i, epoch=0, site=site))
    assert strategy.stage == 2
    assert all(torch.equal(v, strategy.d_img.state_dict()[k]) for k, v in trained_d.items())  # no previous version to merge with
    assert not torch.equal(next(strategy.solver.parameters()).detach(), trained_solver)  # the solver did merge


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_replay_generator_mode_leaves_the_distillation_teacher_in_eval_mode(tmp_path, tiny_fundus, mode):
    strategy, _ = _strategy(tmp_path, tiny_fundus, replay_generator_mode=mode)
    _walk_site(strategy, _site("A", 0))
    strategy.on_site_start(_site("B", 1))
    strategy.train()
    assert strategy.previous["g_img"].training == strategy.previous["g_label"].training == (mode == "train")
    teacher = strategy.previous["solver"]
    assert not any(m.training for m in teacher.modules())
    stats = {k: v.clone() for k, v in teacher.state_dict().items() if "running" in k}
    with torch.no_grad():
        teacher(torch.rand(4, 3, 32, 32) * 2 - 1)
    assert stats and all(torch.equal(v, teacher.state_dict()[k]) for k, v in stats.items())


def test_a_partial_label_network_size_keeps_the_label_networks_own_defaults():
    from relaylearn.strategies.relay import RelayOptions

    o = RelayOptions(g_label={"channel_base": 2048}, d_label={"mapping_layers": 4})
    assert (o.g_label.mapping_layers, o.g_label.channel_base, o.g_label.channel_max) == (2, 2048, 128)
    assert (o.d_label.channel_base, o.d_label.channel_max, o.d_label.mapping_layers) == (4096, 128, 4)
    assert (o.g_img.mapping_layers, o.g_img.channel_base, o.g_img.channel_max) == (4, 8192, 256)
    assert RelayOptions().g_label.model_dump() == {"mapping_layers": 2, "channel_base": 4096, "channel_max": 128}


@pytest.mark.parametrize("entry", [{"id": 10**9, "frequency": 1}, {"id": -1, "frequency": 1}, {"id": 0, "frequency": -5}])
def test_a_registry_entry_outside_the_site_capacity_does_not_fit(tmp_path, tiny_fundus, entry):
    """A bundle's registry holds ids that index the one-hot site vector: out of range, the bundle
    does not fit (load_bundle_state turns the error into exit 3), never an error deep in training."""
    strategy, _ = _strategy(tmp_path, tiny_fundus)
    with pytest.raises(ValueError, match="site registry"):
        strategy.load_meta({"site_registry": {"X": entry}})


@pytest.mark.parametrize(
    "meta, says",
    [
        ({"merge_weight": "nan"}, "merge_weight"),
        ({"merge_weight": float("inf")}, "merge_weight"),
        ({"stage": 3}, "stage"),
        ({"gan_step": "12"}, "gan_step"),
        ({"sites_seen": {"A": 1}}, "sites_seen"),
        ({"site_registry": {f"S{i}": {"id": i % 3, "frequency": 0} for i in range(4)}}, "at most 3 sites"),
        ({"site_registry": {"A": {"id": 0, "frequency": 1}, "B": {"id": 0, "frequency": 1}}}, "share an id"),
    ],
)
def test_bundle_metadata_of_the_wrong_type_or_range_does_not_fit(tmp_path, tiny_fundus, meta, says):
    """Values are checked, never coerced: float("nan") from the string "nan" would train a relay into NaN weights."""
    strategy, _ = _strategy(tmp_path, tiny_fundus)
    with pytest.raises(ValueError, match=says):
        strategy.load_meta(meta)


def test_a_recipe_the_strategy_cannot_build_is_a_verification_error(tmp_path, tiny_fundus):
    from types import SimpleNamespace

    from relaylearn.assembly import restore_strategy
    from relaylearn.errors import VerificationError

    _, cfg = _strategy(tmp_path, tiny_fundus)
    task = cfg.tasks[0].model_copy(deep=True)
    task.train.loss.kwargs["bogus"] = 1  # what a bundle's recipe could hold
    with pytest.raises(VerificationError, match="recipe does not build here") as err:
        restore_strategy(task, SimpleNamespace(path=tmp_path / "odd.relay"))
    assert err.value.exit_code == 3 and "odd.relay" in str(err.value)


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
    snapshots = {"generator_snapshots": 1, "snapshot_samples": 4}  # also exercised end to end here
    cfg = load_config(str(tiny_config(tmp_path, tiny_fundus, strategy="relay", steps=4, strategy_kwargs={**TINY, **snapshots})))
    result = run_training(cfg, "r", TrainOptions(quiet=True, exps_root=tmp_path / "exps"))
    assert len(result.matrix["R"]) == 2
    events = b"".join(p.read_bytes() for p in (result.run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert b"site/snapshot/chosen_batch" in events  # the strategy's site summary reached TensorBoard
    from relaylearn.bundle import read_bundle

    b2 = read_bundle(result.bundles[1], trust=None, allow_unsigned=True)
    assert b2.manifest["strategy"] == "relay"
    assert [h["site"] for h in b2.manifest["hops"]] == ["Domain1", "Domain2"]
    registry = b2.manifest["registry"]["site_registry"]
    assert set(registry) == {"Domain1", "Domain2"} and registry["Domain2"]["id"] == 1
    # a third site continues from the second site's bundle
    cfg3 = load_config(str(tiny_config(tmp_path, tiny_fundus, strategy="relay", steps=2, task_ids=(3,), strategy_kwargs=TINY)))
    r3 = run_training(
        cfg3, "r3", TrainOptions(quiet=True, exps_root=tmp_path / "exps", in_bundle=str(result.bundles[1]), insecure_unsigned=True, recipe="local")
    )  # a shorter budget than the bundle's
    b3 = read_bundle(r3.bundles[0], trust=None, allow_unsigned=True)
    assert [h["site"] for h in b3.manifest["hops"]] == ["Domain1", "Domain2", "Domain3"]


# ----- replay fixes and the GAN budget ----------------------------------------------------------
class _Mark(nn.Module):
    """Stands in for the solver's replay augmentation: paints the replayed images with a constant."""

    VALUE = 0.123

    def forward(self, images, labels):
        return torch.full_like(images, self.VALUE), labels


def _replaying(tmp_path, data, earlier=("A",), **kw):
    """A strategy at its len(earlier)+1-th site, in the replay stage, with optimizers."""
    strategy, _ = _strategy(tmp_path, data, **kw)
    for position, name in enumerate(earlier):
        strategy.on_site_start(_site(name, position))
        strategy.on_site_end(_site(name, position))
    site = _site("B" if earlier == ("A",) else "Z", len(earlier))
    site.train_images = torch.rand(8, 3, 32, 32) * 2 - 1
    strategy.on_site_start(site)
    strategy.stage = 2
    strategy.optimizers = strategy.configure_optimizers()
    return strategy, site


def _step(site, index=1):
    from relaylearn.strategies.base import StepContext

    return StepContext(step=index, global_step=10 + index, epoch=0, site=site)


def _batch(n=8):
    return torch.rand(n, 3, 32, 32) * 2 - 1, torch.randint(0, 3, (n, 32, 32))


def test_replay_augmentation_reaches_the_solver_step_only(tmp_path, tiny_fundus):
    strategy, site = _replaying(tmp_path, tiny_fundus)
    strategy.replay_augment = _Mark()
    seen = {}
    d_loss = strategy._discriminator_loss
    strategy._discriminator_loss = lambda x, y, ids, r1, *fakes: (seen.setdefault("d", x.detach().clone()), d_loss(x, y, ids, r1, *fakes))[1]
    solver_inputs = []
    strategy.solver.register_forward_pre_hook(lambda m, args: solver_inputs.append(args[0].detach().clone()))
    strategy.training_step(_batch(), _step(site))
    marked = _Mark.VALUE
    assert not (seen["d"][4:] == marked).all(), "the discriminator saw augmented replay"
    assert (solver_inputs[0][4:] == marked).all() and not (solver_inputs[0][:4] == marked).any()


def test_style_mixing_keeps_one_site_per_sample(tmp_path, tiny_fundus):
    strategy, _ = _replaying(tmp_path, tiny_fundus, earlier=("A", "B"), style_mixing_prob=1.0)
    torch.manual_seed(0)
    _, _, c = strategy._fake_inputs(64, "cpu")
    assert c.shape == (64, 2, 3)
    assert torch.equal(c[:, 0], c[:, 1])  # both styles, one site
    assert len(c[:, 0].argmax(-1).unique()) == 3  # drawn over all sites in the replay stage
    assert torch.equal(merge_styles(c), c[:, 0])  # the discriminator sees a plain one-hot


def _g_img_site_ids(strategy, site):
    calls = []
    forward = strategy.g_img.forward
    strategy.g_img.forward = lambda z, c, seg, **kw: (calls.append(c.detach().clone()), forward(z, c, seg, **kw))[1]
    torch.manual_seed(1)
    strategy.training_step(_batch(), _step(site))
    return calls[0][:, 0].argmax(-1)  # the G step's image-generator ids, per sample


def test_image_generator_site_follows_its_label_map_unless_switched_off(tmp_path, tiny_fundus):
    strategy, site = _replaying(tmp_path, tiny_fundus)
    ids = _g_img_site_ids(strategy, site)
    assert ids.tolist() == [1] * 4 + [0] * 4  # real maps of B (id 1), then replayed maps of A (id 0)
    original, site = _replaying(tmp_path / "o", tiny_fundus, tie_image_site=False)
    assert _g_img_site_ids(original, site).tolist() != [1] * 4 + [0] * 4  # independent draw


def test_gan_budget_runs_extra_and_warm_up_gan_steps(tmp_path, tiny_fundus):
    strategy, site = _replaying(tmp_path, tiny_fundus, gan_steps_per_solver_step=3, gan_warmup_steps=2)
    counts = {"g": 0, "d": 0, "m": 0}
    for key, opt in zip("gdm", strategy.optimizers):
        opt.register_step_post_hook(lambda *a, key=key: counts.__setitem__(key, counts[key] + 1))
    strategy.training_step(_batch(), _step(site, index=0))
    assert counts == {"g": 5, "d": 5, "m": 1}  # warm-up only at the site's first batch
    strategy.training_step(_batch(), _step(site, index=1))
    assert counts == {"g": 8, "d": 8, "m": 2}
    assert strategy.gan_step == 8 and strategy.meta()["gan_step"] == 8


def test_appended_replay_keeps_every_real_and_reuses_the_gan_steps_replay(tmp_path, tiny_fundus):
    # replay_stock 0: one generator call per G+D step, which this test counts
    strategy, site = _replaying(tmp_path, tiny_fundus, gan_steps_per_solver_step=2, solver_replay="append", replay_augment="none", replay_stock=0)
    generated, solver_inputs = [], []
    generate = strategy._generate
    strategy._generate = lambda *a, **kw: (lambda out: (generated.append(out[0].detach().clone()), out)[1])(generate(*a, **kw))
    strategy.solver.register_forward_pre_hook(lambda m, args: solver_inputs.append(args[0].detach().clone()))
    images, labels = _batch()
    strategy.training_step((images, labels), _step(site))
    x = solver_inputs[0]
    assert x.shape[0] == 16 and torch.equal(x[:8], images)  # all 8 reals, in order, then 8 replayed
    assert len(generated) == 2  # one replay of 4 per G+D step, nothing generated for the solver
    assert torch.equal(x[8:], torch.cat(generated))
    single, site = _replaying(tmp_path / "one", tiny_fundus, solver_replay="append", replay_augment="none")
    single.solver.register_forward_pre_hook(lambda m, args: solver_inputs.append(args[0].detach().clone()))
    single.training_step(_batch(), _step(site))
    assert solver_inputs[-1].shape[0] == 16  # a single G+D step's replay (4) is topped up to 8


def _draws(strategy, sizes):
    """The replay ``strategy.replay`` hands out for requests of ``sizes`` pairs, concatenated."""
    parts = [strategy.replay(n, torch.device("cpu")) for n in sizes]
    return [torch.cat(t) for t in zip(*parts)]


def test_replay_stock_hands_out_the_same_pairs_however_the_batches_split_them(tmp_path, tiny_fundus):
    strategy, site = _replaying(tmp_path, tiny_fundus, replay_stock=6)
    calls = []
    generate = strategy._generate
    strategy._generate = lambda gens, ids: (calls.append(ids.shape[0]), generate(gens, ids))[1]
    state = torch.get_rng_state()
    a = _draws(strategy, [4, 4, 5])  # 13 pairs: refills 0, 1 and the first pair of 2
    assert calls == [6, 6, 6] and torch.equal(torch.get_rng_state(), state)  # global stream untouched
    assert [t.shape[0] for t in a] == [13, 13, 13] and a[0].shape[1:] == (3, 32, 32) and a[1].shape[1:] == (32, 32)
    seed = strategy._stock_seed
    strategy.on_site_start(site)  # the same site again, with the same stock seed
    strategy._stock_seed = seed
    b = _draws(strategy, [1, 12])
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0][:6], a[0][6:12])  # refills differ


def test_replay_stock_resumes_where_a_local_checkpoint_left_it(tmp_path, tiny_fundus):
    strategy, _ = _replaying(tmp_path, tiny_fundus, replay_stock=8)
    _draws(strategy, [5])
    saved = strategy.get_extra_state()
    expected = _draws(strategy, [5, 5])
    resumed, _ = _replaying(tmp_path / "r", tiny_fundus, replay_stock=8)
    resumed.previous.load_state_dict(strategy.previous.state_dict())  # the same frozen generators (from the bundle)
    assert resumed._stock_seed != saved["replay_stock"]["seed"]
    resumed.set_extra_state(saved)
    for x, y in zip(expected, _draws(resumed, [3, 7])):
        assert torch.equal(x, y)


def test_generator_snapshots_resume_where_a_local_checkpoint_left_them(tmp_path, tiny_fundus):
    """The candidates taken before a local checkpoint still compete at the site's end after --resume
    (they were lost, and the resumed site could keep other generators than an uninterrupted one)."""
    strategy, _ = _replaying(tmp_path, tiny_fundus, generator_snapshots=2)
    strategy._take_generator_snapshot(1)
    saved = pickle.loads(pickle.dumps(strategy.get_extra_state()))  # through the checkpoint file
    resumed, _ = _replaying(tmp_path / "r", tiny_fundus, generator_snapshots=2)
    resumed.set_extra_state(saved)
    ((batch, weights),), ((_, expected),) = resumed.generator_snapshots, strategy.generator_snapshots
    assert batch == 1 and weights.keys() == expected.keys() == {"g_img", "g_label"}
    assert all(torch.equal(weights[k][n], t) for k in expected for n, t in expected[k].items())


def test_without_a_replay_stock_each_request_is_generated_and_the_stream_is_as_before(tmp_path, tiny_fundus):
    strategy, _ = _replaying(tmp_path, tiny_fundus, replay_stock=0)
    assert strategy._stock_seed == 0  # no extra random draw at the site start
    calls = []
    generate = strategy._generate
    strategy._generate = lambda gens, ids: (calls.append(ids.shape[0]), generate(gens, ids))[1]
    _draws(strategy, [4, 4])
    assert calls == [4, 4]


def test_train_mode_replay_is_generated_batch_by_batch_as_the_original(tmp_path, tiny_fundus):
    # train-mode SPADE normalises with the batch's statistics: a pair depends on its call's size,
    # so a stock would not reproduce per-batch generation
    strategy, _ = _replaying(tmp_path, tiny_fundus, replay_stock=256, replay_generator_mode="train")
    assert strategy.previous["g_img"].training and strategy._stock_seed == 0
    calls = []
    generate = strategy._generate
    strategy._generate = lambda gens, ids: (calls.append(ids.shape[0]), generate(gens, ids))[1]
    torch.manual_seed(3)
    images, labels, ids = strategy.replay(4, torch.device("cpu"))
    assert calls == [4]
    torch.manual_seed(3)  # the same batch generated by one call of its own size
    want_ids = strategy._draw_ids(4, "previous", torch.device("cpu"))
    want_images, want_labels = generate(strategy.previous, want_ids)
    assert torch.equal(ids, want_ids) and torch.equal(labels, want_labels) and torch.equal(images, want_images)


def test_first_site_warm_up_runs_only_where_the_gans_start_from_scratch(tmp_path, tiny_fundus):
    strategy, _ = _strategy(tmp_path, tiny_fundus, gan_warmup_steps=1, gan_first_site_warmup_steps=3)
    first = _site("A", 0)
    first.train_images = torch.rand(8, 3, 32, 32) * 2 - 1
    strategy.on_site_start(first)
    strategy.optimizers = strategy.configure_optimizers()
    strategy.training_step(_batch(), _step(first, index=0))
    assert strategy.gan_step == 1 + 3 + 1  # warm-up of every site, of the first site, then the batch's own step
    strategy.on_site_end(first)
    second = _site("B", 1)
    second.train_images = torch.rand(8, 3, 32, 32) * 2 - 1
    strategy.on_site_start(second)
    strategy.optimizers = strategy.configure_optimizers()
    strategy.training_step(_batch(), _step(second, index=0))
    assert strategy.gan_step == 5 + 1 + 1


def test_gan_presets_fill_only_what_the_config_leaves_out():
    from relaylearn.strategies.relay import RelayOptions

    paper = RelayOptions()
    assert (paper.pl_weight, paper.style_mixing_prob, paper.gan_steps_per_solver_step, paper.gan_warmup_steps) == (2.0, 0.8, 1, 0)
    small = RelayOptions(gan_preset="small")
    assert (small.pl_weight, small.style_mixing_prob, small.gan_steps_per_solver_step) == (0.0, 0.0, 16)
    assert RelayOptions(gan_preset="small", gan_steps_per_solver_step=4).gan_steps_per_solver_step == 4
    for name in ("relay", "relay_deploy", "relay_test"):  # the paper presets keep the paper's values
        o = load_config(f"fundus/{name}").tasks[0].strategy.kwargs
        opts = RelayOptions(**o)
        assert (opts.pl_weight, opts.style_mixing_prob, opts.gan_steps_per_solver_step, opts.tie_image_site, opts.spade_equalized_lr) == (
            2.0,
            0.8,
            1,
            True,
            False,
        )


def test_generate_replay_is_deterministic_and_in_the_solver_range(tmp_path, tiny_fundus):
    strategy, _ = _replaying(tmp_path, tiny_fundus)
    state = torch.get_rng_state()
    images, masks = strategy.generate_replay("A", 70, seed=3, batch_size=32)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert images.shape == (70, 3, 32, 32) and images.dtype == torch.float32 and masks.shape == (70, 32, 32) and masks.dtype == torch.long
    assert images.min() >= -1 and images.max() <= 1 and masks.min() >= 0 and masks.max() <= 2
    again, again_masks = strategy.generate_replay(0, 70, seed=3, batch_size=32)
    assert torch.equal(images, again) and torch.equal(masks, again_masks)
    assert not torch.equal(strategy.generate_replay("A", 70, seed=4)[0], images)
    with pytest.raises(KeyError, match="unknown"):
        strategy.generate_replay("nowhere", 2, seed=0)


def test_replay_can_be_switched_off_for_ablations(tmp_path, tiny_fundus):
    strategy, site = _replaying(tmp_path, tiny_fundus, replay=False)
    images, labels = _batch()
    assert not strategy.replaying and strategy.mix_with_replay(images, labels)[3] == 8
    logs = strategy.training_step((images, labels), _step(site))
    assert logs["replay_fraction"] == 0 and "distil" in logs  # distillation and the merge stay


def test_bundles_with_equalised_spade_load_into_plain_spade_unchanged(tmp_path, tiny_fundus):
    old, cfg = _strategy(tmp_path, tiny_fundus, spade_equalized_lr=True)
    old.on_site_start(_site("A", 0))
    old.on_site_end(_site("A", 0))
    state = old.state_to_bundle()
    del state.meta["spade_conv"]  # as written before the field existed (equalised lr)
    new, _ = _strategy(tmp_path / "n", tiny_fundus)
    new.state_from_bundle(state)
    z, c, seg = torch.randn(3, 8), torch.eye(3)[[0, 1, 2]], torch.rand(3, 1, 32, 32) * 2 - 1
    old.eval(), new.eval()
    with torch.no_grad():
        assert torch.allclose(old.g_img(z, c, seg, noise_mode="const"), new.g_img(z, c, seg, noise_mode="const"), atol=1e-5)
    assert new.meta()["spade_conv"] == "plain"


def _alignment(strategy, n=6):
    torch.manual_seed(1)
    c = torch.nn.functional.one_hot(torch.zeros(n, dtype=torch.long), 3).float()
    quantize = lambda m: encode_labels(decode_labels(m, 3), 3)  # noqa: E731
    z_label, z_img = torch.randn(n, 8), torch.randn(n, 8)
    ref_label, seg, ref_img = alignment_references(strategy.previous["g_label"], strategy.previous["g_img"], z_label, z_img, c, quantize)
    return alignment_loss_label(strategy.g_label, z_label, c, ref_label) + alignment_loss_image(strategy.g_img, z_img, c, seg, ref_img)


def test_generator_alignment_is_zero_for_unchanged_generators_and_pulls_drifted_ones_back(tmp_path, tiny_fundus):
    strategy, site = _replaying(tmp_path, tiny_fundus, gen_align_weight=1.0)
    strategy.train()
    assert _alignment(strategy).detach().item() == 0.0  # same weights, latents and noise
    with torch.no_grad():
        for p in strategy.g_img.parameters():
            p.add_(0.05 * torch.randn_like(p))
    drifted = _alignment(strategy)
    assert drifted > 0
    drifted.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in strategy.g_img.parameters())
    assert all(p.grad is None for p in strategy.previous.parameters())  # the frozen copies never learn
    assert strategy.g_img.training  # evaluated in eval mode, left as it was
    logs = strategy.training_step(_batch(), _step(site))
    assert "g_align" in logs
    off, site = _replaying(tmp_path / "off", tiny_fundus)
    assert "g_align" not in off.training_step(_batch(), _step(site))  # off by default (the paper)


def test_generator_snapshots_are_spread_over_the_end_of_the_site(tmp_path, tiny_fundus):
    strategy, site = _replaying(tmp_path, tiny_fundus, generator_snapshots=3, snapshot_window=0.5, num_stages=1)
    site.budget_steps = 12  # the last 6 batches; the final one (11) is always a candidate
    assert [t for t in range(12) if strategy._snapshot_due(_step(site, index=t))] == [5, 7, 9]
    off, site = _replaying(tmp_path / "off", tiny_fundus)
    site.budget_steps = 12
    assert not any(off._snapshot_due(_step(site, index=t)) for t in range(12))  # off by default (the paper)
    whole, site = _replaying(tmp_path / "whole", tiny_fundus, generator_snapshots=2, snapshot_window=1.0, num_stages=1)
    site.budget_steps = 10
    assert [t for t in range(10) if whole._snapshot_due(_step(site, index=t))] == [0, 4]  # the earliest was at batch -1: lost
    merged, site = _replaying(tmp_path / "merged", tiny_fundus, generator_snapshots=4, num_stages=2)
    site.budget_steps = 100  # the merge is at batch 50: the earliest candidate (49) would be unmerged
    assert [t for t in range(100) if merged._snapshot_due(_step(site, index=t))] == [50, 61, 74, 87]


def test_snapshot_selection_keeps_the_generators_whose_weakest_site_scores_best(tmp_path, tiny_fundus, monkeypatch):
    strategy, site = _replaying(tmp_path, tiny_fundus, generator_snapshots=2)
    taken = []
    for batch in (1, 2):
        with torch.no_grad():
            for p in strategy.g_img.parameters():
                p.add_(1.0)
        strategy._take_generator_snapshot(batch)
        taken.append({n: p.detach().clone() for n, p in strategy.g_img.named_parameters()})
    with torch.no_grad():
        for p in strategy.g_img.parameters():
            p.add_(1.0)  # the final weights differ from both snapshots
    # per candidate (batch 1, batch 2, final), per site (A, B): weakest 0.2, 0.5, 0.4
    scores = iter([[0.9, 0.2], [0.5, 0.6], [0.7, 0.4]])
    monkeypatch.setattr(strategy, "_score_generators", lambda sites: (sites == ["A", "B"] or pytest.fail(str(sites))) and next(scores))
    strategy.on_site_end(site)
    for n, p in strategy.g_img.named_parameters():
        assert torch.equal(p, taken[1][n])
    assert strategy.site_summary() == {
        "snapshot/chosen_batch": 2.0,
        "snapshot/weakest_site_score_chosen": 0.5,
        "snapshot/weakest_site_score_final": 0.4,
    }


def test_snapshot_selection_scores_with_the_sites_solver_and_leaves_the_random_stream_alone(tmp_path, tiny_fundus):
    strategy, site = _replaying(tmp_path, tiny_fundus, generator_snapshots=1, snapshot_samples=4)
    strategy._take_generator_snapshot(0)  # candidate 0: the weights as they are
    with torch.no_grad():
        for p in strategy.g_label.parameters():
            p.mul_(-1.0)  # the final weights: another label generator
    state = torch.get_rng_state()
    strategy.on_site_end(site)
    assert torch.equal(torch.get_rng_state(), state)
    sel = strategy.snapshot_selection
    assert sel["sites"] == ["A", "B"] and sel["batches"] == [0, 3]
    assert len(sel["scores"]) == 2 and all(0.0 <= v <= 1.0 for row in sel["scores"] for v in row)
    assert min(sel["scores"][sel["chosen"]]) == max(min(row) for row in sel["scores"])
    # the kept generators score as they did: same pairs (fixed seeds), same solver
    assert strategy._score_generators(["A", "B"]) == sel["scores"][sel["chosen"]]


def test_generator_moving_average_follows_its_formula_and_leaves_the_site(tmp_path, tiny_fundus):
    """With generator_ema_steps the generators that leave a site are the average of their weights
    after every G step (β = 0.5^(1/h), h ramped up as 0.05·steps); off (the default) there is none."""
    plain, site = _replaying(tmp_path / "plain", tiny_fundus)
    assert plain.generator_ema is None
    strategy, site = _replaying(tmp_path, tiny_fundus, generator_ema_steps=10, gan_steps_per_solver_step=3)
    strategy.gan_step = 100  # ramp-up: h = min(10, 0.05·(step + 1)) = 5.05, 5.1, 5.15, ...
    names = [n for n, _ in strategy.g_img.named_parameters()]
    expected = {n: p.detach().clone() for n, p in strategy.g_img.named_parameters()}
    start = {n: p.clone() for n, p in expected.items()}

    def average(*_):
        beta = 0.5 ** (1 / min(10, 0.05 * (strategy.gan_step + 1)))
        for n, p in strategy.g_img.named_parameters():
            expected[n] = beta * expected[n] + (1 - beta) * p.detach()

    strategy.optimizers[0].register_step_post_hook(average)
    strategy.training_step(_batch(), _step(site))
    strategy.training_step(_batch(), _step(site, index=2))
    raw = {n: p.detach().clone() for n, p in strategy.g_img.named_parameters()}
    strategy.on_site_end(site)
    shipped = dict(strategy.g_img.named_parameters())
    assert strategy.generator_ema is None
    for n in names:
        torch.testing.assert_close(shipped[n].detach(), expected[n], rtol=1e-5, atol=1e-6)
    moved = [n for n in names if not torch.equal(raw[n], start[n])]
    assert moved and any(not torch.allclose(shipped[n], raw[n]) for n in moved)  # not the raw weights


def _train_two_batches(strategy, site, threads):
    """Two batches of the same seed → the threads the networks' forward passes ran in:
    {"solver": solver and distillation teacher, "gan": generators and discriminators}."""
    import threading

    seen = {"solver": [], "gan": []}
    watched = {"solver": (strategy.solver, strategy.previous["solver"]), "gan": (strategy.g_img, strategy.g_label, strategy.d_img, strategy.d_label)}
    handles = [
        m.register_forward_pre_hook(lambda m, args, key=key: seen[key].append(threading.get_ident())) for key, modules in watched.items() for m in modules
    ]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(7)
        for index in (1, 2):
            strategy.training_step(_batch(), _step(site, index))
    finally:
        torch.set_num_threads(before)
        for handle in handles:
            handle.remove()
    return seen


def test_last_gan_step_runs_beside_the_solver_step_with_the_same_results(tmp_path, tiny_fundus):
    import copy
    import threading

    beside, site = _replaying(tmp_path, tiny_fundus)  # with replay augmentation: the solver's batch draws random numbers
    in_turn = copy.deepcopy(beside)
    in_turn.options = in_turn.options.model_copy(update={"overlap_solver_step": False})
    for s in (beside, in_turn):
        s.optimizers = s.configure_optimizers()
    counts = [0, 0, 0]
    for key, opt in enumerate(beside.optimizers):
        opt.register_step_post_hook(lambda *a, key=key: counts.__setitem__(key, counts[key] + 1))
    # beside each other, each part runs with one intra-op thread: one after the other with one
    # thread in all must give the same numbers, random stream included (one G+D step per batch,
    # so every G+D step runs beside a solver step)
    beside_threads = _train_two_batches(beside, site, threads=2)
    in_turn_threads = _train_two_batches(in_turn, site, threads=1)
    assert counts == [2, 2, 2] and beside.gan_step == in_turn.gan_step == 2
    main = threading.get_ident()
    assert len(beside_threads["solver"]) == 4 and set(beside_threads["solver"]) == {main}  # student and teacher, twice
    assert beside_threads["gan"] and main not in beside_threads["gan"]  # the G+D steps in the helper thread
    assert {t for ts in in_turn_threads.values() for t in ts} == {main}
    for (name, a), b in zip(beside.state_dict().items(), in_turn.state_dict().values()):
        if torch.is_tensor(a):
            assert torch.equal(a, b), name
    in_turn.options = in_turn.options.model_copy(update={"overlap_solver_step": "auto"})
    threads = _train_two_batches(in_turn, site, threads=1)  # one thread: nothing to overlap
    assert {t for ts in threads.values() for t in ts} == {main}


def test_the_solver_step_stays_in_the_main_thread_where_the_loop_needs_it(tmp_path, tiny_fundus):
    import dataclasses

    strategy, site = _replaying(tmp_path, tiny_fundus)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert strategy.options.overlap_solver_step == "auto" and strategy._overlaps_solver_step(_step(site), "cpu")
        assert not strategy._overlaps_solver_step(dataclasses.replace(_step(site), unwrapped=None), "cpu")  # DDP, fp16 scaling
        assert not strategy._overlaps_solver_step(_step(site), "cuda")
        torch.set_num_threads(3)  # auto: only with the two threads it was measured with
        assert not strategy._overlaps_solver_step(_step(site), "cpu")
        strategy.options = strategy.options.model_copy(update={"overlap_solver_step": True})
        assert strategy._overlaps_solver_step(_step(site), "cpu")
        torch.set_num_threads(1)
        assert not strategy._overlaps_solver_step(_step(site), "cpu")
        torch.set_num_threads(2)
        strategy.options = strategy.options.model_copy(update={"overlap_solver_step": False})
        assert not strategy._overlaps_solver_step(_step(site), "cpu")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("d_step_fakes", ["fresh", "reuse"])
def test_the_two_gan_pairs_run_side_by_side_with_the_same_results(tmp_path, tiny_fundus, d_step_fakes):
    import copy
    import threading

    # two G+D steps per batch (the first one not beside the solver step), both regularisers due in
    # every step, so each half's every part runs in its thread (the alignment's references are
    # made before the halves, with the caller's threads: other rounding, hence off here)
    kw = {"gan_steps_per_solver_step": 2, "g_reg_interval": 1, "d_reg_interval": 1, "pl_weight": 2.0, "r1_gamma": 1.0, "d_step_fakes": d_step_fakes}
    beside, site = _replaying(tmp_path, tiny_fundus, **kw)
    in_turn = copy.deepcopy(beside)
    in_turn.options = in_turn.options.model_copy(update={"gan_pairs_side_by_side": False, "overlap_solver_step": False})
    for s in (beside, in_turn):
        s.optimizers = s.configure_optimizers()
    pair_threads = {"image": set(), "label": set()}
    handles = [
        m.register_forward_pre_hook(lambda m, args, key=key: pair_threads[key].add(threading.get_ident()))
        for key, modules in (("image", (beside.g_img, beside.d_img)), ("label", (beside.g_label, beside.d_label)))
        for m in modules
    ]
    # side by side each half runs with one intra-op thread: in turn with one thread in all must
    # give the same numbers, random draws included
    _train_two_batches(beside, site, threads=2)
    for handle in handles:
        handle.remove()
    _train_two_batches(in_turn, site, threads=1)
    assert beside.gan_step == in_turn.gan_step == 4
    main = threading.get_ident()
    assert main in pair_threads["image"] and pair_threads["label"] - {main}  # the label pair in a helper thread
    for (name, a), b in zip(beside.state_dict().items(), in_turn.state_dict().values()):
        if torch.is_tensor(a):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("mode, forwards_per_step", [("reuse", 1), ("fresh", 2)])
def test_a_d_step_reusing_fakes_trains_on_the_g_steps_without_generating(tmp_path, tiny_fundus, monkeypatch, mode, forwards_per_step):
    """d_step_fakes: reuse: the D step's fakes and label maps are the G step's (so each generator
    runs once per G+D step instead of twice); fresh: new ones from the updated generators."""
    from relaylearn.models.gan import loss as gan_loss

    strategy, site = _replaying(tmp_path, tiny_fundus, d_step_fakes=mode, overlap_solver_step=False, gan_pairs_side_by_side=False)
    made, seen = {}, {}
    g_image, g_label = gan_loss.generator_loss_image, gan_loss.generator_loss_label
    d_image, d_label = gan_loss.discriminator_loss_image, gan_loss.discriminator_loss_label
    monkeypatch.setattr(gan_loss, "generator_loss_image", lambda *a: made.setdefault("image", g_image(*a)))
    monkeypatch.setattr(gan_loss, "generator_loss_label", lambda *a: made.setdefault("label", g_label(*a)))
    monkeypatch.setattr(gan_loss, "discriminator_loss_image", lambda nets, im, seg, fake, *a: (seen.update(image=fake), d_image(nets, im, seg, fake, *a))[1])
    monkeypatch.setattr(gan_loss, "discriminator_loss_label", lambda nets, seg, fake, *a: (seen.update(label=fake), d_label(nets, seg, fake, *a))[1])
    calls = {"g_img": 0, "g_label": 0}
    for key in calls:
        getattr(strategy, key).register_forward_pre_hook(lambda m, args, key=key: calls.__setitem__(key, calls[key] + 1))
    strategy.training_step(_batch(), _step(site))
    assert calls == {"g_img": forwards_per_step, "g_label": forwards_per_step}
    assert [torch.equal(seen[k], made[k][1].detach()) for k in ("image", "label")] == [mode == "reuse"] * 2
    assert not seen["image"].requires_grad and not seen["label"].requires_grad


def test_reusing_fakes_needs_one_mixed_batch_per_gan_step(tmp_path, tiny_fundus):
    with pytest.raises(ConfigError, match=r"common\.strategy\.kwargs: d_step_fakes: reuse needs replay_once_per_batch") as raised:
        _strategy(tmp_path, tiny_fundus, d_step_fakes="reuse", replay_once_per_batch=False)
    assert "Value error" not in str(raised.value)


def test_the_halves_of_a_gan_step_sum_to_its_loss_and_draw_their_own_numbers(tmp_path, tiny_fundus):
    import copy

    strategy, site = _replaying(tmp_path, tiny_fundus, g_reg_interval=1, pl_weight=2.0, gen_align_weight=1.0)
    same = copy.deepcopy(strategy)  # the halves update state (path-length means, ADA statistics)
    images, labels = _batch()
    ids = torch.zeros(8, dtype=torch.long)
    torch.manual_seed(3)
    image_half, label_half = strategy._generator_halves(labels, ids, do_pl=True)
    label_first = label_half(), image_half()  # the order does not change what each half draws
    torch.manual_seed(3)
    loss, logs = same._generator_loss(labels, ids, do_pl=True)
    assert torch.allclose(loss, label_first[0][0] + label_first[1][0])
    assert torch.equal(logs["g_img"], label_first[1][1]["g_img"]) and torch.equal(logs["g_label"], label_first[0][1]["g_label"])
    assert torch.allclose(logs["g_align"], label_first[0][1]["g_align"] + label_first[1][1]["g_align"])
    assert torch.allclose(logs["pl_penalty"], label_first[0][1]["pl_penalty"] + label_first[1][1]["pl_penalty"])
    torch.manual_seed(3)
    _, in_turn = same._discriminator_loss(images, labels, ids, do_r1=True)
    torch.manual_seed(3)
    d_image, d_label = strategy._discriminator_halves(images, labels, ids, do_r1=True)
    swapped = d_label()[1], d_image()[1]
    assert torch.allclose(in_turn["r1_penalty"], swapped[0]["r1_penalty"] + swapped[1]["r1_penalty"])
    assert torch.equal(in_turn["d_img"], swapped[1]["d_img"]) and torch.equal(in_turn["d_label"], swapped[0]["d_label"])


def test_gan_pairs_run_side_by_side_only_where_the_loop_allows_a_helper_thread(tmp_path, tiny_fundus):
    import dataclasses

    strategy, site = _replaying(tmp_path, tiny_fundus)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        setting = strategy.options.gan_pairs_side_by_side
        assert setting == "auto" and strategy._runs_beside(setting, _step(site), "cpu")
        assert not strategy._runs_beside(setting, dataclasses.replace(_step(site), unwrapped=None), "cpu")
        assert not strategy._runs_beside(setting, _step(site), "cuda")
        torch.set_num_threads(3)
        assert not strategy._runs_beside(setting, _step(site), "cpu") and strategy._runs_beside(True, _step(site), "cpu")
        assert not strategy._runs_beside(False, _step(site), "cpu")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "bad",
    [
        {"ada_interval": 0},
        {"ada_kimg": 0},
        {"g_lr": -1.0},
        {"d_lr": 0},
        {"solver_lr": 0},
        {"distil_tau": 0},
        {"style_mixing_prob": 1.5},
        {"g_betas": [0.0, 1.0]},
    ],
)
def test_options_that_would_fail_inside_training_are_config_errors(bad):
    """Each of these used to pass validation and fail later (Adam, ADA) as an internal error."""
    from relaylearn.strategies import get_strategy_class
    from relaylearn.strategies.base import parse_options

    with pytest.raises(ConfigError, match=next(iter(bad))):
        parse_options(get_strategy_class("relay"), bad)


def test_adam_betas_of_the_solver_are_bounded(tmp_path, tiny_fundus):
    from relaylearn.config import load_config
    from tests.conftest import tiny_config

    with pytest.raises(ConfigError, match=r"train\.optimizer\.betas"):
        load_config(str(tiny_config(tmp_path, tiny_fundus)), ["train.optimizer.betas=[0.9, 1.0]"])


def test_snapshot_scores_leave_out_the_ct_helper_classes(tmp_path, tiny_fundus, monkeypatch):
    """With add_bg_label the tumour is class 2: the snapshot choice scores it alone, as the metrics do."""
    from types import SimpleNamespace

    from relaylearn import replay_fidelity
    from relaylearn.config import DatasetConfig

    strategy, _ = _replaying(tmp_path, tiny_fundus)
    kwargs = strategy.config.dataset.kwargs.model_copy(update={"add_bg_label": True})
    strategy.config = strategy.config.model_copy(update={"dataset": DatasetConfig(name="ct_nifti", kwargs=kwargs)})
    seen = []
    monkeypatch.setattr(replay_fidelity, "replay_fidelity", lambda *a, **k: seen.append(k["first_class"]) or SimpleNamespace(fidelity=0.5))
    assert strategy._score_generators(["A"]) == [0.5] and seen == [2]


@pytest.mark.parametrize("faithful", [False, True])
def test_ada_faithful_hue_saturation_reaches_the_image_pipe(tmp_path, tiny_fundus, faithful):
    strategy, _ = _strategy(tmp_path, tiny_fundus, ada_img="c", ada_faithful_hue_saturation=faithful)
    pipe = strategy.ada_img
    assert pipe.faithful_hue_saturation is faithful and not strategy.ada_label.faithful_hue_saturation
    with torch.no_grad():
        pipe.p.fill_(1.0)
        x = torch.rand(16, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
        torch.manual_seed(1)
        y = pipe(x)

    def chroma(t):  # the RGB part off the luma axis
        return (t[:, :3] - t[:, :3].mean(dim=1, keepdim=True)).flatten(1)

    # brightness, contrast and luma flip keep the chroma direction (up to sign); hue and saturation turn it
    kept = torch.nn.functional.cosine_similarity(chroma(y), chroma(x)).abs()
    assert bool((kept > 1 - 1e-4).all()) is faithful


def test_distribution_selection_weighs_sites_by_their_stage_one_images_counted_with_repetition(tmp_path, tiny_fundus):
    # as documented: the first site (no merge) counts its whole budget, later sites the half before the merge
    from relaylearn.strategies.base import StepContext

    strategy, _ = _strategy(tmp_path, tiny_fundus, num_stages=2, replay_site_selection="distribution", overlap_solver_step=False)
    strategy._gan_step = lambda *a, **k: {}
    strategy._solver_step = lambda *a, **k: {}
    strategy._solver_batch = lambda images, labels, mixes: (images, labels, images.shape[0])
    for position, name in enumerate(["A", "B", "C"]):
        site = _site(name, position, n=8, steps=10)  # the same 8 images and 10 batches of 4 per site
        strategy.on_site_start(site)
        strategy.optimizers = strategy.configure_optimizers()
        for i in range(10):
            strategy.training_step(_batch(4), StepContext(step=i, global_step=i, epoch=0, site=site))
        strategy.on_site_end(site)
    assert {k: v["frequency"] for k, v in strategy.registry_previous.items()} == {"A": 40, "B": 20, "C": 20}
    ids, weights = strategy._bank("previous")
    assert torch.allclose(weights / weights.sum(), torch.tensor([0.5, 0.25, 0.25]))
