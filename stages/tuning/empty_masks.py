"""The empty-mask rule of a binary task (stages.seg.postprocess) searched without retraining.

The evidence is gathered once per image: the trained segmenter's probabilities, cut at each
candidate `seg.threshold` into 8-connected regions whose sizes and overlaps with a reference are
kept, the segmenter's largest probability and the stage-1 classifier's probability. Every
(threshold, min_area, image_score, image_threshold) is then a few array operations over those
numbers, not a prediction.

Two kinds of images give evidence:

- `holdout`: train images the segmenter never trained on (`seg.checkpoint: pseudo_holdout`).
  Their reference is their pseudo-label, never a mask: a negative image's is empty (its label
  says so) and a positive image's is what the segmenter was taught. They are chosen on by their
  image label alone (is the mask empty where the label says "no finding"?) or by the Kaggle
  Dice against the pseudo-labels;
- `tune`: the tuning split's images, whose reference is their mask.

The rows carry, for each kind and for both pooled: the balanced accuracy of "mask not empty"
against the image label, the Kaggle Dice against the reference, and the rates of non-empty
masks on negative and on positive images.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data.layout import PreparedDataset
from data.transforms import resize_long
from stages.common.runtime import progress
from stages.seg.data import read_pseudo_label
from stages.seg.model import predict_probabilities
from stages.seg.postprocess import ClassifierScore, area_at, image_score, region_sizes

OBJECTIVES = ("balanced_accuracy", "kaggle_dice")
SOURCES = ("holdout", "tune")


@dataclass
class ImageEvidence:
    """What the rule search knows of one image."""

    image_id: str
    source: str  # holdout | tune
    positive: bool  # its image label
    size: tuple[int, int]
    reference_pixels: int  # foreground pixels of the reference (pseudo-label or mask), ignored ones left out
    seg_score: float
    cam_score: float | None
    # threshold -> (R, 3) int64 per region: its pixels, those the reference scores, those on its foreground
    regions: dict[float, np.ndarray] = field(default_factory=dict)


def image_evidence(
    image_id: str,
    source: str,
    positive: bool,
    image: np.ndarray,
    reference: np.ndarray,
    model,
    classifier: ClassifierScore | None,
    thresholds: list[float],
    long_side: int,
    device: torch.device,
) -> ImageEvidence:
    """The evidence of one image against its `reference` (class indices, 255 ignored)."""
    probs = predict_probabilities(model, image, "binary", long_side, device)[0].numpy()
    scored = reference != 255
    foreground = (reference != 0) & scored
    regions = {}
    for t in thresholds:
        labels, sizes = region_sizes(probs > t)
        count = len(sizes)
        in_scored = np.bincount(labels[scored], minlength=count)
        on_foreground = np.bincount(labels[foreground], minlength=count)
        regions[t] = np.stack([sizes[1:], in_scored[1:], on_foreground[1:]], axis=1).astype(np.int64)
    cam_score = classifier(resize_long(image, long_side)) if classifier is not None else None
    return ImageEvidence(
        image_id,
        source,
        bool(positive),
        tuple(image.shape[:2]),
        int(foreground.sum()),
        float(probs.max()),
        cam_score,
        regions,
    )


def holdout_evidence(
    dataset: PreparedDataset,
    items: list[tuple[str, Path | None]],
    model,
    classifier: ClassifierScore | None,
    thresholds: list[float],
    long_side: int,
    device: torch.device,
) -> list[ImageEvidence]:
    """Evidence of the held-out train images (id, pseudo-label path or None for a negative):
    their images, labels and pseudo-labels; no mask is read."""
    evidence = []
    for image_id, path in progress(items, desc="tune held-out", unit="img", leave=False):
        image = dataset.read_image(image_id)
        reference = read_pseudo_label(path, image.shape[:2], dataset.info.num_classes)
        positive = bool(dataset.label_vector(image_id).any())
        evidence.append(
            image_evidence(
                image_id, "holdout", positive, image, reference, model, classifier, thresholds, long_side, device
            )
        )
    return evidence


def tune_evidence(
    dataset: PreparedDataset,
    ids: list[str],
    model,
    classifier: ClassifierScore | None,
    thresholds: list[float],
    long_side: int,
    device: torch.device,
) -> list[ImageEvidence]:
    """Evidence of the tuning split's images against their masks (those without one are skipped)."""
    evidence = []
    for image_id in progress(ids, desc="tune split", unit="img", leave=False):
        image = dataset.read_image(image_id)
        mask = dataset.read_mask(image_id, image.shape[:2])
        if mask is None:
            continue
        positive = bool(dataset.label_vector(image_id).any())
        evidence.append(
            image_evidence(image_id, "tune", positive, image, mask, model, classifier, thresholds, long_side, device)
        )
    return evidence


