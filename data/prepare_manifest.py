"""What each prepared item was made from, so that a rerun of ``wss prepare`` redoes exactly what
its inputs changed, removes what they lost, and rewrites nothing else.

Every preparer (SIIM, VOC, NIH, and any new one) keeps ``<out>/prepare_manifest.json``::

    {"dataset": "siim", "version": 1, "items": {
    "<id>": {"source": "...", "labels": "...", "outputs": {"images/<id>.png": "...", ...}, ...},
    ...}}

- ``source``: the stamp (byte size and modification time in ns) of the item's source image file,
  with the options that shape its pixels (``--size``): when it differs, image and mask are redone.
- ``labels``: a digest of what the item's labels and mask are made from, per item (its SIIM RLE
  rows, its NIH findings and boxes, its VOC mask or XML file): when only this differs, only what
  the labels shape is redone (the SIIM or VOC mask; NIH has no per-image label file).
- ``outputs``: the stamps of the files written for the item, so that an output replaced, cut
  short or deleted is noticed with one ``stat``, without decoding it.
- whatever else a preparer needs to resume without reading the source (the DICOM's shape, the
  VOC labels, the NIH image's original size).

A stamp, not a content hash, decides for image files: hashing 10^5 radiographs on every rerun
would cost as much as converting them, and the dataset fingerprint already trusts stamps. The
label rows, a few bytes per image, are compared by content.

An item without a record (a folder prepared before manifests existed, or a run killed before it
wrote the manifest) is *unknown*: the preparer verifies it, recomputing its mask from the labels
and keeping its image when the source is not newer than it (see :func:`source_not_newer`).

The manifest is written once, after every item is done and before ``dataset.json``: a killed run
leaves the previous manifest, whose records can only be older than the files, which then get redone
(unchanged content keeps its file, see :func:`write_mask_if_changed` and :mod:`data.layout`).
"""

from __future__ import annotations

import csv
import filecmp
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from data.errors import DataError
from data.layout import read_index_png, write_index_png, write_text_atomic

MANIFEST_NAME = "prepare_manifest.json"
VERSION = 1

# How an item stands against its record; the preparers' workers return one of these.
UNCHANGED = "unchanged"  # inputs and outputs as recorded: nothing is read or written
SOURCE = "source"  # its source image changed (or the options shaping it): everything redone
LABELS = "labels"  # only its label rows / mask source changed: the label outputs redone
OUTPUTS = "outputs"  # an output was replaced, damaged or removed: redone
UNKNOWN = "unknown"  # no record: verified (see the module doc)
NEW = "new"  # no record and no outputs: prepared for the first time
VERIFIED = "verified"  # an unknown item found right and kept as it is
FORCED = "forced"  # --force: redone whatever its record says

# Report id categories, for the changes a rerun acted on.
CATEGORIES = {SOURCE: "source_changed", LABELS: "labels_changed", OUTPUTS: "outputs_changed"}


def file_stamp(path: str | Path) -> str | None:
    """``"<bytes>:<mtime_ns>"`` of a file, None when it is absent."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def digest(value) -> str:
    """A short content hash of a JSON-able value (a label row, a findings vector, a box list)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def output_stamps(out: str | Path, names: list[str]) -> dict[str, str]:
    """Stamps of the files an item was written to, by path relative to ``out``."""
    return {name: file_stamp(Path(out) / name) for name in names}


def item_change(previous: dict | None, source: str, labels: str, out: str | Path) -> str:
    """How an item stands against its ``previous`` record, given the ``source`` stamp and the
    ``labels`` digest of this run: one of UNKNOWN, SOURCE, OUTPUTS, LABELS, UNCHANGED."""
    if previous is None:
        return UNKNOWN
    if previous.get("source") != source:
        return SOURCE
    recorded = previous.get("outputs")
    if not isinstance(recorded, dict) or not recorded or output_stamps(out, list(recorded)) != recorded:
        return OUTPUTS
    if previous.get("labels") != labels:
        return LABELS
    return UNCHANGED


def source_not_newer(source: str | Path, output: str | Path) -> bool:
    """For an item without a record: its output was written after its source last changed (make's
    rule). A source replaced by a file carrying an older time (``cp -p``, ``rsync -t``) passes;
    ``--force`` redoes every item for that case."""
    try:
        return os.stat(source).st_mtime_ns <= os.stat(output).st_mtime_ns
    except OSError:
        return False


def unknown_change(source: str | Path, output: Path) -> str:
    """What an unrecorded item that cannot be kept is redone as: NEW when it has no output yet,
    SOURCE when its source is newer than its output, else OUTPUTS (damaged, or of another size)."""
    if not Path(output).is_file():
        return NEW
    return OUTPUTS if source_not_newer(source, output) else SOURCE


def write_mask_if_changed(path: Path, mask: np.ndarray, palette: list[list[int]]) -> bool:
    """Write a class-index mask unless the file there already holds the same indices (whatever
    Pillow version encoded it): an unchanged mask keeps its file and mtime. True when written."""
    path = Path(path)
    if path.is_file():
        try:
            if np.array_equal(read_index_png(path), mask):
                return False
        except DataError:
            pass  # damaged: rewritten
    write_index_png(path, mask, palette)
    return True


