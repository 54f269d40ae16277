"""MS COCO 2014 (instances annotations + images) -> the prepared layout.

- Classes: the file's ``categories`` sorted by COCO id (1..90 with gaps) become the contiguous
  classes 1..80 in that order, named as in the file; the train and val files must agree. The
  palette is the VOC colour map extended to 81 colours (:func:`data.layout.default_palette`).
- Images: each ``images`` entry's ``file_name`` in the images folder, copied byte for byte
  (``image_ext`` ".jpg"; re-encoding would change the pixels published results were measured on)
  once it decodes completely and has the entry's width and height. The id is the file name
  without its suffix (``COCO_train2014_000000391895``).
- Masks, decoded with pycocotools (the format's reference reader: polygons, uncompressed and
  compressed RLE, as ``COCO.annToRLE`` reads them): the union of the image's instances, each
  pixel the class of its instance. Where instances of two classes overlap, the instance listed
  later in the file wins: the rule of the script that made the masks the IRNet family (ReCAM)
  scores COCO against (``mscoco/annToMask.py``, which paints instances in file order). Crowd
  regions (``iscrowd: 1``) are 255 (ignored in scoring) where no other instance lies. An RLE whose
  runs do not cover its image exactly, or whose size is not the image's, is refused (pycocotools
  would decode it into unset memory).
- Image-level labels: the classes of its instances, crowd regions included (the class is there).
- Splits: the images of ``annotations`` form ``train``, those of ``val_annotations`` ``val``.
  Images without any annotation (train2014 has ~700) are listed in the report and left out, of
  training and of scoring: nothing says which of the 80 classes are really absent from them.
- Robustness: an annotation that does not read (no segmentation, an unknown category, a bad
  polygon or RLE) leaves its image out, listed with ``file: annotation <id>``; an image whose file
  is missing, does not decode or has another size is listed and left out; the rest is prepared.
- Memory: the annotation files are read element by element (:mod:`data.json_stream`) into a
  temporary SQLite index in ``out`` (removed at the end); each worker process reads the
  annotations of its own images from it. Nothing holds every polygon at once.
- Reruns (:mod:`data.prepare_manifest`): an image whose JPEG and annotations are unchanged is
  kept without being read; changed annotations redo its mask alone, a changed JPEG redoes it all.

pycocotools is imported here only, where COCO is read.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from data.errors import DataError
from data.images import open_image
from data.json_stream import iter_top_level
from data.layout import (
    IGNORE_INDEX,
    DatasetInfo,
    DatasetWriter,
    create_folder,
    default_palette,
)
from data.parallel import parallel_map
from data.prepare_manifest import (
    FORCED,
    LABELS,
    NEW,
    SOURCE,
    UNCHANGED,
    UNKNOWN,
    VERIFIED,
    PrepareManifest,
    copy_file_if_changed,
    digest,
    file_stamp,
    item_change,
    output_stamps,
    write_mask_if_changed,
)
from data.prepare_report import PrepareReport, nothing_prepared_reason

INDEX_PREFIX = ".coco-index-"  # + a name unique to the run, ".sqlite": the temporary annotation index
PARTS = ("train", "val")
_BATCH = 5000


# --------------------------------------------------------------------------------------------
# Decoding one instance (pycocotools)
# --------------------------------------------------------------------------------------------


class AnnotationError(DataError):
    """An annotation that cannot be decoded: its image is left out."""


def instance_rle(segmentation, height: int, width: int) -> dict:
    """The compressed RLE of one instance's ``segmentation``, as pycocotools' ``COCO.annToRLE``
    makes it (polygons merged, uncompressed RLE compressed), after checks that keep pycocotools
    from decoding unset memory or crashing. AnnotationError says what is wrong."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        if not segmentation:
            raise AnnotationError("empty polygon list")
        if not all(_coordinates(polygon) for polygon in segmentation):
            raise AnnotationError("a polygon must be a list of an even number (4 or more) of finite coordinates")
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        raise AnnotationError("segmentation is neither a polygon list nor an RLE {counts, size}")
    if list(segmentation["size"]) != [height, width]:
        raise AnnotationError(f"RLE size {segmentation['size']} is not the image's [{height}, {width}]")
    counts = segmentation["counts"]
    if isinstance(counts, list):
        if (
            not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts)
            or sum(counts) != height * width
        ):
            raise AnnotationError(f"RLE counts must be non-negative integers adding up to {height * width}")
        return mask_utils.frPyObjects(segmentation, height, width)
    if not isinstance(counts, str) or sum(compressed_counts(counts)) != height * width:
        raise AnnotationError(f"compressed RLE counts do not add up to {height * width}")
    return {"size": [height, width], "counts": counts.encode("ascii")}


