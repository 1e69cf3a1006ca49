"""Online elastic weight consolidation (EWC; Kirkpatrick et al. 2017, in the online form of
Schwarz et al. 2018, "Progress & Compress").

At the end of every site the diagonal empirical Fisher information of the solver is estimated on
that site's training images, folded into the running Fisher, and the weights are anchored::

    F ← gamma · F_prev + F_site          θ* ← θ

While training the following sites the loss gets the quadratic penalty
``lambda_ / 2 · Σ F · (θ − θ*)²`` over every trainable solver parameter.

F_site is the mean of squared **per-sample** gradients of the training loss (the solver's
ExpLogLoss on one image at a time) over ``fisher_samples`` training images drawn without
replacement (all of them when the site has fewer), with the solver in eval mode (BatchNorm uses
its running statistics, which belong to the model being anchored). These gradients are taken with
``torch.autograd.grad``: they never touch ``.grad`` or the optimizer. Under DDP every rank computes
the same Fisher on the same images (no communication needed).

Options and defaults (``common.strategy.kwargs``):

* ``lambda_`` (YAML key ``lambda_`` or ``lambda``) = 5000 — penalty strength. The per-image
  Fisher of this pixel-averaged loss is small (measured on the 32-px synthetic sites: 1e-5 in the
  full-resolution decoder, 1e-12 in layer4), so λ must be large for λ·F·(θ − θ*) to compete with
  the task gradient; 5000 is a first-principles choice, not tuned on fundus data (use
  ``relaylearn compare`` to tune it);
* ``gamma`` = 1.0 — decay of the earlier sites' Fisher (1.0 = every earlier site counts fully,
  which with 4 sites is plain multi-task EWC with a single accumulated penalty);
* ``fisher_samples`` = 256 — images per site used for the Fisher.

Bundle: ``ewc_fisher.<param>`` and ``ewc_anchor.<param>`` for every trainable solver parameter
(absent until the first site has ended), next to the solver's ``solver.*`` weights.

This module also holds the pieces EWC shares with SI (:mod:`relaylearn.strategies.si`):
:class:`ParameterTensors` and :class:`AnchoredPenalty`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import AliasChoices, Field
from torch import Tensor, nn

from relaylearn.strategies import register_strategy
from relaylearn.strategies.base import BundleState, SiteContext, StepContext, StrategyOptions, unprefixed
from relaylearn.strategies.sequential import Sequential


class ParameterTensors(nn.Module):
    """Tensors keyed by (dotted) parameter names, held as buffers.

    Being buffers, they follow the strategy's ``.to(device)`` and enter the local resume
    checkpoints; :meth:`to_bundle` / :meth:`load_bundle` move them through a bundle.
    """

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    def __setitem__(self, name: str, tensor: Tensor) -> None:
        self.register_buffer(self._key(name), tensor)
        if name not in self.names:
            self.names.append(name)

    def __getitem__(self, name: str) -> Tensor:
        return self._buffers[self._key(name)]

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __len__(self) -> int:
        return len(self.names)

    def get(self, name: str) -> Tensor | None:
        return self[name] if name in self.names else None

    def items(self) -> list[tuple[str, Tensor]]:
        return [(n, self[n]) for n in self.names]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.items())

    def to_bundle(self, prefix: str) -> dict[str, Tensor]:
        return {prefix + n: t.detach() for n, t in self.items()}

    def load_bundle(self, tensors: dict[str, Tensor], prefix: str) -> None:
        for name, tensor in unprefixed(tensors, prefix).items():
            self[name] = tensor.detach().clone()


class AnchoredPenalty(Sequential):
    """Sequential fine-tuning plus ``penalty_weight · Σ importance · (θ − anchor)²`` over the
    solver's trainable parameters (the common part of EWC and SI).

    ``self.importance`` and ``self.anchor`` hold one tensor per parameter name; the penalty is
    active as soon as ``importance`` is non-empty. Subclasses set ``bundle_prefixes``
    (importance, anchor) and ``penalty_weight``.
    """

    bundle_prefixes: ClassVar[tuple[str, str]] = ("importance.", "anchor.")

    def __init__(self, options, solver, config):
        super().__init__(options, solver, config)
        self.importance = ParameterTensors()
        self.anchor = ParameterTensors()
        self._last_penalty: Tensor | None = None

    @property
    def penalty_weight(self) -> float:
        raise NotImplementedError

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.solver.named_parameters() if p.requires_grad}

    def penalty(self) -> Tensor:
        """The scalar penalty (0 while no importance is known)."""
        terms = [
            (self.importance[n] * (p - self.anchor[n]).pow(2)).sum()
            for n, p in self.trainable_parameters().items()
            if n in self.importance
        ]
        if not terms:
            return torch.zeros((), device=next(self.solver.parameters()).device)
        return self.penalty_weight * torch.stack(terms).sum()

    def penalty_gradient(self, name: str, value: Tensor) -> Tensor | float:
        """d penalty / d θ for parameter ``name`` at ``value``: 2 · weight · importance · (θ − θ*)."""
        if name not in self.importance:
            return 0.0
        return 2.0 * self.penalty_weight * self.importance[name] * (value - self.anchor[name])

    def solver_loss(self, images: Tensor, labels: Tensor, step: StepContext) -> Tensor:
        loss = super().solver_loss(images, labels, step)
        if len(self.importance) == 0:
            self._last_penalty = None
            return loss
        penalty = self.penalty()
        self._last_penalty = penalty.detach()
        return loss + penalty

    def training_step(self, batch, step: StepContext) -> dict[str, Tensor]:
        logs = super().training_step(batch, step)
        if self._last_penalty is not None:
            logs["penalty"] = self._last_penalty
        return logs

    def set_anchor(self) -> None:
        """θ* := θ for every trainable parameter."""
        for name, p in self.trainable_parameters().items():
            self.anchor[name] = p.detach().clone()

    # ----- bundle ----------------------------------------------------------------------------
    def state_to_bundle(self) -> BundleState:
        state = super().state_to_bundle()
        importance_prefix, anchor_prefix = self.bundle_prefixes
        state.tensors.update(self.importance.to_bundle(importance_prefix))
        state.tensors.update(self.anchor.to_bundle(anchor_prefix))
        return state

    def state_from_bundle(self, state: BundleState) -> None:
        super().state_from_bundle(state)
        importance_prefix, anchor_prefix = self.bundle_prefixes
        params = self.trainable_parameters()
        for prefix in (importance_prefix, anchor_prefix):
            for name, tensor in unprefixed(state.tensors, prefix).items():
                if name not in params:
                    raise KeyError(f"{prefix}{name}: the solver has no trainable parameter '{name}'")
                if tuple(tensor.shape) != tuple(params[name].shape):
                    raise ValueError(f"{prefix}{name}: shape {tuple(tensor.shape)} != parameter shape {tuple(params[name].shape)}")
        self.importance.load_bundle(state.tensors, importance_prefix)
        self.anchor.load_bundle(state.tensors, anchor_prefix)
        missing = [n for n in self.importance.names if n not in self.anchor]
        if missing:
            raise KeyError(f"{anchor_prefix}{missing[0]}: importance without an anchor")


class EWCOptions(StrategyOptions):
    lambda_: float = Field(5000.0, ge=0, validation_alias=AliasChoices("lambda_", "lambda"), description="Penalty strength λ in λ/2 Σ F (θ − θ*)².")
    gamma: float = Field(1.0, ge=0, le=1, description="Online-EWC decay of the earlier sites' Fisher: F ← γ·F_prev + F_site.")
    fisher_samples: int = Field(256, ge=1, description="Training images per site for the per-sample empirical Fisher.")


@register_strategy
class EWC(AnchoredPenalty):
    """Online EWC; see the module docstring."""

    name = "ewc"
    Options = EWCOptions
    bundle_prefixes = ("ewc_fisher.", "ewc_anchor.")

    @property
    def penalty_weight(self) -> float:
        return self.options.lambda_ / 2.0

    def estimate_fisher(self, site: SiteContext) -> dict[str, Tensor]:
        """Diagonal empirical Fisher: mean over sampled images of the squared per-image gradient
        of the training loss. Returns one float32 tensor per trainable parameter (same shape)."""
        params = self.trainable_parameters()
        count = min(self.options.fisher_samples, len(site.train_images))
        generator = torch.Generator().manual_seed(int(self.config.random_seed) + int(site.task_id or 0))
        chosen = torch.randperm(len(site.train_images), generator=generator)[:count]
        device = next(self.solver.parameters()).device
        sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        was_training = self.solver.training
        self.solver.eval()
        try:
            with torch.enable_grad():
                for i in chosen.tolist():
                    image = site.train_images[i : i + 1].to(device)
                    label = site.train_labels[i : i + 1].to(device)
                    loss = self.criterion(self.solver(image), label)
                    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                    for total, grad in zip(sums.values(), grads):
                        if grad is not None:
                            total.add_(grad.detach().float().pow(2))
        finally:
            self.solver.train(was_training)
        return {n: s / max(1, count) for n, s in sums.items()}

    def on_site_end(self, site: SiteContext) -> None:
        fisher = self.estimate_fisher(site)
        gamma = self.options.gamma
        for name, value in fisher.items():
            previous = self.importance.get(name)
            self.importance[name] = value if previous is None else gamma * previous + value
        self.set_anchor()
        super().on_site_end(site)
