"""Joint learning: the training splits of all sites pooled on one host (the upper bound that
relay learning approaches without ever moving data). Unlike the original's joint config, which
trained on Domain1 only, every site of ``current_tasks`` is really pooled."""

from __future__ import annotations

from relaylearn.strategies import register_strategy
from relaylearn.strategies.sequential import Sequential


@register_strategy
class Joint(Sequential):
    name = "joint"
    pooled_training = True
