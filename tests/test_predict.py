"""``relaylearn predict``: masks at the original size, overlays, the per-image table, bad inputs."""

from __future__ import annotations

import csv
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from relaylearn.assembly import LoadedModel
from relaylearn.data.dofe import DOFE_LEVELS
from relaylearn.data.layouts import get_layout
from relaylearn.errors import DataError, UserError
from relaylearn.predict import class_areas, expand_inputs, predict_images, to_model_input
from tests.conftest import make_bundle


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _rows(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ----- helpers -----------------------------------------------------------------------------------
def test_mask_encoding_and_areas():
    m = np.array([[0, 1, 2], [2, 2, 0]])
    assert get_layout("folder").encode_mask(m, 3).tolist() == [[0, 1, 2], [2, 2, 0]]
    assert class_areas(m, 4) == [2, 1, 3, 0]


def test_read_image_handles_grey_rgb_alpha_and_16_bit(tmp_path):
    from relaylearn.predict import read_image

    Image.fromarray(np.full((4, 6), 200, dtype=np.uint8)).save(tmp_path / "grey.png")
    Image.fromarray(np.full((4, 6, 4), 100, dtype=np.uint8), "RGBA").save(tmp_path / "alpha.png")
    Image.fromarray(np.full((4, 6), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert read_image(tmp_path / "grey.png", 3).shape == (4, 6, 3) and read_image(tmp_path / "grey.png", 3).max() == np.float32(200 / 255)
    assert read_image(tmp_path / "alpha.png", 3)[0, 0].tolist() == [np.float32(100 / 255)] * 3
    assert read_image(tmp_path / "alpha.png", 1).shape == (4, 6, 1)
    assert read_image(tmp_path / "deep.png", 1).max() == 1.0, "16-bit white stays white"
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="empty.jpg: cannot read image"):
        read_image(tmp_path / "empty.jpg", 3)


def test_16_bit_images_reach_the_model_as_training_reads_them(tmp_path):
    """12-bit content in a 16-bit PNG keeps its 4096 grey levels (it was cut to 8 bits)."""
    from relaylearn.data.layouts import load_site
    from relaylearn.predict import read_image

    levels = (np.arange(64 * 64, dtype=np.uint16) % 4096).reshape(64, 64) * 16
    for part in ("image", "mask"):
        (tmp_path / "S" / "test" / part).mkdir(parents=True)
    Image.fromarray(levels).save(tmp_path / "S" / "test" / "image" / "x.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "S" / "test" / "mask" / "x.png")
    trained_on = load_site("folder", tmp_path, "S", "test", img_size=(64, 64), out_range=(0.0, 1.0), num_classes=2, channels=1).images[0, 0]
    predicted_from = to_model_input(read_image(tmp_path / "S" / "test" / "image" / "x.png", 1), (64, 64), (0.0, 1.0))[0]
    assert torch.equal(predicted_from, trained_on)
    assert len(torch.unique(predicted_from)) == 4096


def test_predict_refuses_float_and_signed_images_as_training_does(tmp_path):
    """A mode-F TIFF read as constant black in predict and training; both refuse it with one line now."""
    from relaylearn.data.layouts import load_site
    from relaylearn.predict import read_image

    for part in ("image", "mask"):
        (tmp_path / "S" / "test" / part).mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "S" / "test" / "mask" / "x.png")
    for pixels, says in ((np.full((4, 4), 0.5, np.float32), "floating-point"), (np.full((4, 4), -3, np.int32), "outside 0..65535")):
        Image.fromarray(pixels).save(tmp_path / "S" / "test" / "image" / "x.tif")
        with pytest.raises(DataError, match=rf"x\.tif: image holds .*{says}") as predicted:
            read_image(tmp_path / "S" / "test" / "image" / "x.tif", 1)
        with pytest.raises(DataError) as trained:
            load_site("folder", tmp_path, "S", "test", img_size=(4, 4), num_classes=2, channels=1)
        assert str(predicted.value) == str(trained.value)


def test_model_input_is_resized_and_scaled():
    x = to_model_input(np.ones((50, 70, 3), dtype=np.float32), (32, 32), (-1.0, 1.0))
    assert x.shape == (3, 32, 32) and torch.allclose(x, torch.ones_like(x))
    x = to_model_input(np.zeros((32, 32, 1), dtype=np.float32), (32, 32), (0.0, 1.0))
    assert x.shape == (1, 32, 32) and x.max() == 0


def test_expand_inputs_sorts_folders_and_keeps_only_images(tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.png", "a.JPG", "d.gif", "e.nii.gz", "notes.txt", ".hidden.png", "sub/f.png"):
        (folder / name).write_bytes(b"x")
    single = tmp_path / "c.png"
    single.write_bytes(b"x")
    found = expand_inputs([folder, single])
    assert [p.name for p in found.files] == ["a.JPG", "b.png", "d.gif", "e.nii.gz", "c.png"], "every format Pillow opens, and NIfTI volumes"
    assert (found.skipped_files, found.skipped_folders) == (1, 1)
    with pytest.raises(DataError, match="not found"):
        expand_inputs([tmp_path / "nope.png"])
    (tmp_path / "b.png").write_bytes(b"x")
    with pytest.raises(UserError, match="same output name 'b'"):
        expand_inputs([folder, tmp_path / "b.png"])


class _BrightIsClassOne(nn.Module):
    """Stub 2-class solver: class 1 where the image is bright."""

    def forward(self, x):
        return torch.cat([-x[:, :1], x[:, :1]], dim=1)


def test_generic_model_writes_class_ids_without_cup_to_disc(tmp_path):
    model = LoadedModel(
        solver=_BrightIsClassOne(),
        img_size=(16, 16),
        out_range=(-1.0, 1.0),
        channels=1,
        num_classes=2,
        class_names=("class_0", "class_1"),
        layout=get_layout("folder"),
        bundle_sha256="0" * 64,
        strategy="stub",
    )
    image = np.zeros((30, 60), dtype=np.uint8)
    image[:, 30:] = 255
    Image.fromarray(image).save(tmp_path / "half.png")
    csv_path = predict_images(model, [tmp_path / "half.png"], tmp_path / "out")
    mask = np.asarray(Image.open(tmp_path / "out" / "masks" / "half.png"))
    assert mask.shape == (30, 60) and set(np.unique(mask)) == {0, 1}
    assert (mask[:, :25] == 0).all() and (mask[:, 35:] == 1).all()
    (row,) = _rows(csv_path)
    assert "vertical_cup_to_disc" not in row
    assert int(row["area_px_class_0"]) + int(row["area_px_class_1"]) == 30 * 60


def _stub_model(layout: str = "folder", hu=None, img_size=(16, 16)) -> LoadedModel:
    return LoadedModel(
        solver=_BrightIsClassOne(),
        img_size=img_size,
        out_range=(-1.0, 1.0),
        channels=1,
        num_classes=2,
        class_names=("class_0", "class_1"),
        layout=get_layout(layout),
        bundle_sha256="0" * 64,
        strategy="stub",
        hu=hu,
    )


def test_a_ct_volume_gives_a_nifti_mask_on_its_own_grid(tmp_path):
    import nibabel as nib

    hu = np.full((16, 16, 5), -1000.0, dtype=np.float32)
    hu[3:9, 5:12, 1:4] = 300.0  # a bright cube, off centre
    affine = np.array([[0, -0.8, 0, 10], [-0.7, 0, 0, -4], [0, 0, 2.5, 30], [0, 0, 0, 1]], dtype=float)
    nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), str(tmp_path / "scan.nii.gz"))
    model = _stub_model("ct_nifti", hu=(-160.0, -160.0, 240.0))
    csv_path = predict_images(model, [tmp_path / "scan.nii.gz"], tmp_path / "out")
    mask = nib.load(str(tmp_path / "out" / "masks" / "scan.nii.gz"))
    assert mask.shape == hu.shape and np.allclose(mask.affine, affine) and mask.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(mask.dataobj), (hu > 40).astype(np.uint8)), "the cube, voxel for voxel"
    (row,) = _rows(csv_path)
    assert (row["mask"], int(row["slices"]), int(row["area_px_class_1"])) == ("masks/scan.nii.gz", 5, 6 * 7 * 3)
    assert float(row["volume_ml_class_1"]) == pytest.approx(6 * 7 * 3 * 0.8 * 0.7 * 2.5 / 1000, abs=1e-4)
    with pytest.raises(UserError, match="trained on 2-D images"):
        predict_images(_stub_model("folder"), [tmp_path / "scan.nii.gz"], tmp_path / "out2")