def compressed_counts(text: str) -> list[int]:
    """The run lengths of a compressed RLE string (COCO's rleFrString: 5-bit groups, the counts
    after the second stored as differences). AnnotationError for a string that is not one."""
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                raise AnnotationError("compressed RLE string cut short")
            code = ord(text[position]) - 48
            if not 0 <= code < 64:
                raise AnnotationError(f"compressed RLE holds {text[position]!r}")
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position += 1
            shift += 5
            if not more and code & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        if value < 0:
            raise AnnotationError("compressed RLE gives a negative run")
        counts.append(value)
    return counts


def _coordinates(polygon) -> bool:
    """A flat list of an even number (4 or more) of finite numbers, as pycocotools reads them."""
    if not isinstance(polygon, list) or len(polygon) < 4 or len(polygon) % 2:
        return False
    try:
        values = np.asarray(polygon, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return values.ndim == 1 and bool(np.isfinite(values).all())


def semantic_mask(
    annotations: list[dict], class_of: dict[int, int], height: int, width: int
) -> tuple[np.ndarray, list[int]]:
    """(class-index mask, sorted classes present) of one image's annotations, in file order: each
    instance paints its class over what is there (the later wins), crowd regions are 255 where no
    instance lies. A crowd region's class is present."""
    from pycocotools import mask as mask_utils

    mask = np.zeros((height, width), np.uint8)
    crowd = np.zeros((height, width), bool)
    present: set[int] = set()
    for annotation in annotations:
        label = class_of[annotation["category_id"]]
        try:
            rle = instance_rle(annotation["segmentation"], height, width)
        except AnnotationError as error:
            raise AnnotationError(f"annotation {annotation.get('id')!r}: {error}") from None
        region = mask_utils.decode(rle).view(bool)  # 0/1 bytes
        present.add(label)
        if annotation.get("iscrowd", 0):
            crowd |= region
        else:
            np.copyto(mask, label, where=region)
    mask[crowd & (mask == 0)] = IGNORE_INDEX
    return mask, sorted(present)


# --------------------------------------------------------------------------------------------
# Reading the annotation files into the index
# --------------------------------------------------------------------------------------------


@dataclass
class ImageEntry:
    coco_id: int
    image_id: str  # the prepared id: the file name without its suffix
    file: str
    width: int
    height: int
    part: str


@dataclass
class CocoFile:
    """What one annotation file holds, without its annotations (those are in the index)."""

    path: Path
    part: str
    images_dir: Path
    images: dict[int, ImageEntry] = field(default_factory=dict)
    categories: list[tuple[int, str]] = field(default_factory=list)
    bad_images: set[int] = field(default_factory=set)  # coco ids with an annotation that does not read


def open_index(out: Path) -> tuple[Path, sqlite3.Connection]:
    """A new index in ``out`` under a name no earlier run used (a worker's cached connection to an
    earlier index can never be taken for it); indexes left by killed runs are removed."""
    for stale in out.glob(f"{INDEX_PREFIX}*.sqlite"):
        stale.unlink(missing_ok=True)
    handle, name = tempfile.mkstemp(prefix=INDEX_PREFIX, suffix=".sqlite", dir=out)
    os.close(handle)
    path = Path(name)
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode=OFF")
    connection.execute("PRAGMA synchronous=OFF")
    connection.execute("CREATE TABLE annotations (part TEXT, image INTEGER, category INTEGER, seq INTEGER, text TEXT)")
    return path, connection


def read_coco_file(
    path: Path, images_dir: Path, part: str, connection: sqlite3.Connection, report: PrepareReport
) -> CocoFile:
    """Stream one instances file: its images and categories kept, each annotation checked for
    what can be checked alone and stored in the index with its exact text."""
    coco = CocoFile(Path(path), part, Path(images_dir))
    batch: list[tuple] = []
    stored = 0  # the file order of the stored annotations (the overlap rule reads it)
    seen_keys: set[str] = set()
    for key, value, text in iter_top_level(path, {"images", "annotations", "categories"}, keys=seen_keys):
        if key == "images":
            _add_image(coco, value, images_dir, report)
        elif key == "categories":
            _add_category(coco, value)
        elif key == "annotations":
            row = _annotation_row(coco, value, text, stored, report)
            if row is not None:
                batch.append(row)
                stored += 1
            if len(batch) >= _BATCH:
                connection.executemany("INSERT INTO annotations VALUES (?, ?, ?, ?, ?)", batch)
                batch = []
    connection.executemany("INSERT INTO annotations VALUES (?, ?, ?, ?, ?)", batch)
    connection.commit()
    missing = [k for k in ("images", "annotations", "categories") if k not in seen_keys]
    if missing:
        raise DataError(f"{path}: no {missing[0]!r} key: not a COCO instances file")
    if not coco.categories:
        raise DataError(f"{path}: 'categories' is empty")
    return coco


def _add_image(coco: CocoFile, entry, images_dir: Path, report: PrepareReport) -> None:
    where = f"{coco.path}: image {entry.get('id') if isinstance(entry, dict) else entry!r}"
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("id"), int)
        or not isinstance(entry.get("file_name"), str)
        or not _positive_int(entry.get("width"))
        or not _positive_int(entry.get("height"))
    ):
        report.add_problem(where, "needs an integer id, a file_name and positive width and height: left out")
        report.count("bad_image_entries")
        return
    name = entry["file_name"]
    if "/" in name or "\\" in name or name.startswith("."):
        report.add_problem(where, f"file_name {name!r} is not a plain file name: left out")
        report.count("bad_image_entries")
        return
    if entry["id"] in coco.images:
        report.add_problem(where, "listed twice: the second left out")
        report.count("bad_image_entries")
        return
    coco.images[entry["id"]] = ImageEntry(
        entry["id"], Path(name).stem, str(images_dir / name), entry["width"], entry["height"], coco.part
    )


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _add_category(coco: CocoFile, entry) -> None:
    if (
        not isinstance(entry, dict)
        or not _positive_int(entry.get("id"))
        or not isinstance(entry.get("name"), str)
        or not entry["name"].strip()
    ):
        raise DataError(f"{coco.path}: category {entry!r} needs a positive integer id and a name")
    coco.categories.append((entry["id"], entry["name"].strip()))


