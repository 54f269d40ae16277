"""PASCAL VOC 2012 (+ SBD SegmentationClassAug) -> the prepared layout.

- Images: every ``JPEGImages/*.jpg``, copied byte for byte (``image_ext`` ".jpg"): re-encoding
  would change the pixels the published results were measured on. A JPEG that does not
  decode completely (truncated, corrupt) is reported and skipped.
- Masks: ``SegmentationClass/<id>.png`` (palette PNG whose indices are the classes, 255 the
  ignore border) kept index for index; for ids without one, SBD's
  ``SegmentationClassAug/<id>.png`` when ``sbd_root`` is given. A mask of another size than
  its image, or with an index outside 0-20 and 255, is reported and its image skipped.
- Image labels: the classes present in the mask; for images without a mask, every ``object``
  of ``Annotations/<id>.xml`` including those marked difficult or truncated. That is how
  IRNet built the ``cls_labels.npy`` that WSSS papers train on (all object names of the XML).
- Splits: ``ImageSets/Segmentation/{train,val}.txt`` and ``train_aug`` (10,582 ids) from
  ``train_aug.txt`` (bare ids, or DeepLab's ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png``
  lines) found in ``ImageSets/Segmentation`` or ``sbd_root``, or computed as
  SBD train + SBD val + VOC train - VOC val when ``sbd_root`` holds SBD's own ``train.txt``
  and ``val.txt``. Listed ids whose image is missing are counted and listed in the report.
  A split that is empty or not found has no file (one left by an earlier run is removed).
- ``dataset.json``: task multiclass, the 20 classes in the standard order, the VOC palette.

- Reruns (:mod:`data.prepare_manifest`): ``out/prepare_manifest.json`` records each image's
  JPEG stamp and the stamp of its mask (VOC's or SBD's) or, without one, of its XML. An image whose
  inputs are unchanged is kept without being read; a changed mask or XML redoes its mask and
  labels only; a changed JPEG redoes it all; images gone from ``JPEGImages`` lose their outputs.
  Each kind is listed in the report. Without a record (a folder prepared before manifests
  existed) an image is redone, which rewrites no file whose content comes out the same.
  ``force`` redoes every image.

``voc_root`` may be the ``VOC2012`` folder itself, ``VOCdevkit`` or the folder holding it;
``sbd_root`` the folder holding ``SegmentationClassAug`` or that folder itself.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.errors import DataError
from data.images import open_image
from data.layout import IGNORE_INDEX, DatasetInfo, DatasetWriter, default_palette, read_index_png
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
from data.prepare_report import PrepareReport

CLASSES = [
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]
PALETTE = default_palette(len(CLASSES) + 1)  # the VOC colour map for indices 0-20
SPLITS = ("train", "val")


# --------------------------------------------------------------------------------------------
# Finding the inputs
# --------------------------------------------------------------------------------------------


def locate_voc(voc_root: str | Path) -> Path:
    """The folder holding JPEGImages: voc_root, voc_root/VOC2012 or voc_root/VOCdevkit/VOC2012."""
    root = Path(voc_root)
    for candidate in [root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"]:
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise DataError(f"no JPEGImages folder in {root} (expected VOCdevkit/VOC2012/JPEGImages)")


def locate_sbd_masks(sbd_root: str | Path) -> Path:
    root = Path(sbd_root)
    for candidate in [root / "SegmentationClassAug", root]:
        if candidate.is_dir() and next(candidate.glob("*.png"), None) is not None:
            return candidate
    raise DataError(f"no SegmentationClassAug PNGs in {root}")


def read_id_list(path: Path) -> list[str]:
    """Ids of an ImageSets list (first token of each line; blank lines ignored).

    The widely shared DeepLab ``train_aug.txt`` lists paths instead,
    ``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``: the id is the
    first token's file name without its extension (a bare id is kept as it is).
    """
    return [_id_of_token(line.split()[0]) for line in path.read_text().splitlines() if line.strip()]


def _id_of_token(token: str) -> str:
    name = Path(token).name
    stem, dot, ext = name.rpartition(".")
    return stem if dot and ext.lower() in ("jpg", "jpeg", "png") else name


def split_lists(voc: Path, sbd_root: Path | None) -> dict[str, list[str]]:
    """Split name -> listed ids (train, val and, when it can be found, train_aug)."""
    lists_dir = voc / "ImageSets" / "Segmentation"
    lists = {name: read_id_list(lists_dir / f"{name}.txt") for name in SPLITS if (lists_dir / f"{name}.txt").is_file()}
    train_aug = _train_aug_list(lists_dir, sbd_root, lists)
    if train_aug is not None:
        lists["train_aug"] = train_aug
    return lists


def _train_aug_list(lists_dir: Path, sbd_root: Path | None, voc_lists: dict[str, list[str]]):
    candidates = [lists_dir / "train_aug.txt"]
    if sbd_root is not None:
        candidates += [sbd_root / "train_aug.txt", sbd_root / "dataset" / "train_aug.txt"]
    for path in candidates:
        if path.is_file():
            return read_id_list(path)
    if sbd_root is None:
        return None
    for folder in [sbd_root, sbd_root / "dataset"]:
        if (folder / "train.txt").is_file() and (folder / "val.txt").is_file():
            ids = set(read_id_list(folder / "train.txt")) | set(read_id_list(folder / "val.txt"))
            ids |= set(voc_lists.get("train", []))
            return sorted(ids - set(voc_lists.get("val", [])))
    return None


# --------------------------------------------------------------------------------------------
# One image (runs in a worker process)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ImageTask:
    image_id: str
    jpeg: str
    mask: str | None
    xml: str | None
    out: str
    source: str = ""  # the JPEG's stamp (see data.prepare_manifest)
    labels: str = ""  # digest of its mask's or XML's stamp
    previous: dict | None = None
    force: bool = False


@dataclass
class _ImageResult:
    image_id: str
    labels: list[int] | None
    has_mask: bool = False
    problems: list[tuple[str, str]] = field(default_factory=list)
    change: str = NEW
    record: dict | None = None


def _prepare_image(task: _ImageTask) -> _ImageResult:
    change = FORCED if task.force else item_change(task.previous, task.source, task.labels, task.out)
    if change == UNCHANGED and _recorded_labels(task.previous) is not None:
        return _ImageResult(
            task.image_id,
            _recorded_labels(task.previous),
            bool(task.previous.get("has_mask")),
            change=change,
            record=task.previous,
        )
    labels_only = change == LABELS and _recorded_size(task.previous) is not None
    try:
        size = _recorded_size(task.previous) if labels_only else _jpeg_size(task.jpeg)  # JPEG as recorded: not read
        mask = _read_mask(task.mask, size) if task.mask else None
        labels = labels_from_mask(mask) if mask is not None else _labels_or_none(task.xml)
    except DataError as error:
        where, message = _split_message(str(error))
        return _ImageResult(task.image_id, None, problems=[(where, message)])
    if labels is None:
        return _ImageResult(
            task.image_id, None, problems=[(task.jpeg, "no mask and no Annotations XML: no image label")]
        )
    out = Path(task.out)
    image_name, mask_name = f"images/{task.image_id}.jpg", f"masks/{task.image_id}.png"
    existed = (out / image_name).is_file()
    copied = not labels_only and copy_file_if_changed(Path(task.jpeg), out / image_name)
    if mask is not None:
        masked = write_mask_if_changed(out / mask_name, mask, PALETTE)
    else:  # a mask of an earlier run (say with --sbd-root) would still be scored
        masked = (out / mask_name).is_file()
        (out / mask_name).unlink(missing_ok=True)
    if change == UNKNOWN:  # redone in full: what it rewrote says what had changed
        change = NEW if not existed else SOURCE if copied else LABELS if masked else VERIFIED
    record = {
        "source": task.source,
        "labels": task.labels,
        "size": list(size),
        "classes": labels,
        "has_mask": mask is not None,
        "outputs": output_stamps(out, [image_name] + ([mask_name] if mask is not None else [])),
    }
    return _ImageResult(task.image_id, labels, has_mask=mask is not None, change=change, record=record)


# The report's count of each outcome: kept as it was, its mask and labels redone, or (else) copied.
_STATUS = {UNCHANGED: "resumed", VERIFIED: "resumed", LABELS: "relabelled"}


def _recorded_size(record: dict | None) -> tuple[int, int] | None:
    """The JPEG's (width, height) in a record, None when it holds none that is usable."""
    size = (record or {}).get("size")
    if isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size):
        return size[0], size[1]
    return None


