"""The report's privacy table: one cell per figure, undefined figures shown as a dash."""

from relaylearn.report.privacy import _cell


def test_cells_show_value_interval_and_flag_and_a_dash_for_an_undefined_figure():
    auc = {"flagged": True, "auc": {"value": 0.71, "low": 0.6, "high": 0.8}}
    assert _cell(auc, "auc") == "<b>0.71 <small>[0.60, 0.80]</small> ⚑</b>"
    copies = {"flagged": False, "near_copies": {"value": 0.05, "low": 0.01, "high": 0.1}}
    assert _cell(copies, "near_copies") == "5.0 % <small>[1.0 %, 10.0 %]</small>"
    undefined = {"flagged": False, "ratio_of_medians": {"value": None, "low": None, "high": None}}  # null in privacy.json
    assert _cell(undefined, "ratio_of_medians") == "–"
    assert _cell(None, "auc") == "–"
