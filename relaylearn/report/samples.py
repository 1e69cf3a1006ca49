"""What the report shows of the final model itself: predictions on chosen test images (worst,
median and best by the per-image CSV), the replayed pairs of a relay run next to real ones, and
the hop chain of the last bundle."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


def read_final_bundle(run: Run) -> Any:
    """The run's final bundle (relaylearn.bundle.Bundle; its signature is not checked); DataError
    when it is missing, unreadable or has fewer hops than the run trained sites (not the final model)."""
    from relaylearn.bundle import read_bundle
    from relaylearn.errors import RelayError

    path = run.final_bundle()
    try:
        bundle = read_bundle(path, trust=None, allow_unsigned=True)
    except RelayError as exc:
        raise DataError(f"bundle {path.name} could not be read: {exc.message}") from None
    if len(bundle.hops) < len(run.trained):
        raise DataError(f"bundles/{path.name} has {len(bundle.hops)} hop(s) but the run trained {len(run.trained)} site(s): it is not the final model's bundle")
    return bundle


def load_final_model(bundle: Any) -> FinalModel:
    """The strategy that wrote ``bundle``. Only built-in names resolve: a plug-in named by the
    bundle or the run folder is never imported (VerificationError)."""
    from relaylearn.assembly import strategy_from_bundle

    strategy, task = strategy_from_bundle(bundle)
    return FinalModel(bundle, strategy.to("cpu").eval(), task)


def test_dataset(run: Run, site: str) -> Any:
    """The DatasetConfig the run tested ``site`` with: its resolved_config.yaml entry for a trained
    site, else :func:`_test_only_dataset`. DataError/ConfigError where it cannot be told."""
    from relaylearn.config import DatasetConfig
    from relaylearn.plugins import is_plugin

    trained = dict(zip(run.configured or [], run.resolved or []))
    ds = DatasetConfig.model_validate(trained[site]["dataset"]) if site in trained else _test_only_dataset(run, site)
    if is_plugin(ds.name):
        raise DataError(f"plug-in data layout '{ds.name}' is never imported from a run folder")
    return ds


def _test_only_dataset(run: Run, site: str) -> Any:
    """config.yaml's entry for ``site`` with the run's changes to ``dataset`` (``--set``, an adopted
    recipe: where resolved_config.yaml differs from config.yaml) applied as the run applied them;
    older run folders without resolved_config.yaml: config.yaml as it is."""
    from relaylearn.config import load_config
    from relaylearn.recipe import flatten

    config_path = run.path / "config.yaml"
    if not config_path.is_file():
        raise DataError("no config.yaml: cannot locate the test data", run.path)
    root = run.setting("dataset", "kwargs", "root_path")  # where the run read its data (--data-root is not in config.yaml)
    root = root if isinstance(root, str) else None
    cfg = load_config(str(config_path), data_root=root)
    if run.resolved:
        ran, given = flatten(run.resolved[0].get("dataset") or {}), flatten(cfg.tasks[0].dataset.model_dump(mode="json"))
        changes = [f"dataset.{k}={json.dumps(v)}" for k, v in ran.items() if k in given and given[k] != v]
        cfg = load_config(str(config_path), changes, data_root=root) if changes else cfg
    matches = [d for d in cfg.test_datasets if d.site == site]
    if not matches:
        raise DataError(f"site {site} is not in the run's config", config_path)
    return matches[0]


def load_test_split(run: Run, site: str, task: Any, cache: dict) -> Any:
    """Test split of ``site`` (SiteData) as the run located it (:func:`test_dataset`), preprocessed
    as the model expects (its img_size, out_range, channels). Raises DataError/ConfigError if missing."""
    from relaylearn.assembly import load_split

    k = task.dataset.kwargs
    ds = test_dataset(run, site)
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
