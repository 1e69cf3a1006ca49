"""Site datasets, decoded once into memory (sites are small), behind one interface:
:class:`Layout` (pair files, decode a label, encode a mask, class names). Built-in layouts are
registered by name; your own is a ``Layout`` subclass named in the local config as
``dataset.name: package.module:Class`` (never imported because a bundle names it).

Built-in layouts (docs/design.md#data-layouts), for each folder of ``folders`` under ``root``:

* ``"fundus"`` (DoFE, :mod:`relaylearn.data.dofe`): ``<root>/<folder>/<split>/ROIs/image/*.png``
  with masks of the same file name in ``.../ROIs/mask/``, grey levels 255/128/0.
* ``"ct_nifti"`` / ``"ct_slices"`` (:mod:`relaylearn.data.ct`): CT studies, split study-wise.
* ``"folder"``: ``<root>/<folder>/<split>/image/*`` and ``.../mask/*`` paired by file stem, any
  Pillow-readable format; mask pixel = class id (single channel or palette).
* ``"nifti"``: ``<root>/<folder>/<split>/image/*.nii.gz`` and ``.../label/*.nii.gz`` of the same
  name; every volume becomes 2-D slices along its last spatial axis (``volume[:, :, k]``, rows =
  first array axis). Intensities are normalised per volume: clipped to the 0.5–99.5 percentile
  range and mapped to ``out_range``. ``subjects`` holds the volume name of each slice.

Preprocessing follows the original: 8-bit image → float / 255 → ``out_range`` (16-bit images use
/ 65535; a 32-bit integer image counts as 16-bit when its values lie in 0..65535; float images
and other integer images are a DataError), resized to ``img_size`` bilinearly **with antialiasing** (``antialias=True``; the
original's torchvision 0.12 resize had none, which aliases when shrinking), labels with
nearest-neighbour (``nearest-exact``, pixel-centre aligned). Files whose names start with ``.``
are ignored; everything is sorted, so the order is deterministic.
"""

from __future__ import annotations

import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from relaylearn.errors import ConfigError, DataError, UserError
from relaylearn.files import check_data_root

NIFTI_PERCENTILES = (0.5, 99.5)


@dataclass
class SiteData:
    """One split of one site, in memory.

    images: float32 [N, C, H, W] in ``out_range``; labels: int64 [N, H, W] class ids;
    names: file stem per item (``<volume>_<slice>`` for NIfTI slices; ``<folder>/`` in front of
    the name and subject of every item of a subject whose subject or names occur in several merged
    folders); subjects: subject id per item (== name for 2-D images, volume name for slices);
    sources: image file per item.
    """

    site: str
    images: Tensor
    labels: Tensor
    names: list[str]
    subjects: list[str]
    sources: list[Path]

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class _Item:
    """One decoded image/label pair at its original size, before resizing."""

    image: np.ndarray  # [C, h, w]; uint8, uint16 or float32, divided by `scale` gives 0..1
    label: np.ndarray  # int64 [h, w]
    name: str
    subject: str
    source: Path  # image file
    label_source: Path
    scale: float = 1.0
    folder: str = ""


# ----- files ------------------------------------------------------------------------------------
def _visible_files(folder: Path, suffixes: tuple[str, ...] | None) -> list[Path]:
    """Sorted regular files in ``folder`` not starting with ``.``, optionally filtered by suffix."""
    if not folder.is_dir():
        raise DataError("folder not found", folder)
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    if suffixes is not None:
        files = [p for p in files if p.name.lower().endswith(suffixes)]
    return sorted(files)


def _pair_files(image_dir: Path, mask_dir: Path, suffixes: tuple[str, ...] | None, key) -> list[tuple[Path, Path]]:
    """Pair image and mask files by ``key(path)``; an image without mask (or vice versa) is an error."""
    images = _visible_files(image_dir, suffixes)
    masks = _visible_files(mask_dir, suffixes)
    if not images:
        raise DataError("no images found", image_dir)
    image_keys = set(_by_name(images, key))
    masks_by_key = _by_name(masks, key)
    for image in images:
        if key(image) not in masks_by_key:
            raise DataError(f"image has no mask in {mask_dir}", image)
    for mask in masks:
        if key(mask) not in image_keys:
            raise DataError(f"mask has no image in {image_dir}", mask)
    return [(image, masks_by_key[key(image)]) for image in images]


