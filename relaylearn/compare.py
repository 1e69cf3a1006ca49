"""``relaylearn compare``: run several strategies over site orders and seeds, then tabulate.

For every config × order × seed the whole relay is trained with :func:`run_training` into::

    exps/compare/<NAME>/<strategy>/order<k>_seed<s>/<config name>/<NAME>-o<k>-s<s>/

(each run has its own experiments root, so runs never share a site ledger). Orders: order 0 is
the config's ``current_tasks.task_ids``, order 1 its reverse, further orders are distinct random
permutations drawn with a fixed seed (the same for every config with the same sites, so all
strategies see the same orders). Seed s sets ``random_seed`` to the config's value + s.
Previous bundles named in ``checkpoint.load`` are dropped: every run starts from scratch.

A run whose ``metrics/matrix.json`` is complete is skipped; an interrupted one is resumed
(``TrainOptions(resume=True)``), so the command can simply be re-run after an interruption.

Outputs in ``exps/compare/<NAME>/``:

* ``table.csv`` / ``table.md`` — per strategy: ACC, BWT, forgetting, the mean Dice on the
  external sites (test sites never trained on), for replaying strategies the mean final replay
  fidelity (metrics/replay.json: last hop, mean over earlier sites) and the final MIA AUC (the
  black-box membership-inference AUC after the last hop, averaged over sites, see
  ``relaylearn audit``), each mean ± sample standard deviation over orders × seeds, and the wall
  time per run. ``table.csv`` has the columns ``strategy``, ``config`` (the config it came from),
  ``runs``, ``<metric>_mean`` / ``<metric>_std`` for ``acc``, ``bwt``, ``forgetting``,
  ``external_dice``, ``fidelity``, ``mia_auc`` and ``wall_s`` (empty where undefined), and
  ``wall_s_total``; ``table.md`` shows the same without ``config`` and ``wall_s_total``;
* ``matrices.json`` — ``{strategy: {"order<k>_seed<s>": {"order", "seed", "wall_seconds",
  "matrix": <matrix.json>, "replay_fidelity", "mia_auc"}}}`` (the last two null where the
  run wrote no ``metrics/replay.json`` / ``metrics/privacy.json``);
* ``paired_test.json`` and a section of ``table.md`` — relay against the other non-pooled method
  with the highest mean ACC, paired by order × seed, on ACC and forgetting: Wilcoxon
  signed-rank and paired t-test p-values (two-sided, scipy);
* ``comparison.png`` — ACC, forgetting and external Dice per strategy (mean ± std bars).

``--tuned exps/tune/<NAME>`` trains each strategy at its pick from ``relaylearn tune``.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from relaylearn.config import RunConfig, load_config
from relaylearn.devices import parse_devices, release_memory
from relaylearn.errors import ConfigError, DataError, UserError, resumes_by_rerunning
from relaylearn.files import EXPS_ROOT, atomic_write, check_output_name, csv_text
from relaylearn.replay_fidelity import mean_final_fidelity
from relaylearn.results import external_dice
from relaylearn.runner import TrainOptions, config_changes, resolved_config, run_training
from relaylearn.workers import check_workers, train_shared

ORDER_SEED = 20231024  # fixed: every strategy sees the same random orders
METRICS = ("acc", "bwt", "forgetting", "external_dice")


@dataclass
class CompareRun:
    """One relay of the comparison."""

    label: str  # strategy label (column "strategy" of the table)
    order_index: int
    seed_index: int
    order: list[int]  # task ids in training order
    config: RunConfig  # the reordered, reseeded config (named ``label``)
    source: str  # name of the config it came from

    @property
    def key(self) -> str:
        return f"order{self.order_index}_seed{self.seed_index}"


def check_distinct(config_specs: list[str]) -> None:
    """UserError naming the first config that ``-c`` lists twice."""
    twice = next((spec for i, spec in enumerate(config_specs) if spec in config_specs[:i]), None)
    if twice is not None:
        raise UserError(f"-c: the config {twice} is listed twice")


def site_orders(task_ids: list[int], count: int) -> list[list[int]]:
    """``count`` distinct orders: as given, reversed, then seeded random permutations."""
    total = math.factorial(len(task_ids))
    if count < 1:
        raise UserError(f"--orders {count}: expected at least 1")
    if count > total:
        raise UserError(f"--orders {count}: {len(task_ids)} site(s) have only {total} distinct order(s)")
    orders = [list(task_ids)]
    if count > 1 and list(reversed(task_ids)) != orders[0]:
        orders.append(list(reversed(task_ids)))
    rng = random.Random(ORDER_SEED)
    while len(orders) < count:
        candidate = list(task_ids)
        rng.shuffle(candidate)
        if candidate not in orders:
            orders.append(candidate)
    return orders[:count]


def reordered(cfg: RunConfig, order: list[int], seed: int, label: str) -> RunConfig:
    """``cfg`` training ``order`` with ``random_seed`` = ``seed``, named ``label``, from scratch."""
    by_id = {t.dataset.kwargs.task_id: t for t in cfg.tasks}
    tasks = [by_id[i].model_copy(update={"random_seed": seed, "checkpoint": by_id[i].checkpoint.model_copy(update={"load": None})}) for i in order]
    raw = json.loads(json.dumps(cfg.raw))  # a deep copy of plain YAML data
    raw.setdefault("common", {})["random_seed"] = seed
    raw.setdefault("current_tasks", {})["task_ids"] = list(order)
    return cfg.model_copy(update={"name": label, "tasks": tasks, "raw": raw})


def with_strategy_kwargs(cfg: RunConfig, values: dict[str, Any]) -> RunConfig:
    """``cfg`` with ``values`` set in every task's ``strategy.kwargs`` (validated; an alias of a
    key, e.g. EWC's ``lambda`` for ``lambda_``, is replaced, not duplicated)."""
    from relaylearn.strategies import get_strategy_class
    from relaylearn.strategies.base import parse_options

    if not values:
        return cfg
    options = get_strategy_class(cfg.tasks[0].strategy.name).Options
    names: dict[str, set[str]] = {}
    for key, field in options.model_fields.items():
        alias = field.validation_alias
        names[key] = {key, *(getattr(alias, "choices", None) or ([alias] if isinstance(alias, str) else []))}

    def updated(kwargs: dict[str, Any]) -> dict[str, Any]:
        out = dict(kwargs)
        for key, value in values.items():
            for name in next((n for n in names.values() if key in n), {key}):
                out.pop(name, None)
            out[key] = value
        return out

    tasks = []
    for task in cfg.tasks:
        kwargs = updated(task.strategy.kwargs)
        parse_options(get_strategy_class(task.strategy.name), kwargs, where=f"{cfg.name}: strategy.kwargs")
        tasks.append(task.model_copy(update={"strategy": task.strategy.model_copy(update={"kwargs": kwargs})}))
    raw = json.loads(json.dumps(cfg.raw))
    strategy = raw.setdefault("common", {}).setdefault("strategy", {})
    strategy["kwargs"] = updated(strategy.get("kwargs") or {})
    return cfg.model_copy(update={"tasks": tasks, "raw": raw})


