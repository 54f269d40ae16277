"""Joint image/label transforms for training, on uint8 numpy arrays (cheap in loader workers).

IRNet's recipe: random resize so that the long side lies in a range, horizontal flip, then a
random crop padded to a fixed square (padding is ignored: 255 in labels, zeros in images,
and a validity mask says where the image is).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def resize_long(image: np.ndarray, long_side: int, nearest: bool = False) -> np.ndarray:
    """Resize so that max(H, W) == long_side, keeping the aspect ratio."""
    h, w = image.shape[:2]
    return resize_to(image, scaled_size(h, w, long_side / max(h, w)), nearest)


def resize_to(image: np.ndarray, size_hw: tuple[int, int], nearest: bool = False) -> np.ndarray:
    if image.shape[:2] == tuple(size_hw):
        return image
    resample = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(image).resize((size_hw[1], size_hw[0]), resample))


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """(H, W) times `scale`, rounded, at least one pixel each."""
    return max(1, round(height * scale)), max(1, round(width * scale))


def scaled_copies(image: np.ndarray, scales) -> list[np.ndarray]:
    """The image resized to each scale (bilinear, uint8): the host-side half of multi-scale
    inference, done in loader workers so that the main process only feeds the device."""
    height, width = image.shape[:2]
    return [resize_to(image, scaled_size(height, width, scale)) for scale in scales]


def normalize(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float32 3xHxW, ImageNet statistics (what torchvision/smp weights expect)."""
    array = (image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> ImageNet-normalised float (N, 3, H, W), as `normalize` per image.

    For training batches: the loader workers return uint8 (a quarter of the bytes to pin and
    copy) and this does the float work on the device. The result is channels_last in memory
    on CUDA (what the AMP loop wants), plain NCHW elsewhere.
    """
    mean = torch.as_tensor(IMAGENET_MEAN * 255, device=images.device)
    std = torch.as_tensor(IMAGENET_STD * 255, device=images.device)
    x = ((images.float() - mean) / std).permute(0, 3, 1, 2)
    return x.contiguous(memory_format=torch.channels_last if x.is_cuda else torch.contiguous_format)


def uint8_tensor(image: np.ndarray) -> torch.Tensor:
    """A training image out of the loader workers: uint8 (H, W, 3), a quarter of float32's bytes
    to pin and copy; normalize_batch does the float work on the device."""
    image = np.ascontiguousarray(image)
    return torch.from_numpy(image if image.flags.writeable else image.copy())  # PIL's arrays are read-only


def random_crop_box(rng: np.random.Generator, h: int, w: int, crop: int) -> tuple[int, int, int, int]:
    """(src_y, src_x, dst_y, dst_x): where the crop window starts in the image and in the output."""

    def axis(length: int) -> tuple[int, int]:
        if length >= crop:
            return int(rng.integers(0, length - crop + 1)), 0
        return 0, int(rng.integers(0, crop - length + 1))

    sy, dy = axis(h)
    sx, dx = axis(w)
    return sy, sx, dy, dx


def crop_pad(array: np.ndarray, box: tuple[int, int, int, int], crop: int, fill: int) -> np.ndarray:
    sy, sx, dy, dx = box
    out = np.full((crop, crop) + array.shape[2:], fill, dtype=array.dtype)
    part = array[sy : sy + crop - dy, sx : sx + crop - dx]
    out[dy : dy + part.shape[0], dx : dx + part.shape[1]] = part
    return out


def train_augment(
    rng: np.random.Generator,
    image: np.ndarray,
    label: np.ndarray | None,
    long_range: tuple[int, int],
    crop: int,
    ignore_index: int = 255,
):
    """Resize-long in range, flip, pad-crop. Returns (image, label or None, valid mask)."""
    long_side = int(rng.integers(long_range[0], long_range[1] + 1))
    image = resize_long(image, long_side)
    if label is not None:
        label = resize_to(label, image.shape[:2], nearest=True)
    if rng.random() < 0.5:
        image = image[:, ::-1]
        label = label[:, ::-1] if label is not None else None
    box = random_crop_box(rng, image.shape[0], image.shape[1], crop)
    valid = crop_pad(np.ones(image.shape[:2], np.uint8), box, crop, 0)
    image = crop_pad(image, box, crop, 0)
    label = crop_pad(label, box, crop, ignore_index) if label is not None else None
    return image, label, valid
