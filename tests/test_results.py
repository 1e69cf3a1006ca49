"""Numbers derived from the result matrix R: matrix.json, external Dice, forgetting per site."""

from __future__ import annotations

import math

import pytest

from relaylearn.results import external_columns, external_dice, forgetting_per_site, format_matrix, headline, matrix_json, trained_columns

SITES = ["A", "B", "C", "D"]
R = [[0.8, 0.2, 0.3, 0.4], [0.6, 0.7, 0.5, 0.5], [0.5, 0.65, 0.9, 0.6]]


def test_matrix_json_acc_bwt_forgetting_over_trained_columns():
    m = matrix_json(SITES, ["A", "B", "C"], R, [[0], [1], [2]], {})
    assert m["acc"] == pytest.approx((0.5 + 0.65 + 0.9) / 3)
    assert m["bwt"] == pytest.approx(((0.5 - 0.8) + (0.65 - 0.7)) / 2)
    assert m["forgetting"] == pytest.approx(((0.8 - 0.5) + (0.7 - 0.65)) / 2)
    assert m["acc_all_sites"] == pytest.approx(sum(R[-1]) / 4)
    pooled = matrix_json(SITES, ["A+B"], [R[0]], [[0, 1]], {})
    assert pooled["acc"] == pytest.approx(0.5) and pooled["bwt"] is None and pooled["forgetting"] is None  # not measured
    assert "BWT and forgetting: not measured" in format_matrix(pooled)
    h = headline(pooled)
    assert math.isnan(h["bwt"]) and math.isnan(h["forgetting"]) and h["acc"] == pytest.approx(0.5)


def test_external_sites_and_forgetting_per_site():
    m = matrix_json(SITES, ["A", "B", "C"], R, [[0], [1], [2]], {})
    assert trained_columns(SITES, ["A+B", "C"]) == [[0, 1], [2]]
    assert external_columns(SITES, ["A", "B", "C"]) == [3]
    assert external_dice(m) == pytest.approx(0.6)
    assert external_dice({**m, "trained": ["A+B+C+D"]}) is None
    assert forgetting_per_site(m) == pytest.approx({"A": 0.3, "B": 0.05})
    assert forgetting_per_site({**m, "trained": ["A+B", "C", "D"]}) == {}, "pooled rows have no per-site forgetting"
    h = headline(m)
    assert h["external_dice"] == pytest.approx(0.6) and h["acc"] == pytest.approx(m["acc"])
    assert math.isnan(headline({"sites": ["A"], "trained": ["A"], "R": [[0.5]]})["external_dice"])


def test_format_matrix_prints_r_and_the_headline():
    text = format_matrix(matrix_json(SITES, ["A", "B", "C"], R, [[0], [1], [2]], {}))
    lines = text.splitlines()
    assert len(lines) == 2 + 3 + 1 and lines[-1].startswith("ACC=0.683  BWT=-0.175")


def test_the_sites_an_unfinished_run_has_yet_to_train_are_not_external():
    m = matrix_json(SITES, ["A", "B"], R[:2], [[0], [1]], {})  # the config trains A, B, C; D is test-only
    assert external_columns(SITES, ["A", "B"], ["A", "B", "C"]) == [3]
    assert external_dice(m, ["A", "B", "C"]) == pytest.approx(0.5) and headline(m, ["A", "B", "C"])["external_dice"] == pytest.approx(0.5)
    assert external_dice(m) == pytest.approx((0.5 + 0.5) / 2), "without the config: every site not trained on"
