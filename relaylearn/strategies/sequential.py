"""Sequential fine-tuning: each site continues from the previous site's weights (the baseline
every continual-learning method must beat; it forgets)."""

from __future__ import annotations

from torch import Tensor

from relaylearn.losses import ExpLogLoss
from relaylearn.strategies import register_strategy
from relaylearn.strategies.base import StepContext, Strategy


@register_strategy
class Sequential(Strategy):
    name = "sequential"

    def __init__(self, options, solver, config):
        super().__init__(options, solver, config)
        self.criterion = ExpLogLoss(**config.train.loss.kwargs)

    def solver_loss(self, images: Tensor, labels: Tensor, step: StepContext) -> Tensor:
        """Segmentation loss of a batch (images [B,C,H,W], labels [B,H,W]); strategies that only
        add a penalty override this and call ``super()``."""
        return self.criterion(self.solver(images), labels)

    def training_step(self, batch, step: StepContext) -> dict[str, Tensor]:
        images, labels = batch
        (optimizer,) = self.optimizers
        loss = self.solver_loss(images, labels, step)
        self.optimize(loss, optimizer, step)
        return {"loss": loss.detach()}
