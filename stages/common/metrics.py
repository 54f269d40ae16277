"""Every metric the stages report, in one place so that all stages score the same way.
stages.common.scoring applies them to a split's files; stages.common.tables prints them.

Segmentation metrics stream: each class accumulates counts image by image (or batch by batch)
and never holds the masks, so a 10^4-image split costs a few kilobytes. Accumulators can be
merged, so worker processes or shards can each score a part and the parent adds them up.

Conventions shared by the whole module:
- masks are integer arrays of class indices, 0 is background, 255 (``ignore_index``) marks
  pixels to leave out; numpy arrays or CPU/GPU torch tensors are accepted;
- a class that appears neither in the predictions nor in the targets has no IoU (nan), and
  means skip nans;
- binary masks follow the Kaggle SIIM convention: an empty prediction on an empty target
  scores 1, one empty and the other not scores 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from data.errors import DataError

IGNORE_INDEX = 255


def _to_numpy(array: Any) -> np.ndarray:
    """Accept numpy arrays, lists and torch tensors (on any device) without importing torch."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _nanmean(values: Iterable[float]) -> float:
    """Mean over the values that are not nan; nan (without a warning) when none is left."""
    values = np.asarray(list(values), dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator else math.nan


def _shown_values(values: np.ndarray, limit: int = 8) -> str:
    unique = np.unique(values)
    shown = ", ".join(str(v) for v in unique[:limit].tolist())
    return shown + (", ..." if unique.size > limit else "")


# --------------------------------------------------------------------------------------------
# Multiclass segmentation: one confusion matrix
# --------------------------------------------------------------------------------------------


class ConfusionMatrix:
    """Pixel counts of (target class, predicted class) over a whole split, for IoU and mIoU.

    ``num_classes`` counts the background (PASCAL VOC: 21). ``counts`` has one extra column
    for "no prediction": pixels whose prediction is ``ignore_index`` (a seed's 255) while the
    target is scored. How they count is chosen per update:

    - ``ignore_pred=False`` (default): such a pixel is a miss of its target class (a false
      negative, and a false positive of no class), as in ``smp.metrics.get_stats``;
    - ``ignore_pred=True``: the pixel is left out entirely, which is how seeds are scored
      ("seed mIoU ignoring 255"); ``coverage()`` then says which share of pixels had a label.

    Target pixels equal to ``ignore_index`` are always left out.
    """

    def __init__(self, num_classes: int):
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.counts = np.zeros((self.num_classes, self.num_classes + 1), dtype=np.int64)
        self.total_pixels = 0  # every pixel passed to update, scored or not
        self.unlabelled_pixels = 0  # pixels whose prediction was ignore_index

    @property
    def matrix(self) -> np.ndarray:
        """(target, prediction) counts over the pixels that got a class prediction."""
        return self.counts[:, : self.num_classes]

    def update(self, pred: Any, target: Any, ignore_index: int = IGNORE_INDEX, ignore_pred: bool = False) -> None:
        """Add one mask, or a batch of masks of any shape, to the counts.

        Raises DataError when the target holds a value that is neither a class nor
        ``ignore_index`` (a malformed mask file) and ValueError for a prediction out of range
        (a bug, not a data problem).
        """
        pred, target = _to_numpy(pred).ravel(), _to_numpy(target).ravel()
        if pred.shape != target.shape:
            raise ValueError(f"prediction and target differ in size: {pred.size} vs {target.size} pixels")
        self.total_pixels += target.size
        unlabelled = pred == ignore_index
        self.unlabelled_pixels += int(np.count_nonzero(unlabelled))
        scored = target != ignore_index
        if ignore_pred:
            scored &= ~unlabelled
        if not scored.all():
            pred, target, unlabelled = pred[scored], target[scored], unlabelled[scored]
        if target.size == 0:
            return
        self._check_ranges(pred, target, unlabelled)
        column = np.where(unlabelled, self.num_classes, pred).astype(np.intp)
        flat = target.astype(np.intp) * (self.num_classes + 1) + column
        width = self.num_classes + 1
        self.counts += np.bincount(flat, minlength=self.num_classes * width).reshape(self.num_classes, width)

    def _check_ranges(self, pred: np.ndarray, target: np.ndarray, unlabelled: np.ndarray) -> None:
        bad_target = (target < 0) | (target >= self.num_classes)
        if bad_target.any():
            raise DataError(
                f"mask holds values {_shown_values(target[bad_target])} that are not classes "
                f"0..{self.num_classes - 1} nor the ignore value"
            )
        bad_pred = ((pred < 0) | (pred >= self.num_classes)) & ~unlabelled
        if bad_pred.any():
            raise ValueError(
                f"prediction holds values {_shown_values(pred[bad_pred])} outside classes 0..{self.num_classes - 1}"
            )

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another matrix's counts (from a worker or shard) into this one; returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge confusion matrices of {self.num_classes} and {other.num_classes} classes")
        self.counts += other.counts
        self.total_pixels += other.total_pixels
        self.unlabelled_pixels += other.unlabelled_pixels
        return self

    def true_positives(self) -> np.ndarray:
        return np.diag(self.matrix).copy()

    def false_positives(self) -> np.ndarray:
        return self.matrix.sum(axis=0) - self.true_positives()

    def false_negatives(self) -> np.ndarray:
        """Target pixels of each class predicted as another class or not predicted at all."""
        return self.counts.sum(axis=1) - self.true_positives()

    def iou(self) -> np.ndarray:
        """Per-class IoU = TP / (TP + FP + FN); nan for a class absent from both sides."""
        tp = self.true_positives().astype(np.float64)
        union = tp + self.false_positives() + self.false_negatives()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    def miou(self) -> float:
        """Mean IoU over the classes that occur (PASCAL VOC's headline number)."""
        return _nanmean(self.iou())

    def pixel_accuracy(self) -> float:
        """Share of scored pixels given their target class."""
        return _ratio(self.true_positives().sum(), self.counts.sum())

    def coverage(self) -> float:
        """Share of all pixels seen whose prediction is not ``ignore_index`` (seed coverage)."""
        return _ratio(self.total_pixels - self.unlabelled_pixels, self.total_pixels)

    def to_dict(self, class_names: Sequence[str] | None = None, prefix: str = "") -> dict[str, float]:
        """Flat metrics for StageResult / metrics.json: miou, pixel_accuracy, iou/<class>."""
        names = _class_names(class_names, self.num_classes)
        result = {f"{prefix}miou": self.miou(), f"{prefix}pixel_accuracy": self.pixel_accuracy()}
        for name, value in zip(names, self.iou()):
            result[f"{prefix}iou/{name}"] = float(value)
        return result


def _class_names(class_names: Sequence[str] | None, count: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(count)]
    if len(class_names) != count:
        raise ValueError(f"expected {count} class names, got {len(class_names)}: {list(class_names)}")
    return [str(name) for name in class_names]


# --------------------------------------------------------------------------------------------
# Binary segmentation: per-image Dice (Kaggle SIIM) and image-level detection
# --------------------------------------------------------------------------------------------


def binary_counts(pred: Any, target: Any, ignore_index: int = IGNORE_INDEX) -> tuple[int, int, int]:
    """(TP, FP, FN) pixels of one binary mask pair.

    Foreground is any value other than 0 and ``ignore_index`` (so bool or 0/1 masks both
    work); target pixels equal to ``ignore_index`` are left out, and a prediction equal to it
    counts as background.
    """
    pred, target = _to_numpy(pred), _to_numpy(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction and target differ in shape: {pred.shape} vs {target.shape}")
    scored = target != ignore_index
    pred_fg = (pred != 0) & (pred != ignore_index) & scored
    target_fg = (target != 0) & scored
    tp = int(np.count_nonzero(pred_fg & target_fg))
    return tp, int(np.count_nonzero(pred_fg)) - tp, int(np.count_nonzero(target_fg)) - tp


def _dice_from_counts(tp: int, fp: int, fn: int) -> float:
    denominator = 2 * tp + fp + fn
    return 2.0 * tp / denominator if denominator else 1.0


def _iou_from_counts(tp: int, fp: int, fn: int) -> float:
    denominator = tp + fp + fn
    return tp / denominator if denominator else 1.0


def dice(pred: Any, target: Any, ignore_index: int = IGNORE_INDEX) -> float:
    """Dice of one image; Kaggle convention: both empty 1.0, exactly one empty 0.0."""
    return _dice_from_counts(*binary_counts(pred, target, ignore_index))


def iou_binary(pred: Any, target: Any, ignore_index: int = IGNORE_INDEX) -> float:
    """Foreground IoU of one image, with the same empty-mask convention as ``dice``."""
    return _iou_from_counts(*binary_counts(pred, target, ignore_index))


class BinarySegmentationScores:
    """Streaming scores of a binary task (SIIM pneumothorax), one image at a time.

    - ``kaggle_dice``: mean per-image Dice over all images, empty vs empty = 1 (the SIIM
      leaderboard score, dominated by how well negatives are kept empty);
    - ``dice_pos`` / ``iou_pos``: mean per-image Dice / IoU over images whose target is not
      empty (how well findings are outlined), and ``dice_pos_global`` / ``iou_pos_global``
      from the pixel counts pooled over those images;
    - ``image_tp/fp/tn/fn``: image-level detection, "positive" meaning a non-empty mask;
    - ``image_auc``: ROC AUC of a per-image score (e.g. the classifier probability or the
      largest pixel probability) against the target being non-empty, when every update gave one.
    """

    def __init__(self) -> None:
        self.images = 0
        self.dice_sum = 0.0
        self.positives = 0
        self.dice_pos_sum = 0.0
        self.iou_pos_sum = 0.0
        self.pixels_pos = np.zeros(3, dtype=np.int64)  # TP, FP, FN pooled over positive images
        self.image_counts = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
        self.image_scores: list[float] = []
        self.image_labels: list[int] = []

    def update(self, pred: Any, target: Any, score: float | None = None, ignore_index: int = IGNORE_INDEX) -> float:
        """Add one image (an (H, W) mask pair); returns its Dice for per-image reports."""
        tp, fp, fn = binary_counts(pred, target, ignore_index)
        image_dice = _dice_from_counts(tp, fp, fn)
        target_positive, pred_positive = tp + fn > 0, tp + fp > 0
        self.images += 1
        self.dice_sum += image_dice
        if target_positive:
            self.positives += 1
            self.dice_pos_sum += image_dice
            self.iou_pos_sum += _iou_from_counts(tp, fp, fn)
            self.pixels_pos += (tp, fp, fn)
        outcome = ("t" if pred_positive == target_positive else "f") + ("p" if pred_positive else "n")
        self.image_counts[outcome] += 1
        if score is not None:
            self.image_scores.append(float(score))
            self.image_labels.append(int(target_positive))
        return image_dice

    def update_batch(
        self, preds: Any, targets: Any, scores: Any = None, ignore_index: int = IGNORE_INDEX
    ) -> list[float]:
        """Add a batch of (N, H, W) masks, optionally with N image scores; returns their Dice."""
        preds, targets = _to_numpy(preds), _to_numpy(targets)
        if preds.shape != targets.shape or preds.ndim != 3:
            raise ValueError(f"expected two (N, H, W) batches, got {preds.shape} and {targets.shape}")
        scores = [None] * len(preds) if scores is None else _to_numpy(scores).reshape(-1).tolist()
        if len(scores) != len(preds):
            raise ValueError(f"{len(scores)} image scores for {len(preds)} masks")
        return [self.update(p, t, s, ignore_index) for p, t, s in zip(preds, targets, scores)]

    def merge(self, other: "BinarySegmentationScores") -> "BinarySegmentationScores":
        """Add another accumulator (from a worker or shard) into this one; returns self."""
        self.images += other.images
        self.dice_sum += other.dice_sum
        self.positives += other.positives
        self.dice_pos_sum += other.dice_pos_sum
        self.iou_pos_sum += other.iou_pos_sum
        self.pixels_pos += other.pixels_pos
        for outcome, count in other.image_counts.items():
            self.image_counts[outcome] += count
        self.image_scores.extend(other.image_scores)
        self.image_labels.extend(other.image_labels)
        return self

    def summary(self, prefix: str = "") -> dict[str, float]:
        """Flat metrics for StageResult / metrics.json; nan where no image qualifies, counts as ints."""
        tp, fp, fn = (int(v) for v in self.pixels_pos)
        result = {
            "kaggle_dice": _ratio(self.dice_sum, self.images),
            "dice_pos": _ratio(self.dice_pos_sum, self.positives),
            "iou_pos": _ratio(self.iou_pos_sum, self.positives),
            "dice_pos_global": _ratio(2 * tp, 2 * tp + fp + fn),
            "iou_pos_global": _ratio(tp, tp + fp + fn),
            "images": self.images,
            "positives": self.positives,
        }
        for outcome, count in self.image_counts.items():
            result[f"image_{outcome}"] = count
        if self.image_scores:
            if len(self.image_scores) != self.images:
                raise ValueError(
                    f"image scores were given for {len(self.image_scores)} of {self.images} images; "
                    "give one for every image or none"
                )
            result["image_auc"] = roc_auc(self.image_scores, self.image_labels)
        return {prefix + key: value for key, value in result.items()}


# --------------------------------------------------------------------------------------------
# Image-level classification
# --------------------------------------------------------------------------------------------


def roc_auc(scores: Any, labels: Any) -> float:
    """ROC AUC of one class; nan when the labels hold only one value (AUC undefined)."""
    from sklearn.metrics import roc_auc_score

    labels = _to_numpy(labels).reshape(-1)
    if np.unique(labels).size < 2:
        return math.nan
    return float(roc_auc_score(labels, _to_numpy(scores).reshape(-1)))


def average_precision(scores: Any, labels: Any) -> float:
    """Average precision (area under the step precision-recall curve); nan with one label value."""
    from sklearn.metrics import average_precision_score

    labels = _to_numpy(labels).reshape(-1)
    if np.unique(labels).size < 2:
        return math.nan
    return float(average_precision_score(labels, _to_numpy(scores).reshape(-1)))


def classification_scores(
    scores: Any, targets: Any, class_names: Sequence[str] | None = None, prefix: str = ""
) -> dict[str, float]:
    """Per-class ROC AUC and AP of multilabel scores (N, C) against 0/1 targets (N, C).

    A class whose targets are all 0 or all 1 has neither (nan) and is left out of the means
    ``mean_auc`` and ``mean_ap``. 1-D inputs are one class. ``class_names`` are the
    foreground classes (columns), not the background.
    """
    scores, targets = _to_numpy(scores), _to_numpy(targets)
    if scores.ndim == 1:
        scores, targets = scores[:, None], targets.reshape(-1, 1)
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} must both be (N, C)")
    if not np.isin(targets, (0, 1)).all():
        raise ValueError(f"targets must be 0/1, got values {_shown_values(targets)}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain nan or inf")
    names = _class_names(class_names, scores.shape[1])
    aucs = [roc_auc(scores[:, c], targets[:, c]) for c in range(scores.shape[1])]
    aps = [average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1])]
    result = {f"{prefix}mean_auc": _nanmean(aucs), f"{prefix}mean_ap": _nanmean(aps)}
    for name, auc, ap in zip(names, aucs, aps):
        result[f"{prefix}auc/{name}"] = auc
        result[f"{prefix}ap/{name}"] = ap
    return result
