"""torch Datasets over a prepared dataset: images (and training targets) streamed from disk."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.errors import WssError
from data.layout import IGNORE_INDEX, PreparedDataset, read_index_png
from data.transforms import scaled_copies, train_augment, uint8_tensor
from data.workers import loader_worker_init


class AugmentedDataset(Dataset):
    """Training crops whose augmentation is seeded by (seed, epoch, index): reproducible, and a
    resumed run sees the same batches.

    `item(index, epoch)` is the item as augmented in `epoch`: the training loop's persistent
    loader workers call it with the epoch each index travels with (their copy of the dataset
    never sees `set_epoch`). `dataset[index]` is `item(index, <the epoch set last>)`.
    Images are uint8 (H, W, 3), normalised on the device by data.transforms.normalize_batch.
    """

    def __init__(self, dataset: PreparedDataset, ids: list[str], long_range, crop: int, seed: int = 0):
        self.dataset, self.ids = dataset, list(ids)
        self.long_range, self.crop, self.seed, self.epoch = tuple(long_range), crop, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return self.item(index, self.epoch)

    def item(self, index: int, epoch: int) -> dict:
        raise NotImplementedError

    def rng(self, index: int, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, index])


class ClassificationDataset(AugmentedDataset):
    """Augmented crops with the image-level label vector (stage 1): 1 present, 0 absent, -1 where
    the dataset marks the class uncertain (the loss leaves those entries out)."""

    def item(self, index: int, epoch: int) -> dict:
        image_id = self.ids[index]
        image, _, _ = train_augment(
            self.rng(index, epoch), self.dataset.read_image(image_id), None, self.long_range, self.crop
        )
        return {"image": uint8_tensor(image), "label": torch.from_numpy(self.dataset.training_label_vector(image_id))}


class LabelMapDataset(AugmentedDataset):
    """Augmented crops with a per-pixel training target read from `label_dir/<id>.png`.

    Used for the IRN (seeds) and the segmenter (pseudo-labels); never for ground truth.
    `label_stride` > 1 returns the target subsampled at that stride (IRN: 4).
    """

    def __init__(
        self,
        dataset: PreparedDataset,
        ids: list[str],
        label_dir: Path,
        long_range,
        crop: int,
        seed: int = 0,
        label_stride: int = 1,
    ):
        super().__init__(dataset, ids, long_range, crop, seed)
        self.label_dir, self.label_stride = Path(label_dir), label_stride

    def item(self, index: int, epoch: int) -> dict:
        image_id = self.ids[index]
        label = read_index_png(self.label_dir / f"{image_id}.png")
        image, label, _ = train_augment(
            self.rng(index, epoch), self.dataset.read_image(image_id), label, self.long_range, self.crop, IGNORE_INDEX
        )
        if self.label_stride > 1:
            s = self.label_stride  # nearest neighbour: the centre pixel of every s x s cell
            label = label[s // 2 :: s, s // 2 :: s]
        return {"image": uint8_tensor(image), "label": torch.from_numpy(label.astype(np.int64))}


class ImageDataset(Dataset):
    """Whole images, unaugmented, one at a time (inference). Returns the uint8 image and its id."""

    def __init__(self, dataset: PreparedDataset, ids: list[str]):
        self.dataset, self.ids = dataset, list(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        return {"id": image_id, "image": self.dataset.read_image(image_id)}


class SafeImageDataset(ImageDataset):
    """ImageDataset where an unreadable image becomes {"id", "error"} instead of stopping the loop."""

    def __getitem__(self, index: int) -> dict:
        try:
            return super().__getitem__(index)
        except WssError as error:
            return {"id": self.ids[index], "error": str(error)}


class MultiScaleImageDataset(SafeImageDataset):
    """Whole images resized to each inference scale in the loader workers: {"id", "size" (H, W),
    "scaled": uint8 (h, w, 3) tensors, one per scale}, or {"id", "error"}."""

    def __init__(self, dataset: PreparedDataset, ids: list[str], scales):
        super().__init__(dataset, ids)
        self.scales = list(scales)

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        if "error" in item:
            return item
        image = item["image"]
        return {
            "id": item["id"],
            "size": tuple(image.shape[:2]),
            "scaled": [uint8_tensor(copy) for copy in scaled_copies(image, self.scales)],
        }


def stack_scaled(items: list[dict]) -> dict:
    """collate_fn of MultiScaleImageDataset in batches: {"errors": the error items, "groups": one
    {"ids", "size", "scaled": uint8 (B, h, w, 3) tensors, one per scale} per image size}. The
    batches are made of one size (same_size_batches); an image whose file changed size since its
    header was read makes a group of its own instead of failing the batch."""
    groups: dict[tuple[int, int], list[dict]] = {}
    for item in items:
        if "error" not in item:
            groups.setdefault(item["size"], []).append(item)
    return {
        "errors": [item for item in items if "error" in item],
        "groups": [
            {
                "ids": [item["id"] for item in group],
                "size": size,
                "scaled": [torch.stack(copies) for copies in zip(*(item["scaled"] for item in group))],
            }
            for size, group in groups.items()
        ],
    }


def same_size_batches(
    sizes: Sequence[tuple[int, int] | None], images_per_batch: Callable[[tuple[int, int]], int]
) -> list[list[int]]:
    """The indices of `sizes` in batches of one image size (H, W) each, at most
    `images_per_batch(size)` long, so that a batch is one tensor and costs memory in proportion
    to its pixels. A batch is complete as soon as it is full, so the images of a common size go
    in about their order; what is left of each size comes last. An unknown size (None: a header
    that did not read) is a batch of its own, where the loader reports the image."""
    open_batches: dict[tuple[int, int], list[int]] = {}
    batches = []
    for index, size in enumerate(sizes):
        if size is None:
            batches.append([index])
            continue
        batch = open_batches.setdefault(tuple(size), [])
        batch.append(index)
        if len(batch) >= max(1, images_per_batch(tuple(size))):
            batches.append(open_batches.pop(tuple(size)))
    return batches + list(open_batches.values())


def batch_loader(
    dataset: Dataset, batches: list[list[int]], collate: Callable, workers: int, pin_memory: bool = False
) -> DataLoader:
    """A loader of the given batches of `dataset`, collated (and stacked) in `workers` processes
    (0: in this one) that end with this process even if it is killed (data.workers); `pin_memory`
    for copies to a CUDA device that overlap the computation."""
    return DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate,
        num_workers=workers,
        worker_init_fn=loader_worker_init() if workers else None,
        pin_memory=pin_memory,
    )


def first_item(batch: list[dict]) -> dict:
    """collate_fn for batch size 1 that keeps numpy arrays as they are."""
    return batch[0]
