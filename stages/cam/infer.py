"""CAM inference: multi-scale + flip, ReLU, per-class max-normalised, stored at stride 4.

Only the image's labelled classes are computed and stored (their indices are the `keys`).
`extract="gradcam++"` replaces the method's own maps by Grad-CAM++ on its features.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data.transforms import normalize, resize_to

CAM_STRIDE = 4


def strided_size(height: int, width: int, stride: int = CAM_STRIDE) -> tuple[int, int]:
    return math.ceil(height / stride), math.ceil(width / stride)


def gradcam_pp_maps(model, x: torch.Tensor, keys: list[int]) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018) of the classes `keys` for a batch x: (B, K, h, w).

    With S the class score and A the feature maps, alpha = g^2 / (2 g^2 + sum(A) g^3) where
    g = dS/dA (the exponential-score form), and the map is ReLU(sum_k w_k A_k) with
    w_k = sum(alpha * ReLU(g)) over space.
    """
    with torch.enable_grad():
        features = model.features(x).detach().float().requires_grad_(True)
        logits = model.classify(features)
        maps = []
        for key in keys:
            grads, = torch.autograd.grad(logits[:, key].sum(), features, retain_graph=True)
            g2, g3 = grads.pow(2), grads.pow(3)
            denom = 2 * g2 + features.sum(dim=(2, 3), keepdim=True) * g3
            alpha = g2 / torch.where(denom != 0, denom, torch.ones_like(denom))
            weights = (alpha * F.relu(grads)).sum(dim=(2, 3), keepdim=True)
            maps.append(F.relu((weights * features).sum(dim=1)))
    return torch.stack(maps, dim=1).detach()


def class_maps(model, x: torch.Tensor, keys: list[int], extract: str) -> torch.Tensor:
    if extract == "gradcam++":
        return gradcam_pp_maps(model, x, keys)
    return F.relu(model.cam_maps(x)[:, keys].float())


@torch.no_grad()
def multiscale_cam(model, image: np.ndarray, keys: list[int], scales: list[float], flip: bool,
                   device: torch.device, extract: str = "cam") -> np.ndarray:
    """(K, ceil(H/4), ceil(W/4)) float32 in [0, 1]: the sum over scales (and flips), each
    upsampled to stride 4, then divided per class by its maximum."""
    height, width = image.shape[:2]
    out_size = strided_size(height, width)
    if not keys:
        return np.zeros((0, *out_size), np.float32)
    total = torch.zeros((len(keys), *out_size), device=device)
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        x = normalize(resize_to(image, size)).unsqueeze(0)
        if flip:
            x = torch.cat([x, x.flip(-1)])
        x = x.to(device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            maps = class_maps(model, x, keys, extract).float()
        maps = F.interpolate(maps, size=out_size, mode="bilinear", align_corners=False)
        if flip:
            maps = maps[:1] + maps[1:].flip(-1)
        total += maps[0]
    total /= total.flatten(1).amax(dim=1).clamp_min(1e-5)[:, None, None]
    return total.cpu().numpy()


def save_cam(path: Path, cam: np.ndarray, keys: list[int], size: tuple[int, int]) -> None:
    """cams/<id>.npz: float16 stride-4 maps, the class indices they belong to, the full size."""
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez_compressed(tmp, cam=cam.astype(np.float16), keys=np.asarray(keys, np.int64),
                        size=np.asarray(size, np.int64))
    tmp.replace(path)


def load_cam(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    with np.load(path) as data:
        return data["cam"].astype(np.float32), data["keys"], tuple(int(v) for v in data["size"])


def upsample_cam(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Stride-4 maps -> full resolution (bilinear), cropped to the image size."""
    if cam.shape[0] == 0:
        return np.zeros((0, *size), np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float32))[None]
    up = F.interpolate(tensor, size=(cam.shape[1] * CAM_STRIDE, cam.shape[2] * CAM_STRIDE),
                       mode="bilinear", align_corners=False)[0]
    return up[:, :size[0], :size[1]].numpy()


def cam_to_label(cam_full: np.ndarray, keys: np.ndarray, bg_threshold: float) -> np.ndarray:
    """Argmax over a constant background plane and the labelled classes -> class indices."""
    height, width = cam_full.shape[1:]
    planes = np.concatenate([np.full((1, height, width), bg_threshold, np.float32), cam_full])
    lookup = np.concatenate([[0], np.asarray(keys) + 1]).astype(np.uint8)
    return lookup[planes.argmax(0)]
