"""``relaylearn predict``: segment new images of any size with a bundle's solver.

For every input image ``<stem>`` the output folder receives

* ``masks/<stem>.png`` — the class map at the image's original size, encoded as the model's data
  layout stores masks (a 3-class fundus model: the DoFE grey levels 255 = background, 128 = disc
  rim, 0 = cup; every other built-in layout: class ids 0, 1, 2, ... as 8-bit grey levels).
* ``overlays/<stem>.png`` — the image with translucent class colours and opaque class contours.
* ``predictions.csv`` — one row per image: size, the area of every class in pixels and the
  layout's extra measures (3-class fundus models: the vertical cup-to-disc ratio, cup height /
  disc height, disc = rim ∪ cup; NaN when no disc is found, 0 when a disc but no cup is found).

Pre-processing matches training: the image is read as RGB (or grey for 1-channel models),
resized to the model's ``img_size`` bilinearly with antialiasing and scaled to ``out_range``.
Going back to the original size, the *logits* are upsampled bilinearly and the argmax is taken
there (smoother boundaries than nearest-upsampling the low-resolution class map).

All outputs are written into a hidden staging folder first and renamed into place only when
every image succeeded, so an unreadable image (DataError naming it, exit code 2) leaves nothing
half-written under a final name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn

from relaylearn.assembly import LoadedModel, load_model
from relaylearn.devices import inference_device
from relaylearn.errors import DataError, UserError
from relaylearn.files import atomic_write, csv_text
from relaylearn.imaging import overlay, png_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
BATCH_SIZE = 8


# ----- inputs ------------------------------------------------------------------------------------
def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given; folders expanded to their image files (sorted, not recursive)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
            if not found:
                raise DataError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder", path)
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError("input image or folder not found", path)
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems and stems[f.stem] != f:
            raise UserError(f"two inputs would write the same output name '{f.stem}.png': {stems[f.stem]} and {f}")
        stems[f.stem] = f
    return list(dict.fromkeys(files))


def read_image(path: Path, channels: int, hu: tuple[float, float, float] | None = None) -> np.ndarray:
    """Decode an image as uint8 [H, W, C] (RGB for 3 channels, grey for 1); DataError if unreadable.

    ``hu`` (CT models): a 16-bit slice holds HU − hu_min; it is windowed to (low, high) HU → 0..255."""
    if channels not in (1, 3):
        raise UserError(f"predict supports 1- or 3-channel models, this one has {channels} channels")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I") and hu is not None:  # CT slice: HU window as in training
                hu_min, low, high = hu
                window = (np.asarray(im, dtype=np.float64) + hu_min - low) / (high - low)
                grey = (window.clip(0, 1) * 255.0).round().astype(np.uint8)
                im = Image.fromarray(grey)
            elif im.mode.startswith("I"):  # 16-bit grey: scale 0..65535 to 0..255 (as training divides by 65535)
                grey = (np.asarray(im, dtype=np.float64).clip(0, 65535) / 257.0).round().astype(np.uint8)
                im = Image.fromarray(grey)
            im = im.convert("RGB" if channels == 3 else "L")
            array = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read image: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", path) from None
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise DataError("image is empty", path)
    return array


def to_model_input(image: np.ndarray, img_size: Sequence[int], out_range: Sequence[float]) -> Tensor:
    """uint8 [H, W, C] → float [C, h, w] at ``img_size`` (bilinear, antialiased) in ``out_range``."""
    x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().div_(255.0)
    if tuple(x.shape[1:]) != tuple(img_size):
        x = F.interpolate(x[None], size=tuple(img_size), mode="bilinear", align_corners=False, antialias=True)[0].clamp_(0.0, 1.0)
    low, high = out_range
    return x * (high - low) + low


@torch.no_grad()
def predict_class_maps(
    solver: nn.Module, images: Sequence[np.ndarray], img_size: Sequence[int], out_range: Sequence[float], device: torch.device | str = "cpu"
) -> list[np.ndarray]:
    """Class maps (int64 [H, W] at each image's own size) for uint8 images [H, W, C]."""
    batch = torch.stack([to_model_input(im, img_size, out_range) for im in images]).to(device)
    logits = solver(batch).float()
    maps = []
    for im, lg in zip(images, logits):
        if tuple(lg.shape[1:]) != im.shape[:2]:
            lg = F.interpolate(lg[None], size=im.shape[:2], mode="bilinear", align_corners=False)[0]
        maps.append(lg.argmax(0).cpu().numpy())
    return maps


# ----- outputs -----------------------------------------------------------------------------------
def class_areas(class_map: np.ndarray, num_classes: int) -> list[int]:
    """Pixels of each class 0..num_classes-1."""
    return np.bincount(class_map.ravel(), minlength=num_classes)[:num_classes].astype(int).tolist()


def predict_images(model: LoadedModel, files: Sequence[Path], out: Path, device: torch.device | str = "cpu") -> Path:
    """Segment ``files`` with ``model``; write masks/, overlays/ and predictions.csv under ``out``.

    Returns the CSV path. Nothing appears under a final name unless every image succeeded.
    """
    if out.exists() and not out.is_dir():
        raise UserError("--out must be a folder, but a file is there", out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".predict-", dir=out))
    except OSError as exc:
        raise UserError(f"cannot write: {exc.strerror or exc}", out) from None
    subfolders = ("masks", "overlays")
    rows = []
    done = False
    try:
        for sub in subfolders:
            (staging / sub).mkdir()
        for start in range(0, len(files), BATCH_SIZE):
            chunk = files[start : start + BATCH_SIZE]
            images = [read_image(f, model.channels, model.hu) for f in chunk]
            maps = predict_class_maps(model.solver, images, model.img_size, model.out_range, device)
            for f, image, class_map in zip(chunk, images, maps):
                (staging / "masks" / f"{f.stem}.png").write_bytes(png_bytes(model.layout.encode_mask(class_map, model.num_classes)))
                (staging / "overlays" / f"{f.stem}.png").write_bytes(png_bytes(overlay(image, class_map)))
                row = {"image": str(f), "mask": f"masks/{f.stem}.png", "width": image.shape[1], "height": image.shape[0]}
                row.update({f"area_px_{name}": a for name, a in zip(model.class_names, class_areas(class_map, model.num_classes))})
                row.update(model.layout.measures(class_map, model.num_classes))
                rows.append(row)
        for sub in subfolders:  # every image succeeded: move the files to their final names
            (out / sub).mkdir(exist_ok=True)
            for tmp in sorted((staging / sub).iterdir()):
                os.replace(tmp, out / sub / tmp.name)
        csv_path = out / "predictions.csv"
        atomic_write(csv_path, csv_text(rows, float_format="{:.4f}", lineterminator="\n"))
        info = {"bundle_sha256": model.bundle_sha256, "strategy": model.strategy, "verified": model.verified, "signed_by": model.signed_by, "images": len(rows)}
        atomic_write(out / "predictions.json", (json.dumps(info, indent=2) + "\n").encode())
        done = True
        return csv_path
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not done and created and not any(out.iterdir()):  # a failed run leaves no empty --out folder behind
            out.rmdir()


def run_predict(
    bundle: str | Path,
    out: str | Path,
    inputs: Sequence[str | Path],
    trust: str | None = None,
    devices: str | None = None,
    *,
    no_verify: bool = False,
    plugins: set[str] | tuple[str, ...] = (),
) -> Path:
    """``relaylearn predict``: returns the path of ``predictions.csv`` (``predictions.json`` beside
    it records the bundle and whether it was verified)."""
    files = expand_inputs(inputs)
    device = inference_device(devices)
    model = load_model(bundle, trust, device, no_verify=no_verify, plugins=plugins)
    csv_path = predict_images(model, files, Path(out), device)
    print(f"segmented {len(files)} image(s): masks and overlays in {out}, table {csv_path}")
    return csv_path
