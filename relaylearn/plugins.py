"""Plug-in lookup: your own strategy, model or data layout named ``package.module:Name`` in a
local config. Only names from the local config reach this module; a name read from a bundle
never does (see :func:`relaylearn.assembly.strategy_from_bundle`)."""

from __future__ import annotations

import importlib
import os
import sys

from relaylearn.errors import ConfigError


def is_plugin(name: str) -> bool:
    """Whether ``name`` is spelled as a plug-in (``package.module:Name``), not a built-in name."""
    return ":" in name


def import_object(spec: str, what: str):
    """``"package.module:Name"`` → the object; ConfigError naming ``what`` (the config key) otherwise."""
    module_name, _, attr = spec.partition(":")
    _search_working_folder()
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{what} '{spec}' cannot be imported: {exc}") from None


def _search_working_folder() -> None:
    """Let plug-ins be found in the folder the command runs from, as ``python -m relaylearn``
    finds them (the installed ``relaylearn`` command does not search it). Appended last, so a
    file there never shadows an installed package."""
    here = os.getcwd()
    if not any(os.path.abspath(p or os.curdir) == here for p in sys.path):
        sys.path.append(here)
