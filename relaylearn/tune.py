"""``relaylearn tune``: pick each strategy's strength on the validation parts, never on the test split.

For every config, each point of its strategy's grid (:data:`GRIDS`, or a ``--grid`` YAML file of
the same shape, which replaces the built-in grid of the strategies it names) trains the whole
relay over ``--orders`` × ``--seeds``, exactly as ``relaylearn compare`` does, into::

    exps/tune/<NAME>/<strategy>/<point>/order<k>_seed<s>/...

A point's score is its ACC on the relay sites' validation parts (held out from their training
images, ``common.dataset.kwargs.val_fraction``), averaged over orders × seeds; the pick is the
best point (the first in grid order on a tie). ``--select-on test`` scores on the test split
instead — the original code's "validation = test" protocol, optimistic, kept only to compare with
it. Finished runs are skipped, so re-running the command resumes an interrupted tuning.

A config whose strategy has nothing to tune (``sequential``, ``local``, ``joint``) is trained once
at its preset as a *reference*: ``tune.md`` ends with each pick's validation ACC and forgetting
beside the references', so "does tuning beat plain fine-tuning?" is read off one table.

Outputs in ``exps/tune/<NAME>/``: ``tune.json`` (per strategy: the grid, every point's scores
and runs, the pick) and ``tune.md`` (the same as tables). ``relaylearn compare --tuned
exps/tune/<NAME>`` trains each strategy at its pick.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import sys
from functools import partial
from pathlib import Path
from typing import Any

from relaylearn.compare import _fmt, check_before_runs, check_distinct, mean_std, plan_runs, strategy_labels, train_or_resume, with_strategy_kwargs
from relaylearn.config import RunConfig, load_config, read_yaml
from relaylearn.errors import ConfigError, UserError
from relaylearn.files import EXPS_ROOT, atomic_write, check_output_name
from relaylearn.workers import check_workers, train_shared

# Each strategy's grid: option -> values; every combination is one point. Add a key or a
# strategy here (or in a --grid file); keys the installed strategy does not have are skipped.
GRIDS: dict[str, dict[str, list[Any]]] = {
    "ewc": {"lambda_": [1e3, 1e4, 1e5, 1e6]},
    "si": {"c": [0.5, 5.0, 50.0], "xi": [1e-3, 1e-1]},
    "lwf": {"alpha": [0.5, 2.0, 8.0], "tau": [1.0, 2.0]},
    "owm": {"alpha": [1e-3, 1e-2, 1e-1, 1.0]},
    "relay": {"distil_weight": [0.25, 0.5, 1.0, 2.0], "gan_steps_per_solver_step": ["x1", "x2"]},
}
REFERENCES = ("sequential", "local", "joint")  # no strength to tune: trained once at the preset, shown beside the grids
SELECT_ON = ("val", "test")


def load_grids(path: str | None) -> dict[str, dict[str, list[Any]]]:
    """:data:`GRIDS`, with the strategies named in the YAML file ``path`` replaced by its grids."""
    from relaylearn.plugins import is_plugin
    from relaylearn.strategies import available_strategies

    grids = {name: dict(grid) for name, grid in GRIDS.items()}
    if path is None:
        return grids
    path = Path(path.lstrip("="))
    data = read_yaml(path)
    if not isinstance(data, dict) or not data:
        raise ConfigError("expected a mapping strategy -> {option: [values, ...]}", path)
    for strategy, grid in data.items():
        if not (isinstance(strategy, str) and (strategy in available_strategies() or is_plugin(strategy))):
            raise ConfigError(f"{strategy}: unknown strategy (known: {', '.join(available_strategies())})", path)
        if not isinstance(grid, dict) or not grid:
            raise ConfigError(f"{strategy}: expected a mapping option -> [values, ...]", path)
        for key, values in grid.items():
            if not isinstance(values, list) or not values or not all(isinstance(v, (int, float, str, bool)) for v in values):
                raise ConfigError(f"{strategy}.{key}: expected a non-empty list of numbers or strings", path)
            if len(set(map(repr, values))) != len(values):
                raise ConfigError(f"{strategy}.{key}: a value is listed twice", path)
        grids[str(strategy)] = {str(k): list(v) for k, v in grid.items()}
    return grids


def grid_points(cfg: RunConfig, grid: dict[str, list[Any]], source: str | Path | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Every combination of the grid's values for the options ``cfg``'s strategy has (each checked
    against the strategy's options), and the grid keys it does not have. ``source``: the grid's
    file, named by errors in the grid (default: the config)."""
    from relaylearn.strategies import get_strategy_class

    strategy = cfg.tasks[0].strategy.name
    fields = get_strategy_class(strategy).Options.model_fields
    field_of = {name: key for key, field in fields.items() for name in (key, *(getattr(field.validation_alias, "choices", None) or []))}
    keys = [k for k in grid if k in field_of]
    skipped = [k for k in grid if k not in field_of]
    same = next((k for i, k in enumerate(keys) if field_of[k] in [field_of[j] for j in keys[:i]]), None)
    if same is not None:
        raise ConfigError(f"{strategy}.{same}: names the option '{field_of[same]}' another key of the grid names already", source or cfg.path)
    options = None  # the config's own option values, read only when a grid value is relative
    values = []
    for k in keys:
        if any(isinstance(v, str) and RELATIVE.fullmatch(v) for v in grid[k]):
            options = options or get_strategy_class(strategy).Options.model_validate(cfg.tasks[0].strategy.kwargs)
            base = getattr(options, field_of[k])
            if isinstance(base, bool) or not isinstance(base, (int, float)):
                raise ConfigError(f"{strategy}.{k}: a relative value needs a numeric config value (config {cfg.name} gives {base!r:.40})", source or cfg.path)
            values.append(_resolve_relative(grid[k], base))
        else:
            values.append(grid[k])
        _refuse_equal_values(get_strategy_class(strategy).Options, field_of[k], f"{strategy}.{k}", values[-1], source or cfg.path)
    points = [dict(zip(keys, combination)) for combination in itertools.product(*values)] if keys else []
    for point in points:
        with_strategy_kwargs(cfg, point)  # a ConfigError (exit 2) before anything trains
    return points, skipped


