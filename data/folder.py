"""A user's own dataset, a folder of images and a CSV of image-level labels -> the prepared layout.

- Images: every file below ``images_dir`` that Pillow opens (PNG, JPEG, TIFF, 16-bit included) or
  that is a DICOM (by suffix or by its magic), hidden files and folders left out, read by
  :func:`data.image_files.read_image_file` and written as 8-bit grayscale or RGB PNG (with
  ``size``: the longer side resized to ``size``, aspect kept). An image's id is its path below
  ``images_dir`` without the suffix (``patient1/scan2``), written into the layout as the flat name
  :func:`data.layout.encode_id` makes of it (``patient1%2Fscan2``). Two files giving one id
  (``a.png`` and ``a.jpg``) are both left out.
- Labels (:func:`read_label_table`), the CSV's first column naming the image by its id, its path
  with the suffix, or its prepared id. Two layouts:
  *long*, a header of two columns the second of which is named ``labels`` (or ``label``,
  ``classes``, ``findings``): the classes present, separated by ``|`` or ``;`` (then a name may
  hold spaces) or else by spaces; empty = none. (Such a column holding only 1/0/-1 is the wide
  layout of one class: ``image,label`` with 0/1 is a binary dataset whose class is "label".)
  *wide*, any other header: one column per class holding 1 (present), 0 (absent), -1 (uncertain,
  CheXpert's) or blank (``blank``: negative, CheXpert's "not mentioned", or uncertain). Without
  ``classes``, the columns whose values are such labels are the classes and the others (age,
  sex, view ...) are left out and listed in the report.
  Classes: ``classes`` (a file of names, one a line) or the CSV's column order (wide) or its
  sorted names (long). One class makes the binary task (as SIIM), several the multi-label task
  with a background (as VOC).
- Uncertain labels (``uncertain``): ``ignore`` (default) keeps the image for the classes it is
  sure of: labels.csv says 0 and ``uncertain.csv`` 1 for that class; the classifier's loss leaves
  the entry out, the IRN and the segmenter (whose losses cannot leave one class out) do not train
  on the image. ``positive`` / ``negative`` replace it by 1 / 0.
- Masks (scoring only), ``masks_dir``: ``<id>.<any image suffix>`` as class indices (palette or
  grayscale PNG, 255 = ignore) or, for one class, 0/255 (255 = the class; a mask holding only 0
  and 255 is read that way). A mask that does not decode, has another size than its image (as
  displayed) or holds another index is reported and left out (its image is kept); one whose
  classes differ from the image's labels is listed.
- Splits: ``splits_dir`` with ``<name>.txt`` lists (one image a line, named as in the CSV), or
  ``train`` / ``val`` from a label-stratified, seeded ``val_fraction`` (:func:`stratified_split`).
- Robustness: an image without a label row, a row naming no image, a row with another class or a
  bad value, a duplicate row with other labels, an id that cannot be a file name: each is listed
  in ``prepare_report.json`` and left out, the rest prepared. Only an empty result is an error.
- Reruns (:mod:`data.prepare_manifest`): a changed image is redone, a changed label row or mask
  redoes the mask alone, removed inputs lose their outputs, unchanged ones are kept without being
  read; ``force`` redoes everything. ``size`` is recorded in ``out/folder.json``.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from data.dicom import is_dicom
from data.errors import DataError
from data.image_files import image_file_size, image_suffixes, read_image_file
from data.images import open_image
from data.layout import (
    IGNORE_INDEX,
    DatasetInfo,
    DatasetWriter,
    default_palette,
    encode_id,
)
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

STAMP_NAME = "folder.json"  # --size, recorded for resuming
UNCERTAIN_POLICIES = ("ignore", "positive", "negative")
BLANK_POLICIES = ("negative", "uncertain")
LONG_COLUMN_NAMES = ("labels", "label", "classes", "findings")
POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1
_VALUES = {"1": POSITIVE, "1.0": POSITIVE, "0": NEGATIVE, "0.0": NEGATIVE, "-1": UNCERTAIN, "-1.0": UNCERTAIN}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MAX_NAME_BYTES = 250  # a file name is at most 255 bytes; the id gets ".png" / ".npz" and temporary marks


# --------------------------------------------------------------------------------------------
# Images and masks: files -> ids
# --------------------------------------------------------------------------------------------


@dataclass
class FoundFiles:
    """Id -> file below a folder, and how a CSV or split list may name each one."""

    root: Path
    files: dict[str, Path] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)  # id, relative path, prepared id -> prepared id

    def resolve(self, token: str) -> str | None:
        """The prepared id a CSV cell names (its id, its relative path with suffix, or the prepared
        id itself; Windows separators and a leading ./ accepted), or None."""
        token = token.strip()
        for form in (token, token.replace("\\", "/")):
            form = form[2:] if form.startswith("./") else form
            if form in self.names:
                return self.names[form]
        return None


def find_files(root: str | Path, report: PrepareReport, what: str, skip: tuple[Path, ...] = ()) -> FoundFiles:
    """Every image file below ``root`` (see the module doc), by prepared id. Files of no image
    format are counted; ids shared by two files, or unusable as a file name, are reported and
    left out. Folders in ``skip`` (the output, a masks folder inside the images folder) are not
    searched."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{what} folder not found: {root}")
    suffixes = image_suffixes()
    skipped = {p.resolve() for p in skip}
    found = FoundFiles(root)
    paths: dict[str, list[Path]] = {}
    for folder, folders, names in os.walk(root):
        folder_path = Path(folder)
        folders[:] = sorted(f for f in folders if not f.startswith(".") and (folder_path / f).resolve() not in skipped)
        for name in sorted(names):
            path = folder_path / name
            if name.startswith(".") or not path.is_file():
                continue
            relative = path.relative_to(root).as_posix()
            if path.suffix.lower() in suffixes:
                raw = relative[: -len(path.suffix)]
            elif is_dicom(path):  # a DICOM named by its UID, whose last part is no suffix
                raw = relative
            else:
                report.count(f"{what}_other_files")
                continue
            paths.setdefault(raw, []).append(path)
    for raw, same in sorted(paths.items()):
        problem = _id_problem(raw)
        if problem is None and len(same) > 1:
            problem = f"{len(same)} files give the id {raw!r} ({', '.join(p.name for p in same)}): all left out"
        if problem is not None:
            for path in same:
                report.add_problem(path, problem)
            report.count(f"{what}_files_left_out", len(same))
            continue
        image_id = encode_id(raw)
        found.files[image_id] = same[0]
        for name in (raw, same[0].relative_to(root).as_posix(), image_id):
            found.names.setdefault(name, image_id)
    report.count(f"{what}_files", len(found.files))
    return found


