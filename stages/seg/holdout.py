"""The held-out part of the train split under `seg.checkpoint: pseudo_holdout`: the images the
segmenter never trains on. The seg stage chooses its epoch on their pseudo-labels, and `wss tune`
chooses the empty-mask rule on their image labels, so both must draw the same images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data.errors import WssError
from data.layout import PreparedDataset
from stages.seg.data import pseudo_label_items


def split_holdout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded random `fraction` of the items (at least one) is held out."""
    if not 0 < fraction < 1:
        raise WssError(f"seg.holdout_fraction must lie between 0 and 1, got {fraction}")
    if len(items) < 2:
        raise WssError(f"seg.checkpoint pseudo_holdout needs at least 2 images with pseudo-labels, got {len(items)}")
    count = min(len(items) - 1, max(1, round(fraction * len(items))))
    order = np.random.default_rng(seed).permutation(len(items))
    held = set(order[:count].tolist())
    return ([it for i, it in enumerate(items) if i not in held], [it for i, it in enumerate(items) if i in held])


def held_out_items(
    dataset: PreparedDataset, train_ids: list[str], label_dir: Path, fraction: float, seed: int
) -> list[tuple[str, Path | None]]:
    """(id, pseudo-label path or None) of the train images the seg stage held out from training
    under `checkpoint: pseudo_holdout` with these settings (the same items, the same draw)."""
    items, _ = pseudo_label_items(dataset, train_ids, label_dir)
    return split_holdout(items, fraction, seed)[1]
