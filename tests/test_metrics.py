"""Segmentation metrics (checked against MONAI and by hand) and the continual-learning metrics."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance
from scipy import ndimage

from relaylearn.errors import DataError
from relaylearn.metrics import (
    SegmentationScores,
    bootstrap_ci,
    continual_metrics,
    dice_per_image,
    per_image_metrics,
    pooled_dice,
)


def random_blob_labels(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Label maps [B,H,W] in {0,1,2}: smoothed noise thresholded into blobs (class 2 inside 1)."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal((batch, height, width)), sigma=(0, 4, 4))
    labels = np.zeros(field.shape, dtype=np.int64)
    for b in range(batch):
        labels[b][field[b] > np.quantile(field[b], 0.6)] = 1
        labels[b][field[b] > np.quantile(field[b], 0.85)] = 2
    return torch.from_numpy(labels)


def one_hot(labels: torch.Tensor, num_classes: int = 3) -> torch.Tensor:
    return F.one_hot(labels, num_classes).permute(0, 3, 1, 2)


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")  # raised inside MONAI
def test_dice_hd95_asd_agree_with_monai_on_random_blobs():
    target = random_blob_labels(6, 48, 40, seed=0)
    pred = random_blob_labels(6, 48, 40, seed=1)
    pred[:3] = target[:3]  # include near-identical pairs: shift them a little
    pred[:3] = torch.roll(pred[:3], shifts=(2, -1), dims=(1, 2))
    ours = per_image_metrics(pred, target, 3)
    # the blobs are never empty, so MONAI's nan/inf conventions for empty masks do not arise;
    # MONAI's HD95 = max of the two directed torch.quantile(0.95) (linear interpolation), same as ours
    monai_dice = compute_dice(one_hot(pred), one_hot(target), include_background=False, ignore_empty=False)
    monai_hd95 = compute_hausdorff_distance(one_hot(pred), one_hot(target), include_background=False, percentile=95)
    monai_asd = compute_average_surface_distance(one_hot(pred), one_hot(target), include_background=False, symmetric=True)
    np.testing.assert_allclose(ours["dice"].numpy(), monai_dice.numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours["hd95"].numpy(), monai_hd95.numpy(), rtol=1e-5)
    np.testing.assert_allclose(ours["asd"].numpy(), monai_asd.numpy(), rtol=1e-5)
    assert ours["hd95"].shape == (6, 2) and (ours["hd95"] > 0).all()


def test_dice_agrees_with_monai_when_classes_are_absent():
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    pred = torch.zeros(2, 8, 8, dtype=torch.long)
    target[0, 2:4, 2:4] = 1
    pred[0, 2:5, 2:4] = 1
    pred[1, 0, 0] = 2  # class 2 predicted where the truth is empty
    ours = per_image_metrics(pred, target, 3)["dice"]
    monai_dice = compute_dice(one_hot(pred), one_hot(target), include_background=False, ignore_empty=False)
    np.testing.assert_allclose(ours.numpy(), monai_dice.numpy())
    assert ours.tolist() == [[pytest.approx(0.8), 1.0], [1.0, 0.0]]


def test_hand_computed_shifted_square():
    target = torch.zeros(1, 7, 7, dtype=torch.long)
    pred = torch.zeros(1, 7, 7, dtype=torch.long)
    target[0, 1:4, 1:4] = 1
    pred[0, 1:4, 2:5] = 1
    metrics = per_image_metrics(pred, target, 2)
    # 3x3 squares shifted by one column: 6 of 9 pixels overlap
    assert metrics["dice"].item() == pytest.approx(2 * 6 / 18)
    # boundaries are the 8 outer pixels; 4 of 8 distances are 0 and 4 are 1, in both directions
    assert metrics["asd"].item() == pytest.approx(0.5)
    assert metrics["hd95"].item() == pytest.approx(1.0)


def test_hand_computed_distance_between_single_pixels():
    target = torch.zeros(1, 5, 5, dtype=torch.long)
    pred = torch.zeros(1, 5, 5, dtype=torch.long)
    target[0, 0, 0] = 1
    pred[0, 3, 4] = 1
    metrics = per_image_metrics(pred, target, 2)
    assert metrics["hd95"].item() == pytest.approx(5.0)
    assert metrics["asd"].item() == pytest.approx(5.0)
    assert metrics["dice"].item() == 0.0


def test_empty_masks():
    both_empty = torch.zeros(1, 3, 4, dtype=torch.long)
    one_side = both_empty.clone()
    one_side[0, 1, 1] = 1
    both = per_image_metrics(both_empty, both_empty, 2)
    assert (both["dice"].item(), both["hd95"].item(), both["asd"].item()) == (1.0, 0.0, 0.0)
    for pred, target in ((one_side, both_empty), (both_empty, one_side)):
        one = per_image_metrics(pred, target, 2)
        assert one["dice"].item() == 0.0
        assert one["hd95"].item() == pytest.approx(5.0)  # diagonal of a 3x4 image
        assert one["asd"].item() == pytest.approx(5.0)
        fixed = per_image_metrics(pred, target, 2, empty_distance=100.0)
        assert fixed["hd95"].item() == fixed["asd"].item() == 100.0


def test_pooled_dice_hand_computed():
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    pred = torch.zeros(2, 4, 4, dtype=torch.long)
    target[0, 0, :2] = 1
    pred[0, 0, :2] = 1
    target[1, 3, :2] = 1  # missed entirely in image 1
    # class 1: tp 2, fp 0, fn 2 -> 4/6; class 2 absent everywhere -> 1
    assert pooled_dice(pred, target, 3).tolist() == [pytest.approx(2 / 3), 1.0]


def test_bad_shapes_and_class_ids_are_data_errors():
    zeros = torch.zeros(1, 4, 4, dtype=torch.long)
    with pytest.raises(DataError, match="must both be"):
        per_image_metrics(zeros, torch.zeros(1, 4, 5, dtype=torch.long), 2)
    with pytest.raises(DataError, match="target holds class ids outside 0..1"):
        per_image_metrics(zeros, zeros + 2, 2)


def test_eighty_small_images_are_fast():
    target = random_blob_labels(80, 64, 64, seed=2)
    pred = torch.roll(target, shifts=(1, 2), dims=(1, 2))
    start = time.perf_counter()
    per_image_metrics(pred, target, 3)
    assert time.perf_counter() - start < 2.0  # about 0.05 s on one idle core


mask_arrays = arrays(np.bool_, st.tuples(st.integers(1, 9), st.integers(1, 9)))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_dice_and_distances_are_symmetric_and_bounded(data):
    first = data.draw(mask_arrays)
    second = data.draw(arrays(np.bool_, first.shape))
    a = torch.from_numpy(first.astype(np.int64))[None]
    b = torch.from_numpy(second.astype(np.int64))[None]
    ab, ba = per_image_metrics(a, b, 2), per_image_metrics(b, a, 2)
    for key in ("dice", "hd95", "asd"):
        assert ab[key].item() == pytest.approx(ba[key].item())
    dice = ab["dice"].item()
    assert 0.0 <= dice <= 1.0
    assert (dice == 1.0) == bool(np.array_equal(first, second))
    diagonal = math.hypot(*first.shape)
    for key in ("hd95", "asd"):
        assert 0.0 <= ab[key].item() <= diagonal + 1e-9


def test_bootstrap_ci_contains_the_mean_and_is_deterministic():
    values = np.random.default_rng(0).uniform(size=200)
    mean, low, high = bootstrap_ci(values)
    assert mean == pytest.approx(values.mean())
    assert low < mean < high
    # for a mean of 200 uniforms the 95 % interval is about ±1.96·σ/√n wide
    assert high - low == pytest.approx(2 * 1.96 * values.std() / math.sqrt(200), rel=0.15)
    assert bootstrap_ci(torch.from_numpy(values)) == (mean, low, high)
    assert bootstrap_ci(values, seed=99) != (mean, low, high)
    assert bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    no_resampling = bootstrap_ci(values, n_resamples=0)
    assert no_resampling[0] == mean and math.isnan(no_resampling[1]) and math.isnan(no_resampling[2])
    one = bootstrap_ci([0.8])  # one image says nothing about the spread: no zero-width interval
    assert one[0] == 0.8 and math.isnan(one[1]) and math.isnan(one[2])


def test_segmentation_scores_accumulates_and_summarises():
    target = random_blob_labels(5, 32, 32, seed=3)
    pred = torch.roll(target, shifts=(1, 0), dims=(1, 2))
    scores = SegmentationScores(num_classes=3, n_bootstrap=500)
    scores.update(10.0 * one_hot(pred[:2]).float(), target[:2], ["a", "b"])  # logits
    scores.update(pred[2:], target[2:], ["c", "d", "e"])  # class ids
    result = scores.compute()
    rows, summary = result["per_image"], result["summary"]
    assert [row["name"] for row in rows] == ["a", "b", "c", "d", "e"]
    expected = per_image_metrics(pred, target, 3)
    for i, row in enumerate(rows):
        assert row["dice_class_2"] == pytest.approx(expected["dice"][i, 1].item())
        assert row["hd95_class_1"] == pytest.approx(expected["hd95"][i, 0].item())
        assert row["asd_class_2"] == pytest.approx(expected["asd"][i, 1].item())
        assert row["dice_sample"] == pytest.approx(expected["dice"][i].mean().item())
    dice_sample = summary["dice_sample"]
    assert dice_sample["mean"] == pytest.approx(np.mean([row["dice_sample"] for row in rows]))
    assert dice_sample["low"] <= dice_sample["mean"] <= dice_sample["high"]
    pooled = pooled_dice(pred, target, 3)
    assert summary["pooled_dice_class_1"] == pytest.approx(pooled[0].item())
    assert summary["pooled_dice"] == pytest.approx(pooled.mean().item())
    assert summary["n_images"] == 5
    with pytest.raises(DataError, match="1 names given for a batch of 2"):
        scores.update(pred[:2], target[:2], ["x"])


def test_helper_classes_below_the_first_scored_class_are_left_out():
    """A model perfect on a helper class 1 (soft tissue) that never predicts the tumour (class 2)
    scores 0 with first_class=2; from class 1 (the original's average) it scored (24/28 + 0) / 2."""
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[:, 2:6, 2:6] = 1
    target[:, 3:5, 3:5] = 2
    pred = target.clone()
    pred[pred == 2] = 1
    scores = SegmentationScores(num_classes=3, n_bootstrap=0, first_class=2)
    scores.update(pred, target)
    summary, row = scores.compute()["summary"], scores.compute()["per_image"][0]
    assert summary["dice_sample"]["mean"] == 0.0 and summary["pooled_dice"] == 0.0
    assert "dice_class_1" not in row and "pooled_dice_class_1" not in summary and row["dice_class_2"] == 0.0
    assert per_image_metrics(pred, target, 3, first_class=2)["hd95"].shape == (2, 1)
    assert pooled_dice(pred, target, 3).mean().item() == pytest.approx(3 / 7)  # default: from class 1, as the original
    assert dice_per_image(pred, target, 3, first_class=2).tolist() == [[0.0], [0.0]]
    with pytest.raises(DataError, match="first scored class"):
        SegmentationScores(num_classes=3, first_class=3)


def test_cluster_bootstrap_resamples_whole_subjects():
    """Slices of one study are resampled together: with every study's slices alike the interval
    is that of the study means, much wider than the slice-level one; one group per value is the
    plain bootstrap, one group alone gives no interval."""
    studies = np.repeat(np.arange(5.0), 20)  # 5 studies of 20 identical slices
    groups = [f"s_{int(v)}" for v in studies]
    mean, low, high = bootstrap_ci(studies, 2000, groups=groups)
    per_study = bootstrap_ci(np.arange(5.0), 2000)
    assert mean == 2.0 and (low, high) == pytest.approx(per_study[1:], abs=0.2)
    slices = bootstrap_ci(studies, 2000)
    assert high - low > 2.5 * (slices[2] - slices[1])
    values = np.random.default_rng(1).uniform(size=30)
    assert bootstrap_ci(values, 500, groups=[str(i) for i in range(30)]) == bootstrap_ci(values, 500)
    one = bootstrap_ci(values, 500, groups=["a"] * 30)
    assert one[0] == pytest.approx(values.mean()) and math.isnan(one[1]) and math.isnan(one[2])
    with pytest.raises(DataError, match="2 groups given for 30 values"):
        bootstrap_ci(values, groups=["a", "b"])


def test_segmentation_scores_record_the_subject_of_each_image():
    target = random_blob_labels(4, 16, 16, seed=5)
    scores = SegmentationScores(num_classes=3, n_bootstrap=200)
    scores.update(target, target, ["s1_0", "s1_1", "s2_0", "s2_1"], ["s1", "s1", "s2", "s2"])
    result = scores.compute()
    assert [r["subject"] for r in result["per_image"]] == ["s1", "s1", "s2", "s2"]
    assert result["summary"]["n_images"] == 4 and result["summary"]["n_subjects"] == 2
    plain = SegmentationScores(num_classes=3, n_bootstrap=0)
    plain.update(target, target, ["a", "b", "c", "d"])
    assert [r["subject"] for r in plain.compute()["per_image"]] == ["a", "b", "c", "d"]  # a 2-D image is its own subject
    with pytest.raises(DataError, match="1 subjects given for a batch of 4"):
        scores.update(target, target, None, ["s1"])


def test_continual_metrics_3x3_hand_computed():
    R = [
        [0.8, 0.99, 0.2],  # 0.99 on site 1 before training it must not count as "learned"
        [0.9, 0.9, 0.4],
        [0.6, 0.85, 0.95],
    ]
    result = continual_metrics(R)
    assert result["acc"] == pytest.approx((0.6 + 0.85 + 0.95) / 3)
    assert result["acc_all"] == pytest.approx(result["acc"])
    assert result["bwt"] == pytest.approx(((0.6 - 0.8) + (0.85 - 0.9)) / 2)
    assert result["forgetting"] == pytest.approx(((0.9 - 0.6) + (0.9 - 0.85)) / 2)


def test_continual_metrics_4x4_hand_computed():
    R = [[0.5, 0.1, 0.2, 0.3], [0.4, 0.6, 0.2, 0.3], [0.45, 0.7, 0.7, 0.3], [0.3, 0.55, 0.65, 0.8]]
    result = continual_metrics(np.array(R))
    assert result["acc"] == pytest.approx(2.3 / 4)
    assert result["bwt"] == pytest.approx((-0.2 - 0.05 - 0.05) / 3)
    assert result["forgetting"] == pytest.approx((0.2 + 0.15 + 0.05) / 3)


def test_continual_metrics_with_site_order_and_external_test_sites():
    R = [[0.1, 0.2, 0.9, 0.5, 0.4], [0.8, 0.3, 0.7, 0.5, 0.6], [0.6, 0.9, 0.8, 0.2, 0.3]]
    result = continual_metrics(R, trained_idx=[2, 0, 1])  # columns 3 and 4 are external sites
    assert result["acc"] == pytest.approx((0.8 + 0.6 + 0.9) / 3)
    assert result["acc_all"] == pytest.approx(2.8 / 5)
    assert result["bwt"] == pytest.approx(((0.8 - 0.9) + (0.6 - 0.8)) / 2)
    assert result["forgetting"] == pytest.approx(((0.9 - 0.8) + (0.8 - 0.6)) / 2)


def test_continual_metrics_single_site_and_bad_input():
    assert continual_metrics([[0.7, 0.5]]) == {"acc": 0.7, "acc_all": pytest.approx(0.6), "bwt": 0.0, "forgetting": 0.0}
    with pytest.raises(DataError, match="2-D"):
        continual_metrics([0.1, 0.2])
    with pytest.raises(DataError, match="trained_idx"):
        continual_metrics([[0.1, 0.2]], trained_idx=[5])


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning", "ignore:.*(all 0|nan|inf).*")
def test_monai_differs_only_where_a_mask_is_empty():
    """Why metrics.py keeps its own surface distances: with one mask empty MONAI gives no finite
    distance, ours the image diagonal; with both present the values are MONAI's."""
    target = torch.zeros(1, 20, 30, dtype=torch.long)
    target[0, 5:10, 5:10] = 1
    pred = torch.zeros_like(target)  # class 1 missed entirely
    ours = per_image_metrics(pred, target, 2)
    monai_hd95 = compute_hausdorff_distance(one_hot(pred, 2), one_hot(target, 2), include_background=False, percentile=95)
    assert not torch.isfinite(monai_hd95).all()
    assert ours["hd95"].item() == pytest.approx(math.hypot(20, 30))
    pred[0, 6:11, 5:10] = 1  # present in both: the same value as MONAI's
    ours = per_image_metrics(pred, target, 2)
    monai_hd95 = compute_hausdorff_distance(one_hot(pred, 2), one_hot(target, 2), include_background=False, percentile=95)
    assert ours["hd95"].item() == pytest.approx(monai_hd95.item(), rel=1e-5)
