"""Worker processes that end with the command that started them.

A worker normally ends when its pool or loader is shut down: on success, on an error (the pool's
`with` block, the loader's shutdown) and on Ctrl-C (the main process gets KeyboardInterrupt and
shuts them down). What remains is the main process dying without a chance to do so: killed
(SIGKILL, the kernel's out-of-memory killer). A data-loader worker then waits forever to hand over
an image through a pipe that its sibling workers still hold open, an orphan holding its memory
(seen after `wss predict` on a 13000 x 13000 image was killed: ~950 MB, 45 minutes later).

`end_with_parent` makes the kernel send the worker SIGKILL when its parent ends
(PR_SET_PDEATHSIG, Linux): immediate, and effective whatever the worker is doing, blocked in a
pipe write or deep in a decoder. It is chosen over a thread in each worker that polls its
parent, which can only act between Python bytecodes and adds a thread to every worker; that
thread is the fallback where prctl is not available. The kernel's notion of "parent" is the
thread that started the worker: wss starts its pools and loaders from the main thread, and the
workers that multiprocessing.Pool starts as replacements from its own handler thread end
when that thread ends, which is when the pool is terminated.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # linux/prctl.h
PARENT_POLL_SECONDS = 1.0


def end_with_parent(parent: int | None = None) -> None:
    """Call at the start of a worker process: it is killed when its parent process ends.
    `parent` is the pid of the process that started the worker, taken before the start (the
    worker exits at once if that process is already gone); None: the current parent."""
    parent = os.getppid() if parent is None else parent
    if not (sys.platform.startswith("linux") and _set_parent_death_signal(signal.SIGKILL)):
        _watch_parent(parent)
    if os.getppid() != parent:  # the parent ended before the signal was armed
        os._exit(1)


def loader_worker_init() -> Callable[[int], None]:
    """A `worker_init_fn` for torch DataLoaders started by this process: their workers end with
    it, and leave Ctrl-C to it.

    Ctrl-C reaches the whole process group. A loader worker that takes it ends on its own, and
    at its exit waits for the image it was handing over to be read, which the interrupted main
    process never does: the loader's shutdown then waits 5 s per worker before terminating it.
    A worker that ignores it is told to stop by that shutdown and ends at once."""
    return functools.partial(_start_loader_worker, os.getpid())


def _start_loader_worker(parent: int, worker_id: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    end_with_parent(parent)


def _set_parent_death_signal(sig: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    """Fallback: a daemon thread that ends this process once its parent is gone."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="wss-parent-watch", daemon=True).start()
