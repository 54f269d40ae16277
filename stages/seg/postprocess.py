"""The empty-mask rule of binary tasks: when a predicted mask is kept, pruned or emptied.

On SIIM most images have no finding, and the Kaggle metric scores such an image 1 only when its
predicted mask is empty: a segmenter that leaves a few stray pixels on negatives loses most of
the metric there. The winning SIIM solutions decided emptiness with an image-level score and a
minimum area; wss does the same with three inference settings (no retraining):

- `seg.min_area`: connected foreground regions (8-connected) smaller than this many pixels are
  removed. The area is counted at the size the segmenter predicts at (`long_side`, the prepared
  size on SIIM and the synthetic benchmark) and scaled with the image's area elsewhere, so that
  `wss predict` on a full-size DICOM removes the same regions as the stage on the prepared image;
- `seg.image_threshold`: an image whose score is below it gets an empty mask (0: never);
- `seg.image_score`: that score: `seg` the segmenter's largest foreground probability, `cam` the
  stage-1 classifier's probability of the finding, `mean` the mean of the two.

The classifier sees the image as the segmenter does (resized to `long_side`), in the seg stage,
in `wss tune` and in `wss predict` alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from data.errors import WssError
from data.transforms import normalize_batch, uint8_tensor
from stages.cam.classifier import load_cam_net
from stages.common.runtime import autocast

IMAGE_SCORES = ("seg", "cam", "mean")
EIGHT_NEIGHBOURS = np.ones((3, 3), bool)


@dataclass(frozen=True)
class EmptyMaskRule:
    """The rule's three settings; the default changes no mask."""

    min_area: int = 0
    image_threshold: float = 0.0
    image_score: str = "seg"

    def __post_init__(self):
        if self.image_score not in IMAGE_SCORES:
            raise WssError(f"seg.image_score must be one of {', '.join(IMAGE_SCORES)}, got {self.image_score!r}")

    @classmethod
    def of(cls, settings) -> "EmptyMaskRule":
        """The rule of a `seg` config section or of a segmenter model file's metadata (a dict;
        a file written without the rule has none)."""
        get = settings.get if isinstance(settings, dict) else lambda name, default: getattr(settings, name, default)
        return cls(int(get("min_area", 0)), float(get("image_threshold", 0.0)), str(get("image_score", "seg") or "seg"))

    @property
    def active(self) -> bool:
        """Whether it can change a mask."""
        return self.min_area > 0 or self.image_threshold > 0

    @property
    def reads_classifier(self) -> bool:
        """Whether the image score needs the stage-1 classifier."""
        return self.image_score != "seg"

    @property
    def decides_with_classifier(self) -> bool:
        """Whether a mask depends on the classifier (the image score is read only to empty one)."""
        return self.image_threshold > 0 and self.reads_classifier

    def score(self, seg_score: float, cam_score: float | None) -> float:
        """The image's score under `image_score` (a classifier score is needed for cam and mean)."""
        return image_score(self.image_score, seg_score, cam_score)

    def apply(self, mask: np.ndarray, score: float, long_side: int | None) -> np.ndarray:
        """The mask after the rule: empty when `score` is below the image threshold, else without
        its regions smaller than the minimum area (scaled from `long_side` to the mask's size)."""
        if self.image_threshold > 0 and score < self.image_threshold:
            return np.zeros_like(mask)
        return remove_small_regions(mask, area_at(self.min_area, mask.shape, long_side))

    def settings(self) -> dict:
        return {"min_area": self.min_area, "image_threshold": self.image_threshold, "image_score": self.image_score}


def image_score(kind: str, seg_score: float, cam_score: float | None) -> float:
    """`seg`: the segmenter's largest foreground probability; `cam`: the classifier's
    probability; `mean`: their mean."""
    if kind == "seg":
        return float(seg_score)
    if cam_score is None:
        raise WssError(f"seg.image_score: {kind} needs the stage-1 classifier's probability of the image")
    return float(cam_score) if kind == "cam" else (float(seg_score) + float(cam_score)) / 2


def area_at(min_area: int, size: tuple[int, int], long_side: int | None) -> int:
    """`min_area` pixels at the prediction size (long side `long_side`) in pixels of an image of
    `size` (H, W): scaled by the ratio of areas, rounded."""
    if min_area <= 0:
        return 0
    if not long_side:
        return int(min_area)
    return max(1, int(round(min_area * (max(size) / long_side) ** 2)))


def region_sizes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, sizes): the 8-connected foreground regions of a mask numbered from 1 (0 for
    background) and the pixel count of each (sizes[0] is the background's)."""
    labels, count = ndimage.label(np.asarray(mask) > 0, structure=EIGHT_NEIGHBOURS)
    return labels, np.bincount(labels.ravel(), minlength=count + 1)


def remove_small_regions(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """The mask without its 8-connected foreground regions of fewer than `min_pixels` pixels."""
    if min_pixels <= 1 or not np.any(mask):
        return mask
    labels, sizes = region_sizes(mask)
    small = sizes < min_pixels
    small[0] = False
    if not small.any():
        return mask
    pruned = np.array(mask, copy=True)
    pruned[small[labels]] = 0
    return pruned


class ClassifierScore:
    """The stage-1 classifier of a cam artifact, as `seg.image_score` cam / mean reads it: the
    sigmoid probability of the first class (the binary task's one finding) for a whole image."""

    def __init__(self, cam_artifact: Path, device: torch.device):
        self.device = device
        self.model, _, classes = load_cam_net(Path(cam_artifact), device)
        if len(classes) != 1:
            raise WssError(
                f"seg.image_score: cam reads a one-class classifier (a binary task); {cam_artifact} has {len(classes)}"
            )

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> float:
        """The probability for uint8 (H, W, 3) `image` (already resized to the prediction size)."""
        x = normalize_batch(uint8_tensor(image)[None].to(self.device))
        with autocast(self.device):
            logits = self.model(x)["logits"].float()
        return float(torch.sigmoid(logits)[0, 0])