def _id_problem(raw: str) -> str | None:
    """Why a relative path cannot be an id: the split lists and labels.csv hold one id a line and
    strip it, and the id is a file name."""
    if any(ord(c) < 32 or ord(c) == 127 for c in raw):
        return f"the id {raw!r} holds a control character: left out"
    if raw != raw.strip():
        return f"the id {raw!r} starts or ends with a space: left out"
    if len(encode_id(raw).encode()) > _MAX_NAME_BYTES:
        return f"the id {raw!r} is too long for a file name ({_MAX_NAME_BYTES} bytes): left out"
    return None


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


@dataclass
class LabelTable:
    """What a label CSV says: the classes, and per prepared id its values (1 present, 0 absent,
    -1 uncertain, one per class) and the CSV line they are on."""

    layout: str
    classes: list[str]
    rows: dict[str, tuple[tuple[int, ...], int]]
    unmatched: list[str] = field(default_factory=list)  # CSV names matching no image
    conflicting: set[str] = field(default_factory=set)  # ids with two rows that disagree: left out


def read_classes_file(path: str | Path) -> list[str]:
    """Class names, one a line (blank lines and lines starting with # skipped), in the order that
    makes their indices 1..C."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"classes file not found: {path}")
    names = [line.strip() for line in _read_text(path).splitlines()]
    names = [name for name in names if name and not name.startswith("#")]
    return check_class_names(names, str(path))


def check_class_names(names: list[str], where: str) -> list[str]:
    if not names:
        raise DataError(f"{where}: no class named")
    seen = set()
    for name in names:
        if name in seen:
            raise DataError(f"{where}: class {name!r} named twice")
        if name == "image_id":
            raise DataError(f"{where}: 'image_id' cannot be a class name (it heads the id column of labels.csv)")
        seen.add(name)
    return names


def read_label_table(
    path: str | Path,
    images: FoundFiles,
    report: PrepareReport,
    classes: list[str] | None = None,
    blank: str = "negative",
) -> LabelTable:
    """The label CSV (see the module doc). A bad row is reported as ``path:line`` and left out; a
    duplicate row with the same labels is counted, one with other labels leaves the image out."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"label file not found: {path}")
    lines = [row for row in _csv_rows(path) if any(cell.strip() for cell in row[1])]
    if not lines:
        raise DataError(f"{path}: empty (expected a header and a row per image)")
    header_line, header = lines[0]
    header = [cell.strip() for cell in header]
    if len(header) < 2:
        raise DataError(
            f"{path}:{header_line}: expected a header with the image column and the labels, got {','.join(header)!r}"
        )
    # "image,label" holding 1/0 is the wide layout of one class named "label", not class names
    long = (
        len(header) == 2
        and header[1].lower() in LONG_COLUMN_NAMES
        and not _is_label_column([cells[1] if len(cells) > 1 else "" for _, cells in lines[1:]], strict=True)
    )
    if long:
        parsed, classes = _long_rows(path, lines[1:], classes, report)
    else:
        parsed, classes = _wide_rows(path, header, lines[1:], classes, blank, report)
    report.count("label_rows", len(parsed))
    table = LabelTable("long" if long else "wide", classes, {})
    conflicting = table.conflicting
    for line, token, values in parsed:
        image_id = images.resolve(token)
        if image_id is None:
            table.unmatched.append(token)
            continue
        if image_id in table.rows:
            before, first = table.rows[image_id]
            if before == values:
                report.count("duplicate_rows")
            else:
                report.add_problem(
                    f"{path}:{line}", f"{token!r} is also on line {first} with other labels: image left out"
                )
                conflicting.add(image_id)
            continue
        table.rows[image_id] = (values, line)
    for image_id in conflicting:
        del table.rows[image_id]
    report.add_ids("conflicting_rows", conflicting)
    report.add_ids("labels_without_images", table.unmatched)
    return table


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[error.start]:02x})") from None


