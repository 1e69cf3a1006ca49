"""SegmentationAugment: shapes, label validity, image/label geometric consistency, determinism, config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from relaylearn.data import SegmentationAugment
from relaylearn.data.augment import Block, from_config
from relaylearn.errors import ConfigError

GEOMETRY_ONLY = {"colour": 0.0, "degrade": 0.0, "geometry": 1.0}


def _blobs(batch: int, size: int, num_classes: int = 3, seed: int = 0) -> torch.Tensor:
    """Label maps made of large blocks (so bilinear image warps agree with nearest label warps)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, num_classes, (batch, 1, 4, 4), generator=generator).float()
    return F.interpolate(coarse, size=(size, size), mode="nearest")[:, 0].long()


def _label_image(labels: torch.Tensor, low: float, high: float, channels: int = 3) -> torch.Tensor:
    """Images whose every channel encodes the label: class k -> low + k/2·(high − low); class 0 = low = fill."""
    value = low + labels.float() / 2 * (high - low)
    return value[:, None].repeat(1, channels, 1, 1)


def _decode(images: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return ((images[:, 0] - low) / (high - low) * 2).round().long()


@pytest.mark.parametrize("strength", ["original", "light"])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_ranges_and_label_validity(strength, channels):
    torch.manual_seed(0)
    images = torch.rand(16, channels, 32, 32) * 2 - 1
    labels = _blobs(16, 32)
    out_images, out_labels = SegmentationAugment(strength)(images, labels)
    assert out_images.shape == images.shape and out_images.dtype == images.dtype
    assert out_labels.shape == labels.shape and out_labels.dtype == torch.int64
    assert out_images.min() >= -1 and out_images.max() <= 1
    assert set(out_labels.unique().tolist()) <= {0, 1, 2}
    assert not torch.equal(out_images, images)  # something happened to some sample


def test_other_out_range_and_dtype():
    torch.manual_seed(1)
    images = torch.rand(8, 3, 16, 16, dtype=torch.float64) * 255
    labels = _blobs(8, 16)
    out_images, _ = SegmentationAugment("original", out_range=(0, 255))(images, labels)
    assert out_images.dtype == torch.float64
    assert out_images.min() >= 0 and out_images.max() <= 255 and out_images.max() > 1


@pytest.mark.parametrize("out_range", [(-1.0, 1.0), (0.0, 1.0)])
def test_geometry_moves_image_and_label_together(out_range):
    low, high = out_range
    torch.manual_seed(2)
    labels = _blobs(32, 32, seed=1)
    images = _label_image(labels, low, high)
    out_images, out_labels = SegmentationAugment("original", out_range, block_p=GEOMETRY_ONLY)(images, labels)
    moved = (out_labels != labels).flatten(1).any(1)
    assert moved.float().mean() > 0.5  # most samples were transformed
    agreement = (_decode(out_images, low, high) == out_labels).float().mean()
    assert agreement > 0.97, agreement  # disagreements only along blurred class boundaries
    # Out-of-frame pixels: background label and the image fill value (out_range minimum).
    assert (out_labels == 0).float().mean() > (labels == 0).float().mean()


@pytest.mark.parametrize("image_fill", ["border", "reflection"])
def test_border_and_reflection_fill_pad_the_label_like_the_image(image_fill):
    """A lesion [B, 10, 10] in the corner of 32×32 images: its padded / mirrored copies keep class 1."""
    labels = torch.zeros(32, 32, 32, dtype=torch.long)
    labels[:, :10, :10] = 1
    images = _label_image(labels, -1.0, 1.0, channels=1)
    torch.manual_seed(0)
    out_images, out_labels = SegmentationAugment("light", block_p={"colour": 0.0, "geometry": 1.0}, image_fill=image_fill)(images, labels)
    lesion = out_images[:, 0] > -0.5
    assert (lesion & (out_labels == 0)).float().sum() < 0.01 * lesion.sum()  # was 9 %: the label was padded with 0


def test_flips_are_exact():
    torch.manual_seed(3)
    labels = _blobs(16, 24, seed=2)
    images = _label_image(labels, -1, 1)
    params = {"rotate_deg": 0.0, "scale": (1.0, 1.0), "translate": 0.0, "shear_deg": 0.0, "flip_p": 1.0}
    out_images, out_labels = SegmentationAugment(block_p=GEOMETRY_ONLY, params=params)(images, labels)
    for i in range(16):
        candidates = [labels[i], labels[i].flip(-1), labels[i].flip(-2), labels[i].flip(-1).flip(-2)]
        assert any(torch.equal(out_labels[i], c) for c in candidates)
    assert torch.allclose(_label_image(out_labels, -1, 1), out_images, atol=1e-4)


def test_deterministic_under_seed():
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    labels = _blobs(8, 16)
    augment = SegmentationAugment("original")
    torch.manual_seed(7)
    first = augment(images, labels)
    torch.manual_seed(7)
    second = augment(images, labels)
    torch.manual_seed(8)
    third = augment(images, labels)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], third[0])


def test_subset_and_whole_batch_paths_agree():
    """The CPU path (compute only selected samples) equals the accelerator path (compute all, blend)."""
    images = torch.rand(12, 3, 16, 16) * 2 - 1
    labels = _blobs(12, 16)
    torch.manual_seed(4)
    subset = SegmentationAugment("original", compute_all=False)(images, labels)
    torch.manual_seed(4)
    whole = SegmentationAugment("original", compute_all=True)(images, labels)
    assert torch.allclose(subset[0], whole[0], atol=1e-5)
    assert torch.equal(subset[1], whole[1])


