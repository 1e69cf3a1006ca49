"""``relaylearn predict``: segment new images of any size, or NIfTI volumes, with a bundle's solver.

For every input image ``<stem>`` the output folder receives

* ``masks/<stem>.png`` — the class map at the image's original size, encoded as the model's data
  layout stores masks (a 3-class fundus model: the DoFE grey levels 255 = background, 128 = disc
  rim, 0 = cup; every other built-in layout: class ids 0, 1, 2, ... as 8-bit grey levels).
* ``overlays/<stem>.png`` — the image with translucent class colours and opaque class contours.
* ``predictions.csv`` — one row per image: size, the area of every class in pixels and the
  layout's extra measures (3-class fundus models: the vertical cup-to-disc ratio, cup height /
  disc height, disc = rim ∪ cup; NaN when no disc is found, 0 when a disc but no cup is found).

A NIfTI volume ``<stem>.nii[.gz]`` (models of the ``nifti``, ``ct_nifti`` and ``ct_slices``
layouts) is segmented slice by slice along its last axis, as training slices volumes, and gives
``masks/<stem>.nii.gz``: class ids (uint8) on the input's grid (same shape and affine); its row
counts voxels per class and their volume in mL (from the voxel size in the header).

Pre-processing matches training (the same decoder): 8-bit images are read as RGB (or grey for
1-channel models) / 255, 16-bit grey images (1-channel models) / 65535 at full precision; float
images and integer images with values outside 0..65535 are refused; CT models window Hounsfield units (16-bit slices
hold HU − ``hu_min``; volumes hold HU) to the training window; ``nifti`` models normalise each
volume by its 0.5 / 99.5 percentiles. The image is resized to the model's ``img_size`` bilinearly
with antialiasing and scaled to ``out_range``. Going back to the original size, the *logits* are
upsampled bilinearly and the argmax is taken there (smoother boundaries than nearest-upsampling
the low-resolution class map). Images are read in their stored pixel grid, as training reads them
(an EXIF rotation is reported, not applied).

All outputs are written into a hidden staging folder first (``.predict-*``, locked while in use;
one a killed run left behind is removed by the next) and renamed into place only when every input
succeeded and every output was written, so an unreadable image (DataError naming it, exit code 2)
or a full disk leaves nothing half-written under a final name. An ``--out`` folder that already
holds predictions is refused unless ``overwrite`` is set, which replaces its ``masks/``,
``overlays/`` and tables as a whole (the earlier ones stay if a rename fails).

Images go through the model ``BATCH_SIZE`` at a time, fewer where that many would not fit in
memory; a model whose ``img_size`` needs more memory than this machine has for one image is
refused before any pass (exit code 3, :mod:`relaylearn.memory`), and an allocation that fails
anyway is one line (exit code 2), the staging folder removed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
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
from relaylearn.memory import fitting_batch, out_of_memory_as_error

VOLUME_SUFFIXES = (".nii.gz", ".nii")
VOLUME_LAYOUTS = ("nifti", "ct_nifti", "ct_slices")  # layouts whose models read NIfTI volumes
BATCH_SIZE = 8  # images per forward pass at most; fewer where they would not fit in memory
EXIF_ORIENTATION = 0x0112
OUTPUT_NAMES = ("masks", "overlays", "predictions.csv", "predictions.json")


def image_suffixes() -> tuple[str, ...]:
    """File suffixes Pillow can open here (what a folder input is scanned for, besides volumes)."""
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN))


def output_stem(path: Path) -> str:
    """``scan.nii.gz`` → ``scan``; ``eye.png`` → ``eye``."""
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def is_volume(path: Path) -> bool:
    return path.name.lower().endswith(VOLUME_SUFFIXES)


# ----- inputs ------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """The files to segment, in order, and what a folder held besides them."""

    files: list[Path]
    skipped_files: int = 0  # files in a given folder that are neither images nor volumes
    skipped_folders: int = 0  # sub-folders of a given folder (folders are not read recursively)


def expand_inputs(inputs: Sequence[str | Path]) -> Inputs:
    """Files as given; folders expanded to their image and NIfTI files (sorted, not recursive,
    hidden files left out). DataError for a missing input or a folder with nothing to read."""
    suffixes = image_suffixes()
    found_files: list[Path] = []
    skipped_files = skipped_folders = 0
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            entries = [p for p in path.iterdir() if not p.name.startswith(".")]
            found = sorted(p for p in entries if p.is_file() and (p.suffix.lower() in suffixes or is_volume(p)))
            skipped_folders += sum(p.is_dir() for p in entries)
            skipped_files += sum(p.is_file() for p in entries) - len(found)
            if not found:
                raise DataError("no image or NIfTI files in this folder (sub-folders are not read)", path)
            found_files.extend(found)
        elif path.is_file():
            found_files.append(path)
        else:
            raise DataError("input image or folder not found", path)
    stems: dict[str, Path] = {}
    for f in found_files:
        stem = output_stem(f)
        if stem in stems and stems[stem] != f:
            raise UserError(f"two inputs would write the same output name '{stem}': {stems[stem]} and {f}")
        stems[stem] = f
    return Inputs(list(dict.fromkeys(found_files)), skipped_files, skipped_folders)


def skipped_note(found: Inputs) -> str:
    """The note on what the given folders held besides inputs (parts that are zero left out)."""
    parts = [f"{found.skipped_files} file(s) that are neither images nor NIfTI volumes"] * bool(found.skipped_files)
    parts += [f"{found.skipped_folders} sub-folder(s) (folders are not read recursively)"] * bool(found.skipped_folders)
    return f"note: skipped {' and '.join(parts)}"


def read_image(path: Path, channels: int, hu: tuple[float, float, float] | None = None) -> np.ndarray:
    """Decode an image as float32 [H, W, C] in 0..1 with training's decoder (RGB for 3 channels,
    grey for 1; 8-bit / 255, 16-bit / 65535; float and signed images refused); DataError if unreadable.

    ``hu`` (CT models): a 16-bit slice holds HU − hu_min; it is windowed to (low, high) HU."""
    from relaylearn.data.ct import window_hu
    from relaylearn.data.layouts import _pil_pixels

    if channels not in (1, 3):
        raise UserError(f"predict supports 1- or 3-channel models, this one has {channels} channels")
    try:
        with Image.open(path) as im:
            im.load()
            pixels, full_scale = _pil_pixels(im, channels, path)  # [C, H, W]
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read image: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", path) from None
    if hu is not None and full_scale == 65535.0:  # CT slice: HU window as in training
        hu_min, low, high = hu
        array = window_hu(pixels + np.float32(hu_min), (low, high))
    else:
        array = pixels.astype(np.float32) / np.float32(full_scale)
    array = array.transpose(1, 2, 0)
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise DataError("image is empty", path)
    return array


def exif_rotated(path: Path) -> bool:
    """The image carries an EXIF orientation other than "upright" (viewers show it turned)."""
    try:
        with Image.open(path) as im:
            return int(im.getexif().get(EXIF_ORIENTATION, 1)) != 1
    except (OSError, ValueError, SyntaxError, TypeError):
        return False


def read_volume(path: Path, model: LoadedModel) -> tuple[np.ndarray, object]:
    """A NIfTI volume → (slices float32 [Z, X, Y, C] in 0..1 as training prepares them, image).

    Slices are cut along the last spatial axis (rows = first axis). CT models window HU; ``nifti``
    models normalise the volume by its percentiles."""
    import nibabel as nib

    from relaylearn.data.ct import window_hu
    from relaylearn.data.layouts import _normalise_volume

    if model.layout.name not in VOLUME_LAYOUTS:
        raise UserError(
            f"this model was trained on 2-D images (layout '{model.layout.name}'); NIfTI volumes need a model of the {', '.join(VOLUME_LAYOUTS)} layouts", path
        )
    try:
        image = nib.load(str(path))
        volume = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for corrupt files
        raise DataError(f"cannot read NIfTI volume ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})", path) from None
    if volume.ndim == 3:
        volume = volume[..., None]
    if volume.ndim != 4 or volume.shape[3] != model.channels or min(volume.shape) < 1:
        raise DataError(f"expected a 3-D volume (or 4-D with {model.channels} channels last), got shape {volume.shape}", path)
    if not np.isfinite(volume).all():
        raise DataError("volume holds NaN or infinite values", path)
    if model.hu is not None:
        channels = [window_hu(volume[..., c], model.hu[1:]) for c in range(volume.shape[3])]
    else:
        channels = [_normalise_volume(volume[..., c]) for c in range(volume.shape[3])]
    return np.stack(channels, axis=-1).transpose(2, 0, 1, 3), image  # [Z, X, Y, C]


def to_model_input(image: np.ndarray, img_size: Sequence[int], out_range: Sequence[float]) -> Tensor:
    """Image float [H, W, C] in 0..1 → float [C, h, w] at ``img_size`` (bilinear, antialiased) in ``out_range``."""
    x = torch.from_numpy(np.array(image, dtype=np.float32, copy=True)).permute(2, 0, 1)
    if tuple(x.shape[1:]) != tuple(img_size):
        x = F.interpolate(x[None], size=tuple(img_size), mode="bilinear", align_corners=False, antialias=True)[0].clamp_(0.0, 1.0)
    low, high = out_range
    return x * (high - low) + low


@torch.no_grad()
def predict_class_maps(
    solver: nn.Module, images: Sequence[np.ndarray], img_size: Sequence[int], out_range: Sequence[float], device: torch.device | str = "cpu"
) -> list[np.ndarray]:
    """Class maps (int64 [H, W] at each image's own size) for images float [H, W, C] in 0..1; a
    failed allocation is a UserError (exit 2)."""
    with out_of_memory_as_error("segmenting images", img_size, len(images)):
        batch = torch.stack([to_model_input(im, img_size, out_range) for im in images]).to(device)
        logits = solver(batch).float()
        maps = []
        for im, lg in zip(images, logits):
            if tuple(lg.shape[1:]) != im.shape[:2]:
                lg = F.interpolate(lg[None], size=im.shape[:2], mode="bilinear", align_corners=False)[0]
            maps.append(lg.argmax(0).cpu().numpy())
    return maps


def to_display(image: np.ndarray) -> np.ndarray:
    """float [H, W, C] in 0..1 → uint8 [H, W, C] (for overlays)."""
    return (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)


# ----- outputs -----------------------------------------------------------------------------------
def class_areas(class_map: np.ndarray, num_classes: int) -> list[int]:
    """Pixels of each class 0..num_classes-1."""
    return np.bincount(class_map.ravel(), minlength=num_classes)[:num_classes].astype(int).tolist()


def volume_rows(model: LoadedModel, path: Path, class_map: np.ndarray, image) -> dict:
    """The CSV row of a segmented volume: its size, voxels and mL of every class."""
    voxel_ml = float(np.prod(image.header.get_zooms()[:3])) / 1000.0
    areas = class_areas(class_map, model.num_classes)
    row = {
        "image": str(path),
        "mask": f"masks/{output_stem(path)}.nii.gz",
        "width": class_map.shape[1],
        "height": class_map.shape[0],
        "slices": class_map.shape[2],
    }
    row.update({f"area_px_{name}": a for name, a in zip(model.class_names, areas)})
    row.update({f"volume_ml_{name}": a * voxel_ml for name, a in zip(model.class_names, areas)})
    return row


def segment_volume(model: LoadedModel, path: Path, staging: Path, device: torch.device | str, batch_size: int = BATCH_SIZE) -> dict:
    """Segment one NIfTI volume slice by slice, ``batch_size`` slices at a time; write
    ``masks/<stem>.nii.gz`` (uint8 class ids on the input's grid) under ``staging``; return its CSV row."""
    import nibabel as nib

    slices, image = read_volume(path, model)
    maps = []
    for start in range(0, len(slices), batch_size):
        maps.extend(predict_class_maps(model.solver, list(slices[start : start + batch_size]), model.img_size, model.out_range, device))
    class_map = np.stack(maps, axis=2).astype(np.uint8)  # [X, Y, Z], as the input
    mask = nib.Nifti1Image(class_map, image.affine)
    mask.set_qform(image.affine, code=int(image.header["qform_code"]) or 1)
    mask.set_sform(image.affine, code=int(image.header["sform_code"]) or 1)
    nib.save(mask, str(staging / "masks" / f"{output_stem(path)}.nii.gz"))
    return volume_rows(model, path, class_map, image)


def check_out_folder(out: Path, overwrite: bool) -> None:
    """``--out`` is a folder (or nothing yet) without links where outputs go, and holds no earlier
    predictions unless ``overwrite``; UserError otherwise."""
    if out.exists() and not out.is_dir():
        raise UserError("--out must be a folder, but a file is there", out)
    for name in OUTPUT_NAMES:
        if (out / name).is_symlink():
            raise UserError(f"{name} inside --out is a link; predict does not write through links", out / name)
    for name in OUTPUT_NAMES:
        folder = name in ("masks", "overlays")
        if (out / name).exists() and (out / name).is_dir() != folder:
            raise UserError(f"{name} inside --out is {'not ' if folder else ''}a folder; move it away or choose another --out", out / name)
    earlier = [name for name in OUTPUT_NAMES if (out / name).exists()]
    if earlier and not overwrite:
        raise UserError(f"--out already holds predictions ({', '.join(earlier)}); choose a new folder, or pass --overwrite to replace them", out)


STAGING_PREFIX = ".predict-"


def _hold_staging(staging: Path):
    """An exclusive lock on the staging folder while this process writes into it (None without
    ``fcntl``): :func:`_remove_stale_staging` leaves it alone."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock, no clean-up of stale folders
        return None
    fd = os.open(staging, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _remove_stale_staging(out: Path) -> None:
    """Remove the staging folders a killed ``predict`` left in ``out``: ours by name, and not locked
    by a running one."""
    for folder in out.glob(STAGING_PREFIX + "*"):
        if folder.is_symlink() or not folder.is_dir():
            continue
        try:
            fd = _hold_staging(folder)
        except OSError:
            continue
        if fd is not None:
            shutil.rmtree(folder, ignore_errors=True)
            os.close(fd)


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename every output in ``staging`` to ``out``; the earlier ones there are kept as
    ``staging/earlier-*`` until all renames succeeded, and put back if one fails. UserError then."""
    earlier = [(out / name, staging / f"earlier-{name}") for name in OUTPUT_NAMES if (out / name).exists()]
    moves = [*earlier, *((staging / name, out / name) for name in OUTPUT_NAMES)]
    done: list[tuple[Path, Path]] = []  # undone in reverse order on failure
    for source, target in moves:
        try:
            os.replace(source, target)
        except OSError as exc:
            for back_to, moved in reversed(done):
                os.replace(moved, back_to)
            where = source if target.parent == staging else target
            raise UserError(f"cannot write: {exc.strerror or exc}; the earlier predictions are left as they were", where) from None
        done.append((source, target))


def predict_images(
    model: LoadedModel, files: Sequence[Path], out: Path, device: torch.device | str = "cpu", overwrite: bool = False, batch_size: int | None = None
) -> Path:
    """Segment ``files`` (images and NIfTI volumes) with ``model``, ``batch_size`` (default
    ``BATCH_SIZE``) at a time; write masks/, overlays/ and predictions.csv under ``out``.

    Returns the CSV path. Nothing appears under a final name unless every input succeeded and every
    output was written; with ``overwrite`` the earlier outputs are replaced as a whole."""
    check_out_folder(out, overwrite)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(out)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
        lock = _hold_staging(staging)
    except OSError as exc:
        raise UserError(f"cannot write: {exc.strerror or exc}", out) from None
    subfolders = ("masks", "overlays")
    batch_size = batch_size or BATCH_SIZE
    rows = []
    done = False
    try:
        for sub in subfolders:
            (staging / sub).mkdir()
        images_2d = [f for f in files if not is_volume(f)]
        for start in range(0, len(images_2d), batch_size):
            chunk = images_2d[start : start + batch_size]
            images = [read_image(f, model.channels, model.hu) for f in chunk]
            maps = predict_class_maps(model.solver, images, model.img_size, model.out_range, device)
            for f, image, class_map in zip(chunk, images, maps):
                stem = output_stem(f)
                (staging / "masks" / f"{stem}.png").write_bytes(png_bytes(model.layout.encode_mask(class_map, model.num_classes)))
                (staging / "overlays" / f"{stem}.png").write_bytes(png_bytes(overlay(to_display(image), class_map)))
                row = {"image": str(f), "mask": f"masks/{stem}.png", "width": image.shape[1], "height": image.shape[0]}
                row.update({f"area_px_{name}": a for name, a in zip(model.class_names, class_areas(class_map, model.num_classes))})
                row.update(model.layout.measures(class_map, model.num_classes))
                rows.append(row)
        rows.extend(segment_volume(model, f, staging, device, batch_size) for f in files if is_volume(f))
        order = {str(f): i for i, f in enumerate(files)}
        rows.sort(key=lambda row: order[row["image"]])
        atomic_write(staging / "predictions.csv", csv_text(rows, float_format="{:.4f}", lineterminator="\n"))
        info = {"bundle_sha256": model.bundle_sha256, "strategy": model.strategy, "verified": model.verified, "signed_by": model.signed_by, "images": len(rows)}
        atomic_write(staging / "predictions.json", (json.dumps(info, indent=2) + "\n").encode())
        _move_into_place(staging, out)  # every input succeeded and every output is written
        done = True
        return out / "predictions.csv"
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if lock is not None:
            os.close(lock)
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
    overwrite: bool = False,
    hu_min: float | None = None,
) -> Path:
    """``relaylearn predict``: returns the path of ``predictions.csv`` (``predictions.json`` beside
    it records the bundle and whether it was verified). ``hu_min``: how this site's 16-bit CT
    slices store HU (the local config's ``dataset.kwargs.hu_min``; default: the bundle's)."""
    from dataclasses import replace

    found = expand_inputs(inputs)
    check_out_folder(Path(out), overwrite)
    device = inference_device(devices)
    model = load_model(bundle, trust, device, no_verify=no_verify, plugins=plugins)
    if hu_min is not None and model.hu is not None:
        model = replace(model, hu=(float(hu_min), *model.hu[1:]))
    batch_size = fitting_batch(model.img_size, BATCH_SIZE, device, bundle=bundle)  # the bundle's size: refused (exit 3) before any pass
    csv_path = predict_images(model, found.files, Path(out), device, overwrite=overwrite, batch_size=batch_size)
    rotated = [f for f in found.files if not is_volume(f) and exif_rotated(f)]
    if rotated:
        print(
            f"note: {len(rotated)} image(s) carry an EXIF rotation (e.g. {rotated[0].name}): segmented in their stored pixel grid, as training reads "
            "images; their masks are in that grid, so a viewer that turns the image shows it turned against its mask"
        )
    if found.skipped_files or found.skipped_folders:
        print(skipped_note(found))
    print(f"segmented {len(found.files)} input(s): masks and overlays in {out}, table {csv_path}")
    return csv_path
