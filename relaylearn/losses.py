"""Training losses of the solver (docs/method.md#losses, docs/method.md#replay-mixing-and-distillation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relaylearn.errors import ConfigError


def _dice_counts(probs: Tensor, one_hot: Tensor, batch_dice: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Soft tp, fp, fn of probs/one-hot [B,K,H,W]; shape [K] with ``batch_dice`` else [B,K]."""
    axes = (0, 2, 3) if batch_dice else (2, 3)
    tp = (probs * one_hot).sum(axes)
    fp = (probs * (1 - one_hot)).sum(axes)
    fn = ((1 - probs) * one_hot).sum(axes)
    return tp, fp, fn


def auto_class_weights(num_classes: int, device: torch.device | str = "cpu") -> Tensor:
    """``ce_weight="auto"``: float32 [num_classes], 1 for the background (class 0) and 2 for every other class."""
    weights = torch.full((num_classes,), 2.0, device=device)
    weights[0] = 1.0
    return weights


class ExpLogLoss(nn.Module):
    """Exponential-logarithmic Dice plus weighted cross-entropy, as in the original solver.

    ``forward(logits [B,K,H,W], target int64 [B,H,W]) -> scalar``::

        total = dice_weight · (−ln(max(D̄, 1e−6)))^gamma + ce_weight_total · WCE

    D̄ is the mean over classes (background dropped unless ``do_bg``) of the soft
    Dice ``(2tp + smooth) / (2tp + fp + fn + smooth)`` on softmax probabilities, with tp/fp/fn
    summed over batch and space when ``batch_dice`` (else per image, then averaged). With
    ``soft_dice=False`` D̄ is instead a generalised Dice (class weights 1/volume², Sudre 2017;
    ``smooth`` then unused).
    WCE is PyTorch's cross-entropy with class weights ``ce_weight`` (``"auto"``: 1 for the background and
    2 for every other class, as many as the logits have classes; None: unweighted) and weighted-mean reduction
    (Σ w_y·nll / Σ w_y). When D̄ rounds to exactly 1 the Dice term is 0 with zero gradient
    (the original would produce NaN gradients there). A config's ``train.loss.kwargs`` are these
    options, validated by ``relaylearn.config.ExpLogOptions``.
    """

    def __init__(
        self,
        *,
        soft_dice: bool = True,
        do_bg: bool = False,
        batch_dice: bool = True,
        ce_weight: Sequence[float] | Literal["auto"] | None = "auto",
        gamma: float = 0.3,
        dice_weight: float = 0.8,
        ce_weight_total: float = 0.2,
        smooth: float = 1.0,
    ):
        super().__init__()
        self.soft_dice = soft_dice
        self.do_bg = do_bg
        self.batch_dice = batch_dice
        self.gamma = gamma
        self.dice_weight = dice_weight
        self.ce_weight_total = ce_weight_total
        self.smooth = smooth
        self.auto_weights = ce_weight == "auto"
        weights = None if ce_weight is None or self.auto_weights else torch.tensor(list(ce_weight), dtype=torch.float32)
        # not persistent: a fixed hyper-parameter, not state to carry between sites
        self.register_buffer("class_weights", weights, persistent=False)

    def mean_dice(self, logits: Tensor, target: Tensor) -> Tensor:
        """D̄ (scalar in [0, 1]) for logits [B,K,H,W] and class ids [B,H,W]."""
        num_classes = logits.shape[1]
        probs = logits.float().softmax(dim=1)
        one_hot = F.one_hot(target.long(), num_classes).permute(0, 3, 1, 2).to(probs.dtype)
        tp, fp, fn = _dice_counts(probs, one_hot, self.batch_dice)
        if not self.do_bg:
            tp, fp, fn = tp[..., 1:], fp[..., 1:], fn[..., 1:]
        if self.soft_dice:
            dice = (2 * tp + self.smooth) / (2 * tp + fp + fn + self.smooth + 1e-8)
            return dice.mean()
        volume = tp + fn  # number of target pixels per class
        weights = 1.0 / volume.clamp_min(1.0) ** 2
        # an absent class gets the largest weight of the present ones (as MONAI does)
        largest = torch.where(volume > 0, weights, torch.zeros_like(weights)).amax(-1, keepdim=True)
        weights = torch.where(volume > 0, weights, largest)
        numerator = (2 * weights * tp).sum(-1) + 1e-5
        denominator = (weights * (2 * tp + fp + fn)).sum(-1) + 1e-5
        return (numerator / denominator).mean()

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        num_classes = logits.shape[1]
        if self.class_weights is not None and self.class_weights.numel() != num_classes:
            raise ConfigError(f"train.loss.kwargs.ce_weight has {self.class_weights.numel()} entries but the model predicts {num_classes} classes")
        neg_log_dice = -torch.log(self.mean_dice(logits, target).clamp_min(1e-6))
        # x^gamma has an infinite slope at 0: evaluate it on a clamped base and select 0 there
        safe_base = neg_log_dice.clamp_min(1e-12)
        dice_term = torch.where(neg_log_dice > 0, safe_base**self.gamma, torch.zeros_like(safe_base))
        if self.auto_weights:
            weights = auto_class_weights(num_classes, logits.device)
        else:
            weights = None if self.class_weights is None else self.class_weights.to(logits.device, torch.float32)
        weighted_ce = F.cross_entropy(logits.float(), target.long(), weight=weights)
        return self.dice_weight * dice_term + self.ce_weight_total * weighted_ce


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, tau: float = 2.0, tau_squared: bool = False) -> Tensor:
    """Soft-target cross-entropy −mean_pixels Σ_c softmax(t/τ)·log_softmax(s/τ) (scalar).

    Logits are [B,K,H,W] (or [B,K]); the mean runs over batch and pixels. The teacher is a
    constant (detached). The original has no τ² factor; ``tau_squared=True`` multiplies by τ²
    (Hinton et al. 2015) to keep gradient magnitudes independent of τ.
    """
    soft_targets = (teacher_logits.detach().float() / tau).softmax(dim=1)
    log_probs = (student_logits.float() / tau).log_softmax(dim=1)
    loss = -(soft_targets * log_probs).sum(dim=1).mean()
    return loss * tau**2 if tau_squared else loss
