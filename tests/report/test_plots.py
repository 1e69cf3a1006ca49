"""The report's charts show site and run names as written: no mathtext, no dropped legend entry,
no two names shortened alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.report.conftest import images_in, section_of

#: a leading "_" (matplotlib drops such legend labels), "$" pairs (mathtext), long names alike at the start
NAMES = ["_hospitalA", "Ward_$\\1$", "cost$5 and $6", "Hospital_Beijing_North", "Hospital_Beijing_South"]


def _run(path: Path) -> Path:
    R = [[round(0.8 - 0.05 * i + 0.01 * j, 3) for j in range(len(NAMES))] for i in range(3)]
    (path / "metrics").mkdir(parents=True)
    (path / "metrics" / "matrix.json").write_text(json.dumps({"sites": NAMES, "trained": NAMES[:3], "R": R}))
    return path


@pytest.fixture
def runs(tmp_path):
    from relaylearn.report.runs import find_runs

    _run(tmp_path / "cmp" / "_baseline" / "r")
    _run(tmp_path / "cmp" / "sequential" / "r")
    return find_runs(tmp_path / "cmp")


def test_names_reach_the_charts_as_written(runs, monkeypatch):
    from relaylearn.report import plots

    def drawn(fig):
        fig.canvas.draw()  # where matplotlib parses mathtext
        return fig.axes[0]

    def legend(ax) -> list[str]:
        return [t.get_text() for t in ax.get_legend().get_texts()]

    monkeypatch.setattr(plots, "data_uri", drawn)
    heatmap = plots.matrix_heatmap(runs[0])
    ticks = [t.get_text() for t in heatmap.get_xticklabels()]
    assert len(set(ticks)) == len(NAMES), ticks
    assert "_hospitalA" in legend(plots.dice_over_hops(runs[0]))
    assert "_baseline" in legend(plots.forgetting_bars(runs)) and "_baseline" in legend(plots.final_dice_bars(runs))


def test_no_chart_fails_on_such_names(runs):
    from relaylearn.report import build_report

    page = build_report(runs[0].path.parent.parent)
    for anchor, charts in (("matrix", 2), ("dice", 2), ("forgetting", 1), ("final", 1)):
        assert images_in(page, anchor) == charts and 'class="note"' not in section_of(page, anchor), section_of(page, anchor)
