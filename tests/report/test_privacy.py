"""The report's privacy table: one cell per figure, undefined figures shown as a dash."""

from relaylearn.report.privacy import _cell, hop_table


def test_cells_show_value_interval_and_flag_and_a_dash_for_an_undefined_figure():
    auc = {"flagged": True, "auc": {"value": 0.71, "low": 0.6, "high": 0.8}}
    assert _cell(auc, "auc") == "<b>0.71 <small>[0.60, 0.80]</small> ⚑</b>"
    copies = {"flagged": False, "near_copies": {"value": 0.05, "low": 0.01, "high": 0.1}}
    assert _cell(copies, "near_copies") == "5.0 % <small>[1.0 %, 10.0 %]</small>"
    undefined = {"flagged": False, "ratio_of_medians": {"value": None, "low": None, "high": None}}  # null in privacy.json
    assert _cell(undefined, "ratio_of_medians") == "–"
    assert _cell(None, "auc") == "–"


def test_every_check_of_the_audit_has_a_column_so_a_flag_on_label_map_memorisation_shows():
    interval = {"value": 0.4, "low": 0.3, "high": 0.5}
    memorisation = [{"check": "memorisation", "space": space, "flagged": space == "label maps", "near_copies": interval, "ratio_of_medians": interval}
                    for space in ("image pixels", "image features", "label maps")]  # fmt: skip
    membership = [{"check": check, "space": space, "flagged": False, "auc": interval}
                  for check, spaces in (("membership black box", ("image pixels", "image features", "label maps")),
                                        ("membership white box", ("image discriminator", "label discriminator")))
                  for space in spaces]  # fmt: skip
    site = {"n_generated": 10, "checks": memorisation + membership, "flagged": ["memorisation (label maps)"]}
    table = hop_table({"hops": [{"hop": 2, "trained": "Domain2", "sites": {"Domain1": site}}]})
    assert "<th>near copies, labels</th>" in table and table.count("⚑") == 1


def test_a_figure_without_interval_keeps_its_format_and_flag():
    """audit.n_bootstrap: 0 writes null bounds: the value is formatted as usual, the interval a dash."""
    copies = {"flagged": True, "near_copies": {"value": 0.123456, "low": None, "high": None}}
    assert _cell(copies, "near_copies") == "<b>12.3 % <small>[–]</small> ⚑</b>"
    auc = {"flagged": False, "auc": {"value": 0.5123, "low": None, "high": None}}
    assert _cell(auc, "auc") == "0.51 <small>[–]</small>"
