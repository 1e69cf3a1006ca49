"""The report's privacy section: the per-hop audit of ``metrics/privacy.json`` (what the
generators and discriminators of each bundle reveal about every earlier site's training images)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from relaylearn.report import html
from relaylearn.report.html import escape
from relaylearn.report.runs import Run

#: (column header, check, space, figure) of the per-hop table
COLUMNS = (
    ("near copies, pixels", "memorisation", "image pixels", "near_copies"),
    ("median ratio, pixels", "memorisation", "image pixels", "ratio_of_medians"),
    ("near copies, features", "memorisation", "image features", "near_copies"),
    ("near copies, labels", "memorisation", "label maps", "near_copies"),
    ("black-box AUC, pixels", "membership black box", "image pixels", "auc"),
    ("black-box AUC, features", "membership black box", "image features", "auc"),
    ("black-box AUC, labels", "membership black box", "label maps", "auc"),
    ("white-box AUC, image D", "membership white box", "image discriminator", "auc"),
    ("white-box AUC, label D", "membership white box", "label discriminator", "auc"),
)


def read_privacy(run: Run) -> dict[str, Any] | None:
    path = run.path / "metrics" / "privacy.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _number(value: Any) -> float | None:
    """A finite or infinite number of privacy.json; None for null, NaN and anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def _cell(check: dict[str, Any] | None, figure: str) -> str:
    """One figure: value, its interval in brackets ("[–]" without one, e.g. ``audit.n_bootstrap: 0``)
    and ⚑ when the check is flagged; "–" when the figure is undefined."""
    if check is None:
        return "–"
    f = check[figure]
    value, low, high = (_number(f.get(k)) for k in ("value", "low", "high"))
    if value is None:
        return "–"
    text = (lambda v: f"{100 * v:.1f} %") if figure == "near_copies" else (lambda v: f"{v:.2f}")
    interval = "[–]" if low is None or high is None else f"[{text(low)}, {text(high)}]"
    body = f"{text(value)} <small>{interval}</small>"
    flagged = check["flagged"] and figure in ("near_copies", "auc")
    return f"<b>{body} ⚑</b>" if flagged else body


def hop_table(privacy: dict[str, Any]) -> str:
    rows = []
    for hop in privacy.get("hops", []):
        for site, report in hop["sites"].items():
            checks = {(c["check"], c["space"]): c for c in report["checks"]}
            cells = [str(int(hop["hop"])), escape(str(hop.get("trained", ""))), escape(site), str(int(report["n_generated"]))]
            cells += [_cell(checks.get((check, space)), figure) for _, check, space, figure in COLUMNS]
            cells.append(f"{len(report['flagged'])} / {len(report['checks'])}")
            rows.append(cells)
    header = ["hop", "after training", "audited site", "M"] + [c[0] for c in COLUMNS] + ["flagged"]
    return html.table(header, rows, numeric=set(range(3, len(header))))


def closest_pairs(run: Run, privacy: dict[str, Any], notes: list[str]) -> str:
    """The closest generated/train pairs of every site after the last hop (re-encoded PNGs)."""
    from PIL import Image

    from relaylearn.report.plots import png_uri

    hops = privacy.get("hops") or []
    if not hops:
        return ""
    figs = []
    for site, report in hops[-1]["sites"].items():
        rel = str(report.get("closest_pairs_png", ""))
        path = (run.path / "metrics" / rel).resolve()
        if not rel or not path.is_file() or (run.path / "metrics").resolve() not in path.parents:
            notes.append(f"{site}: closest-pairs picture missing")
            continue
        with Image.open(path) as im:
            picture = np.asarray(im.convert("RGB"))
        figs.append(
            html.figure(
                png_uri(picture), f"{escape(site)}: generated (top) and their nearest training image (bottom), closest first", alt=f"closest pairs {site}"
            )
        )
    return f'<h3>Closest generated / training pairs after hop {int(hops[-1]["hop"])}</h3><div class="grid">{"".join(figs)}</div>' if figs else ""


def privacy_section(runs: Sequence[Run], multi: bool) -> str | None:
    parts, notes = [], []
    for run in runs:
        privacy = read_privacy(run)
        if privacy is None:
            continue
        parts.append((f"<h3>{escape(run.label)}</h3>" if multi else "") + hop_table(privacy) + closest_pairs(run, privacy, notes))
    if not parts:
        return None
    lead = (
        "After every hop, the generators (and discriminators, when they travel) of the bundle were audited for every site so far, "
        "on that site's own train and test images. Near copies: generated images closer to a training image than the 5th "
        "percentile of test→train distances (fresh images of the site give about 5 %). Median ratio: median gen→train over "
        "median test→train distance (below 1: generated images hug the training set). AUC: membership inference separating "
        "training from test images (0.5 = nothing learnt). 95 % bootstrap intervals in brackets ([–]: none, audit.n_bootstrap 0); ⚑ = flagged."
    )
    return html.section("privacy", "Privacy audit of what travels", "".join(parts) + html.notes(notes), lead)
