"""Reading run folders for the report: ``metrics/matrix.json``, the results CSVs, ``run.json``,
``config.yaml`` and the bundles. Anything missing becomes a note, never an exception."""

from __future__ import annotations

import csv
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from relaylearn import results
from relaylearn.errors import DataError, UserError

MATRIX = Path("metrics") / "matrix.json"


@dataclass
class Run:
    """One run folder ``exps/<config>/<name>/`` as the report sees it."""

    label: str  # how the report names the run (strategy folder, or config name)
    path: Path
    matrix: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)  # run.json
    config: dict[str, Any] | None = None  # config.yaml (raw: without --set overrides)
    resolved: list[dict[str, Any]] | None = None  # resolved_config.yaml: each trained site's config as it ran; None: unreadable
    configured: list[str] | None = None  # the sites the config trains, in order (resolved_config.yaml); None: unknown
    results: list[dict[str, Any]] = field(default_factory=list)  # summary rows of one results CSV
    per_image: list[dict[str, Any]] = field(default_factory=list)
    results_file: Path | None = None
    notes: list[str] = field(default_factory=list)  # problems met while reading

    @property
    def sites(self) -> list[str]:
        return list(self.matrix.get("sites", []))

    @property
    def trained(self) -> list[str]:
        return list(self.matrix.get("trained", []))

    @property
    def R(self) -> list[list[float]]:
        return [[float(v) for v in row] for row in self.matrix.get("R", [])]

    def setting(self, *keys: str) -> Any:
        """A setting the run trained with: from resolved_config.yaml (``--set`` overrides and an
        adopted recipe included), else from config.yaml's ``common`` (older run folders); None if unknown."""
        for tree in ((self.resolved or [None])[0], (self.config or {}).get("common")):
            value = _get(tree, *keys)
            if value is not None:
                return value
        return None

    @property
    def strategy(self) -> str | None:
        name = self.setting("strategy", "name")
        return name if isinstance(name, str) else None

    def plugins(self) -> list[str]:
        """ "plug-in <what> '<name>'" for each strategy, model or data layout of the run named as a
        plug-in (``package.module:Name``): code the report never imports from a run folder."""
        from relaylearn.plugins import is_plugin

        found: dict[str, str] = {}
        for tree in (*(self.resolved or []), (self.config or {}).get("common")):
            for block, what in (("strategy", "strategy"), ("model", "model"), ("dataset", "data layout")):
                name = _get(tree, block, "name")
                if isinstance(name, str) and is_plugin(name):
                    found.setdefault(name, what)
        return [f"plug-in {what} '{name}'" for name, what in found.items()]

    def trained_columns(self) -> list[list[int]]:
        """Columns of R belonging to each trained row (several for pooled training 'A+B')."""
        return results.trained_columns(self.sites, self.trained)

    def external_columns(self) -> list[int]:
        """Columns of the test-only sites (the configured sites still to train are not external)."""
        return results.external_columns(self.sites, self.trained, self.configured)

    def external_sites(self) -> set[str]:
        return {self.sites[j] for j in self.external_columns()}

    def missing_sites(self) -> list[str]:
        """The configured sites not trained yet: an unfinished (interrupted) run has some."""
        done = {site for name in self.trained for site in name.split("+")}
        return [site for site in self.configured or [] if site not in done]

    def final_task_id(self) -> str | None:
        """task_id of the last trained row: from the results CSV, else resolved_config.yaml (a
        pooled row 'A+B' has the id of its first site)."""
        if not self.trained:
            return None
        for row in self.results:
            if row.get("trained_site") == self.trained[-1]:
                return str(row.get("task_id"))
        first = self.trained[-1].split("+")[0]
        ids = [_get(t, "dataset", "kwargs", "task_id") for t, site in zip(self.resolved or [], self.configured or []) if site == first]
        return str(ids[0]) if ids and ids[0] is not None else None

    def final_bundle(self) -> Path:
        """``bundles/task_<id>.relay`` of the last trained row; DataError naming what is missing
        (never another bundle: its predictions would not be the final model's)."""
        task_id = self.final_task_id()
        if task_id is None:
            raise DataError("no final bundle: the last trained row's task id is unknown (no results CSV, no resolved_config.yaml)")
        path = self.path / "bundles" / f"task_{task_id}.relay"
        if not path.is_file():
            raise DataError(f"no bundles/{path.name} (the bundle of the last trained row, {self.trained[-1]}): the final model cannot be re-run")
        return path


