"""Segmentation metrics and the continual-learning matrix metrics (docs/design.md#metrics).

Conventions: class 0 is background; metrics are reported for the *scored* classes f..K−1, where
``first_class`` f is 1 unless a data layout adds helper classes below the real foreground (the CT
options ``add_bg_label`` / ``add_bone_label``, :meth:`relaylearn.data.layouts.Layout.first_scored_class`),
so a per-class result has K−f columns (column k−f is class k). Distances are in pixels.

* Dice per image and class = 2tp / (2tp + fp + fn), and 1.0 when the class is absent from both
  prediction and truth.
* Boundary of a mask = mask pixels with a 4-neighbour outside the mask (or outside the image):
  ``mask XOR binary_erosion(mask)``, as MONAI does without spacing.
* Surface distances = Euclidean distance from each boundary pixel of one mask to the nearest
  boundary pixel of the other. HD95 = max of the two directed 95th percentiles (linear
  interpolation, as ``numpy.percentile``/``torch.quantile``, i.e. MONAI's
  ``compute_hausdorff_distance(percentile=95)``); ASD = mean of the distances of both
  directions pooled (MONAI's ``compute_average_surface_distance(symmetric=True)``).
  Both masks empty -> 0. Exactly one mask empty -> ``empty_distance``, by default the image
  diagonal √(H² + W²) (the largest distance possible in the image; the original used 100).

MONAI is not called here at run time, though tests check that every value equals MONAI's
(``compute_dice(ignore_empty=False)``, ``compute_hausdorff_distance``,
``compute_average_surface_distance``) wherever the conventions agree: for an empty mask MONAI
returns inf/NaN distances instead of the fixed values above, its surface metrics took 3–13× as
long per image and class (256 / 64 px, CPU) and return float32, and Dice here comes from one
confusion count that also gives the pooled Dice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from relaylearn.errors import DataError

FOREGROUND_FROM = 1  #: default first scored class (class 0 is the background)


def _as_ids(pred: Tensor) -> Tensor:
    """Class ids [B,H,W] from ids [B,H,W] or logits/probabilities [B,K,H,W]."""
    pred = torch.as_tensor(pred)
    return pred.argmax(dim=1) if pred.dim() == 4 else pred


def _check_pair(pred: Tensor, target: Tensor) -> None:
    if pred.dim() != 3 or pred.shape != target.shape:
        raise DataError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} must both be [B, H, W] class ids")


def _check_first_class(num_classes: int, first_class: int) -> None:
    if not FOREGROUND_FROM <= first_class < num_classes:
        raise DataError(f"the first scored class must lie in {FOREGROUND_FROM}..{num_classes - 1} (num_classes={num_classes}), got {first_class}")


def _confusion_counts(pred: Tensor, target: Tensor, num_classes: int, first_class: int = FOREGROUND_FROM) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image tp, fp, fn of the scored classes f..K−1: ids [B,H,W] x2 -> int64 [B, K−f] each."""
    _check_first_class(num_classes, first_class)
    for name, ids in (("prediction", pred), ("target", target)):
        if ids.numel() and (ids.min() < 0 or ids.max() >= num_classes):
            raise DataError(f"{name} holds class ids outside 0..{num_classes - 1}")
    batch = pred.shape[0]
    cell = target.long() * num_classes + pred.long()  # row = true class, column = predicted
    cell = cell.reshape(batch, -1) + torch.arange(batch, device=cell.device).unsqueeze(1) * num_classes**2
    confusion = torch.bincount(cell.flatten(), minlength=batch * num_classes**2).view(batch, num_classes, num_classes)
    tp = confusion.diagonal(dim1=1, dim2=2)
    fp = confusion.sum(dim=1) - tp
    fn = confusion.sum(dim=2) - tp
    return tp[:, first_class:], fp[:, first_class:], fn[:, first_class:]


def _dice_from_counts(tp: Tensor, fp: Tensor, fn: Tensor) -> Tensor:
    denominator = 2 * tp + fp + fn
    dice = 2 * tp.double() / denominator.clamp_min(1).double()
    return torch.where(denominator == 0, torch.ones_like(dice), dice)


def dice_per_image(pred: Tensor, target: Tensor, num_classes: int, first_class: int = FOREGROUND_FROM) -> Tensor:
    """Dice of each image and scored class f..K−1: ids [B,H,W] x2 -> float64 [B, K−f]."""
    _check_pair(pred, target)
    return _dice_from_counts(*_confusion_counts(pred, target, num_classes, first_class))


