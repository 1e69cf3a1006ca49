"""``relaylearn report``: one self-contained ``report.html`` for a run, or for several strategies'
runs side by side (``exps/demo/<strategy>/<name>/``).

The page embeds every figure as a base64 PNG and needs no network, script library or style
sheet: it opens offline, can be mailed, and shows

* a summary table (ACC, BWT, forgetting, mean and external Dice) of every run;
* the result matrix R of each run as an annotated heat-map;
* each test site's Dice with its 95 % bootstrap interval after every hop;
* forgetting per trained site and the final Dice per test site, all runs in one chart;
* per-class Dice of the final model;
* the final model's predictions on the worst, median and best test image of every site
  (re-run from the last bundle on the run's test data);
* for relay runs, replayed image/mask pairs per site next to real ones;
* for relay runs, the per-hop privacy audit (``metrics/privacy.json``): near copies and
  membership-inference AUCs per site per hop, and the closest generated/training pairs;
* for relay runs simulated on one machine, the replay fidelity matrix (metrics/replay.json), with
  a replay grid per earlier site and hop, real vs generated class fractions and any replay drift;
* the hop chain of the last bundle (sites, times, signer fingerprints, bundle hashes);
* run details (seed, versions, command line) and every problem met, as visible notes; a run that
  has not trained every site its config names (interrupted) is marked unfinished, with the
  command that resumes it, and is never marked best.

Whatever is missing (no bundle, data moved, no per-image CSV) is skipped with a note; only an
unusable ``metrics/matrix.json`` (or none at all) is an error. What the run trained with is read
from its ``resolved_config.yaml``; a plug-in it names is never imported (no predictions then).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from relaylearn import __version__
from relaylearn.files import atomic_write
from relaylearn.report import html, plots
from relaylearn.report.html import escape
from relaylearn.report.runs import Run, find_runs
from relaylearn.results import headline

__all__ = ["write_report", "build_report"]

REPORT_NAME = "report.html"


def _fmt(value: Any, signed: bool = False, percent: bool = False) -> str:
    """A number as shown in the report ("–" when missing or NaN); ``percent``: a fraction as "12.3 %"."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "–"
    if math.isnan(v):
        return "–"
    if percent:
        return f"{100 * v:.1f} %"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def _guarded(notes: list[str], what: str, draw: Callable[[], Any]) -> Any:
    """Run ``draw``; on any failure add a note and return None (a report never crashes)."""
    try:
        return draw()
    except Exception as exc:  # noqa: BLE001 - every failure becomes a visible note
        notes.append(f"{what}: {_reason(exc)}")
        return None


def _reason(exc: Exception) -> str:
    """An exception as one line: a relaylearn error's message, else its type and first line (the
    type alone when the message is empty)."""
    from relaylearn.errors import RelayError

    if isinstance(exc, RelayError):
        return exc.message.splitlines()[0] if exc.message else type(exc).__name__
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _dataset(run: Run) -> tuple[str, int]:
    """(data layout, number of classes) the run trained with (:meth:`Run.setting`); ('fundus', 3) by default."""
    name, num_classes = run.setting("dataset", "name"), run.setting("dataset", "kwargs", "num_classes")
    return (
        name if isinstance(name, str) else "fundus",
        num_classes if isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes > 0 else 3,
    )


def _class_names(run: Run) -> dict[str, str]:
    """``dice_class_<k>`` → readable class name, from the run's built-in data layout (a plug-in
    layout named in config.yaml is not imported)."""
    from relaylearn.data.layouts import get_layout
    from relaylearn.errors import ConfigError
    from relaylearn.plugins import is_plugin

    layout, num_classes = _dataset(run)
    if is_plugin(layout):
        return {}
    try:
        names = get_layout(layout).class_names(num_classes)
    except ConfigError:
        return {}
    return {f"dice_class_{k}": name.replace("_", " ") for k, name in enumerate(names) if k > 0 and name != f"class_{k}"}


def precision_text(precisions: dict[str, str]) -> str:
    """run.json's task id → precision as one line: the value once where every site shares it."""
    values = [str(v) for v in precisions.values()]
    if len(set(values)) == 1:
        return values[0]
    return ", ".join(f"site {k}: {v}" for k, v in precisions.items())


