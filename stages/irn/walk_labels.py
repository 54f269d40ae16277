"""From the walked CAMs of one image to its pseudo-label (IRNet's rule), on the walk's device.

`label_planes` / `walk_to_label` give numpy arrays (the per-image path, and any caller that
walks one image: `random_walk` then `walk_to_label`); `label_planes_tensor` /
`planes_to_label_tensor` keep them on the device (stages/irn/resident.py). Both are the same
computation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from stages.cam.infer import CAM_STRIDE
from stages.irn.crf_pool import planes_to_label


def label_planes_tensor(walked: torch.Tensor, size: tuple[int, int], bg_threshold: float) -> torch.Tensor:
    """(1 + K, H, W) on the walk's device: the background plane at `bg_threshold` and the walked
    CAMs (K, h, w) upsampled x4, cropped to `size` and divided by their overall maximum."""
    up = F.interpolate(walked[None].float(), scale_factor=CAM_STRIDE, mode="bilinear", align_corners=False)[0]
    up = up[:, : size[0], : size[1]]
    up = up / up.max().clamp_min(1e-5)
    return torch.cat([torch.full((1, *size), bg_threshold, dtype=up.dtype, device=up.device), up])


def label_planes(walked: torch.Tensor, size: tuple[int, int], bg_threshold: float) -> np.ndarray:
    """(1 + K, H, W): the background plane and the normalised walked CAMs at full resolution."""
    return label_planes_tensor(walked, size, bg_threshold).cpu().numpy()


def planes_to_label_tensor(planes: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(1 + K, H, W) background + class planes -> class indices uint8 (0 background, keys + 1):
    `planes_to_label` on the planes' device (argmax takes the first maximum, as numpy's)."""
    lookup = torch.cat([keys.new_zeros(1), keys + 1]).to(torch.uint8)
    return lookup[planes.argmax(dim=0)]


def walk_to_label(walked: torch.Tensor, keys: np.ndarray, size: tuple[int, int], bg_threshold: float) -> np.ndarray:
    """Walked CAMs (K, h, w) at stride 4 -> class-index label (H, W), IRNet's rule.

    Upsample x4 and crop, divide by the overall maximum, add a constant background plane at
    `bg_threshold`, take the argmax over background + the labelled classes only.
    """
    return planes_to_label(label_planes(walked, size, bg_threshold), keys)


def fit_edge(edge: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The boundary map on the CAM grid (they agree for any image size; this guards odd cases)."""
    if tuple(edge.shape) == tuple(shape):
        return edge
    return F.interpolate(edge[None, None], size=shape, mode="bilinear", align_corners=False)[0, 0]


def refine_probabilities(planes: torch.Tensor) -> torch.Tensor:
    """The label planes as the probabilities the refining CRF takes (each pixel's planes over
    their sum), as stages/irn/crf_pool.py computes them."""
    return planes / planes.sum(dim=0, keepdim=True).clamp_min(1e-5)
