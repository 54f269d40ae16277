"""Where and how a stage runs: device, seeding, worker counts."""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from data.datasets import first_item
from data.workers import loader_worker_init


def resolve_device(name: str) -> torch.device:
    """The device of `run.device`; under torchrun on GPUs, this process's own GPU."""
    from stages.common.distributed import local_device

    if name == "auto":
        return local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from data.errors import WssError

        raise WssError(f"run.device is {name!r} but no CUDA GPU is available (use run.device=cpu or auto)")
    return local_device(device)


def worker_count(requested: int) -> int:
    """-1 means one per core (at most 8); 0 means work in the main process."""
    if requested >= 0:
        return requested
    return max(1, min(8, len(os.sched_getaffinity(0))))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op elsewhere (CPU bf16 is slower than fp32 on most CPUs)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def image_loader(dataset: Dataset, workers: int) -> DataLoader:
    """Items one at a time, numpy arrays kept, read in `workers` processes (0: in this one)
    that end with this process even if it is killed (data.workers)."""
    return DataLoader(
        dataset,
        batch_size=1,
        collate_fn=first_item,
        num_workers=workers,
        worker_init_fn=loader_worker_init() if workers else None,
    )


def progress(loader: DataLoader, **options) -> tqdm:
    """A progress bar over one pass of `loader`.

    Given the loader itself, tqdm.auto's bar calls iter() on it when it is made and again when
    it is iterated: two sets of worker processes, the first decoding images that nobody reads
    (twice the memory for a large image). It gets the one iterator instead."""
    return tqdm(iter(loader), total=len(loader), **options)
