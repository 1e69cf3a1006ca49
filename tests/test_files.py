"""Output files: CSV text in each table's format, strict JSON, UTC stamps, software versions."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess

import numpy as np
import pytest

from relaylearn.errors import UserError
from relaylearn.files import TIMESTAMP_FORMAT, atomic_write, check_output_name, csv_text, json_text, software_versions, source_commit, utc_now
from tests.conftest import strict_json


def test_csv_text_formats_floats_and_empty_cells(tmp_path):
    rows = [{"a": 1, "b": 0.123456789}, {"a": None, "c": "x"}]
    assert csv_text(rows, float_format="{:.5g}") == "a,b,c\r\n1,0.12346,\r\n,,x\r\n"
    assert csv_text(rows[:1], float_format="{:.4f}", fields=["b", "a"], lineterminator="\n") == "b,a\n0.1235,1\n"
    atomic_write(tmp_path / "sub" / "t.csv", csv_text(rows, float_format="{:.6g}"))
    assert (tmp_path / "sub" / "t.csv").read_text().startswith("a,b,c")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["t.csv"], "no temporary file left"


def test_stamps_and_versions():
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", utc_now()) and TIMESTAMP_FORMAT.endswith("Z")
    assert set(software_versions()) == {"relaylearn", "python", "torch"}
    assert {"lightning", "numpy"} <= set(software_versions(detailed=True))


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_source_commit_of_a_checkout(tmp_path):
    assert source_commit(tmp_path) is None  # not a git work tree (a wheel install)
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    assert source_commit(tmp_path) == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert source_commit(tmp_path) == head + "+local-changes"
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "new.py").write_text("")  # untracked files are not changes to the source
    assert source_commit(tmp_path) == head


def test_json_text_writes_undefined_figures_as_null():
    value = {"ratio": math.inf, "low": -math.inf, "auc": float("nan"), "n": 3, "ok": 0.5, "nested": [np.float64("nan"), (1.0, math.nan)], "s": "NaN"}
    with pytest.raises(ValueError, match="NaN|Infinity"):
        strict_json(json.dumps(value))  # what the standard library writes by default
    assert strict_json(json_text(value)) == {"ratio": None, "low": None, "auc": None, "n": 3, "ok": 0.5, "nested": [None, [1.0, None]], "s": "NaN"}


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a b", "a\\b", "a\nb"])
def test_an_output_name_is_one_plain_folder(name):
    with pytest.raises(UserError, match="name must be non-empty"):
        check_output_name(name, "run")
    check_output_name("run.1", "run")
