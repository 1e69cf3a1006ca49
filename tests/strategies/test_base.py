"""The strategy contract: optional hooks are declared on the base class with defaults."""

from __future__ import annotations

import pytest

from relaylearn.strategies import available_strategies, get_strategy_class
from relaylearn.strategies.base import Strategy


def test_only_strategies_with_generators_replay():
    replaying = {name for name in available_strategies() if get_strategy_class(name).replays()}
    assert replaying == {"relay"}
    assert not Strategy.replays()


def test_default_hooks_of_a_strategy_without_generators(tmp_path, tiny_fundus):
    from relaylearn.assembly import build_strategy
    from relaylearn.config import load_config
    from tests.conftest import tiny_config

    task = load_config(str(tiny_config(tmp_path, tiny_fundus, strategy="ewc"))).tasks[0]
    strategy = build_strategy(task, load_pretrained=False)
    assert strategy.previews(per_site=2) == {}
    with pytest.raises(NotImplementedError, match="does not replay"):
        strategy.generate_replay("Domain1", 2)
