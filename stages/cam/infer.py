"""CAM inference: multi-scale + flip, ReLU, per-class max-normalised, stored at stride 4.

Only the image's labelled classes are computed and stored (their indices are the `keys`).
`extract="gradcam++"` replaces the method's own maps by Grad-CAM++ on its features.
"""

from __future__ import annotations

import math
import threading
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from data.datasets import MultiScaleImageDataset, batch_loader, same_size_batches, stack_scaled
from data.errors import WssError
from data.transforms import normalize_batch, scaled_copies, uint8_tensor
from data.writer import BackgroundWriter

CAM_STRIDE = 4
CAM_BATCH_PIXELS = 2**25  # pixels of one CAM forward pass on a CUDA device: 16 images of 512 px at scale 2, flipped


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


def scaled_cam(
    model,
    scaled: list[torch.Tensor],
    image_size: tuple[int, int],
    keys: list[int],
    flip: bool,
    device: torch.device,
    extract: str = "cam",
) -> np.ndarray:
    """(K, ceil(H/4), ceil(W/4)) float32 in [0, 1] of one image: `scaled_cam_batch` of a batch of
    one, its scaled copies uint8 (h, w, 3) tensors (see data.transforms.scaled_copies)."""
    return scaled_cam_batch(model, [copy[None] for copy in scaled], image_size, [keys], flip, device, extract)[0]


@torch.no_grad()
def scaled_cam_batch(
    model,
    scaled: list[torch.Tensor],
    image_size: tuple[int, int],
    keys: list[list[int]],
    flip: bool,
    device: torch.device,
    extract: str = "cam",
) -> list[np.ndarray]:
    """Per image (K, ceil(H/4), ceil(W/4)) float32 in [0, 1], for a batch of images of one size:
    the sum over the scaled copies of the images (uint8 (B, h, w, 3) tensors, one per scale) and
    their flips, each resampled onto the image's stride-4 grid, then divided per class by its
    maximum. The float work (normalising, flipping) happens on the device.

    `keys[b]` are image b's classes; the network's maps are taken for all the batch's classes
    at once, and each image keeps its own. The images of a batch do not mix (batch statistics
    are frozen in eval mode; Grad-CAM++'s gradients of a summed score are each image's own), so
    an image's maps are those it gets alone, up to the rounding of a batched convolution.
    `model.cam_stride` is the stride of its maps (and of the features Grad-CAM++ reads).
    """
    height, width = image_size
    out_size = strided_size(height, width)
    classes = list(dict.fromkeys(k for image_keys in keys for k in image_keys))
    if not classes:
        return [np.zeros((0, *out_size), np.float32) for _ in keys]
    images = len(keys)
    total = torch.zeros((images, len(classes), *out_size), device=device)
    for copy in scaled:
        size = tuple(copy.shape[1:3])
        x = normalize_batch(copy.to(device, non_blocking=True))
        if flip:
            x = torch.cat([x, x.flip(-1)])
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            maps = class_maps(model, x, classes, extract).float()
        total += to_stride4(maps[:images], model.cam_stride, size, (height, width), flipped=False)
        if flip:
            total += to_stride4(maps[images:], model.cam_stride, size, (height, width), flipped=True)
    cams = []
    for image_total, image_keys in zip(total, keys):
        image_cams = image_total[[classes.index(k) for k in image_keys]]
        image_cams /= image_cams.flatten(1).amax(dim=1).clamp_min(1e-5)[:, None, None]
        cams.append(image_cams.cpu().numpy())
    return cams


