"""CAM localization against bounding boxes (NIH ChestX-ray14), the chest X-ray papers' metrics,
and the same point localization against masks (every dataset with masks).

Coordinates: boxes are (x, y, w, h) in pixels of the original image, x/y the top-left corner
(``data.nih.Box``); a CAM may have any resolution and is taken to cover the whole image, so
CAM cell (i, j) is the image area [j*W/w, (j+1)*W/w) x [i*H/h, (i+1)*H/h).

- Point localization: a hit when the CAM's maximum (its first argmax) has its cell centre
  inside one of the boxes of that finding (edges included).
- IoBB (ChestX-ray8, Wang et al. 2017: "intersection over the detected B-Box area"):
  ``area(B_pred ∩ B_gt) / area(B_pred)``. Here ``B_pred`` is the bounding box of the largest
  connected component (8-connectivity) of the CAM thresholded at ``cam_threshold`` times its
  maximum, converted to image pixels; against several boxes of the finding the best one counts.
  Wang et al. drew a box around every isolated region; keeping the largest one means that a
  small stray blob inside the box cannot score 1 on its own. A finding-image pair is correct at
  T when IoBB >= T; accuracy = correct pairs / pairs, for each T.
- Aggregation: accuracy per finding over the (image, finding) pairs that have a box, and the
  mean over the findings that have at least one pair.
- Point localization on masks (PYLON's metric with a mask in place of the boxes): a hit when
  the CAM's maximum (its first argmax, the CAM at the mask's size) is a pixel of that class in
  the mask. An ignore pixel (255) is not inside; an image whose mask has no pixel of the class
  is not a pair (there is nothing to point at). Aggregated as the boxes are.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

IOBB_THRESHOLDS = (0.1, 0.25, 0.5, 0.75, 0.9)
BoxXYWH = tuple[float, float, float, float]


@dataclass(frozen=True)
class LocalizationCase:
    """The CAM of one finding on one image, with that finding's boxes on the image."""

    finding: str
    cam: np.ndarray
    boxes: Sequence[BoxXYWH]
    image_size: tuple[int, int]  # (height, width) of the image the boxes refer to


def _scales(cam: np.ndarray, image_size: tuple[int, int]) -> tuple[float, float]:
    """Image pixels per CAM cell along y and x."""
    return image_size[0] / cam.shape[0], image_size[1] / cam.shape[1]


def peak_point(cam: np.ndarray, image_size: tuple[int, int]) -> tuple[float, float]:
    """(x, y) in image pixels of the centre of the CAM's maximum cell."""
    cam = np.asarray(cam)
    if cam.ndim != 2 or cam.size == 0:
        raise ValueError(f"a CAM must be a non-empty 2-D array, got shape {cam.shape}")
    row, col = np.unravel_index(int(np.argmax(cam)), cam.shape)
    sy, sx = _scales(cam, image_size)
    return float((col + 0.5) * sx), float((row + 0.5) * sy)


def point_hit(cam: np.ndarray, boxes: Sequence[BoxXYWH], image_size: tuple[int, int]) -> bool:
    """True when the CAM's maximum falls inside one of the boxes."""
    x, y = peak_point(cam, image_size)
    return any(bx <= x <= bx + bw and by <= y <= by + bh for bx, by, bw, bh in boxes)


def predicted_box(cam: np.ndarray, image_size: tuple[int, int], cam_threshold: float = 0.5) -> BoxXYWH | None:
    """Bounding box (image pixels) of the largest component of cam >= threshold * max(cam);
    None when the CAM has no positive maximum."""
    cam = np.asarray(cam, dtype=np.float64)
    peak = float(cam.max()) if cam.size else 0.0
    if not peak > 0:
        return None
    components, _ = ndimage.label(cam >= cam_threshold * peak, structure=np.ones((3, 3)))
    sizes = np.bincount(components.ravel())[1:]
    largest = int(np.argmax(sizes)) + 1
    rows, cols = np.nonzero(components == largest)
    sy, sx = _scales(cam, image_size)
    x0, y0 = cols.min() * sx, rows.min() * sy
    return float(x0), float(y0), float((cols.max() + 1) * sx - x0), float((rows.max() + 1) * sy - y0)


def iobb(predicted: BoxXYWH, truth: BoxXYWH) -> float:
    """area(predicted ∩ truth) / area(predicted)."""
    px, py, pw, ph = predicted
    tx, ty, tw, th = truth
    overlap_w = max(0.0, min(px + pw, tx + tw) - max(px, tx))
    overlap_h = max(0.0, min(py + ph, ty + th) - max(py, ty))
    area = pw * ph
    return overlap_w * overlap_h / area if area > 0 else 0.0


