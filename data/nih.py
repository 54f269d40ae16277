"""NIH ChestX-ray14 -> the prepared layout, plus its bounding boxes for CAM localization.

- Classes: the 14 findings in the order of the ChestX-ray14 paper (``FINDINGS``); the task is
  multi-label classification, written as task "multiclass" with 14 classes and no masks.
  "No Finding" is the all-zero label.
- Images: every ``*.png`` under ``images_dir`` (the release spreads them over
  ``images_001/images`` ... folders) that ``Data_Entry_2017*.csv(.gz)`` lists; only present
  images are prepared, the other listed ones are counted. Written as 8-bit grayscale (a few
  are RGBA). With ``size``, each is resized to ``size`` x ``size`` (area averaging when
  shrinking, bilinear when enlarging) and its boxes with it: the release's images are 1024 x
  1024, and a classifier trained at 512 that infers its CAMs at scale 1 must see them at 512
  too, or every object looks twice as large as in training. ``size`` None keeps each image's
  size. An 8-bit grayscale PNG already of the right size is copied as it is.
- Splits: ``test`` = every image of a patient that has a boxed image (the boxed images are for
  localization, and no patient appears in two splits); the other patients are shuffled with
  ``seed`` and ``val_fraction`` of them give ``val``, the rest ``train``. Empty splits have no
  file (one left by an earlier run is removed: readers refuse empty splits).
- Boxes: ``out/boxes.csv`` with ``image_id,finding,x,y,w,h`` (pixels of the prepared image:
  x and w scaled by size / original width, y and h by size / original height; x/y the top-left
  corner) for the prepared images; the release's "Infiltrate" is renamed "Infiltration" to
  match the labels. :func:`data.boxes.read_boxes` reads the release file (whose
  ``Bbox [x,y,w,h]`` header spans four columns) and the clean one. A bad box row (too few
  fields, an unknown finding, a coordinate that is not a number) is reported as ``file:line``
  in ``prepare_report.json`` and skipped; a file without the header is an error.
- Resumable (:mod:`data.prepare_manifest`): ``out/prepare_manifest.json`` records each image's
  source stamp, its original size (for its boxes) and a digest of its findings, patient and
  boxes. A rerun keeps the images whose source is unchanged without opening it, redoes those
  whose source changed, removes the outputs of images gone from the inputs, rewrites labels and
  boxes from the files given, and lists the images whose findings or boxes changed. An image
  without a record (a folder prepared before manifests existed) is kept when its PNG decodes,
  has the expected size and is not older than its source; otherwise it is redone, which rewrites
  no file whose content comes out the same. ``size`` is recorded in ``out/nih.json`` and a rerun
  with another size is refused unless ``force``, which redoes every image.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from data.boxes import (
    BOXES_NAME,
    FINDINGS,
    Box,
    boxes_by_image,
    canonical_finding,
    image_id_of,
    read_boxes,
    scale_box,
    write_boxes,
)
from data.dicom import stretch_to_uint8
from data.errors import DataError
from data.images import open_image
from data.layout import DatasetInfo, DatasetWriter
from data.parallel import parallel_map
from data.prepare_manifest import (
    FORCED,
    LABELS,
    NEW,
    UNCHANGED,
    UNKNOWN,
    VERIFIED,
    PrepareManifest,
    copy_file_if_changed,
    digest,
    file_stamp,
    item_change,
    output_stamps,
    source_not_newer,
    unknown_change,
)
from data.prepare_report import (
    PrepareReport,
    check_options,
    check_size_stamp,
    nothing_prepared_reason,
    resize_image,
    save_png,
)

NO_FINDING = "No Finding"
STAMP_NAME = "nih.json"  # --size, recorded for resuming


# --------------------------------------------------------------------------------------------
# Image-level labels
# --------------------------------------------------------------------------------------------


@dataclass
class Entry:
    labels: list[int]
    patient: str


def read_data_entry(
    path: str | Path, report: PrepareReport, wanted: set[str] | None = None
) -> tuple[dict[str, Entry], set[str]]:
    """(image id -> labels and patient, every id listed) from Data_Entry_2017(_v2020).csv[.gz].

    Bad rows are reported. With ``wanted``, only those ids are parsed (the release lists
    112,120 images; a partial download need not pay for all of them).
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"data entry file not found: {path}")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, OSError, EOFError, zlib.error, UnicodeDecodeError, pd.errors.ParserError) as error:
        # EOFError / zlib.error: a truncated or damaged .gz (otherwise click's bare "Aborted!")
        raise DataError(f"{path}: not a readable CSV ({error})") from None
    table.columns = [c.strip() for c in table.columns]
    for column in ["Image Index", "Finding Labels"]:
        if column not in table.columns:
            raise DataError(f"{path}: no {column!r} column (columns: {', '.join(table.columns[:6])})")
    ids = table["Image Index"].map(image_id_of)
    listed = set(ids)
    if wanted is not None:
        table, ids = table[ids.isin(wanted)], ids[ids.isin(wanted)]
    patients = table["Patient ID"] if "Patient ID" in table.columns else None
    entries: dict[str, Entry] = {}
    for row, image_id, findings in zip(table.index, ids, table["Finding Labels"]):
        where = f"{path}:{row + 2}"
        labels = _labels_of(findings, where, report)
        if labels is None:
            continue
        if image_id in entries:
            report.add_problem(where, f"duplicate image id {image_id!r}: skipped")
            report.count("duplicate_ids")
            continue
        patient = patients[row].strip() if patients is not None else image_id.split("_")[0]
        entries[image_id] = Entry(labels, patient)
    return entries, listed


