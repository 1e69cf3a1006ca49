"""Output files: CSV text in each table's format, UTC stamps, software versions."""

from __future__ import annotations

import re

from relaylearn.files import TIMESTAMP_FORMAT, atomic_write, csv_text, software_versions, utc_now


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