def _csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, cells) of every row."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    rows = []
    try:
        for cells in reader:
            rows.append((reader.line_num, cells))
    except csv.Error as error:
        raise DataError(f"{path}:{reader.line_num}: not a readable CSV row ({error})") from None
    return rows


def split_names(cell: str) -> list[str]:
    """The class names of a long-layout cell: separated by | or ; when it holds one (names may
    then hold spaces, "Pleural Effusion"), else by spaces."""
    parts = re.split(r"[|;]", cell) if re.search(r"[|;]", cell) else cell.split()
    return [part.strip() for part in parts if part.strip()]


def _long_rows(path: Path, rows, classes: list[str] | None, report: PrepareReport):
    named = []
    for line, cells in rows:
        if len(cells) > 2 and any(cell.strip() for cell in cells[2:]):
            report.add_problem(f"{path}:{line}", f"expected 2 fields (image, labels), got {len(cells)}: row left out")
            report.count("bad_label_rows")
            continue
        token = cells[0].strip()
        if not token:
            report.add_problem(f"{path}:{line}", "no image named: row left out")
            report.count("bad_label_rows")
            continue
        named.append((line, token, split_names(cells[1] if len(cells) > 1 else "")))
    if classes is None:
        classes = check_class_names(sorted({name for _, _, names in named for name in names}), str(path))
    known = set(classes)
    parsed = []
    for line, token, names in named:
        unknown = sorted(set(names) - known)
        if unknown:
            report.add_problem(
                f"{path}:{line}", f"unknown class {unknown[0]!r} (classes: {', '.join(classes)}): row left out"
            )
            report.count("bad_label_rows")
            continue
        parsed.append((line, token, tuple(int(c in names) for c in classes)))
    return parsed, classes


