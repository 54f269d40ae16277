"""CAM inference: multi-scale + flip, ReLU, per-class max-normalised, stored at stride 4.

Only the image's labelled classes are computed and stored (their indices are the `keys`).
`extract="gradcam++"` replaces the method's own maps by Grad-CAM++ on its features.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from data.datasets import MultiScaleImageDataset
from data.errors import WssError
from data.transforms import normalize_batch, scaled_copies, uint8_tensor
from stages.common.runtime import image_loader, progress

CAM_STRIDE = 4


def strided_size(height: int, width: int, stride: int = CAM_STRIDE) -> tuple[int, int]:
    return math.ceil(height / stride), math.ceil(width / stride)


def gradcam_pp_maps(model, x: torch.Tensor, keys: list[int]) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018) of the classes `keys` for a batch x: (B, K, h, w).

    With S the class score and A the feature maps, alpha = g^2 / (2 g^2 + sum(A) g^3) where
    g = dS/dA (the exponential-score form), and the map is ReLU(sum_k w_k A_k) with
    w_k = sum(alpha * ReLU(g)) over space.
    """
    with torch.no_grad():  # the trunk's activations are not needed for these gradients
        features = model.features(x)
    features = features.detach().float().requires_grad_(True)
    with torch.enable_grad():
        logits = model.classify(features)
        maps = []
        for key in keys:
            (grads,) = torch.autograd.grad(logits[:, key].sum(), features, retain_graph=True)
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


def stride4_grid(
    map_size: tuple[int, int], stride: int, scaled_size: tuple[int, int], image_size: tuple[int, int], flipped: bool
) -> torch.Tensor:
    """grid_sample coordinates (1, H4, W4, 2) that read a map of the scaled image at the centres
    of the image's stride-4 cells.

    Cell i of the stored CAM covers image pixels [4i, 4i + 4) (upsample_cam's convention), so
    its centre is 4i + 2; that point is mapped into the scaled image (mirrored for the flipped
    copy). The network's cell n of a stride-s map is centred on pixel s n, i.e. s n + 0.5 in
    continuous coordinates (see stages.common.backbones.upsample_cells): a point at continuous
    y reads the map at cell position (y - 0.5) / s. Taking cell n to cover [s n, s n + s)
    instead would shift every CAM (s - 1) / 2 pixels down and right: 7.5 px at stride 16.
    """
    (map_h, map_w), (scaled_h, scaled_w), (height, width) = map_size, scaled_size, image_size
    out_h, out_w = strided_size(height, width)
    y = (torch.arange(out_h, dtype=torch.float64) + 0.5) * CAM_STRIDE * scaled_h / height
    x = (torch.arange(out_w, dtype=torch.float64) + 0.5) * CAM_STRIDE * scaled_w / width
    if flipped:
        x = scaled_w - x
    cell_y, cell_x = (y - 0.5) / stride, (x - 0.5) / stride
    y_norm = (2 * cell_y + 1) / map_h - 1  # grid_sample's align_corners=False: cell n at (2n + 1) / size - 1
    x_norm = (2 * cell_x + 1) / map_w - 1
    grid = torch.stack(torch.meshgrid(x_norm, y_norm, indexing="xy"), dim=-1)
    return grid[None].float()


def to_stride4(
    maps: torch.Tensor, stride: int, scaled_size: tuple[int, int], image_size: tuple[int, int], flipped: bool
) -> torch.Tensor:
    """(B, K, h, w) maps of the scaled image -> (B, K, ceil(H/4), ceil(W/4)), bilinear."""
    grid = stride4_grid(tuple(maps.shape[-2:]), stride, scaled_size, image_size, flipped)
    grid = grid.to(maps.device).expand(maps.shape[0], -1, -1, -1)
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)


def multiscale_cam(
    model,
    image: np.ndarray,
    keys: list[int],
    scales: list[float],
    flip: bool,
    device: torch.device,
    extract: str = "cam",
) -> np.ndarray:
    """(K, ceil(H/4), ceil(W/4)) float32 in [0, 1] for one uint8 (H, W, 3) image: see scaled_cam."""
    scaled = [uint8_tensor(copy) for copy in scaled_copies(image, scales)]
    return scaled_cam(model, scaled, image.shape[:2], keys, flip, device, extract)


