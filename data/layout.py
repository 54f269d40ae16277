"""The prepared on-disk layout that every dataset is converted into and every stage reads.

    <root>/dataset.json        {"name", "task": "binary"|"multiclass", "classes": [...],
                                "palette": [[r, g, b], ...] for 0..C, "image_ext": ".png"}
    <root>/labels.csv          image_id + one 0/1 column per foreground class
    <root>/splits/<name>.txt   one image id per line
    <root>/images/<id><ext>    8-bit grayscale or RGB images
    <root>/masks/<id>.png      class indices (0 = background, 255 = ignore); evaluation only
    <root>/uncertain.csv       optional: image_id + one column per class, 1 where the label is
                               uncertain (CheXpert's -1); labels.csv holds 0 there

An id is a plain file name: an image found at ``patient1/scan2.png`` under a user's folder is
the id ``patient1%2Fscan2`` (see :func:`encode_id`), so that every per-image file of the layout
and of every artifact stays one flat folder.

Readers stream from disk: nothing but the labels tables are held in memory.
"""

from __future__ import annotations

import csv
import filecmp
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from data.errors import DataError
from data.images import open_image

TASKS = ("binary", "multiclass")
IGNORE_INDEX = 255
UNCERTAIN_NAME = "uncertain.csv"

# Characters an id cannot hold as they are: "%" (the escape itself) and the path separators.
_ESCAPED = {"%": "%25", "/": "%2F", "\\": "%5C"}


def encode_id(relative: str) -> str:
    """The prepared id of an image at path ``relative`` (POSIX separators, suffix removed) below a
    user's folder: "%", "/" and "\\" percent-encoded, so that the id is one file name in every
    flat folder of the layout and of the artifacts (images/, masks/, cams/, pseudo_labels/,
    predictions/ ...). Reversible (:func:`decode_id`, or urllib.parse.unquote) and without
    collisions: two paths never give one id. A name without those characters is its own id."""
    return "".join(_ESCAPED.get(c, c) for c in relative)


def decode_id(image_id: str) -> str:
    """The relative path (without suffix) that :func:`encode_id` made ``image_id`` from."""
    from urllib.parse import unquote

    return unquote(image_id)


def default_palette(n_colors: int) -> list[list[int]]:
    """The PASCAL VOC colour map (bit-interleaved), extended to any number of classes."""
    palette = []
    for index in range(n_colors):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.append([r, g, b])
    return palette


@dataclass
class DatasetInfo:
    name: str
    task: str
    classes: list[str]
    palette: list[list[int]] = field(default_factory=list)
    image_ext: str = ".png"

    def __post_init__(self):
        if self.task not in TASKS:
            raise DataError(f"dataset.json: task must be one of {TASKS}, got {self.task!r}")
        if not self.classes:
            raise DataError("dataset.json: 'classes' is empty")
        if not self.palette:
            self.palette = default_palette(len(self.classes) + 1)

    @property
    def num_classes(self) -> int:
        """Foreground classes (the classifier's outputs)."""
        return len(self.classes)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "task": self.task,
            "classes": list(self.classes),
            "palette": self.palette,
            "image_ext": self.image_ext,
        }


def flat_palette(palette: list[list[int]]) -> list[int]:
    flat = [v for rgb in palette for v in rgb]
    flat += [0] * (768 - len(flat))
    flat[255 * 3 : 256 * 3] = [224, 224, 192]  # VOC's colour for the ignore index
    return flat


def write_index_png(path: Path, mask: np.ndarray, palette: list[list[int]]) -> None:
    """Write a class-index mask as a palette PNG (viewable, and still the indices when read)."""
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    image.putpalette(flat_palette(palette))
    atomic_save(image, path)


def create_folder(path: Path) -> None:
    """mkdir -p, with a one-line error when it cannot be (e.g. --out names a file, or a folder below one)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create the output folder {path}: {error.strerror or error}") from None


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a hidden temporary name and rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def strict_json(value):
    """`value` with NaN and infinities as None: Python's json writes them as bare NaN / Infinity,
    which JSON.parse, jq and other strict readers reject (a class absent from a split has no IoU)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def json_text(value, **options) -> str:
    """json.dumps of `value` as strict JSON: NaN and infinities written as null."""
    return json.dumps(strict_json(value), allow_nan=False, **options)


def write_json_atomic(path: Path, value, indent: int | None = 1, **options) -> None:
    """Strict JSON (NaN as null, see json_text) through write_text_atomic."""
    write_text_atomic(path, json_text(value, indent=indent, **options))


