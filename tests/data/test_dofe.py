"""DoFE fundus specifics: mask grey levels both ways, class names, the vertical cup-to-disc ratio."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from relaylearn.data.dofe import DOFE_LEVELS, vertical_cup_to_disc
from relaylearn.data.layouts import get_layout
from relaylearn.errors import DataError


def test_vertical_cup_to_disc_is_cup_height_over_disc_height():
    m = np.zeros((20, 20), dtype=np.int64)
    m[2:12, 5:15] = 1  # disc rows 2..11 (10 rows), wide
    m[5:9, 8:10] = 2  # cup rows 5..8 (4 rows)
    assert vertical_cup_to_disc(m) == pytest.approx(0.4)
    m[m == 2] = 1
    assert vertical_cup_to_disc(m) == 0.0
    assert math.isnan(vertical_cup_to_disc(np.zeros((5, 5), dtype=np.int64)))
    assert vertical_cup_to_disc(np.full((5, 5), 2)) == 1.0  # all cup: disc = rim ∪ cup


def test_fundus_masks_encode_and_decode_as_dofe_grey_levels(tmp_path):
    fundus = get_layout("fundus")
    m = np.array([[0, 1, 2], [2, 2, 0]])
    encoded = fundus.encode_mask(m, 3)
    assert encoded.tolist() == [[255, 128, 0], [0, 0, 255]] and tuple(DOFE_LEVELS) == (255, 128, 0)
    assert fundus.decode_label(Image.fromarray(encoded), tmp_path / "m.png").tolist() == m.tolist(), "round trip"
    assert fundus.encode_mask(m, 4).tolist() == m.tolist(), "class ids unless a 3-class model"
    assert fundus.class_names(3) == ("background", "disc_rim", "cup") and fundus.class_names(2) == ("class_0", "class_1")
    assert set(fundus.measures(m, 3)) == {"vertical_cup_to_disc"} and fundus.measures(m, 2) == {}
    with pytest.raises(DataError, match="grey level 60"):
        fundus.decode_label(Image.fromarray(np.full((2, 2), 60, np.uint8)), tmp_path / "bad.png")


def test_a_16_bit_grey_mask_decodes_like_its_8_bit_original(tmp_path):
    from PIL import Image

    from relaylearn.data.dofe import decode_fundus_mask

    grey = np.array([[255, 128, 0, 255]], dtype=np.uint8)
    wide = Image.fromarray(grey.astype(np.uint16) * 257)  # 16-bit PNG mode
    assert wide.mode.startswith("I")
    assert decode_fundus_mask(wide, tmp_path / "m.png").tolist() == decode_fundus_mask(Image.fromarray(grey), tmp_path / "m.png").tolist() == [[0, 1, 2, 0]]


@pytest.mark.parametrize(
    ("mask", "says"),
    [
        (np.array([[0, 1], [2, 0]], np.uint8), "≤ 2"),  # class ids
        (np.array([[0, 1], [1, 0]], np.uint8), "≤ 1"),  # binary
        (np.zeros((2, 2), np.uint8), "≤ 0"),  # all black
    ],
    ids=["class_ids", "binary", "black"],
)
def test_a_mask_of_class_ids_is_refused_not_read_as_all_cup(tmp_path, mask, says):
    with pytest.raises(
        DataError, match=rf"m\.png: mask holds no background or disc rim \(every grey level {says}\): it looks like class ids.*'folder' layout"
    ) as error:
        get_layout("fundus").decode_label(Image.fromarray(mask), tmp_path / "m.png")
    assert "\n" not in str(error.value)


def test_a_16_bit_mask_holding_unscaled_8_bit_levels_decodes_as_those_levels(tmp_path):
    """A uint16 mask [1, 4] of 255/128/0 (not ×257) is read as 8-bit grey levels, not as all cup."""
    unscaled = Image.fromarray(np.array([[255, 128, 0, 255]], dtype=np.uint16))
    assert unscaled.mode.startswith("I")
    assert get_layout("fundus").decode_label(unscaled, tmp_path / "m.png").tolist() == [[0, 1, 2, 0]]