def _annotation_row(coco: CocoFile, entry, text: str, seq: int, report: PrepareReport):
    if not isinstance(entry, dict) or not isinstance(entry.get("image_id"), int):
        report.add_problem(f"{coco.path}: annotation {_ann_id(entry)}", "no integer image_id: skipped")
        report.count("bad_annotations")
        return None
    problem = None
    if not isinstance(entry.get("category_id"), int):
        problem = "no integer category_id"
    elif "segmentation" not in entry:
        problem = "no segmentation"
    elif entry.get("iscrowd", 0) not in (0, 1):
        problem = f"iscrowd is {entry.get('iscrowd')!r}, not 0 or 1"
    if problem is not None:
        report.add_problem(f"{coco.path}: annotation {_ann_id(entry)}", f"{problem}: its image left out")
        report.count("bad_annotations")
        coco.bad_images.add(entry["image_id"])
        return None
    return coco.part, entry["image_id"], entry["category_id"], seq, text


def _ann_id(entry) -> str:
    return repr(entry.get("id")) if isinstance(entry, dict) else "?"


def classes_of(files: list[CocoFile]) -> list[tuple[int, str]]:
    """(COCO id, name) of the classes, sorted by id; the files must agree."""
    first = sorted(files[0].categories)
    ids = [i for i, _ in first]
    if len(set(ids)) != len(ids):
        raise DataError(f"{files[0].path}: a category id is listed twice")
    for other in files[1:]:
        if sorted(other.categories) != first:
            raise DataError(f"{other.path}: its categories differ from those of {files[0].path}")
    return first


