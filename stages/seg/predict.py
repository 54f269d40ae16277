"""Apply a trained segmenter to new files: image files, folders of them, and DICOMs.

Outputs in `out_dir`, named by each input's id (see `image_id`):
    masks/<id>.png          class indices as a palette PNG, at the size and orientation the image
                            is displayed in (EXIF orientation applied)
    overlays/<id>.png       the image with the classes' palette colours blended in
    probabilities/<id>.npy  float16 (C, H, W) when asked (binary: C = 1, the foreground)
    submission.csv          binary models: `ImageId,EncodedPixels` (SIIM RLE, -1 when empty)
A file that cannot be read is reported and skipped; the others are still processed. Kaggle wants
a row for every ImageId, so such a file still gets a submission row: a placeholder -1 (no
finding), which is a guess, not a prediction; a warning names those files.

Memory follows the model's input size, not the image's. The loader workers decode each file and
hand over only what prediction needs: the image resized to the model's input (`long_side`) and
the picture the overlay is drawn on, which is the image itself up to OVERLAY_MAX_SIDE pixels on
its long side and a copy reduced by an integer factor above (a JPEG is then decoded at a
reduced scale directly). The mask is made at full size in bands of rows (stages.seg.model.
predict_mask), the probabilities are written band by band. An image of more than `max_pixels`
pixels is refused from its header, before it is decoded.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from data.dicom import is_dicom, read_dicom
from data.errors import DataError, WssError
from data.images import open_image
from data.layout import atomic_save, create_folder, write_index_png
from data.nih import to_grayscale
from data.rle import siim_rle_encode
from data.transforms import resize_long, resize_to, scaled_size
from stages.common.runtime import image_loader, progress, resolve_device
from stages.seg.model import load_segmenter, predict_mask
from stages.seg.postprocess import ClassifierScore, EmptyMaskRule

log = logging.getLogger("wss.predict")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}
OVERLAY_ALPHA = 0.5
# Overlays of images longer than this (pixels, either side) are drawn on a copy reduced by the
# smallest integer factor that fits: 4096 keeps a 12-megapixel photo's overlay at full size,
# and one overlay at most 48 MiB of RGB.
OVERLAY_MAX_SIDE = 4096
MAX_PIXELS_HINT = "wss predict --max-pixels moves the bound"
ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transposition that displays the image (as PIL.ImageOps.exif_transpose)
EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass
class PredictReport:
    written: list[str] = field(default_factory=list)  # ids of the inputs that got outputs
    failures: list[str] = field(default_factory=list)  # one line per input that did not
    submission: Path | None = None
    placeholders: list[str] = field(default_factory=list)  # ids given a -1 row because they could not be read


OUTPUT_FOLDERS = ("masks", "overlays", "probabilities")


def collect_inputs(inputs: list[str | Path], out_dir: Path | None = None) -> tuple[list[Path], list[str]]:
    """Files to predict and input errors. Folders are searched recursively for image/DICOM
    suffixes and for DICOMs without one (named by their UID), leaving out the output folders
    (masks/, overlays/, probabilities/) of `out_dir` and of any earlier run found inside: a run
    into a folder inside the input folder, or into the input folder itself, must predict the
    images, not masks written before. Files nearer the named folder come first, so that of two
    files with one name the shallower is predicted. A file reached twice (named, and inside a
    named folder) is predicted once."""
    files, failures = [], []
    skip = Path(out_dir).resolve() if out_dir is not None else None
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(input_files(item, skip), key=lambda p: (len(p.relative_to(item).parts), p))
            if not found:
                failures.append(f"{item}: folder holds no image or DICOM files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            failures.append(f"{item}: no such file or folder")
    unique = {path.resolve(): path for path in reversed(files)}  # the first mention of each file
    return [path for path in files if unique[path.resolve()] is path], failures


def input_files(folder: Path, out_dir: Path | None):
    """Image and DICOM files under `folder`, not hidden, not in a predict output folder."""
    for root, folders, names in os.walk(folder):
        root = Path(root)
        outputs = root.resolve() == out_dir or ((root / "masks").is_dir() and (root / "overlays").is_dir())
        folders[:] = [f for f in folders if not f.startswith(".") and not (outputs and f in OUTPUT_FOLDERS)]
        for name in names:
            path = root / name
            if (
                not name.startswith(".")
                and path.is_file()
                and (path.suffix.lower() in IMAGE_SUFFIXES or is_dicom(path))
            ):
                yield path


def image_id(path: Path) -> str:
    """The name outputs and submission rows go by: the stem when the suffix is an image/DICOM one,
    else the whole name, so that a suffix-less DICOM named by its SOPInstanceUID keeps the UID's last part."""
    return path.stem if path.suffix.lower() in IMAGE_SUFFIXES else path.name


