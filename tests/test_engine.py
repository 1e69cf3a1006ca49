"""relaylearn.engine speed settings: every network runs in channels_last (the relay's GANs with
their weights in that layout, also the frozen copies made at site start; the solver through its
input, with its weights in the default layout), and the solver's Adam honours ``train.optimizer.fused``."""

from __future__ import annotations

import torch

from relaylearn.assembly import build_strategy
from relaylearn.config import load_config
from relaylearn.engine import SiteModule, lightning_strategy, prepare_networks, quiet_lightning
from relaylearn.strategies.base import SiteContext, StepContext
from tests.conftest import TINY, tiny_config


def _conv_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.ndim == 4 and p.shape[-1] > 1 and p.shape[1] > 1]


def test_channels_last_reaches_the_gans_and_the_copies_made_at_site_start(tmp_path):
    cfg = load_config(str(tiny_config(tmp_path, tmp_path, strategy="relay", strategy_kwargs=TINY)))
    task = cfg.tasks[0]
    strategy = build_strategy(task, load_pretrained=False)
    prepare_networks(strategy, task.train)
    for name in ("g_img", "g_label", "d_img", "d_label"):
        weights = _conv_weights(getattr(strategy, name))
        assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights), name
    assert all(w.is_contiguous() for w in _conv_weights(strategy.solver))  # fused Adam needs no copies
    solver_inputs = []
    strategy.solver.register_forward_pre_hook(lambda m, args: solver_inputs.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    images, labels = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randint(0, 3, (4, 32, 32))
    for position, site_name in enumerate(("A", "B")):
        site = SiteContext(
            name=site_name,
            task_id=position + 1,
            position=position,
            num_images=4,
            num_epochs=1,
            steps_per_epoch=2,
            train_images=images,
            train_labels=labels,
            batch_size=4,
        )
        strategy.on_site_start(site)
        strategy.optimizers = strategy.configure_optimizers()
        for step in range(2):  # the second step of site B replays (mid-site switch)
            logs = strategy.training_step(
                (images.contiguous(memory_format=torch.channels_last), labels), StepContext(step=step, global_step=step, epoch=0, site=site)
            )
            assert torch.isfinite(logs["loss"])
        if position == 1:
            assert strategy.replaying
            assert solver_inputs and all(solver_inputs)  # replay mixed in, the solver still runs in channels_last
            assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(strategy.previous["g_img"]))
        strategy.on_site_end(site)


def test_channels_last_off_leaves_the_networks_alone(tmp_path):
    cfg = load_config(str(tiny_config(tmp_path, tmp_path, strategy="relay", strategy_kwargs=TINY)), ["train.channels_last=false"])
    strategy = build_strategy(cfg.tasks[0], load_pretrained=False)
    prepare_networks(strategy, cfg.tasks[0].train)
    assert all(w.is_contiguous() for w in _conv_weights(strategy.g_img) + _conv_weights(strategy.solver))


def test_the_solver_optimizer_follows_train_optimizer_fused(tmp_path):
    for fused in (True, False):
        cfg = load_config(str(tiny_config(tmp_path, tmp_path)), [f"train.optimizer.fused={str(fused).lower()}"])
        (optimizer,) = build_strategy(cfg.tasks[0], load_pretrained=False).configure_optimizers()
        assert bool(optimizer.param_groups[0]["fused"]) is fused


