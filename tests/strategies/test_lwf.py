"""Learning without Forgetting: the distillation term, the frozen teacher, the bundle and a
2-site tiny relay."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from relaylearn.losses import distillation_loss
from relaylearn.strategies.lwf import distillation_divergence
from tests.conftest import make_site, make_step, make_strategy, read_bundle_tensors, relay_two_sites

IMAGES = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
LABELS = torch.randint(0, 3, (4, 8, 8), generator=torch.Generator().manual_seed(1))


def tiny_solver() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1))


def test_divergence_is_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(2, 3, 5, 5)
    assert distillation_divergence(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_divergence(logits, logits + 5.0).item() == pytest.approx(0.0, abs=1e-6), "softmax is shift-invariant"
    other = torch.randn(2, 3, 5, 5)
    assert distillation_divergence(logits, other).item() > 1e-3
    assert distillation_divergence(logits, other, tau=2.0, tau_squared=True).item() == pytest.approx(
        4 * distillation_divergence(logits, other, tau=2.0).item(), rel=1e-5
    )


def test_divergence_has_the_gradient_of_the_soft_target_cross_entropy():
    student = torch.randn(2, 3, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 4)
    (g_kl,) = torch.autograd.grad(distillation_divergence(student, teacher, tau=3.0), student)
    (g_ce,) = torch.autograd.grad(distillation_loss(student, teacher, tau=3.0), student)
    assert torch.allclose(g_kl, g_ce, atol=1e-7)


def test_no_teacher_at_the_first_site():
    lwf = make_strategy("lwf", tiny_solver())
    site = make_site(IMAGES, LABELS, position=0)
    lwf.on_site_start(site)
    assert lwf.teacher is None
    assert "distillation" not in lwf.training_step((IMAGES, LABELS), make_step(site))


def test_teacher_is_a_frozen_copy_and_distillation_starts_at_zero():
    lwf = make_strategy("lwf", tiny_solver(), alpha=1.0, tau=2.0)
    site = make_site(IMAGES, LABELS, position=1)
    lwf.on_site_start(site)
    lwf.train()
    assert lwf.teacher is not None and not lwf.teacher.training and lwf.solver.training
    assert not any(p.requires_grad for p in lwf.teacher.parameters())
    assert not any(k.startswith("teacher") for k in lwf.state_dict()), "not in Lightning's checkpoints"
    before = [p.detach().clone() for p in lwf.teacher.parameters()]

    logs = lwf.training_step((IMAGES, LABELS), make_step(site, 0))
    assert logs["distillation"].item() == pytest.approx(0.0, abs=1e-6), "student == teacher before any step"
    logs = lwf.training_step((IMAGES, LABELS), make_step(site, 1))
    assert logs["distillation"].item() > 0
    assert all(torch.equal(a, b) for a, b in zip(before, lwf.teacher.parameters())), "the teacher never trains"
    assert logs["loss"].item() == pytest.approx(lwf.criterion(lwf.solver(IMAGES), LABELS).item() + logs["distillation"].item(), rel=0.05)


def test_solver_loss_adds_alpha_times_the_divergence_from_a_different_teacher():
    """With a teacher that differs from the student the distillation term is sizable, so the loss
    minus the plain criterion must be alpha · KL exactly (and scale with alpha)."""
    losses = {}
    for alpha in (0.0, 10.0):
        lwf = make_strategy("lwf", tiny_solver(), alpha=alpha, tau=2.0)
        site = make_site(IMAGES, LABELS, position=1)
        lwf.on_site_start(site)
        with torch.no_grad():
            for p in lwf.teacher.parameters():
                p.mul_(-3.0)  # a teacher far from the student
        loss = lwf.solver_loss(IMAGES, LABELS, make_step(site))
        with torch.no_grad():
            student = lwf.solver(IMAGES)
            teacher = lwf.teacher(IMAGES)
            ce = lwf.criterion(student, LABELS).item()
            # KL(t ‖ s) over classes at τ=2, averaged over pixels, written out by hand
            p_t = torch.softmax(teacher / 2.0, dim=1)
            kl = (p_t * (torch.log_softmax(teacher / 2.0, dim=1) - torch.log_softmax(student / 2.0, dim=1))).sum(1).mean().item()
        assert kl > 0.05, "the test needs a sizable distillation term"
        assert loss.item() - ce == pytest.approx(alpha * kl, abs=1e-4)
        losses[alpha] = loss.item()
    assert losses[10.0] - losses[0.0] == pytest.approx(10.0 * kl, abs=1e-4)


def test_bundle_carries_only_the_solver():
    lwf = make_strategy("lwf", tiny_solver())
    lwf.on_site_start(make_site(IMAGES, LABELS, position=1))
    state = lwf.state_to_bundle()
    assert all(k.startswith("solver.") for k in state.tensors)
    again = make_strategy("lwf", nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1)))
    again.state_from_bundle(state)
    again.on_site_start(make_site(IMAGES, LABELS, position=1))
    assert torch.equal(again.teacher(IMAGES), lwf.solver(IMAGES).detach())


@pytest.mark.slow
def test_two_site_relay(tmp_path, tiny_fundus):
    result = relay_two_sites(tmp_path, tiny_fundus, "lwf", alpha=1.0)
    assert result.matrix["trained"] == ["Domain1", "Domain2"]
    tensors = read_bundle_tensors(result.bundles[1])
    assert all(k.startswith("solver.") for k in tensors), "no teacher copy in the bundle"
    assert any((result.run_dir / "tensorboard").rglob("events.out.tfevents.*"))