def test_an_out_folder_with_predictions_is_refused_unless_overwrite(tmp_path):
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(tmp_path / "b.png")
    out = tmp_path / "out"
    predict_images(_stub_model(), [tmp_path / "a.png"], out)
    with pytest.raises(UserError, match=r"already holds predictions .*--overwrite"):
        predict_images(_stub_model(), [tmp_path / "b.png"], out)
    predict_images(_stub_model(), [tmp_path / "b.png"], out, overwrite=True)
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["b.png"], "the earlier run's masks went as a whole"
    assert [r["image"] for r in _rows(out / "predictions.csv")] == [str(tmp_path / "b.png")]


def test_a_link_inside_out_is_not_written_through(tmp_path):
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "victim").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "masks").symlink_to(tmp_path / "victim")
    with pytest.raises(UserError, match="is a link"):
        predict_images(_stub_model(), [tmp_path / "a.png"], tmp_path / "out", overwrite=True)
    assert not any((tmp_path / "victim").iterdir())


def test_a_file_where_an_output_folder_goes_is_named(tmp_path):
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "masks").write_text("notes")
    with pytest.raises(UserError, match="masks inside --out is not a folder") as refused:
        predict_images(_stub_model(), [tmp_path / "a.png"], tmp_path / "out", overwrite=True)
    assert refused.value.path == str(tmp_path / "out" / "masks") and (tmp_path / "out" / "masks").read_text() == "notes"


