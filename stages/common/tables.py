"""Plain-text and Markdown tables of metrics already computed, for the log, the terminal and
report files. Presentation only: nothing here changes a result (stages.base.NOT_RESULT_BEARING)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _cell(value: Any, digits: int) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "-" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _digits_of(digits: int | Mapping[str, int], column: str) -> int:
    return digits.get(column, 4) if isinstance(digits, Mapping) else digits


def format_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, digits: int | Mapping[str, int] = 4
) -> str:
    """Rows of dicts as an aligned plain-text table: numbers right-aligned, text left.

    ``columns`` picks and orders the keys (default: every key, in first-seen order); a row
    missing a key gets an empty cell, nan prints as "-". ``digits``: decimals of floats, for
    all columns or per column name (others 4), e.g. ``{"seconds": 1}``.
    """
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_cell(row.get(column), _digits_of(digits, column)) for column in columns] for row in rows]
    numeric = [any(_is_number(row.get(column)) for row in rows) for column in columns]
    widths = [max([len(str(column))] + [len(line[i]) for line in cells]) for i, column in enumerate(columns)]

    def render(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if right else v.ljust(w) for v, w, right in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    lines = [render([str(c) for c in columns]), "  ".join("-" * w for w in widths)]
    lines += [render(line) for line in cells]
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], digits: int | Mapping[str, int] = 4) -> str:
    """The same cells as `format_table`, as a Markdown (GitHub) table for report files."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c), _digits_of(digits, c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def per_class_table(metrics: dict, prefix: str, dataset) -> str:
    """The IoU of every class (and the mean) of metrics named `<prefix>iou/<class>`, as text."""
    rows = [
        {"class": name, "IoU": metrics.get(f"{prefix}iou/{name}", float("nan"))}
        for name in ["background", *dataset.classes]
    ]
    rows.append({"class": "mean", "IoU": metrics.get(f"{prefix}miou", float("nan"))})
    return format_table(rows, ["class", "IoU"])


def html_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], digits: int | Mapping[str, int] = 4, css_class: str = ""
) -> str:
    """The same cells as `format_table`, as an HTML table (text escaped; numbers right-aligned)."""
    from html import escape

    numeric = [any(_is_number(row.get(column)) for row in rows) for column in columns]
    head = "".join(f"<th>{escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td{' class=num' if right else ''}>{escape(_cell(row.get(c), _digits_of(digits, c)))}</td>"
            for c, right in zip(columns, numeric)
        )
        + "</tr>"
        for row in rows
    )
    klass = f' class="{escape(css_class)}"' if css_class else ""
    return f"<table{klass}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