def nan_for_null(metrics: dict) -> dict:
    """Metrics read back from strict JSON, with null as NaN again: a cached stage's metrics are
    then the numbers the stage computed."""
    return {k: math.nan if v is None else v for k, v in metrics.items()}


def atomic_save(image: Image.Image, path: Path) -> None:
    """Save through a temporary name so that a killed process never leaves half a PNG."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    image.save(tmp, format=_format_for(path))
    replace_if_changed(tmp, path)


def replace_if_changed(tmp: Path, path: Path) -> bool:
    """Move `tmp` over `path`, unless `path` already holds the same bytes: re-preparing the same
    data then keeps every file's mtime, which the dataset fingerprint reads, and so every
    stage stays up to date. True when `path` was replaced."""
    if path.is_file() and filecmp.cmp(tmp, path, shallow=False):
        tmp.unlink()
        return False
    os.replace(tmp, path)
    return True


def _format_for(path: Path) -> str:
    return {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower(), "PNG")


def read_index_png(path: Path) -> np.ndarray:
    """Class indices of a palette or grayscale PNG, as uint8 HxW. A file that does not decode
    (garbled, cut short) raises DataError naming it, so that callers can pass over one bad file."""
    try:
        with open_image(path) as image:
            if image.mode not in ("P", "L"):
                raise DataError(f"{path}: expected a palette or grayscale mask PNG, got mode {image.mode}")
            return np.array(image)
    except (OSError, ValueError) as error:  # PIL.UnidentifiedImageError is an OSError
        raise DataError(f"{path}: not a readable label PNG ({error})") from None


def read_label_map(path: Path, shape: tuple[int, int], num_classes: int) -> np.ndarray:
    """A training target (seeds, pseudo-label) of an image of `shape` (H, W): class indices
    0..num_classes or IGNORE_INDEX. DataError naming the file when it does not decode, has
    another size, or holds another value: such a file must not train a model."""
    label = read_index_png(path)
    if label.shape != tuple(shape):
        raise DataError(f"{path}: label is {label.shape[1]}x{label.shape[0]} but its image is {shape[1]}x{shape[0]}")
    bad = (label > num_classes) & (label != IGNORE_INDEX)
    if bad.any():
        raise DataError(
            f"{path}: label holds value {int(label[bad][0])}, not a class index 0..{num_classes} nor {IGNORE_INDEX}"
        )
    return label


class PreparedDataset:
    """Read access to a prepared dataset directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"dataset directory not found: {self.root} (run `wss prepare ...` first)")
        info_path = self.root / "dataset.json"
        if not info_path.is_file():
            raise DataError(f"{info_path} is missing: {self.root} is not a prepared dataset")
        try:
            raw = json.loads(info_path.read_text())
            self.info = DatasetInfo(**raw)
        except (json.JSONDecodeError, TypeError) as error:
            raise DataError(f"{info_path}: {error}") from None
        self.labels = read_labels(self.root / "labels.csv", self.info.classes)
        uncertain = self.root / UNCERTAIN_NAME
        # (image, class) labels not known (CheXpert's -1 under --uncertain ignore): only datasets
        # that have them hold the file; their labels.csv says 0 there
        self.uncertain = (
            {image_id: row for image_id, row in read_labels(uncertain, self.info.classes).items() if row.any()}
            if uncertain.is_file()
            else {}
        )

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def classes(self) -> list[str]:
        return self.info.classes

    @property
    def task(self) -> str:
        return self.info.task

    def split(self, name: str) -> list[str]:
        path = self.root / "splits" / f"{name}.txt"
        if not path.is_file():
            known = sorted(p.stem for p in (self.root / "splits").glob("*.txt"))
            raise DataError(f"split {name!r} not found: {path} (splits here: {', '.join(known) or 'none'})")
        ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not ids:
            raise DataError(f"split {name!r} is empty: {path}")
        missing = [i for i in ids if i not in self.labels]
        if missing:
            raise DataError(f"{path}: {len(missing)} ids have no row in labels.csv, e.g. {missing[0]!r}")
        return ids

    def label_vector(self, image_id: str) -> np.ndarray:
        """Multi-hot float32 vector over the foreground classes (an uncertain class is 0: absent)."""
        return self.labels[image_id]

    def training_label_vector(self, image_id: str) -> np.ndarray:
        """The label vector the classifier trains on: 1 present, 0 absent, -1 uncertain (its loss
        leaves that entry out, see stages.cam.nets.classification_loss)."""
        uncertain = self.uncertain.get(image_id)
        if uncertain is None:
            return self.labels[image_id]
        return np.where(uncertain > 0, np.float32(-1), self.labels[image_id]).astype(np.float32)

    def has_uncertain(self, image_id: str) -> bool:
        """Whether a class of the image is uncertain: the stages whose loss cannot leave one class
        out (the IRN's seeds and the segmenter's pseudo-labels, both made from CAMs of the certain
        classes) do not train on such an image."""
        return image_id in self.uncertain

    def image_path(self, image_id: str) -> Path:
        return self.root / "images" / f"{image_id}{self.info.image_ext}"

    def mask_path(self, image_id: str) -> Path:
        return self.root / "masks" / f"{image_id}.png"

    def has_mask(self, image_id: str) -> bool:
        return self.mask_path(image_id).is_file()

    def check_images_open(self, ids: list[str]) -> None:
        """Raise DataError naming the first of `ids` whose file is missing or not an image.

        Reads headers only (about 0.2 ms an image here), so that training stops on a bad file before
        its first epoch rather than epochs later when the sampler reaches it. A file whose header
        is fine but whose data are cut short still fails later, when it is decoded.
        """
        bad = []
        for image_id in ids:
            try:
                self.image_size(image_id)
            except DataError as error:
                bad.append(str(error))
        if bad:
            more = f" (and {len(bad) - 1} more images)" if len(bad) > 1 else ""
            raise DataError(f"{bad[0]}{more}; repair or remove them, or take them out of the split")

    def read_image(self, image_id: str) -> np.ndarray:
        """uint8 HxWx3 RGB (grayscale images are repeated over the three channels)."""
        return read_rgb(self.image_path(image_id))

    def read_mask(self, image_id: str, shape: tuple[int, int] | None = None) -> np.ndarray | None:
        """Ground-truth class indices (evaluation only), or None when the image has no mask.
        DataError when the mask does not decode or, given `shape` (H, W), has another size."""
        path = self.mask_path(image_id)
        if not path.is_file():
            return None
        mask = read_index_png(path)
        if shape is not None and mask.shape != tuple(shape):
            raise DataError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {shape[1]}x{shape[0]}")
        return mask

    def image_size(self, image_id: str) -> tuple[int, int]:
        """(H, W) of an image, from its header only."""
        path = self.image_path(image_id)
        try:
            with open_image(path) as image:
                return image.height, image.width
        except (OSError, ValueError) as error:
            reason = "file not found" if not path.is_file() else f"cannot decode image ({error})"
            raise DataError(f"{path}: {reason}") from None

    def label_problem(self, image_id: str, path: Path) -> str | None:
        """Why the label map at `path` cannot train on `image_id` (see read_label_map), or None.
        Stages check their targets when they list them, so that one bad file is skipped with
        its reason instead of stopping training epochs later."""
        try:
            read_label_map(path, self.image_size(image_id), self.info.num_classes)
        except DataError as error:
            return str(error)
        return None

    def fingerprint(self) -> str:
        """Hash of the metadata and splits (content) plus name, size and mtime of every image
        and mask.

        Cheap enough for 10^5 files (one stat each). The mtime catches an image replaced by one
        of the same size; a copy that does not keep times only makes the stages recompute.
        """
        digest = hashlib.sha256()
        for meta in ["dataset.json", "labels.csv"]:
            digest.update((self.root / meta).read_bytes())
        boxes = self.root / "boxes.csv"  # NIH: the cam stage scores localization against them
        if boxes.is_file():
            digest.update(b"boxes.csv\n" + boxes.read_bytes())
        uncertain = self.root / UNCERTAIN_NAME  # only where a dataset has one: others keep their fingerprint
        if uncertain.is_file():
            digest.update(f"{UNCERTAIN_NAME}\n".encode() + uncertain.read_bytes())
        for sub in ["splits", "images", "masks"]:
            folder = self.root / sub
            if not folder.is_dir():
                continue
            with os.scandir(folder) as entries:
                files = sorted((e.name, e.stat()) for e in entries if e.is_file() and not e.name.startswith("."))
            for name, stat in files:
                if sub == "splits":  # rewritten by every prepare: hash the content, not the time
                    digest.update(f"{sub}/{name}:{stat.st_size}\n".encode())
                    digest.update((folder / name).read_bytes())
                else:
                    digest.update(f"{sub}/{name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()


def read_rgb(path: Path) -> np.ndarray:
    if not Path(path).is_file():
        raise DataError(f"image file not found: {path}")
    try:
        with open_image(path) as image:
            return np.array(image.convert("RGB"))
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot decode image ({error})") from None


def read_labels(path: Path, classes: list[str]) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path} is missing")
    labels: dict[str, np.ndarray] = {}
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or header[0] != "image_id":
            raise DataError(f"{path}: the header must start with 'image_id'")
        unknown = [c for c in header[1:] if c not in classes]
        if unknown:
            raise DataError(f"{path}: unknown class column {unknown[0]!r} (classes: {', '.join(classes)})")
        missing = [c for c in classes if c not in header[1:]]
        if missing:
            raise DataError(f"{path}: no column for class {missing[0]!r}")
        order = [header.index(c) for c in classes]
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{line_no}: expected {len(header)} fields, got {len(row)}")
            try:
                values = np.array([float(row[i]) for i in order], dtype=np.float32)
            except ValueError:
                raise DataError(f"{path}:{line_no}: label values must be 0 or 1") from None
            if not np.isin(values, (0.0, 1.0)).all():
                raise DataError(f"{path}:{line_no}: label values must be 0 or 1")
            if row[0] in labels:
                raise DataError(f"{path}:{line_no}: duplicate image id {row[0]!r}")
            labels[row[0]] = values
    return labels