def strategy_labels(configs: list[RunConfig]) -> list[str]:
    """The strategy name of each config, made unique with the config's file name where needed."""
    names = [c.tasks[0].strategy.name for c in configs]
    labels = []
    for cfg, name in zip(configs, names):
        label = name if names.count(name) == 1 else f"{name}-{Path(cfg.name).name}"
        while label in labels:
            label += "'"
        labels.append(label)
    return labels


def plan_runs(configs: list[RunConfig], orders: int, seeds: int) -> list[CompareRun]:
    if seeds < 1:
        raise UserError(f"--seeds {seeds}: expected at least 1")
    runs = []
    for cfg, label in zip(configs, strategy_labels(configs)):
        task_ids = [t.dataset.kwargs.task_id for t in cfg.tasks]
        if None in task_ids or len(set(task_ids)) != len(task_ids):
            raise UserError(f"config {cfg.name}: compare needs distinct task ids in current_tasks.task_ids", cfg.path)
        base_seed = cfg.tasks[0].random_seed
        for k, order in enumerate(site_orders(task_ids, orders)):
            for s in range(seeds):
                runs.append(CompareRun(label, k, s, order, reordered(cfg, order, base_seed + s, label), cfg.name))
    return runs


def expected_rows(run: CompareRun) -> int:
    from relaylearn.strategies import get_strategy_class

    pooled = get_strategy_class(run.config.tasks[0].strategy.name).pooled_training
    return 1 if pooled else len(run.order)


