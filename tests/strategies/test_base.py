"""The strategy contract (optional hooks declared on the base class with defaults) and
``Strategy.optimize`` (``train.gradient_clip`` bounds the gradient norm every optimizer steps with)."""

from __future__ import annotations

import pytest
import torch

from relaylearn.assembly import build_strategy
from relaylearn.config import load_config
from relaylearn.strategies import available_strategies, get_strategy_class
from relaylearn.strategies.base import SiteContext, StepContext, Strategy
from tests.conftest import tiny_config


def _norm_at_step(tmp_path, clip: float) -> float:
    """Total L2 gradient norm the solver's optimizer sees at its step, after one training step."""
    cfg = load_config(str(tiny_config(tmp_path, tmp_path)), [f"train.gradient_clip={clip}", "train.channels_last=false"])
    torch.manual_seed(0)
    strategy = build_strategy(cfg.tasks[0], load_pretrained=False)
    images, labels = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randint(0, 3, (4, 32, 32))
    site = SiteContext(name="A", task_id=1, position=0, num_images=4, num_epochs=1, steps_per_epoch=1, train_images=images, train_labels=labels, batch_size=4)
    strategy.on_site_start(site)
    (optimizer,) = strategy.optimizers = strategy.configure_optimizers()
    seen = []
    optimizer.register_step_pre_hook(
        lambda opt, *_: seen.append(
            float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for g in opt.param_groups for p in g["params"] if p.grad is not None])))
        )
    )
    strategy.training_step((images, labels), StepContext(step=0, global_step=0, epoch=0, site=site))
    return seen[0]


def test_gradient_clip_bounds_the_norm_and_zero_leaves_it(tmp_path):
    unclipped = _norm_at_step(tmp_path, 0.0)
    assert unclipped > 0.05  # the bound below is a real constraint
    clipped = _norm_at_step(tmp_path, 0.01)
    assert clipped <= 0.01 * (1 + 1e-4)
    assert clipped >= 0.0099  # scaled down to the bound, not zeroed


def test_only_strategies_with_generators_replay():
    replaying = {name for name in available_strategies() if get_strategy_class(name).replays()}
    assert replaying == {"relay"}
    assert not Strategy.replays()


def test_default_hooks_of_a_strategy_without_generators(tmp_path, tiny_fundus):
    from relaylearn.assembly import build_strategy
    from relaylearn.config import load_config
    from tests.conftest import tiny_config

    task = load_config(str(tiny_config(tmp_path, tiny_fundus, strategy="ewc"))).tasks[0]
    strategy = build_strategy(task, load_pretrained=False)
    assert strategy.previews(per_site=2) == {}
    with pytest.raises(NotImplementedError, match="does not replay"):
        strategy.generate_replay("Domain1", 2)


