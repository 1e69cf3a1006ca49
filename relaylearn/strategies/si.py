"""Synaptic intelligence (SI; Zenke, Poole & Ganguli 2017) with the real path integral.

During a site every optimizer step adds to a running importance per parameter::

    ω += −g · Δθ            (importance: path_integral, the default)
    ω += lr · ĝ²            (importance: squared_gradient, the original code's variant)

where g is the gradient of the task loss **without** the penalty (obtained by subtracting the
penalty's analytic gradient 2·c·Ω·(θ − θ*), evaluated at the weights before the step, from the
gradient of the total loss) and Δθ the change the optimizer made in that step (Zenke et al.).
ĝ is the gradient the step used, as in the original: of the total loss, penalty included, after
gradient clipping. ``lr`` is the optimizer's current learning rate. On the first site (no
penalty, no clipping) the two variants agree for plain SGD; with Adam only the path integral
measures how much each weight really reduced the loss.

At the end of a site, with θ* the weights the site started from::

    Ω += max(0, ω / ((θ − θ*)² + xi));   θ* ← θ;   ω ← 0

(the ``max(0, ·)`` drops the negative contributions that only noise or momentum can produce: a
negative importance would reward moving away from the anchor). The penalty on later sites is
``c · Σ Ω (θ − θ*)²``.

Options and defaults: ``c`` = 0.5 (the original's value), ``xi`` = 1e-3 (a damping that only guards
against dividing by ≈ 0), ``importance`` = ``path_integral``. Why not the original's ξ = 1.0: with Adam at
lr 1e-3 a weight moves by |θ − θ*| ≈ 1e-3…1e-1 over a site (2.5e-3 on average after 40 steps
on the 32-px synthetic sites), so (θ − θ*)² ≪ 1 and ξ = 1 would
reduce Ω to ≈ ω, a penalty two to three orders of magnitude weaker than SI intends. These values
are not tuned on fundus data: tune them with ``relaylearn compare``.

Bundle: ``si_omega.<param>`` (Ω) and ``si_anchor.<param>`` (θ*) per trainable solver parameter,
absent until the first site has ended. The running ω is local (a buffer, so it survives a
resume) and never leaves the site.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from relaylearn.strategies import register_strategy
from relaylearn.strategies.base import SiteContext, StepContext, StrategyOptions
from relaylearn.strategies.penalties import AnchoredPenalty, ParameterTensors


class SIOptions(StrategyOptions):
    c: float = Field(0.5, ge=0, description="Penalty strength c in c Σ Ω (θ − θ*)².")
    xi: float = Field(1e-3, gt=0, description="Damping ξ in Ω += ω / ((θ − θ*)² + ξ).")
    importance: Literal["path_integral", "squared_gradient"] = Field(
        "path_integral",
        description="ω += −g·Δθ (Zenke et al.; g without the penalty) or ω += lr·ĝ² (the original code; ĝ the total loss' gradient the step used).",
    )


@register_strategy
class SI(AnchoredPenalty):
    """Synaptic intelligence; see the module docstring."""

    name = "si"
    Options = SIOptions
    bundle_prefixes = ("si_omega.", "si_anchor.")

    def __init__(self, options, solver, config):
        super().__init__(options, solver, config)
        self.running = ParameterTensors()  # ω of the current site

    @property
    def penalty_weight(self) -> float:
        return self.options.c

    def on_site_start(self, site: SiteContext) -> None:
        super().on_site_start(site)
        for name, p in self.trainable_parameters().items():
            self.running[name] = torch.zeros_like(p, dtype=torch.float32)
        if len(self.anchor) == 0:  # first site: the path starts at the initial weights
            self.set_anchor()

    def optimize(self, loss, optimizer, step: StepContext) -> None:
        params = self.trainable_parameters()
        before = {n: p.detach().clone() for n, p in params.items()}
        clip = super().optimize(loss, optimizer, step)  # p.grad: this step's gradient × clip
        lr = float(optimizer.param_groups[0]["lr"])
        with torch.no_grad():
            for name, p in params.items():
                if p.grad is None:
                    continue
                task_grad = p.grad.float() / clip - self.penalty_gradient(name, before[name])
                if self.options.importance == "path_integral":
                    contribution = -task_grad * (p.detach() - before[name])
                else:  # the original's: the gradient the step used, penalty and clipping included
                    contribution = lr * p.grad.float().pow(2)
                # a step the 16-mixed loss scaler skipped (inf gradients) adds nothing
                self.running[name].add_(torch.where(torch.isfinite(contribution), contribution, 0.0))

    def on_site_end(self, site: SiteContext) -> None:
        with torch.no_grad():
            for name, p in self.trainable_parameters().items():
                delta = p.detach().float() - self.anchor[name]
                contribution = (self.running[name] / (delta.pow(2) + self.options.xi)).clamp_min(0)
                previous = self.importance.get(name)
                self.importance[name] = contribution if previous is None else previous + contribution
                self.running[name].zero_()
        self.set_anchor()
        super().on_site_end(site)