def test_none_is_identity():
    images, labels = torch.rand(4, 3, 8, 8), _blobs(4, 8)
    out_images, out_labels = SegmentationAugment("none")(images, labels)
    assert out_images is images and out_labels is labels
    assert from_config(None)(images, labels)[0] is images


def test_block_selection_statistics():
    block = Block(0.3, 1, 3, ("a", "b", "c", "d", "e"))
    torch.manual_seed(5)
    chosen = SegmentationAugment._select(block, 20000, 3, torch.device("cpu"))
    counts = torch.stack(list(chosen.values()), 1).sum(1)
    active = counts > 0
    assert abs(active.float().mean().item() - 0.3) < 0.02
    assert counts[active].min() == 1 and counts[active].max() == 3
    assert abs(counts[active].float().mean().item() - 2.0) < 0.05
    # RGB-only ops are never chosen for grey images.
    grey = SegmentationAugment._select(Block(1.0, 2, 2, ("hue_saturation", "jpeg", "noise")), 500, 1, torch.device("cpu"))
    assert not grey["hue_saturation"].any() and not grey["jpeg"].any() and grey["noise"].all()


def test_light_changes_less_than_original():
    images = torch.rand(64, 3, 16, 16) * 2 - 1
    labels = _blobs(64, 16)
    torch.manual_seed(6)
    light = (SegmentationAugment("light")(images, labels)[0] - images).abs().mean()
    torch.manual_seed(6)
    original = (SegmentationAugment("original")(images, labels)[0] - images).abs().mean()
    assert 0 < light < original


def test_from_config():
    assert from_config("light").strength == "light"
    assert SegmentationAugment.from_config("original").strength == "original"
    custom = from_config({"strength": "original", "block_p": {"degrade": 0.0}, "params": {"scale": [0.9, 1.1]}, "out_range": [0, 1]})
    assert custom.blocks["degrade"].p == 0.0 and custom.params.scale == (0.9, 1.1) and custom.out_range == (0.0, 1.0)
    with pytest.raises(ConfigError, match="unknown strength 'heavy'"):
        from_config("heavy")
    with pytest.raises(ConfigError, match="unknown key 'strenght'"):
        from_config({"strenght": "light"})
    with pytest.raises(ConfigError, match="unknown key 'rotation'"):
        from_config({"params": {"rotation": 10}})
    with pytest.raises(ConfigError, match="no block 'degrade'"):
        from_config({"strength": "light", "block_p": {"degrade": 0.5}})
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\]"):
        from_config({"block_p": {"colour": 2}})


@pytest.mark.parametrize(
    "spec, says",
    [
        ({"params": 3}, "augment.params: expected a mapping, got 3"),
        ({"block_p": 2}, "augment.block_p: expected a mapping, got 2"),
        ({"out_range": 5}, "augment.out_range: expected [lower, upper], got 5"),
        ({"out_range": [1, 1]}, "augment.out_range: the lower bound must be below the upper one"),
        ({"strength": ["light"]}, "augment: unknown strength ['light']"),
        ({"image_fill": {}}, "augment: unknown image_fill {}"),
        ({"block_p": {"colour": "often"}}, "augment.block_p.colour: expected a finite number, got 'often'"),
        ({"params": {"gamma": "abc"}}, "augment.params.gamma: expected [lower, upper], got 'abc'"),
        ({"params": {"gamma": [1.5, 0.5]}}, "augment.params.gamma: the lower bound 1.5 is above the upper one 0.5"),
        ({"params": {"flip_p": True}}, "augment.params.flip_p: expected a finite number, got True"),
        ({"params": {"shear_deg": 90}}, r"augment.params.shear_deg: must be in [0, 80], got 90"),
        ({"params": {"gaussian_sigma": [0, 1e9]}}, "augment.params.gaussian_sigma: must be in [0, 16]"),
    ],
)
def test_from_config_checks_types_and_ranges(spec, says):
    """Wrong types failed as TypeError / AttributeError when training started, or later in kornia."""
    with pytest.raises(ConfigError) as err:
        from_config(spec)
    assert says in str(err.value)


def test_parameter_overrides_keep_their_types():
    augment = from_config({"params": {"motion_kernel": 5, "jpeg_quality": [80, 90], "translate": 0}})
    assert augment.params.motion_kernel == 5 and type(augment.params.motion_kernel) is int
    assert augment.params.jpeg_quality == (80.0, 90.0) and augment.params.translate == 0.0


def test_ops_outside_the_block_are_never_applied():
    """The light preset has no shear: its matrices are rotation · scale · flip (orthogonal columns)."""
    augment = SegmentationAugment("light")
    everything = {op: torch.ones(256, dtype=torch.bool) for op in augment.blocks["geometry"].ops}
    torch.manual_seed(9)
    linear = augment._affine(everything, 256, 32, 32, torch.device("cpu"))[:, :, :2]
    column_dot = (linear[:, :, 0] * linear[:, :, 1]).sum(1)
    assert column_dot.abs().max() < 1e-5
    angles = torch.atan2(linear[:, 1, 0], linear[:, 0, 0]).abs()
    assert (angles.rad2deg() <= 15.01).logical_or(angles.rad2deg() >= 180 - 15.01).all()  # flips add 180°
    nothing = {op: torch.zeros(256, dtype=torch.bool) for op in everything}
    identity = augment._affine(nothing, 256, 32, 32, torch.device("cpu"))
    assert torch.allclose(identity, torch.eye(3)[:2].expand(256, 2, 3))