class ReportBuilder:
    """Collects the sections of the page for ``runs`` (one or several)."""

    def __init__(self, runs: list[Run], where: Path):
        self.runs = runs
        self.where = where
        self.multi = len(runs) > 1
        self._loaded: dict[tuple[str, str], Any] = {}  # (run label, "bundle" or "model") → what was read
        self._why: dict[tuple[str, str], str] = {}  # ... → why it could not be
        self._data_cache: dict = {}

    # ----- shared helpers -------------------------------------------------------------------
    def _once(self, run: Run, what: str, load: Callable[[], Any]) -> Any:
        """``load()`` the first time ``what`` of ``run`` is asked for; None when it failed (the
        reason in ``self._why``)."""
        key = (run.label, what)
        if key not in self._loaded and key not in self._why:
            try:
                self._loaded[key] = load()
            except Exception as exc:  # noqa: BLE001 - a note, not a crash
                self._why[key] = _reason(exc)
        return self._loaded.get(key)

    def final_bundle(self, run: Run):
        from relaylearn.report.samples import read_final_bundle

        return self._once(run, "bundle", lambda: read_final_bundle(run))

    def final_model(self, run: Run):
        """The strategy of the run's final bundle; None for a run with plug-ins (never imported
        from a run folder) or without a usable final bundle."""
        from relaylearn.errors import DataError
        from relaylearn.report.samples import load_final_model

        def load():
            if run.plugins():
                raise DataError(f"{run.plugins()[0]}: the final model needs the plug-in, which is never imported from a run folder")
            bundle = self.final_bundle(run)
            if bundle is None:
                raise DataError(self._why[(run.label, "bundle")])
            return load_final_model(bundle)

        return self._once(run, "model", load)

    def _data_for(self, run: Run, model) -> Callable[[str], Any]:
        from relaylearn.report.samples import load_test_split

        return lambda site: load_test_split(run, site, model.task, self._data_cache)

    def _replays(self, run: Run) -> bool:
        """Whether the run's strategy rehearses from generators: asked of the built-in strategy its
        config.yaml names, else (a plug-in, or no config) of its final model."""
        from relaylearn.errors import ConfigError
        from relaylearn.plugins import is_plugin
        from relaylearn.strategies import get_strategy_class

        if isinstance(run.strategy, str) and not is_plugin(run.strategy):
            try:
                return get_strategy_class(run.strategy).replays()
            except ConfigError:
                pass
        model = self.final_model(run)
        return model is not None and model.strategy.replays()

    def _title(self, run: Run) -> str:
        return f"<b>{escape(run.label)}</b>"

    def _with_rows(self, notes: list[str], what: str) -> list[Run]:
        """The runs that have trained a site; a note for each other one (R is empty)."""
        for run in self.runs:
            if not run.R:
                notes.append(f"{run.label}: no {what}: R is empty (no site has finished training)")
        return [run for run in self.runs if run.R]

    # ----- sections -------------------------------------------------------------------------
    def summary(self) -> str:
        header = ["run", "strategy", "trained sites (in order)", "ACC", "BWT", "forgetting", "mean Dice, all sites", "external Dice"]
        rows, values = [], []
        for run in self.runs:
            h = headline(run.matrix, run.configured)
            numbers = [h["acc"], h["bwt"], h["forgetting"], h["mean_all_sites"], h["external_dice"]]
            values.append(numbers)
            rows.append(
                [
                    escape(run.label),
                    escape(run.strategy or "?"),
                    escape(" → ".join(run.trained))
                    + (f" <b>(unfinished: {escape(', '.join(run.missing_sites()))} not yet)</b>" if run.missing_sites() else ""),
                    _fmt(numbers[0]),
                    _fmt(numbers[1], signed=True),
                    _fmt(numbers[2]),
                    _fmt(numbers[3]),
                    _fmt(numbers[4]),
                ]
            )
        best = set()
        finished = [not run.missing_sites() for run in self.runs]
        if self.multi:  # higher is better except forgetting; an unfinished run is never best
            for c, better in zip(range(3, 8), (max, max, min, max, max)):
                column = [(float(v[c - 3]), r) for r, v in enumerate(values) if _is_number(v[c - 3]) and finished[r]]
                if column:
                    target = better(column)[0]
                    best |= {(r, c) for v, r in column if v == target}
        lead = (
            "ACC: mean final Dice over the trained sites. BWT: mean change on each earlier site from just after "
            "training it to the end (negative = forgotten). Forgetting: mean over earlier sites of the largest drop "
            "from a model after that site's training (itself or a later one) to the final one. "
            "External: mean final Dice on the test-only sites (tested, not in the config's training sites). "
            "Dice is the per-image mean over foreground classes (sample-wise)."
            + (" Best value per column among the finished runs in green." if self.multi else "")
        )
        body = html.table(header, rows, numeric={3, 4, 5, 6, 7}, best=best)
        body += html.notes(f"{run.label}: {n}" if self.multi else n for run in self.runs for n in run.notes)
        return html.section("summary", "Summary", body, lead)

    def heatmaps(self) -> str:
        notes: list[str] = []
        figs = []
        for run in self._with_rows(notes, "heat-map"):
            uri = _guarded(notes, f"{run.label}: heat-map", lambda run=run: plots.matrix_heatmap(run))
            if uri:
                figs.append(
                    html.figure(uri, f"{self._title(run)} — R[i][j]: Dice on test site j after training through site i.", f"result matrix of {run.label}")
                )
        lead = "Rows: the model after each hop; columns: test sites. Outlined: the row's own training site; * marks external sites (test-only: tested, not among the config's training sites)."
        return html.section("matrix", "Result matrix R", f'<div class="grid">{"".join(figs)}</div>' + html.notes(notes), lead)

    def dice_curves(self) -> str:
        notes: list[str] = []
        figs = []
        for run in self._with_rows(notes, "Dice plot"):
            uri = _guarded(notes, f"{run.label}: Dice plot", lambda run=run: plots.dice_over_hops(run))
            if uri:
                source = f"from {escape(run.results_file.name)}" if run.results_file else "from matrix.json (no intervals: results CSV missing)"
                figs.append(html.figure(uri, f"{self._title(run)} — {source}.", f"Dice after each hop, {run.label}"))
        lead = "Mean sample-wise Dice of every test site after each hop, with its 95 % bootstrap interval. A falling line is forgetting; dashed lines are external sites."
        return html.section("dice", "Dice after each hop", f'<div class="grid">{"".join(figs)}</div>' + html.notes(notes), lead)

    def forgetting(self) -> str:
        notes: list[str] = []
        uri = _guarded(notes, "forgetting chart", lambda: plots.forgetting_bars(self.runs))
        for run in self.runs:
            if not plots.forgetting_values(run):
                notes.append(f"{run.label}: no forgetting per site ({_no_forgetting(run)})")
        body = (
            html.figure(
                uri,
                "Per trained site j (all but the last): max over the models after site j and before the last of R[l][j], minus the final R[T][j]. Positive = forgotten.",
                "forgetting per site",
            )
            if uri
            else ""
        )
        return html.section("forgetting", "Forgetting per site", body + html.notes(notes))

    def final_dice(self) -> str:
        notes: list[str] = []
        self._with_rows(notes, "final Dice")  # a note for each run without a row: the chart leaves them out
        uri = _guarded(notes, "final Dice chart", lambda: plots.final_dice_bars(self.runs))
        body = (
            html.figure(uri, "Final model's Dice on every test site, 95 % bootstrap interval as error bar; * external site.", "final Dice per site")
            if uri
            else ""
        )
        per_class = []
        for run in self.runs:
            table = self._per_class_table(run)
            if table:
                per_class.append(f"<div><h3>{escape(run.label)}: per-class Dice of the final model</h3>{table}</div>")
        if per_class:
            body += f'<div class="grid">{"".join(per_class)}</div>'
        return html.section("final", "Final Dice per test site", body + html.notes(notes))

    def _per_class_table(self, run: Run) -> str:
        per_class = run.matrix.get("per_class") or {}
        final = per_class.get(run.trained[-1]) if run.trained and isinstance(per_class, dict) else None
        if not isinstance(final, dict) or not final:
            return ""
        keys = sorted({k for v in final.values() if isinstance(v, dict) for k in v}, key=_class_order)
        if not keys:
            return ""
        names = _class_names(run)
        header = ["test site"] + [names.get(k, k.replace("dice_", "").replace("_", " ")) for k in keys]
        rows = [[escape(site)] + [_fmt(v.get(k)) for k in keys] for site, v in final.items() if isinstance(v, dict)]
        return html.table(header, rows, numeric=set(range(1, len(header))))

    def _runs_with(self, what: str, runs, notes: list[str]):
        """(run, final bundle or model: ``what``) for each run where it loads; a note for each other."""
        load = self.final_model if what == "model" else self.final_bundle
        for run in runs:
            value = load(run)
            if value is None:
                notes.append(f"{run.label}: {self._why[(run.label, what)]}")
            else:
                yield run, value

    def predictions(self) -> str:
        from relaylearn.report.samples import prediction_rows

        parts, notes = [], []
        for run, model in self._runs_with("model", self.runs, notes):
            run_notes: list[str] = []
            rows = _guarded(
                run_notes, "predictions", lambda run=run, model=model, run_notes=run_notes: prediction_rows(run, model, self._data_for(run, model), run_notes)
            )
            heading = f"<h3>{escape(run.label)}</h3>" if self.multi else ""
            if rows:
                caption = (
                    "Per test site: worst, median and best image of the final model by Dice (per-image CSV), each as image, "
                    f"ground truth and prediction (re-run from the last bundle, at the model's resolution). {_colour_legend(run)}"
                )
                parts.append(heading + html.image_panel(_embedded(rows), group=3, caption=caption))
            notes += [f"{run.label}: {n}" if self.multi else n for n in run_notes]
        lead = "What the final model does on real test images, including its worst case on every site."
        return html.section("predictions", "Predictions of the final model", "".join(parts) + html.notes(notes), lead)

    def replay(self) -> str | None:
        from relaylearn.report.samples import replay_rows

        relay_runs = [r for r in self.runs if self._replays(r)]
        if not relay_runs:
            return None
        parts, notes = [], []
        for run, model in self._runs_with("model", relay_runs, notes):
            run_notes: list[str] = []
            grids = (
                _guarded(
                    run_notes, "replay previews", lambda model=model, run=run, run_notes=run_notes: replay_rows(model, self._data_for(run, model), run_notes)
                )
                or []
            )
            figs = [
                html.image_panel(
                    _embedded(rows), max_cell_px=90, title=site, caption="Top: generated by the generators in the bundle; bottom: real test pairs of the site."
                )
                for site, rows in grids
            ]
            if figs:
                parts.append((f"<h3>{escape(run.label)}</h3>" if self.multi else "") + f'<div class="grid">{"".join(figs)}</div>')
            notes += [f"{run.label}: {n}" if self.multi else n for n in run_notes]
        lead = "The relay carries no images, only generators: these pairs are what the next site rehearses earlier sites with."
        return html.section("replay", "Replayed image/mask pairs", "".join(parts) + html.notes(notes), lead)

    def privacy(self) -> str | None:
        from relaylearn.report.privacy import privacy_section

        return privacy_section(self.runs, self.multi)

    def fidelity(self) -> str | None:
        """Replay fidelity matrix, references, drift and a replay grid per earlier site per hop."""
        import base64
        import json

        from relaylearn.replay_fidelity import replay_drift

        parts, notes = [], []
        for run in self.runs:
            path = run.path / "metrics" / "replay.json"
            if not path.is_file():
                continue
            replay = _guarded(notes, f"{run.label}: replay.json", lambda path=path: json.loads(path.read_text()))
            if not isinstance(replay, dict) or not replay.get("fidelity"):
                continue
            sites = [str(s) for s in replay.get("sites", [])]
            head = f"<h3>{escape(run.label)}</h3>" if self.multi else ""
            uri = _guarded(notes, f"{run.label}: fidelity heat-map", lambda replay=replay: plots.fidelity_heatmap(replay))
            body = (
                html.figure(uri, "F[k][s]: oracle Dice on pairs generated for site s by the generators leaving hop k; below: F / reference.", "replay fidelity")
                if uri
                else ""
            )
            refs = replay.get("reference", [])
            body += html.table(
                ["site", "reference (oracle on real test images)"],
                [[escape(s), _fmt(refs[i] if i < len(refs) else None)] for i, s in enumerate(sites)],
                numeric={1},
            )
            fractions = _guarded(
                notes, f"{run.label}: class fractions", lambda replay=replay, run=run, sites=sites: _class_fraction_table(replay, sites, _class_names(run))
            )
            body += fractions or ""
            drift = replay_drift(replay["fidelity"], sites)
            if drift:
                notes.append(
                    f"{run.label + ': ' if self.multi else ''}replay drift: "
                    + "; ".join(f"{s} fell by {d:.3f} from its first to its last hop" for s, d in drift.items())
                )
            grids = []
            for k in range(1, len(replay["fidelity"]) + 1):
                for i, s in enumerate(sites[: k - 1]):
                    png = run.path / "metrics" / "replay_samples" / f"hop{k}_site{i + 1}.png"
                    if png.is_file():
                        src = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")
                        grids.append(html.figure(src, f"<b>{escape(s)}</b> replayed after hop {k}", f"replay of {s} after hop {k}"))
            if grids:
                body += f'<div class="grid">{"".join(grids)}</div>'
            parts.append(head + body)
        if not parts and not notes:
            return None
        lead = (
            "How well the generators still reproduce each earlier site: an oracle for the site (the solver right after training on it, "
            "kept on this machine only) segments generated images; F is its Dice against the generated masks. A drop along the hops is replay drift. "
            "The class table compares each class's share of the generated masks with the site's real ones: a class the label generator loses shows there."
        )
        return html.section("fidelity", "Replay fidelity", "".join(parts) + html.notes(notes), lead)

    def hop_chain(self) -> str:
        from relaylearn.report.samples import hop_rows

        parts, notes = [], []
        for run, b in self._runs_with("bundle", self.runs, notes):
            rows = [
                [r["order"], escape(r["site"]), r["started"], r["finished"], r["duration"], _hash(r["signer"], 16), _hash(r["parent"]), _hash(r["bundle"])]
                for r in hop_rows(b)
            ]
            signed = "signed" if b.manifest.get("signed") else "unsigned (single-machine simulation)"
            caption = (
                f'<p class="lead">{escape(b.path.name)}: {signed}; strategy {escape(str(b.manifest.get("strategy")))}; '
                f'SHA-256 <span class="hash">{escape(b.sha256)}</span>. The report does not check signatures: '
                "use <code>relaylearn verify BUNDLE --trust DIR</code>.</p>"
            )
            table = html.table(["#", "site", "started (UTC)", "finished (UTC)", "took", "signer key", "started from bundle", "wrote bundle"], rows)
            parts.append((f"<h3>{escape(run.label)}</h3>" if self.multi else "") + caption + table)
        lead = "Every site the final bundle passed through, from its own manifest. Hashes are shortened; hover for the full value."
        return html.section("hops", "Hop chain of the last bundle", "".join(parts) + html.notes(notes), lead)

    def details(self) -> str:
        parts = []
        for run in self.runs:
            info = run.info
            versions = ", ".join(f"{k} {v}" for k, v in (info.get("versions") or {}).items())
            precision = precision_text(info.get("precision") or {})
            rows = [
                ["folder", f"<code>{escape(str(run.path))}</code>"],
                ["config", escape(str(info.get("config", "?")))], ["run name", escape(str(info.get("name", run.path.name)))],
                ["seed", escape(str(info.get("seed", "?")))], ["started (UTC)", escape(str(info.get("started_utc", "?")))],
                ["versions", escape(versions or "?")], ["precision", escape(precision or "?")], ["command", f"<code>{escape(' '.join(map(str, info.get('argv', []))) or '?')}</code>"],
                ["results file", escape(run.results_file.name if run.results_file else "none")],
            ]  # fmt: skip
            parts.append(f"<details{' open' if not self.multi else ''}><summary>{escape(run.label)}</summary>{html.table(None, rows)}</details>")
        return html.section("details", "Run details", "".join(parts))

    # ----- the page -------------------------------------------------------------------------
    def build(self) -> str:
        sections = [("summary", "Summary", self.summary), ("matrix", "Matrix R", self.heatmaps), ("dice", "Dice per hop", self.dice_curves),
                    ("forgetting", "Forgetting", self.forgetting), ("final", "Final Dice", self.final_dice),
                    ("predictions", "Predictions", self.predictions), ("replay", "Replay", self.replay), ("fidelity", "Replay fidelity", self.fidelity),
                    ("privacy", "Privacy", self.privacy),
                    ("hops", "Hop chain", self.hop_chain), ("details", "Run details", self.details)]  # fmt: skip
        built = []
        for anchor, label, make in sections:
            notes: list[str] = []
            content = _guarded(notes, f"section '{label}'", make)
            if content is None and notes:
                content = html.section(anchor, label, html.notes(notes))
            if content:
                built.append((anchor, label, content))
        now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        if self.multi:
            title = f"relaylearn — {self.where.name}: {len(self.runs)} strategies"
            meta = f"{escape(str(self.where))} · runs: {escape(', '.join(r.label for r in self.runs))} · generated {now}"
        else:
            run = self.runs[0]
            title = f"relaylearn — {run.label} / {run.info.get('name', run.path.name)}"
            missing = run.missing_sites()
            hops = f"unfinished: {len(run.trained)} hop(s), {', '.join(missing)} not trained yet" if missing else f"{len(run.trained)} hop(s)"
            meta = f"{escape(str(run.path))} · strategy {escape(run.strategy or '?')} · {escape(hops)} · generated {now}"
        return html.page(title, meta, built, f"relaylearn {escape(__version__)} · self-contained report, no external resources")