class DatasetWriter:
    """Writes the prepared layout; used by every `wss prepare` reader."""

    def __init__(self, root: str | Path, info: DatasetInfo):
        self.root = Path(root)
        self.info = info
        create_folder(self.root)
        for sub in ["images", "masks", "splits"]:
            create_folder(self.root / sub)
        # a folder being (re)prepared is not a dataset until write_info: a run killed between
        # writing the new train split and the new val split must not leave a usable mix of both
        info = self.root / "dataset.json"
        self._previous_info = info.read_text() if info.is_file() else None
        info.unlink(missing_ok=True)

    def keep_previous(self) -> None:
        """For a run that prepared nothing (every image failed, none matched): it changed no
        file, so the dataset prepared before, if any, stays usable."""
        if self._previous_info is not None:
            write_text_atomic(self.root / "dataset.json", self._previous_info)

    def image_path(self, image_id: str) -> Path:
        return self.root / "images" / f"{image_id}{self.info.image_ext}"

    def mask_path(self, image_id: str) -> Path:
        return self.root / "masks" / f"{image_id}.png"

    def write_image(self, image_id: str, image: np.ndarray) -> None:
        atomic_save(Image.fromarray(np.asarray(image, dtype=np.uint8)), self.image_path(image_id))

    def write_mask(self, image_id: str, mask: np.ndarray) -> None:
        write_index_png(self.mask_path(image_id), mask, self.info.palette)

    def write_labels(self, labels: dict[str, np.ndarray | list[int]]) -> None:
        path = self.root / "labels.csv"
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image_id", *self.info.classes])
            for image_id in sorted(labels):
                writer.writerow([image_id, *[int(v) for v in labels[image_id]]])
        os.replace(tmp, path)

    def write_uncertain(self, uncertain: dict[str, np.ndarray | list[int]]) -> None:
        """uncertain.csv (1 = the class's label is uncertain) for the images that have such a class;
        none: the file is removed (one left by an earlier preparation would hold stale entries)."""
        path = self.root / UNCERTAIN_NAME
        rows = {image_id: row for image_id, row in uncertain.items() if any(row)}
        if not rows:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image_id", *self.info.classes])
            for image_id in sorted(rows):
                writer.writerow([image_id, *[int(v) for v in rows[image_id]]])
        os.replace(tmp, path)

    def write_split(self, name: str, ids: list[str]) -> None:
        """Write the split; an empty one removes its file, since readers refuse empty splits and
        a file left from an earlier preparation would hold stale ids."""
        path = self.root / "splits" / f"{name}.txt"
        if not ids:
            path.unlink(missing_ok=True)
            return
        write_text_atomic(path, "".join(f"{i}\n" for i in ids))

    def write_info(self) -> None:
        """Written last: a directory without dataset.json is not a prepared dataset."""
        write_text_atomic(self.root / "dataset.json", json.dumps(self.info.to_json(), indent=1))
