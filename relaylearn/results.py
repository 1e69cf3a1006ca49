"""Everything derived from a relay's result matrix R [trained rows, test sites] and the per-site
evaluations: ACC / BWT / forgetting (``matrix.json``), external Dice, forgetting per site, and
the rows of the results CSVs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from relaylearn.files import atomic_write, csv_text


# ----- the result matrix -------------------------------------------------------------------------
def trained_columns(sites: list[str], trained: list[str]) -> list[list[int]]:
    """Columns of R belonging to each trained row (several for a pooled row ``A+B``)."""
    return [[sites.index(s) for s in name.split("+") if s in sites] for name in trained]


def external_columns(sites: list[str], trained: list[str], configured: list[str] | None = None) -> list[int]:
    """Columns of the test sites never trained on. With ``configured`` (the sites the config
    trains, ``current_tasks``), a site an unfinished run has yet to train is not external either:
    only the config's test-only sites are."""
    seen = {c for cols in trained_columns(sites, trained) for c in cols} | {sites.index(s) for s in configured or [] if s in sites}
    return [j for j in range(len(sites)) if j not in seen]


def matrix_json(sites: list[str], trained: list[str], rows: list[list[float]], columns: list[list[int]], per_class: dict) -> dict[str, Any]:
    """matrix.json: ``R`` (rows [T][S]) with ACC / BWT / forgetting over the trained ``columns``
    (one list per row) and the mean over all sites; ``per_class`` Dice as given."""
    from relaylearn.metrics import continual_metrics

    out: dict[str, Any] = {"metric": "dice_sample", "sites": sites, "trained": trained, "R": rows}
    if rows:
        if all(len(cols) == 1 for cols in columns):
            out.update({k: float(v) for k, v in continual_metrics(rows, [c[0] for c in columns]).items()})
        else:  # pooled training (joint): one row stands for all its sites, nothing can be forgotten
            cols = columns[-1]
            out.update({"acc": float(sum(rows[-1][c] for c in cols) / len(cols)), "bwt": None, "forgetting": None})
        out["acc_all_sites"] = float(sum(rows[-1]) / len(rows[-1]))
    out["per_class"] = per_class
    return out


def external_dice(matrix: dict[str, Any], configured: list[str] | None = None) -> float | None:
    """Mean of the last row of R over the external sites (see :func:`external_columns`; None when
    there are none)."""
    columns = external_columns(list(matrix["sites"]), list(matrix["trained"]), configured)
    if not columns or not matrix["R"]:
        return None
    last = matrix["R"][-1]
    return sum(float(last[j]) for j in columns) / len(columns)


def forgetting_per_site(matrix: dict[str, Any]) -> dict[str, float]:
    """Trained site → max over rows l (from its own row to the one before last) of R[l][j] − R[T][j].

    Only sequentially trained sites (one column per row) before the last one have a value."""
    R = [[float(v) for v in row] for row in matrix.get("R", [])]
    trained = list(matrix.get("trained", []))
    cols = trained_columns(list(matrix.get("sites", [])), trained)
    if len(R) < 2 or any(len(c) != 1 for c in cols):
        return {}
    last = len(R) - 1
    return {trained[j]: max(R[row][cols[j][0]] for row in range(j, last)) - R[last][cols[j][0]] for j in range(last)}


def format_matrix(matrix: dict[str, Any]) -> str:
    """R as a text table (rows: after each trained site; columns: test sites) with ACC / BWT /
    forgetting below it, as ``train`` and the demo print it."""
    sites = matrix["sites"]
    width = max(10, *(len(s) for s in sites))
    lines = ["R (rows: after training through site; columns: test site; sample-wise Dice)", " " * (width + 2) + "".join(f"{s:>{width}}" for s in sites)]
    lines += [f"{name[:width]:>{width}}  " + "".join(f"{v:>{width}.3f}" for v in row) for name, row in zip(matrix["trained"], matrix["R"])]
    if "acc" in matrix:
        if matrix.get("bwt") is None:  # pooled training: one model for all sites
            lines.append(f"ACC={matrix['acc']:.3f}  BWT and forgetting: not measured (one model trained on the pooled sites)")
        else:
            lines.append(f"ACC={matrix['acc']:.3f}  BWT={matrix['bwt']:+.3f}  forgetting={matrix['forgetting']:.3f}")
    return "\n".join(lines)


def headline(matrix: dict[str, Any], configured: list[str] | None = None) -> dict[str, float]:
    """The numbers a summary table shows of one run: ``acc``, ``bwt``, ``forgetting``,
    ``mean_all_sites`` (final row's mean) and ``external_dice`` (``configured``: as for
    :func:`external_columns`); NaN where undefined (BWT and forgetting of pooled training)."""
    final = [float(v) for v in matrix["R"][-1]] if matrix.get("R") else []
    external = external_dice(matrix, configured)

    def number(key: str) -> float:
        value = matrix.get(key)
        return math.nan if value is None else float(value)

    return {
        "acc": number("acc"), "bwt": number("bwt"), "forgetting": number("forgetting"),
        "mean_all_sites": float(matrix.get("acc_all_sites", sum(final) / len(final) if final else math.nan)),
        "external_dice": math.nan if external is None else external,
    }  # fmt: skip


# ----- per-site evaluations as CSV rows ----------------------------------------------------------
def flat_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """{"dice_sample": {"mean", "low", "high"}, ...} → {"dice_sample", "dice_sample_ci_low", ...}."""
    flat: dict[str, Any] = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            flat[key] = value["mean"]
            flat[f"{key}_ci_low"] = value["low"]
            flat[f"{key}_ci_high"] = value["high"]
        else:
            flat[key] = value
    return flat


def summary_row(task_id: int, trained: str, test_site: str, result: dict) -> dict[str, Any]:
    """One row of ``results_<stamp>.csv``: the model after ``trained`` on ``test_site``."""
    return {"task_id": task_id, "trained_site": trained, "test_site": test_site, **flat_summary(result["summary"])}


def per_image_rows(task_id: int, trained: str, test_site: str, result: dict) -> list[dict[str, Any]]:
    """Rows of ``per_image_<stamp>.csv``: one per test image."""
    return [{"task_id": task_id, "trained_site": trained, "test_site": test_site, **r} for r in result["per_image"]]


def class_dice(result: dict) -> dict[str, float]:
    """The per-class Dice means of one evaluation (matrix.json's ``per_class`` cells)."""
    return {k: v["mean"] for k, v in result["summary"].items() if k.startswith("dice_class")}


def final_dice(result: dict) -> float:
    """Mean sample-wise Dice of one evaluation (a cell of R)."""
    return float(result["summary"]["dice_sample"]["mean"])


def write_results_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows (floats as ``%.5g``) to ``path`` atomically; nothing without rows."""
    if rows:
        atomic_write(path, csv_text(rows, float_format="{:.5g}"))
