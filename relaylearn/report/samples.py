"""What the report shows of the final model itself: predictions on chosen test images (worst,
median and best by the per-image CSV), the replayed pairs of a relay run next to real ones, and
the hop chain of the last bundle."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from relaylearn.errors import DataError
from relaylearn.imaging import colour_mask, overlay, rgb_or_grey, to_uint8
from relaylearn.report.runs import Run

CASES = ("worst", "median", "best")
#: rows of an image panel: [(row label, [(uint8 image [H,W] or [H,W,3], caption), ...])]
PanelRows = list[tuple[str, list[tuple[np.ndarray, str]]]]


@dataclass
class FinalModel:
    """The last bundle of a run, read without a trust folder (the report verifies nothing)."""

    bundle: Any  # relaylearn.bundle.Bundle
    strategy: Any  # relaylearn.strategies.Strategy, on the CPU, eval mode
    task: Any  # relaylearn.config.TaskConfig


def load_final_model(path: Path) -> FinalModel:
    from relaylearn.assembly import strategy_from_bundle
    from relaylearn.bundle import read_bundle

    bundle = read_bundle(path, trust=None, allow_unsigned=True)
    strategy, task = strategy_from_bundle(bundle, _run_plugins(path.parent.parent))
    return FinalModel(bundle, strategy.to("cpu").eval(), task)


def _run_plugins(run_dir: Path) -> set[str]:
    """Plug-in names (``package.module:Name``) the run's own local config used: the only ones its
    bundles may name (nothing named by a bundle alone is imported)."""
    try:
        tasks = yaml.safe_load((run_dir / "resolved_config.yaml").read_text())
        names = {t[block]["name"] for t in tasks for block in ("strategy", "model", "dataset")}
    except (OSError, yaml.YAMLError, TypeError, KeyError):
        return set()
    return {n for n in names if isinstance(n, str) and ":" in n}


def _training_root(run: Run) -> str | None:
    """The data root the run really trained on (``--data-root`` is not in config.yaml)."""
    try:
        tasks = yaml.safe_load((run.path / "resolved_config.yaml").read_text())
        root = tasks[0]["dataset"]["kwargs"]["root_path"]
    except (OSError, yaml.YAMLError, TypeError, KeyError, IndexError):
        return None
    return root if isinstance(root, str) else None


def load_test_split(run: Run, site: str, task: Any, cache: dict) -> Any:
    """Test split of ``site`` (SiteData) as the run's config locates it, preprocessed as the
    model expects (its img_size, out_range, channels). Raises DataError/ConfigError if missing."""
    from relaylearn.assembly import load_split
    from relaylearn.config import load_config

    config_path = run.path / "config.yaml"
    if not config_path.is_file():
        raise DataError("no config.yaml: cannot locate the test data", run.path)
    cfg = load_config(str(config_path), data_root=_training_root(run))
    matches = [d for d in cfg.test_datasets if d.site == site]
    if not matches:
        raise DataError(f"site {site} is not in the run's config", config_path)
    k = task.dataset.kwargs
    ds = matches[0]
    ds = ds.model_copy(update={"kwargs": ds.kwargs.model_copy(update={"img_size": tuple(k.img_size), "out_range": tuple(k.out_range), "channels": k.channels})})
    key = ds.model_dump_json() + ds.root
    if key not in cache:
        cache[key] = load_split(ds, "test")
    return cache[key]


def choose_cases(rows: list[dict], task_id: str | None, site: str) -> list[tuple[str, str, float]]:
    """(case, image name, Dice) of the worst, median and best image of ``site`` for the final model."""
    scored = sorted(
        (r["dice_sample"], r["name"]) for r in rows
        if r.get("test_site") == site and (task_id is None or str(r.get("task_id")) == task_id) and isinstance(r.get("dice_sample"), float)
    )  # fmt: skip
    if not scored:
        return []
    picks = {"worst": scored[0], "median": scored[(len(scored) - 1) // 2], "best": scored[-1]}
    seen, out = set(), []
    for case in CASES:
        dice, name = picks[case]
        if name not in seen:
            seen.add(name)
            out.append((case, name, dice))
    return out


def _index_of(names: list[str], name: str) -> int | None:
    if name in names:
        return names.index(name)
    stems = [Path(n).stem for n in names]
    return stems.index(Path(name).stem) if Path(name).stem in stems else None


@torch.no_grad()
def prediction_rows(run: Run, model: FinalModel, data_for: Callable[[str], Any], notes: list[str]) -> PanelRows:
    """One row per test site: (image, truth, prediction) for the worst, median and best image."""
    k = model.task.dataset.kwargs
    task_id = run.final_task_id()
    rows = []
    for site in run.sites:
        cases = choose_cases(run.per_image, task_id, site)
        if not cases:
            notes.append(f"{site}: no per-image scores of the final model in the per-image CSV")
            continue
        try:
            data = data_for(site)
        except Exception as exc:  # noqa: BLE001 - missing data is a note, not a crash
            notes.append(f"{site}: test images not available ({exc})")
            continue
        picked = [(case, name, dice, _index_of(list(data.names), name)) for case, name, dice in cases]
        missing = [name for _, name, _, i in picked if i is None]
        if missing:
            notes.append(f"{site}: image {missing[0]} of the per-image CSV is not in the test data")
        picked = [p for p in picked if p[3] is not None]
        if not picked:
            continue
        index = torch.tensor([p[3] for p in picked])
        images = data.images[index]
        prediction = model.strategy.solver(images).argmax(1).numpy()
        truth = data.labels[index].numpy()
        pixels = to_uint8(images, k.out_range)
        cells = []
        for (case, name, dice, _), image, t, p in zip(picked, pixels, truth, prediction):
            cells += [(rgb_or_grey(image), f"{case} · {Path(name).stem}"), (overlay(image, t), "truth"), (overlay(image, p), f"prediction · Dice {dice:.3f}")]
        rows.append((site, cells))
    return rows


@torch.no_grad()
def replay_rows(model: FinalModel, data_for: Callable[[str], Any], notes: list[str], per_site: int = 6) -> list[tuple[str, PanelRows]]:
    """(site, panel rows) of replayed image/mask pairs next to real test pairs of the same site."""
    strategy = model.strategy
    if not strategy.replays():
        notes.append(f"strategy '{model.bundle.manifest.get('strategy')}' has no previews() to draw replayed pairs")
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        previews = strategy.previews(per_site=per_site)
    if not previews:
        notes.append("the generators know no earlier site yet")
        return []
    out = []
    for site, (images, labels) in previews.items():
        fake = to_uint8(images, (-1.0, 1.0))
        rows: PanelRows = [("replayed images", [(rgb_or_grey(im), "") for im in fake]), ("replayed masks", [(colour_mask(m), "") for m in labels.numpy()])]
        try:
            data = data_for(site)
            real = to_uint8(data.images[:per_site], model.task.dataset.kwargs.out_range)
            rows += [("real images", [(rgb_or_grey(im), "") for im in real]), ("real masks", [(colour_mask(m), "") for m in data.labels[:per_site].numpy()])]
        except Exception as exc:  # noqa: BLE001
            notes.append(f"{site}: real images not available for comparison ({exc})")
        out.append((site, rows))
    return out


def hop_rows(bundle: Any) -> list[dict[str, str]]:
    """The hop chain of ``bundle``: one row per site visited, oldest first."""
    from datetime import datetime

    def duration(start: str, end: str) -> str:
        try:
            seconds = (datetime.strptime(end, "%Y-%m-%dT%H:%M:%SZ") - datetime.strptime(start, "%Y-%m-%dT%H:%M:%SZ")).total_seconds()
        except (TypeError, ValueError):
            return "?"
        return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"

    lineage = list(bundle.lineage)
    rows = []
    for hop, produced in zip(bundle.hops, lineage):
        rows.append({
            "order": str(hop["order"]), "site": hop["site"], "started": hop["started_utc"], "finished": hop["finished_utc"],
            "duration": duration(hop["started_utc"], hop["finished_utc"]), "signer": hop.get("signer") or "unsigned",
            "parent": hop.get("parent_sha256") or "", "bundle": produced,
        })  # fmt: skip
    return rows
