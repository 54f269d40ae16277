"""Work fanned out over worker processes, with a progress bar: the preparers' images, the irn
stage's seeds, the CRF workers' start."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

from data.workers import end_with_parent


def ignore_interrupts(then: Callable[[], None] | None = None, parent: int | None = None) -> None:
    """Pool worker start: Ctrl-C reaches the whole process group, and a worker interrupted while
    it holds the pool's queue lock leaves the main process hanging in terminate(). Workers ignore
    it; the main process gets KeyboardInterrupt and terminates them. The worker also ends with
    `parent`, the process that started the pool (see data.workers), should that be killed
    before it can terminate them. Then runs `then`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    end_with_parent(parent)
    if then is not None:
        then()


def parallel_map(
    function: Callable[[Any], Any],
    tasks: list,
    workers: int = 1,
    progress: bool = True,
    description: str = "",
    unit: str = "img",
    start_method: str | None = None,
    initializer: Callable[[], None] | None = None,
) -> Iterator[Any]:
    """Results of ``function`` over ``tasks`` (in any order) with a progress bar.

    One worker runs in this process. Several use a process pool whose workers take small
    chunks from an iterator, so memory holds a few images per worker whatever the dataset
    size; results should be small (ids and messages, never pixels). `start_method="spawn"`
    is for functions that use torch: a forked child of a process that ran OpenMP can hang;
    `initializer` runs once in each worker process (e.g. to limit its threads).
    """
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc=description, unit=unit, disable=not progress, dynamic_ncols=True, smoothing=0.05)
    try:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                yield function(task)
                bar.update()
            return
        chunk = max(1, min(16, len(tasks) // (workers * 8)))
        context = multiprocessing.get_context(start_method)
        with context.Pool(
            processes=workers, maxtasksperchild=2000, initializer=ignore_interrupts, initargs=(initializer, os.getpid())
        ) as pool:
            for result in pool.imap_unordered(function, tasks, chunksize=chunk):
                yield result
                bar.update()
    finally:
        bar.close()