def _by_name(files: list[Path], key) -> dict[str, Path]:
    """``{key(file): file}``; DataError naming the second of two files with one name (``a.nii``, ``a.nii.gz``)."""
    out: dict[str, Path] = {}
    for path in files:
        name = key(path)
        if name in out:
            raise DataError(f"several files share the name '{name}' ({out[name].name} and {path.name})", path)
        out[name] = path
    return out


def _stem(path: Path) -> str:
    """File name without its extension(s) known to be image suffixes (``a.nii.gz`` → ``a``)."""
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{error.__class__.__name__}: {text[0] if text else ''}"


def _open_pil(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot read image ({_one_line(error)})", path) from None
    return image


_UINT16_MODES = ("I;16", "I;16B", "I;16L")
_STORE_UNSIGNED = "store images as 8- or 16-bit unsigned integers"


def _pil_pixels(image: Image.Image, channels: int, path: Path) -> tuple[np.ndarray, float]:
    """PIL image -> ([channels, h, w] array in 0..full scale, full scale: 255 for 8-bit, 65535 for 16-bit).

    Training and ``predict`` decode with this. A 32-bit integer image (mode ``I``, e.g. a signed
    16-bit TIFF) is read as 16-bit when every value lies in 0..65535; float images and integer
    images outside that range are a DataError."""
    if image.mode == "F":
        raise DataError(f"image holds floating-point pixels (mode F): {_STORE_UNSIGNED}", path)
    if image.mode.startswith("I"):
        if channels != 1:
            raise DataError(f"16-bit image has 1 channel, but channels={channels} is configured", path)
        pixels = np.asarray(image)
        if image.mode not in _UINT16_MODES and pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
            raise DataError(f"image holds values {pixels.min()}..{pixels.max()}, outside 0..65535 (mode {image.mode}): {_STORE_UNSIGNED}", path)
        return pixels.astype(np.float32)[None], 65535.0
    if channels == 1:
        return np.array(image.convert("L"))[None], 255.0
    if channels == 3:
        return np.array(image.convert("RGB")).transpose(2, 0, 1), 255.0
    raise DataError(f"images can be read with 1 or 3 channels, got channels={channels}", path)


# ----- layouts ----------------------------------------------------------------------------------
def _class_id_label(mask: Image.Image, path: Path) -> np.ndarray:
    """Generic mask: pixel value = class id (single channel, palette, or RGB with equal channels)."""
    array = np.asarray(mask)
    if array.ndim == 3:
        if array.shape[2] in (2, 4):  # drop alpha
            array = array[..., :-1]
        if not (array == array[..., :1]).all():
            raise DataError("mask must be single-channel class ids (its colour channels differ)", path)
        array = array[..., 0]
    if array.dtype.kind == "f":  # a float mask (e.g. a mode-F TIFF): class ids must be whole numbers
        if not np.isfinite(array).all() or not np.array_equal(array, np.rint(array)):
            raise DataError("mask holds non-integer values (class ids must be whole numbers)", path)
    return array.astype(np.int64)


def _read_2d_pairs(pairs: list[tuple[Path, Path]], channels: int, decode_label) -> list[_Item]:
    """Decode image/mask pairs (in threads: Pillow releases the GIL while decoding), in file order."""

    def read(pair: tuple[Path, Path]) -> _Item:
        image_path, mask_path = pair
        image, scale = _pil_pixels(_open_pil(image_path), channels, image_path)
        label = decode_label(_open_pil(mask_path), mask_path)
        if image.shape[1:] != label.shape:
            raise DataError(f"image is {image.shape[2]}×{image.shape[1]} but its mask is {label.shape[1]}×{label.shape[0]} pixels", mask_path)
        name = _stem(image_path)
        return _Item(image, label, name, name, image_path, mask_path, scale)

    workers = min(8, os.cpu_count() or 1)
    if workers == 1 or len(pairs) < 32:
        return [read(pair) for pair in pairs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(read, pairs))  # re-raises the first failure in file order


def _load_nifti(path: Path) -> np.ndarray:
    import nibabel as nib

    try:
        return np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as error:  # nibabel raises many types for corrupt files
        raise DataError(f"cannot read NIfTI volume ({_one_line(error)})", path) from None


def _check_nifti_pair(image_path: Path, label_path: Path, volume: np.ndarray) -> None:
    """The label lies on the image's grid (same affine, from the headers) and the image holds only
    finite values; DataError otherwise (a flipped or shifted label would train silently)."""
    import nibabel as nib

    if not np.isfinite(volume).all():
        raise DataError("volume holds NaN or infinite values", image_path)
    try:
        image_affine, label_affine = nib.load(str(image_path)).affine, nib.load(str(label_path)).affine
    except Exception as error:  # noqa: BLE001 - nibabel raises many types for corrupt files
        raise DataError(f"cannot read NIfTI header ({_one_line(error)})", label_path) from None
    if not np.allclose(image_affine, label_affine, atol=1e-3):
        raise DataError("label volume's affine (orientation, spacing or origin) differs from its image's", label_path)


def _normalise_volume(volume: np.ndarray) -> np.ndarray:
    """Robust per-volume intensity normalisation to 0..1 (0.5 / 99.5 percentiles)."""
    volume = volume.astype(np.float32)
    low, high = np.percentile(volume, NIFTI_PERCENTILES)
    if high <= low:
        return np.zeros_like(volume)
    return np.clip((volume - low) / (high - low), 0.0, 1.0)


def _read_nifti_pairs(pairs: list[tuple[Path, Path]], channels: int) -> list[_Item]:
    items = []
    for image_path, label_path in pairs:
        volume = _load_nifti(image_path)
        label = _load_nifti(label_path)
        if volume.ndim == 3:
            if channels != 1:
                raise DataError(f"3-D volume has 1 channel, but channels={channels} is configured", image_path)
            volume = volume[..., None]
        elif volume.ndim != 4 or volume.shape[3] != channels:
            raise DataError(f"expected a 3-D volume (or 4-D with {channels} channels last), got shape {volume.shape}", image_path)
        if label.ndim != 3 or label.shape != volume.shape[:3]:
            raise DataError(f"label shape {label.shape} does not match image shape {volume.shape[:3]}", label_path)
        _check_nifti_pair(image_path, label_path, volume)
        rounded = np.rint(label)
        if not np.allclose(rounded, label, atol=1e-3):
            raise DataError("label volume holds non-integer values", label_path)
        label = rounded.astype(np.int64)
        volume = np.stack([_normalise_volume(volume[..., c]) for c in range(channels)])  # [C, X, Y, Z]
        subject = _stem(image_path)
        for k in range(volume.shape[3]):
            items.append(_Item(volume[..., k], label[..., k], f"{subject}_{k:04d}", subject, image_path, label_path))
    return items


# ----- the interface ----------------------------------------------------------------------------
class Layout:
    """How a site's files are laid out: which image goes with which mask, how a mask decodes to
    class ids, and how a class map encodes back to a mask image (``predict``). Subclass it, set
    ``name`` and implement :meth:`pair_files`; override what differs from the defaults.

    The default pipeline (:meth:`load`) reads ``<root>/<folder>/<split>/`` of every site folder,
    pairs the files, decodes them (images: Pillow, 1 or 3 channels, 8 or 16 bit), checks the
    class ids and resizes to ``img_size``."""

    name: ClassVar[str] = ""

    def pair_files(self, split_dir: Path, use_roi: bool = True) -> list[tuple[Path, Path]]:
        """(image, mask) paths of one split folder, sorted; DataError for unpaired files."""
        raise NotImplementedError

    def decode_label(self, mask: Image.Image, path: Path) -> np.ndarray:
        """A mask image → int64 [h, w] class ids; DataError naming ``path`` for a bad mask.
        Default: pixel value = class id (single channel, palette, or equal RGB channels)."""
        return _class_id_label(mask, path)

    def encode_mask(self, class_map: np.ndarray, num_classes: int) -> np.ndarray:
        """int class map [H, W] → uint8 mask image [H, W] as this layout stores masks.
        Default: the class ids."""
        if class_map.max(initial=0) > 255:
            raise UserError("more than 256 classes cannot be written as an 8-bit mask")
        return class_map.astype(np.uint8)

    def mask_encoding(self, num_classes: int) -> str:
        """One phrase describing :meth:`encode_mask` (export metadata)."""
        return "class ids"

    def class_names(self, num_classes: int) -> tuple[str, ...]:
        """Name of each class 0..num_classes-1 (column names of ``predictions.csv``)."""
        return tuple(f"class_{k}" for k in range(num_classes))

    def measures(self, class_map: np.ndarray, num_classes: int) -> dict[str, float]:
        """Extra per-image numbers ``predict`` writes beside the class areas. Default: none."""
        return {}

    def hu_window(self, kwargs: Any) -> tuple[float, float, float] | None:
        """CT layouts: (hu_min, window low, window high) for reading 16-bit slices in ``predict``."""
        return None

    def first_scored_class(self, kwargs: Any) -> int:
        """The lowest class id the metrics score (``kwargs``: ``dataset.kwargs``): 1, class 0 being
        the background. A layout that adds helper classes below the real foreground returns the
        first real one, so that Dice, R and ACC average only the real foreground classes."""
        return 1

    def read_pairs(self, pairs: list[tuple[Path, Path]], channels: int) -> list[_Item]:
        """Decode (image, mask) pairs, in order. Default: 2-D images with :meth:`decode_label`."""
        return _read_2d_pairs(pairs, channels, self.decode_label)

    def load(self, root: Path | str, folders: str | list[str], split: str, kwargs: Any, *, site_name: str | None = None) -> SiteData:
        """One split (``train`` / ``test``) of one site in memory; ``kwargs``: ``dataset.kwargs``."""
        return load_site(
            self,
            root,
            folders,
            split,
            img_size=tuple(kwargs.img_size),
            out_range=tuple(kwargs.out_range),
            num_classes=kwargs.num_classes,
            channels=kwargs.channels,
            use_roi=kwargs.use_roi,
            site_name=site_name,
        )


_LAYOUTS: dict[str, type[Layout]] = {}


def register_layout(cls: type[Layout]) -> type[Layout]:
    """Class decorator adding a built-in layout under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _LAYOUTS[cls.name] = cls
    return cls


def _builtin_layouts() -> dict[str, type[Layout]]:
    import relaylearn.data.dofe  # noqa: F401 - registers "fundus"

    return _LAYOUTS


def get_layout(name: str) -> Layout:
    """The layout ``dataset.name`` names: a built-in name, or your own ``package.module:Class``
    (only ever from a local config). ConfigError otherwise."""
    from relaylearn.plugins import import_object, is_plugin

    if is_plugin(name):
        cls = import_object(name, "dataset.name")
        if not (isinstance(cls, type) and issubclass(cls, Layout)):
            raise ConfigError(f"dataset.name: '{name}' is not a relaylearn Layout subclass")
        return cls()
    layouts = _builtin_layouts()
    if name not in layouts:
        raise ConfigError(f"dataset.name: unknown data layout '{name}' (known: {', '.join(sorted(layouts))}, or 'package.module:Class')")
    return layouts[name]()


@register_layout
class FolderLayout(Layout):
    """``<split>/image/*`` and ``<split>/mask/*`` paired by file stem, any Pillow-readable format;
    mask pixel = class id."""

    name = "folder"

    def pair_files(self, split_dir: Path, use_roi: bool = True) -> list[tuple[Path, Path]]:
        return _pair_files(split_dir / "image", split_dir / "mask", tuple(Image.registered_extensions()), key=_stem)


@register_layout
class NiftiLayout(Layout):
    """``<split>/image/*.nii.gz`` and ``<split>/label/*.nii.gz`` of the same name; every volume
    becomes 2-D slices along its last axis, intensities normalised per volume."""

    name = "nifti"

    def pair_files(self, split_dir: Path, use_roi: bool = True) -> list[tuple[Path, Path]]:
        return _pair_files(split_dir / "image", split_dir / "label", (".nii.gz", ".nii"), key=lambda p: p.name)

    def read_pairs(self, pairs: list[tuple[Path, Path]], channels: int) -> list[_Item]:
        return _read_nifti_pairs(pairs, channels)


class _CTLayout(Layout):
    """CT studies (:mod:`relaylearn.data.ct`): one folder per site, split study-wise inside it."""

    def load(self, root: Path | str, folders: str | list[str], split: str, kwargs: Any, *, site_name: str | None = None) -> SiteData:
        from relaylearn.data.ct import load_ct_site

        return load_ct_site(self.name, root, folders, split, kwargs, site_name=site_name)

    def hu_window(self, kwargs: Any) -> tuple[float, float, float] | None:
        return (kwargs.hu_min, *kwargs.hu_window)

    def first_scored_class(self, kwargs: Any) -> int:
        """The tumour's class after ``add_bone_label`` / ``add_bg_label``; 1 with ``score_helper_classes`` (as the original)."""
        from relaylearn.data.ct import first_foreground_class

        return 1 if kwargs.score_helper_classes else first_foreground_class(kwargs.add_bone_label, kwargs.add_bg_label)


@register_layout
class CTNiftiLayout(_CTLayout):
    name = "ct_nifti"


@register_layout
class CTSlicesLayout(_CTLayout):
    name = "ct_slices"


# ----- assembly ---------------------------------------------------------------------------------
def _check_classes(items: list[_Item], num_classes: int) -> None:
    for item in items:
        low, high = int(item.label.min()), int(item.label.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise DataError(f"mask holds class id {bad}, outside 0..{num_classes - 1} (num_classes={num_classes})", item.label_source)


def _resize_stack(items: list[_Item], img_size: tuple[int, int], out_range: tuple[float, float]) -> tuple[Tensor, Tensor]:
    """Stack items into images [N, C, H, W] in ``out_range`` and labels [N, H, W], one batched resize per source size."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        groups[item.label.shape].append(index)
    low, high = out_range
    image_parts, label_parts, order = [], [], []
    for shape, indices in groups.items():
        image = torch.stack([torch.from_numpy(items[i].image).float().div_(items[i].scale) for i in indices])
        image = image.mul_(high - low).add_(low)
        label = torch.from_numpy(np.stack([items[i].label for i in indices]))
        if shape != tuple(img_size):
            image = F.interpolate(image, size=img_size, mode="bilinear", align_corners=False, antialias=True)
            label = F.interpolate(label[:, None].float(), size=img_size, mode="nearest-exact")[:, 0].long()
        image = image.clamp_(min(low, high), max(low, high))  # resizing overshoots; every size is clamped alike
        image_parts.append(image)
        label_parts.append(label)
        order.extend(indices)
    images, labels = torch.cat(image_parts), torch.cat(label_parts)
    if len(groups) > 1:  # back to file order
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.as_tensor(order)] = torch.arange(len(order))
        images, labels = images[inverse], labels[inverse]
    return images.contiguous(), labels.contiguous()


def _split_folder(root: Path, folder: str, split: str) -> Path:
    site_dir = root / folder
    if not site_dir.is_dir():
        raise DataError("site folder not found", site_dir)
    split_dir = site_dir / split
    if not split_dir.is_dir():
        raise DataError(f"split folder '{split}' not found", split_dir)
    return split_dir


def load_site(
    layout: str | Layout,
    root: Path | str,
    folders: str | list[str],
    split: str,
    *,
    img_size: tuple[int, int],
    out_range: tuple[float, float] = (-1, 1),
    num_classes: int,
    channels: int = 3,
    use_roi: bool = True,
    site_name: str | None = None,
) -> SiteData:
    """Decode one split of one site (several ``folders`` merge into one site) of a 2-D ``layout``
    (a name or a :class:`Layout`) into memory.

    Returns images float32 [N, C, H, W] in ``out_range`` and labels int64 [N, H, W] with
    ``(H, W) = img_size``. Raises ``DataError`` (one line naming the path) for missing folders,
    no images, unpaired files, unreadable files, size mismatches and out-of-range class ids.
    """
    if isinstance(layout, str):
        if ":" not in layout and layout not in _builtin_layouts():
            raise DataError(f"unknown data layout '{layout}' (expected one of {', '.join(sorted(_builtin_layouts()))})")
        layout = get_layout(layout)
    root = Path(root)
    check_data_root(root)
    folder_list = [folders] if isinstance(folders, str) else list(folders)
    if not folder_list:
        raise DataError("no site folder given", root)
    img_size = (int(img_size[0]), int(img_size[1]))

    items: list[_Item] = []
    for folder in folder_list:
        split_dir = _split_folder(root, folder, split)
        folder_items = layout.read_pairs(layout.pair_files(split_dir, use_roi=use_roi), channels)
        for item in folder_items:
            item.folder = folder
        items.extend(folder_items)

    _check_classes(items, num_classes)
    _disambiguate_names(items)
    images, labels = _resize_stack(items, img_size, out_range)
    name = site_name or "+".join(folder_list)
    return SiteData(
        site=name, images=images, labels=labels, names=[i.name for i in items], subjects=[i.subject for i in items], sources=[i.source for i in items]
    )


def _disambiguate_names(items: list[_Item]) -> None:
    """Prefix ``<folder>/`` to the subject and every name of each subject (image, volume, study)
    that shares its subject or one of its names with another merged folder: all slices of one
    volume keep one subject, so the validation split never puts parts of it on both sides."""
    folders: dict[tuple[str, str], set[str]] = defaultdict(set)
    for item in items:
        folders["subject", item.subject].add(item.folder)
        folders["name", item.name].add(item.folder)
    clashing = {(i.folder, i.subject) for i in items if len(folders["subject", i.subject]) > 1 or len(folders["name", i.name]) > 1}
    for item in items:
        if (item.folder, item.subject) in clashing:
            item.subject = f"{item.folder}/{item.subject}"
            item.name = f"{item.folder}/{item.name}"