@dataclass(frozen=True)
class RuleGrid:
    thresholds: tuple[float, ...]
    min_areas: tuple[int, ...]
    image_scores: tuple[str, ...]
    image_thresholds: tuple[float, ...]
    long_side: int


def rule_rows(evidence: list[ImageEvidence], grid: RuleGrid) -> list[dict]:
    """One row per (threshold, min_area, image_score, image_threshold): its scores on each kind
    of evidence (`holdout_`, `tune_`) and on both pooled (no prefix)."""
    if not evidence:
        return []
    positive = np.array([e.positive for e in evidence])
    reference = np.array([e.reference_pixels for e in evidence], np.int64)
    sources = {name: np.array([e.source == name for e in evidence]) for name in SOURCES}
    scores = {kind: np.array([image_score_or_nan(kind, e) for e in evidence]) for kind in grid.image_scores}
    rows = []
    for t, area in itertools.product(grid.thresholds, grid.min_areas):
        kept = [kept_counts(e.regions[t], area_at(area, e.size, grid.long_side)) for e in evidence]
        pixels, scored, overlap = (np.array(column, np.int64) for column in zip(*kept))
        for kind, tau in itertools.product(grid.image_scores, grid.image_thresholds):
            emptied = scores[kind] < tau if tau > 0 else np.zeros(len(evidence), bool)
            nonempty = (pixels > 0) & ~emptied
            tp = np.where(emptied, 0, overlap)
            fp = np.where(emptied, 0, scored - overlap)
            fn = reference - tp
            denominator = 2 * tp + fp + fn
            dice = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 1.0)
            row = {"seg.threshold": t, "seg.min_area": area, "seg.image_score": kind, "seg.image_threshold": tau}
            row.update(rule_scores(nonempty, positive, dice, np.ones(len(evidence), bool), ""))
            for name, members in sources.items():
                if members.any():
                    row.update(rule_scores(nonempty, positive, dice, members, f"{name}_"))
            rows.append(row)
    return rows


def image_score_or_nan(kind: str, evidence: ImageEvidence) -> float:
    """The image's score of `kind`; nan when it needs a classifier score the image lacks (then no
    image threshold empties it)."""
    if kind != "seg" and evidence.cam_score is None:
        return math.nan
    return image_score(kind, evidence.seg_score, evidence.cam_score)


def kept_counts(regions: np.ndarray, min_pixels: int) -> tuple[int, int, int]:
    """(pixels, scored pixels, reference-foreground pixels) of the regions of at least `min_pixels`."""
    kept = regions[regions[:, 0] >= min_pixels] if min_pixels > 1 else regions
    return tuple(int(v) for v in kept.sum(axis=0)) if len(kept) else (0, 0, 0)


def rule_scores(nonempty: np.ndarray, positive: np.ndarray, dice: np.ndarray, members: np.ndarray, prefix: str):
    """Balanced accuracy of "mask not empty" against the label, Kaggle Dice, non-empty rates."""
    on_negatives = nonempty[members & ~positive]
    on_positives = nonempty[members & positive]
    tnr = 1 - on_negatives.mean() if on_negatives.size else math.nan
    tpr = on_positives.mean() if on_positives.size else math.nan
    rates = [r for r in (tnr, tpr) if not math.isnan(r)]
    return {
        f"{prefix}balanced_accuracy": float(np.mean(rates)) if rates else math.nan,
        f"{prefix}kaggle_dice": float(dice[members].mean()),
        f"{prefix}nonempty_negatives": float(1 - tnr) if not math.isnan(tnr) else math.nan,
        f"{prefix}nonempty_positives": float(tpr),
        f"{prefix}images": int(members.sum()),
    }
