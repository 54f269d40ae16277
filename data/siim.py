"""SIIM-ACR Pneumothorax (Kaggle 2019): DICOMs + RLE label CSV -> the prepared layout.

- Images: every ``*.dcm`` under ``dicom_dir`` (Kaggle nests them in study/series folders); the
  image id is the file name without ``.dcm`` (Kaggle names each file by its SOPInstanceUID,
  the ``ImageId`` of the CSV). Read with :func:`data.dicom.read_dicom`, resized to
  ``size`` x ``size`` (area averaging when shrinking, bilinear when enlarging) and saved as
  8-bit grayscale PNG.
- Labels: ``ImageId, EncodedPixels`` rows, SIIM RLE (:mod:`data.rle`); the rows of one image are
  a union. The CSV may have a header or not, a UTF-8 BOM, CRLF endings, and the column named
  ``EncodedPixels`` or `` EncodedPixels``; a first row that neither names those columns nor
  reads as an RLE row is skipped as a header and reported. pneumothorax = the full-resolution
  mask is not empty. Masks are class indices 0/1, resized with nearest neighbour only.
- Splits: ``train`` / ``val``, stratified (positives and negatives each give ``val_fraction``
  to val), a seeded shuffle of the sorted ids, so the same inputs and seed give the same split.
- Robustness: a bad DICOM, a bad RLE row (reported as ``csv:line``, an empty ImageId included)
  or a duplicate image id skips that image and is listed in ``prepare_report.json``. An image
  listed as ``-1`` and with a mask is a contradiction: reported (naming the ImageId), the mask
  kept, as the union rule of several rows has it. Only an empty result is an error, whose line
  says why (no label rows, no ImageId matching a DICOM file name, or every image failing).
- Resumable and streaming: ``out/prepare_manifest.json`` (:mod:`data.prepare_manifest`) records
  what each image was made from (its DICOM's size and mtime, its RLE rows). A rerun keeps the
  images whose inputs are unchanged without reading them, redoes the mask alone when only its
  rows changed (positive to negative or back), image and mask when the DICOM changed, removes
  the outputs of images gone from the inputs, and lists each kind in the report. A folder
  prepared before manifests existed is verified: masks recomputed from the rows (rewritten only
  where they differ), images kept unless their DICOM is newer. ``size`` is recorded in
  ``out/siim.json`` and a rerun with another size is refused unless ``force``, which redoes every
  image (a file whose content comes out the same is kept). Images fan out over ``workers``
  processes that return only small results, so memory does not grow with the number of files.
"""

from __future__ import annotations

import csv
import gzip
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from data.dicom import dicom_shape, read_dicom
from data.errors import DataError
from data.images import open_image
from data.layout import DatasetInfo, DatasetWriter, default_palette
from data.parallel import parallel_map
from data.prepare_manifest import (
    FORCED,
    LABELS,
    NEW,
    UNCHANGED,
    UNKNOWN,
    VERIFIED,
    PrepareManifest,
    digest,
    file_stamp,
    item_change,
    output_stamps,
    source_not_newer,
    unknown_change,
    write_mask_if_changed,
)
from data.prepare_report import (
    PrepareReport,
    check_options,
    check_size_stamp,
    nothing_prepared_reason,
    resize_image,
    save_png,
)
from data.rle import siim_rle_decode, siim_rle_is_empty

CLASSES = ["pneumothorax"]
PALETTE = default_palette(len(CLASSES) + 1)
_RLE_CHARACTERS = re.compile(r"^[-\d\s]*$")
STAMP_NAME = "siim.json"  # the options that shape the pixels, recorded for resuming


@dataclass(frozen=True)
class RleRow:
    """One EncodedPixels string and its 1-based line in the CSV (for error messages)."""

    line: int
    text: str


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def find_dicoms(dicom_dir: str | Path, report: PrepareReport) -> dict[str, Path]:
    """Image id -> DICOM path for every ``.dcm`` below ``dicom_dir`` (duplicates reported)."""
    root = Path(dicom_dir)
    if not root.is_dir():
        raise DataError(f"DICOM directory not found: {root}")
    found: dict[str, Path] = {}
    for path in sorted(_walk_dcm(root)):
        report.count("dicom_files")
        image_id = path.stem
        if image_id in found:
            report.add_problem(path, f"duplicate image id {image_id!r} (also {found[image_id]}): skipped")
            report.count("duplicate_ids")
            continue
        found[image_id] = path
    return found


def _walk_dcm(root: Path):
    for folder, _, names in os.walk(root):
        for name in names:
            if name.lower().endswith(".dcm"):
                yield Path(folder) / name


