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
  external sites (test sites never trained on) and, for replaying strategies, the mean final
  replay fidelity (metrics/replay.json: last hop, mean over earlier sites), each mean ± sample
  standard deviation over orders × seeds, and the wall time per run;
* ``matrices.json`` — ``{strategy: {"order<k>_seed<s>": {"order", "seed", "wall_seconds",
  "matrix": <matrix.json>}}}``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relaylearn.config import RunConfig, load_config
from relaylearn.errors import UserError
from relaylearn.runner import EXPS_ROOT, TrainOptions, atomic_write_text, run_training
from relaylearn.replay_fidelity import mean_final_fidelity

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


def external_dice(matrix: dict[str, Any]) -> float | None:
    """Mean of the last row of R over the sites never trained on (None when there are none)."""
    trained = {site for name in matrix["trained"] for site in name.split("+")}
    columns = [j for j, site in enumerate(matrix["sites"]) if site not in trained]
    if not columns or not matrix["R"]:
        return None
    last = matrix["R"][-1]
    return sum(last[j] for j in columns) / len(columns)


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
        fidelity = [r.get("replay_fidelity") for r in runs.values()]  # mean final replay fidelity (relay runs)
        row["fidelity_mean"], row["fidelity_std"] = mean_std(fidelity)
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
    header = "| strategy | runs | ACC | BWT | forgetting | external Dice | final replay fidelity | wall time / run (s) |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {r['runs']} | {_fmt(r['acc_mean'], r['acc_std'])} | {_fmt(r['bwt_mean'], r['bwt_std'], signed=True)} "
            f"| {_fmt(r['forgetting_mean'], r['forgetting_std'])} | {_fmt(r['external_dice_mean'], r['external_dice_std'])} "
            f"| {_fmt(r.get('fidelity_mean'), r.get('fidelity_std')) if r.get('fidelity_mean') is not None else '–'} | {_fmt(r['wall_s_mean'], r['wall_s_std'], digits=0)} |"
        )
    return "\n".join(lines) + "\n"


def csv_table(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["strategy"], lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return out.getvalue()


def compare_strategies(
    config_specs: list[str], name: str, *, orders: int = 2, seeds: int = 1, data_root: str | None = None,
    overrides: list[str] | None = None, devices: str | None = None, quiet: bool = False, exps_root: Path = EXPS_ROOT,
) -> Path:
    """Run (or resume) every config × order × seed and write the tables; returns ``table.md``."""
    if not name or any(c in name for c in " /\\"):
        raise UserError(f"-n {name!r}: comparison name must be non-empty without spaces or slashes")
    if len(set(config_specs)) != len(config_specs):
        raise UserError("-c: a config is listed twice")
    configs = [load_config(spec.lstrip("="), overrides, data_root) for spec in config_specs]
    runs = plan_runs(configs, orders, seeds)
    root = Path(exps_root) / "compare" / name
    results: dict[str, dict[str, dict[str, Any]]] = {}
    config_names = {run.label: run.source for run in runs}
    for i, run in enumerate(runs, 1):
        run_root = root / run.label / run.key
        run_name = f"{name}-o{run.order_index}-s{run.seed_index}"
        matrix_path = run_root / run.config.name / run_name / "metrics" / "matrix.json"
        timing_path = run_root / "wall_seconds.json"
        matrix = json.loads(matrix_path.read_text()) if matrix_path.is_file() else None
        wall = json.loads(timing_path.read_text())["wall_seconds"] if timing_path.is_file() else 0.0
        header = f"[{i}/{len(runs)}] {run.label} order {run.order} seed {run.config.tasks[0].random_seed}"
        if is_complete(matrix, expected_rows(run)):
            _say(quiet, f"{header}: done, skipping")
        else:
            _say(quiet, f"{header}: training")
            started = time.time()
            result = run_training(run.config, run_name, TrainOptions(devices=devices, quiet=quiet, resume=True, exps_root=run_root))
            matrix = result.matrix
            wall += time.time() - started
            atomic_write_text(timing_path, json.dumps({"wall_seconds": wall}))
        replay_path = matrix_path.with_name("replay.json")
        fidelity = mean_final_fidelity(json.loads(replay_path.read_text())) if replay_path.is_file() else None
        results.setdefault(run.label, {})[run.key] = {"order": run.order, "seed": run.config.tasks[0].random_seed, "wall_seconds": wall, "matrix": matrix, "replay_fidelity": fidelity}
    rows = summarise(results, config_names)
    table = markdown_table(rows)
    atomic_write_text(root / "matrices.json", json.dumps(results, indent=2))
    atomic_write_text(root / "table.csv", csv_table(rows))
    atomic_write_text(root / "table.md", f"# {name}: {orders} order(s) × {seeds} seed(s), mean ± std\n\n{table}")
    print(table)
    return root / "table.md"


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def run_compare(args) -> Path:
    """The ``relaylearn compare`` command (arguments from :mod:`relaylearn.cli`)."""
    return compare_strategies(
        args.configs, args.name.lstrip("="), orders=args.orders, seeds=args.seeds, data_root=args.data_root,
        overrides=args.sets, devices=args.gpus, quiet=args.quiet, exps_root=getattr(args, "exps_root", EXPS_ROOT),
    )
