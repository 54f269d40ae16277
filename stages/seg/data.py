"""What the segmenter trains on: images with their pseudo-labels (never the ground truth)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data.datasets import AugmentedDataset
from data.layout import IGNORE_INDEX, PreparedDataset, read_label_map
from data.transforms import train_augment, uint8_tensor


def pseudo_label_items(
    dataset: PreparedDataset, ids: list[str], label_dir: Path
) -> tuple[list[tuple[str, Path | None]], list[str]]:
    """(id, pseudo-label path or None) to train on, and the ids left out with the reason.

    None means "all background": in a binary dataset an image labelled negative has no
    pseudo-label because there is nothing to find in it. Any other image without one, or whose
    pseudo-label does not decode or fit its image, is skipped. An image with an uncertain class
    is not trained on (its pseudo-label is made from the certain classes' CAMs alone) and not
    listed either: it is no failure.
    """
    items, failures = [], []
    for image_id in ids:
        if dataset.has_uncertain(image_id):
            continue
        path = label_dir / f"{image_id}.png"
        if path.is_file():
            problem = dataset.label_problem(image_id, path)
            if problem is None:
                items.append((image_id, path))
            else:
                failures.append(f"{problem}; skipped")
        elif dataset.task == "binary" and not dataset.label_vector(image_id).any():
            items.append((image_id, None))
        else:
            failures.append(f"{image_id}: no pseudo-label at {path}; skipped")
    return items, failures


def read_pseudo_label(path: Path | None, shape: tuple[int, int], num_classes: int) -> np.ndarray:
    """Class indices (0..num_classes, 255) of a pseudo-label, all zeros for None; checked values."""
    if path is None:
        return np.zeros(shape, np.uint8)
    return read_label_map(path, shape, num_classes)


class PseudoLabelDataset(AugmentedDataset):
    """Augmented crops (resize-long in range, flip, pad-crop) with their pseudo-label crops.

    Items are uint8: "image" (H, W, 3) for data.transforms.normalize_batch, "label" (H, W) class
    indices / 255. Seeded per (seed, epoch, index) like every AugmentedDataset.

    `on_new_epoch(epoch)` is called when the training loop starts epoch `epoch` (> 0), i.e.
    right after epoch `epoch - 1` was trained and checkpointed: the stage hooks the held-out
    scoring there. It is dropped when the dataset is pickled into loader workers, and `item`
    (what those workers call) never fires it.
    """

    def __init__(
        self, dataset: PreparedDataset, items: list[tuple[str, Path | None]], long_range, crop: int, seed: int = 0
    ):
        self.items = list(items)
        super().__init__(dataset, [image_id for image_id, _ in self.items], long_range, crop, seed)
        self.on_new_epoch = None

    def set_epoch(self, epoch: int) -> None:
        if self.on_new_epoch is not None and epoch > 0:
            self.on_new_epoch(epoch)
        super().set_epoch(epoch)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "on_new_epoch": None}

    def item(self, index: int, epoch: int) -> dict:
        rng = self.rng(index, epoch)
        image_id, path = self.items[index]
        image = self.dataset.read_image(image_id)
        label = read_pseudo_label(path, image.shape[:2], self.dataset.info.num_classes)
        image, label, _ = train_augment(rng, image, label, self.long_range, self.crop, IGNORE_INDEX)
        return {"image": uint8_tensor(image), "label": torch.from_numpy(label)}