def cam_batch_images(image_size: tuple[int, int], scales: list[float], flip: bool, device: torch.device) -> int:
    """Images of one size per batch of CAM inference.

    On a CUDA device as many as keep one forward pass (the largest scale, both flips) within
    CAM_BATCH_PIXELS: a ResNet-50 pass over a few small copies is too short to keep the GPU
    busy, and memory grows with the pixels of the pass. On a CPU one: a batched convolution
    rounds otherwise than the one-image pass, and the CPU path keeps its CAM files (and the
    demo's figures) bit for bit; `write_cam_files(images_per_batch=N)` batches there too.
    """
    if device.type != "cuda":
        return 1
    height, width = image_size
    pass_pixels = (2 if flip else 1) * max(scales) ** 2 * height * width
    return max(1, int(CAM_BATCH_PIXELS // pass_pixels))


def cam_batches(
    dataset, ids: list[str], section, device: torch.device, images_per_batch: int | None = None
) -> list[list[int]]:
    """The indices of `ids` in batches of one image size each (sizes from the image headers):
    `images_per_batch` images, or by default as many as `cam_batch_images` allows (one at a time
    on a CPU, without reading the headers)."""
    if images_per_batch is None and device.type != "cuda":
        return [[index] for index in range(len(ids))]
    return same_size_batches(
        [header_size(dataset, image_id) for image_id in ids],
        lambda size: images_per_batch or cam_batch_images(size, section.scales, section.flip, device),
    )


def header_size(dataset, image_id: str) -> tuple[int, int] | None:
    """(H, W) from the image's header; None when it does not read (the loader reports it)."""
    try:
        return dataset.image_size(image_id)
    except WssError:
        return None


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
    images_per_batch: int | None = None,
) -> list[str]:
    """cams/<id>.npz of `ids` with `section`'s scales, flip and extract; returns the errors of
    the images that could not be read (the others are written). A file already there is kept:
    each is written whole, so one a resumed run finds is complete. `keys_of(id)` picks the
    classes (default: the image's labels).

    Loader workers read and resize the images, in batches of one size (`images_per_batch`
    images; by default `cam_batch_images`: one on a CPU, more on a CUDA device), the device
    computes, and writer threads compress and write the files.
    """
    cam_dir.mkdir(parents=True, exist_ok=True)
    todo = [i for i in ids if not (cam_dir / f"{i}.npz").is_file()]
    loader = batch_loader(
        MultiScaleImageDataset(dataset, todo, section.scales),
        cam_batches(dataset, todo, section, device, images_per_batch),
        stack_scaled,
        workers,
        pin_memory=device.type == "cuda",
    )
    failures = []
    with BackgroundWriter() as writer, tqdm(total=len(todo), desc=desc, unit="img", leave=leave) as bar:
        for batch in iter(loader):  # iter(): one set of workers (see stages.common.runtime.progress)
            failures += [item["error"] for item in batch["errors"]]
            for group in batch["groups"]:
                keys = [
                    keys_of(i) if keys_of else [int(k) for k in np.nonzero(dataset.label_vector(i))[0]]
                    for i in group["ids"]
                ]
                cams = scaled_cam_batch(
                    model, group["scaled"], group["size"], keys, section.flip, device, section.extract
                )
                for image_id, cam, image_keys in zip(group["ids"], cams, keys):
                    writer.submit(image_id, save_cam, cam_dir / f"{image_id}.npz", cam, image_keys, group["size"])
            bar.update(len(batch["errors"]) + sum(len(group["ids"]) for group in batch["groups"]))
        failures += writer.close()
    return failures


def save_cam(path: Path, cam: np.ndarray, keys: list[int], size: tuple[int, int]) -> None:
    """cams/<id>.npz: float16 stride-4 maps, the class indices they belong to, the full size."""
    tmp = path.with_name(f".{path.stem}.tmp{threading.get_ident()}.npz")  # one per writer thread
    np.savez_compressed(
        tmp, cam=cam.astype(np.float16), keys=np.asarray(keys, np.int64), size=np.asarray(size, np.int64)
    )
    tmp.replace(path)


class CamFileError(WssError):
    """A cams/<id>.npz that cannot be read (cut short, overwritten, not a CAM file)."""


def load_cam(path: Path, dtype=np.float32) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(maps (K, h, w) as `dtype` (float16: as stored), keys (K,), image size (H, W))."""
    try:
        with np.load(path) as data:
            return data["cam"].astype(dtype), data["keys"], tuple(int(v) for v in data["size"])
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        raise CamFileError(f"unreadable CAM file {path} ({type(error).__name__}: {error})") from None


def upsample_cam(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Stride-4 maps -> full resolution (bilinear), cropped to the image size."""
    if cam.shape[0] == 0:
        return np.zeros((0, *size), np.float32)
    return upsample_cam_tensor(torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float32)), size).numpy()


def upsample_cam_tensor(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`upsample_cam` of float maps (K, h, w) on their device: bilinear x4 (align_corners=False),
    cropped to the image size."""
    if cam.shape[0] == 0:
        return cam.new_zeros((0, *size))
    up = F.interpolate(
        cam[None], size=(cam.shape[1] * CAM_STRIDE, cam.shape[2] * CAM_STRIDE), mode="bilinear", align_corners=False
    )[0]
    return up[:, : size[0], : size[1]]


def cam_to_label(cam_full: np.ndarray, keys: np.ndarray, bg_threshold: float) -> np.ndarray:
    """Argmax over a constant background plane and the labelled classes -> class indices."""
    height, width = cam_full.shape[1:]
    planes = np.concatenate([np.full((1, height, width), bg_threshold, np.float32), cam_full])
    lookup = np.concatenate([[0], np.asarray(keys) + 1]).astype(np.uint8)
    return lookup[planes.argmax(0)]