@torch.no_grad()
def scaled_cam(
    model,
    scaled: list[torch.Tensor],
    image_size: tuple[int, int],
    keys: list[int],
    flip: bool,
    device: torch.device,
    extract: str = "cam",
) -> np.ndarray:
    """(K, ceil(H/4), ceil(W/4)) float32 in [0, 1]: the sum over the scaled copies of the image
    (uint8 (h, w, 3) tensors, see data.transforms.scaled_copies) and their flips, each resampled
    onto the image's stride-4 grid, then divided per class by its maximum. The float work
    (normalising, flipping) happens on the device.

    `model.cam_stride` is the stride of its maps (and of the features Grad-CAM++ reads).
    """
    height, width = image_size
    out_size = strided_size(height, width)
    if not keys:
        return np.zeros((0, *out_size), np.float32)
    total = torch.zeros((len(keys), *out_size), device=device)
    for copy in scaled:
        size = tuple(copy.shape[:2])
        x = normalize_batch(copy[None].to(device, non_blocking=True))
        if flip:
            x = torch.cat([x, x.flip(-1)])
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            maps = class_maps(model, x, keys, extract).float()
        total += to_stride4(maps[:1], model.cam_stride, size, (height, width), flipped=False)[0]
        if flip:
            total += to_stride4(maps[1:], model.cam_stride, size, (height, width), flipped=True)[0]
    total /= total.flatten(1).amax(dim=1).clamp_min(1e-5)[:, None, None]
    return total.cpu().numpy()


def scaled_image_loader(dataset, ids: list[str], scales: list[float], workers: int) -> DataLoader:
    """Items of data.datasets.MultiScaleImageDataset, one image at a time, resized in `workers`
    processes (the PIL resizing of four scales would otherwise keep the GPU waiting)."""
    return image_loader(MultiScaleImageDataset(dataset, ids, scales), workers)


def write_cam_files(
    model,
    section,
    dataset,
    ids: list[str],
    cam_dir: Path,
    device: torch.device,
    workers: int,
    keys_of=None,
    desc: str = "cam inference",
    leave: bool = True,
) -> list[str]:
    """cams/<id>.npz of `ids` with `section`'s scales, flip and extract; returns the errors of
    the images that could not be read (the others are written). A file already there is kept:
    each is written whole, so one a resumed run finds is complete. `keys_of(id)` picks the
    classes (default: the image's labels)."""
    cam_dir.mkdir(parents=True, exist_ok=True)
    todo = [i for i in ids if not (cam_dir / f"{i}.npz").is_file()]
    failures = []
    for item in progress(
        scaled_image_loader(dataset, todo, section.scales, workers), desc=desc, unit="img", leave=leave
    ):
        if "error" in item:
            failures.append(item["error"])
            continue
        image_id = item["id"]
        keys = keys_of(image_id) if keys_of else [int(k) for k in np.nonzero(dataset.label_vector(image_id))[0]]
        cam = scaled_cam(model, item["scaled"], item["size"], keys, section.flip, device, section.extract)
        save_cam(cam_dir / f"{image_id}.npz", cam, keys, item["size"])
    return failures


def save_cam(path: Path, cam: np.ndarray, keys: list[int], size: tuple[int, int]) -> None:
    """cams/<id>.npz: float16 stride-4 maps, the class indices they belong to, the full size."""
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez_compressed(
        tmp, cam=cam.astype(np.float16), keys=np.asarray(keys, np.int64), size=np.asarray(size, np.int64)
    )
    tmp.replace(path)


class CamFileError(WssError):
    """A cams/<id>.npz that cannot be read (cut short, overwritten, not a CAM file)."""


def load_cam(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    try:
        with np.load(path) as data:
            return data["cam"].astype(np.float32), data["keys"], tuple(int(v) for v in data["size"])
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        raise CamFileError(f"unreadable CAM file {path} ({type(error).__name__}: {error})") from None


def upsample_cam(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Stride-4 maps -> full resolution (bilinear), cropped to the image size."""
    if cam.shape[0] == 0:
        return np.zeros((0, *size), np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float32))[None]
    up = F.interpolate(
        tensor, size=(cam.shape[1] * CAM_STRIDE, cam.shape[2] * CAM_STRIDE), mode="bilinear", align_corners=False
    )[0]
    return up[:, : size[0], : size[1]].numpy()


def cam_to_label(cam_full: np.ndarray, keys: np.ndarray, bg_threshold: float) -> np.ndarray:
    """Argmax over a constant background plane and the labelled classes -> class indices."""
    height, width = cam_full.shape[1:]
    planes = np.concatenate([np.full((1, height, width), bg_threshold, np.float32), cam_full])
    lookup = np.concatenate([[0], np.asarray(keys) + 1]).astype(np.uint8)
    return lookup[planes.argmax(0)]