# --------------------------------------------------------------------------------------------
# One image (runs in a worker process)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ImageTask:
    image_id: str
    coco_id: int
    part: str
    annotation_file: str
    jpeg: str
    width: int
    height: int
    index: str
    out: str
    previous: dict | None = None
    force: bool = False


@dataclass
class _ImageResult:
    image_id: str
    part: str
    classes: list[int] | None  # None: not prepared (failed, or without annotations)
    annotated: bool = True
    problems: list[tuple[str, str]] = field(default_factory=list)
    change: str = NEW
    record: dict | None = None


_CONNECTION: tuple[str, sqlite3.Connection, dict[int, int]] | None = None


def _index(path: str) -> tuple[sqlite3.Connection, dict[int, int]]:
    """This process's read-only connection to the index, and COCO category id -> class index."""
    global _CONNECTION
    if _CONNECTION is None or _CONNECTION[0] != path:
        _close_index()
        connection = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True)
        class_of = {coco_id: index for coco_id, index in connection.execute("SELECT coco_id, class FROM classes")}
        _CONNECTION = (path, connection, class_of)
    return _CONNECTION[1], _CONNECTION[2]


def _close_index() -> None:
    """Close this process's connection to an index (a removed file's space is freed on close)."""
    global _CONNECTION
    if _CONNECTION is not None:
        _CONNECTION[1].close()
        _CONNECTION = None


def _prepare_image(task: _ImageTask) -> _ImageResult:
    import json

    connection, class_of = _index(task.index)
    texts = [
        text
        for (text,) in connection.execute(
            "SELECT text FROM annotations WHERE part = ? AND image = ? ORDER BY seq", (task.part, task.coco_id)
        )
    ]
    if not texts:
        return _ImageResult(task.image_id, task.part, None, annotated=False)
    source, labels = str(file_stamp(task.jpeg)), digest([task.width, task.height, texts])
    change = FORCED if task.force else item_change(task.previous, source, labels, task.out)
    if change == UNCHANGED and _recorded_classes(task.previous) is not None:
        return _ImageResult(
            task.image_id, task.part, _recorded_classes(task.previous), change=change, record=task.previous
        )
    out = Path(task.out)
    image_name, mask_name = f"images/{task.image_id}.jpg", f"masks/{task.image_id}.png"
    try:
        if change != LABELS or _recorded_size(task.previous) != (task.width, task.height):
            _check_jpeg(task)
        annotations = [json.loads(text) for text in texts]
        mask, classes = semantic_mask(annotations, class_of, task.height, task.width)
    except AnnotationError as error:
        problem = (f"{task.annotation_file}: image {task.coco_id}", f"{error}: image left out")
        return _ImageResult(task.image_id, task.part, None, problems=[problem])
    except DataError as error:
        return _ImageResult(task.image_id, task.part, None, problems=[(task.jpeg, _strip(str(error), task.jpeg))])
    existed = (out / image_name).is_file()
    copied = change != LABELS and copy_file_if_changed(Path(task.jpeg), out / image_name)
    masked = write_mask_if_changed(out / mask_name, mask, default_palette(len(class_of) + 1))
    if change == UNKNOWN:  # redone in full: what it rewrote says what had changed
        change = NEW if not existed else SOURCE if copied else LABELS if masked else VERIFIED
    record = {
        "source": source,
        "labels": labels,
        "size": [task.width, task.height],
        "classes": classes,
        "outputs": output_stamps(task.out, [image_name, mask_name]),
    }
    return _ImageResult(task.image_id, task.part, classes, change=change, record=record)