def _get(tree: Any, *keys: str) -> Any:
    """``tree[k1][k2]...``, None where a level is missing or not a mapping."""
    for key in keys:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def _number(value: str) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows with numeric-looking values as floats (ids and names stay strings)."""
    keep = {"task_id", "trained_site", "test_site", "name"}
    with path.open(newline="") as fh:
        return [{k: (v if k in keep else _number(v)) for k, v in row.items()} for row in csv.DictReader(fh)]


def _pick_results(run: Run) -> None:
    """The results CSV covering the most trained rows (newest on ties) and its per-image CSV."""
    folder = run.path / "test_results"
    candidates = sorted(folder.glob("results_*.csv")) if folder.is_dir() else []
    if not candidates:
        run.notes.append("no test_results/results_*.csv: Dice intervals and prediction examples are not available")
        return
    best, best_key = None, None
    for path in candidates:
        try:
            rows = read_csv(path)
        except (OSError, csv.Error, UnicodeDecodeError) as exc:
            run.notes.append(f"{path.name} unreadable: {exc}")
            continue
        key = (len({r.get("trained_site") for r in rows} & set(run.trained)), path.name)
        if best_key is None or key > best_key:
            best, best_key = (path, rows), key
    if best is None:
        return
    run.results_file, run.results = best
    per_image = best[0].with_name(best[0].name.replace("results_", "per_image_", 1))
    if per_image.is_file():
        try:
            run.per_image = read_csv(per_image)
        except (OSError, csv.Error, UnicodeDecodeError) as exc:
            run.notes.append(f"{per_image.name} unreadable: {exc}")
    else:
        run.notes.append(f"no {per_image.name}: prediction examples cannot be chosen")


def _matrix_problem(matrix: Any) -> str | None:
    if not isinstance(matrix, dict):
        return "is not a JSON object"
    sites, trained, R = matrix.get("sites"), matrix.get("trained"), matrix.get("R")
    if not isinstance(sites, list) or not isinstance(trained, list) or not isinstance(R, list):
        return "needs lists 'sites', 'trained' and 'R'"
    if len(R) != len(trained) or any(not isinstance(row, list) or len(row) != len(sites) for row in R):
        return f"R must have {len(trained)} rows of {len(sites)} values"
    try:
        [float(v) for row in R for v in row]
    except (TypeError, ValueError):
        return "R holds non-numbers"
    return None


def load_run(path: Path, label: str | None = None) -> Run:
    """Read one run folder; UserError only when matrix.json itself is unusable.

    ``label`` defaults to the config name in run.json (e.g. ``fundus/relay``), else the folder's parent.
    """
    matrix_path = path / MATRIX
    try:
        matrix = json.loads(matrix_path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the result matrix: {exc}", matrix_path) from None
    problem = _matrix_problem(matrix)
    if problem:
        raise UserError(f"result matrix {problem}", matrix_path)
    run = Run(label=label or path.parent.name or path.name, path=path, matrix=matrix)
    try:
        info = json.loads((path / "run.json").read_text())
    except (OSError, ValueError):
        info = None
    if isinstance(info, dict):
        run.info = info
        if label is None and isinstance(info.get("config"), str):
            run.label = info["config"]
    else:
        run.notes.append("no readable run.json")
    try:
        config = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        config = None
    if isinstance(config, dict):
        run.config = config
    else:
        run.notes.append("no readable config.yaml")
    run.resolved = read_resolved(path)
    run.configured = configured_sites(run.resolved)
    missing = run.missing_sites()
    if missing:
        done = len(run.configured) - len(missing)
        run.notes.append(
            f"{done} of {len(run.configured)} configured sites trained ({', '.join(missing)} not yet): the run is unfinished; {resume_hint(run.info)}"
        )
    _pick_results(run)
    return run


def read_resolved(path: Path) -> list[dict[str, Any]] | None:
    """The run's ``resolved_config.yaml`` (one mapping per trained site); None where it is
    missing or not such a list."""
    try:
        tasks = yaml.safe_load((path / "resolved_config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return tasks if isinstance(tasks, list) and tasks and all(isinstance(t, dict) for t in tasks) else None


def configured_sites(resolved: list[dict[str, Any]] | None) -> list[str] | None:
    """The sites the run's config trains (``current_tasks``, in order) from its resolved config;
    None where it is unknown."""
    from pydantic import ValidationError

    from relaylearn.config import DatasetConfig

    try:
        return [DatasetConfig.model_validate(task["dataset"]).site for task in resolved or []] or None
    except (KeyError, ValidationError):
        return None


def resume_hint(info: dict[str, Any]) -> str:
    """How to finish an unfinished run: its ``relaylearn train`` command with ``--resume``
    (``compare``, ``tune`` and the demo resume their unfinished runs when run again)."""
    argv = [str(a) for a in info.get("argv") or []]
    if len(argv) > 1 and argv[1] == "train":
        return "resume it with: relaylearn " + shlex.join(argv[1:] + ([] if "--resume" in argv else ["--resume"]))
    if argv:
        return f"running the command that started it again resumes it: {shlex.join(argv)}"
    return "resume it with: relaylearn train -c CONFIG -n NAME --resume"


def find_runs(run_dir: Path, name: str | None = None) -> list[Run]:
    """One run (``run_dir`` holds metrics/matrix.json) or every ``run_dir/<strategy>/<name>/``.

    Without ``name`` every ``<strategy>/<any name>`` run is collected (labelled ``strategy/name``
    when several names occur). UserError when nothing is found.
    """
    run_dir = Path(run_dir)
    if (run_dir / MATRIX).is_file():
        return [load_run(run_dir)]
    pattern = f"*/{name}/{MATRIX.as_posix()}" if name else f"*/*/{MATRIX.as_posix()}"
    found = sorted(p.parent.parent for p in run_dir.glob(pattern))
    if not found:
        where = f"{run_dir}/<strategy>/{name}/" if name else f"{run_dir}/ or {run_dir}/<strategy>/<name>/"
        raise UserError(f"no run found: expected {MATRIX.as_posix()} in {where}", run_dir)
    several_names = len({p.name for p in found}) > 1
    return [load_run(p, f"{p.parent.name}/{p.name}" if several_names else p.parent.name) for p in found]


# ----- derived numbers ---------------------------------------------------------------------------
def dice_series(run: Run) -> dict[str, list[tuple[float, float, float]]]:
    """Test site → [(mean, ci_low, ci_high) after each trained row]; from the results CSV,
    falling back to R (no interval: low = high = mean) where a row is missing."""
    by_key = {(r.get("trained_site"), r.get("test_site")): r for r in run.results}
    out: dict[str, list[tuple[float, float, float]]] = {}
    for j, site in enumerate(run.sites):
        series = []
        for i, trained in enumerate(run.trained):
            row = by_key.get((trained, site))
            if row is not None and isinstance(row.get("dice_sample"), float):
                mean = row["dice_sample"]
                low, high = row.get("dice_sample_ci_low", mean), row.get("dice_sample_ci_high", mean)
                series.append((mean, low if isinstance(low, float) else mean, high if isinstance(high, float) else mean))
            else:
                series.append((run.R[i][j],) * 3)
        out[site] = series
    return out
