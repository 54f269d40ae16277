"""Files written in background threads while the caller computes the next ones.

A GPU pass that encodes its own PNGs (zlib) or compressed arrays waits for the CPU at every
image; handed to a writer thread, the encoding overlaps the next batch on the device (zlib and
Pillow's encoders release the GIL). Jobs wait in a bounded queue, so a writer slower than the
device holds back the caller instead of filling memory.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("wss.writer")

_STOP = object()


class BackgroundWriter:
    """Runs `submit`ted jobs (callables that write files) in `threads` threads, in order per thread.

    A job that raises an OSError (a full disk, a folder without write permission) stops the
    work: the error is raised again in the caller's thread at its next `submit` or at `close`,
    as if the caller had written the file itself. Any other error is the job's image failing:
    it is logged and listed by `close` as "<name>: <error>", and the other jobs go on.
    Leaving the `with` block, also on an exception or Ctrl-C, writes what is queued and waits
    for it: a file handed over is written whole or not at all (each job writes atomically).
    """

    def __init__(self, threads: int = 2, queue_size: int = 32):
        self.jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self.errors: list[str] = []
        self.fatal: OSError | None = None
        self.fatal_raised = False
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, *exc) -> bool:
        self._stop()
        if exc[0] is None:
            self._raise_fatal()
        return False

    def submit(self, name: str, job: Callable[..., None], *args) -> None:
        """Queue `job(*args)`; `name` (an image id) names it in the list of failures."""
        self._raise_fatal()
        if not any(thread.is_alive() for thread in self.threads):
            raise RuntimeError("the writer is closed")
        self.jobs.put((name, job, args))

    def close(self) -> list[str]:
        """Wait for every queued job; the failures ("<name>: <error>"), after raising a fatal OSError."""
        self._stop()
        self._raise_fatal()
        return list(self.errors)

    def _stop(self) -> None:
        if any(thread.is_alive() for thread in self.threads):
            for _ in self.threads:
                self.jobs.put(_STOP)
            for thread in self.threads:
                thread.join()

    def _raise_fatal(self) -> None:
        with self.lock:
            fatal = None if self.fatal_raised else self.fatal
            self.fatal_raised = self.fatal is not None
        if fatal is not None:
            raise fatal

    def _work(self) -> None:
        while True:
            item = self.jobs.get()
            if item is _STOP:
                return
            name, job, args = item
            with self.lock:
                stopped = self.fatal is not None
            if stopped:  # after a fatal error the rest is left unwritten, as the caller will stop
                continue
            try:
                job(*args)
            except OSError as error:
                with self.lock:
                    self.fatal = self.fatal or error
            except Exception as error:  # one image's file, not the whole pass
                message = f"{name}: {type(error).__name__}: {error}"
                log.warning("could not write %s", message)
                with self.lock:
                    self.errors.append(message)