def read_rle_csv(path: str | Path, report: PrepareReport) -> dict[str, list[RleRow]]:
    """Image id -> its EncodedPixels rows; unreadable rows are reported as ``path:line``.

    Lines are decoded one by one, so a stray byte costs one row, not the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"RLE label file not found: {path}")
    raw = _read_bytes(path)
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    rows: dict[str, list[RleRow]] = {}
    columns = None
    for line_no, line_bytes in enumerate(raw.splitlines(), start=1):
        where = f"{path}:{line_no}"
        fields = _csv_fields(line_bytes, where, report)
        if not fields:
            continue
        if columns is None:
            columns, is_header = _columns(fields)
            if is_header:
                if not _names_a_column(fields):  # a malformed first data row, or a foreign header
                    report.add_problem(
                        where,
                        f"first row {','.join(fields)[:80]!r} is neither an RLE row "
                        "nor a header naming ImageId / EncodedPixels: skipped",
                    )
                    report.count("bad_rle_rows")
                continue
        id_col, rle_col = columns
        if len(fields) <= max(id_col, rle_col):
            report.add_problem(where, f"expected ImageId and EncodedPixels, got {len(fields)} field(s)")
            report.count("bad_rle_rows")
            continue
        image_id = fields[id_col].strip()
        if not image_id:
            report.add_problem(where, "empty ImageId")
            report.count("bad_rle_rows")
            continue
        rows.setdefault(image_id, []).append(RleRow(line_no, fields[rle_col]))
    return rows


def _read_bytes(path: Path) -> bytes:
    """The file's bytes; ``.gz`` files (as the full Kaggle label file is shared) are unpacked."""
    if path.suffix.lower() != ".gz":
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: not a readable gzip file ({error})") from None


def _csv_fields(line_bytes: bytes, where: str, report: PrepareReport) -> list[str]:
    """The fields of one line; [] for a blank line. A line of empty fields (``,`` or ``" ",``)
    is a row whose ImageId is empty, reported by the caller, not a blank line."""
    try:
        line = line_bytes.decode("utf-8")
        fields = next(csv.reader([line]), [])
    except (UnicodeDecodeError, csv.Error) as error:
        report.add_problem(where, f"unreadable CSV row ({type(error).__name__})")
        report.count("bad_rle_rows")
        return []
    return fields if len(fields) > 1 or any(f.strip() for f in fields) else []


def _names_a_column(first: list[str]) -> bool:
    names = [f.strip().lower() for f in first]
    return "imageid" in names or "encodedpixels" in names


def _columns(first: list[str]) -> tuple[tuple[int, int], bool]:
    """(ImageId column, EncodedPixels column) and whether the first row is a header."""
    names = [f.strip().lower() for f in first]
    if _names_a_column(first):
        id_col = names.index("imageid") if "imageid" in names else 0
        rle_col = names.index("encodedpixels") if "encodedpixels" in names else 1
        return (id_col, rle_col), True
    looks_like_data = len(first) >= 2 and _RLE_CHARACTERS.match(first[1]) is not None
    return (0, 1), not looks_like_data


# --------------------------------------------------------------------------------------------
# One image (runs in a worker process)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ImageTask:
    image_id: str
    dicom: str
    rows: tuple[RleRow, ...]
    csv_path: str
    out: str
    size: int | None
    source: str  # the DICOM's stamp and --size (see data.prepare_manifest)
    labels: str  # digest of the image's RLE rows
    previous: dict | None  # the record of the run that prepared it, if any
    force: bool = False


@dataclass
class _ImageResult:
    image_id: str
    status: str  # "converted" | "relabelled" (mask only) | "resumed" | "failed"
    positive: bool = False
    problems: list[tuple[str, str]] = field(default_factory=list)
    change: str = NEW  # how its inputs stood against its record (data.prepare_manifest)
    record: dict | None = None


