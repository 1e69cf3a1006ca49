"""Plug-in lookup: your own strategy, model or data layout named ``package.module:Name`` in a
local config. Only names from the local config reach this module; a name read from a bundle
never does (see :func:`relaylearn.assembly.strategy_from_bundle`)."""

from __future__ import annotations

import importlib

from relaylearn.errors import ConfigError


def is_plugin(name: str) -> bool:
    """Whether ``name`` is spelled as a plug-in (``package.module:Name``), not a built-in name."""
    return ":" in name


def import_object(spec: str, what: str):
    """``"package.module:Name"`` → the object; ConfigError naming ``what`` (the config key) otherwise."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{what} '{spec}' cannot be imported: {exc}") from None
