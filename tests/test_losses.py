"""ExpLogLoss and the distillation loss against hand-computed tiny cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from relaylearn.errors import ConfigError
from relaylearn.losses import ExpLogLoss, distillation_loss


def two_pixel_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [1,3,1,2]: pixel 0 -> probs (1/2, 1/4, 1/4), pixel 1 -> (1/3, 1/3, 1/3); target (0, 1)."""
    logits = torch.tensor([[math.log(2.0), 0.0, 0.0], [0.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 2)
    return logits, torch.tensor([[[0, 1]]])


def test_explog_matches_hand_computation():
    logits, target = two_pixel_case()
    # class 1: p = (1/4, 1/3), y = (0, 1): tp 1/3, fp 1/4, fn 2/3 -> (2/3 + 1) / (2/3 + 1/4 + 2/3 + 1)
    # class 2: p = (1/4, 1/3), y = (0, 0): tp 0, fp 7/12, fn 0    -> 1 / (7/12 + 1)
    mean_dice = (20 / 31 + 12 / 19) / 2
    # weighted CE: pixel 0 (class 0, w 1) nll ln 2; pixel 1 (class 1, w 2) nll ln 3
    weighted_ce = (1 * math.log(2) + 2 * math.log(3)) / 3
    expected = 0.8 * (-math.log(mean_dice)) ** 0.3 + 0.2 * weighted_ce
    loss_fn = ExpLogLoss()
    assert loss_fn.mean_dice(logits, target).item() == pytest.approx(mean_dice, rel=1e-6)
    assert loss_fn(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_generalised_dice_matches_hand_computation():
    """soft_dice false: class weights 1/volume², an absent class weighted like the heaviest present one."""
    # 4 pixels, 4 classes (0 = background, left out); probabilities per pixel, targets (1, 2, 2, 0)
    probs = torch.tensor([[1 / 4, 1 / 2, 1 / 8, 1 / 8], [1 / 8, 1 / 4, 1 / 2, 1 / 8], [1 / 8, 1 / 8, 1 / 4, 1 / 2], [1 / 2, 1 / 8, 1 / 8, 1 / 4]])
    logits = probs.log().T.reshape(1, 4, 1, 4)
    target = torch.tensor([[[1, 2, 2, 0]]])
    # class 1: p = (1/2, 1/4, 1/8, 1/8), y = (1, 0, 0, 0): tp 1/2, fp 1/2, fn 1/2; volume 1 -> w 1
    # class 2: p = (1/8, 1/2, 1/4, 1/8), y = (0, 1, 1, 0): tp 3/4, fp 1/4, fn 5/4; volume 2 -> w 1/4
    # class 3: p = (1/8, 1/8, 1/2, 1/4), absent: tp 0, fp 1, fn 0; weight of the heaviest present class, 1
    numerator = 2 * (1 * 1 / 2 + 1 / 4 * 3 / 4 + 1 * 0)  # 11/8
    denominator = 1 * (1 + 1 / 2 + 1 / 2) + 1 / 4 * (3 / 2 + 1 / 4 + 5 / 4) + 1 * (0 + 1 + 0)  # 15/4
    expected = (numerator + 1e-5) / (denominator + 1e-5)  # ≈ 11/30
    assert ExpLogLoss(soft_dice=False).mean_dice(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_options_change_the_terms_as_documented():
    logits, target = two_pixel_case()
    # background included: class 0 has p = (1/2, 1/3), y = (1, 0): tp 1/2, fp 1/3, fn 1/2
    with_bg = (12 / 17 + 20 / 31 + 12 / 19) / 3
    assert ExpLogLoss(do_bg=True).mean_dice(logits, target).item() == pytest.approx(with_bg, rel=1e-6)
    unweighted = ExpLogLoss(ce_weight=None, dice_weight=0.0, ce_weight_total=1.0)
    assert unweighted(logits, target).item() == pytest.approx((math.log(2) + math.log(3)) / 2, rel=1e-6)
    mean_dice = (20 / 31 + 12 / 19) / 2
    gamma_one = ExpLogLoss(gamma=1.0, dice_weight=1.0, ce_weight_total=0.0)
    assert gamma_one(logits, target).item() == pytest.approx(-math.log(mean_dice), rel=1e-6)


def test_batch_dice_false_averages_per_image_dice():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    per_image = ExpLogLoss(batch_dice=False).mean_dice(logits, target)
    one_at_a_time = [ExpLogLoss().mean_dice(logits[i : i + 1], target[i : i + 1]) for i in range(2)]
    assert per_image.item() == pytest.approx(torch.stack(one_at_a_time).mean().item(), rel=1e-6)
    assert per_image.item() != pytest.approx(ExpLogLoss().mean_dice(logits, target).item(), rel=1e-6)


@pytest.mark.parametrize("soft_dice", [True, False])
def test_perfect_prediction_beats_a_wrong_one_and_gradients_flow(soft_dice):
    torch.manual_seed(1)
    target = torch.randint(0, 3, (2, 8, 8))
    perfect = 8.0 * F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    wrong = 8.0 * F.one_hot((target + 1) % 3, 3).permute(0, 3, 1, 2).float()
    loss_fn = ExpLogLoss(soft_dice=soft_dice)
    assert loss_fn(perfect, target) < 0.1 < loss_fn(wrong, target)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss_fn(logits, target).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_saturated_perfect_prediction_has_finite_gradients():
    target = torch.randint(0, 3, (1, 4, 4))
    logits = (1000.0 * F.one_hot(target, 3).permute(0, 3, 1, 2).float()).requires_grad_()
    loss = ExpLogLoss()(logits, target)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(logits.grad).all()


def test_class_weight_count_must_match_the_classes():
    with pytest.raises(ConfigError, match="ce_weight has 3 entries .* 4 classes"):
        ExpLogLoss(ce_weight=(1.0, 2.0, 2.0))(torch.randn(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_the_default_class_weights_follow_the_classes(num_classes):
    """The default was [1, 2, 2]: binary or 5-class data failed unless ce_weight was set."""
    torch.manual_seed(2)
    logits, target = torch.randn(2, num_classes, 4, 4), torch.randint(0, num_classes, (2, 4, 4))
    explicit = ExpLogLoss(ce_weight=[1.0] + [2.0] * (num_classes - 1))(logits, target)
    assert ExpLogLoss()(logits, target).item() == explicit.item()


def test_loss_weights_are_not_in_the_state_dict():
    assert ExpLogLoss().state_dict() == {}


def test_distillation_matches_hand_computation():
    teacher = torch.tensor([0.0, 0.0]).view(1, 2, 1, 1)  # soft targets (1/2, 1/2)
    student = torch.tensor([0.0, 2 * math.log(3)]).view(1, 2, 1, 1)  # /tau=2 -> softmax (1/4, 3/4)
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert distillation_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    assert distillation_loss(student, teacher, tau_squared=True).item() == pytest.approx(4 * expected, rel=1e-6)
    # mean over pixels: a second identical pixel changes nothing
    assert distillation_loss(student.repeat(1, 1, 1, 2), teacher.repeat(1, 1, 1, 2)).item() == pytest.approx(expected, rel=1e-6)


def test_distillation_gradient_reaches_the_student_only():
    torch.manual_seed(2)
    student = torch.randn(2, 3, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 4, requires_grad=True)
    distillation_loss(student, teacher).backward()
    assert student.grad.abs().sum() > 0
    assert teacher.grad is None
    # teacher == student (the original's bug): the gradient is zero
    same = torch.randn(2, 3, 4, 4, requires_grad=True)
    distillation_loss(same, same).backward()
    assert same.grad.abs().max() < 1e-7