def _recorded_labels(record: dict | None) -> list[int] | None:
    labels = (record or {}).get("classes")
    if isinstance(labels, list) and len(labels) == len(CLASSES) and all(v in (0, 1) for v in labels):
        return labels
    return None


def _jpeg_size(path: str) -> tuple[int, int]:
    """(width, height) of a JPEG that decodes completely: a truncated or corrupt file has a
    valid header but would crash training. The pixels are only checked; the file is copied
    byte for byte."""
    try:
        with open_image(path) as image:
            image.load()
            return image.size
    except (OSError, ValueError, SyntaxError) as error:  # Pillow's errors for damaged files
        raise DataError(f"{path}: not a readable image ({error})") from None


def _read_mask(path: str, size: tuple[int, int]) -> np.ndarray:
    try:
        mask = read_index_png(Path(path))
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not a readable PNG ({error})") from None
    if (mask.shape[1], mask.shape[0]) != size:
        raise DataError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {size[0]}x{size[1]}")
    bad = (mask > len(CLASSES)) & (mask != IGNORE_INDEX)
    if bad.any():
        raise DataError(f"{path}: class index {int(mask[bad][0])} is not 0-{len(CLASSES)} or 255")
    return mask


def labels_from_mask(mask: np.ndarray) -> list[int]:
    """Multi-hot over the 20 classes: those with at least one pixel (0 and 255 are not classes)."""
    present = set(np.unique(mask).tolist())
    return [int(index in present) for index in range(1, len(CLASSES) + 1)]


