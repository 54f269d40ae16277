"""Charts for the reports (matplotlib): a trained stage's curves, and `wss compare`'s table as bars.

Both read what is already on disk or in a table; each PNG is written whole (a temporary file
renamed into place).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from data.layout import create_folder

TIMING = ("images_per_s", "seconds")  # an epoch record's fields that are not loss terms


def epoch_records(metrics_log: Path) -> dict[str, list[dict]]:
    """metrics.jsonl's epoch records per training step (`stage_step`), in file order; lines that do
    not parse, or are not epoch records, are passed over (the file is a log, not a result)."""
    steps: dict[str, list[dict]] = {}
    try:
        lines = metrics_log.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            steps.setdefault(str(record.get("stage_step", "train")), []).append(record)
    return steps


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def save_figure(figure, path: Path, dpi: int = 80) -> Path:
    import matplotlib.pyplot as plt

    create_folder(path.parent)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        figure.savefig(tmp, dpi=dpi)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(figure)
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curves(stage: str, metrics_log: Path, path: Path) -> Path | None:
    """`path`: the loss terms and images/s of each epoch of the stage's training, from its
    metrics.jsonl; None when the log holds no epoch."""
    steps = epoch_records(metrics_log)
    if not steps:
        return None
    plt = pyplot()
    figure, (losses, speed) = plt.subplots(1, 2, figsize=(10, 3.6))
    for step_name, records in steps.items():
        epochs = [r["epoch"] for r in records]
        prefix = f"{step_name} " if len(steps) > 1 else ""
        terms = list(dict.fromkeys(k for r in records for k in r if k not in ("epoch", "stage_step", *TIMING)))
        for term in terms:
            points = [(e, r[term]) for e, r in zip(epochs, records) if is_number(r.get(term))]
            if points:
                xs, ys = zip(*points)
                losses.plot(xs, ys, marker="o", linewidth=2 if term == "loss" else 1, label=f"{prefix}{term}")
        points = [(e, r["images_per_s"]) for e, r in zip(epochs, records) if is_number(r.get("images_per_s"))]
        if points:
            xs, ys = zip(*points)
            speed.plot(xs, ys, marker="o", label=f"{prefix}images/s")
    losses.set(title=f"{stage}: training loss per epoch", xlabel="epoch", ylabel="mean over the epoch")
    speed.set(title=f"{stage}: training throughput", xlabel="epoch", ylabel="images/s")
    for axis in (losses, speed):
        axis.grid(alpha=0.3)
        axis.xaxis.get_major_locator().set_params(integer=True)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)


def bar_chart(rows: list[dict], columns: list[str], label: str, path: Path, title: str) -> Path | None:
    """`path`: one panel per numeric column of `columns`, one bar per row (named by its `label`
    column), each bar's value written over it; None when no column has a number."""
    panels = [c for c in columns if c != label and any(is_number(r.get(c)) for r in rows)]
    if not panels:
        return None
    plt = pyplot()
    across = min(4, len(panels))
    down = math.ceil(len(panels) / across)
    width = max(2.6, 0.55 * len(rows) + 1.2)
    figure, axes = plt.subplots(down, across, figsize=(width * across, 2.9 * down), squeeze=False)
    names = [str(r.get(label, "")) for r in rows]
    colours = plt.get_cmap("tab10")
    for axis, column in zip(axes.flat, panels):
        values = [r.get(column) if is_number(r.get(column)) else 0.0 for r in rows]
        bars = axis.bar(range(len(rows)), values, color=[colours(i % 10) for i in range(len(rows))])
        for bar, row in zip(bars, rows):
            text = format_value(row.get(column))
            axis.annotate(
                text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7
            )
        axis.set_xticks(
            range(len(rows)),
            names,
            rotation=45 if len(rows) > 4 else 0,
            ha="right" if len(rows) > 4 else "center",
            fontsize=8,
        )
        axis.set_title(column, fontsize=9)
        axis.margins(y=0.15)
        axis.grid(axis="y", alpha=0.3)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path)


def format_value(value) -> str:
    """A bar's label: '-' for a missing value, 3 significant digits under 1000, whole numbers above."""
    if not is_number(value):
        return "-"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