def pooled_dice(pred: Tensor, target: Tensor, num_classes: int, first_class: int = FOREGROUND_FROM) -> Tensor:
    """Voxel-wise Dice over the whole set: ids [B,H,W] x2 -> float64 [K−f] (1.0 if absent everywhere)."""
    _check_pair(pred, target)
    return _dice_from_counts(*(count.sum(0) for count in _confusion_counts(pred, target, num_classes, first_class)))


def _boundary(mask: np.ndarray) -> np.ndarray:
    return mask ^ ndimage.binary_erosion(mask)


def _surface_distances(pred_mask: np.ndarray, target_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distances pred-boundary -> target-boundary and target -> pred; both masks non-empty.

    The work runs on the bounding box of both masks plus a one-pixel margin (all boundary pixels
    and their erosion neighbourhoods lie inside it), which is exact and fast for small objects.
    """
    rows, cols = np.nonzero(pred_mask | target_mask)
    height, width = pred_mask.shape
    box = (slice(max(rows.min() - 1, 0), min(rows.max() + 2, height)), slice(max(cols.min() - 1, 0), min(cols.max() + 2, width)))
    pred_edge, target_edge = _boundary(pred_mask[box]), _boundary(target_mask[box])
    to_target = ndimage.distance_transform_edt(~target_edge)[pred_edge]
    to_pred = ndimage.distance_transform_edt(~pred_edge)[target_edge]
    return to_target, to_pred


def surface_metrics(pred_mask: np.ndarray, target_mask: np.ndarray, empty_distance: float) -> tuple[float, float]:
    """(HD95, ASD) in pixels of two boolean masks [H,W]; see the module docstring for empties."""
    pred_any, target_any = bool(pred_mask.any()), bool(target_mask.any())
    if not pred_any and not target_any:
        return 0.0, 0.0
    if pred_any != target_any:
        return empty_distance, empty_distance
    to_target, to_pred = _surface_distances(pred_mask, target_mask)
    hd95 = max(np.percentile(to_target, 95), np.percentile(to_pred, 95))
    asd = np.concatenate([to_target, to_pred]).mean()
    return float(hd95), float(asd)


def per_image_metrics(
    pred: Tensor, target: Tensor, num_classes: int, *, empty_distance: float | None = None, first_class: int = FOREGROUND_FROM
) -> dict[str, Tensor]:
    """Dice, HD95 and ASD of each image and scored class f..K−1 (f = ``first_class``).

    pred, target: class ids [B,H,W] (any integer dtype, any device). Returns float64 CPU tensors
    ``{"dice": [B,K−f], "hd95": [B,K−f], "asd": [B,K−f]}``. ``empty_distance``: the HD95/ASD
    when exactly one of prediction and truth is empty (default: image diagonal √(H²+W²)).
    """
    _check_pair(pred, target)
    height, width = pred.shape[-2:]
    if empty_distance is None:
        empty_distance = math.hypot(height, width)
    dice = dice_per_image(pred, target, num_classes, first_class).cpu()
    pred_np, target_np = pred.cpu().numpy(), target.cpu().numpy()
    surface = np.zeros((pred_np.shape[0], num_classes - first_class, 2))
    for image in range(pred_np.shape[0]):
        for column, cls in enumerate(range(first_class, num_classes)):
            surface[image, column] = surface_metrics(pred_np[image] == cls, target_np[image] == cls, empty_distance)
    surface_t = torch.from_numpy(surface)
    return {"dice": dice, "hd95": surface_t[..., 0], "asd": surface_t[..., 1]}


def bootstrap_ci(
    values: np.ndarray | Tensor | Sequence[float],
    n_resamples: int = 5000,
    level: float = 0.95,
    seed: int = 1234,
    groups: Sequence[str] | None = None,
) -> tuple[float, float, float]:
    """Percentile bootstrap of the mean of a 1-D sample [N]: returns (mean, low, high).

    Draws ``n_resamples`` resamples with replacement (``numpy.random.default_rng(seed)``), so the
    result is deterministic for a given seed. ``groups`` [N] (e.g. the study of each CT slice):
    a cluster bootstrap that resamples whole groups and takes the mean over all values of the
    drawn groups; without groups, or when every group holds one value, values are resampled (the
    same draws). An empty sample gives NaNs; one value (one group) or ``n_resamples=0`` gives the
    mean with NaN bounds (one value says nothing about the spread).
    """
    sample = np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values, dtype=np.float64).ravel()
    if groups is not None and len(groups) != sample.size:
        raise DataError(f"{len(groups)} groups given for {sample.size} values")
    if sample.size == 0:
        return math.nan, math.nan, math.nan
    sums, sizes = sample, np.ones_like(sample)
    if groups is not None:  # one sum and count per group, groups in order of first appearance
        index = {g: i for i, g in enumerate(dict.fromkeys(groups))}
        cluster = np.array([index[g] for g in groups])
        sums, sizes = np.bincount(cluster, weights=sample), np.bincount(cluster).astype(np.float64)
    if n_resamples <= 0 or sums.size == 1:
        return float(sample.mean()), math.nan, math.nan
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // sums.size)  # bound the index array to about 16 MB
    means = []
    for start in range(0, n_resamples, chunk):
        drawn = rng.integers(0, sums.size, size=(min(chunk, n_resamples - start), sums.size))
        means.append(sums[drawn].mean(axis=1) if sums.size == sample.size else sums[drawn].sum(axis=1) / sizes[drawn].sum(axis=1))
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(np.concatenate(means), [tail, 100.0 - tail])
    return float(sample.mean()), float(low), float(high)


def bootstrap_statistic(
    statistic: Callable[..., float], samples: Sequence[np.ndarray], n_resamples: int = 1000, level: float = 0.95, seed: int = 1234
) -> tuple[float, float, float]:
    """Percentile bootstrap of any statistic of one or more independent 1-D samples.

    Every sample is resampled with replacement on its own (a stratified bootstrap: group sizes
    are kept), ``statistic(*resampled)`` is evaluated on each resample. Returns (value on the
    original samples, low, high); NaN bounds for ``n_resamples=0`` or an empty sample.
    """
    arrays = [np.asarray(s, dtype=np.float64).ravel() for s in samples]
    value = float(statistic(*arrays)) if all(a.size for a in arrays) else math.nan
    if n_resamples <= 0 or not all(a.size for a in arrays):
        return value, math.nan, math.nan
    rng = np.random.default_rng(seed)
    stats = np.array([statistic(*(a[rng.integers(0, a.size, a.size)] for a in arrays)) for _ in range(n_resamples)], dtype=np.float64)
    tail = (1.0 - level) / 2.0 * 100.0
    with np.errstate(invalid="ignore"):  # an infinite statistic (a ratio over a zero median) makes a NaN bound, not a warning
        low, high = np.nanpercentile(stats, [tail, 100.0 - tail])
    return value, float(low), float(high)


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of scores where higher means "positive": the probability that a
    random positive outscores a random negative, ties counting one half (Mann–Whitney U / n₊n₋).
    0.5 = no separation."""
    pos, neg = np.asarray(positive, dtype=np.float64).ravel(), np.sort(np.asarray(negative, dtype=np.float64).ravel())
    if not pos.size or not neg.size:
        return math.nan
    below = np.searchsorted(neg, pos, side="left")
    not_above = np.searchsorted(neg, pos, side="right")
    return float((below + not_above).sum() / (2.0 * pos.size * neg.size))


class SegmentationScores:
    """Accumulates per-image metrics over batches, then summarises them.

    ``update(pred [B,K,H,W] logits or [B,H,W] ids, target [B,H,W] ids, names [B], subjects [B])``;
    ``compute()`` returns::

        {"per_image": [{"name", "subject", "dice_sample", "dice_class_k", "hd95_class_k", "asd_class_k"}, ...],
         "summary": {"<metric>": {"mean", "low", "high"} for dice_sample and each per-class column,
                     "pooled_dice_class_k": float, "pooled_dice": float (mean over classes),
                     "n_images": int, "n_subjects": int}}

    k runs over the scored classes ``first_class``..K−1 (default 1..K−1); ``dice_sample`` is an
    image's Dice averaged over them. ``subject`` (default: the image's name) is the bootstrap's
    resampling unit: images of one subject (the slices of a CT study) are resampled together.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        empty_distance: float | None = None,
        n_bootstrap: int = 5000,
        level: float = 0.95,
        seed: int = 1234,
        first_class: int = FOREGROUND_FROM,
    ):
        if num_classes < 2:
            raise DataError(f"num_classes must be at least 2 (background + one class), got {num_classes}")
        _check_first_class(num_classes, first_class)
        self.num_classes = num_classes
        self.first_class = first_class
        self.empty_distance = empty_distance
        self.n_bootstrap = n_bootstrap
        self.level = level
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        self._names: list[str] = []
        self._subjects: list[str] = []
        self._per_image: list[dict[str, Tensor]] = []
        self._counts = torch.zeros(3, self.num_classes - self.first_class, dtype=torch.int64)

    def update(self, pred: Tensor, target: Tensor, names: Sequence[str] | None = None, subjects: Sequence[str] | None = None) -> None:
        pred, target = _as_ids(pred).cpu(), torch.as_tensor(target).cpu()
        _check_pair(pred, target)
        if names is None:
            names = [str(len(self._names) + i) for i in range(pred.shape[0])]
        for what, given in (("names", names), ("subjects", subjects)):
            if given is not None and len(given) != pred.shape[0]:
                raise DataError(f"{len(given)} {what} given for a batch of {pred.shape[0]} images")
        self._names.extend(str(name) for name in names)
        self._subjects.extend(str(subject) for subject in (names if subjects is None else subjects))
        self._per_image.append(per_image_metrics(pred, target, self.num_classes, empty_distance=self.empty_distance, first_class=self.first_class))
        self._counts += torch.stack([count.sum(0) for count in _confusion_counts(pred, target, self.num_classes, self.first_class)])

    def compute(self) -> dict:
        columns: dict[str, np.ndarray] = {}
        classes = range(self.first_class, self.num_classes)
        if self._per_image:
            stacked = {key: torch.cat([batch[key] for batch in self._per_image]).numpy() for key in ("dice", "hd95", "asd")}
        else:
            stacked = {key: np.zeros((0, len(classes))) for key in ("dice", "hd95", "asd")}
        columns["dice_sample"] = stacked["dice"].mean(axis=1)
        for metric in ("dice", "hd95", "asd"):
            for column, cls in enumerate(classes):
                columns[f"{metric}_class_{cls}"] = stacked[metric][:, column]
        per_image = [
            {"name": name, "subject": subject, **{key: float(values[row]) for key, values in columns.items()}}
            for row, (name, subject) in enumerate(zip(self._names, self._subjects))
        ]
        summary: dict = {"n_images": len(self._names), "n_subjects": len(set(self._subjects))}
        for key, values in columns.items():
            mean, low, high = bootstrap_ci(values, self.n_bootstrap, self.level, self.seed, groups=self._subjects)
            summary[key] = {"mean": mean, "low": low, "high": high}
        pooled = _dice_from_counts(*self._counts)
        for column, cls in enumerate(classes):
            summary[f"pooled_dice_class_{cls}"] = float(pooled[column])
        summary["pooled_dice"] = float(pooled.mean())
        return {"per_image": per_image, "summary": summary}


def continual_metrics(R: Sequence[Sequence[float]] | np.ndarray, trained_idx: Sequence[int] | None = None) -> dict[str, float]:
    """ACC, BWT and forgetting of a relay from its result matrix (Lopez-Paz & Ranzato 2017;
    Chaudhry et al. 2018).

    R: [T, S]; row i = scores after training through the i-th trained site, column = test site.
    ``trained_idx[i]``: column of the i-th trained site (default i); other columns are external
    test sites. With c_j = trained_idx[j] and the last row L = T−1:

    * ``acc``     = mean_j R[L][c_j] over the trained sites only;
    * ``acc_all`` = mean over all S columns of R[L] (includes external test sites);
    * ``bwt``     = mean_{j<L} (R[L][c_j] − R[j][c_j]);
    * ``forgetting`` = mean_{j<L} max_{j≤l<L} (R[l][c_j] − R[L][c_j]) — rows before site j was
      trained are not "learned" scores, so the max starts at l = j; it can be negative when the
      final score beats every earlier one.

    With T = 1 there is no earlier site: ``bwt`` = ``forgetting`` = 0.0.
    """
    matrix = np.asarray(R, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] == 0:
        raise DataError(f"result matrix R must be 2-D [trained sites, test sites], got shape {matrix.shape}")
    num_trained, num_tested = matrix.shape
    columns = list(range(num_trained)) if trained_idx is None else [int(c) for c in trained_idx]
    if len(columns) != num_trained or any(not 0 <= c < num_tested for c in columns):
        raise DataError(f"trained_idx {columns} must give one column in 0..{num_tested - 1} for each of the {num_trained} rows of R")
    last = num_trained - 1
    final = matrix[last]
    result = {"acc": float(final[columns].mean()), "acc_all": float(final.mean()), "bwt": 0.0, "forgetting": 0.0}
    if num_trained > 1:
        result["bwt"] = float(np.mean([final[columns[j]] - matrix[j, columns[j]] for j in range(last)]))
        result["forgetting"] = float(np.mean([(matrix[j:last, columns[j]] - final[columns[j]]).max() for j in range(last)]))
    return result