def labels_from_xml(path: str | Path) -> list[int]:
    """Multi-hot over the 20 classes of every <object><name> in a VOC Annotations file,
    difficult and truncated objects included (as IRNet's cls_labels.npy)."""
    try:
        root = ElementTree.parse(path).getroot()
    except (ElementTree.ParseError, OSError) as error:
        raise DataError(f"{path}: not a readable VOC annotation ({error})") from None
    names = {(obj.findtext("name") or "").strip() for obj in root.iter("object")}
    return [int(name in names) for name in CLASSES]


def _labels_or_none(xml: str | None) -> list[int] | None:
    return labels_from_xml(xml) if xml else None


def _split_message(message: str) -> tuple[str, str]:
    where, separator, what = message.partition(": ")
    return (where, what) if separator else ("", message)


# --------------------------------------------------------------------------------------------
# The whole dataset
# --------------------------------------------------------------------------------------------


def prepare_voc(
    voc_root: str | Path,
    out: str | Path,
    sbd_root: str | Path | None = None,
    workers: int = 1,
    progress: bool = True,
    force: bool = False,
) -> PrepareReport:
    """Prepare VOC 2012 (+ SBD) into ``out``; see the module doc. ``force`` redoes every image
    whatever the manifest says.

    Raises DataError (after writing the report) only when no image could be prepared.
    """
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    voc = locate_voc(voc_root)
    sbd = Path(sbd_root) if sbd_root is not None else None
    sbd_masks = locate_sbd_masks(sbd) if sbd is not None else None
    out = Path(out)
    report = PrepareReport("voc", out)
    manifest = PrepareManifest(out, "voc", report, force)
    writer = DatasetWriter(out, DatasetInfo("voc", "multiclass", list(CLASSES), PALETTE, ".jpg"))

    tasks = [
        _task(voc, sbd_masks, path.stem, out, manifest, force) for path in sorted((voc / "JPEGImages").glob("*.jpg"))
    ]
    report.count("images_found", len(tasks))
    labels: dict[str, list[int]] = {}
    with_mask: set[str] = set()
    failed: set[str] = set()
    for result in parallel_map(_prepare_image, tasks, workers, progress, "voc"):
        for where, message in result.problems:
            report.add_problem(where, message)
        manifest.note(report, result.image_id, result.change, result.record)
        if result.labels is None:
            report.count("failed")
            failed.add(result.image_id)
            continue
        report.count(_STATUS.get(result.change, "converted"))
        labels[result.image_id] = result.labels
        if result.has_mask:
            with_mask.add(result.image_id)
    report.counts["prepared"] = len(labels)
    report.counts["with_mask"] = len(with_mask)
    report.write()
    if not report.ok:
        writer.keep_previous()
        raise DataError(f"no VOC image could be prepared from {voc}; see {report.path}")

    manifest.finish(report, ".jpg", {task.image_id for task in tasks}, failed)
    writer.write_labels(labels)
    lists = split_lists(voc, sbd)
    for name, ids in lists.items():
        _write_split(writer, report, name, ids, labels, with_mask)
    for name in sorted({*SPLITS, "train_aug"} - lists.keys()):  # not found this time: remove an old file
        writer.write_split(name, [])
    report.write()
    writer.write_info()
    return report


def _task(
    voc: Path, sbd_masks: Path | None, image_id: str, out: Path, manifest: PrepareManifest, force: bool
) -> _ImageTask:
    mask, origin = voc / "SegmentationClass" / f"{image_id}.png", "voc"
    if not mask.is_file() and sbd_masks is not None:
        mask, origin = sbd_masks / f"{image_id}.png", "sbd"
    xml = voc / "Annotations" / f"{image_id}.xml"
    jpeg = voc / "JPEGImages" / f"{image_id}.jpg"
    # what the labels come from: the mask (whose origin matters: SBD's may be dropped) or the XML
    label_source = [f"mask:{origin}", file_stamp(mask)] if mask.is_file() else ["xml", file_stamp(xml)]
    return _ImageTask(
        image_id,
        str(jpeg),
        str(mask) if mask.is_file() else None,
        str(xml) if xml.is_file() else None,
        str(out),
        str(file_stamp(jpeg)),
        digest(label_source),
        manifest.previous(image_id),
        force,
    )


def _write_split(
    writer: DatasetWriter,
    report: PrepareReport,
    name: str,
    listed: list[str],
    labels: dict[str, list[int]],
    with_mask: set[str],
) -> None:
    """Keep the listed ids that were prepared; count the rest (and val ids without masks)."""
    kept = [i for i in listed if i in labels]
    report.add_ids(f"{name}_ids_not_prepared", [i for i in listed if i not in labels])
    if name == "val":
        report.add_ids("val_ids_without_mask", [i for i in kept if i not in with_mask])
    report.counts[f"split_{name}"] = len(kept)
    writer.write_split(name, kept)  # an empty split removes the file