def _check_jpeg(task: _ImageTask) -> None:
    """The file decodes to its end (a truncated JPEG has a valid header) and has the entry's size.
    A JPEG is decoded at 1/8 scale (libjpeg's DCT scaling, ``draft``): every byte of it is still
    read, in a quarter of the time."""
    path = Path(task.jpeg)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open_image(path) as image:
            size = image.size
            image.draft(image.mode, (size[0] // 8, size[1] // 8))
            image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: not a readable image ({error})") from None
    if size != (task.width, task.height):
        raise DataError(
            f"{path}: image is {size[0]}x{size[1]} but {task.annotation_file} gives "
            f"{task.width}x{task.height}: left out"
        )


def _recorded_classes(record: dict | None) -> list[int] | None:
    classes = (record or {}).get("classes")
    if isinstance(classes, list) and all(isinstance(v, int) and v > 0 for v in classes):
        return classes
    return None


def _recorded_size(record: dict | None) -> tuple[int, int] | None:
    size = (record or {}).get("size")
    return tuple(size) if isinstance(size, list) and len(size) == 2 else None


def _strip(message: str, where: str) -> str:
    prefix = f"{where}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


# The report's count of each outcome: kept as it was, its mask and labels redone, or (else) copied.
_STATUS = {UNCHANGED: "resumed", VERIFIED: "resumed", LABELS: "relabelled"}


# --------------------------------------------------------------------------------------------
# The whole dataset
# --------------------------------------------------------------------------------------------


def prepare_coco(
    annotations: str | Path,
    images_dir: str | Path,
    out: str | Path,
    val_annotations: str | Path | None = None,
    val_images_dir: str | Path | None = None,
    workers: int = 1,
    progress: bool = True,
    force: bool = False,
) -> PrepareReport:
    """Prepare COCO 2014 (instances) into ``out``; see the module doc. ``force`` redoes every image
    whatever the manifest says.

    Raises DataError (after writing the report) only when no image could be prepared.
    """
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    if (val_annotations is None) != (val_images_dir is None):
        raise DataError("--val-annotations and --val-images go together")
    sources = [(Path(annotations), Path(images_dir), "train")]
    if val_annotations is not None:
        sources.append((Path(val_annotations), Path(val_images_dir), "val"))
    for _, folder, _ in sources:
        if not folder.is_dir():
            raise DataError(f"images folder not found: {folder}")
    out = Path(out)
    report = PrepareReport("coco", out)
    create_folder(out)
    index, connection = open_index(out)
    try:
        files = [read_coco_file(path, folder, part, connection, report) for path, folder, part in sources]
        classes = classes_of(files)
        connection.execute("CREATE TABLE classes (coco_id INTEGER, class INTEGER)")
        connection.executemany(
            "INSERT INTO classes VALUES (?, ?)", [(coco_id, k + 1) for k, (coco_id, _) in enumerate(classes)]
        )
        connection.execute("CREATE INDEX by_image ON annotations (part, image, seq)")
        connection.commit()
        _check_annotations(connection, files, {coco_id for coco_id, _ in classes}, report)
        connection.close()
        return _prepare(files, [name for _, name in classes], index, out, workers, progress, force, report)
    finally:
        connection.close()
        _close_index()  # workers=1 read it in this process
        index.unlink(missing_ok=True)


def _check_annotations(
    connection: sqlite3.Connection, files: list[CocoFile], known_classes: set[int], report: PrepareReport
) -> None:
    """What needs the whole file: annotations of an unknown category (their image left out) or of
    no listed image (counted)."""
    for coco in files:
        for category, count, example in connection.execute(
            "SELECT category, COUNT(*), MIN(image) FROM annotations WHERE part = ? GROUP BY category", (coco.part,)
        ):
            if category not in known_classes:
                report.add_problem(
                    f"{coco.path}: category_id {category}",
                    f"not among the categories ({count} annotations, e.g. on image {example}): their images left out",
                )
                report.count("bad_annotations", count)
                coco.bad_images.update(
                    image
                    for (image,) in connection.execute(
                        "SELECT DISTINCT image FROM annotations WHERE part = ? AND category = ?", (coco.part, category)
                    )
                )
        orphans = sum(
            count
            for image, count in connection.execute(
                "SELECT image, COUNT(*) FROM annotations WHERE part = ? GROUP BY image", (coco.part,)
            )
            if image not in coco.images
        )
        if orphans:
            report.count("annotations_without_image", orphans)


def _prepare(
    files: list[CocoFile],
    classes: list[str],
    index: Path,
    out: Path,
    workers: int,
    progress: bool,
    force: bool,
    report: PrepareReport,
) -> PrepareReport:
    manifest = PrepareManifest(out, "coco", report, force)
    writer = DatasetWriter(out, DatasetInfo("coco", "multiclass", classes, default_palette(len(classes) + 1), ".jpg"))
    tasks, present, ids = [], set(), {}
    index_name, out_name = str(index), str(out)  # one string shared by every task (10^5 of them)
    for coco in files:
        annotation_file = str(coco.path)
        with os.scandir(coco.images_dir) as entries:
            on_disk = {entry.name for entry in entries}
        for entry in sorted(coco.images.values(), key=lambda e: e.image_id):
            if Path(entry.file).name not in on_disk:
                report.add_ids("listed_images_missing", [entry.image_id])
                continue
            present.add(entry.image_id)
            if entry.image_id in ids:
                report.add_problem(entry.file, f"id {entry.image_id!r} also in {ids[entry.image_id]}: left out")
                continue
            ids[entry.image_id] = coco.path
            if entry.coco_id in coco.bad_images:
                report.add_ids("images_with_bad_annotations", [entry.image_id])
                continue
            tasks.append(
                _ImageTask(
                    entry.image_id,
                    entry.coco_id,
                    coco.part,
                    annotation_file,
                    entry.file,
                    entry.width,
                    entry.height,
                    index_name,
                    out_name,
                    manifest.previous(entry.image_id),
                    force,
                )
            )
        report.count(f"{coco.part}_listed", len(coco.images))
    labels: dict[str, list[int]] = {}
    parts: dict[str, str] = {}
    unannotated: set[str] = set()
    failed: set[str] = set()
    for result in parallel_map(_prepare_image, tasks, workers, progress, "coco"):
        for where, message in result.problems:
            report.add_problem(where, message)
        manifest.note(report, result.image_id, result.change, result.record)
        if not result.annotated:
            unannotated.add(result.image_id)
            continue
        if result.classes is None:
            report.count("failed")
            failed.add(result.image_id)
            continue
        report.count(_STATUS.get(result.change, "converted"))
        labels[result.image_id] = result.classes
        parts[result.image_id] = result.part
    report.counts["prepared"] = len(labels)
    report.add_ids("images_without_annotations", unannotated)
    report.write()
    if not report.ok:
        writer.keep_previous()
        listed = {e.image_id for coco in files for e in coco.images.values()}
        report.error = nothing_prepared_reason(
            report, files[0].path, listed, files[0].images_dir, present, "image", "file_name"
        )
        report.write()
        raise DataError(f"no COCO image could be prepared: {report.error}; see {report.path}")
    manifest.finish(report, ".jpg", present, failed)
    writer.write_labels(_DenseLabels(labels, len(classes)))
    for part in PARTS:
        ids_of_part = sorted(i for i in labels if parts[i] == part)
        report.counts[f"split_{part}"] = len(ids_of_part)
        writer.write_split(part, ids_of_part)  # none (no val file given): no file
    report.write()
    writer.write_info()
    return report


class _DenseLabels(dict):
    """id -> sorted class indices, read as 0/1 vectors over the classes (what write_labels writes):
    the 80-wide vectors of 10^5 images are made one row at a time."""

    def __init__(self, sparse: dict[str, list[int]], num_classes: int):
        super().__init__(sparse)
        self.num_classes = num_classes

    def __getitem__(self, image_id: str) -> list[int]:
        present = set(super().__getitem__(image_id))
        return [int(k + 1 in present) for k in range(self.num_classes)]