def read_input(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """uint8 HxWx3 of an image file or a DICOM (by magic or suffix); WssError naming the file.

    Images are turned as they are displayed (EXIF orientation), so the masks are in that
    orientation too. Grayscale deeper than 8 bits (16-bit PNG, integer or float TIFF) is
    stretched from its own minimum to maximum, as NIH preparation does (`to_grayscale`); RGB
    conversion would clip it at 255 or round [0, 1] floats to black. Alpha (RGBA, LA) is
    dropped, not composited: the colour under it is what was imaged. An image of more than
    `max_pixels` pixels (None: data.images.MAX_IMAGE_PIXELS) is refused before it is decoded.
    """
    if _is_dicom_file(path):
        return _rgb(read_dicom(path, max_pixels, MAX_PIXELS_HINT))
    try:
        with open_image(path, max_pixels, MAX_PIXELS_HINT) as image:
            return _full_rgb(image)
    except (OSError, ValueError, SyntaxError) as error:  # Pillow's errors for damaged files
        raise DataError(f"{path}: cannot decode image ({error})") from None


def load_input(path: Path, long_side: int | None, max_pixels: int | None = None) -> dict:
    """What prediction needs of one input, decoded in a loader worker: {"size": (H, W) as
    displayed, "resized": uint8 (h, w, 3), the image resized to the model's input (resize_long
    of read_input's array), "view": uint8 (h', w', 3), the picture the overlay is drawn on}.

    Up to OVERLAY_MAX_SIDE the view is read_input's array itself. Above, the full image is
    never turned into an array: the model's input is resized from the decoded picture and the
    view reduced from it by an integer factor (Pillow's reduce, a box filter), both turned to
    the displayed orientation afterwards; a JPEG is decoded at the largest of 1/2, 1/4, 1/8
    of its size that still covers the view (Pillow's draft), from which the model's input is
    then resized too.
    """
    try:
        if _is_dicom_file(path):
            gray = read_dicom(path, max_pixels, MAX_PIXELS_HINT)
            if max(gray.shape) <= OVERLAY_MAX_SIDE:
                return _small_input(_rgb(gray), long_side)
            return _large_input(Image.fromarray(gray), long_side)
        with open_image(path, max_pixels, MAX_PIXELS_HINT) as image:
            if max(image.size) <= OVERLAY_MAX_SIDE:
                return _small_input(_full_rgb(image), long_side)
            return _large_input(image, long_side)
    except (OSError, ValueError, SyntaxError) as error:  # Pillow's errors for damaged files
        raise DataError(f"{path}: cannot decode image ({error})") from None


def _is_dicom_file(path: Path) -> bool:
    return path.suffix.lower() in (".dcm", ".dicom") or is_dicom(path)


def _full_rgb(image: Image.Image) -> np.ndarray:
    """The displayed image as uint8 HxWx3 (see read_input)."""
    image = ImageOps.exif_transpose(image)
    if len(image.getbands()) == 1 and image.mode != "P":
        return _rgb(to_grayscale(image))
    return np.array(image.convert("RGB"))


def _rgb(pixels: np.ndarray) -> np.ndarray:
    """Grayscale HxW repeated over three channels; HxWx3 as it is."""
    return np.repeat(pixels[:, :, None], 3, axis=2) if pixels.ndim == 2 else pixels


def _small_input(image: np.ndarray, long_side: int | None) -> dict:
    resized = resize_long(image, long_side) if long_side else image
    return {"size": image.shape[:2], "resized": resized, "view": image}


def _large_input(image: Image.Image, long_side: int | None) -> dict:
    """load_input above OVERLAY_MAX_SIDE: only the resized copies become arrays."""
    transpose = EXIF_TRANSPOSE.get(image.getexif().get(ORIENTATION_TAG, 1))
    turned = transpose in (
        Image.Transpose.TRANSPOSE,
        Image.Transpose.ROTATE_270,
        Image.Transpose.TRANSVERSE,
        Image.Transpose.ROTATE_90,
    )
    width, height = image.size
    shown = (width, height) if turned else (height, width)  # (H, W) as displayed
    factor = math.ceil(max(width, height) / OVERLAY_MAX_SIDE)
    if image.format == "JPEG":
        image.draft(image.mode, (math.ceil(width / factor), math.ceil(height / factor)))
    image = _working_mode(image)
    model_hw = scaled_size(*shown, long_side / max(shown)) if long_side else shown
    stored_hw = model_hw[::-1] if turned else model_hw
    resized = image if image.size == stored_hw[::-1] else image.resize(stored_hw[::-1], Image.BILINEAR)
    view = image.reduce(math.ceil(max(image.size) / OVERLAY_MAX_SIDE))
    if transpose is not None:
        resized, view = resized.transpose(transpose), view.transpose(transpose)
    return {"size": shown, "resized": _rgb(np.asarray(resized)), "view": _rgb(np.asarray(view))}


def _working_mode(image: Image.Image) -> Image.Image:
    """The decoded picture as 8-bit grayscale ("L") or "RGB", as read_input converts it, without
    a copy where it already is one of them."""
    if image.mode in ("L", "RGB"):
        return image
    if len(image.getbands()) == 1 and image.mode != "P":
        return Image.fromarray(to_grayscale(image))
    return image.convert("RGB")


def overlay(image: np.ndarray, mask: np.ndarray, palette: list[list[int]], alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The image with every non-background pixel blended towards its class colour.

    In uint8 through a table of every (class, channel, value) blend, computed in float32 as
    (1 - alpha) * value + alpha * colour and rounded: the same numbers as blending the pixels
    in float32, without a float copy of the image (12 bytes per pixel)."""
    colours = np.zeros((256, 3), np.float32)
    colours[: len(palette)] = np.asarray(palette, np.float32)
    values = np.arange(256, dtype=np.float32)
    table = np.round((1 - alpha) * values[None, None, :] + alpha * colours[:, :, None]).astype(np.uint8)
    blended = np.array(image, dtype=np.uint8, copy=True)
    shown = (mask > 0) & (mask < len(palette))
    classes = mask[shown]
    for channel in range(3):
        plane = blended[:, :, channel]
        plane[shown] = table[classes, channel, plane[shown]]
    return blended


def overlay_of(view: np.ndarray, mask: np.ndarray, palette: list[list[int]]) -> np.ndarray:
    """The overlay drawn on `view`, with the mask brought to its size (nearest) where it is smaller."""
    if view.shape[:2] != mask.shape:
        mask = resize_to(mask, view.shape[:2], nearest=True)
    return overlay(view, mask, palette)


class InputFiles(Dataset):
    """Decoded inputs for a DataLoader (reading and decoding in workers); errors become records."""

    def __init__(self, files: list[Path], long_side: int | None, max_pixels: int | None = None):
        self.files, self.long_side, self.max_pixels = files, long_side, max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path = self.files[index]
        try:
            return {"path": path, **load_input(path, self.long_side, self.max_pixels)}
        except WssError as error:
            return {"path": path, "error": str(error) if str(path) in str(error) else f"{path}: {error}"}
        except Exception as error:  # decoders raise many types for damaged files
            return {"path": path, "error": f"{path}: cannot read ({type(error).__name__}: {error})"}


def predict_inputs(
    artifact_dir: Path,
    inputs: list[str | Path],
    out_dir: Path,
    *,
    probabilities: bool = False,
    device: str = "auto",
    classes: list[str] | None = None,
    task: str | None = None,
    threshold: float | None = None,
    long_side: int | None = None,
    workers: int = 0,
    max_pixels: int | None = None,
    cam_artifact: Path | None = None,
) -> PredictReport:
    """Predict every input with the model of `artifact_dir` (a seg artifact or its model file).

    `classes` / `task`, when given (the config's dataset), must match the model's: a model of
    another config is refused as a whole (WssError). `threshold` and `long_side` default to
    the model's own; `workers` processes read and decode the files; an image of more than
    `max_pixels` pixels is refused (one failure line) before it is decoded. A binary model's
    masks (and submission rows) follow its empty-mask rule (stages.seg.postprocess); a rule that
    empties images by the stage-1 classifier's score reads the classifier of `cam_artifact`,
    without which it is refused (WssError).
    """
    torch_device = resolve_device(device)
    model, meta = load_segmenter(Path(artifact_dir), torch_device, classes, task)
    threshold = meta["threshold"] if threshold is None else threshold
    long_side = meta["long_side"] if long_side is None else long_side
    rule = EmptyMaskRule.of(meta) if meta["task"] == "binary" else EmptyMaskRule()
    classifier = None
    if rule.decides_with_classifier:
        if cam_artifact is None:
            raise WssError(
                f"{artifact_dir}: the segmenter empties images whose stage-1 classifier score is low "
                f"(seg.image_score: {rule.image_score}), but its cam artifact is not known here; predict "
                f"with the config whose artifact it is (-c), or set seg.image_score: seg"
            )
        classifier = ClassifierScore(cam_artifact, torch_device)
    out_dir = Path(out_dir)
    files, failures = collect_inputs(inputs, out_dir)
    unique: dict[str, Path] = {}
    for path in files:
        if image_id(path) in unique:
            failures.append(f"{path}: same name as {unique[image_id(path)]}; outputs are named by it, skipped")
        else:
            unique[image_id(path)] = path
    report = PredictReport(failures=failures)
    for sub in ["masks", "overlays"] + (["probabilities"] if probabilities else []):
        create_folder(out_dir / sub)
    rows = []
    loader = image_loader(InputFiles(list(unique.values()), long_side, max_pixels), workers)
    for item in progress(loader, desc="predict", unit="file", leave=False):
        stem = image_id(item["path"])
        if "error" in item:
            report.failures.append(item["error"])
            if meta["task"] == "binary":
                rows.append((stem, "-1"))
                report.placeholders.append(stem)
            continue
        saved = (
            ProbabilityFile(out_dir / "probabilities" / f"{stem}.npy", (int(meta["channels"]), *item["size"]))
            if probabilities
            else None
        )
        peak = PeakProbability(saved.write_rows if saved else None)
        try:
            mask = predict_mask(
                model, item["resized"], item["size"], meta["task"], threshold, torch_device, peak.write_rows
            )
        except BaseException:
            if saved:
                saved.discard()
            raise
        if saved:
            saved.commit()
        if rule.active:
            cam_score = classifier(item["resized"]) if classifier is not None else None
            mask = rule.apply(mask, rule.score(peak.value, cam_score), long_side)
        write_index_png(out_dir / "masks" / f"{stem}.png", mask, meta["palette"])
        atomic_save(
            Image.fromarray(overlay_of(item["view"], mask, meta["palette"])), out_dir / "overlays" / f"{stem}.png"
        )
        if meta["task"] == "binary":
            rows.append((stem, siim_rle_encode(mask)))
        report.written.append(stem)
        del item, mask  # not held while the next image is received
    if meta["task"] == "binary" and rows:
        report.submission = write_submission(out_dir / "submission.csv", rows)
    for line in report.failures:
        log.warning("predict: %s", line)
    if report.placeholders:
        log.warning(
            "predict: %s has %d placeholder row(s) with EncodedPixels -1 for inputs that could not be "
            "read; they are not predictions: %s",
            report.submission,
            len(report.placeholders),
            ", ".join(report.placeholders),
        )
    return report


class PeakProbability:
    """The largest foreground probability of an image, taken from the bands predict_mask hands
    over (the binary channel), and passed on to `forward` (a ProbabilityFile's write_rows)."""

    def __init__(self, forward=None):
        self.forward, self.value = forward, 0.0

    def write_rows(self, top: int, probs: torch.Tensor) -> None:
        self.value = max(self.value, float(probs[0].max())) if probs.numel() else self.value
        if self.forward is not None:
            self.forward(top, probs)


class ProbabilityFile:
    """A float16 (C, H, W) .npy file written a band of rows at a time, so that only one band is
    ever held in memory; under a temporary name until `commit`, so that a killed run never
    leaves half a file under the real name."""

    def __init__(self, path: Path, shape: tuple[int, int, int]):
        self.path, self.shape = Path(path), tuple(int(n) for n in shape)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        header = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.float16, shape=self.shape)
        self.offset = header.offset  # where the data starts, after the .npy header
        del header
        self.handle = open(self.tmp, "r+b")

    def write_rows(self, top: int, probs: torch.Tensor) -> None:
        """Rows top.. of every channel, from float32 (C, rows, W) probabilities."""
        band = probs.numpy().astype(np.float16)
        channels, height, width = self.shape
        for channel in range(channels):
            data = memoryview(np.ascontiguousarray(band[channel])).cast("B")
            start = self.offset + (channel * height + top) * width * band.itemsize
            while data:  # a regular file takes it all at once unless the disk is full
                written = os.pwrite(self.handle.fileno(), data, start)
                data, start = data[written:], start + written

    def commit(self) -> None:
        self.handle.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.handle.close()
        self.tmp.unlink(missing_ok=True)


def write_submission(path: Path, rows: list[tuple[str, str]]) -> Path:
    """Kaggle SIIM submission: one row per image, ImageId = `image_id` (the SOPInstanceUID)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ImageId", "EncodedPixels"])
        writer.writerows(rows)
    os.replace(tmp, path)
    return path