def _refuse_equal_values(options_class: Any, field: str, where: str, values: list[Any], source: str | Path | None) -> None:
    """ConfigError when two of a grid key's values are one value once read as the option reads
    them (YAML loads ``1e4`` as the text "1e4", which the option reads as 10000.0): two points
    would train the same thing. A value the option refuses is left to the check of each point."""

    def read(value: Any) -> Any:
        try:
            return getattr(options_class.model_validate({field: value}), field)
        except ValueError:  # pydantic's ValidationError
            return value

    seen: list[Any] = []
    for value in values:
        normal = read(value)
        if any(normal == other and type(normal) is type(other) for other in seen):
            raise ConfigError(f"{where}: the value {value!r} is listed twice (the option reads it as {normal!r}, as another value of the grid)", source)
        seen.append(normal)


RELATIVE = re.compile(r"x(\d+(?:\.\d+)?)")  # "x2": twice the config's own value


def _resolve_relative(values: list[Any], base: float) -> list[Any]:
    """Grid values with each relative one (``"x0.5"``, ``"x2"``: a multiple of ``base``, the value
    the config trains with, its preset included) made absolute; integers stay integers (at least 1);
    a value reached twice is kept once."""
    out: list[Any] = []
    for v in values:
        match = RELATIVE.fullmatch(v) if isinstance(v, str) else None
        if match:
            v = max(1, round(base * float(match.group(1)))) if isinstance(base, int) else base * float(match.group(1))
        if v not in out:
            out.append(v)
    return out


def point_folder(point: dict[str, Any]) -> str:
    """A folder name for a grid point, e.g. ``alpha=0.5_tau=2.0`` (``preset`` for no values)."""
    if not point:
        return "preset"
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", "_".join(f"{k}={v}" for k, v in point.items()))


def run_scores(run: dict[str, Any], select_on: str) -> dict[str, Any]:
    """The selection score of one finished run and what is reported beside it."""
    matrix = run["matrix"]
    scored = matrix if select_on == "test" else (matrix.get("validation") or {})
    return {
        "score": scored.get("acc"),
        "forgetting": scored.get("forgetting"),
        "bwt": scored.get("bwt"),
        "test_acc": matrix.get("acc"),
        "wall_seconds": run["wall_seconds"],
    }


