"""Local learning: every site trains its own model from the same initial weights on its own data
only. The matrix R then shows how a single-site model generalises to the other sites."""

from __future__ import annotations

from relaylearn.strategies import register_strategy
from relaylearn.strategies.base import BundleState, SiteContext, prefixed, unprefixed
from relaylearn.strategies.sequential import Sequential


@register_strategy
class Local(Sequential):
    name = "local"

    def __init__(self, options, solver, config):
        super().__init__(options, solver, config)
        self.initial_state = {k: v.detach().clone() for k, v in solver.state_dict().items()}

    def on_site_start(self, site: SiteContext) -> None:
        self.solver.load_state_dict(self.initial_state)

    def state_to_bundle(self) -> BundleState:
        state = super().state_to_bundle()
        state.tensors.update(prefixed(self.initial_state, "initial."))
        return state

    def state_from_bundle(self, state: BundleState) -> None:
        super().state_from_bundle(state)
        self.initial_state = {k: v.clone() for k, v in unprefixed(state.tensors, "initial.").items()}
