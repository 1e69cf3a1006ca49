"""A custom data layout in one file: every site folder holds ``<split>/scans/<name>.png`` and a
lesion mask ``<split>/lesions/<name>_mask.png`` (black = background, white = lesion). Use it with
``dataset: {name: examples.binary_layout:BinaryLesionLayout, kwargs: {num_classes: 2, ...}}``."""

from pathlib import Path

import numpy as np
from PIL import Image

from relaylearn.data.layouts import Layout
from relaylearn.errors import DataError


class BinaryLesionLayout(Layout):
    name = "binary_lesion"

    def pair_files(self, split_dir: Path, use_roi: bool = True) -> list[tuple[Path, Path]]:
        """(scan, mask) pairs: ``scans/<name>.png`` with ``lesions/<name>_mask.png``."""
        scans = sorted((split_dir / "scans").glob("*.png"))
        if not scans:
            raise DataError("no scans found", split_dir / "scans")
        pairs = [(scan, split_dir / "lesions" / f"{scan.stem}_mask.png") for scan in scans]
        for scan, mask in pairs:
            if not mask.is_file():
                raise DataError("scan has no lesion mask", scan)
        return pairs

    def decode_label(self, mask: Image.Image, path: Path) -> np.ndarray:
        """Grey mask → int64 [h, w]: 1 where brighter than 127 (lesion), else 0."""
        return (np.asarray(mask.convert("L")) > 127).astype(np.int64)

    def encode_mask(self, class_map: np.ndarray, num_classes: int) -> np.ndarray:
        """Class map [H, W] → uint8 mask as stored: lesion 255, background 0."""
        return (class_map > 0).astype(np.uint8) * 255

    def class_names(self, num_classes: int) -> tuple[str, ...]:
        return ("background", "lesion")
