"""Pictures of images and class maps for people: overlays, colour masks, PNG bytes (used by
predict, the report, the replay fidelity grids and the privacy audit)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

#: RGB colour of each foreground class in overlays (index = class id; 0 = background, unused)
PALETTE = (
    (0, 0, 0), (46, 204, 64), (0, 116, 217), (255, 65, 54), (255, 220, 0),
    (177, 13, 201), (57, 204, 204), (255, 133, 27), (240, 18, 190), (1, 255, 112),
)  # fmt: skip


def class_colour(k: int) -> tuple[int, int, int]:
    """Overlay colour of foreground class ``k`` ≥ 1 (the palette repeats after 9 classes)."""
    return PALETTE[1 + (k - 1) % (len(PALETTE) - 1)]


def _contour(mask: np.ndarray, thickness: int) -> np.ndarray:
    from scipy.ndimage import binary_dilation, binary_erosion

    edge = mask & ~binary_erosion(mask, border_value=0)
    return binary_dilation(edge, iterations=thickness - 1) & mask if thickness > 1 else edge


def overlay(image: np.ndarray, class_map: np.ndarray, alpha: float = 0.35) -> np.ndarray:
    """RGB uint8 [H, W, 3]: ``image`` (uint8 [H, W, C]) with translucent class colours and
    opaque contours (thickness grows with the image size). Class 0 is left uncoloured."""
    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[:, :, :3]
    out = rgb.astype(np.float32)
    thickness = max(1, round(min(class_map.shape) / 200))
    for k in np.unique(class_map):
        if k == 0:
            continue
        colour = np.asarray(class_colour(int(k)), dtype=np.float32)
        mask = class_map == k
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
        out[_contour(mask, thickness)] = colour
    return out.round().clip(0, 255).astype(np.uint8)


def colour_mask(class_map: np.ndarray) -> np.ndarray:
    """Class map [H, W] → RGB uint8 on a dark background (classes in the overlay palette)."""
    canvas = np.full((*class_map.shape, 1), 24, dtype=np.uint8)
    return overlay(canvas, class_map, alpha=1.0)


def to_uint8(images: torch.Tensor, out_range) -> np.ndarray:
    """Images [n, C, H, W] in ``out_range`` → uint8 [n, H, W, C]."""
    low, high = out_range
    x = ((images.float() - low) / (high - low)).clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def rgb_or_grey(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 1] → [H, W]; [H, W, 3] unchanged (what ``png_bytes`` takes)."""
    return image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image


def png_bytes(array: np.ndarray) -> bytes:
    """PNG encoding of a uint8 [H, W] or [H, W, 3] array."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