def _earlier_run(tmp_path):
    """An --out holding a.png's predictions, and b.png to replace them with."""
    for name in ("a", "b"):
        Image.fromarray(np.full((16, 16), 255, np.uint8)).save(tmp_path / f"{name}.png")
    predict_images(_stub_model(), [tmp_path / "a.png"], tmp_path / "out")
    return tmp_path / "out", tmp_path / "b.png"


def _outputs(out):
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if not p.relative_to(out).parts[0].startswith("."))


def test_a_folder_where_a_table_goes_is_refused_before_anything_is_replaced(tmp_path):
    out, image = _earlier_run(tmp_path)
    (out / "predictions.csv").unlink()
    (out / "predictions.csv").mkdir()
    before = _outputs(out)
    with pytest.raises(UserError, match="predictions.csv inside --out is a folder") as refused:
        predict_images(_stub_model(), [image], out, overwrite=True)
    assert refused.value.path == str(out / "predictions.csv")
    assert _outputs(out) == before and (out / "masks" / "a.png").is_file(), "the earlier masks are still there"


def test_a_failed_rename_puts_the_earlier_predictions_back(tmp_path, monkeypatch):
    out, image = _earlier_run(tmp_path)
    before = {name: (out / name).read_bytes() for name in ("predictions.csv", "predictions.json")}
    real_replace = os.replace

    failed = []

    def full_disk(src, dst, **kwargs):  # the new predictions.json fails once to reach --out
        if str(dst) == str(out / "predictions.json") and not failed:
            failed.append(src)
            raise OSError(28, "No space left on device")
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(UserError, match="cannot write: No space left"):
        predict_images(_stub_model(), [image], out, overwrite=True)
    monkeypatch.undo()
    assert _outputs(out) == ["masks", "masks/a.png", "overlays", "overlays/a.png", "predictions.csv", "predictions.json"]
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not list(out.glob(".predict-*")), "no staging folder left"