def is_complete(matrix: dict[str, Any] | None, rows: int) -> bool:
    return bool(matrix) and len(matrix.get("R", [])) == rows and "acc" in matrix


def final_mia_auc_of(privacy_path: Path) -> float | None:
    """Mean over sites of the black-box membership-inference AUC (image pixels) after the last
    audited hop of a run's ``metrics/privacy.json`` (None without one: no generators travel)."""
    from relaylearn.audit import final_mia_auc

    return final_mia_auc(json.loads(privacy_path.read_text())) if privacy_path.is_file() else None


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None where undefined)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarise(results: dict[str, dict[str, dict[str, Any]]], configs: dict[str, str]) -> list[dict[str, Any]]:
    """One row per strategy from ``matrices.json``-shaped ``results``."""
    rows = []
    for label, runs in results.items():
        row: dict[str, Any] = {"strategy": label, "config": configs[label], "runs": len(runs)}
        for metric in METRICS:
            values = [external_dice(r["matrix"]) if metric == "external_dice" else r["matrix"].get(metric) for r in runs.values()]
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std(values)
        row["fidelity_mean"], row["fidelity_std"] = mean_std([r.get("replay_fidelity") for r in runs.values()])
        row["mia_auc_mean"], row["mia_auc_std"] = mean_std([r.get("mia_auc") for r in runs.values()])
        walls = [r["wall_seconds"] for r in runs.values()]
        row["wall_s_mean"], row["wall_s_std"] = mean_std(walls)
        row["wall_s_total"] = sum(walls)
        rows.append(row)
    return rows


def _fmt(mean: float | None, std: float | None, digits: int = 3, signed: bool = False) -> str:
    if mean is None:
        return "n/a"
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text if std is None else f"{text} ± {std:.{digits}f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = "| strategy | runs | ACC | BWT | forgetting | external Dice | final replay fidelity | final MIA AUC | wall time / run (s) |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {r['runs']} | {_fmt(r['acc_mean'], r['acc_std'])} | {_fmt(r['bwt_mean'], r['bwt_std'], signed=True)} "
            f"| {_fmt(r['forgetting_mean'], r['forgetting_std'])} | {_fmt(r['external_dice_mean'], r['external_dice_std'])} "
            f"| {_fmt(r.get('fidelity_mean'), r.get('fidelity_std'))} | {_fmt(r.get('mia_auc_mean'), r.get('mia_auc_std'))} "
            f"| {_fmt(r['wall_s_mean'], r['wall_s_std'], digits=0)} |"
        )
    return "\n".join(lines) + "\n"


def csv_table(rows: list[dict[str, Any]]) -> str:
    return csv_text(rows, float_format="{:.10g}", fields=list(rows[0]) if rows else ["strategy"], lineterminator="\n")


#: a standard deviation of paired differences below this (relative to their mean) is float rounding
SPREAD_FLOOR = 1e-9


