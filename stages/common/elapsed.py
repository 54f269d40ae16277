"""The time a stage has spent on its unfinished work, kept in its .partial folder.

A stage that `--resume` continues reports the time of all its runs, not only the last one's.
The runner starts a run's record and closes it when the stage stops on an error or Ctrl-C; the
training loop moves its end after every checkpoint, so that a run killed without warning
(SIGKILL, a lost machine) still counts up to its last epoch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from data.layout import write_text_atomic

ELAPSED_FILE = "elapsed.json"


def seconds_spent(folder: Path) -> float:
    """Seconds the runs recorded in `folder` spent on it; 0 without a readable record."""
    try:
        record = json.loads((Path(folder) / ELAPSED_FILE).read_text())
        return float(record["before"]) + max(0.0, float(record["until"]) - float(record["started"]))
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def start_clock(folder: Path, now: float) -> float:
    """Record that a run starts working in `folder` at `now`; returns the seconds earlier runs
    spent there (0 in a fresh folder)."""
    before = seconds_spent(folder)
    write_text_atomic(Path(folder) / ELAPSED_FILE, json.dumps({"before": before, "started": now, "until": now}))
    return before


def mark_elapsed(folder: Path) -> None:
    """Count the current run's time in `folder` up to now. Without a record (a stage run outside
    the runner, as tests do) nothing is written; a failed write only costs the record."""
    path = Path(folder) / ELAPSED_FILE
    try:
        record = json.loads(path.read_text())
        record["until"] = time.time()
        write_text_atomic(path, json.dumps(record))
    except (OSError, ValueError, TypeError):
        pass