def test_a_forward_after_a_step_in_the_same_autocast_region_sees_the_new_weights():
    """Under an autocast region with its cast cache on (Lightning turns it off; benchmarks and
    users' own loops may not), a forward after an optimizer step must use the updated weights,
    not autocast's cached bf16 copy of the old ones (it did before ``step_optimizer``)."""
    from types import SimpleNamespace

    from relaylearn.strategies.sequential import Sequential

    torch.manual_seed(0)
    solver = torch.nn.Linear(4, 4, bias=False)
    strategy = Sequential(Sequential.Options(), solver, SimpleNamespace(train=SimpleNamespace(gradient_clip=0.0, loss=SimpleNamespace(kwargs={}))))
    optimizer = torch.optim.SGD(solver.parameters(), lr=0.5)
    x = torch.ones(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = solver(x)
        strategy.optimize(before.float().square().mean(), optimizer, StepContext(step=0, global_step=0, epoch=0, site=None))
        after = solver(x)
    expected = torch.nn.functional.linear(x.bfloat16(), solver.weight.detach().bfloat16())  # the new weights, cast afresh
    assert (after.float() - before.float()).abs().max() > 0.1  # the step changed the output ...
    torch.testing.assert_close(after, expected)  # ... to what the new weights give


def test_after_optimizer_step_runs_once_after_the_step():
    from types import SimpleNamespace

    from relaylearn.strategies.sequential import Sequential

    seen = []

    class Watching(Sequential):
        def adjust_gradients(self, optimizer, step):
            seen.append(("adjust", self.solver.weight.detach().clone()))

        def after_optimizer_step(self, optimizer, step):
            seen.append(("after", self.solver.weight.detach().clone()))

    solver = torch.nn.Linear(2, 1, bias=False)
    strategy = Watching(Sequential.Options(), solver, SimpleNamespace(train=SimpleNamespace(gradient_clip=0.0, loss=SimpleNamespace(kwargs={}))))
    optimizer = torch.optim.SGD(solver.parameters(), lr=0.5)
    strategy.optimize(solver(torch.ones(1, 2)).sum(), optimizer, StepContext(step=0, global_step=0, epoch=0, site=None))
    assert [kind for kind, _ in seen] == ["adjust", "after"]
    assert torch.equal(seen[1][1], seen[0][1] - 0.5), "the hook sees the stepped weights"


class ToyReplay(get_strategy_class("sequential")):
    """A replaying plug-in that overrides only ``generate_replay`` (as the README says a
    replaying strategy does): noise images with empty masks."""

    name = "toy_replay"

    def generate_replay(self, site, n, seed=0, batch_size=64):
        g = torch.Generator().manual_seed(seed)
        return torch.rand(n, 3, 32, 32, generator=g) * 2 - 1, torch.zeros(n, 32, 32, dtype=torch.long)


def test_a_replaying_plug_in_without_the_audit_hooks_trains_and_is_not_audited(tmp_path, tiny_fundus):
    from relaylearn.runner import TrainOptions, run_training

    cfg = load_config(str(tiny_config(tmp_path, tiny_fundus, strategy="tests.strategies.test_base:ToyReplay")))
    result = run_training(cfg, "t", TrainOptions(quiet=True, exps_root=tmp_path / "exps"))
    assert len(result.matrix["R"]) == 2
    assert not (result.run_dir / "metrics" / "privacy.json").exists(), "replay_sites() is empty: nothing to audit"
    assert (result.run_dir / "metrics" / "replay.json").is_file(), "replay fidelity needs only generate_replay"


def test_a_strategy_file_without_the_decorator_is_found(tmp_path, monkeypatch):
    """Every module of the strategies package that defines a Strategy subclass with its own name
    is found, as the package docstring and the README say."""
    import relaylearn.strategies as package

    (tmp_path / "my_anchor.py").write_text(
        "from relaylearn.strategies.sequential import Sequential\n\n\nclass MyAnchor(Sequential):\n    name = 'my_anchor'\n\n\nclass Helper(MyAnchor):\n    pass\n"
    )
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
    monkeypatch.setattr(package, "_REGISTRY", dict(package._REGISTRY))
    monkeypatch.setattr(package, "_DISCOVERED", False)
    monkeypatch.delitem(__import__("sys").modules, "relaylearn.strategies.my_anchor", raising=False)
    assert get_strategy_class("my_anchor").__name__ == "MyAnchor", "a subclass that inherits the name does not replace it"
    assert "sequential" in available_strategies()


@pytest.mark.parametrize(
    "seen",
    [["Domain1", "bad\x1b[31mname"], ["Domain1", "x" * 300], [f"site{i}" for i in range(1025)], "Domain1"],
    ids=["escape sequence", "too long", "too many", "not a list"],
)
def test_sites_seen_from_a_bundle_are_site_names_and_bounded(tmp_path, tiny_fundus, seen):
    """A signer could pad sites_seen up to the manifest limit (the next hop's manifest then did not fit)."""
    task = load_config(str(tiny_config(tmp_path, tiny_fundus, strategy="sequential"))).tasks[0]
    strategy = build_strategy(task, load_pretrained=False)
    strategy.load_meta({"sites_seen": ["Domain1", "Domain2+Domain3"], "global_step": 3})
    assert strategy.sites_seen == ["Domain1", "Domain2+Domain3"]
    with pytest.raises(ValueError, match="sites_seen: expected a list of at most 1024 site names"):
        strategy.load_meta({"sites_seen": seen, "global_step": 3})