def paired_test(a: list[float], b: list[float]) -> dict[str, Any]:
    """Two-sided paired tests of ``a`` against ``b`` (same order × seed in the same position).

    ``wilcoxon_p``: Wilcoxon signed-rank test (scipy; exact null distribution for n ≤ 50 without
    ties, zero differences dropped); ``t_test_p``: paired t-test. None where undefined (n < 2,
    all differences zero, or for t no spread)."""
    from scipy import stats

    differences = [x - y for x, y in zip(a, b, strict=True)]
    mean, std = mean_std(differences)
    out: dict[str, Any] = {"n": len(differences), "mean_difference": mean, "std_difference": std, "wilcoxon_p": None, "t_test_p": None}
    if len(differences) >= 2 and any(d != 0 for d in differences):
        out["wilcoxon_p"] = float(stats.wilcoxon(a, b).pvalue)
        if std is not None and std > SPREAD_FLOOR * max(1.0, abs(mean)):  # equal differences up to rounding: t is undefined
            out["t_test_p"] = float(stats.ttest_rel(a, b).pvalue)
    return out


def relay_vs_best_other(results: dict[str, dict[str, dict[str, Any]]], strategies: dict[str, str]) -> dict[str, Any] | None:
    """Paired tests of relay against the other method with the highest mean ACC, over the runs
    (order × seed) both have, on ACC and forgetting. Pooled strategies (joint: an upper bound,
    not a relay) and further relay configs are not candidates. None without relay or a candidate."""
    from relaylearn.strategies import get_strategy_class

    relay = next((label for label, name in strategies.items() if name == "relay"), None)
    others = [label for label, name in strategies.items() if name != "relay" and not get_strategy_class(name).pooled_training]
    if relay is None or not others:
        return None
    mean_acc = {label: mean_std([r["matrix"].get("acc") for r in results[label].values()])[0] for label in others}
    best = max((label for label in others if mean_acc[label] is not None), key=lambda label: mean_acc[label], default=None)
    if best is None:
        return None
    both = sorted(set(results[relay]) & set(results[best]))
    same = lambda k: all(results[relay][k].get(f) == results[best][k].get(f) for f in ("order", "seed"))  # noqa: E731
    keys = [k for k in both if same(k)]  # a pair is the same site order and run seed, not merely the same position
    out: dict[str, Any] = {"relay": relay, "other": best, "runs": keys, "unpaired": [k for k in both if not same(k)]}
    for metric in ("acc", "forgetting"):
        a = [results[relay][k]["matrix"].get(metric) for k in keys]
        b = [results[best][k]["matrix"].get(metric) for k in keys]
        pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
        out[metric] = paired_test([x for x, _ in pairs], [y for _, y in pairs])
    return out


def paired_markdown(paired: dict[str, Any] | None) -> str:
    if paired is None:
        return "No paired test: it needs a relay config and another non-pooled strategy.\n"
    p = lambda v: "n/a" if v is None else f"{v:.3g}"  # noqa: E731
    lines = [
        f"Paired test, {paired['relay']} − {paired['other']} (the other method with the highest mean ACC; joint excluded), "
        f"over the {len(paired['runs'])} order × seed run(s) both have; two-sided:",
        "",
        "| metric | mean difference | Wilcoxon signed-rank p | paired t-test p |",
        "|---|---:|---:|---:|",
    ]
    for metric in ("acc", "forgetting"):
        t = paired[metric]
        lines.append(f"| {metric} | {_fmt(t['mean_difference'], t['std_difference'], signed=True)} | {p(t['wilcoxon_p'])} | {p(t['t_test_p'])} |")
    lines += ["", wilcoxon_floor_note(len(paired["runs"]))]
    if paired.get("unpaired"):
        lines.append(f"Left out (the two configs' site orders or seeds differ there): {', '.join(paired['unpaired'])}.")
    return "\n".join(lines) + "\n"


def wilcoxon_floor_note(n: int) -> str:
    """What n pairs allow: the smallest two-sided p of the exact Wilcoxon signed-rank test is 2/2^n."""
    if n < 2:
        return "Fewer than 2 pairs: no test."
    return f"With {n} pairs the smallest possible Wilcoxon p is {2 / 2**n:.3g}" + (
        " (more orders or seeds are needed to reach 0.05)." if 2 / 2**n > 0.05 else "."
    )


