"""Site loaders: DoFE fundus, generic folder and NIfTI layouts, preprocessing and every DataError."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from relaylearn.data import SiteData, load_site
from relaylearn.errors import DataError

FUNDUS_KW = dict(img_size=(16, 16), num_classes=3)


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    image.save(path)
    return path


def _fundus_mask(size: int = 20) -> np.ndarray:
    """Grey levels: background 255, a rim of 128 around a cup of 0."""
    mask = np.full((size, size), 255, np.uint8)
    mask[size // 5 : size * 4 // 5, size // 5 : size * 4 // 5] = 128
    mask[size * 2 // 5 : size * 3 // 5, size * 2 // 5 : size * 3 // 5] = 0
    return mask


def _fundus_site(root: Path, site: str = "SiteA", split: str = "train", names=("b", "a"), roi: bool = True, rgb_mask: bool = False, size: int = 20) -> Path:
    base = root / site / split / ("ROIs" if roi else "")
    rng = np.random.default_rng(0)
    for name in names:
        _save(base / "image" / f"{name}.png", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        _save(base / "mask" / f"{name}.png", _fundus_mask(size), "RGB" if rgb_mask else None)
    return base


# ----- fundus --------------------------------------------------------------------------------------
@pytest.mark.parametrize("rgb_mask", [False, True])
def test_fundus_layout(tmp_path, rgb_mask):
    _fundus_site(tmp_path, rgb_mask=rgb_mask)
    data = load_site("fundus", tmp_path, "SiteA", "train", img_size=(20, 20), num_classes=3)
    assert isinstance(data, SiteData) and len(data) == 2
    assert data.site == "SiteA"
    assert data.names == ["a", "b"] and data.subjects == ["a", "b"]  # sorted
    assert data.sources == [tmp_path / "SiteA/train/ROIs/image/a.png", tmp_path / "SiteA/train/ROIs/image/b.png"]
    assert data.images.shape == (2, 3, 20, 20) and data.images.dtype == torch.float32
    assert data.labels.shape == (2, 20, 20) and data.labels.dtype == torch.int64
    expected = torch.zeros(20, 20, dtype=torch.int64)
    expected[4:16, 4:16] = 1
    expected[8:12, 8:12] = 2
    assert torch.equal(data.labels[0], expected)
    # Pixel values map linearly from 0..255 to out_range.
    raw = np.asarray(Image.open(tmp_path / "SiteA/train/ROIs/image/a.png"), dtype=np.float32)
    assert torch.allclose(data.images[0], torch.from_numpy(raw / 255 * 2 - 1).permute(2, 0, 1), atol=1e-6)


def test_fundus_resize_out_range_and_site_name(tmp_path):
    _fundus_site(tmp_path, size=32)
    data = load_site("fundus", tmp_path, "SiteA", "train", out_range=(0, 1), site_name="Hospital", **FUNDUS_KW)
    assert data.site == "Hospital"
    assert data.images.shape == (2, 3, 16, 16)
    assert data.images.min() >= 0 and data.images.max() <= 1
    assert set(data.labels.unique().tolist()) == {0, 1, 2}
    # Nearest resize keeps the nested structure: the cup sits inside the rim.
    assert data.labels[0, 8, 8] == 2 and data.labels[0, 4, 8] == 1 and data.labels[0, 0, 0] == 0


def test_fundus_without_roi_level_and_grey_tolerance(tmp_path):
    base = _fundus_site(tmp_path, roi=False, names=("x",))
    noisy = _fundus_mask().astype(np.int16)
    noisy[noisy == 128] = 145  # within ±20 of 128
    noisy[noisy == 0] = 12
    _save(base / "mask" / "x.png", noisy.astype(np.uint8))
    data = load_site("fundus", tmp_path, "SiteA", "train", use_roi=False, **FUNDUS_KW)
    assert set(data.labels.unique().tolist()) == {0, 1, 2}


def test_fundus_bad_grey_level(tmp_path):
    base = _fundus_site(tmp_path, names=("x",))
    mask = _fundus_mask()
    mask[0, 0] = 64
    _save(base / "mask" / "x.png", mask)
    with pytest.raises(DataError, match=r"x\.png.*grey level 64 ") as error:
        load_site("fundus", tmp_path, "SiteA", "train", **FUNDUS_KW)
    assert "\n" not in str(error.value)


def test_merging_folders_and_hidden_files(tmp_path):
    _fundus_site(tmp_path, "SiteA", names=("a", "b"))
    base = _fundus_site(tmp_path, "SiteB", names=("a", "c"))
    (base / "image" / ".DS_Store").write_bytes(b"junk")
    _save(base / "image" / ".hidden.png", np.zeros((20, 20, 3), np.uint8))
    data = load_site("fundus", tmp_path, ["SiteA", "SiteB"], "train", **FUNDUS_KW)
    assert data.site == "SiteA+SiteB"
    assert data.names == ["SiteA/a", "b", "SiteB/a", "c"]  # clashing stems get their folder
    assert len(data.sources) == 4 and data.images.shape[0] == 4


def test_mixed_source_sizes_are_resized_in_file_order(tmp_path):
    base = _fundus_site(tmp_path, names=("a", "c"), size=20)
    _save(base / "image" / "b.png", np.full((40, 40, 3), 255, np.uint8))
    _save(base / "mask" / "b.png", np.full((40, 40), 255, np.uint8))
    data = load_site("fundus", tmp_path, "SiteA", "train", **FUNDUS_KW)
    assert data.names == ["a", "b", "c"]
    assert torch.allclose(data.images[1], torch.ones(3, 16, 16))
    assert data.labels[1].eq(0).all() and data.labels[0].eq(2).any()


# ----- generic folder ----------------------------------------------------------------------------
def test_folder_layout_any_format(tmp_path):
    base = tmp_path / "Site" / "test"
    _save(base / "image" / "p1.jpg", np.full((12, 10, 3), 200, np.uint8))
    _save(base / "image" / "p2.tif", np.full((12, 10, 3), 10, np.uint8))
    labels = np.zeros((12, 10), np.uint8)
    labels[2:5, 2:5] = 3
    _save(base / "mask" / "p1.png", labels)
    _save(base / "mask" / "p2.bmp", labels)
    (base / "image" / "notes.txt").write_text("not an image")
    data = load_site("folder", tmp_path, "Site", "test", img_size=(12, 10), num_classes=4)
    assert data.names == ["p1", "p2"]
    assert data.images.shape == (2, 3, 12, 10)
    assert data.labels[0, 3, 3] == 3 and data.labels[0, 0, 0] == 0
    assert data.images[1].max() < -0.8  # dark image


def test_folder_layout_grey_channel_and_palette_mask(tmp_path):
    base = tmp_path / "Site" / "train"
    _save(base / "image" / "a.png", np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    palette = Image.fromarray(np.eye(8, dtype=np.uint8), mode="P")  # index 1 is red: ids, not colours
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    (base / "mask").mkdir(parents=True)
    palette.save(base / "mask" / "a.png")
    data = load_site("folder", tmp_path, "Site", "train", img_size=(8, 8), num_classes=2, channels=1)
    assert data.images.shape == (1, 1, 8, 8)
    assert torch.equal(data.labels[0], torch.eye(8, dtype=torch.int64))


@pytest.mark.parametrize(
    ("pixels", "says"),
    [
        (np.full((6, 6), 0.5, np.float32), r"floating-point pixels \(mode F\)"),  # became constant black
        (np.full((6, 6), 70000, np.int32), r"values 70000\.\.70000, outside 0\.\.65535 \(mode I\)"),
        (np.full((6, 6), -5, np.int32), r"values -5\.\.-5, outside 0\.\.65535 \(mode I\)"),  # signed 16-bit
    ],
    ids=["float", "32_bit", "signed"],
)
def test_float_signed_and_32_bit_images_are_refused(tmp_path, pixels, says):
    base = tmp_path / "Site" / "train"
    _save(base / "image" / "x.tif", pixels)
    _save(base / "mask" / "x.png", np.zeros((6, 6), np.uint8))
    with pytest.raises(DataError, match=rf"x\.tif: image holds {says}: store images as 8- or 16-bit unsigned integers") as error:
        load_site("folder", tmp_path, "Site", "train", img_size=(6, 6), num_classes=2, channels=1)
    assert "\n" not in str(error.value)


def test_a_32_bit_integer_image_within_0_to_65535_reads_as_16_bit(tmp_path):
    """Mode-I TIFF [6, 6] of 0..35000 gives the same pixels as the uint16 PNG."""
    base = tmp_path / "Site" / "train"
    values = np.arange(36).reshape(6, 6) * 1000
    _save(base / "image" / "wide.tif", values.astype(np.int32))
    _save(base / "image" / "deep.png", values.astype(np.uint16))
    for name in ("wide", "deep"):
        _save(base / "mask" / f"{name}.png", np.zeros((6, 6), np.uint8))
    data = load_site("folder", tmp_path, "Site", "train", img_size=(6, 6), out_range=(0.0, 1.0), num_classes=2, channels=1)
    assert torch.equal(data.images[0], data.images[1]) and data.images.max() == np.float32(35000 / 65535)


def test_folder_class_id_out_of_range(tmp_path):
    base = tmp_path / "Site" / "train"
    _save(base / "image" / "a.png", np.zeros((8, 8, 3), np.uint8))
    _save(base / "mask" / "a.png", np.full((8, 8), 5, np.uint8))
    with pytest.raises(DataError, match=r"mask[/\\]a\.png: mask holds class id 5, outside 0\.\.2"):
        load_site("folder", tmp_path, "Site", "train", img_size=(8, 8), num_classes=3)


def test_folder_colour_mask_is_rejected(tmp_path):
    base = tmp_path / "Site" / "train"
    _save(base / "image" / "a.png", np.zeros((8, 8, 3), np.uint8))
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[..., 0] = 1
    _save(base / "mask" / "a.png", colour)
    with pytest.raises(DataError, match="single-channel"):
        load_site("folder", tmp_path, "Site", "train", img_size=(8, 8), num_classes=3)


# ----- NIfTI -------------------------------------------------------------------------------------
def _nifti(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


def test_nifti_layout(tmp_path):
    base = tmp_path / "Site" / "train"
    rng = np.random.default_rng(0)
    for name, depth in (("vol2", 3), ("vol1", 2)):
        volume = rng.normal(100.0, 30.0, (10, 12, depth)).astype(np.float32)
        volume[0, 0, 0] = 1e6  # an outlier the robust percentiles ignore
        label = np.zeros((10, 12, depth), np.uint8)
        label[2:6, 3:7, :] = 1
        _nifti(base / "image" / f"{name}.nii.gz", volume)
        _nifti(base / "label" / f"{name}.nii.gz", label)
    data = load_site("nifti", tmp_path, "Site", "train", img_size=(10, 12), num_classes=2, channels=1)
    assert data.images.shape == (5, 1, 10, 12)
    assert data.subjects == ["vol1", "vol1", "vol2", "vol2", "vol2"]
    assert data.names == ["vol1_0000", "vol1_0001", "vol2_0000", "vol2_0001", "vol2_0002"]
    assert data.images.min() >= -1 and data.images.max() <= 1
    assert data.images.std() > 0.3  # not squashed by the outlier
    assert data.labels[0, 3, 4] == 1 and data.labels[0, 0, 0] == 0


def test_nifti_shape_mismatch_and_non_integer_labels(tmp_path):
    base = tmp_path / "Site" / "train"
    _nifti(base / "image" / "v.nii.gz", np.zeros((4, 4, 2), np.float32))
    _nifti(base / "label" / "v.nii.gz", np.zeros((4, 5, 2), np.uint8))
    with pytest.raises(DataError, match="does not match"):
        load_site("nifti", tmp_path, "Site", "train", img_size=(4, 4), num_classes=2, channels=1)
    _nifti(base / "label" / "v.nii.gz", np.full((4, 4, 2), 0.5, np.float32))
    with pytest.raises(DataError, match="non-integer"):
        load_site("nifti", tmp_path, "Site", "train", img_size=(4, 4), num_classes=2, channels=1)


def test_merged_folders_keep_every_volume_one_subject(tmp_path):
    """Volume 'case1' in folders A (4 slices) and B (2 slices): all 4 of A's slices are 'A/case1',
    so the validation split keeps each volume on one side."""
    from relaylearn.data.split import validation_split

    for folder, volumes in (("A", {"case1": 4, "case2": 2}), ("B", {"case1": 2})):
        for name, depth in volumes.items():
            _nifti(tmp_path / folder / "train" / "image" / f"{name}.nii.gz", np.zeros((4, 4, depth), np.float32))
            _nifti(tmp_path / folder / "train" / "label" / f"{name}.nii.gz", np.zeros((4, 4, depth), np.uint8))
    data = load_site("nifti", tmp_path, ["A", "B"], "train", img_size=(4, 4), num_classes=2, channels=1)
    assert data.subjects == ["A/case1"] * 4 + ["case2"] * 2 + ["B/case1"] * 2
    assert data.names[3:6] == ["A/case1_0003", "case2_0000", "case2_0001"] and len(set(data.names)) == len(data)
    volume = [f"{source.parent.parent.parent.name}/{source.name}" for source in data.sources]
    for seed in range(5):
        train, val = validation_split(len(data), 0.3, seed, groups=data.subjects)
        assert not {volume[i] for i in train} & {volume[i] for i in val}


# ----- errors ------------------------------------------------------------------------------------
def test_missing_paths(tmp_path):
    with pytest.raises(DataError, match="data root not found"):
        load_site("fundus", tmp_path / "nope", "SiteA", "train", **FUNDUS_KW)
    with pytest.raises(DataError, match="site folder not found"):
        load_site("fundus", tmp_path, "SiteA", "train", **FUNDUS_KW)
    _fundus_site(tmp_path)
    with pytest.raises(DataError, match="split folder 'test' not found"):
        load_site("fundus", tmp_path, "SiteA", "test", **FUNDUS_KW)
    with pytest.raises(DataError, match=r"image: folder not found"):
        load_site("fundus", tmp_path, "SiteA", "train", use_roi=False, **FUNDUS_KW)
    with pytest.raises(DataError, match="unknown data layout"):
        load_site("dicom", tmp_path, "SiteA", "train", **FUNDUS_KW)


def test_no_images(tmp_path):
    (tmp_path / "SiteA/train/ROIs/image").mkdir(parents=True)
    (tmp_path / "SiteA/train/ROIs/mask").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        load_site("fundus", tmp_path, "SiteA", "train", **FUNDUS_KW)


def test_unpaired_files(tmp_path):
    base = _fundus_site(tmp_path, names=("a", "b"))
    (base / "mask" / "b.png").unlink()
    with pytest.raises(DataError, match=r"b\.png: image has no mask"):
        load_site("fundus", tmp_path, "SiteA", "train", **FUNDUS_KW)
    _save(base / "mask" / "b.png", _fundus_mask())
    _save(base / "mask" / "z.png", _fundus_mask())
    with pytest.raises(DataError, match=r"z\.png: mask has no image"):
        load_site("fundus", tmp_path, "SiteA", "train", **FUNDUS_KW)


def test_two_files_of_one_name_are_refused_naming_the_second(tmp_path):
    base = tmp_path / "Site" / "train"
    for name in ("p1.jpg", "p1.png"):
        _save(base / "image" / name, np.full((12, 10, 3), 200, np.uint8))
    _save(base / "mask" / "p1.png", np.zeros((12, 10), np.uint8))
    with pytest.raises(DataError, match=r"image/p1\.png: several files share the name 'p1' \(p1\.jpg and p1\.png\)"):
        load_site("folder", tmp_path, "Site", "train", img_size=(12, 10), num_classes=2)


def test_corrupt_file(tmp_path):
    base = _fundus_site(tmp_path, names=("a",))
    (base / "image" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match=r"a\.png: cannot read image") as error:
        load_site("fundus", tmp_path, "SiteA", "train", **FUNDUS_KW)
    assert "\n" not in str(error.value)
    base = tmp_path / "Vol" / "train"
    (base / "image").mkdir(parents=True)
    (base / "label").mkdir(parents=True)
    (base / "image" / "v.nii.gz").write_bytes(b"not gzip")
    (base / "label" / "v.nii.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="cannot read NIfTI"):
        load_site("nifti", tmp_path, "Vol", "train", img_size=(4, 4), num_classes=2, channels=1)


def test_size_mismatch(tmp_path):
    base = _fundus_site(tmp_path, names=("a",))
    _save(base / "mask" / "a.png", np.full((10, 20), 255, np.uint8))
    with pytest.raises(DataError, match=r"image is 20×20 but its mask is 20×10"):
        load_site("fundus", tmp_path, "SiteA", "train", **FUNDUS_KW)


def test_synthetic_benchmark_round_trip(tmp_path):
    from relaylearn.data import write_synthetic_benchmark

    write_synthetic_benchmark(tmp_path, size=32, seed=0, counts={"Domain1": (2, 1), "Domain2": (0, 2)})
    data = load_site("fundus", tmp_path, "Domain1", "train", img_size=(32, 32), num_classes=3)
    assert data.images.shape == (2, 3, 32, 32) and set(data.labels.unique().tolist()) == {0, 1, 2}
    external = load_site("fundus", tmp_path, "Domain2", "test", img_size=(16, 16), num_classes=3)
    assert len(external) == 2


def test_every_config_layout_name_is_a_registered_layout():
    from relaylearn.config import DATA_LAYOUTS
    from relaylearn.data.layouts import _builtin_layouts, get_layout
    from relaylearn.errors import ConfigError

    assert set(_builtin_layouts()) == set(DATA_LAYOUTS)
    assert all(get_layout(name).name == name for name in DATA_LAYOUTS)
    with pytest.raises(ConfigError, match="not a relaylearn Layout"):
        get_layout("examples.tiny_net:TinyNet")
