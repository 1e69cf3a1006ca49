"""Online EWC: the per-sample Fisher and the penalty on a hand-computed 2-parameter model; bundle
round trip; a 2-site tiny relay."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from relaylearn.errors import ConfigError
from relaylearn.strategies.base import parse_options
from relaylearn.strategies.ewc import EWC
from tests.conftest import make_site, make_step, make_strategy, read_bundle_tensors, relay_two_sites

# (importing one strategy module directly before the others is harmless: the registry discovers
# every built-in strategy once, on first use, whatever was imported before; see ``_DISCOVERED`` in
# relaylearn/strategies/__init__.py)


# ----- a 2-parameter model: out = w1·x1 + w2·x2, loss = ½ (out − y)² ------------------------------
X = torch.tensor([[1.0, 2.0], [0.0, 1.0], [3.0, -1.0]]).reshape(3, 2, 1, 1)
Y = torch.tensor([1, 0, 2]).reshape(3, 1, 1)


class HalfSquaredError(nn.Module):
    """½ · mean (out[:, 0] − y)² for outputs [B,1,H,W] and integer targets [B,H,W]."""

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((out[:, 0] - y.float()) ** 2).mean()


def two_parameter_ewc(w=(0.5, -1.0), **kwargs) -> EWC:
    solver = nn.Conv2d(2, 1, 1, bias=False)
    with torch.no_grad():
        solver.weight.copy_(torch.tensor(w).reshape(1, 2, 1, 1))
    ewc = make_strategy("ewc", solver, **kwargs)
    ewc.criterion = HalfSquaredError()
    return ewc


def test_fisher_is_the_mean_squared_per_sample_gradient():
    ewc = two_parameter_ewc()
    # residuals w·x − y: −2.5, −1, 0.5 → gradients (−2.5, −5), (0, −1), (1.5, −0.5)
    fisher = ewc.estimate_fisher(make_site(X, Y))["weight"].flatten()
    assert torch.allclose(fisher, torch.tensor([(6.25 + 0 + 2.25) / 3, (25 + 1 + 0.25) / 3]))
    assert ewc.solver.weight.grad is None, "the Fisher must not leave gradients behind"


def test_fisher_uses_at_most_fisher_samples_images():
    ewc = two_parameter_ewc(fisher_samples=2)
    fisher = ewc.estimate_fisher(make_site(X, Y))["weight"].flatten()
    squared = torch.tensor([[6.25, 25.0], [0.0, 1.0], [2.25, 0.25]])
    pair_means = [(squared[i] + squared[j]) / 2 for i, j in ((0, 1), (0, 2), (1, 2))]
    assert any(torch.allclose(fisher, m) for m in pair_means)


def test_online_fisher_penalty_and_its_gradient():
    ewc = two_parameter_ewc(lambda_=2.0, gamma=0.5)
    site = make_site(X, Y)
    ewc.on_site_end(site)
    f1 = torch.tensor([8.5 / 3, 26.25 / 3])
    assert torch.allclose(ewc.importance["weight"].flatten(), f1)
    assert torch.equal(ewc.anchor["weight"].flatten(), torch.tensor([0.5, -1.0]))
    assert ewc.sites_seen == ["A"]

    with torch.no_grad():
        ewc.solver.weight.copy_(torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1))
    penalty = ewc.penalty()  # λ/2 Σ F (θ − θ*)² = (2.8333·0.25 + 8.75·1)
    assert penalty.item() == pytest.approx(f1[0].item() * 0.25 + f1[1].item() * 1.0, rel=1e-6)
    penalty.backward()  # λ F (θ − θ*)
    assert torch.allclose(ewc.solver.weight.grad.flatten(), 2.0 * f1 * torch.tensor([0.5, 1.0]))

    # second site end at w = (1, 0): residuals 0, 0, 1 → gradients 0, 0, (3, −1)
    ewc.solver.weight.grad = None
    ewc.on_site_end(site)
    assert torch.allclose(ewc.importance["weight"].flatten(), 0.5 * f1 + torch.tensor([3.0, 1 / 3]))
    assert torch.equal(ewc.anchor["weight"].flatten(), torch.tensor([1.0, 0.0]))
    assert ewc.penalty().item() == 0.0


def test_training_step_adds_the_penalty_only_after_a_site():
    ewc = two_parameter_ewc(lambda_=1.0)
    site = make_site(X, Y)
    assert "penalty" not in ewc.training_step((X, Y), make_step(site))
    ewc.on_site_end(site)
    with torch.no_grad():
        ewc.solver.weight.add_(0.1)
    logs = ewc.training_step((X, Y), make_step(site))
    assert logs["penalty"].item() > 0


def test_bundle_round_trip():
    ewc = two_parameter_ewc()
    ewc.on_site_end(make_site(X, Y))
    state = ewc.state_to_bundle()
    assert set(state.tensors) == {"solver.weight", "ewc_fisher.weight", "ewc_anchor.weight"}
    again = two_parameter_ewc(w=(0.0, 0.0))
    again.state_from_bundle(state)
    assert torch.equal(again.importance["weight"], ewc.importance["weight"])
    assert torch.equal(again.anchor["weight"], ewc.anchor["weight"])
    assert again.sites_seen == ["A"]
    bad = dict(state.tensors, **{"ewc_fisher.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="ewc_fisher.weight"):
        two_parameter_ewc().state_from_bundle(type(state)(tensors=bad, meta=state.meta))


def test_options_accept_lambda_and_reject_unknown_keys():
    assert parse_options(EWC, {"lambda": 5}).lambda_ == 5.0
    assert parse_options(EWC, {"lambda_": 7, "gamma": 0.9}).lambda_ == 7.0
    with pytest.raises(ConfigError, match="lamda"):
        parse_options(EWC, {"lamda": 5})
    with pytest.raises(ConfigError, match="gamma"):
        parse_options(EWC, {"gamma": 1.5})


@pytest.mark.slow
def test_two_site_relay_ships_fisher_and_anchor(tmp_path, tiny_fundus):
    result = relay_two_sites(tmp_path, tiny_fundus, "ewc", fisher_samples=3)
    assert len(result.matrix["R"]) == 2
    first, second = (read_bundle_tensors(p) for p in result.bundles)
    assert any(k.startswith("ewc_fisher.") for k in first)
    for name, fisher in first.items():
        if name.startswith("ewc_fisher."):
            param = name[len("ewc_fisher.") :]
            assert torch.equal(first[f"ewc_anchor.{param}"], first[f"solver.{param}"])
            assert (second[name] >= fisher - 1e-6).all(), "γ = 1: the Fisher only accumulates"
    matrix = json.loads((result.run_dir / "metrics" / "matrix.json").read_text())
    assert matrix["trained"] == ["Domain1", "Domain2"]
