"""Multi-site strategies. One file each; every module in this package that defines a
``Strategy`` subclass with a ``name`` is found automatically, so a new strategy needs no change
anywhere else: drop ``my_strategy.py`` here (or register a class from your own package with
``register_strategy``)."""

from __future__ import annotations

import importlib
import pkgutil

from relaylearn.errors import ConfigError
from relaylearn.plugins import import_object, is_plugin
from relaylearn.strategies.base import (
    BundleState,
    SiteContext,
    StepContext,
    Strategy,
    StrategyOptions,
)

_REGISTRY: dict[str, type[Strategy]] = {}
_DISCOVERED = False


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator (also usable as a call) adding a strategy under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():  # decorated or not: a class that names itself
            if isinstance(obj, type) and issubclass(obj, Strategy) and obj.__module__ == module.__name__ and vars(obj).get("name"):
                _REGISTRY.setdefault(obj.name, obj)


def get_strategy_class(name: str) -> type[Strategy]:
    """A registered strategy by name, or your own class as ``"my_package.module:MyStrategy"``."""
    if is_plugin(name):
        cls = import_object(name, "common.strategy.name")
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise ConfigError(f"common.strategy.name: '{name}' is not a relaylearn Strategy subclass")
        return cls
    _discover()
    if name not in _REGISTRY:
        raise ConfigError(f"common.strategy.name: unknown strategy '{name}' (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def available_strategies() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


__all__ = [
    "BundleState",
    "SiteContext",
    "StepContext",
    "Strategy",
    "StrategyOptions",
    "available_strategies",
    "get_strategy_class",
    "register_strategy",
]
