"""The report page of a ``relaylearn compare`` folder: the table (mean ± std over orders × seeds),
the paired test of relay against the best other method, and the comparison plot.

Reads what ``compare`` wrote (``table.csv``, ``paired_test.json``, ``comparison.png``,
``table.md``'s note on tuned values). The runs' folders hold no report of their own:
``relaylearn report <run folder>`` writes one."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from relaylearn import __version__
from relaylearn.compare import _fmt as mean_std_text
from relaylearn.errors import UserError
from relaylearn.report import html
from relaylearn.report.html import escape

COLUMNS = (  # (header, metric in table.csv, signed)
    ("ACC", "acc", False),
    ("BWT", "bwt", True),
    ("forgetting", "forgetting", False),
    ("external Dice", "external_dice", False),
    ("final replay fidelity", "fidelity", False),
    ("final MIA AUC", "mia_auc", False),
)


def is_comparison(folder: Path) -> bool:
    """Whether ``folder`` is the output of ``relaylearn compare``."""
    return (folder / "table.csv").is_file() and (folder / "matrices.json").is_file()


def _number(text: Any) -> float | None:
    """``text`` as a number; None where it is missing, NaN or not a number."""
    if isinstance(text, bool):
        return None
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _read(path: Path, parse: Callable[[str], Any]) -> Any:
    """``parse`` of the text of ``path``; UserError naming the file when it cannot be read."""
    try:
        return parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as exc:
        raise UserError(f"cannot read the comparison's {path.name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", path) from None


def _cell(row: dict[str, str], metric: str, signed: bool = False, digits: int = 3) -> str:
    """``mean ± std`` of ``metric`` in a table.csv row, as in table.md; "–" where it is missing."""
    mean, std = _number(row.get(f"{metric}_mean")), _number(row.get(f"{metric}_std"))
    return "–" if mean is None else mean_std_text(mean, std, digits, signed)


def _pools_data(label: str) -> bool:
    """Whether the strategy of a table label (``joint``, ``relay-my_config``) trains on pooled data."""
    from relaylearn.errors import ConfigError
    from relaylearn.strategies import get_strategy_class

    name = label.split("-", 1)[0]
    if not name.isidentifier():
        return False
    try:
        return bool(get_strategy_class(name).pooled_training)
    except ConfigError:
        return False


def _table(rows: list[dict[str, str]]) -> str:
    header = ["strategy", "config", "runs", *(h for h, _, _ in COLUMNS), "wall time / run (s)"]
    body, best = [], set()
    accs = [_number(r.get("acc_mean")) for r in rows]
    forgettings = [_number(r.get("forgetting_mean")) for r in rows]
    for row in rows:
        body.append([escape(row.get("strategy", "?")), escape(row.get("config", "")), escape(row.get("runs", ""))]
                    + [_cell(row, metric, signed) for _, metric, signed in COLUMNS] + [_cell(row, "wall_s", digits=0)])  # fmt: skip
    pooled = [_pools_data(row.get("strategy", "")) for row in rows]
    for column, values, pick in ((3, accs, max), (5, forgettings, min)):  # best among the methods that keep data at home
        values = [None if pool else v for v, pool in zip(values, pooled)]
        known = [v for v in values if v is not None]
        if known:
            best |= {(i, column) for i, v in enumerate(values) if v == pick(known)}
    return html.table(header, body, numeric=set(range(2, len(header))), best=best)


def _paired(paired: dict[str, Any] | None) -> str:
    from relaylearn.compare import wilcoxon_floor_note

    if not paired:
        return html.note("No paired test: it needs a relay config and another non-pooled strategy.")
    p = lambda v: "–" if _number(v) is None else f"{_number(v):.3g}"  # noqa: E731
    rows = []
    for metric in ("acc", "forgetting"):
        t = paired.get(metric) if isinstance(paired.get(metric), dict) else {}
        mean, std = _number(t.get("mean_difference")), _number(t.get("std_difference"))
        rows.append([escape(metric), mean_std_text(mean, std, signed=True) if mean is not None else "–", p(t.get("wilcoxon_p")), p(t.get("t_test_p"))])
    runs = len(paired["runs"]) if isinstance(paired.get("runs"), list) else 0
    lead = (
        f"{escape(str(paired.get('relay')))} − {escape(str(paired.get('other')))} (the other method with the highest mean ACC; "
        f"joint excluded), paired by order and seed over {runs} run(s); two-sided p-values. "
        f"{escape(wilcoxon_floor_note(runs))}"
    )
    return f'<p class="lead">{lead}</p>' + html.table(["metric", "mean difference", "Wilcoxon signed-rank p", "paired t-test p"], rows, numeric={1, 2, 3})


def _tuned_note(folder: Path) -> str:
    """The lines of ``table.md`` that say where tuned values came from (empty without ``--tuned``)."""
    path = folder / "table.md"
    if not path.is_file():
        return ""
    lines = [line[2:] for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.startswith("- ") and "(tuned on " in line]
    return "<ul>" + "".join(f"<li>{escape(line)}</li>" for line in lines) + "</ul>" if lines else ""


def build_comparison_page(folder: Path) -> str:
    """The whole page for the comparison in ``folder``."""
    rows = _read(folder / "table.csv", lambda text: list(csv.DictReader(io.StringIO(text), restval="")))
    paired_path = folder / "paired_test.json"
    paired = _read(paired_path, json.loads) if paired_path.is_file() else None
    if paired is not None and not isinstance(paired, dict):
        raise UserError("the comparison's paired_test.json must hold a JSON object or null", paired_path)
    lead = "Marked: the highest ACC and the least forgetting among the methods that do not pool the sites' data."
    sections = [("table", "Table", html.section("table", "Strategies, mean ± std over orders × seeds", _table(rows) + _tuned_note(folder), lead))]
    sections.append(("paired", "Paired test", html.section("paired", "Relay against the best other method", _paired(paired))))
    plot = folder / "comparison.png"
    if plot.is_file():
        uri = "data:image/png;base64," + base64.b64encode(plot.read_bytes()).decode("ascii")
        sections.append(
            ("plot", "Plot", html.section("plot", "ACC, forgetting and external-site Dice", html.figure(uri, "mean ± std per strategy", "comparison plot")))
        )
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = f"{escape(str(folder))} · {len(rows)} strategies · each run's own report: relaylearn report &lt;run folder&gt; · generated {now}"
    return html.page(
        f"relaylearn — comparison {folder.name}", meta, sections, f"relaylearn {escape(__version__)} · self-contained report, no external resources"
    )