def test_train_compile_compiles_the_solver_in_place_with_the_same_output(tmp_path):
    """``train.compile``: the solver runs compiled (here a small stand-in network, to keep the test
    fast) with the eager output, the same state-dict names, and gradients for training."""
    cfg = load_config(str(tiny_config(tmp_path, tmp_path)), ["train.compile=true", "train.channels_last=false"])
    strategy = build_strategy(cfg.tasks[0], load_pretrained=False)
    torch.manual_seed(0)
    strategy.solver = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 1))
    images = torch.rand(2, 3, 16, 16)
    eager = strategy.solver(images).detach()
    names = list(strategy.solver.state_dict())
    prepare_networks(strategy, cfg.tasks[0].train)
    assert strategy.solver._compiled_call_impl is not None
    compiled = strategy.solver(images)
    torch.testing.assert_close(compiled.detach(), eager, rtol=1e-4, atol=1e-5)
    compiled.sum().backward()
    assert all(p.grad is not None for p in strategy.solver.parameters())
    assert list(strategy.solver.state_dict()) == names


def test_train_compile_off_leaves_the_solver_eager(tmp_path):
    cfg = load_config(str(tiny_config(tmp_path, tmp_path)))
    strategy = build_strategy(cfg.tasks[0], load_pretrained=False)
    prepare_networks(strategy, cfg.tasks[0].train)
    assert strategy.solver._compiled_call_impl is None


def test_a_relay_trained_through_the_loop_with_two_threads_overlaps_its_solver_step_deterministically(tmp_path, tiny_fundus, monkeypatch):
    """Under Lightning, on the CPU with two threads, the last G+D step of each batch runs in the
    helper thread (bare optimizers, plain backward) beside the solver step; the same seed gives
    the same bundle."""
    import relaylearn.strategies.relay as relay
    from relaylearn.bundle import read_bundle
    from relaylearn.runner import TrainOptions, run_training

    calls = []
    real = relay.run_beside
    monkeypatch.setattr(relay, "run_beside", lambda main, side: (calls.append(1), real(main, side))[1])
    path = tiny_config(tmp_path, tiny_fundus, strategy="relay", task_ids=(1, 2), steps=3, strategy_kwargs=TINY)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = [run_training(load_config(str(path)), f"run{i}", TrainOptions(quiet=True, exps_root=tmp_path / "exps", devices="cpu")) for i in (0, 1)]
    finally:
        torch.set_num_threads(before)
    assert len(calls) == 2 * 2 * 3  # two runs, two sites, three batches each
    first, second = (read_bundle(r.bundles[-1], trust=None, allow_unsigned=True) for r in runs)
    assert [name for name in first.tensors if not torch.equal(first.tensors[name], second.tensors[name])] == []
    assert runs[0].matrix["R"] == runs[1].matrix["R"]


def test_a_relay_under_ddp_lets_lightning_find_the_parameters_a_step_leaves_unused(tmp_path):
    """Plain DDP stops a relay at its first batch (each G, D or solver step leaves the other
    networks without gradients): auto with several processes and ddp become
    ddp_find_unused_parameters_true for it; a strategy that uses all its parameters keeps them."""
    cfg = load_config(str(tiny_config(tmp_path, tmp_path, strategy="relay", strategy_kwargs=TINY)))
    relay = build_strategy(cfg.tasks[0], load_pretrained=False)
    sequential = build_strategy(load_config(str(tiny_config(tmp_path, tmp_path))).tasks[0], load_pretrained=False)
    unused = "ddp_find_unused_parameters_true"
    assert [lightning_strategy(name, relay, 2) for name in ("auto", "ddp", unused)] == [unused, unused, unused]
    assert [lightning_strategy(name, relay, 1) for name in ("auto", "ddp")] == ["auto", unused]
    assert [lightning_strategy(name, sequential, 2) for name in ("auto", "ddp", unused)] == ["auto", "ddp", unused]