def _wide_rows(path: Path, header: list[str], rows, classes: list[str] | None, blank: str, report: PrepareReport):
    columns = header[1:]
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        raise DataError(f"{path}: column {duplicated[0]!r} appears twice in the header")
    if classes is None:
        classes = [
            c
            for k, c in enumerate(columns)
            if _is_label_column([cells[k + 1] if k + 1 < len(cells) else "" for _, cells in rows])
        ]
        if not classes:
            raise DataError(f"{path}: no column holds labels (1, 0, -1 or blank) and no --classes file names them")
        classes = check_class_names(classes, str(path))
    else:
        missing = [c for c in classes if c not in columns]
        if missing:
            raise DataError(f"{path}: no column for class {missing[0]!r} (columns: {', '.join(columns)})")
    report.add_ids("ignored_columns", [c for c in columns if c not in classes])
    where = [header.index(c) for c in classes]
    parsed = []
    for line, cells in rows:
        token = cells[0].strip()
        problem = None
        if not token:
            problem = "no image named"
        elif len(cells) > len(header) and any(cell.strip() for cell in cells[len(header) :]):
            problem = f"expected {len(header)} fields, got {len(cells)}"
        values = []
        for name, k in zip(classes, where):
            if problem is not None:
                break
            cell = cells[k].strip() if k < len(cells) else ""
            if not cell:
                values.append(NEGATIVE if blank == "negative" else UNCERTAIN)
            elif cell in _VALUES:
                values.append(_VALUES[cell])
            else:
                problem = f"column {name!r}: {cell!r} is not 1, 0, -1 or blank"
        if problem is not None:
            report.add_problem(f"{path}:{line}", f"{problem}: row left out")
            report.count("bad_label_rows")
            continue
        parsed.append((line, token, tuple(values)))
    return parsed, classes


def _is_label_column(cells: list[str], strict: bool = False) -> bool:
    """A class column: at least half of its filled cells are labels (the others are then bad rows),
    or all of them and at least one with ``strict``; a column of words or numbers (age, sex, view)
    is not one."""
    filled = [cell.strip() for cell in cells if cell.strip()]
    labels = sum(cell in _VALUES for cell in filled)
    return labels == len(filled) > 0 if strict else 2 * labels >= len(filled)


# --------------------------------------------------------------------------------------------
# One image (runs in a worker process)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ImageTask:
    image_id: str
    source: str
    mask: str | None
    out: str
    size: int | None
    num_classes: int
    stamp: str  # the source's stamp and --size (see data.prepare_manifest)
    labels: str  # digest of its label row, classes and mask file
    previous: dict | None = None
    force: bool = False


@dataclass
class _ImageResult:
    image_id: str
    status: str  # "converted" | "relabelled" (mask or labels only) | "resumed" | "failed"
    has_mask: bool = False
    mask_classes: tuple[int, ...] = ()
    problems: list[tuple[str, str]] = field(default_factory=list)
    change: str = NEW
    record: dict | None = None


def _prepare_image(task: _ImageTask) -> _ImageResult:
    image_path = Path(task.out) / "images" / f"{task.image_id}.png"
    change = FORCED if task.force else item_change(task.previous, task.stamp, task.labels, task.out)
    recorded = _recorded_size(task.previous)
    if change == UNCHANGED and recorded is not None:
        return _ImageResult(
            task.image_id,
            "resumed",
            bool(task.previous.get("has_mask")),
            tuple(task.previous.get("mask_classes") or ()),
            change=change,
            record=task.previous,
        )
    try:
        if change == LABELS and recorded is not None:  # the image as recorded: not read again
            return _finish(task, recorded, change, "relabelled")
        if change == UNKNOWN:
            original = image_file_size(task.source)
            if _finished(image_path, target_size(original, task.size)) and source_not_newer(task.source, image_path):
                return _finish(task, original, VERIFIED, "resumed")
            change = unknown_change(task.source, image_path)
        pixels = read_image_file(task.source)
    except DataError as error:
        return _ImageResult(task.image_id, "failed", problems=[(task.source, _strip(str(error), task.source))])
    original = (pixels.shape[1], pixels.shape[0])
    save_png(resize_image(pixels, target_size(original, task.size)), image_path)
    return _finish(task, original, change, "converted")


