"""CT layouts: study-wise split, HU window, slice folders, neg:pos resampling, bad input; synthetic CT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from relaylearn.config import DatasetKwargs
from relaylearn.data.ct import NegPosBatchSampler, first_foreground_class, load_ct_site, positive_slices, split_studies, window_hu
from relaylearn.data.synth_ct import SCANNERS, write_synthetic_ct
from relaylearn.errors import DataError


def kwargs(**over) -> DatasetKwargs:
    base = {"img_size": (32, 32), "out_range": (-1.0, 1.0), "channels": 1, "num_classes": 2}
    return DatasetKwargs.model_validate({**base, **over})


@pytest.fixture(scope="module")
def ct_nifti(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ct")
    write_synthetic_ct(root, size=32, seed=4, studies=5)
    return root


def _write_volume(path: Path, volume: np.ndarray) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))


def test_synthetic_ct_has_four_scanners_with_positive_and_negative_slices(ct_nifti):
    assert sorted(p.name for p in ct_nifti.iterdir() if p.is_dir()) == list(SCANNERS)
    import nibabel as nib

    depths = set()
    for site in SCANNERS:
        volume = np.asarray(nib.load(str(ct_nifti / site / "image" / f"{site.lower()}_000.nii.gz")).dataobj)
        depths.add(volume.shape[2])
        assert volume.dtype == np.int16 and volume.shape[:2] == (32, 32)
        assert volume.min() <= -900 and volume.max() >= 300  # air and bone present
    assert len(depths) > 1  # slice thickness differs between scanners
    data = load_ct_site("ct_nifti", ct_nifti, "CT1", "train", kwargs(train_ratio=0.6))
    positive = positive_slices(data.labels, kwargs())
    assert 0 < int(positive.sum()) < len(positive)


def test_synthetic_ct_is_deterministic(tmp_path):
    import nibabel as nib

    a, b = tmp_path / "a", tmp_path / "b"
    write_synthetic_ct(a, size=16, seed=9, studies={"CT2": 2})
    write_synthetic_ct(b, size=16, seed=9, studies={"CT2": 2})
    for part in ("image", "label"):
        va = np.asarray(nib.load(str(a / "CT2" / part / "ct2_001.nii.gz")).dataobj)
        vb = np.asarray(nib.load(str(b / "CT2" / part / "ct2_001.nii.gz")).dataobj)
        assert np.array_equal(va, vb)


def test_studywise_split_is_fixed_and_disjoint(ct_nifti):
    k = kwargs(train_ratio=0.6)
    train = load_ct_site("ct_nifti", ct_nifti, "CT3", "train", k)
    test = load_ct_site("ct_nifti", ct_nifti, "CT3", "test", k)
    assert set(train.subjects).isdisjoint(test.subjects)
    assert len(set(train.subjects)) == 3 and len(set(test.subjects)) == 2
    again = load_ct_site("ct_nifti", ct_nifti, "CT3", "train", k)
    assert train.subjects == again.subjects and torch.equal(train.images, again.images)
    assert train.images.shape[1:] == (1, 32, 32) and train.images.min() >= -1 and train.images.max() <= 1
    # the shuffle follows numpy's default_rng(1234) like the original: not simply the first names
    studies = [f"s{i}" for i in range(10)]
    first, rest = split_studies(studies, 0.8, 1234, "x")
    assert len(first) == 8 and sorted(first + rest) == studies and first != studies[:8]


def test_hu_window_maps_to_out_range(tmp_path):
    hu = np.full((32, 32, 2), -1000, np.int16)
    hu[:, 16:, :] = 40  # middle of the [-160, 240] window
    hu[:8, 16:, :] = 400  # above the window
    label = np.zeros_like(hu, dtype=np.uint8)
    for study in ("a", "b"):
        _write_volume(tmp_path / "S" / "image" / f"{study}.nii.gz", hu)
        _write_volume(tmp_path / "S" / "label" / f"{study}.nii.gz", label)
    data = load_ct_site("ct_nifti", tmp_path, "S", "test", kwargs(train_ratio=0.5, img_size=(32, 32)))
    image = data.images[0, 0]
    assert image[20, 0] == -1.0 and image[20, 31] == pytest.approx(0.0, abs=1e-6) and image[0, 31] == 1.0
    assert window_hu(np.array([-160.0, 40.0, 240.0]), (-160, 240)).tolist() == pytest.approx([0.0, 0.5, 1.0])


def test_png_slices_with_hu_min_offset_match_the_nifti_volumes(tmp_path):
    write_synthetic_ct(tmp_path / "nii", size=32, seed=2, studies={"CT1": 3})
    write_synthetic_ct(tmp_path / "png", size=32, seed=2, studies={"CT1": 3}, layout="slices", hu_min=-160)
    k = kwargs(train_ratio=0.67)
    nii = load_ct_site("ct_nifti", tmp_path / "nii", "CT1", "train", k)
    png = load_ct_site("ct_slices", tmp_path / "png", "CT1", "train", k)
    assert nii.subjects == png.subjects
    assert torch.equal(nii.labels, png.labels)
    assert torch.allclose(nii.images, png.images, atol=1e-6)  # HU below hu_min clip to 0 in the PNG and in the window


def test_meta_txt_layout(tmp_path):
    write_synthetic_ct(tmp_path, size=16, seed=1, studies={"CT4": 2}, layout="slices")
    site = tmp_path / "CT4"
    rows = ["study_id,instance_id,img_file,label_file,positive"]
    for study in sorted(p.name for p in site.iterdir() if p.is_dir()):
        for png in sorted((site / study).glob("[0-9]*.png")):
            rows.append(f"{study},{study}_{png.stem},{study}/{png.name},{study}/mask_{png.name},False")
    (site / "meta.txt").write_text("\n".join(rows) + "\n")
    data = load_ct_site("ct_slices", tmp_path, "CT4", "test", kwargs(train_ratio=0.5, img_size=(16, 16)))
    assert len(set(data.subjects)) == 1 and len(data) == len(rows[1:]) // 2


def test_extra_hu_labels_and_drop_negative(ct_nifti):
    plain = load_ct_site("ct_nifti", ct_nifti, "CT1", "train", kwargs(train_ratio=0.6))
    extra = load_ct_site("ct_nifti", ct_nifti, "CT1", "train", kwargs(train_ratio=0.6, num_classes=4, add_bone_label=True, add_bg_label=True))
    assert int(extra.labels.max()) == 3 and set(extra.labels.unique().tolist()) == {0, 1, 2, 3}
    assert torch.equal(extra.labels == 3, plain.labels == 1)  # the tumour moved up by two classes
    assert torch.equal(positive_slices(extra.labels, kwargs(add_bone_label=True, add_bg_label=True)), positive_slices(plain.labels, kwargs()))
    kept = load_ct_site("ct_nifti", ct_nifti, "CT1", "train", kwargs(train_ratio=0.6, drop_negative=True))
    assert len(kept) == int(positive_slices(plain.labels, kwargs()).sum()) and bool(positive_slices(kept.labels, kwargs()).all())


def test_neg_pos_sampler_redraws_negatives_every_epoch():
    positive = torch.zeros(40, dtype=torch.bool)
    positive[[3, 10, 11, 30]] = True
    sampler = NegPosBatchSampler(positive, ratio=2, batch_size=5, num_replica=2, seed=1)
    assert len(sampler) == (4 * 3 * 2 + 4) // 5
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        drawn = [i for batch in sampler for i in batch]
        copy = drawn[:12]
        assert sorted(i for i in copy if positive[i]) == [3, 10, 11, 30]  # every positive once per copy
        assert sum(1 for i in copy if not positive[i]) == 8  # 2 negatives per positive
        epochs.append(drawn)
    assert epochs[0] != epochs[1]  # negatives re-drawn
    sampler.set_epoch(0)
    assert [i for batch in sampler for i in batch] == epochs[0]  # deterministic per (seed, epoch)
    few = NegPosBatchSampler(torch.tensor([True] * 3 + [False]), ratio=3, batch_size=4)
    assert sum(1 for b in few for i in b if i == 3) == 9  # too few negatives: drawn with replacement


def test_neg_pos_sampler_keeps_a_lone_last_slice_and_splits_ranks():
    positive = torch.tensor([True] * 3 + [False] * 4)
    lone = NegPosBatchSampler(positive, ratio=0, batch_size=2)  # 3 draws in batches of 2
    batches = list(lone)
    assert len(batches) == len(lone) == 1 and sorted(batches[0]) == [0, 1, 2]  # the third positive joins the batch
    ranks = [NegPosBatchSampler(positive, ratio=1, batch_size=2, seed=4, rank=r, world_size=2) for r in (0, 1)]
    drawn = [[i for b in s for i in b] for s in ranks]
    assert len(drawn[0]) == len(drawn[1]) == 2 * len(ranks[0]) and not set(drawn[0]) & set(drawn[1])


# ----- bad input --------------------------------------------------------------------------------
def test_volume_and_label_of_different_shapes(tmp_path):
    _write_volume(tmp_path / "S" / "image" / "a.nii.gz", np.zeros((8, 8, 3), np.int16))
    _write_volume(tmp_path / "S" / "label" / "a.nii.gz", np.zeros((8, 8, 4), np.uint8))
    _write_volume(tmp_path / "S" / "image" / "b.nii.gz", np.zeros((8, 8, 3), np.int16))
    _write_volume(tmp_path / "S" / "label" / "b.nii.gz", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match=r"a\.nii\.gz: label shape \(8, 8, 4\) does not match volume shape \(8, 8, 3\)"):
        for split in ("train", "test"):
            load_ct_site("ct_nifti", tmp_path, "S", split, kwargs(train_ratio=0.5))


def test_label_value_outside_the_classes(tmp_path):
    for study in ("a", "b"):
        _write_volume(tmp_path / "S" / "image" / f"{study}.nii.gz", np.zeros((8, 8, 2), np.int16))
        _write_volume(tmp_path / "S" / "label" / f"{study}.nii.gz", np.full((8, 8, 2), 2 if study == "a" else 0, np.uint8))
    with pytest.raises(DataError, match=r"class id 2, outside 0\.\.1"):
        for split in ("train", "test"):
            load_ct_site("ct_nifti", tmp_path, "S", split, kwargs(train_ratio=0.5))


@pytest.mark.parametrize("folder", ["image", "label"])
def test_two_volumes_of_one_study_name_are_refused(tmp_path, folder):
    """s0.nii beside s0.nii.gz is one study twice: refused, naming the second file (not one dropped)."""
    for study in ("s0", "s1"):
        _write_volume(tmp_path / "S" / "image" / f"{study}.nii.gz", np.zeros((8, 8, 2), np.int16))
        _write_volume(tmp_path / "S" / "label" / f"{study}.nii.gz", np.zeros((8, 8, 2), np.uint8))
    _write_volume(tmp_path / "S" / folder / "s0.nii", np.zeros((8, 8, 2), np.int16 if folder == "image" else np.uint8))
    with pytest.raises(DataError, match=rf"{folder}/s0\.nii\.gz: several files share the name 's0' \(s0\.nii and s0\.nii\.gz\)"):
        _both_splits("ct_nifti", tmp_path, "S")


def test_study_folder_with_images_but_no_masks(tmp_path):
    write_synthetic_ct(tmp_path, size=16, seed=1, studies={"CT1": 2}, layout="slices")
    study = sorted(p for p in (tmp_path / "CT1").iterdir() if p.is_dir())[1]
    for mask in study.glob("mask_*.png"):
        mask.unlink()
    with pytest.raises(DataError, match=f"{study.name}: study folder has .* image\\(s\\) but no masks"):
        load_ct_site("ct_slices", tmp_path, "CT1", "train", kwargs(train_ratio=0.5))


def test_train_ratio_leaving_no_test_study(ct_nifti):
    with pytest.raises(DataError, match=r"CT2: train_ratio=0.9 leaves no test study \(5 studies"):
        load_ct_site("ct_nifti", ct_nifti, "CT2", "test", kwargs(train_ratio=0.9))


def test_bad_input_is_one_line_exit_2_on_the_command_line(tmp_path, ct_nifti, capsys, monkeypatch):
    from relaylearn.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["train", "-c", "demo/ct_sequential", "-n", "bad", "--data-root", str(ct_nifti), "--set", "dataset.kwargs.train_ratio=0.9", "-q", "-g", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "leaves no test study" in err


def test_synth_refuses_an_occupied_folder(tmp_path):
    write_synthetic_ct(tmp_path, size=16, studies={"CT1": 2})
    with pytest.raises(DataError, match="not empty"):
        write_synthetic_ct(tmp_path, size=16, studies={"CT1": 2})
    with pytest.raises(DataError, match="at least 2 studies"):
        write_synthetic_ct(tmp_path / "x", size=16, studies={"CT1": 1})


def _both_splits(layout: str, root: Path, site: str, **over) -> None:
    for split in ("train", "test"):
        load_ct_site(layout, root, site, split, kwargs(train_ratio=0.5, **over))


def test_a_label_on_another_grid_or_a_non_finite_volume_is_refused(tmp_path):
    import nibabel as nib

    for study in ("a", "b"):
        _write_volume(tmp_path / "S" / "image" / f"{study}.nii.gz", np.zeros((8, 8, 2), np.float32))
        _write_volume(tmp_path / "S" / "label" / f"{study}.nii.gz", np.zeros((8, 8, 2), np.uint8))
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 2), np.uint8), flipped), str(tmp_path / "S" / "label" / "a.nii.gz"))
    with pytest.raises(DataError, match=r"a\.nii\.gz: label volume's affine .* differs from its image's"):
        _both_splits("ct_nifti", tmp_path, "S")
    _write_volume(tmp_path / "S" / "label" / "a.nii.gz", np.zeros((8, 8, 2), np.uint8))
    volume = np.zeros((8, 8, 2), np.float32)
    volume[1, 1, 1] = np.nan
    _write_volume(tmp_path / "S" / "image" / "b.nii.gz", volume)
    with pytest.raises(DataError, match=r"b\.nii\.gz: volume holds NaN or infinite values"):
        _both_splits("ct_nifti", tmp_path, "S")


def test_slice_folders_refuse_masks_without_images(tmp_path):
    write_synthetic_ct(tmp_path, size=16, seed=1, studies={"CT1": 2}, layout="slices")
    study = sorted(p for p in (tmp_path / "CT1").iterdir() if p.is_dir())[0]
    (study / "mask_999.png").write_bytes(next(study.glob("mask_*.png")).read_bytes())
    with pytest.raises(DataError, match=r"mask_999\.png: mask has no image"):
        _both_splits("ct_slices", tmp_path, "CT1", img_size=(16, 16))


def test_a_site_mixing_8_bit_and_16_bit_slices_is_refused(tmp_path):
    from PIL import Image

    write_synthetic_ct(tmp_path, size=16, seed=1, studies={"CT1": 2}, layout="slices")
    study = sorted(p for p in (tmp_path / "CT1").iterdir() if p.is_dir())[0]
    last = sorted(study.glob("[0-9]*.png"))[-1]
    Image.fromarray(np.full((16, 16), 100, np.uint8)).save(last)
    with pytest.raises(DataError, match=rf"{last.name}: this slice's bit depth differs .* 16-bit \(HU\)"):
        _both_splits("ct_slices", tmp_path, "CT1", img_size=(16, 16))


def _slice_site(root: Path, site: str, pixels: np.ndarray, mask: np.ndarray | None = None, studies: int = 2) -> list[Path]:
    """``studies`` study folders of one slice ``0.png`` (``pixels`` [16, 16]) and ``mask_0.png``
    (``mask``, default a 4×4 square of class 1); returns the study folders."""
    from PIL import Image

    if mask is None:
        mask = np.zeros((16, 16), np.uint8)
        mask[4:8, 4:8] = 1
    folders = []
    for s in range(studies):
        folders.append(root / site / f"st{s}")
        folders[-1].mkdir(parents=True)
        Image.fromarray(pixels).save(folders[-1] / "0.png")
        Image.fromarray(mask).save(folders[-1] / "mask_0.png")
    return folders


def test_a_site_merged_from_a_16_bit_and_an_8_bit_folder_is_refused(tmp_path):
    _slice_site(tmp_path, "A", np.full((16, 16), 200, np.uint16))
    _slice_site(tmp_path, "B", np.full((16, 16), 200, np.uint8))
    with pytest.raises(DataError, match=r"B[/\\]st\d[/\\]0\.png: this slice's bit depth differs from .*A[/\\]st\d[/\\]0\.png, which is 16-bit \(HU\)"):
        load_ct_site("ct_slices", tmp_path, ["A", "B"], "train", kwargs(img_size=(16, 16), train_ratio=0.5))


@pytest.mark.parametrize("channels", [2, 4], ids=["LA", "RGBA"])
def test_slice_masks_with_alpha_decode_as_the_folder_layout_decodes_them(tmp_path, channels):
    """An opaque alpha channel is dropped (it was compared with the class ids: 'colour channels differ')."""
    square = np.zeros((16, 16), np.uint8)
    square[4:8, 4:8] = 1
    mask = np.dstack([square] * (channels - 1) + [np.full_like(square, 255)])
    _slice_site(tmp_path, "S", np.full((16, 16), 200, np.uint16), mask)
    data = load_ct_site("ct_slices", tmp_path, "S", "train", kwargs(img_size=(16, 16), train_ratio=0.5))
    assert torch.equal(data.labels[0], torch.from_numpy(square).long())


@pytest.mark.parametrize(
    ("extra", "pixels", "replaces", "says"),
    [
        ("mask_0.tif", np.full((16, 16), 0.5, np.float32), "mask_0.png", r"mask_0\.tif: mask holds non-integer values"),  # was truncated to 0
        ("0.tif", np.full((16, 16), 200, np.uint16), None, r"0\.tif: several files share the name '0' \(0\.png and 0\.tif\)"),
        ("mask_0.tiff", np.zeros((16, 16), np.uint8), None, r"mask_0\.tiff: several files share the name '0' \(mask_0\.png and mask_0\.tiff\)"),
    ],
    ids=["float_mask", "two_slices", "two_masks"],
)
def test_slice_folders_refuse_float_masks_and_two_files_of_one_name(tmp_path, extra, pixels, replaces, says):
    from PIL import Image

    study = _slice_site(tmp_path, "S", np.full((16, 16), 200, np.uint16))[0]
    if replaces:
        (study / replaces).unlink()
    Image.fromarray(pixels).save(study / extra)
    with pytest.raises(DataError, match=says):
        _both_splits("ct_slices", tmp_path, "S", img_size=(16, 16))


def _meta(site: Path, extra: list[str], bom: bool = False) -> None:
    rows = ["study_id,img_file,label_file"]
    for study in sorted(p.name for p in site.iterdir() if p.is_dir()):
        rows += [f"{study},{study}/{png.name},{study}/mask_{png.name}" for png in sorted((site / study).glob("[0-9]*.png"))]
    (site / "meta.txt").write_text(("\ufeff" if bom else "") + "\n".join(rows + extra) + "\n", encoding="utf-8")


def test_meta_txt_rows_must_be_complete_inside_the_site_and_listed_once(tmp_path):
    write_synthetic_ct(tmp_path, size=16, seed=1, studies={"CT4": 2}, layout="slices")
    site = tmp_path / "CT4"
    first = sorted(p.name for p in site.iterdir() if p.is_dir())[0]
    _meta(site, [], bom=True)  # as a spreadsheet saves it
    _both_splits("ct_slices", tmp_path, "CT4", img_size=(16, 16))
    for extra, says in (
        ([f"{first}x,{first}/000.png"], "must all be given"),
        (["x,../../outside/000.png,../../outside/mask_000.png"], "outside the site folder"),
        ([f"{first}x,{first}/000.png,{first}/mask_000.png"], "listed twice"),
    ):
        _meta(site, extra)
        with pytest.raises(DataError, match=says):
            _both_splits("ct_slices", tmp_path, "CT4", img_size=(16, 16))


def test_a_folder_listed_twice_in_img_folder_is_a_config_error():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="listed twice"):
        kwargs(img_folder=["A", "A"])


class _Fixed(torch.nn.Module):
    """A 'solver' whose logits [N, K, H, W] are given: one-hot of fixed class ids [N, H, W]."""

    def __init__(self, ids: torch.Tensor, num_classes: int):
        super().__init__()
        self.logits = torch.nn.functional.one_hot(ids, num_classes).permute(0, 3, 1, 2).float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits


@pytest.mark.parametrize(("bone", "air"), [(False, True), (True, True)])
def test_only_the_tumour_is_scored_after_add_bg_and_bone_labels(ct_nifti, bone, air):
    """A model perfect on air / bone / soft tissue that never predicts the tumour scores what it
    scores without the helper classes (the original averaged them in: Dice ≈ 1 each)."""
    from relaylearn.assembly import first_scored_class
    from relaylearn.config import DatasetConfig
    from relaylearn.engine import evaluate_site

    def scores(**over):
        ds = DatasetConfig(name="ct_nifti", kwargs=kwargs(train_ratio=0.6, **over))
        data = load_ct_site("ct_nifti", ct_nifti, "CT1", "test", ds.kwargs)
        first = first_foreground_class(ds.kwargs.add_bone_label, ds.kwargs.add_bg_label)
        never_tumour = data.labels.clamp(max=first - 1)
        num = ds.kwargs.num_classes
        return evaluate_site(_Fixed(never_tumour, num), data, num, batch_size=len(data), bootstrap=0, first_class=first_scored_class(ds))["summary"]

    plain, helpers = scores(), scores(num_classes=2 + bone + air, add_bone_label=bone, add_bg_label=air)
    assert helpers["pooled_dice"] == plain["pooled_dice"] == 0.0
    assert helpers["dice_sample"]["mean"] == plain["dice_sample"]["mean"] < 1.0
    assert [k for k in helpers if k.startswith("dice_class")] == [f"dice_class_{1 + bone + air}"]  # the tumour's id
    original = scores(num_classes=2 + bone + air, add_bone_label=bone, add_bg_label=air, score_helper_classes=True)
    assert original["pooled_dice"] > 0.4 and original["dice_sample"]["mean"] > plain["dice_sample"]["mean"]
    assert first_scored_class(DatasetConfig(name="fundus", kwargs=kwargs(add_bg_label=True, num_classes=3))) == 1  # CT options only


def test_ct_results_name_each_slice_study_and_bootstrap_studies(ct_nifti):
    from relaylearn.engine import evaluate_site

    data = load_ct_site("ct_nifti", ct_nifti, "CT1", "test", kwargs(train_ratio=0.4))
    result = evaluate_site(_Fixed(data.labels, 2), data, 2, batch_size=len(data), bootstrap=50)
    assert [r["subject"] for r in result["per_image"]] == data.subjects
    assert result["summary"]["n_subjects"] == len(set(data.subjects)) == 3 < result["summary"]["n_images"]