def summarise_point(point: dict[str, Any], runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"values": point, "folder": point_folder(point), "runs": runs}
    for metric in ("score", "forgetting", "bwt", "test_acc"):
        out[f"{metric}_mean"], out[f"{metric}_std"] = mean_std([r[metric] for r in runs.values()])
    out["wall_seconds"] = sum(r["wall_seconds"] for r in runs.values())
    return out


def pick_best(points: list[dict[str, Any]]) -> int | None:
    """Index of the point with the highest mean score (the first on a tie); None if none scored."""
    scored = [i for i, p in enumerate(points) if p["score_mean"] is not None and not math.isnan(p["score_mean"])]
    return max(scored, key=lambda i: (points[i]["score_mean"], -i)) if scored else None


def tune_markdown(summary: dict[str, Any]) -> str:
    where = "validation parts" if summary["select_on"] == "val" else "TEST split (optimistic: --select-on test)"
    lines = [f"# {summary['name']}: picked by ACC on the {where}, {summary['orders']} order(s) × {summary['seeds']} seed(s)", ""]
    for label, entry in summary["strategies"].items():
        kind = ", reference: nothing to tune, trained at its preset" if entry.get("reference") else ""
        lines += [f"## {label} ({entry['config']}{kind})", ""]
        if entry["skipped_keys"]:
            lines += [f"Grid keys this strategy does not have (skipped): {', '.join(entry['skipped_keys'])}", ""]
        lines += ["| point | score (ACC) | forgetting | BWT | test ACC (not used) | wall time (s) |", "|---|---:|---:|---:|---:|---:|"]
        for i, p in enumerate(entry["points"]):
            mark = " **pick**" if i == entry.get("pick_index") else ""
            lines.append(
                f"| {p['folder']}{mark} | {_fmt(p['score_mean'], p['score_std'])} | {_fmt(p['forgetting_mean'], p['forgetting_std'])} "
                f"| {_fmt(p['bwt_mean'], p['bwt_std'], signed=True)} | {_fmt(p['test_acc_mean'], p['test_acc_std'])} | {p['wall_seconds']:.0f} |"
            )
        lines.append("")
    lines += picks_against_references(summary)
    return "\n".join(lines)


def picks_against_references(summary: dict[str, Any]) -> list[str]:
    """Markdown lines: each pick's validation ACC and forgetting next to each reference's (e.g.
    sequential fine-tuning), with the difference in forgetting; no lines without both."""
    entries = summary["strategies"]
    references = {label: e["points"][0] for label, e in entries.items() if e.get("reference") and e.get("complete") and e["points"]}
    picks = {label: e["points"][e["pick_index"]] for label, e in entries.items() if not e.get("reference") and e.get("pick_index") is not None}
    if not references or not picks:
        return []
    lines = ["## Picks against the references", "", "| strategy | pick | ACC | forgetting | " + " | ".join(f"forgetting − {r}" for r in references) + " |"]
    lines.append("|---|---|---:|---:|" + "---:|" * len(references))
    for label, p in picks.items():
        deltas = [
            _fmt(p["forgetting_mean"] - r["forgetting_mean"], None, signed=True)
            if p["forgetting_mean"] is not None and r["forgetting_mean"] is not None
            else "–"
            for r in references.values()
        ]
        lines.append(
            f"| {label} | {p['folder']} | {_fmt(p['score_mean'], p['score_std'])} | {_fmt(p['forgetting_mean'], p['forgetting_std'])} | "
            + " | ".join(deltas)
            + " |"
        )
    for label, r in references.items():
        lines.append(
            f"| {label} (reference) | preset | {_fmt(r['score_mean'], r['score_std'])} | {_fmt(r['forgetting_mean'], r['forgetting_std'])} |"
            + " |" * len(references)
        )
    lines.append("")
    return lines