def _finish(task: _ImageTask, original: tuple[int, int], change: str, status: str) -> _ImageResult:
    """Write (or remove) the mask of an image whose source is ``original`` (width, height) and
    make its record."""
    problems = []
    mask = None
    if task.mask is not None:
        try:
            mask = read_user_mask(task.mask, original, task.num_classes)
        except DataError as error:
            problems.append((task.mask, f"{_strip(str(error), task.mask)}: mask left out, image kept"))
    out = Path(task.out)
    mask_name = f"masks/{task.image_id}.png"
    if mask is not None:
        resized = resize_mask(mask, target_size(original, task.size))
        rewritten = write_mask_if_changed(out / mask_name, resized, default_palette(task.num_classes + 1))
        present = tuple(int(v) for v in np.unique(mask) if 0 < v <= task.num_classes)
    else:  # a mask of an earlier run (since removed, or now bad) would still be scored
        rewritten = (out / mask_name).is_file()
        (out / mask_name).unlink(missing_ok=True)
        present = ()
    if change == VERIFIED and rewritten:
        change, status = LABELS, "relabelled"
    names = [f"images/{task.image_id}.png"] + ([mask_name] if mask is not None else [])
    record = {
        "source": task.stamp,
        "labels": task.labels,
        "size": list(original),
        "has_mask": mask is not None,
        "mask_classes": list(present),
        "outputs": output_stamps(task.out, names),
    }
    return _ImageResult(task.image_id, status, mask is not None, present, problems, change, record)