def test_each_rank_resumes_with_its_own_random_stream_and_state(tmp_path, monkeypatch):
    """Under DDP each rank draws its own random numbers and keeps its own buffers and extra state
    (BatchNorm statistics, the relay's replay stock seed): the local checkpoint holds every rank's,
    and a resumed rank continues from its own, not from rank 0's modules in the file nor from the
    site start's random state. This process plays both ranks through the checkpoint hooks."""
    import pickle
    from types import SimpleNamespace

    cfg = load_config(str(tiny_config(tmp_path, tmp_path, strategy="relay", strategy_kwargs=TINY)))
    strategy = build_strategy(cfg.tasks[0], load_pretrained=False)
    norm = next(m for m in strategy.solver.modules() if isinstance(m, torch.nn.BatchNorm2d))
    module = SiteModule(strategy, SimpleNamespace(steps_per_epoch=6, total_steps=6))
    monkeypatch.setattr(module, "optimizers", lambda: [])
    saved = []

    def gather(out: list, mine) -> None:  # pickled across ranks; rank 1 saves last and gets both
        saved.append(pickle.loads(pickle.dumps(mine)))
        out[:] = (saved + saved[-1:] * len(out))[: len(out)]

    monkeypatch.setattr(torch.distributed, "all_gather_object", gather)

    def be_rank(rank: int) -> None:
        batches = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(current=SimpleNamespace(ready=3))))
        module.trainer = SimpleNamespace(world_size=2, global_rank=rank, current_epoch=0, fit_loop=batches)
        torch.manual_seed(100 + rank)
        norm.running_mean.fill_(rank)
        strategy._stock_seed = 1000 + rank

    checkpoint: dict = {}
    for rank in (0, 1):
        be_rank(rank)
        module.on_save_checkpoint(checkpoint)  # rank 1's dict holds what rank 0 writes (the same gathered list)
    expected_draws = torch.rand(4)  # rank 1's next draws

    be_rank(0)  # what Lightning loads from the file: rank 0's modules; the site start's random state
    module.trainer.global_rank = 1
    module.on_load_checkpoint(checkpoint)
    module.on_train_start()
    assert torch.equal(torch.rand(4), expected_draws)
    assert strategy._stock_seed == 1001 and float(norm.running_mean[0]) == 1.0
    assert module.resumed_at == 3


def test_ddp_stride_warnings_of_one_by_one_kernels_are_quiet():
    """DDP's reducer warns when a gradient's strides differ from its bucket's: the solver's 1x1
    convolutions, whose weights are in the default layout, get channels_last-strided gradients
    from channels_last inputs; for a 1x1 kernel both strides order the elements the same, so
    it is noise (a 3x3 kernel's warning still shows)."""
    import warnings

    def warning(size: str) -> str:
        return (
            "Grad strides do not match bucket view strides. This may indicate grad was not created according to the gradient layout contract\n"
            f"grad.sizes() = [{size}], strides() = [64, 1, 64, 64]\nbucket_view.sizes() = [{size}], strides() = [64, 1, 1, 1]"
        )

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        quiet_lightning()
        warnings.warn(warning("3, 64, 1, 1"), UserWarning, stacklevel=1)
        warnings.warn(warning("3, 64, 3, 3"), UserWarning, stacklevel=1)
    assert [str(w.message).splitlines()[1][:30] for w in shown] == ["grad.sizes() = [3, 64, 3, 3], "]


def test_evaluate_site_refuses_test_data_with_other_classes_than_the_model_predicts(tmp_path):
    """A class the model cannot predict would count Dice 1.0 on every image without it."""
    from types import SimpleNamespace

    import pytest

    from relaylearn.engine import evaluate_site
    from relaylearn.errors import UserError

    cfg = load_config(str(tiny_config(tmp_path, tmp_path)))
    solver = build_strategy(cfg.tasks[0], load_pretrained=False).solver  # 3 classes
    data = SimpleNamespace(images=torch.zeros(2, 3, 32, 32), labels=torch.zeros(2, 32, 32, dtype=torch.long), names=["a", "b"])
    with pytest.raises(UserError, match="the test data has 4 classes but the model predicts 3"):
        evaluate_site(solver, data, num_classes=4, batch_size=2, bootstrap=10)
    assert evaluate_site(solver, data, num_classes=3, batch_size=2, bootstrap=10)["per_image"]
