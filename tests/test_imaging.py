"""Pictures for people: overlays, colour masks, uint8 conversion, PNG bytes."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from relaylearn.imaging import class_colour, colour_mask, overlay, png_bytes, rgb_or_grey, to_uint8


def test_overlay_keeps_background_draws_contours_and_translucent_fill():
    image = np.full((40, 40, 1), 100, dtype=np.uint8)  # grey input becomes RGB
    cmap = np.zeros((40, 40), dtype=np.int64)
    cmap[10:30, 10:30] = 2
    out = overlay(image, cmap)
    assert out.shape == (40, 40, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [100, 100, 100], "background untouched"
    assert out[10, 20].tolist() == list(class_colour(2)), "contour in the class colour"
    inside = out[20, 20].astype(int)
    assert inside.tolist() != [100, 100, 100] and inside.tolist() != list(class_colour(2)), "translucent fill"
    assert colour_mask(cmap)[20, 20].tolist() == list(class_colour(2)) and class_colour(10) == class_colour(1)


def test_uint8_conversion_and_png_round_trip():
    pixels = to_uint8(torch.tensor([[[[-1.0, 0.0, 1.0]]]]), (-1, 1))
    assert pixels.shape == (1, 1, 3, 1) and pixels[0, 0, :, 0].tolist() == [0, 128, 255]
    grey = rgb_or_grey(pixels[0])
    assert grey.shape == (1, 3)
    assert np.asarray(Image.open(io.BytesIO(png_bytes(grey)))).tolist() == grey.tolist()