def tune_strategies(
    config_specs: list[str],
    name: str,
    *,
    orders: int = 1,
    seeds: int = 1,
    grid_file: str | None = None,
    select_on: str = "val",
    data_root: str | None = None,
    overrides: list[str] | None = None,
    devices: str | None = None,
    quiet: bool = False,
    exps_root: Path = EXPS_ROOT,
    workers: int = 1,
    claim_only: bool = False,
    argv: list[str] | None = None,
) -> Path:
    """Train (or resume) every grid point of every config and write the picks; returns ``tune.json``.

    ``workers`` / ``claim_only`` / ``argv``: share the runs between processes (:mod:`relaylearn.workers`)."""
    check_workers(workers)
    from tqdm.auto import tqdm

    check_output_name(name, "tuning")
    if select_on not in SELECT_ON:
        raise UserError(f"--select-on {select_on}: expected one of {', '.join(SELECT_ON)}")
    check_distinct(config_specs)
    grids = load_grids(grid_file)
    configs = [load_config(spec.lstrip("="), overrides, data_root) for spec in config_specs]
    check_before_runs(configs, devices)
    plans = []  # (label, config, points, skipped keys)
    for cfg, label in zip(configs, strategy_labels(configs)):
        strategy = cfg.tasks[0].strategy.name
        if strategy in REFERENCES and strategy not in grids:
            plans.append((label, cfg, [{}], []))
            continue
        if strategy not in grids:
            raise UserError(f"config {cfg.name}: strategy '{strategy}' has no grid (tunable: {', '.join(sorted(grids))}; add one with --grid)", cfg.path)
        if select_on == "val" and any(t.dataset.kwargs.val_fraction == 0 for t in cfg.tasks):
            raise UserError(
                f"config {cfg.name}: val_fraction is 0, so there is no validation part to select on "
                "(set common.dataset.kwargs.val_fraction > 0, or --select-on test)",
                cfg.path,
            )
        from_file = grid_file and grids[strategy] != GRIDS.get(strategy)  # an error in this grid names the file
        points, skipped = grid_points(cfg, grids[strategy], grid_file.lstrip("=") if from_file else None)
        if not points:
            raise UserError(f"config {cfg.name}: strategy '{strategy}' has none of the grid's options {sorted(grids[strategy])}", cfg.path)
        plans.append((label, cfg, points, skipped))

    root = Path(exps_root) / "tune" / name
    if claim_only or workers > 1:
        jobs = (
            (
                f"{label}__{point_folder(point)}__{run.key}",
                partial(train_or_resume, run, root / label / point_folder(point) / run.key, name, devices=devices, quiet=True),
            )
            for label, cfg, points, _ in plans
            for point in points
            for run in plan_runs([with_strategy_kwargs(cfg, point)], orders, seeds)
        )
        problems = train_shared(jobs, root, workers=workers, claim_only=claim_only, argv=argv or [])
        if claim_only:
            return root / "tune.json"
        for problem in problems:
            print(f"{problem}; its unfinished run is resumed here", file=sys.stderr)
    summary: dict[str, Any] = {"name": name, "select_on": select_on, "orders": orders, "seeds": seeds, "overrides": list(overrides or []), "strategies": {}}
    total = sum(len(points) for _, _, points, _ in plans) * orders * seeds
    bar = tqdm(total=total, desc=f"tune {name}", unit="run", disable=True if quiet else None, dynamic_ncols=True, file=sys.stderr)
    try:
        for label, cfg, points, skipped in plans:
            strategy = cfg.tasks[0].strategy.name
            entry: dict[str, Any] = {
                "config": cfg.name,
                "strategy": strategy,
                "reference": strategy not in grids,
                "grid": {k: v for k, v in grids.get(strategy, {}).items() if k not in skipped},
                "skipped_keys": skipped,
                "points": [],
                "complete": False,
            }
            summary["strategies"][label] = entry
            for point in points:
                runs = {}
                for run in plan_runs([with_strategy_kwargs(cfg, point)], orders, seeds):
                    bar.set_postfix_str(f"{label} {point_folder(point)} {run.key}")
                    result = train_or_resume(run, root / label / point_folder(point) / run.key, name, devices=devices, quiet=True)
                    runs[run.key] = run_scores(result, select_on)
                    bar.update(1)
                entry["points"].append(summarise_point(point, runs))
                if not quiet:
                    score = entry["points"][-1]
                    bar.write(
                        f"{label} {point_folder(point)}: ACC {_fmt(score['score_mean'], score['score_std'])} "
                        f"on the {'validation parts' if select_on == 'val' else 'test split'}",
                        file=sys.stderr,
                    )
                _write(root, summary)  # partial results survive an interruption
            best = None if entry["reference"] else pick_best(entry["points"])
            entry.update({"complete": True, "pick_index": best, "pick": entry["points"][best]["values"] if best is not None else None})
            _write(root, summary)
    finally:  # an error is printed below the bar, not onto it
        bar.close()
    print(tune_markdown(summary))
    return root / "tune.json"


