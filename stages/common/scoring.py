"""One scorer for every stage's output against the ground truth: CAMs, seeds, pseudo-labels and
predictions.

`SegmentationScorer` adds images one by one to a confusion matrix (and, on a binary dataset, to
the Kaggle SIIM scores) and reports them under a metric prefix; `score_label_files` scores a
split's label PNGs with it. Which images are scored, and what becomes of one whose files cannot
be read, is decided here too (`read_scored_pair`, `left_out_of_scores`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data.errors import DataError
from data.layout import read_index_png
from stages.common.metrics import BinarySegmentationScores, ConfusionMatrix

log = logging.getLogger("wss.scoring")


def scored_ids(dataset, ids: list[str], tune_split: str | None) -> list[str]:
    """`ids` without the images of the tuning split (`data.tune_split`): `wss tune` chooses
    settings on their masks, so no score a stage reports may include them."""
    if not tune_split:
        return list(ids)
    tuned = set(dataset.split(tune_split))
    return [image_id for image_id in ids if image_id not in tuned]


def replace_scores(metrics: dict, prefixes: tuple[str, ...], scores: dict, keep: tuple[str, ...] = ()) -> dict:
    """A stage's `metrics` with every score under `prefixes` replaced by `scores` (re-scoring:
    a score the new scoring no longer gives must not survive); the metrics named in `keep` and
    those under other prefixes stay."""
    kept = {k: v for k, v in metrics.items() if k in keep or not k.startswith(prefixes)}
    return {**kept, **scores}


class SegmentationScorer:
    """mIoU, pixel accuracy and per-class IoU over background + `classes`; with `binary`, also
    the Kaggle SIIM scores (stages.common.metrics.BinarySegmentationScores), and their image AUC
    when every update gives an image score.

    `ignore_unlabelled` scores seeds: prediction pixels of 255 are left out ("mIoU ignoring
    255"), the metrics add `coverage` (the share of pixels that got a label), and there are no
    binary scores (they would count those pixels as background).
    """

    def __init__(self, classes: Sequence[str], binary: bool = False, ignore_unlabelled: bool = False):
        self.classes = ["background", *classes]
        self.matrix = ConfusionMatrix(len(self.classes))
        self.binary = BinarySegmentationScores() if binary and not ignore_unlabelled else None
        self.ignore_unlabelled = ignore_unlabelled
        self.images = 0

    @classmethod
    def of(cls, dataset, ignore_unlabelled: bool = False) -> "SegmentationScorer":
        """The scorer of a prepared dataset: its classes, binary scores on a binary task."""
        return cls(dataset.classes, binary=dataset.task == "binary", ignore_unlabelled=ignore_unlabelled)

    def update(self, pred: Any, gt: Any, image_score: float | None = None) -> None:
        """Add one image: its predicted label map and its ground truth, of the same size."""
        self.matrix.update(pred, gt, ignore_pred=self.ignore_unlabelled)
        if self.binary is not None:
            self.binary.update(pred, gt, image_score)
        self.images += 1

    def miou(self) -> float:
        return self.matrix.miou()

    def metrics(self, prefix: str) -> dict:
        """`<prefix>miou`, `pixel_accuracy`, `iou/<class>`, [`coverage`], [binary scores],
        `scored_images`; only `<prefix>scored_images: 0` when no image was scored."""
        if not self.images:
            return {f"{prefix}scored_images": 0}
        result = {k: float(v) for k, v in self.matrix.to_dict(self.classes, prefix).items()}
        if self.ignore_unlabelled:
            result[f"{prefix}coverage"] = float(self.matrix.coverage())
        if self.binary is not None:
            result.update({k: float(v) for k, v in self.binary.summary(prefix).items()})
        result[f"{prefix}scored_images"] = self.images
        return result


def score_label_files(
    dataset,
    ids: list[str],
    label_dir: Path,
    prefix: str,
    *,
    ignore_unlabelled: bool = False,
    failures: list[str] | None = None,
    image_scores: dict | None = None,
) -> dict:
    """Scores of the label PNGs `<label_dir>/<id>.png` of `ids` (seeds, pseudo-labels,
    predictions) that exist, against the masks that exist (evaluation only). A label or mask
    that does not decode, or the two of other sizes, is left out and listed in `failures`.
    `image_scores` ({id: score}) give the binary image AUC."""
    scorer = SegmentationScorer.of(dataset, ignore_unlabelled)
    for image_id in ids:
        pair = read_scored_pair(dataset, image_id, Path(label_dir) / f"{image_id}.png", failures)
        if pair is not None:
            scorer.update(*pair, None if image_scores is None else image_scores.get(image_id))
    return scorer.metrics(prefix)


def left_out_of_scores(error: Exception, failures: list[str] | None = None) -> None:
    """Report an image that cannot be scored (a mask or prediction that does not decode, or
    sizes that differ): logged, and listed in the stage's `failures` where there is one. The
    caller scores the other images, so one bad file never costs the stage's output."""
    log.warning("scoring: left out %s", error)
    if failures is not None:
        failures.append(f"{error}; left out of the scores")


def read_scored_pair(
    dataset, image_id: str, pred_path: Path, failures: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """(prediction, ground truth) of one image from a label PNG and the dataset's mask, or None
    where either is missing, or unreadable or of other sizes (see left_out_of_scores)."""
    if not dataset.has_mask(image_id) or not Path(pred_path).is_file():
        return None
    try:
        pred = read_index_png(pred_path)
        return pred, dataset.read_mask(image_id, pred.shape)
    except DataError as error:
        left_out_of_scores(error, failures)
        return None