def copy_file_if_changed(source: Path, target: Path) -> bool:
    """Copy through a temporary name; an identical copy already there is kept (and with it its
    mtime, which the dataset fingerprint reads). True when copied."""
    if target.is_file() and filecmp.cmp(source, target, shallow=False):
        return False
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    return True


class PrepareManifest:
    """The records of one prepared folder: those of the previous run (read at the start) and those
    of this run (written by :meth:`finish`). ``force`` ignores the previous records."""

    def __init__(self, out: str | Path, dataset: str, report, force: bool = False):
        self.out = Path(out)
        self.dataset = dataset
        self.path = self.out / MANIFEST_NAME
        self._text = self.path.read_bytes().decode("utf-8", "replace") if self.path.is_file() else None
        self._previous = {} if force else self._load(report)
        self.items: dict[str, dict] = {}
        # the items prepared before: recorded ones, and those listed in labels.csv (a folder
        # prepared before manifests existed); only their outputs are ever removed, never a file
        # wss did not list (an --out that holds other files loses none of them)
        self.before = set(self._previous) | _listed_ids(self.out / "labels.csv")
        self.resuming = bool(self.before)  # then new items are reported as added

    def _load(self, report) -> dict[str, dict]:
        if self._text is None:
            return {}
        try:
            data = json.loads(self._text)
            items = data["items"]
            if not isinstance(items, dict) or not all(isinstance(v, dict) for v in items.values()):
                raise ValueError("'items' is not a mapping of records")
        except (ValueError, KeyError, TypeError, RecursionError) as error:
            report.add_problem(self.path, f"unreadable ({error}): every prepared item is verified again")
            return {}
        if data.get("dataset") != self.dataset or data.get("version") != VERSION:
            report.add_problem(
                self.path,
                f"written for dataset {data.get('dataset')!r} version "
                f"{data.get('version')!r}: every prepared item is verified again",
            )
            return {}
        return {image_id: record for image_id, record in items.items() if _plain_name(image_id)}

    def previous(self, image_id: str) -> dict | None:
        return self._previous.get(image_id)

    def note(self, report, image_id: str, change: str, record: dict | None) -> None:
        """Count one item's outcome in ``report`` and keep its ``record`` (None: not prepared)."""
        if record is None:
            return
        self.items[image_id] = record
        if change in CATEGORIES:
            report.add_ids(CATEGORIES[change], [image_id])
        elif change == NEW and self.resuming:
            report.add_ids("added", [image_id])
        elif change == VERIFIED:
            report.count("verified")

    def finish(self, report, image_ext: str, sources: set[str], failed: set[str]) -> None:
        """After a run that prepared something: remove the images and masks of every item that is
        not prepared now (its source gone, its label row gone, or failed this time), list them in
        ``report``, and write the manifest (only when it changed: a rerun rewrites no file)."""
        removed: dict[str, list[str]] = {"removed_source_gone": [], "removed_failed": [], "removed_unlabelled": []}
        for image_id in sorted(self.before - self.items.keys()):
            (self.out / "images" / f"{image_id}{image_ext}").unlink(missing_ok=True)
            (self.out / "masks" / f"{image_id}.png").unlink(missing_ok=True)
            reason = (
                "removed_source_gone"
                if image_id not in sources
                else "removed_failed"
                if image_id in failed
                else "removed_unlabelled"
            )
            removed[reason].append(image_id)
        for category, ids in removed.items():
            if ids:
                report.add_ids(category, ids)
        text = self._serialise()
        if text != self._text:
            write_text_atomic(self.path, text)

    def _serialise(self) -> str:
        """One item a line (greppable, diffable), keys sorted: the same records give the same bytes."""
        lines = [
            f"{json.dumps(image_id)}:{json.dumps(self.items[image_id], sort_keys=True, separators=(',', ':'))}"
            for image_id in sorted(self.items)
        ]
        head = json.dumps({"dataset": self.dataset, "version": VERSION})[:-1]
        return head + ', "items": {\n' + ",\n".join(lines) + "\n}}\n"


def _plain_name(image_id: str) -> bool:
    """An id that names a file inside images/ or masks/, not a path elsewhere (a hostile
    manifest or labels.csv cannot make a rerun delete anything outside them)."""
    return bool(image_id) and "/" not in image_id and os.sep not in image_id and image_id not in (".", "..")


def _listed_ids(labels_csv: Path) -> set[str]:
    """The image ids of a prepared labels.csv (first column, header skipped); none when absent or
    unreadable (then only the manifest says what was prepared)."""
    try:
        with open(labels_csv, newline="") as handle:
            rows = csv.reader(handle)
            next(rows, None)
            return {row[0] for row in rows if row and _plain_name(row[0])}
    except (OSError, UnicodeDecodeError, csv.Error):
        return set()
