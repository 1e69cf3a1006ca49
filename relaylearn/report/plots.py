"""The report's figures, drawn with matplotlib's Agg canvas (no pyplot, no display) and returned
as ``data:image/png;base64,...`` URIs ready for an ``<img src>``."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from relaylearn.report.runs import Run, dice_series
from relaylearn.results import forgetting_per_site

DPI = 120
RUN_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
STYLE = {"font.size": 8.5, "axes.titlesize": 9.5, "axes.labelsize": 8.5, "legend.fontsize": 7.5, "xtick.labelsize": 8, "ytick.labelsize": 8}


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _style(ax) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(length=3)


def data_uri(fig: Figure) -> str:
    """The figure as a base64 PNG data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.08, facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _finish_heatmap(fig, ax, im, colour_label: str) -> str:
    """Frameless axes and a labelled colour bar; the figure as a data URI."""
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    cbar = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cbar.set_label(colour_label, fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    return data_uri(fig)


def png_uri(array: np.ndarray) -> str:
    """A uint8 image array [H, W] or [H, W, 3] as a PNG data URI (no resampling)."""
    from relaylearn.imaging import png_bytes

    return "data:image/png;base64," + base64.b64encode(png_bytes(array)).decode("ascii")


def _with_style(draw):
    def wrapper(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context(STYLE):
            return draw(*args, **kwargs)

    wrapper.__doc__ = draw.__doc__
    wrapper.__name__ = draw.__name__
    return wrapper


def run_colours(runs: Sequence[Run]) -> dict[str, str]:
    """One colour per run (by its place among ``runs``), the same in every chart of the page."""
    return {run.label: RUN_COLOURS[k % len(RUN_COLOURS)] for k, run in enumerate(runs)}


def forgetting_values(run: Run) -> dict[str, float]:
    """The run's forgetting per trained site, leaving out undefined (NaN) values."""
    return {site: v for site, v in forgetting_per_site(run.matrix).items() if not math.isnan(v)}


def _text(name: object) -> str:
    """A name (site, run) as matplotlib text: every ``$`` literal (not mathtext)."""
    return str(name).replace("$", r"\$")


def _short(names: Sequence[str], width: int = 14) -> list[str]:
    """Tick labels of ``names``: long ones shortened (head…tail), pooled training rows ('A+B+C') as
    'pooled (3 sites)'; a name whose short form another name shares keeps its full length."""

    def short(name: str) -> str:
        if len(name) <= width:
            return name
        if "+" in name:
            return f"pooled ({name.count('+') + 1} sites)"
        return name[: width - 5] + "…" + name[-4:]

    names = [str(n) for n in names]
    shorts = [short(n) for n in names]
    return [_text(s if shorts.count(s) == 1 else n) for s, n in zip(shorts, names)]


def _legend(ax, handles: list, labels: list[str], **kwargs) -> None:
    """A legend of exactly ``handles`` and ``labels`` (matplotlib drops labels starting with "_"
    from the ones it collects itself)."""
    ax.legend(handles, [_text(label) for label in labels], loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, **kwargs)


@_with_style
def matrix_heatmap(run: Run) -> str:
    """R as an annotated heat-map: rows = after training through site i, columns = test sites.
    The cell of each row's own training site is outlined; external test sites are marked *."""
    R = np.asarray(run.R, dtype=float)
    rows, cols = R.shape
    fig = new_figure(1.0 + 0.78 * cols, 0.9 + 0.42 * rows)
    ax = fig.add_subplot()
    im = ax.imshow(R, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    external = set(run.external_columns())
    ax.set_xticks(range(cols), [s + (" *" if j in external else "") for j, s in enumerate(_short(run.sites))], rotation=30, ha="right")
    ax.set_yticks(range(rows), [f"{i + 1}. {t}" for i, t in enumerate(_short(run.trained, 22))])
    ax.set_xlabel("test site")
    ax.set_ylabel("after training through")
    for i in range(rows):
        for j in range(cols):
            ax.text(j, i, f"{R[i, j]:.3f}", ha="center", va="center", fontsize=8, color="black" if R[i, j] > 0.55 else "white")
    for i, trained_cols in enumerate(run.trained_columns()):
        for j in trained_cols:
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="white", linewidth=2.0))
    return _finish_heatmap(fig, ax, im, "Dice")


@_with_style
def dice_over_hops(run: Run) -> str:
    """Mean sample-wise Dice per test site after each hop, with its 95 % bootstrap interval."""
    series = dice_series(run)
    hops = len(run.trained)
    fig = new_figure(max(4.2, 1.0 + 0.9 * hops), 3.0)
    ax = fig.add_subplot()
    external = run.external_sites()
    width = 0.35 / max(1, len(series) - 1) if len(series) > 1 else 0.0
    handles, labels = [], []
    for k, (site, values) in enumerate(series.items()):
        x = np.arange(hops) + (k - (len(series) - 1) / 2) * width
        mean = np.array([v[0] for v in values])
        err = np.array([[m - lo for m, lo, _ in values], [hi - m for m, _, hi in values]]).clip(min=0)
        handle = ax.errorbar(
            x,
            mean,
            yerr=err,
            marker="o",
            markersize=3.5,
            capsize=2.5,
            linewidth=1.3,
            elinewidth=0.9,
            linestyle="--" if site in external else "-",
            color=RUN_COLOURS[k % len(RUN_COLOURS)],
        )
        handles.append(handle)
        labels.append(site + (" (external)" if site in external else ""))
    ax.set_xticks(
        range(hops), [f"{i + 1}. {t}" for i, t in enumerate(_short(run.trained))], rotation=20 if hops > 3 else 0, ha="right" if hops > 3 else "center"
    )
    ax.set_xlim(-0.5, hops - 0.5)
    ax.set_ylim(0.0, 1.02)
    ax.set_ylabel("Dice (sample mean, 95 % CI)")
    ax.set_xlabel("after training through")
    ax.grid(axis="y", alpha=0.3)
    _style(ax)
    _legend(ax, handles, labels, title="test site", title_fontsize=7.5)
    return data_uri(fig)


def _grouped_positions(groups: int, members: int) -> tuple[np.ndarray, float]:
    width = min(0.5, 0.8 / max(1, members))
    offsets = (np.arange(members) - (members - 1) / 2) * width
    return offsets, width


@_with_style
def forgetting_bars(runs: Sequence[Run]) -> str | None:
    """Per trained site: max earlier R[l][j] − final R[T][j], one bar per run. None if no run has
    a value (single site, pooled training, or NaN in R)."""
    colours = run_colours(runs)
    values = {run.label: forgetting_values(run) for run in runs}
    values = {label: v for label, v in values.items() if v}
    if not values:
        return None
    sites = list(dict.fromkeys(s for v in values.values() for s in v))
    fig = new_figure(max(3.4, 1.2 + 0.32 * len(sites) * max(2, len(values))), 2.7)
    ax = fig.add_subplot()
    offsets, width = _grouped_positions(len(sites), len(values))
    handles = []
    for k, (label, per_site) in enumerate(values.items()):
        heights = [per_site.get(s, math.nan) for s in sites]
        bars = ax.bar(np.arange(len(sites)) + offsets[k], heights, width, color=colours[label])
        handles.append(bars)
        if len(values) * len(sites) <= 24:
            ax.bar_label(bars, fmt="%.3f", fontsize=6.5, padding=1.5)
    ax.axhline(0.0, color="#444", linewidth=0.8)
    pad = 0.5 if len(sites) < 3 else 0.0  # keep lone bars from filling the whole chart
    ax.set_xlim(-0.5 - pad, len(sites) - 0.5 + pad)
    ax.set_xticks(range(len(sites)), _short(sites))
    ax.set_ylabel("forgetting (Dice)")
    ax.set_xlabel("trained site")
    ax.margins(y=0.18)
    ax.grid(axis="y", alpha=0.3)
    _style(ax)
    if len(values) > 1:
        _legend(ax, handles, list(values))
    return data_uri(fig)


@_with_style
def final_dice_bars(runs: Sequence[Run]) -> str | None:
    """Final model's Dice on every test site with its 95 % interval, one bar per run that has
    trained a site (None if none has)."""
    colours = run_colours(runs)
    runs = [run for run in runs if run.R]
    if not runs:
        return None
    sites = list(dict.fromkeys(s for run in runs for s in run.sites))
    fig = new_figure(max(3.8, 1.2 + 0.32 * len(sites) * max(2, len(runs))), 2.9)
    ax = fig.add_subplot()
    offsets, width = _grouped_positions(len(sites), len(runs))
    handles = []
    for k, run in enumerate(runs):
        finals = {site: values[-1] for site, values in dice_series(run).items() if values}
        mean = np.array([finals.get(s, (math.nan,) * 3)[0] for s in sites])
        low = np.array([finals.get(s, (math.nan,) * 3)[1] for s in sites])
        high = np.array([finals.get(s, (math.nan,) * 3)[2] for s in sites])
        err = np.nan_to_num(np.stack([mean - low, high - mean]).clip(min=0))
        handles.append(ax.bar(np.arange(len(sites)) + offsets[k], mean, width, yerr=err, capsize=2, error_kw={"elinewidth": 0.8}, color=colours[run.label]))
    external = {s for s in sites if all(s in run.external_sites() for run in runs if s in run.sites)}
    ax.set_xticks(range(len(sites)), [short + (" *" if s in external else "") for s, short in zip(sites, _short(sites))])
    ax.set_ylim(0.0, 1.02)
    ax.set_ylabel("final Dice (95 % CI)")
    ax.set_xlabel("test site")
    ax.grid(axis="y", alpha=0.3)
    _style(ax)
    if len(runs) > 1:
        _legend(ax, handles, [run.label for run in runs])
    return data_uri(fig)


@_with_style
def fidelity_heatmap(replay: dict) -> str:
    """Replay fidelity F (metrics/replay.json) as an annotated heat-map like R: rows = after hop k,
    columns = earlier sites; each cell shows F and, below it, F / reference."""
    sites = list(replay.get("sites", []))
    F = np.array([[np.nan if v is None else float(v) for v in row] for row in replay.get("fidelity", [])], dtype=float)
    refs = [r if r else None for r in replay.get("reference", [])]
    rows, cols = F.shape
    fig = new_figure(1.0 + 0.85 * cols, 0.9 + 0.5 * rows)
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(F), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(cols), _short(sites), rotation=30, ha="right")
    ax.set_yticks(range(rows), [f"{i + 1}. {t}" for i, t in enumerate(_short(sites[:rows], 22))])
    ax.set_xlabel("replayed site")
    ax.set_ylabel("generators after hop")
    for i in range(rows):
        for j in range(cols):
            if np.isnan(F[i, j]):
                continue
            ratio = f"\n{F[i, j] / refs[j]:.2f}×" if j < len(refs) and refs[j] else ""
            ax.text(j, i, f"{F[i, j]:.3f}{ratio}", ha="center", va="center", fontsize=7.5, color="black" if F[i, j] > 0.55 else "white")
    return _finish_heatmap(fig, ax, im, "oracle Dice on generated pairs")
