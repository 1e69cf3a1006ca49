"""CT studies as 2-D slices: NIfTI volumes or slice folders, split study-wise inside each site.

Layouts (one folder per site, no ``train``/``test`` sub-folders: the split is made here):

* ``"ct_nifti"``: ``<root>/<site>/image/<study>.nii.gz`` and ``<root>/<site>/label/<study>.nii.gz``
  (same name, same shape). Voxels are Hounsfield units (nibabel applies the header's scaling);
  every volume becomes slices along its last axis (``volume[:, :, k]``).
* ``"ct_slices"``: ``<root>/<site>/<study>/<name>.png`` with the mask ``mask_<name>.png`` beside
  it (class ids, paired by stem and decoded as the ``folder`` layout does: an alpha channel is
  ignored, a float mask must hold whole numbers, two files of one stem are an error), one
  sub-folder per study. A 16-bit PNG holds ``HU − hu_min`` (pixel 0 = ``hu_min`` HU); an 8-bit
  image is grey 0..255, scaled to ``out_range`` without a HU window; one bit depth per site.
  Instead of study folders a site may hold a ``meta.txt`` CSV with the columns ``study_id``,
  ``img_file`` and ``label_file`` (paths relative to the site folder).

Split: the site's studies, sorted by name, are shuffled with ``numpy.random.default_rng(split_seed)``
and the first ``train_ratio · #studies`` (rounded half up) train; the rest test. No study is on both sides.
Intensity: HU clipped to ``hu_window`` and mapped linearly to ``out_range`` (MONAI's
``ScaleIntensityRange``); slices are resized to ``img_size`` (bilinear with antialiasing; labels
nearest). Volumes are read with nibabel directly, as the generic NIfTI layout does: MONAI's
``LoadImage`` would only wrap the same array in metadata that is not used here.
Options: ``add_bone_label`` (HU > 150 → class 0, other classes + 1), then ``add_bg_label``
(HU < −500 → class 0, other classes + 1); ``drop_negative`` (keep slices with foreground);
``neg_pos_ratio`` (training only, see :class:`NegPosBatchSampler`). One channel.
"""

from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from relaylearn.data.layouts import (
    SiteData,
    _by_name,
    _check_classes,
    _check_nifti_pair,
    _class_id_label,
    _disambiguate_names,
    _Item,
    _load_nifti,
    _open_pil,
    _pil_pixels,
    _resize_stack,
    _stem,
    _visible_files,
)
from relaylearn.data.sampling import SiteBatchSampler
from relaylearn.errors import DataError
from relaylearn.files import check_data_root

CT_LAYOUTS = ("ct_nifti", "ct_slices")
BONE_HU = 150.0
AIR_HU = -500.0
META_FILE = "meta.txt"
MASK_PREFIX = "mask_"


# ----- study-wise split ---------------------------------------------------------------------------
def split_studies(studies: list[str], train_ratio: float, seed: int, where: Path | str) -> tuple[list[str], list[str]]:
    """(train studies, test studies): sorted names shuffled with ``default_rng(seed)``, the first
    ``train_ratio · n`` (rounded half up) for training. Raises DataError if either side would be empty."""
    order = sorted(studies)
    permuted = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    n_train = int(math.floor(train_ratio * len(order) + 0.5))
    train, test = permuted[:n_train], permuted[n_train:]
    if not test:
        raise DataError(f"train_ratio={train_ratio} leaves no test study ({len(order)} studies in the site)", where)
    if not train:
        raise DataError(f"train_ratio={train_ratio} leaves no training study ({len(order)} studies in the site)", where)
    return train, test


# ----- intensity ----------------------------------------------------------------------------------
def window_hu(hu: np.ndarray, hu_window: tuple[float, float]) -> np.ndarray:
    """HU → 0..1 over ``hu_window`` (clipped), float32, any shape."""
    from monai.transforms import ScaleIntensityRange

    low, high = float(hu_window[0]), float(hu_window[1])
    scale = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    return np.asarray(scale(hu.astype(np.float32)), dtype=np.float32)


def extra_labels(label: np.ndarray, hu: np.ndarray, bone: bool, air: bool) -> np.ndarray:
    """Optional HU-threshold classes: bone (> 150 HU) then air (< −500 HU) become class 0, other classes shift up."""
    if bone:
        label = np.where(hu > BONE_HU, 0, label + 1)
    if air:
        label = np.where(hu < AIR_HU, 0, label + 1)
    return label


