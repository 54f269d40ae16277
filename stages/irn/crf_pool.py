"""CRF refinement of pseudo-labels in worker processes.

Kept free of torch on purpose: the workers are spawned (forking a process that holds CUDA is
unsafe) and a spawned worker imports the module of the function it runs. Importing the
pseudo-label stage (torch, torchvision, the network) took ~4 s per worker; this module, numpy,
PIL and the CRF take ~0.2 s.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from pathlib import Path

import numpy as np

from data.layout import write_index_png
from data.parallel import ignore_interrupts
from stages.common.crf import crf_prob

log = logging.getLogger("wss.pseudo")


def planes_to_label(planes: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """(1 + K, H, W) background + class planes -> class indices (0 background, keys + 1)."""
    lookup = np.concatenate([[0], np.asarray(keys) + 1]).astype(np.uint8)
    return lookup[planes.argmax(0)]


def refine_and_write(
    image_id: str, image: np.ndarray, planes: np.ndarray, keys: np.ndarray, params, target: Path, palette
) -> str | None:
    """CRF-refined label PNG of one image (runs in a worker process); an error message or None."""
    try:
        probs = planes / planes.sum(0, keepdims=True).clip(1e-5)
        write_index_png(target, planes_to_label(crf_prob(image, probs, params), keys), palette)
        return None
    except Exception as error:
        return f"{image_id}: CRF refinement failed: {type(error).__name__}: {error}"


def one_thread_worker(parent: int | None = None) -> None:
    """Workers share the cores: no threaded numerics inside one (set before any library reads it);
    Ctrl-C is the main process's to handle, and a worker ends with `parent`, the process that
    started the pool (see ignore_interrupts)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    ignore_interrupts(parent=parent)


class CrfPool:
    """Refines pseudo-labels in worker processes while the main process walks the next images.

    At most 2 x workers images wait at a time, so memory stays bounded; `workers=0` refines
    in this process.
    """

    def __init__(self, workers: int):
        self.workers, self.pending, self.errors = workers, [], []
        self.pool = None

    def __enter__(self):
        if self.workers > 0:
            self.pool = multiprocessing.get_context("spawn").Pool(
                self.workers, initializer=one_thread_worker, initargs=(os.getpid(),)
            )
        return self

    def submit(self, *job) -> None:
        if self.pool is None:
            self._record(refine_and_write(*job))
            return
        self.pending.append(self.pool.apply_async(refine_and_write, job))
        while len(self.pending) > 2 * self.workers:
            self._record(self.pending.pop(0).get())

    def _record(self, error: str | None) -> None:
        if error:
            log.warning("pseudo: %s", error)
            self.errors.append(error)

    def finish(self) -> list[str]:
        for result in self.pending:
            self._record(result.get())
        self.pending = []
        return self.errors

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate() if exc[0] else self.pool.close()
            self.pool.join()
        return False
