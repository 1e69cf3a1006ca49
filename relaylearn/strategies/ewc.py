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
"""

from __future__ import annotations

import torch
from pydantic import AliasChoices, Field
from torch import Tensor

from relaylearn.models import in_eval_mode
from relaylearn.strategies import register_strategy
from relaylearn.strategies.base import SiteContext, StrategyOptions
from relaylearn.strategies.penalties import AnchoredPenalty


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
        with in_eval_mode(self.solver), torch.enable_grad():
            for i in chosen.tolist():
                image = site.train_images[i : i + 1].to(device)
                label = site.train_labels[i : i + 1].to(device)
                loss = self.criterion(self.solver(image), label)
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                for total, grad in zip(sums.values(), grads):
                    if grad is not None:
                        total.add_(grad.detach().float().pow(2))
        return {n: s / max(1, count) for n, s in sums.items()}

    def on_site_end(self, site: SiteContext) -> None:
        fisher = self.estimate_fisher(site)
        gamma = self.options.gamma
        for name, value in fisher.items():
            previous = self.importance.get(name)
            self.importance[name] = value if previous is None else gamma * previous + value
        self.set_anchor()
        super().on_site_end(site)
