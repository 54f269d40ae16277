"""What a `wss prepare` run did: counts, skipped inputs and why, written to prepare_report.json.

Shared by the SIIM, VOC and NIH preparers, with the helpers they have in common: PNG saving,
for SIIM and NIH ``--size`` (resizing and its resume stamp), and the one sentence that says why
a run prepared nothing. The process fan-out is :mod:`data.parallel`; what each prepared item
was made from, for reruns, is :mod:`data.prepare_manifest`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data.errors import DataError
from data.layout import create_folder, replace_if_changed, write_text_atomic

REPORT_NAME = "prepare_report.json"
LISTED_IDS_LIMIT = 1000  # ids kept per category in the JSON; the count is always exact


@dataclass
class Problem:
    """One skipped input: where (file, or file:line) and what was wrong with it."""

    where: str
    message: str


@dataclass
class PrepareReport:
    """Counts and problems of one preparation; ``ok`` when something usable was produced."""

    dataset: str
    out: Path
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    id_lists: dict[str, list[str]] = field(default_factory=dict)
    id_counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None  # why nothing could be prepared, when nothing could

    def add_problem(self, where: str | Path, message: str) -> None:
        self.problems.append(Problem(str(where), message))

    def add_error(self, where: str | Path, error: Exception) -> None:
        """A DataError about ``where``; its message loses the ``where: `` prefix it may carry."""
        message = str(error)
        prefix = f"{where}: "
        self.add_problem(where, message[len(prefix) :] if message.startswith(prefix) else message)

    def count(self, key: str, amount: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + amount

    def add_ids(self, category: str, ids: Iterable[str]) -> None:
        """Ids in a category such as "labels_without_images" (counted, the first ones listed)."""
        ids = sorted(ids)
        self.id_counts[category] = self.id_counts.get(category, 0) + len(ids)
        listed = self.id_lists.setdefault(category, [])
        listed.extend(ids[: max(0, LISTED_IDS_LIMIT - len(listed))])

    @property
    def ok(self) -> bool:
        return self.counts.get("prepared", 0) > 0

    @property
    def path(self) -> Path:
        return Path(self.out) / REPORT_NAME

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "ok": self.ok,
            "counts": dict(sorted(self.counts.items())),
            "id_counts": dict(sorted(self.id_counts.items())),
            "ids": {key: value for key, value in sorted(self.id_lists.items())},
            "problems": [{"where": p.where, "message": p.message} for p in self.problems],
            **({"error": self.error} if self.error else {}),
        }

    def write(self) -> Path:
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(self.to_json(), indent=1))
        return path

    def summary(self) -> str:
        """A few lines for the terminal."""
        lines = [f"{self.dataset}: prepared {self.counts.get('prepared', 0)} images into {self.out}"]
        others = ", ".join(f"{key} {value}" for key, value in sorted(self.counts.items()) if key != "prepared")
        if others:
            lines.append(f"  {others}")
        for category, amount in sorted(self.id_counts.items()):
            if amount:
                example = self.id_lists[category][0] if self.id_lists.get(category) else ""
                lines.append(f"  {category.replace('_', ' ')}: {amount}" + (f" (e.g. {example})" if example else ""))
        if self.problems:
            lines.append(
                f"  {len(self.problems)} problems (inputs skipped or contradictory), e.g. "
                f"{self.problems[0].where}: {self.problems[0].message}"
            )
        lines.append(f"  details: {self.path}")
        return "\n".join(lines)


def save_png(image, path: Path, compress_level: int = 1) -> bool:
    """Atomic PNG save, fast zlib level: 5x faster than Pillow's default for ~20% more bytes,
    which matters when converting 10^4-10^5 radiographs (layout.atomic_save has no options).
    A file already holding the same bytes is kept, mtime included; True when written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    image.save(tmp, format="PNG", compress_level=compress_level)
    return replace_if_changed(tmp, path)


def check_options(size: int | None, val_fraction: float, workers: int) -> None:
    """One-line errors for bad ``--size`` / ``--val-fraction`` / ``--workers`` before any work."""
    if size is not None and size <= 0:
        raise DataError(f"--size must be positive, got {size}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")


def resize_image(image: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """uint8 pixels -> a PIL image of ``size`` (width, height): area averaging (BOX) when shrinking,
    which does not alias fine structure away as point sampling would; bilinear when enlarging."""
    picture = Image.fromarray(image)
    if picture.size == size:
        return picture
    shrinking = size[0] * size[1] < picture.size[0] * picture.size[1]
    return picture.resize(size, Image.BOX if shrinking else Image.BILINEAR)


def check_size_stamp(out: Path, stamp_name: str, size: int | None, force: bool = False) -> None:
    """Record ``size`` (0 = native) in ``out/stamp_name``, or refuse a run asking for another one
    without ``force`` (which redoes every image): resuming would keep the images made at the old
    size. Call it before DatasetWriter, which unpublishes the dataset: a refused run must leave
    the earlier one readable."""
    path = Path(out) / stamp_name
    wanted = size or 0
    images = Path(out) / "images"
    holds_images = images.is_dir() and any(images.iterdir())
    if force or not path.is_file() or not holds_images:  # a run that prepared nothing binds no later one
        create_folder(path.parent)
        write_text_atomic(path, json.dumps({"size": wanted}))
        return
    try:
        before = json.loads(path.read_text()).get("size", "unknown")
    except (OSError, ValueError, AttributeError):
        before = "unknown"
    if before != wanted:
        raise DataError(
            f"{out} was prepared with --size {before}, this run asks for --size {wanted} "
            f"(0 = native): use a fresh --out, or --force to redo every image at the new size"
        )


def nothing_prepared_reason(
    report: PrepareReport,
    label_file: str | Path,
    label_ids,
    source_dir: str | Path,
    source_ids,
    source_kind: str,
    label_kind: str = "ImageId",
) -> str:
    """Why a run prepared nothing, in one sentence for its error line and ``report.error``: the label
    file had no usable row, no source file was found, no id matched a file name (a few of each
    side shown, to see the mismatch), or every matched image failed (the first problem shown)."""
    label_ids, source_ids = sorted(label_ids), sorted(source_ids)
    if not label_ids:
        bad = f" ({len(report.problems)} unusable, see problems)" if report.problems else ""
        return f"{label_file} holds no label rows{bad}"
    if not source_ids:
        return f"no {source_kind} file found under {source_dir}"
    if not set(label_ids) & set(source_ids):
        return (
            f"no {label_kind} of {label_file} matched a {source_kind} file name under {source_dir} "
            f"({label_kind}s: {_first_ids(label_ids)}; {source_kind} files: {_first_ids(source_ids)})"
        )
    first = report.problems[0] if report.problems else None
    example = f", e.g. {first.where}: {first.message}" if first else ""
    return f"every one of the {len(set(label_ids) & set(source_ids))} matched images failed{example}"


def _first_ids(ids: list[str], shown: int = 3) -> str:
    more = f", ... ({len(ids)} in all)" if len(ids) > shown else ""
    return ", ".join(repr(i) for i in ids[:shown]) + more