def plot_comparison(rows: list[dict[str, Any]], path: Path) -> None:
    """Horizontal bars (mean ± std) of ACC, forgetting and external Dice per strategy, as a PNG.
    Each axis spans 0 to 1 and further where a bar or its whisker reaches (forgetting can be
    negative: the final model is better on a site than any model before), with a line at 0."""
    import io

    from relaylearn.report.plots import new_figure

    panels = (("acc", "ACC (higher is better)"), ("forgetting", "forgetting (lower is better)"), ("external_dice", "external-site Dice"))
    fig = new_figure(10.0, 1.0 + 0.3 * len(rows))
    axes = fig.subplots(1, len(panels), sharey=True)
    ticks = list(range(len(rows)))
    for ax, (metric, title) in zip(axes, panels):
        means = [r[f"{metric}_mean"] if r[f"{metric}_mean"] is not None else math.nan for r in rows]
        stds = [r[f"{metric}_std"] or 0.0 for r in rows]
        ax.barh(ticks, means, xerr=stds, color="#1f77b4", ecolor="#333333", capsize=2, height=0.6)
        ax.set_title(title, fontsize=9)
        ends = [end for m, s in zip(means, stds) if not math.isnan(m) for end in (m - s, m + s)]
        low, high = min([0.0, *ends]), max([1.0, *ends])
        pad = 0.03 * (high - low)  # keeps a whisker's cap off the frame
        ax.set_xlim(low - pad if low < 0 else 0.0, high + pad if high > 1 else 1.0)
        ax.axvline(0.0, color="#444444", linewidth=0.8)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ticks, [r["strategy"] for r in rows])
    axes[0].invert_yaxis()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", facecolor="white")
    atomic_write(path, buffer.getvalue())


def check_before_runs(configs: list[RunConfig], devices: str | None) -> None:
    """``-g`` and every site's data root, checked before the first of many runs (inside a run they
    would fail only after the configs and networks were built, amid the progress output)."""
    parse_devices(devices)
    for cfg in configs:
        for ds in [*cfg.test_datasets, *(t.dataset for t in cfg.tasks)]:
            if not Path(ds.root).is_dir():
                raise DataError("data root not found", ds.root)


def train_or_resume(run: CompareRun, run_root: Path, name: str, *, devices: str | None = None, quiet: bool = False, header: str = "") -> dict[str, Any]:
    """Train ``run`` under ``run_root`` unless its matrix is complete (an interrupted run resumes).

    Returns ``{"order", "seed", "wall_seconds", "matrix"}``; the wall time adds up over resumptions."""
    run_name = f"{name}-o{run.order_index}-s{run.seed_index}"
    matrix_path = run_root / run.config.name / run_name / "metrics" / "matrix.json"
    timing_path = run_root / "wall_seconds.json"
    matrix = json.loads(matrix_path.read_text()) if matrix_path.is_file() else None
    wall = json.loads(timing_path.read_text())["wall_seconds"] if timing_path.is_file() else 0.0
    if is_complete(matrix, expected_rows(run)):
        changes = config_changes(matrix_path.parent.parent, resolved_config(run.config), [d.site for d in run.config.test_datasets])
        if changes:
            raise ConfigError(f"{name}: this run was trained with another config ({changes}); a new budget or seed needs a new -n", matrix_path.parent.parent)
        _say(quiet or not header, f"{header}: done, skipping")
    else:
        _say(quiet or not header, f"{header}: training")
        started = time.time()
        try:
            with resumes_by_rerunning():
                result = run_training(run.config, run_name, TrainOptions(devices=devices, quiet=quiet, resume=True, exps_root=run_root))
            matrix = result.matrix
            del result
            release_memory()  # the next run of this process starts from the same footprint
        finally:  # also when stopped (Ctrl-C, an error): the time trained so far counts when the run resumes
            wall += time.time() - started
            timing_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(timing_path, json.dumps({"wall_seconds": wall}))
    replay_path = matrix_path.with_name("replay.json")
    return {
        "order": run.order,
        "seed": run.config.tasks[0].random_seed,
        "wall_seconds": wall,
        "matrix": matrix,
        "replay_fidelity": mean_final_fidelity(json.loads(replay_path.read_text())) if replay_path.is_file() else None,
        "mia_auc": final_mia_auc_of(matrix_path.parent / "privacy.json"),
    }