def _class_fraction_table(replay: dict, sites: list[str], names: dict[str, str]) -> str:
    """Foreground class fractions (% of mask pixels) of each earlier site's real training masks
    next to its generated masks after every later hop (``replay.json``'s ``class_fractions``):
    a class that the label generator loses shows here before the solver unlearns it."""
    fractions = replay.get("class_fractions") or {}
    real, generated = fractions.get("real") or [], fractions.get("generated") or []
    hops = len(generated)
    if hops < 2 or not real:
        return ""
    rows = []
    for i, site in enumerate(sites[: hops - 1]):
        classes = real[i] if i < len(real) and real[i] else []
        for k in range(1, len(classes)):
            cells = [(generated[h][i] or [None] * len(classes))[k] if i < len(generated[h]) else None for h in range(i + 1, hops)]
            rows.append(
                [escape(site), escape(names.get(f"dice_class_{k}", f"class {k}")), _fmt(classes[k], percent=True)]
                + ["–"] * i
                + [_fmt(c, percent=True) for c in cells]
            )
    header = ["site", "class", "real (training masks)"] + [f"generated after hop {h + 1}" for h in range(1, hops)]
    return html.table(header, rows, numeric=set(range(2, len(header))))


def _colour_legend(run: Run) -> str:
    from relaylearn.imaging import class_colour

    names = _class_names(run)
    swatches = []
    for k in range(1, _dataset(run)[1]):
        r, g, b = class_colour(k)
        label = names.get(f"dice_class_{k}", f"class {k}")
        swatches.append(
            f'<span style="display:inline-block;width:10px;height:10px;background:rgb({r},{g},{b});margin:0 4px 0 10px;border-radius:2px"></span>{escape(label)}'
        )
    return "Colours:" + "".join(swatches)


