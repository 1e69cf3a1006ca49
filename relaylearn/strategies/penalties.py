"""Pieces the regularising strategies share: :class:`ParameterTensors` (per-parameter tensors
that travel in a bundle; EWC, SI, OWM) and :class:`AnchoredPenalty` (sequential fine-tuning plus a
quadratic pull towards anchored weights; EWC, SI)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from relaylearn.strategies.base import BundleState, StepContext, unprefixed
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
        terms = [(self.importance[n] * (p - self.anchor[n]).pow(2)).sum() for n, p in self.trainable_parameters().items() if n in self.importance]
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
