"""Which row of a search wins: the best score, and among equal scores the row closest to the
config as it is (a tie is no reason to move a setting), then the first in grid order."""

from __future__ import annotations

import math


def agreement(row: dict, current: dict) -> int:
    """How many of `current`'s settings the row keeps."""
    return sum(1 for name, value in current.items() if name in row and row[name] == value)


def best_row(rows: list[dict], score: str, current: dict, *, tie_break: str | None = None) -> dict | None:
    """The row with the highest `score` (then `tie_break`), closest to `current` among equals.
    Rows whose score is nan are never chosen; None when no row has a score."""
    scored = [row for row in rows if isinstance(row.get(score), (int, float)) and not math.isnan(row[score])]
    if not scored:
        return None

    def rank(indexed):
        index, row = indexed
        second = row.get(tie_break) if tie_break else None
        second = second if isinstance(second, (int, float)) and not math.isnan(second) else -math.inf
        return (round(row[score], 12), round(second, 12), agreement(row, current), -index)

    return max(enumerate(scored), key=rank)[1]


def profile(rows: list[dict], parameter: str, score: str) -> dict:
    """{value of `parameter`: the best `score` of the rows with that value}: the curve of one
    parameter with every other set at its best (what `wss tune`'s plot draws)."""
    best: dict = {}
    for row in rows:
        value, result = row.get(parameter), row.get(score)
        if value is None or not isinstance(result, (int, float)) or math.isnan(result):
            continue
        best[value] = max(best.get(value, -math.inf), result)
    return best
