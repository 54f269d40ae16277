"""Seeds (IRNet's "IR labels"): confident foreground, confident background, and ignored pixels.

A CAM is only trusted where it is clearly high (foreground) or clearly low (background); the
band between the two thresholds is left to the IRN to decide (255 = ignored). Each of the two
hard maps is snapped to image edges by the label CRF before they are combined.

The rule is written once, on tensors (`confident_indices`, `assemble_seeds`), so that the seeds
of `make_seeds` (numpy in and out) and of a pass that keeps them on a device are the same
computation.
"""

from __future__ import annotations

import numpy as np
import torch

from stages.common.crf import CrfParams, crf_labels

IGNORE = 255


def confident_indices(cams: torch.Tensor, fg_threshold: float, bg_threshold: float) -> torch.Tensor:
    """(2, H, W) int64: for each threshold (foreground, background), the argmax over a constant
    background plane at the threshold and the CAMs (K, H, W): 0 background, k + 1 the k-th CAM.
    Ties go to the background plane (argmax takes the first maximum)."""
    planes = torch.empty((1 + cams.shape[0], *cams.shape[1:]), dtype=cams.dtype, device=cams.device)
    planes[1:] = cams
    indices = []
    for threshold in (fg_threshold, bg_threshold):
        planes[0] = threshold
        indices.append(planes.argmax(dim=0))
    return torch.stack(indices)


def assemble_seeds(indices: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Seed labels (H, W) uint8 from the (CRF-snapped) foreground and background indices (2, H, W)
    and the classes `keys` (K,) of the CAMs: k + 1 for class k where the foreground map says so,
    0 where both maps say background, 255 (ignored) where only the background map does."""
    label_of = torch.cat([keys.new_zeros(1), keys + 1])
    fg_conf, bg_conf = label_of[indices[0]], label_of[indices[1]]
    seeds = fg_conf.clone()
    seeds[fg_conf == 0] = IGNORE
    seeds[(fg_conf == 0) & (bg_conf == 0)] = 0
    return seeds.to(torch.uint8)


def check_keys(cams_shape: tuple, keys: np.ndarray) -> np.ndarray:
    """The CAMs' classes as int64 (K,); a ValueError unless there is one per CAM and each
    class's seed label (k + 1) is below 255."""
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    if len(cams_shape) != 3 or cams_shape[0] != keys.size:
        raise ValueError(f"cams must be (K, H, W) with K = len(keys) = {keys.size}, got {cams_shape}")
    if keys.size and (keys.min() < 0 or keys.max() + 1 >= IGNORE):
        raise ValueError(f"class indices must lie in [0, {IGNORE - 1}), got {keys.tolist()}")
    return keys


def make_seeds(
    cams_fullres: np.ndarray,
    keys: np.ndarray,
    image_rgb: np.ndarray | None,
    fg_threshold: float = 0.30,
    bg_threshold: float = 0.05,
    crf: CrfParams | None = CrfParams(),
    device=None,
) -> np.ndarray:
    """Seed labels (H, W) uint8 from CAMs at image resolution.

    cams_fullres: (K, H, W) CAMs in [0, 1] of the image's labelled classes; keys: (K,) their
    0-based foreground class indices. Output: 0 background, k + 1 for class k, 255 ignored:
    foreground where the CAM beats `fg_threshold`, background where every CAM stays at or below
    `bg_threshold`, ignored in between (IRNet's rule). `crf=None` skips the CRF (then
    `image_rgb` may be None); the CRF runs on `crf.backend` (`device`: where the torch backend
    runs), both maps on one lattice. K = 0 (no labelled class) gives all background.
    """
    cams = np.asarray(cams_fullres, dtype=np.float32)
    keys = check_keys(cams.shape, keys)
    if keys.size == 0:
        return np.zeros(cams.shape[1:], dtype=np.uint8)
    indices = confident_indices(torch.from_numpy(cams), fg_threshold, bg_threshold)
    if crf is not None:
        snapped = crf_labels(image_rgb, list(indices.numpy()), keys.size + 1, crf, device=device)
        indices = torch.from_numpy(np.stack(snapped))
    return assemble_seeds(indices, torch.from_numpy(keys)).numpy()
