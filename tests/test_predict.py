"""``relaylearn predict``: masks at the original size, overlays, the per-image table, bad inputs."""

from __future__ import annotations

import csv
import math

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
from tests.test_export import make_bundle


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
    assert read_image(tmp_path / "grey.png", 3).shape == (4, 6, 3) and read_image(tmp_path / "grey.png", 3).max() == 200
    assert read_image(tmp_path / "alpha.png", 3)[0, 0].tolist() == [100, 100, 100]
    assert read_image(tmp_path / "alpha.png", 1).shape == (4, 6, 1)
    assert read_image(tmp_path / "deep.png", 1).max() == 255, "16-bit white stays white"
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="empty.jpg: cannot read image"):
        read_image(tmp_path / "empty.jpg", 3)


def test_model_input_is_resized_and_scaled():
    x = to_model_input(np.full((50, 70, 3), 255, dtype=np.uint8), (32, 32), (-1.0, 1.0))
    assert x.shape == (3, 32, 32) and torch.allclose(x, torch.ones_like(x))
    x = to_model_input(np.zeros((32, 32, 1), dtype=np.uint8), (32, 32), (0.0, 1.0))
    assert x.shape == (1, 32, 32) and x.max() == 0


def test_expand_inputs_sorts_folders_and_keeps_only_images(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("b.png", "a.JPG", "notes.txt", ".hidden.png"):
        (folder / name).write_bytes(b"x")
    single = tmp_path / "c.png"
    single.write_bytes(b"x")
    assert [p.name for p in expand_inputs([folder, single])] == ["a.JPG", "b.png", "c.png"]
    with pytest.raises(DataError, match="not found"):
        expand_inputs([tmp_path / "nope.png"])
    (tmp_path / "b.png").write_bytes(b"x")
    with pytest.raises(UserError, match="same output name 'b.png'"):
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
        expected = model.solver(to_model_input(exact, (32, 32), (-1, 1))[None]).argmax(1)[0].numpy()
    mask = np.asarray(Image.open(out / "masks" / "exact.png"))
    assert (mask == np.asarray(DOFE_LEVELS, dtype=np.uint8)[expected]).all(), "at the model's size the mask is the solver's argmax"
    assert not list(out.rglob("*.tmp")) and not list(out.glob(".predict-*"))


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
