"""The procedural multi-site fundus benchmark: layout, masks, determinism, site looks, safety."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from relaylearn.data.synth import SITE_COUNTS, SITE_LOOKS, preview_grid, write_synthetic_benchmark
from relaylearn.errors import DataError

TINY = {"Domain1": (3, 2), "Domain2": (2, 2), "Domain3": (2, 2), "Domain4": (2, 2), "Domain5": (0, 2)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth")
    summary = write_synthetic_benchmark(root, size=48, seed=5, counts=TINY)
    return root, summary


def test_default_counts_are_the_dofe_sizes_plus_an_external_site():
    assert SITE_COUNTS == {"Domain1": (50, 51), "Domain2": (99, 60), "Domain3": (320, 80), "Domain4": (320, 80), "Domain5": (0, 80)}
    assert set(SITE_LOOKS) == set(SITE_COUNTS)


def test_layout_and_summary(tiny):
    root, summary = tiny
    assert summary == {
        "Domain1": {"train": 3, "test": 2},
        "Domain2": {"train": 2, "test": 2},
        "Domain3": {"train": 2, "test": 2},
        "Domain4": {"train": 2, "test": 2},
        "Domain5": {"test": 2},
    }
    assert not (root / "Domain5" / "train").exists()
    for site, splits in summary.items():
        for split, count in splits.items():
            images = sorted((root / site / split / "ROIs" / "image").glob("*.png"))
            masks = sorted((root / site / split / "ROIs" / "mask").glob("*.png"))
            assert len(images) == count
            assert [p.name for p in images] == [p.name for p in masks]
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "temporary folder left behind"
    info = json.loads((root / "synth_benchmark.json").read_text())
    assert info["seed"] == 5 and info["size"] == 48 and info["external_test_sites"] == ["Domain5"]


def test_images_and_masks(tiny):
    root, _ = tiny
    for site in TINY:
        split = "test"
        for mask_path in (root / site / split / "ROIs" / "mask").glob("*.png"):
            image = Image.open(mask_path.parent.parent / "image" / mask_path.name)
            mask = Image.open(mask_path)
            assert image.mode == "RGB" and image.size == (48, 48)
            assert mask.mode == ("RGB" if site == "Domain1" else "L")
            grey = np.asarray(mask.convert("L"))
            assert set(np.unique(grey)) <= {0, 128, 255}
            # Background, rim and cup are all present; the disc is centred (near the frame centre).
            assert {0, 128, 255} <= set(np.unique(grey))
            rows, cols = np.nonzero(grey < 255)
            assert abs(rows.mean() - 23.5) < 8 and abs(cols.mean() - 23.5) < 8


def test_cup_to_disc_ratio_range(tmp_path):
    write_synthetic_benchmark(tmp_path, size=96, seed=1, counts={"Domain1": (0, 30)})
    ratios = []
    for path in (tmp_path / "Domain1" / "test" / "ROIs" / "mask").glob("*.png"):
        grey = np.asarray(Image.open(path).convert("L"))
        disc_rows = np.nonzero((grey < 255).any(axis=1))[0]
        cup_rows = np.nonzero((grey == 0).any(axis=1))[0]
        ratios.append(len(cup_rows) / len(disc_rows))
    assert 0.25 <= min(ratios) and max(ratios) <= 0.85
    assert max(ratios) - min(ratios) > 0.2  # it varies


def test_sites_look_different(tiny):
    """Each camera look shifts the colour statistics (a crude check; the lead measures Dice drops)."""
    root, _ = tiny
    means = {}
    for site in TINY:
        pixels = [np.asarray(Image.open(p), dtype=np.float32) for p in (root / site / "test" / "ROIs" / "image").glob("*.png")]
        means[site] = np.mean([p.reshape(-1, 3).mean(0) for p in pixels], axis=0)
    assert means["Domain2"].mean() < means["Domain1"].mean() - 20  # dark site
    assert means["Domain3"].mean() > means["Domain1"].mean() + 20  # washed-out site
    green_to_red = {site: m[1] / m[0] for site, m in means.items()}
    assert green_to_red["Domain2"] > 1.3 * green_to_red["Domain1"]  # greenish
    assert means["Domain5"][2] > means["Domain1"][2]  # bluish cast
    for a in TINY:
        for b in TINY:
            if a < b:
                assert np.abs(means[a] - means[b]).max() > 10, (a, b)


def test_deterministic_bytes(tmp_path):
    counts = {"Domain2": (1, 1), "Domain4": (0, 2)}
    write_synthetic_benchmark(tmp_path / "a", size=32, seed=9, counts=counts)
    write_synthetic_benchmark(tmp_path / "b", size=32, seed=9, counts=counts)
    write_synthetic_benchmark(tmp_path / "c", size=32, seed=10, counts=counts)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 8  # (1 + 1 + 2) images and masks
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in files)


def test_a_site_does_not_depend_on_the_other_sites_written(tmp_path):
    write_synthetic_benchmark(tmp_path / "a", size=32, seed=2, counts={"Domain3": (1, 1)})
    write_synthetic_benchmark(tmp_path / "b", size=32, seed=2, counts={"Domain1": (1, 1), "Domain3": (1, 1)})
    name = "domain3_test_0000.png"
    path = Path("Domain3/test/ROIs/image") / name
    assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes()


def test_refuses_to_overwrite_a_non_empty_site(tmp_path):
    counts = {"Domain1": (1, 1)}
    (tmp_path / "Domain1").mkdir()
    write_synthetic_benchmark(tmp_path, size=32, counts=counts)  # an empty folder is fine
    marker = tmp_path / "Domain1" / "keep.txt"
    marker.write_text("mine")
    with pytest.raises(DataError, match="already exists"):
        write_synthetic_benchmark(tmp_path, size=32, counts=counts)
    assert marker.exists()
    write_synthetic_benchmark(tmp_path, size=32, counts=counts, overwrite=True)
    assert not marker.exists()
    assert len(list((tmp_path / "Domain1" / "train" / "ROIs" / "image").iterdir())) == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"counts": {"Hospital9": (1, 1)}}, "unknown synthetic site"),
        ({"counts": {"Domain1": (0, 0)}}, "at least one image"),
        ({"size": 8}, "at least 16"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(DataError, match=message):
        write_synthetic_benchmark(tmp_path, **kwargs)


def test_preview_grid(tiny, tmp_path):
    root, _ = tiny
    out = preview_grid(root, tmp_path / "preview.png", n=2)
    image = Image.open(out)
    assert image.size[0] > 100 and image.size[1] > 100


@pytest.mark.parametrize("kind", ["fundus", "ct"])
def test_a_symlinked_site_folder_is_refused_before_anything_is_rendered(tmp_path, monkeypatch, kind):
    """--overwrite onto a site folder that is a symbolic link failed only after rendering every
    site, at rmtree ("Cannot call rmtree on a symbolic link"); now a one-line DataError up front."""
    import relaylearn.data.synth as synth
    import relaylearn.data.synth_ct as synth_ct

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not ours")
    out = tmp_path / "out"
    out.mkdir()
    site = "Domain1" if kind == "fundus" else "CT1"
    (out / site).symlink_to(elsewhere, target_is_directory=True)
    rendered = []
    if kind == "fundus":
        monkeypatch.setattr(synth, "_render_fundus", lambda *a, **k: rendered.append(1) or (_ for _ in ()).throw(AssertionError("rendered")))
        write = lambda: synth.write_synthetic_benchmark(out, size=32, seed=1, counts={site: (1, 1)}, overwrite=True)  # noqa: E731
    else:
        monkeypatch.setattr(synth_ct, "_render_study", lambda *a, **k: rendered.append(1) or (_ for _ in ()).throw(AssertionError("rendered")))
        write = lambda: synth_ct.write_synthetic_ct(out, size=16, seed=1, studies={site: 2}, overwrite=True)  # noqa: E731
    with pytest.raises(DataError, match="symbolic link"):
        write()
    assert rendered == [] and (elsewhere / "keep.txt").exists() and (out / site).is_symlink()