def _labels_of(findings: str, where: str, report: PrepareReport) -> list[int] | None:
    names = {canonical_finding(name) for name in findings.split("|") if name.strip()}
    names.discard(NO_FINDING)
    unknown = sorted(names - set(FINDINGS))
    if unknown:
        report.add_problem(where, f"unknown finding {unknown[0]!r}: row skipped")
        report.count("bad_entry_rows")
        return None
    return [int(name in names) for name in FINDINGS]


# --------------------------------------------------------------------------------------------
# One image (runs in a worker process)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ImageTask:
    image_id: str
    source: str
    out: str
    size: int | None
    stamp: str = ""  # the source's stamp and --size (see data.prepare_manifest)
    labels: str = ""  # digest of its findings, patient and boxes
    previous: dict | None = None
    force: bool = False


@dataclass
class _ImageResult:
    image_id: str
    status: str  # "converted" | "copied" | "resumed" | "failed"
    original: tuple[int, int] = (0, 0)  # the source's (width, height): its boxes' pixels
    problems: list[tuple[str, str]] = field(default_factory=list)
    change: str = NEW
    record: dict | None = None


def _prepare_image(task: _ImageTask) -> _ImageResult:
    name = f"images/{task.image_id}.png"
    target = Path(task.out) / name
    change = FORCED if task.force else item_change(task.previous, task.stamp, task.labels, task.out)
    recorded = _recorded_original(task.previous)
    if change in (UNCHANGED, LABELS) and recorded is not None:  # labels and boxes live in the shared files
        record = {**task.previous, "labels": task.labels}
        return _ImageResult(task.image_id, "resumed", recorded, change=change, record=record)
    try:
        with open_image(task.source) as image:  # reads the header only, until load()
            original = image.size
            wanted = (task.size, task.size) if task.size else original
            if change == UNKNOWN:
                if _finished(target, wanted) and source_not_newer(task.source, target):
                    return _ImageResult(
                        task.image_id, "resumed", original, change=VERIFIED, record=_record(task, original)
                    )
                change = unknown_change(task.source, target)
            image.load()
            if image.mode == "L" and original == wanted:
                copy_file_if_changed(Path(task.source), target)
                status = "copied"
            else:
                status, gray = "converted", to_grayscale(image)
    except (OSError, ValueError, SyntaxError) as error:  # Pillow's errors for damaged files
        problem = (task.source, f"not a readable image ({error})")
        return _ImageResult(task.image_id, "failed", problems=[problem])
    except DataError as error:  # too large; the message starts with the file, the report names it apart
        message = str(error).removeprefix(f"{task.source}: ")
        return _ImageResult(task.image_id, "failed", problems=[(task.source, message)])
    if status == "converted":
        save_png(resize_image(gray, wanted), target)
    return _ImageResult(task.image_id, status, original, change=change, record=_record(task, original))


def _record(task: _ImageTask, original: tuple[int, int]) -> dict:
    return {
        "source": task.stamp,
        "labels": task.labels,
        "original": list(original),
        "outputs": output_stamps(task.out, [f"images/{task.image_id}.png"]),
    }


def _recorded_original(record: dict | None) -> tuple[int, int] | None:
    """The source's (width, height) in a record, None when it holds none that is usable."""
    original = (record or {}).get("original")
    if isinstance(original, list) and len(original) == 2 and all(isinstance(v, int) and v > 0 for v in original):
        return original[0], original[1]
    return None


def to_grayscale(image: Image.Image) -> np.ndarray:
    """uint8 HxW: colour (RGB/RGBA/P) through luminance, deeper grayscale stretched to 8 bits."""
    if image.mode in ("I", "I;16", "I;16B", "F"):
        return stretch_to_uint8(np.array(image))
    return np.array(image.convert("L"))


def _finished(path: Path, size: tuple[int, int]) -> bool:
    """The file decodes completely (a valid header with cut-short data must be redone) and has
    ``size`` (an image of an earlier run at another size must be redone)."""
    if not path.is_file():
        return False
    try:
        with open_image(path) as image:
            image.load()
            return image.size == size
    except (OSError, ValueError, SyntaxError, DataError):  # damaged, or too large: made again
        return False


# --------------------------------------------------------------------------------------------
# The whole dataset
# --------------------------------------------------------------------------------------------