def _prepare_image(task: _ImageTask) -> _ImageResult:
    image_path = Path(task.out) / "images" / f"{task.image_id}.png"
    mask_path = Path(task.out) / "masks" / f"{task.image_id}.png"
    change = FORCED if task.force else item_change(task.previous, task.source, task.labels, task.out)
    try:
        if change == UNCHANGED:
            return _ImageResult(task.image_id, "resumed", _rows_positive(task), change=change, record=task.previous)
        if change == LABELS and _recorded_shape(task.previous):  # the DICOM is as recorded: its pixels are kept
            return _redo_mask(task, _recorded_shape(task.previous), change)
        if change == UNKNOWN:
            if _finished(image_path, mask_path, task.size) and source_not_newer(task.dicom, image_path):
                return _redo_mask(task, dicom_shape(task.dicom), VERIFIED)
            change = unknown_change(task.dicom, image_path)
        image = read_dicom(task.dicom)
        mask = _decode_rows(task, *image.shape)
    except _RowError as error:
        return _ImageResult(task.image_id, "failed", problems=[(error.where, error.message)])
    except DataError as error:
        return _ImageResult(task.image_id, "failed", problems=[(task.dicom, _strip(str(error), task.dicom))])
    size = (task.size, task.size) if task.size else (image.shape[1], image.shape[0])
    save_png(resize_image(image, size), image_path)
    write_mask_if_changed(mask_path, _resize_mask(mask, size), PALETTE)
    return _ImageResult(task.image_id, "converted", bool(mask.any()), change=change, record=_record(task, image.shape))


def _redo_mask(task: _ImageTask, shape: tuple[int, int], change: str) -> _ImageResult:
    """The mask again from the rows, at the DICOM's ``shape``; its file is rewritten only when its
    pixels differ. A verified (unrecorded) image whose mask was wrong counts as relabelled."""
    mask = _decode_rows(task, *shape)
    mask_path = Path(task.out) / "masks" / f"{task.image_id}.png"
    size = (task.size, task.size) if task.size else (shape[1], shape[0])
    rewritten = write_mask_if_changed(mask_path, _resize_mask(mask, size), PALETTE)
    if change == VERIFIED and rewritten:
        change = LABELS
    status = "relabelled" if rewritten else "resumed"
    return _ImageResult(task.image_id, status, bool(mask.any()), change=change, record=_record(task, shape))


def _recorded_shape(record: dict) -> tuple[int, int] | None:
    """The DICOM's (height, width) in a record, None when it holds none that is usable."""
    shape = record.get("shape")
    if isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) and v > 0 for v in shape):
        return shape[0], shape[1]
    return None


def _record(task: _ImageTask, shape: tuple[int, ...]) -> dict:
    names = [f"images/{task.image_id}.png", f"masks/{task.image_id}.png"]
    return {
        "source": task.source,
        "labels": task.labels,
        "shape": [int(shape[0]), int(shape[1])],
        "outputs": output_stamps(task.out, names),
    }


def rows_digest(rows: tuple[RleRow, ...]) -> str:
    """What an image's mask is made from: its RLE strings, whitespace normalised and sorted (the
    rows of one image are a union, so neither their order nor their lines matter)."""
    return digest(sorted(" ".join(row.text.split()) for row in rows))


def conflicting_rows(image_id: str, rows: tuple[RleRow, ...], csv_path: str) -> tuple[str, str] | None:
    """(where, message) when an image is listed as ``-1`` and with a mask: the mask wins (a union
    with nothing), but the label file contradicts itself. Rows that do not decode are left to the
    decoder's own report."""
    empty, filled = [], []
    for row in rows:
        try:
            (empty if siim_rle_is_empty(row.text) else filled).append(row.line)
        except DataError:
            return None
    if not (empty and filled):
        return None
    lines = ", ".join(str(line) for line in filled)
    return (
        f"{csv_path}:{empty[0]}",
        f"{image_id} is listed as -1 (no pneumothorax) here and with a mask on "
        f"line {lines}: kept positive, with the mask",
    )


class _RowError(Exception):
    def __init__(self, where: str, message: str):
        super().__init__(message)
        self.where, self.message = where, message