def read_user_mask(path: str | Path, size: tuple[int, int], num_classes: int) -> np.ndarray:
    """Class indices (0..num_classes, 255) of a user's mask for an image of ``size`` (width,
    height); see the module doc. DataError naming the file otherwise."""
    path = Path(path)
    try:
        with open_image(path) as image:
            mode = image.mode
            values = np.array(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: not a readable mask ({error})") from None
    if mode not in ("P", "L", "1", "I", "I;16", "I;16B", "I;16L"):
        raise DataError(f"{path}: a {mode} image, not class indices (save them as a palette or grayscale PNG)")
    if values.ndim != 2:
        raise DataError(f"{path}: expected one channel of class indices, got shape {values.shape}")
    if (values.shape[1], values.shape[0]) != tuple(size):
        raise DataError(f"{path}: mask is {values.shape[1]}x{values.shape[0]} but its image is {size[0]}x{size[1]}")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise DataError(f"{path}: values {int(values.min())}..{int(values.max())} are not class indices 0-255")
    mask = values.astype(np.uint8)
    if num_classes == 1 and (mask == IGNORE_INDEX).any() and np.isin(mask, (0, IGNORE_INDEX)).all():
        mask = (mask == IGNORE_INDEX).astype(np.uint8)  # a 0/255 binary mask: 255 is the class
    bad = (mask > num_classes) & (mask != IGNORE_INDEX)
    if bad.any():
        raise DataError(f"{path}: class index {int(mask[bad][0])} is not 0-{num_classes} or {IGNORE_INDEX}")
    return mask


def target_size(original: tuple[int, int], size: int | None) -> tuple[int, int]:
    """(width, height) after resizing the longer side of ``original`` to ``size`` (None: unchanged)."""
    width, height = original
    if not size:
        return width, height
    if width >= height:
        return size, max(1, round(height * size / width))
    return max(1, round(width * size / height)), size


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest neighbour only: any other filter would invent class values at region borders."""
    if (mask.shape[1], mask.shape[0]) == size:
        return mask
    return np.array(Image.fromarray(mask).resize(size, Image.NEAREST))


def _recorded_size(record: dict | None) -> tuple[int, int] | None:
    size = (record or {}).get("size")
    if isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size):
        return size[0], size[1]
    return None


def _finished(path: Path, size: tuple[int, int]) -> bool:
    """The prepared image decodes completely and has ``size``: an unrecorded image that may be kept."""
    if not path.is_file():
        return False
    try:
        with open_image(path) as image:
            image.load()
            return image.size == size
    except (OSError, ValueError, SyntaxError):  # Pillow's errors for damaged files
        return False


def _strip(message: str, where: str) -> str:
    prefix = f"{where}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def stratified_split(labels: dict[str, list[int]], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, val) ids, val holding round(n * val_fraction) of them. The ids are ordered by label
    pattern (shuffled with ``seed`` inside each), then every 1/val_fraction-th goes to val: each
    pattern, a rare combination of classes included, gives val its share to within one image."""
    rng = np.random.default_rng(seed)
    ordered = []
    groups: dict[tuple[int, ...], list[str]] = {}
    for image_id in sorted(labels):
        groups.setdefault(tuple(int(v) for v in labels[image_id]), []).append(image_id)
    for key in sorted(groups):
        ids = groups[key]
        ordered += [ids[k] for k in rng.permutation(len(ids))]
    val = {
        image_id
        for k, image_id in enumerate(ordered)
        if int((k + 1) * val_fraction + 0.5) > int(k * val_fraction + 0.5)
    }
    names = sorted(labels)
    return [i for i in names if i not in val], [i for i in names if i in val]


def read_split_lists(splits_dir: str | Path, images: FoundFiles) -> dict[str, tuple[list[str], list[str]]]:
    """Split name -> (prepared ids, names that match no image) of every ``<name>.txt`` in
    ``splits_dir`` (one image a line, named as in the label CSV; blank lines skipped)."""
    folder = Path(splits_dir)
    if not folder.is_dir():
        raise DataError(f"splits folder not found: {folder}")
    lists = {}
    for path in sorted(folder.glob("*.txt")):
        if not _NAME.match(path.stem):
            raise DataError(f"{path}: a split name must be letters, digits, '.', '_' or '-'")
        ids, unmatched = [], []
        for line in _read_text(path).splitlines():
            if line.strip():
                image_id = images.resolve(line)
                (ids if image_id is not None else unmatched).append(image_id or line.strip())
        lists[path.stem] = (list(dict.fromkeys(ids)), unmatched)
    if not lists:
        raise DataError(f"{folder}: no <name>.txt split list")
    return lists


# --------------------------------------------------------------------------------------------
# The whole dataset
# --------------------------------------------------------------------------------------------


def prepare_folder(
    images_dir: str | Path,
    labels_csv: str | Path,
    out: str | Path,
    *,
    masks_dir: str | Path | None = None,
    splits_dir: str | Path | None = None,
    classes_file: str | Path | None = None,
    uncertain: str = "ignore",
    blank: str = "negative",
    size: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    name: str | None = None,
    workers: int = 1,
    progress: bool = True,
    force: bool = False,
) -> PrepareReport:
    """Prepare a folder of images with a label CSV into ``out``; see the module doc. ``size`` None
    keeps each image's size; ``name`` (default: the name of ``out``) names the dataset, and with it
    the folder of its artifacts under the run's workdir; ``force`` redoes every image.

    Raises DataError (after writing the report) only when no image could be prepared.
    """
    check_options(size, val_fraction, workers)
    if uncertain not in UNCERTAIN_POLICIES:
        raise DataError(f"--uncertain must be one of {', '.join(UNCERTAIN_POLICIES)}, got {uncertain!r}")
    if blank not in BLANK_POLICIES:
        raise DataError(f"--blank must be one of {', '.join(BLANK_POLICIES)}, got {blank!r}")
    out = Path(out)
    name = dataset_name(out, name)
    report = PrepareReport("folder", out)
    skip = tuple(Path(p) for p in (out, masks_dir, splits_dir) if p is not None)
    images = find_files(images_dir, report, "image", skip)
    classes = read_classes_file(classes_file) if classes_file is not None else None
    table = read_label_table(labels_csv, images, report, classes, blank)
    classes = table.classes
    masks = find_files(masks_dir, report, "mask", (out,)) if masks_dir is not None else None
    report.add_ids("images_without_labels", images.files.keys() - table.rows.keys() - table.conflicting)
    if masks is not None:
        report.add_ids("masks_without_images", masks.files.keys() - images.files.keys())
    splits = read_split_lists(splits_dir, images) if splits_dir is not None else None

    check_size_stamp(out, STAMP_NAME, size, force)
    task = "binary" if len(classes) == 1 else "multiclass"
    info = DatasetInfo(name=name, task=task, classes=list(classes), palette=default_palette(len(classes) + 1))
    manifest = PrepareManifest(out, "folder", report, force)
    writer = DatasetWriter(out, info)
    values = {i: _apply_policy(table.rows[i][0], uncertain) for i in table.rows if i in images.files}
    tasks = []
    for image_id in sorted(values):
        source, mask = images.files[image_id], masks.files.get(image_id) if masks is not None else None
        labels_from = [list(values[image_id]), classes, str(mask), file_stamp(mask) if mask else None]
        tasks.append(
            _ImageTask(
                image_id,
                str(source),
                str(mask) if mask else None,
                str(out),
                size,
                len(classes),
                f"{file_stamp(source)}|size={size or 0}",
                digest(labels_from),
                manifest.previous(image_id),
                force,
            )
        )
    prepared: dict[str, tuple[int, ...]] = {}
    with_mask: set[str] = set()
    disagreeing: list[str] = []
    failed: set[str] = set()
    for result in parallel_map(_prepare_image, tasks, workers, progress, "folder"):
        for where, message in result.problems:
            report.add_problem(where, message)
        report.count(result.status)
        manifest.note(report, result.image_id, result.change, result.record)
        if result.status == "failed":
            failed.add(result.image_id)
            continue
        prepared[result.image_id] = values[result.image_id]
        if result.has_mask:
            with_mask.add(result.image_id)
            if _disagrees(values[result.image_id], result.mask_classes):
                disagreeing.append(result.image_id)
    report.counts["prepared"] = len(prepared)
    report.counts["with_mask"] = len(with_mask)
    report.counts["classes"] = len(classes)
    report.add_ids("mask_disagrees_with_labels", disagreeing)
    uncertain_ids = [i for i, row in prepared.items() if UNCERTAIN in row]
    report.add_ids("images_with_uncertain_labels", uncertain_ids)
    for k, class_name in enumerate(classes):
        report.counts[f"positive/{class_name}"] = sum(row[k] == POSITIVE for row in prepared.values())
    report.write()
    if not report.ok:
        writer.keep_previous()
        report.error = nothing_prepared_reason(
            report,
            labels_csv,
            table.rows.keys() | set(table.unmatched),
            images_dir,
            images.files,
            "readable image",
            "image name",
        )
        report.write()
        raise DataError(f"no image could be prepared: {report.error}; see {report.path}")
    manifest.finish(report, ".png", set(images.files), failed)
    writer.write_labels({i: [int(v == POSITIVE) for v in row] for i, row in prepared.items()})
    writer.write_uncertain({i: [int(v == UNCERTAIN) for v in row] for i, row in prepared.items()})
    _write_splits(writer, report, out, prepared, with_mask, splits, val_fraction, seed, masks is not None)
    report.write()
    writer.write_info()
    return report


def dataset_name(out: Path, name: str | None) -> str:
    """The dataset's name (its artifacts go to <workdir>/<name>/): ``name``, else the out folder's."""
    chosen = name if name is not None else out.resolve().name
    if not _NAME.match(chosen or ""):
        option = "--name" if name is not None else f"the --out folder's name {chosen!r} (give --name)"
        raise DataError(
            f"{option}: a dataset name must start with a letter or digit and hold only letters, digits, '.', '_' or '-'"
        )
    return chosen


def _apply_policy(values: tuple[int, ...], uncertain: str) -> tuple[int, ...]:
    replace = {"positive": POSITIVE, "negative": NEGATIVE}.get(uncertain)
    return values if replace is None else tuple(replace if v == UNCERTAIN else v for v in values)


def _disagrees(values: tuple[int, ...], mask_classes: tuple[int, ...]) -> bool:
    """The mask shows a class the labels call absent, or lacks one they call present (uncertain
    ones aside)."""
    shown = set(mask_classes)
    return any((v == POSITIVE) != (k + 1 in shown) for k, v in enumerate(values) if v != UNCERTAIN)


def _write_splits(
    writer: DatasetWriter,
    report: PrepareReport,
    out: Path,
    prepared: dict,
    with_mask: set[str],
    splits: dict | None,
    val_fraction: float,
    seed: int,
    masked: bool,
) -> None:
    if splits is None:
        train, val = stratified_split(
            {i: [int(v == POSITIVE) for v in row] for i, row in prepared.items()}, val_fraction, seed
        )
        chosen = {"train": train, "val": val}
    else:
        chosen = {}
        for name, (ids, unmatched) in splits.items():
            chosen[name] = [i for i in ids if i in prepared]
            report.add_ids(f"{name}_ids_not_prepared", [i for i in ids if i not in prepared] + unmatched)
    for name, ids in chosen.items():
        report.counts[f"split_{name}"] = len(ids)
        writer.write_split(name, ids)  # an empty split removes its file
    for old in (out / "splits").glob("*.txt"):  # a split of an earlier run that this one does not make
        if old.stem not in chosen:
            old.unlink()
    if masked and chosen.get("val"):
        report.add_ids("val_ids_without_mask", [i for i in chosen["val"] if i not in with_mask])
