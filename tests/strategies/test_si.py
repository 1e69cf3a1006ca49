"""Synaptic intelligence: ω against the exact path integral of a quadratic loss under plain SGD,
the penalty's exclusion from g, consolidation, bundle round trip and a 2-site tiny relay."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import make_site, make_step, make_strategy, read_bundle_tensors, relay_two_sites

A = torch.tensor([1.0, 4.0])  # curvatures
CENTRE = torch.tensor([2.0, -1.0])
THETA0 = torch.tensor([0.0, 0.5])
LR = 0.01


class ParameterOnly(nn.Module):
    """A "network" whose output is its parameter θ [2], whatever the input."""

    def __init__(self, theta: torch.Tensor):
        super().__init__()
        self.theta = nn.Parameter(theta.clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.theta


class Quadratic(nn.Module):
    """L(θ) = ½ Σ a (θ − centre)² (labels ignored)."""

    def forward(self, theta: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return 0.5 * (A * (theta - CENTRE) ** 2).sum()


def quadratic_si(**kwargs):
    si = make_strategy("si", ParameterOnly(THETA0), **kwargs)
    si.criterion = Quadratic()
    si.optimizers = [torch.optim.SGD(si.solver.parameters(), lr=LR)]
    return si


BATCH = (torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, dtype=torch.long))
SITE = make_site(*BATCH)


def train(si, steps: int) -> None:
    si.on_site_start(SITE)
    for t in range(steps):
        si.training_step(BATCH, make_step(SITE, t))


@pytest.mark.parametrize("importance", ["path_integral", "squared_gradient"])
def test_omega_on_a_quadratic_with_sgd_matches_the_path_integral(importance):
    steps = 50
    si = quadratic_si(importance=importance, xi=0.1)
    train(si, steps)
    rho = 1 - LR * A  # θ_t − centre = ρ^t (θ0 − centre)
    e0 = THETA0 - CENTRE
    # discrete sum  Σ_t −g_t·Δθ_t = Σ_t lr g_t² = lr a² e0² Σ_t ρ^{2t}
    closed_form = LR * A**2 * e0**2 * (1 - rho ** (2 * steps)) / (1 - rho**2)
    omega = si.running["theta"]
    assert torch.allclose(omega, closed_form, rtol=1e-4)
    # exact line integral of −∇L along the path = L(θ0) − L(θ_T), per parameter
    exact = 0.5 * A * e0**2 * (1 - rho ** (2 * steps))
    assert torch.allclose(omega / exact, 2 / (2 - LR * A), rtol=1e-4)  # first-order error lr·a/2
    assert ((omega - exact).abs() / exact <= LR * A).all()

    theta_end = si.solver.theta.detach().clone()
    si.on_site_end(SITE)
    assert torch.allclose(si.importance["theta"], closed_form / ((theta_end - THETA0) ** 2 + 0.1), rtol=1e-4)
    assert torch.equal(si.anchor["theta"], theta_end)
    assert (si.running["theta"] == 0).all()


def test_path_integral_differs_from_squared_gradient_under_adam():
    omegas = {}
    for importance in ("path_integral", "squared_gradient"):
        si = quadratic_si(importance=importance)
        si.optimizers = [torch.optim.Adam(si.solver.parameters(), lr=LR)]
        train(si, 20)
        omegas[importance] = si.running["theta"].clone()
        theta_end = si.solver.theta.detach()
    # the path integral is the loss decrease of each parameter, whatever the optimizer
    decrease = 0.5 * A * ((THETA0 - CENTRE) ** 2 - (theta_end - CENTRE) ** 2)
    assert torch.allclose(omegas["path_integral"], decrease, rtol=0.02)
    # Adam moves every weight by ≈ lr per step: lr·g² overrates the steep parameter
    assert (omegas["squared_gradient"] > 1.5 * omegas["path_integral"]).all()


def test_gradient_of_the_penalty_is_not_counted_in_omega():
    c = 0.5
    si = quadratic_si(c=c, xi=0.1)
    train(si, 10)
    si.on_site_end(SITE)
    omega_big, anchor = si.importance["theta"].clone(), si.anchor["theta"].clone()
    with torch.no_grad():
        si.solver.theta.add_(torch.tensor([0.3, -0.2]))  # away from the anchor: the penalty pulls back
    theta = si.solver.theta.detach().clone()
    si.on_site_start(SITE)
    logs = si.training_step(BATCH, make_step(SITE))
    task_grad = A * (theta - CENTRE)
    penalty_grad = 2 * c * omega_big * (theta - anchor)
    delta = -LR * (task_grad + penalty_grad)
    assert torch.allclose(si.solver.theta.detach(), theta + delta)
    assert torch.allclose(si.running["theta"], -task_grad * delta, rtol=1e-5)
    assert logs["penalty"].item() == pytest.approx((c * omega_big * (theta - anchor) ** 2).sum().item(), rel=1e-5)


def test_squared_gradient_counts_the_full_gradient_as_the_original_did():
    """``importance: squared_gradient`` is the original's lr·g² with g the gradient of the total
    loss (penalty included) that the step used."""
    c = 0.5
    si = quadratic_si(c=c, xi=0.1, importance="squared_gradient")
    train(si, 10)
    si.on_site_end(SITE)
    omega_big, anchor = si.importance["theta"].clone(), si.anchor["theta"].clone()
    with torch.no_grad():
        si.solver.theta.add_(torch.tensor([0.3, -0.2]))
    theta = si.solver.theta.detach().clone()
    si.on_site_start(SITE)
    si.training_step(BATCH, make_step(SITE))
    full_grad = A * (theta - CENTRE) + 2 * c * omega_big * (theta - anchor)
    assert torch.allclose(si.running["theta"], LR * full_grad**2, rtol=1e-5)


def test_gradient_clipping_shrinks_the_step_not_the_task_gradient_in_omega():
    si = quadratic_si(xi=0.1)
    si.train_cfg = si.train_cfg.model_copy(update={"gradient_clip": 0.05})
    theta = si.solver.theta.detach().clone()
    si.on_site_start(SITE)
    si.training_step(BATCH, make_step(SITE))
    task_grad = A * (theta - CENTRE)
    delta = -LR * task_grad * 0.05 / task_grad.norm()  # the clipped step
    assert torch.allclose(si.solver.theta.detach(), theta + delta, atol=1e-7)
    assert torch.allclose(si.running["theta"], -task_grad * delta, rtol=1e-4)


class SkipsNonFinite(torch.optim.SGD):
    """SGD that skips a step whose gradients are not finite, as the 16-mixed loss scaler does."""

    def step(self, closure=None):
        if all(torch.isfinite(p.grad).all() for group in self.param_groups for p in group["params"] if p.grad is not None):
            super().step(closure)


@pytest.mark.parametrize("importance", ["path_integral", "squared_gradient"])
def test_a_step_skipped_for_inf_gradients_adds_nothing_to_omega(importance):
    from relaylearn.strategies.base import StepContext

    def overflowing_backward(loss):
        loss.backward()
        si.solver.theta.grad[0] = float("inf")

    si = quadratic_si(importance=importance)
    si.optimizers = [SkipsNonFinite(si.solver.parameters(), lr=LR)]
    si.on_site_start(SITE)
    si.training_step(BATCH, StepContext(step=0, global_step=0, epoch=0, site=SITE, backward=overflowing_backward, sanitize=False))
    assert torch.equal(si.solver.theta.detach(), THETA0), "the step was skipped"
    assert torch.isfinite(si.running["theta"]).all()
    assert si.running["theta"][0] == 0


def test_bundle_round_trip_keeps_omega_and_anchor_not_the_running_sum():
    si = quadratic_si()
    train(si, 5)
    si.on_site_end(SITE)
    state = si.state_to_bundle()
    assert set(state.tensors) == {"solver.theta", "si_omega.theta", "si_anchor.theta"}
    again = quadratic_si()
    again.state_from_bundle(state)
    assert torch.equal(again.importance["theta"], si.importance["theta"])
    assert torch.equal(again.anchor["theta"], si.anchor["theta"])
    again.on_site_start(SITE)  # the anchor from the bundle is kept (it is where this site starts)
    assert torch.equal(again.anchor["theta"], si.solver.theta.detach())


def test_unknown_importance_is_a_config_error():
    from relaylearn.errors import ConfigError

    with pytest.raises(ConfigError, match="importance"):
        quadratic_si(importance="fisher")


@pytest.mark.slow
def test_two_site_relay_ships_omega_and_anchor(tmp_path, tiny_fundus):
    result = relay_two_sites(tmp_path, tiny_fundus, "si")
    first, second = (read_bundle_tensors(p) for p in result.bundles)
    omegas = [k for k in first if k.startswith("si_omega.")]
    assert omegas and not any(k.startswith("si_running") for k in first)
    assert any((first[k] > 0).any() for k in omegas), "two Adam steps give some importance"
    for k in omegas:
        assert (second[k] >= first[k]).all(), "Ω only grows"
        param = k[len("si_omega.") :]
        assert torch.equal(second[f"si_anchor.{param}"], second[f"solver.{param}"])
