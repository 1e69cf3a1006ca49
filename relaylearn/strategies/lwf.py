"""Learning without Forgetting (LwF; Li & Hoiem 2016) for segmentation.

From the second site on, a frozen copy of the solver as it arrived (the previous site's final
model) is the teacher, and the loss on the current site's images is::

    loss = ExpLogLoss(student, labels) + alpha · KL_τ(teacher ‖ student)

KL_τ is the pixel-averaged Kullback-Leibler divergence between the τ-softened class
distributions, computed as ``distillation_loss(student, teacher, τ) − distillation_loss(teacher,
teacher, τ)`` (the soft-target cross-entropy of :func:`relaylearn.losses.distillation_loss` minus
the teacher's entropy): it has the same gradient as the cross-entropy the original relay solver
uses, but is 0 exactly when the student agrees with the teacher.

The teacher is made in ``on_site_start`` when ``site.position > 0``. It is never shipped on its
own: the solver in the incoming bundle *is* the teacher. It stays in eval mode (BatchNorm with the
previous site's running statistics): it is kept outside the strategy's module tree, so
Lightning's ``.train()`` and local checkpoints never touch it (a resume rebuilds it from the
bundle's solver), and it follows the batches' device.

Options and defaults: ``alpha`` = 0.5 and ``tau`` = 2.0 (the relay solver's distillation weight and
temperature in the paper config), ``tau_squared`` = false (multiply by τ² as in Hinton et al.).
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field
from torch import Tensor, nn

from relaylearn.losses import distillation_loss
from relaylearn.strategies import register_strategy
from relaylearn.strategies.base import SiteContext, StepContext, StrategyOptions
from relaylearn.strategies.sequential import Sequential


def distillation_divergence(student_logits: Tensor, teacher_logits: Tensor, tau: float = 2.0, tau_squared: bool = False) -> Tensor:
    """Pixel-mean KL(softmax(t/τ) ‖ softmax(s/τ)) for logits [B,K,H,W] (or [B,K]); scalar ≥ 0."""
    cross_entropy = distillation_loss(student_logits, teacher_logits, tau, tau_squared)
    teacher_entropy = distillation_loss(teacher_logits, teacher_logits, tau, tau_squared)
    return cross_entropy - teacher_entropy.detach()


class LwFOptions(StrategyOptions):
    alpha: float = Field(0.5, ge=0, description="Weight of the distillation term.")
    tau: float = Field(2.0, gt=0, description="Softmax temperature of teacher and student.")
    tau_squared: bool = Field(False, description="Multiply the distillation term by τ² (Hinton et al. 2015).")


@register_strategy
class LwF(Sequential):
    """Learning without Forgetting; see the module docstring."""

    name = "lwf"
    Options = LwFOptions

    def __init__(self, options, solver, config):
        super().__init__(options, solver, config)
        self._last_distillation: Tensor | None = None
        self._set_teacher(None)

    def _set_teacher(self, teacher: nn.Module | None) -> None:
        # kept outside the module tree on purpose: Lightning's .train() and checkpoints must not
        # see it, and a resume rebuilds it from the bundle's solver in on_site_start
        object.__setattr__(self, "teacher", teacher)

    def on_site_start(self, site: SiteContext) -> None:
        super().on_site_start(site)
        if site.position > 0:
            teacher = copy.deepcopy(self.solver)
            teacher.requires_grad_(False)
            self._set_teacher(teacher.eval())

    def solver_loss(self, images: Tensor, labels: Tensor, step: StepContext) -> Tensor:
        logits = self.solver(images)
        loss = self.criterion(logits, labels)
        if self.teacher is None:
            return loss
        if next(self.teacher.parameters()).device != images.device:
            self.teacher.to(images.device)
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        distillation = distillation_divergence(logits, teacher_logits, self.options.tau, self.options.tau_squared)
        self._last_distillation = distillation.detach()
        return loss + self.options.alpha * distillation

    def training_step(self, batch, step: StepContext) -> dict[str, Tensor]:
        logs = super().training_step(batch, step)
        if self._last_distillation is not None:
            logs["distillation"] = self._last_distillation
        return logs
