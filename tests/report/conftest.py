"""Shared by the report tests: a fake fundus test set, fake run folders as the trainer writes them,
and checks of the rendered page (import them from here, not from another test module)."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import yaml
from PIL import Image

from relaylearn.config import load_config
from relaylearn.metrics import continual_metrics
from relaylearn.runner import resolved_config

SITES = ["Domain1", "Domain2", "Domain3", "Domain4", "Domain5"]  # Domain5: external test site
IMG = 32


# ----- a fake fundus test set and fake run folders -----------------------------------------------
def fundus_pair(seed: int, size: int = IMG) -> tuple[np.ndarray, np.ndarray]:
    """A cartoon fundus crop (uint8 RGB) and its class map (0 background, 1 rim, 2 cup)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] / size
    cy, cx = 0.5 + rng.uniform(-0.08, 0.08, 2)
    r_disc, ratio = rng.uniform(0.25, 0.35), rng.uniform(0.3, 0.7)
    d = np.hypot((y - cy) / 1.1, x - cx)
    labels = np.where(d < r_disc * ratio, 2, np.where(d < r_disc, 1, 0))
    colours = np.array([[170, 60, 30], [230, 160, 70], [250, 225, 160]], dtype=float)
    image = colours[labels] * (1 - 0.35 * np.hypot(y - 0.5, x - 0.5))[..., None] + rng.normal(0, 6, (size, size, 3))
    return image.clip(0, 255).astype(np.uint8), labels


def write_dofe_site(root: Path, site: str, n: int, seed: int) -> list[str]:
    """DoFE layout test split of ``site`` with ``n`` images; returns the file stems."""
    folder = root / site / "test" / "ROIs"
    (folder / "image").mkdir(parents=True, exist_ok=True)
    (folder / "mask").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        image, labels = fundus_pair(seed * 100 + i)
        name = f"{site.lower()}_{i:03d}"
        Image.fromarray(image).save(folder / "image" / f"{name}.png")
        Image.fromarray(np.array([255, 128, 0], dtype=np.uint8)[labels]).save(folder / "mask" / f"{name}.png")
        names.append(name)
    return names


def fake_split(site: str, n: int = 5) -> SimpleNamespace:
    """What load_site returns, without files: images [n,3,H,W] in [-1,1], labels [n,H,W], names."""
    seed = SITES.index(site) if site in SITES else 9
    pairs = [fundus_pair(seed * 100 + i) for i in range(n)]
    images = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).float() / 127.5 - 1
    labels = torch.from_numpy(np.stack([p[1] for p in pairs])).long()
    return SimpleNamespace(site=site, images=images, labels=labels, names=[f"{site.lower()}_{i:03d}" for i in range(n)])


def fake_matrix(trained: list[str], seed: int) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    R = []
    for i in range(len(trained)):
        row = [round(float(rng.uniform(0.35, 0.6)), 4) for _ in SITES]
        for j in range(i + 1):
            row[j] = round(float(0.85 - 0.06 * (i - j) * (1 + seed % 2) + rng.uniform(-0.02, 0.02)), 4)
        R.append(row)
    return R


