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
- Robustness: a bad DICOM, a bad RLE row (reported as ``csv:line``) or a duplicate image id
  skips that image and is listed in ``prepare_report.json``; only an empty result is an error.
- Resumable and streaming: an image whose image and mask PNGs already exist, decode completely
  and have the right size is not converted again. ``size`` is recorded in ``out/siim.json``
  and a rerun with another size is refused (use a new ``out``); resuming also assumes the
  same inputs: use a new ``out`` after changing the CSV. Images fan out over ``workers``
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

from data.dicom import read_dicom
from data.errors import DataError
from data.images import open_image
from data.layout import DatasetInfo, DatasetWriter, default_palette, write_index_png
from data.prepare_report import (PrepareReport, check_options, check_size_stamp, parallel_map, resize_image,
                                 save_png)
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
                    report.add_problem(where, f"first row {','.join(fields)[:80]!r} is neither an RLE row "
                                              "nor a header naming ImageId / EncodedPixels: skipped")
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
    try:
        line = line_bytes.decode("utf-8")
        fields = next(csv.reader([line]), [])
    except (UnicodeDecodeError, csv.Error) as error:
        report.add_problem(where, f"unreadable CSV row ({type(error).__name__})")
        report.count("bad_rle_rows")
        return []
    return fields if any(f.strip() for f in fields) else []


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


@dataclass
class _ImageResult:
    image_id: str
    status: str  # "converted" | "resumed" | "failed"
    positive: bool = False
    problems: list[tuple[str, str]] = field(default_factory=list)


def _prepare_image(task: _ImageTask) -> _ImageResult:
    image_path = Path(task.out) / "images" / f"{task.image_id}.png"
    mask_path = Path(task.out) / "masks" / f"{task.image_id}.png"
    try:
        if _finished(image_path, mask_path, task.size):
            return _ImageResult(task.image_id, "resumed", _rows_positive(task))
        image = read_dicom(task.dicom)
        mask = _decode_rows(task, *image.shape)
    except _RowError as error:
        return _ImageResult(task.image_id, "failed", problems=[(error.where, error.message)])
    except DataError as error:
        return _ImageResult(task.image_id, "failed", problems=[(task.dicom, _strip(str(error), task.dicom))])
    size = (task.size, task.size) if task.size else (image.shape[1], image.shape[0])
    save_png(resize_image(image, size), image_path)
    write_index_png(mask_path, _resize_mask(mask, size), PALETTE)
    return _ImageResult(task.image_id, "converted", bool(mask.any()))


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
    expected (same) size."""
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
    return message[len(prefix):] if message.startswith(prefix) else message


# --------------------------------------------------------------------------------------------
# The whole dataset
# --------------------------------------------------------------------------------------------

def prepare_siim(dicom_dir: str | Path, rle_csv: str | Path, out: str | Path, size: int | None = 1024,
                 val_fraction: float = 0.1, seed: int = 0, workers: int = 1,
                 progress: bool = True) -> PrepareReport:
    """Prepare SIIM-ACR into ``out``; see the module doc. ``size`` None keeps the DICOM size.

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

    check_size_stamp(out, STAMP_NAME, size)
    info = DatasetInfo(name="siim", task="binary", classes=list(CLASSES), palette=PALETTE)
    writer = DatasetWriter(out, info)
    tasks = [_ImageTask(i, str(dicoms[i]), tuple(rows[i]), str(rle_csv), str(out), size)
             for i in sorted(dicoms.keys() & rows.keys())]
    labels: dict[str, list[int]] = {}
    for result in parallel_map(_prepare_image, tasks, workers, progress, "siim"):
        for where, message in result.problems:
            report.add_problem(where, message)
        report.count(result.status)
        if result.status != "failed":
            labels[result.image_id] = [int(result.positive)]
    report.counts["prepared"] = len(labels)
    report.counts["positive"] = sum(v[0] for v in labels.values())
    _finish(writer, labels, val_fraction, seed, report)
    return report


def _finish(writer: DatasetWriter, labels: dict[str, list[int]], val_fraction: float, seed: int,
            report: PrepareReport) -> None:
    report.write()
    if not report.ok:
        writer.keep_previous()
        raise DataError(f"no SIIM image could be prepared; see {report.path}")
    train, val = stratified_split(labels, val_fraction, seed)
    writer.write_labels(labels)
    writer.write_split("train", train)
    writer.write_split("val", val)  # empty (--val-fraction 0): removes an earlier val.txt
    writer.write_info()


def stratified_split(labels: dict[str, list[int]], val_fraction: float, seed: int
                     ) -> tuple[list[str], list[str]]:
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