def first_foreground_class(bone: bool, air: bool) -> int:
    """Class id of the first 'real' foreground class (the tumour) after the optional extra classes."""
    return 1 + int(bone) + int(air)


# ----- readers ------------------------------------------------------------------------------------
def _nifti_studies(site_dir: Path) -> dict[str, tuple[Path, Path]]:
    image_dir, label_dir = site_dir / "image", site_dir / "label"
    images = _by_name(_visible_files(image_dir, (".nii.gz", ".nii")), _stem)
    labels = _by_name(_visible_files(label_dir, (".nii.gz", ".nii")), _stem)
    if not images:
        raise DataError("no NIfTI volumes found", image_dir)
    studies = {}
    for study, image in images.items():
        if study not in labels:
            raise DataError(f"volume has no label volume in {label_dir}", image)
        studies[study] = (image, labels[study])
    orphan = next((p for s, p in labels.items() if s not in studies), None)
    if orphan is not None:
        raise DataError(f"label volume has no image in {image_dir}", orphan)
    return studies


def _read_nifti_study(study: str, image_path: Path, label_path: Path) -> list[tuple[_Item, np.ndarray]]:
    """(item, HU slice) per slice of one study; items hold the windowed image in 0..1."""
    hu = _load_nifti(image_path)
    label = _load_nifti(label_path)
    if hu.ndim != 3:
        raise DataError(f"expected a 3-D CT volume, got shape {hu.shape}", image_path)
    if label.shape != hu.shape:
        raise DataError(f"label shape {label.shape} does not match volume shape {hu.shape}", label_path)
    _check_nifti_pair(image_path, label_path, hu)
    rounded = np.rint(label)
    if not np.allclose(rounded, label, atol=1e-3):
        raise DataError("label volume holds non-integer values", label_path)
    hu = np.asarray(hu, dtype=np.float32)
    label = rounded.astype(np.int64)
    out = []
    for z in range(hu.shape[2]):
        item = _Item(hu[None, :, :, z], label[:, :, z], f"{study}_{z:04d}", study, image_path, label_path)
        out.append((item, hu[:, :, z]))
    return out


