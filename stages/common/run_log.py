"""Where the training loop reports its progress as it goes, besides metrics.jsonl.

The loop (stages/common/training.py) reports to `current()`, a `RunLog` that does nothing
unless the runner has installed a recorder around the stage with `recording(...)` (the
TensorBoard one lives in pipeline/tensorboard_log.py: stages know no pipeline). What it is told
are values the loop already computed, so nothing here changes a result
(stages.base.NOT_RESULT_BEARING).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class RunLog:
    """The recorder interface, and the default that records nothing.

    Steps are optimizer steps since the start of training, counted from 1: a step report comes
    after that many steps, an epoch's record at the step that ends the epoch, so that every
    curve of a stage shares one x axis."""

    def resumed(self, first_step: int, steps_per_epoch: int, history: list[dict]) -> None:
        """Training continues after `first_step` optimizer steps, from a checkpoint whose epoch
        records are `history`: whatever an interrupted run reported past `first_step` no longer holds."""

    def step(self, step: int, values: dict[str, float], lr: float) -> None:
        """The loss terms averaged over the steps since the previous report, and the learning rate."""

    def epoch(self, step: int, record: dict) -> None:
        """One epoch's record as metrics.jsonl has it (epoch, loss terms, images_per_s, seconds),
        reported before the epoch's checkpoint is written; flushed to disk."""

    def close(self) -> None:
        """Write out what is buffered; the recorder takes nothing more."""


_current: RunLog = RunLog()


def current() -> RunLog:
    return _current


@contextmanager
def recording(log: RunLog) -> Iterator[RunLog]:
    """Make `log` the recorder the training loop reports to for the duration of the block."""
    global _current
    previous, _current = _current, log
    try:
        yield log
    finally:
        _current = previous