def test_a_staging_folder_of_a_killed_run_is_removed_but_not_one_in_use(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    out, image = _earlier_run(tmp_path)
    stale, busy = out / ".predict-killed1", out / ".predict-running"
    for folder in (stale, busy):
        (folder / "masks").mkdir(parents=True)
        (folder / "masks" / "x.png").write_bytes(b"half a mask")
    fd = os.open(busy, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        predict_images(_stub_model(), [image], out, overwrite=True)
    finally:
        os.close(fd)
    assert not stale.exists() and (busy / "masks" / "x.png").is_file()
    assert _outputs(out) == ["masks", "masks/b.png", "overlays", "overlays/b.png", "predictions.csv", "predictions.json"]


# ----- end to end with a bundle ------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle") / "task_1.relay", seed=1)


def test_predict_any_size_writes_masks_overlays_and_table(bundle, tmp_path):
    from relaylearn.predict import load_model, run_predict

    inputs = tmp_path / "images"
    inputs.mkdir()
    exact = _rgb(32, 32, 1)
    Image.fromarray(exact).save(inputs / "exact.png")
    Image.fromarray(_rgb(45, 70, 2)).save(inputs / "wide.jpg", quality=90)
    Image.fromarray(_rgb(64, 40, 3)[:, :, 0]).save(inputs / "grey.png")
    (inputs / "readme.txt").write_text("not an image")
    out = tmp_path / "out"
    csv_path = run_predict(bundle, out, [inputs], devices="cpu", no_verify=True)

    rows = _rows(csv_path)
    assert [r["image"].rsplit("/", 1)[-1] for r in rows] == ["exact.png", "grey.png", "wide.jpg"]
    for row, (h, w) in zip(rows, [(32, 32), (64, 40), (45, 70)]):
        stem = row["image"].rsplit("/", 1)[-1].split(".")[0]
        mask = np.asarray(Image.open(out / "masks" / f"{stem}.png"))
        assert mask.shape == (h, w) and set(np.unique(mask).tolist()) <= set(DOFE_LEVELS)
        assert Image.open(out / "overlays" / f"{stem}.png").size == (w, h)
        areas = [int(row[f"area_px_{n}"]) for n in ("background", "disc_rim", "cup")]
        assert sum(areas) == h * w
        assert areas == [int((mask == level).sum()) for level in DOFE_LEVELS]
        vcdr = float(row["vertical_cup_to_disc"])
        assert math.isnan(vcdr) or 0.0 <= vcdr <= 1.0

    model = load_model(bundle, no_verify=True)
    with torch.no_grad():
        expected = model.solver(to_model_input(exact.astype(np.float32) / np.float32(255), (32, 32), (-1, 1))[None]).argmax(1)[0].numpy()
    mask = np.asarray(Image.open(out / "masks" / "exact.png"))
    assert (mask == np.asarray(DOFE_LEVELS, dtype=np.uint8)[expected]).all(), "at the model's size the mask is the solver's argmax"
    assert not list(out.rglob("*.tmp")) and not list(out.glob(".predict-*"))


def test_an_exif_rotation_is_reported_not_applied(bundle, tmp_path, capsys):
    """README: images are segmented in their stored pixel grid; an EXIF orientation is only noted."""
    from relaylearn.predict import run_predict

    inputs = tmp_path / "images"
    inputs.mkdir()
    pixels = _rgb(24, 40, 5)  # wider than high: a turned mask would be 40 × 24
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to view
    Image.fromarray(pixels).save(inputs / "turned.png", exif=exif)
    Image.fromarray(pixels).save(inputs / "upright.png")
    assert Image.open(inputs / "turned.png").getexif()[0x0112] == 6
    out = tmp_path / "out"
    run_predict(bundle, out, [inputs], devices="cpu", no_verify=True)

    turned = np.asarray(Image.open(out / "masks" / "turned.png"))
    assert turned.shape == (24, 40), "the mask is in the stored pixel grid"
    assert np.array_equal(turned, np.asarray(Image.open(out / "masks" / "upright.png"))), "same pixels, same mask: no rotation applied"
    notes = [line for line in capsys.readouterr().out.splitlines() if "EXIF rotation" in line]
    assert len(notes) == 1 and notes[0].startswith("note: 1 image(s)") and "turned.png" in notes[0]


def test_unreadable_image_exits_2_and_writes_nothing(bundle, tmp_path, capsys, monkeypatch):
    from relaylearn import predict
    from relaylearn.cli import main

    monkeypatch.setattr(predict, "BATCH_SIZE", 1)  # the good image is fully processed before the bad one

    inputs = tmp_path / "images"
    inputs.mkdir()
    Image.fromarray(_rgb(32, 32)).save(inputs / "a_good.png")
    (inputs / "b_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "out"
    code = main(["predict", "--bundle", str(bundle), "--out", str(out), "-g", "cpu", "--no-verify", str(inputs)])
    assert code == 2
    err = capsys.readouterr().err
    assert "b_broken.png" in err and "cannot read image" in err and len(err.strip().splitlines()) == 1
    assert not (out / "predictions.csv").exists()
    assert not list(out.rglob("*.png")), "no mask or overlay of the good image either"
    assert not out.exists(), "the --out folder this run created is removed again"


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` × ``height`` pixels and which holds no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def test_a_decompression_bomb_or_an_unwritable_out_is_one_line_and_exit_2(bundle, tmp_path, capsys):
    from relaylearn.cli import main

    bomb = tmp_path / "huge.png"
    bomb.write_bytes(_png_header_only(100_000, 100_000))
    assert main(["predict", "--bundle", str(bundle), "--out", str(tmp_path / "out"), "-g", "cpu", "--no-verify", str(bomb)]) == 2
    err = capsys.readouterr().err
    assert "huge.png" in err and "cannot read image" in err and len(err.strip().splitlines()) == 1
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    image = tmp_path / "ok.png"
    Image.fromarray(_rgb(32, 32)).save(image)
    assert main(["predict", "--bundle", str(bundle), "--out", str(blocker / "out"), "-g", "cpu", "--no-verify", str(image)]) == 2
    err = capsys.readouterr().err
    assert "a_file" in err and "cannot write" in err and len(err.strip().splitlines()) == 1