def _slice_pairs_from_folders(site_dir: Path) -> dict[str, list[tuple[Path, Path]]]:
    """study → [(slice, mask)] from one sub-folder per study."""
    studies: dict[str, list[tuple[Path, Path]]] = {}
    folders = sorted(p for p in site_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError("no study folders found (expected one sub-folder per study, or a meta.txt)", site_dir)
    for folder in folders:
        files = _visible_files(folder, (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"))
        # by stem, as the folder layout pairs: 0.png beside 0.tif (or two masks of one slice) is an error
        masks = _by_name([p for p in files if p.name.startswith(MASK_PREFIX)], lambda p: _stem(p)[len(MASK_PREFIX) :])
        slices = _by_name([p for p in files if not p.name.startswith(MASK_PREFIX)], _stem)
        if not slices:
            if masks:
                raise DataError(f"study folder has {len(masks)} mask(s) but no images", folder)
            continue
        if not masks:
            raise DataError(f"study folder has {len(slices)} image(s) but no masks (expected {MASK_PREFIX}<name>.png)", folder)
        pairs = []
        for name, image in slices.items():
            if name not in masks:
                raise DataError(f"slice has no mask {MASK_PREFIX}{name}.png", image)
            pairs.append((image, masks[name]))
        orphans = sorted(set(masks) - set(slices))
        if orphans:
            raise DataError("mask has no image", masks[orphans[0]])
        studies[folder.name] = pairs
    if not studies:
        raise DataError("no slices found in the study folders", site_dir)
    return studies


def _slice_pairs_from_meta(meta: Path) -> dict[str, list[tuple[Path, Path]]]:
    """study → [(slice, mask)] from a meta.txt CSV (study_id, img_file, label_file)."""
    studies: dict[str, list[tuple[Path, Path]]] = defaultdict(list)
    site = meta.parent.resolve()
    seen: set[Path] = set()
    try:
        with meta.open(newline="", encoding="utf-8-sig") as fh:  # -sig: a spreadsheet's byte-order mark is not part of a column name
            reader = csv.DictReader(fh)
            missing = {"study_id", "img_file", "label_file"} - set(reader.fieldnames or [])
            if missing:
                raise DataError(f"meta.txt lacks the column(s) {', '.join(sorted(missing))}", meta)
            for row in reader:
                if any(not row.get(column) for column in ("study_id", "img_file", "label_file")):
                    raise DataError(f"meta.txt line {reader.line_num}: study_id, img_file and label_file must all be given", meta)
                pair = (meta.parent / row["img_file"], meta.parent / row["label_file"])
                for path in pair:
                    if not path.resolve().is_relative_to(site):
                        raise DataError(f"meta.txt line {reader.line_num}: {row['img_file']!r} / {row['label_file']!r} lie outside the site folder", meta)
                    if path.resolve() in seen:  # one slice in two studies would put it on both sides of the split
                        raise DataError(f"meta.txt line {reader.line_num}: file listed twice", path)
                    seen.add(path.resolve())
                studies[str(row["study_id"])].append(pair)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read meta.txt ({type(exc).__name__}: {exc})", meta) from None
    if not studies:
        raise DataError("meta.txt lists no slices", meta)
    for pairs in studies.values():
        for image, mask in pairs:
            for path in (image, mask):
                if not path.is_file():
                    raise DataError("file listed in meta.txt not found", path)
    return dict(studies)


def _read_slice(study: str, image_path: Path, mask_path: Path, k) -> tuple[_Item, np.ndarray | None]:
    """(item with image in 0..1, HU slice or None for 8-bit images)."""
    pixels, full_scale = _pil_pixels(_open_pil(image_path), 1, image_path)
    mask = _class_id_label(_open_pil(mask_path), mask_path)  # the folder layout's decoder
    if mask.shape != pixels.shape[1:]:
        raise DataError(f"image is {pixels.shape[2]}×{pixels.shape[1]} but its mask is {mask.shape[1]}×{mask.shape[0]} pixels", mask_path)
    name = f"{study}_{_stem(image_path)}"
    if full_scale == 65535.0:  # 16-bit: HU − hu_min
        hu = pixels[0].astype(np.float32) + float(k.hu_min)
        return _Item(hu[None], mask, name, study, image_path, mask_path), hu
    if k.add_bone_label or k.add_bg_label:
        raise DataError("add_bone_label / add_bg_label need Hounsfield units, but this slice is an 8-bit image", image_path)
    return _Item(pixels.astype(np.float32) / 255.0, mask, name, study, image_path, mask_path), None


def _natural_key(name: str) -> tuple:
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name))


# ----- assembly -----------------------------------------------------------------------------------
def load_ct_site(layout: str, root: Path | str, folders: str | list[str], split: str, k: Any, *, site_name: str | None = None) -> SiteData:
    """One split (``train`` or ``test``) of one CT site: images float32 [N, 1, H, W] in
    ``k.out_range``, labels int64 [N, H, W]; ``subjects`` = study of each slice, slices of a study
    in order. ``k`` is the dataset's kwargs (train_ratio, hu_window, ...). Raises DataError."""
    if layout not in CT_LAYOUTS:
        raise DataError(f"unknown CT layout '{layout}' (expected one of {', '.join(CT_LAYOUTS)})")
    if split not in ("train", "test"):
        raise DataError(f"CT layouts split each site into train and test, not '{split}'")
    if k.channels != 1:
        raise DataError(f"CT layouts have 1 channel, but dataset.kwargs.channels={k.channels}")
    root = Path(root)
    check_data_root(root)
    folder_list = [folders] if isinstance(folders, str) else list(folders)
    pairs: list[tuple[_Item, np.ndarray | None]] = []
    for folder in folder_list:
        site_dir = root / folder
        if not site_dir.is_dir():
            raise DataError("site folder not found", site_dir)
        if layout == "ct_nifti":
            volumes = _nifti_studies(site_dir)
            chosen = split_studies(list(volumes), k.train_ratio, k.split_seed, site_dir)[0 if split == "train" else 1]
            folder_pairs = [pair for study in sorted(chosen) for pair in _read_nifti_study(study, *volumes[study])]
        else:
            meta = site_dir / META_FILE
            studies = _slice_pairs_from_meta(meta) if meta.is_file() else _slice_pairs_from_folders(site_dir)
            chosen = split_studies(list(studies), k.train_ratio, k.split_seed, site_dir)[0 if split == "train" else 1]
            folder_pairs = [
                _read_slice(study, image, mask, k) for study in sorted(chosen) for image, mask in sorted(studies[study], key=lambda p: _natural_key(p[0].name))
            ]
        for item, _ in folder_pairs:
            item.folder = folder
        pairs.extend(folder_pairs)
    items = _finish_items(pairs, k)  # over all folders: one bit depth per site, not per folder
    if not items:
        raise DataError(f"no slice left in the {split} split (drop_negative removed every slice?)", root / folder_list[0])
    _check_classes(items, k.num_classes)
    _disambiguate_names(items)
    images, labels = _resize_stack(items, tuple(k.img_size), tuple(k.out_range))
    return SiteData(
        site=site_name or "+".join(folder_list),
        images=images,
        labels=labels,
        names=[i.name for i in items],
        subjects=[i.subject for i in items],
        sources=[i.source for i in items],
    )


def _finish_items(pairs: list[tuple[_Item, np.ndarray | None]], k) -> list[_Item]:
    """Check raw class ids, add HU-threshold classes, window HU, drop negatives."""
    _check_classes([item for item, _ in pairs], k.num_classes - int(k.add_bone_label) - int(k.add_bg_label))
    kinds = {hu is None for _, hu in pairs}
    if len(kinds) > 1:  # 8-bit grey and 16-bit HU would land on two different intensity scales
        odd = next(item for item, hu in pairs if (hu is None) != (pairs[0][1] is None))
        first = "16-bit (HU)" if pairs[0][1] is not None else "8-bit (grey)"
        raise DataError(
            f"this slice's bit depth differs from {pairs[0][0].source}, which is {first}: a site's slices must all be 16-bit or all 8-bit", odd.source
        )
    out = []
    for item, hu in pairs:
        if k.drop_negative and not (item.label > 0).any():
            continue
        if hu is not None:
            item.label = extra_labels(item.label, hu, k.add_bone_label, k.add_bg_label)
            item.image = window_hu(item.image, tuple(k.hu_window))
        out.append(item)
    return out


# ----- negative:positive resampling ---------------------------------------------------------------
class NegPosBatchSampler(SiteBatchSampler):
    """Each epoch: every positive slice plus ``ratio`` × #positives negative slices (drawn without
    replacement when there are enough, otherwise with replacement), re-drawn and reshuffled for
    every epoch and each of the ``num_replica`` copies. Deterministic given (seed, epoch).

    ``positive``: bool [N], True where the slice holds the foreground class.
    """

    def __init__(self, positive: Tensor, ratio: int, batch_size: int, num_replica: int = 1, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.positives = torch.nonzero(positive, as_tuple=False).flatten()
        self.negatives = torch.nonzero(~positive, as_tuple=False).flatten()
        self.ratio = int(ratio)
        self.num_negatives = self.ratio * len(self.positives) if len(self.negatives) else 0
        super().__init__(len(self.positives) + self.num_negatives, batch_size, num_replica, seed, rank, world_size)

    def _copies(self, g: torch.Generator) -> Iterator[Tensor]:
        """The epoch's ``num_replica`` copies, one at a time: all positives plus freshly drawn
        negatives, shuffled (dataset indices). Batching, resume and DDP are the base class's."""
        n, m = self.num_negatives, len(self.negatives)
        for _ in range(self.num_replica):
            if n == 0:
                drawn = self.negatives[:0]
            elif n <= m:
                drawn = self.negatives[torch.randperm(m, generator=g)[:n]]
            else:
                drawn = self.negatives[torch.randint(m, (n,), generator=g)]
            chosen = torch.cat([self.positives, drawn])
            yield chosen[torch.randperm(len(chosen), generator=g)]


def positive_slices(labels: Tensor, k) -> Tensor:
    """bool [N]: the slice holds a foreground (tumour) class, after any extra HU classes."""
    first = first_foreground_class(k.add_bone_label, k.add_bg_label)
    return (labels >= first).flatten(1).any(1)


def require_positive_slices(positive: Tensor, k, where: str = "") -> None:
    """DataError unless some training slice holds foreground (``positive``: :func:`positive_slices`):
    ``neg_pos_ratio`` draws its negatives per positive slice."""
    if not bool(positive.any()):
        raise DataError(f"neg_pos_ratio={k.neg_pos_ratio} needs slices with foreground, but the training split has none", where or None)


def neg_pos_loader(images: Tensor, labels: Tensor, k, batch_size: int, seed: int, world_size: int = 1, where: str = ""):
    """A training loader like :func:`relaylearn.data.sampling.site_loader` whose epochs follow ``k.neg_pos_ratio``."""
    from relaylearn.data.sampling import batch_loader

    positive = positive_slices(labels, k)
    require_positive_slices(positive, k, where)
    return batch_loader(images, labels, NegPosBatchSampler(positive, k.neg_pos_ratio, batch_size, k.num_replica, seed, world_size=world_size), seed)