def prepare_nih(
    images_dir: str | Path,
    data_entry_csv: str | Path,
    boxes_csv: str | Path,
    out: str | Path,
    val_fraction: float = 0.1,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    size: int | None = None,
    force: bool = False,
) -> PrepareReport:
    """Prepare ChestX-ray14 into ``out`` (images, labels, splits, boxes.csv); see the module doc.
    ``size`` None keeps the native size; ``force`` redoes every image whatever the manifest says.

    Raises DataError (after writing the report) only when no image could be prepared.
    """
    check_options(size, val_fraction, workers)
    out = Path(out)
    report = PrepareReport("nih", out)
    present = find_pngs(images_dir, report)
    entries, listed = read_data_entry(data_entry_csv, report, wanted=set(present))
    boxes = read_boxes(boxes_csv, report)  # bad rows are reported and skipped
    report.count("listed_images", len(listed))
    report.add_ids("images_without_labels", present.keys() - entries.keys())
    report.id_counts["labels_without_images"] = len(listed - present.keys())  # ~10^5: counted, not listed

    check_size_stamp(out, STAMP_NAME, size, force)
    manifest = PrepareManifest(out, "nih", report, force)
    writer = DatasetWriter(out, DatasetInfo("nih", "multiclass", list(FINDINGS)))
    by_image = boxes_by_image(boxes)
    tasks = [
        _ImageTask(
            i,
            str(present[i]),
            str(out),
            size,
            f"{file_stamp(present[i])}|size={size or 0}",
            _labels_digest(entries[i], by_image.get(i, [])),
            manifest.previous(i),
            force,
        )
        for i in sorted(present.keys() & entries.keys())
    ]
    originals: dict[str, tuple[int, int]] = {}  # prepared id -> its source's (width, height)
    failed: set[str] = set()
    for result in parallel_map(_prepare_image, tasks, workers, progress, "nih"):
        for where, message in result.problems:
            report.add_problem(where, message)
        report.count(result.status)
        if result.status == "failed":
            failed.add(result.image_id)
        else:
            originals[result.image_id] = result.original
        manifest.note(report, result.image_id, result.change, result.record)
    prepared = set(originals)
    report.counts["prepared"] = len(prepared)

    kept = [scale_box(box, originals[box.image_id], size) for box in boxes if box.image_id in originals]
    _count_boxes(report, boxes, kept, entries)
    report.write()
    if not report.ok:
        writer.keep_previous()
        report.error = nothing_prepared_reason(
            report, data_entry_csv, listed, images_dir, present, "PNG", "Image Index"
        )
        report.write()
        raise DataError(f"no NIH image could be prepared from {images_dir}: {report.error}; see {report.path}")
    manifest.finish(report, ".png", set(present), failed)
    writer.write_labels({i: entries[i].labels for i in prepared})
    write_boxes(out / BOXES_NAME, kept)
    for name, ids in patient_splits(prepared, entries, {b.image_id for b in kept}, val_fraction, seed).items():
        report.counts[f"split_{name}"] = len(ids)
        writer.write_split(name, ids)  # an empty split removes the file of an earlier run
    report.write()
    writer.write_info()
    return report


def _labels_digest(entry: Entry, boxes: list[Box]) -> str:
    """What an image's labels are made from: its findings, its patient (its split) and its boxes."""
    return digest([entry.labels, entry.patient, sorted([b.finding, b.x, b.y, b.w, b.h] for b in boxes)])


def find_pngs(images_dir: str | Path, report: PrepareReport) -> dict[str, Path]:
    root = Path(images_dir)
    if not root.is_dir():
        raise DataError(f"image directory not found: {root}")
    found: dict[str, Path] = {}
    for folder, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            if not name.lower().endswith(".png"):
                continue
            path = Path(folder) / name
            image_id = image_id_of(name)
            if image_id in found:
                report.add_problem(path, f"duplicate image id {image_id!r} (also {found[image_id]}): skipped")
                report.count("duplicate_ids")
                continue
            found[image_id] = path
    report.count("images_found", len(found))
    return found


def _count_boxes(report: PrepareReport, boxes: list[Box], kept: list[Box], entries: dict[str, Entry]) -> None:
    report.counts["boxes"] = len(kept)
    report.counts["boxes_without_image"] = len(boxes) - len(kept)
    index = {name: k for k, name in enumerate(FINDINGS)}
    unlabelled = [b for b in kept if not entries[b.image_id].labels[index[b.finding]]]
    report.counts["boxes_finding_not_in_labels"] = len(unlabelled)


def patient_splits(
    prepared: set[str], entries: dict[str, Entry], boxed: set[str], val_fraction: float, seed: int
) -> dict[str, list[str]]:
    """train / val / test ids, whole patients per split (see the module doc)."""
    test_patients = {entries[i].patient for i in boxed}
    others = sorted({entries[i].patient for i in prepared} - test_patients)
    order = np.random.default_rng(seed).permutation(len(others))
    val_patients = {others[k] for k in order[: int(len(others) * val_fraction + 0.5)]}
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for image_id in sorted(prepared):
        patient = entries[image_id].patient
        name = "test" if patient in test_patients else "val" if patient in val_patients else "train"
        splits[name].append(image_id)
    return splits