def _decode_rows(task: _ImageTask, height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    for row in task.rows:
        try:
            mask |= siim_rle_decode(row.text, height, width)
        except DataError as error:
            raise _RowError(f"{task.csv_path}:{row.line}", f"{task.image_id}: {error}") from None
    return mask


def _rows_positive(task: _ImageTask) -> bool:
    """pneumothorax from the text alone, for resumed images (whose DICOM is not read again)."""
    positive = False
    for row in task.rows:
        try:
            positive |= not siim_rle_is_empty(row.text)
        except DataError as error:
            raise _RowError(f"{task.csv_path}:{row.line}", f"{task.image_id}: {error}") from None
    return positive


def _finished(image_path: Path, mask_path: Path, size: int | None) -> bool:
    """Both outputs exist, decode completely (a cut-short PNG has a valid header) and have the
    expected (same) size: an unrecorded image (see data.prepare_manifest) that may be kept."""
    if not (image_path.is_file() and mask_path.is_file()):
        return False
    try:
        with open_image(image_path) as image, open_image(mask_path) as mask:
            image.load()
            mask.load()
            sizes_agree = image.size == mask.size
            return sizes_agree and (size is None or image.size == (size, size))
    except (OSError, ValueError, SyntaxError, DataError):  # damaged, or too large: made again
        return False


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest neighbour only: any other filter would invent class values at region borders."""
    if (mask.shape[1], mask.shape[0]) == size:
        return mask
    return np.array(Image.fromarray(mask).resize(size, Image.NEAREST))


def _strip(message: str, where: str) -> str:
    prefix = f"{where}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


# --------------------------------------------------------------------------------------------
# The whole dataset
# --------------------------------------------------------------------------------------------


def prepare_siim(
    dicom_dir: str | Path,
    rle_csv: str | Path,
    out: str | Path,
    size: int | None = 1024,
    val_fraction: float = 0.1,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    force: bool = False,
) -> PrepareReport:
    """Prepare SIIM-ACR into ``out``; see the module doc. ``size`` None keeps the DICOM size;
    ``force`` redoes every image whatever the manifest says.

    Raises DataError (after writing the report) only when no image could be prepared.
    """
    check_options(size, val_fraction, workers)
    out = Path(out)
    report = PrepareReport("siim", out)
    dicoms = find_dicoms(dicom_dir, report)
    rows = read_rle_csv(rle_csv, report)
    report.count("labelled_images", len(rows))
    report.add_ids("images_without_labels", dicoms.keys() - rows.keys())
    report.add_ids("labels_without_images", rows.keys() - dicoms.keys())

    check_size_stamp(out, STAMP_NAME, size, force)
    info = DatasetInfo(name="siim", task="binary", classes=list(CLASSES), palette=PALETTE)
    manifest = PrepareManifest(out, "siim", report, force)
    writer = DatasetWriter(out, info)
    tasks = []
    for image_id in sorted(dicoms.keys() & rows.keys()):
        conflict = conflicting_rows(image_id, tuple(rows[image_id]), str(rle_csv))
        if conflict is not None:
            report.add_problem(*conflict)
            report.count("conflicting_labels")
        tasks.append(
            _ImageTask(
                image_id,
                str(dicoms[image_id]),
                tuple(rows[image_id]),
                str(rle_csv),
                str(out),
                size,
                f"{file_stamp(dicoms[image_id])}|size={size or 0}",
                rows_digest(tuple(rows[image_id])),
                manifest.previous(image_id),
                force,
            )
        )
    labels: dict[str, list[int]] = {}
    failed: set[str] = set()
    for result in parallel_map(_prepare_image, tasks, workers, progress, "siim"):
        for where, message in result.problems:
            report.add_problem(where, message)
        report.count(result.status)
        if result.status == "failed":
            failed.add(result.image_id)
        else:
            labels[result.image_id] = [int(result.positive)]
        manifest.note(report, result.image_id, result.change, result.record)
    report.counts["prepared"] = len(labels)
    report.counts["positive"] = sum(v[0] for v in labels.values())
    report.write()
    if not report.ok:
        writer.keep_previous()
        report.error = nothing_prepared_reason(report, rle_csv, rows, dicom_dir, dicoms, "DICOM")
        report.write()
        raise DataError(f"no SIIM image could be prepared: {report.error}; see {report.path}")
    manifest.finish(report, ".png", set(dicoms), failed)
    _finish(writer, labels, val_fraction, seed, report)
    return report


def _finish(
    writer: DatasetWriter, labels: dict[str, list[int]], val_fraction: float, seed: int, report: PrepareReport
) -> None:
    report.write()
    train, val = stratified_split(labels, val_fraction, seed)
    writer.write_labels(labels)
    writer.write_split("train", train)
    writer.write_split("val", val)  # empty (--val-fraction 0): removes an earlier val.txt
    writer.write_info()


def stratified_split(labels: dict[str, list[int]], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, val) ids: each label pattern gives n * val_fraction of its ids (rounded half up)
    to val."""
    rng = np.random.default_rng(seed)
    groups: dict[tuple[int, ...], list[str]] = {}
    for image_id in sorted(labels):
        groups.setdefault(tuple(labels[image_id]), []).append(image_id)
    val: set[str] = set()
    for key in sorted(groups):
        ids = groups[key]
        chosen = rng.permutation(len(ids))[: int(len(ids) * val_fraction + 0.5)]
        val.update(ids[i] for i in chosen)
    ordered = sorted(labels)
    return [i for i in ordered if i not in val], [i for i in ordered if i in val]