def best_iobb(
    cam: np.ndarray, boxes: Sequence[BoxXYWH], image_size: tuple[int, int], cam_threshold: float = 0.5
) -> float:
    box = predicted_box(cam, image_size, cam_threshold)
    return max((iobb(box, truth) for truth in boxes), default=0.0) if box is not None else 0.0


def cases_for_image(
    cams: np.ndarray, classes: Sequence[str], boxes: Iterable, image_size: tuple[int, int]
) -> list[LocalizationCase]:
    """One case per finding boxed on this image; ``cams`` is C x h x w in ``classes`` order and
    ``boxes`` are objects with ``finding, x, y, w, h`` (``data.nih.Box``)."""
    by_finding: dict[str, list[BoxXYWH]] = {}
    for box in boxes:
        by_finding.setdefault(box.finding, []).append((box.x, box.y, box.w, box.h))
    return [
        LocalizationCase(finding, np.asarray(cams[classes.index(finding)]), found, image_size)
        for finding, found in sorted(by_finding.items())
    ]


def localization_accuracy(
    cases: Iterable[LocalizationCase], cam_threshold: float = 0.5, iobb_thresholds: Sequence[float] = IOBB_THRESHOLDS
) -> dict[str, float]:
    """Flat metrics: ``point/<finding>``, ``point/mean``, ``iobb@<T>/<finding>``, ``iobb@<T>/mean``
    and ``pairs/<finding>`` (how many image-finding pairs were scored)."""
    hits: dict[str, list[float]] = {}
    scores: dict[str, list[float]] = {}
    for case in cases:
        hits.setdefault(case.finding, []).append(float(point_hit(case.cam, case.boxes, case.image_size)))
        scores.setdefault(case.finding, []).append(best_iobb(case.cam, case.boxes, case.image_size, cam_threshold))
    findings = sorted(hits)
    metrics: dict[str, float] = {f"pairs/{f}": float(len(hits[f])) for f in findings}
    _add_accuracies(metrics, "point", {f: float(np.mean(hits[f])) for f in findings})
    for threshold in iobb_thresholds:
        per_finding = {f: float(np.mean(np.asarray(scores[f]) >= threshold)) for f in findings}
        _add_accuracies(metrics, f"iobb@{threshold:g}", per_finding)
    return metrics


def _add_accuracies(metrics: dict[str, float], name: str, per_finding: dict[str, float]) -> None:
    for finding, value in per_finding.items():
        metrics[f"{name}/{finding}"] = value
    metrics[f"{name}/mean"] = float(np.mean(list(per_finding.values()))) if per_finding else math.nan


IGNORE = 255  # the masks' ignore label (data.layout)


def peak_in_mask(cam: np.ndarray, mask: np.ndarray, label: int) -> bool | None:
    """Whether the maximum of `cam` (H x W, its first argmax) falls on a pixel of `label` in
    `mask` (H x W class indices); None when the mask has no pixel of `label`."""
    cam, mask = np.asarray(cam), np.asarray(mask)
    if cam.shape != mask.shape or cam.size == 0:
        raise ValueError(f"a CAM of shape {cam.shape} cannot be scored against a mask of shape {mask.shape}")
    if label == IGNORE or not (mask == label).any():
        return None
    return bool(mask.flat[int(np.argmax(cam))] == label)


class MaskPointAccuracy:
    """Point localization on masks, image by image: `update` with the full-size CAMs of an
    image's labelled classes and its mask; `metrics` per class and their mean."""

    def __init__(self, classes: Sequence[str]):
        self.classes = list(classes)
        self.hits: dict[str, list[float]] = {}

    def update(self, cams: np.ndarray, keys: Sequence[int], mask: np.ndarray) -> None:
        """`cams` (K x H x W) are the maps of the classes `keys` (indices into `classes`); the
        mask holds background 0 and class index + 1 (binary: 1 the positive class)."""
        for cam, key in zip(cams, keys):
            hit = peak_in_mask(cam, mask, int(key) + 1)
            if hit is not None:
                self.hits.setdefault(self.classes[int(key)], []).append(float(hit))

    def metrics(self, prefix: str) -> dict[str, float]:
        """`<prefix>mask_point/<class>`, `<prefix>mask_point_accuracy` (the mean over the classes
        with a pair) and `<prefix>mask_point_pairs`; nothing when no pair was scored."""
        if not self.hits:
            return {}
        per_class = {name: float(np.mean(found)) for name, found in self.hits.items()}
        metrics = {f"{prefix}mask_point/{name}": value for name, value in per_class.items()}
        metrics[f"{prefix}mask_point_accuracy"] = float(np.mean(list(per_class.values())))
        metrics[f"{prefix}mask_point_pairs"] = float(sum(len(found) for found in self.hits.values()))
        return metrics
