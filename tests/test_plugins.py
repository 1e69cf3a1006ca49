"""Plug-in lookup: ``package.module:Name`` from a local config."""

from __future__ import annotations

import os
import sys

import pytest

from relaylearn.errors import ConfigError
from relaylearn.plugins import import_object


def test_a_plugin_in_the_working_folder_is_found_as_python_m_finds_it(tmp_path, monkeypatch):
    (tmp_path / "my_site_plugin.py").write_text("class Thing:\n    pass\n")
    monkeypatch.chdir(tmp_path)
    # the installed console script: neither '' nor the working folder is on sys.path
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p and os.path.abspath(p) != str(tmp_path)])
    monkeypatch.delitem(sys.modules, "my_site_plugin", raising=False)
    assert import_object("my_site_plugin:Thing", "common.model.name").__name__ == "Thing"
    assert sys.path[-1] == str(tmp_path)  # searched last: never shadows an installed package
    with pytest.raises(ConfigError, match=r"common\.model\.name 'no_such_plugin_mod:X' cannot be imported"):
        import_object("no_such_plugin_mod:X", "common.model.name")
    sys.modules.pop("my_site_plugin", None)