def _write(root: Path, summary: dict[str, Any]) -> None:
    atomic_write(root / "tune.json", json.dumps(summary, indent=2))
    atomic_write(root / "tune.md", tune_markdown(summary))


def load_picks(path: Path) -> dict[str, Any]:
    """The ``strategies`` of a ``tune.json`` (``path`` is the file or its folder)."""
    return load_tuning(path)["strategies"]


def load_tuning(path: Path) -> dict[str, Any]:
    """A ``tune.json`` (``path`` is the file or its folder), its ``strategies`` checked."""
    file = path / "tune.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"--tuned: no tune.json in {path} (give the folder exps/tune/<NAME> of a 'relaylearn tune' run)")
    try:
        summary = json.loads(file.read_text())
        strategies = summary["strategies"]
        if not isinstance(strategies, dict) or not all(isinstance(e, dict) and "config" in e and "strategy" in e for e in strategies.values()):
            raise ValueError("strategies: expected {label: {config, strategy, pick}}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--tuned: not a relaylearn tune output ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})", file) from None
    return summary


def selection_words(select_on: Any) -> str:
    """How a tuning picked, for the note beside tuned values."""
    if select_on == "val":
        return "selected on the validation parts"
    if select_on == "test":
        return "selected on the TEST split: optimistic"
    return "selection split not recorded"


def apply_picks(configs: list[RunConfig], path: Path, overrides: list[str] | None = None) -> tuple[list[RunConfig], str]:
    """``configs`` at the picks of the tuning in ``path`` (matched by config name, else by strategy
    name if that is unambiguous), and a markdown note saying which values came from where and on
    which split they were selected. A WARNING line on stderr when the tuning's ``--set`` items
    differ from ``overrides`` (the comparison's): its picks were made at another budget."""
    summary = load_tuning(path)
    strategies = summary["strategies"]
    tuned_sets = summary.get("overrides")
    if isinstance(tuned_sets, list) and sorted(map(str, tuned_sets)) != sorted(overrides or []):

        def said(items: list[Any]) -> str:
            return " ".join(f"--set {item}" for item in items) or "no --set"

        print(
            f"WARNING: --tuned: the tuning in {path} was made with {said(tuned_sets)}, this comparison runs with {said(overrides or [])}; "
            "its picks may not fit this budget (use the same --set for both)",
            file=sys.stderr,
        )
    how = selection_words(summary.get("select_on"))
    picked = {label: e for label, e in strategies.items() if e.get("complete") and isinstance(e.get("pick"), dict)}
    out, notes = [], []
    for cfg in configs:
        strategy = cfg.tasks[0].strategy.name
        entry = next((e for e in picked.values() if e["config"] == cfg.name), None)
        if entry is None:
            same = [e for e in picked.values() if e["strategy"] == strategy]
            entry = same[0] if len(same) == 1 else None
        if entry is None:
            if strategy in GRIDS:
                notes.append(f"{cfg.name}: no pick in the tuning, preset values")
            out.append(cfg)
            continue
        out.append(with_strategy_kwargs(cfg, entry["pick"]))
        notes.append(f"{cfg.name}: " + ", ".join(f"{k}={v}" for k, v in entry["pick"].items()) + f" (tuned on {entry['config']}, {how})")
    note = f"Strategy values from the tuning in {path}:\n\n" + "".join(f"- {n}\n" for n in notes) + "\n" if notes else ""
    return out, note


def run_tune(args) -> Path:
    """The ``relaylearn tune`` command (arguments from :mod:`relaylearn.cli`)."""
    return tune_strategies(
        args.configs,
        args.name.lstrip("="),
        orders=args.orders,
        seeds=args.seeds,
        grid_file=args.grid,
        select_on=args.select_on,
        data_root=args.data_root,
        overrides=args.sets,
        devices=args.gpus,
        quiet=args.quiet,
        exps_root=getattr(args, "exps_root", EXPS_ROOT),
        workers=getattr(args, "workers", 1),
        claim_only=getattr(args, "claim_only", False),
        argv=getattr(args, "argv", None),
    )
