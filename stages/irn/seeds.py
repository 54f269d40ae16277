"""Seeds (IRNet's "IR labels"): confident foreground, confident background, and ignored pixels.

A CAM is only trusted where it is clearly high (foreground) or clearly low (background); the
band between the two thresholds is left to the IRN to decide (255 = ignored). Each of the two
hard maps is snapped to image edges by the label CRF before they are combined.
"""

from __future__ import annotations

import numpy as np

from stages.common.crf import CrfParams, crf_label

IGNORE = 255


def _confident_labels(
    cams: np.ndarray, label_of: np.ndarray, threshold: float, image_rgb: np.ndarray | None, crf: CrfParams | None
) -> np.ndarray:
    """Argmax over (a constant background plane at `threshold`, the CAMs), CRF, then 0/k+1 labels."""
    with_background = np.concatenate([np.full((1,) + cams.shape[1:], threshold, dtype=cams.dtype), cams])
    index = with_background.argmax(axis=0)  # ties go to the background plane
    if crf is not None:
        index = crf_label(image_rgb, index, n_labels=len(label_of), params=crf)
    return label_of[index]


def make_seeds(
    cams_fullres: np.ndarray,
    keys: np.ndarray,
    image_rgb: np.ndarray | None,
    fg_threshold: float = 0.30,
    bg_threshold: float = 0.05,
    crf: CrfParams | None = CrfParams(),
) -> np.ndarray:
    """Seed labels (H, W) uint8 from CAMs at image resolution.

    cams_fullres: (K, H, W) CAMs in [0, 1] of the image's labelled classes; keys: (K,) their
    0-based foreground class indices. Output: 0 background, k + 1 for class k, 255 ignored:
    foreground where the CAM beats `fg_threshold`, background where every CAM stays at or below
    `bg_threshold`, ignored in between (IRNet's rule). `crf=None` skips the CRF (then
    `image_rgb` may be None). K = 0 (no labelled class) gives all background.
    """
    cams = np.asarray(cams_fullres, dtype=np.float32)
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    if cams.ndim != 3 or cams.shape[0] != keys.size:
        raise ValueError(f"cams must be (K, H, W) with K = len(keys) = {keys.size}, got {cams.shape}")
    if keys.size == 0:
        return np.zeros(cams.shape[1:], dtype=np.uint8)
    if keys.min() < 0 or keys.max() + 1 >= IGNORE:
        raise ValueError(f"class indices must lie in [0, {IGNORE - 1}), got {keys.tolist()}")
    label_of = np.concatenate([[0], keys + 1])  # argmax index -> seed label
    fg_conf = _confident_labels(cams, label_of, fg_threshold, image_rgb, crf)
    bg_conf = _confident_labels(cams, label_of, bg_threshold, image_rgb, crf)
    seeds = fg_conf.copy()
    seeds[fg_conf == 0] = IGNORE
    seeds[(fg_conf == 0) & (bg_conf == 0)] = 0
    return seeds.astype(np.uint8)
