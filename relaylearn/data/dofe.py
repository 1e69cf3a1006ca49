"""Everything specific to DoFE fundus data (optic disc and cup): the ``fundus`` layout, its mask
grey levels, class names and the vertical cup-to-disc ratio ``predict`` reports.

Layout: ``<root>/<folder>/<split>/ROIs/image/*.png`` with masks of the same file name in
``.../ROIs/mask/`` (without ``use_roi`` the ``ROIs/`` level is dropped). Mask grey level v
(channel mean of an RGB mask, or the single channel) → class ``round(2·(255 − v)/255)``:
255 → 0 background, 128 → 1 disc rim, 0 → 2 cup. Levels further than ±20 from 0/128/255 are an
error, and so is a mask without background or rim (every level near 0): masks of class ids 0/1/2
or binary 0/1 would otherwise read as all cup. A 16-bit mask is scaled back to 8 bits (/257)
unless its maximum is at most 255 (then it holds the 8-bit levels unscaled). The mask encoding,
class names and cup-to-disc ratio apply to 3-class models.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from relaylearn.data.layouts import Layout, _pair_files, register_layout
from relaylearn.errors import DataError

#: grey level of class 0 (background), 1 (disc rim), 2 (cup)
DOFE_LEVELS = (255, 128, 0)
FUNDUS_TOLERANCE = 20
FUNDUS_CLASS_NAMES = ("background", "disc_rim", "cup")


def _fundus_lookup(num_channels: int) -> np.ndarray:
    """Class id for every possible channel *sum* of an 8-bit mask pixel; -1 where the grey level is invalid."""
    grey = np.arange(255 * num_channels + 1, dtype=np.float64) / num_channels
    distance = np.min(np.abs(grey[:, None] - np.asarray(DOFE_LEVELS, np.float64)), axis=1)
    ids = np.floor(2.0 * (255.0 - grey) / 255.0 + 0.5).astype(np.int64)
    ids[distance > FUNDUS_TOLERANCE] = -1
    return ids


_FUNDUS_LOOKUP = {1: _fundus_lookup(1), 3: _fundus_lookup(3)}


def decode_fundus_mask(mask: Image.Image, path: Path) -> np.ndarray:
    """DoFE mask -> int64 [h, w] class ids ``round(2·(255 − v)/255)``, v = channel mean; checks v is near 0/128/255
    and that some pixel is background or rim (an all-cup mask is class ids read as grey levels)."""
    if mask.mode.startswith("I"):  # 16-bit grey: 0..65535 back to 0..255 (convert() would clip, not scale)
        wide = np.asarray(mask, dtype=np.float64)
        full_scale = wide.max(initial=0) > 255  # else the 8-bit levels stored unscaled
        array = np.round(wide / 257.0 if full_scale else wide).clip(0, 255).astype(np.uint8)
    else:
        array = np.asarray(mask if mask.mode in ("L", "RGB") else mask.convert("RGB"))
    channel_sum = array.sum(axis=2, dtype=np.int64) if array.ndim == 3 else array.astype(np.int64)
    lookup = _FUNDUS_LOOKUP[3 if array.ndim == 3 else 1]
    label = lookup[channel_sum]
    if label.min() < 0:
        value = channel_sum[label < 0][0] / (3 if array.ndim == 3 else 1)
        raise DataError(f"mask grey level {value:g} is not near 255 (background), 128 (disc rim) or 0 (cup) (tolerance ±{FUNDUS_TOLERANCE})", path)
    if label.min() == 2:  # no background and no rim: class ids 0/1/2 or a binary 0/1 mask, not DoFE grey levels
        top = channel_sum.max() / (3 if array.ndim == 3 else 1)
        raise DataError(
            f"mask holds no background or disc rim (every grey level ≤ {top:g}): it looks like class ids, but the fundus layout "
            "expects grey 255 (background), 128 (disc rim) and 0 (cup); use the 'folder' layout for class-id masks",
            path,
        )
    return label


def _height(rows_mask: np.ndarray) -> int:
    rows = np.flatnonzero(rows_mask.any(axis=1))
    return int(rows[-1] - rows[0] + 1) if rows.size else 0


def vertical_cup_to_disc(class_map: np.ndarray, rim: int = 1, cup: int = 2) -> float:
    """Cup height / disc height (disc = rim ∪ cup), in rows; NaN without a disc."""
    disc_height = _height((class_map == rim) | (class_map == cup))
    if disc_height == 0:
        return math.nan
    return _height(class_map == cup) / disc_height


@register_layout
class FundusLayout(Layout):
    """DoFE fundus: ``ROIs/image/*.png`` and ``ROIs/mask/*.png`` of the same name, grey-level masks."""

    name = "fundus"

    def pair_files(self, split_dir: Path, use_roi: bool = True) -> list[tuple[Path, Path]]:
        base = split_dir / "ROIs" if use_roi else split_dir
        return _pair_files(base / "image", base / "mask", (".png",), key=lambda p: p.name)

    def decode_label(self, mask: Image.Image, path: Path) -> np.ndarray:
        return decode_fundus_mask(mask, path)

    def encode_mask(self, class_map: np.ndarray, num_classes: int) -> np.ndarray:
        if num_classes != 3:
            return super().encode_mask(class_map, num_classes)
        return np.asarray(DOFE_LEVELS, dtype=np.uint8)[class_map]

    def mask_encoding(self, num_classes: int) -> str:
        return "DoFE grey levels 255/128/0" if num_classes == 3 else super().mask_encoding(num_classes)

    def class_names(self, num_classes: int) -> tuple[str, ...]:
        return FUNDUS_CLASS_NAMES if num_classes == 3 else super().class_names(num_classes)

    def measures(self, class_map: np.ndarray, num_classes: int) -> dict[str, float]:
        return {"vertical_cup_to_disc": vertical_cup_to_disc(class_map)} if num_classes == 3 else {}