def _no_forgetting(run: Run) -> str:
    """Why ``run`` has no forgetting per site."""
    untested = [t for t, cols in zip(run.trained, run.trained_columns()) if not cols]
    if any("+" in t for t in run.trained):
        return "pooled training"
    if len(run.trained) < 2:
        return "fewer than two sites trained"
    if not run.sites:
        return "no test sites"
    if untested:
        return f"trained site {untested[0]} is not among the test sites"
    return "undefined: R holds NaN"


def _class_order(key: str) -> tuple[float, str]:
    """Sort key of a per-class column: ``dice_class_10`` after ``dice_class_9`` (by class number)."""
    number = key.rsplit("_", 1)[-1]
    return (int(number) if number.isdigit() else math.inf, key)


def _embedded(rows) -> list[tuple[str, list[tuple[str, str]]]]:
    """Panel rows with every image array replaced by its PNG data URI."""
    return [(label, [(plots.png_uri(image), caption) for image, caption in cells]) for label, cells in rows]


def _is_number(value: Any) -> bool:
    try:
        return not math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def _hash(value: str, keep: int = 12) -> str:
    if not value:
        return "–"
    short = value if len(value) <= keep else value[:keep] + "…"
    return f'<span class="hash" title="{escape(value)}">{escape(short)}</span>'


def build_report(run_dir: str | Path, name: str | None = None) -> str:
    """The report page as a string (see :func:`write_report`); a ``relaylearn compare`` folder gets
    the comparison's page (:mod:`relaylearn.report.comparison`)."""
    from relaylearn.report.comparison import build_comparison_page, is_comparison

    if name is None and is_comparison(Path(run_dir)):
        return build_comparison_page(Path(run_dir))
    return ReportBuilder(find_runs(Path(run_dir), name), Path(run_dir)).build()


def write_report(run_dir: str | Path, name: str | None = None) -> Path:
    """Write ``run_dir/report.html``: the run in ``run_dir``, every ``run_dir/<strategy>/<name>/``
    side by side, or the comparison that ``relaylearn compare`` wrote in ``run_dir``. Returns its path; UserError when no ``metrics/matrix.json`` is found."""
    out = Path(run_dir) / REPORT_NAME
    atomic_write(out, build_report(run_dir, name).encode("utf-8"))
    return out
