"""A complete custom strategy in 25 lines: fine-tuning with an L2 pull toward the weights the
site received (a simple anti-forgetting baseline). Use it from a config with

    strategy:
      name: examples.anchor_strategy:AnchoredFineTuning
      kwargs: {strength: 0.01}

Everything the next site needs goes through ``state_to_bundle``; here the received weights are
re-derived from the incoming solver at site start, so nothing extra has to travel.
"""

from pydantic import Field

from relaylearn.strategies import SiteContext, StrategyOptions
from relaylearn.strategies.sequential import Sequential


class AnchorOptions(StrategyOptions):
    strength: float = Field(0.01, ge=0, description="Weight of the L2 pull toward the received weights.")


class AnchoredFineTuning(Sequential):
    name = "anchored"
    Options = AnchorOptions

    def on_site_start(self, site: SiteContext) -> None:
        self.anchor = [p.detach().clone() for p in self.solver.parameters()]

    def solver_loss(self, images, labels, step):
        loss = super().solver_loss(images, labels, step)
        pull = sum(((p - a.to(p.device)) ** 2).sum() for p, a in zip(self.solver.parameters(), self.anchor))
        return loss + self.options.strength * pull
