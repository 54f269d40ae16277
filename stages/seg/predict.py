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
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from data.datasets import first_item
from data.dicom import is_dicom, read_dicom
from data.errors import DataError, WssError
from data.layout import atomic_save, create_folder, write_index_png
from data.nih import to_grayscale
from data.rle import siim_rle_encode
from stages.common.runtime import resolve_device
from stages.seg.model import load_segmenter, predict_probabilities, probabilities_to_mask

log = logging.getLogger("wss.predict")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}
OVERLAY_ALPHA = 0.5


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
                failures.append(f"{item}: folder holds no image or DICOM files "
                                f"({', '.join(sorted(IMAGE_SUFFIXES))})")
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
            if not name.startswith(".") and path.is_file() and (path.suffix.lower() in IMAGE_SUFFIXES or is_dicom(path)):
                yield path


def image_id(path: Path) -> str:
    """The name outputs and submission rows go by: the stem when the suffix is an image/DICOM one,
    else the whole name, so that a suffix-less DICOM named by its SOPInstanceUID keeps the UID's last part."""
    return path.stem if path.suffix.lower() in IMAGE_SUFFIXES else path.name


def read_input(path: Path) -> np.ndarray:
    """uint8 HxWx3 of an image file or a DICOM (by magic or suffix); WssError naming the file.

    Images are turned as they are displayed (EXIF orientation), so the masks are in that
    orientation too. Grayscale deeper than 8 bits (16-bit PNG, integer or float TIFF) is
    stretched from its own minimum to maximum, as NIH preparation does (`to_grayscale`); RGB
    conversion would clip it at 255 or round [0, 1] floats to black. Alpha (RGBA, LA) is
    dropped, not composited: the colour under it is what was imaged.
    """
    if path.suffix.lower() in (".dcm", ".dicom") or is_dicom(path):
        gray = read_dicom(path)
        return np.repeat(gray[:, :, None], 3, axis=2)
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if len(image.getbands()) == 1 and image.mode != "P":
                return np.repeat(to_grayscale(image)[:, :, None], 3, axis=2)
            return np.array(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as error:  # Pillow's errors for damaged files
        raise DataError(f"{path}: cannot decode image ({error})") from None


def overlay(image: np.ndarray, mask: np.ndarray, palette: list[list[int]], alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The image with every non-background pixel blended towards its class colour."""
    colours = np.zeros((256, 3), np.float32)
    colours[: len(palette)] = np.asarray(palette, np.float32)
    blended = image.astype(np.float32)
    shown = (mask > 0) & (mask < len(palette))
    blended[shown] = (1 - alpha) * blended[shown] + alpha * colours[mask[shown]]
    return np.round(blended).astype(np.uint8)


class InputFiles(Dataset):
    """Decoded inputs for a DataLoader (reading and decoding in workers); errors become records."""

    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path = self.files[index]
        try:
            return {"path": path, "image": read_input(path)}
        except WssError as error:
            return {"path": path, "error": str(error) if str(path) in str(error) else f"{path}: {error}"}
        except Exception as error:  # decoders raise many types for damaged files
            return {"path": path, "error": f"{path}: cannot read ({type(error).__name__}: {error})"}


def predict_inputs(artifact_dir: Path, inputs: list[str | Path], out_dir: Path, *, probabilities: bool = False,
                   device: str = "auto", classes: list[str] | None = None, task: str | None = None,
                   threshold: float | None = None, long_side: int | None = None, workers: int = 0) -> PredictReport:
    """Predict every input with the model of `artifact_dir` (a seg artifact or its model file).

    `classes` / `task`, when given (the config's dataset), must match the model's: a model of
    another config is refused as a whole (WssError). `threshold` and `long_side` default to
    the model's own; `workers` processes read and decode the files.
    """
    torch_device = resolve_device(device)
    model, meta = load_segmenter(Path(artifact_dir), torch_device, classes, task)
    threshold = meta["threshold"] if threshold is None else threshold
    long_side = meta["long_side"] if long_side is None else long_side
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
    loader = DataLoader(InputFiles(list(unique.values())), batch_size=1, collate_fn=first_item, num_workers=workers)
    for item in tqdm(loader, desc="predict", unit="file", leave=False):
        stem = image_id(item["path"])
        if "error" in item:
            report.failures.append(item["error"])
            if meta["task"] == "binary":
                rows.append((stem, "-1"))
                report.placeholders.append(stem)
            continue
        image = item["image"]
        probs = predict_probabilities(model, image, meta["task"], long_side, torch_device)
        mask = probabilities_to_mask(probs, meta["task"], threshold)
        write_index_png(out_dir / "masks" / f"{stem}.png", mask, meta["palette"])
        atomic_save(Image.fromarray(overlay(image, mask, meta["palette"])), out_dir / "overlays" / f"{stem}.png")
        if probabilities:
            save_npy(out_dir / "probabilities" / f"{stem}.npy", probs.numpy().astype(np.float16))
        if meta["task"] == "binary":
            rows.append((stem, siim_rle_encode(mask)))
        report.written.append(stem)
    if meta["task"] == "binary" and rows:
        report.submission = write_submission(out_dir / "submission.csv", rows)
    for line in report.failures:
        log.warning("predict: %s", line)
    if report.placeholders:
        log.warning("predict: %s has %d placeholder row(s) with EncodedPixels -1 for inputs that could not be "
                    "read; they are not predictions: %s", report.submission, len(report.placeholders),
                    ", ".join(report.placeholders))
    return report


def save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        np.save(handle, array)
    os.replace(tmp, path)


def write_submission(path: Path, rows: list[tuple[str, str]]) -> Path:
    """Kaggle SIIM submission: one row per image, ImageId = `image_id` (the SOPInstanceUID)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ImageId", "EncodedPixels"])
        writer.writerows(rows)
    os.replace(tmp, path)
    return path