def write_run(
    path: Path,
    strategy: str,
    trained: list[str],
    seed: int = 0,
    n_images: int = 5,
    bundle: Path | None = None,
    data_root: Path | None = None,
    configured: list[str] = SITES[:4],
) -> Path:
    """A run folder as the trainer writes it: matrix.json, results + per-image CSVs, config (training
    ``configured``; Domain5 is test-only), resolved config, run.json."""
    R = fake_matrix(trained, seed)
    sequential = all("+" not in t for t in trained)
    metrics = continual_metrics(R, [SITES.index(t) for t in trained]) if sequential else {"acc": float(np.mean(R[-1][:4])), "bwt": None, "forgetting": None}
    per_class = {t: {s: {"dice_class_1": R[i][j] + 0.03, "dice_class_2": R[i][j] - 0.03} for j, s in enumerate(SITES)} for i, t in enumerate(trained)}
    matrix = {
        "metric": "dice_sample",
        "sites": SITES,
        "trained": trained,
        "R": R,
        "acc": metrics["acc"],
        "bwt": metrics["bwt"],
        "forgetting": metrics["forgetting"],
        "acc_all_sites": float(np.mean(R[-1])),
        "per_class": per_class,
    }
    (path / "metrics").mkdir(parents=True)
    (path / "metrics" / "matrix.json").write_text(json.dumps(matrix, indent=2))
    rng = np.random.default_rng(seed)
    summary, per_image = [], []
    for i, t in enumerate(trained):
        for j, s in enumerate(SITES):
            dice = np.clip(R[i][j] + rng.normal(0, 0.08, n_images), 0, 1)
            summary.append(
                {
                    "task_id": i + 1,
                    "trained_site": t,
                    "test_site": s,
                    "num_images": n_images,
                    "dice_sample": R[i][j],
                    "dice_sample_ci_low": R[i][j] - 0.04,
                    "dice_sample_ci_high": R[i][j] + 0.035,
                }
            )
            per_image += [
                {"task_id": i + 1, "trained_site": t, "test_site": s, "name": f"{s.lower()}_{k:03d}", "dice_sample": float(d)} for k, d in enumerate(dice)
            ]
    for prefix, rows in (("results", summary), ("per_image", per_image)):
        (path / "test_results").mkdir(exist_ok=True)
        with (path / "test_results" / f"{prefix}_2024-05-01_12-00-00.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    config = {
        "common": {"dataset": {"name": "fundus", "kwargs": {"root_path": str(data_root or path / "no-data"), "img_size": [IMG, IMG], "num_classes": 3}},
                   "strategy": {"name": strategy}, "train": {"num_steps": 1}},
        "all_tasks_datasets": [{"kwargs": {"task_id": i + 1, "task_name": s, "img_folder": s}} for i, s in enumerate(SITES)],
        "current_tasks": {"task_ids": [SITES.index(s) + 1 for s in configured]},
    }  # fmt: skip
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "resolved_config.yaml").write_text(yaml.safe_dump(resolved_config(load_config(str(path / "config.yaml")))))
    (path / "run.json").write_text(
        json.dumps(
            {
                "config": f"demo/{strategy}",
                "name": path.name,
                "seed": 7,
                "started_utc": "2024-05-01T12:00:00Z",
                "argv": ["relaylearn", "train", "-c", f"demo/{strategy}"],
                "versions": {"relaylearn": "0.1", "torch": torch.__version__},
                "precision": {"1": "32", "2": "32", "3": "32", "4": "<b>32</b>" if strategy == "joint" else "32"},
            }
        )
    )
    if bundle is not None:
        (path / "bundles").mkdir()
        shutil.copyfile(bundle, path / "bundles" / f"task_{len(trained)}.relay")
    return path


class ReplayStub(torch.nn.Module):
    """Stands in for the relay strategy: the real solver plus previews() of 'replayed' pairs."""

    def __init__(self, solver):
        super().__init__()
        self.solver = solver

    @staticmethod
    def replays() -> bool:  # the strategy contract: it replays, so previews() has pairs
        return True

    def previews(self, per_site: int = 8):
        out = {}
        for site in SITES[:3]:
            split = fake_split(site, per_site)
            out[site] = ((split.images + 0.1 * torch.randn_like(split.images)).clamp(-1, 1), split.labels)
        return out


# ----- checks of the page ------------------------------------------------------------------------
def image_sources(page: str) -> list[str]:
    return re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", page)


def section_of(page: str, anchor: str) -> str:
    return page.split(f'<section id="{anchor}">')[1].split("</section>")[0]


def images_in(page: str, anchor: str) -> int:
    return section_of(page, anchor).count("<img")


def assert_self_contained(page: str) -> int:
    """Every <img> is an embedded PNG that decodes; nothing is fetched from elsewhere."""
    sources = image_sources(page)
    assert len(sources) == page.count("<img"), "every <img> has a src"
    for src in sources:
        assert src.startswith("data:image/png;base64,"), src[:60]
        raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            assert im.width > 0 and im.height > 0
    assert not re.search(r"""(src|href)=["'](https?:|//)""", page), "no external resources"
    assert "<link" not in page and "@import" not in page
    return len(sources)


def relayed(first: Path, hops: int) -> Path:
    """The bundle ``first`` passed on (same weights) until it has ``hops`` hops: what a run training
    ``hops`` sites writes last."""
    from relaylearn.bundle import read_bundle, write_bundle
    from relaylearn.files import utc_now

    path = first
    for k in range(2, hops + 1):
        parent = read_bundle(path, trust=None, allow_unsigned=True)
        path = write_bundle(first.with_name(f"hop{k}_{first.name}"), parent.tensors, strategy=parent.strategy, config=parent.config,
                            registry=parent.registry, site=f"Site{k}", hop_started_utc=utc_now(), parent=parent, signing_key=None)  # fmt: skip
    return path