def compare_strategies(
    config_specs: list[str],
    name: str,
    *,
    orders: int = 2,
    seeds: int = 1,
    data_root: str | None = None,
    overrides: list[str] | None = None,
    devices: str | None = None,
    quiet: bool = False,
    exps_root: Path = EXPS_ROOT,
    tuned: str | None = None,
    workers: int = 1,
    claim_only: bool = False,
    argv: list[str] | None = None,
) -> Path:
    """Run (or resume) every config × order × seed and write the tables; returns ``table.md``.

    ``tuned``: a ``relaylearn tune`` output folder; each config with a pick there trains at it.
    ``workers`` > 1: helper processes of the command ``argv`` share the runs
    (:mod:`relaylearn.workers`); ``claim_only``: be such a helper (train claimed runs, write nothing)."""
    check_workers(workers)
    check_output_name(name, "comparison")
    check_distinct(config_specs)
    configs = [load_config(spec.lstrip("="), overrides, data_root) for spec in config_specs]
    tuned_note = ""
    if tuned is not None:
        from relaylearn.tune import apply_picks

        configs, tuned_note = apply_picks(configs, Path(tuned.lstrip("=")), overrides)
    check_before_runs(configs, devices)
    runs = plan_runs(configs, orders, seeds)
    root = Path(exps_root) / "compare" / name
    results: dict[str, dict[str, dict[str, Any]]] = {}
    config_names = {run.label: run.source for run in runs}
    if claim_only or workers > 1:
        jobs = ((f"{run.label}__{run.key}", partial(train_or_resume, run, root / run.label / run.key, name, devices=devices, quiet=True)) for run in runs)
        problems = train_shared(jobs, root, workers=workers, claim_only=claim_only, argv=argv or [])
        if claim_only:
            return root / "table.md"
        for problem in problems:
            _say(quiet, f"{problem}; its unfinished run is resumed here")
    for i, run in enumerate(runs, 1):
        header = f"[{i}/{len(runs)}] {run.label} order {run.order} seed {run.config.tasks[0].random_seed}"
        results.setdefault(run.label, {})[run.key] = train_or_resume(run, root / run.label / run.key, name, devices=devices, quiet=quiet, header=header)
    rows = summarise(results, config_names)
    table = markdown_table(rows)
    paired = relay_vs_best_other(results, {label: cfg.tasks[0].strategy.name for label, cfg in zip(strategy_labels(configs), configs)})
    atomic_write(root / "matrices.json", json.dumps(results, indent=2))
    atomic_write(root / "table.csv", csv_table(rows))
    atomic_write(root / "paired_test.json", json.dumps(paired, indent=2))
    plot_comparison(rows, root / "comparison.png")
    atomic_write(
        root / "table.md",
        f"# {name}: {orders} order(s) × {seeds} seed(s), mean ± std\n\n{tuned_note}{table}\n{paired_markdown(paired)}\n![comparison](comparison.png)\n",
    )
    from relaylearn.report import write_report

    report = write_report(root)
    print(table + "\n" + paired_markdown(paired) + f"\nreport: {report}")
    return root / "table.md"


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def run_compare(args) -> Path:
    """The ``relaylearn compare`` command (arguments from :mod:`relaylearn.cli`)."""
    return compare_strategies(
        args.configs,
        args.name.lstrip("="),
        orders=args.orders,
        seeds=args.seeds,
        data_root=args.data_root,
        overrides=args.sets,
        devices=args.gpus,
        quiet=args.quiet,
        exps_root=getattr(args, "exps_root", EXPS_ROOT),
        tuned=getattr(args, "tuned", None),
        workers=getattr(args, "workers", 1),
        claim_only=getattr(args, "claim_only", False),
        argv=getattr(args, "argv", None),
    )
