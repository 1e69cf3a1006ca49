"""Shared fixtures: a tiny synthetic multi-site dataset and a tiny config, made once per session."""

from __future__ import annotations

import os
from pathlib import Path

# xdist runs two workers on two cores: every training the tests start in a subprocess gets one
# thread too (two OpenMP teams spinning on one core each slow each other down many times over)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml

torch.set_num_threads(1)
os.environ.setdefault("PYTHONHASHSEED", "0")

ROOT = Path(__file__).resolve().parent.parent


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` (not a package) imported as module ``bench_<name>``."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_fundus(tmp_path_factory) -> Path:
    """A DoFE-layout dataset: 3 sites, a few 32-px images each (written by the synthetic generator)."""
    from relaylearn.data.synth import write_synthetic_benchmark

    root = tmp_path_factory.mktemp("fundus")
    write_synthetic_benchmark(root, size=32, seed=3, counts={"Domain1": (6, 4), "Domain2": (6, 4), "Domain3": (4, 4)})
    return root


def tiny_config(
    tmp_path: Path, data_root: Path, strategy: str = "sequential", task_ids=(1, 2), steps: int = 3, strategy_kwargs=None, img: int = 32, **train
) -> Path:
    """Write a minimal config that trains ``task_ids`` for ``steps`` batches each on ``data_root``."""
    cfg = {
        "common": {
            "random_seed": 7,
            "dataset": {"name": "fundus", "kwargs": {"root_path": str(data_root), "img_size": [img, img], "num_classes": 3}},
            "strategy": {"name": strategy, "kwargs": strategy_kwargs or {}},
            "model": {"name": "unet"},
            "train": {"num_steps": steps, "batch_size": 4, "log_every_n_steps": 1, **train},
            "test": {"batch_size": 8, "bootstrap": 200},
            "audit": {"n_generated": 50, "n_bootstrap": 100},  # the per-hop privacy audit of relay runs, kept cheap
        },
        "all_tasks_datasets": [
            {"kwargs": {"task_id": 1, "task_name": "Domain1", "img_folder": "Domain1"}},
            {"kwargs": {"task_id": 2, "task_name": "Domain2", "img_folder": "Domain2"}},
            {"kwargs": {"task_id": 3, "task_name": "Domain3", "img_folder": "Domain3"}},
        ],
        "current_tasks": {"task_ids": list(task_ids)},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{strategy.split(':')[-1]}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
