"""Overlay grids a person can look at: one row per image, one column per step of the chain.

Columns depend on how far the chain goes: image | CAM | seeds | boundary | pseudo-label |
prediction | ground truth. Label maps are drawn in the dataset palette over the image; the CAM
is a heatmap of the labelled classes' maximum. Images are the first `n` of the train split
that have a labelled class (where the CAMs, seeds and pseudo-labels exist).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from data.errors import DataError, WssError
from data.layout import PreparedDataset, create_folder, read_index_png, read_label_map
from data.transforms import resize_to, scaled_size

log = logging.getLogger("wss.visualize")
TILE = 192
COLUMNS_UNTIL = {
    "cam": ["image", "CAM", "ground truth"],
    "irn": ["image", "CAM", "seeds", "boundary", "pseudo-label", "ground truth"],
    "seg": ["image", "CAM", "seeds", "boundary", "pseudo-label", "prediction", "ground truth"],
}
STAGE_FOR_COLUMN = {"CAM": "cam", "seeds": "irn", "boundary": "pseudo", "pseudo-label": "pseudo", "prediction": "seg"}
STAGE_OUTPUTS = {"cam": ["CAM"], "irn": ["seeds"], "pseudo": ["boundary", "pseudo-label"], "seg": ["prediction"]}
LABEL_CHARS = 24  # a row label's line in the grid: 2-inch rows at 7 pt hold about 30 characters
LABEL_LINES = 2  # lines of class names under the id
MISSING_GREY = 235


def short_id(image_id: str, chars: int = LABEL_CHARS) -> str:
    """`1.2.276.0.7230010.3.1.4.8323329.5597.1517875188.959090` -> `1.2.276...1517875188.959090`:
    the start and the end (where the ids of a series differ), the middle elided. The full id is
    in the HTML report's caption."""
    if len(image_id) <= chars:
        return image_id
    head = (chars - 3) // 3
    return f"{image_id[:head]}...{image_id[len(image_id) - (chars - 3 - head) :]}"


def class_lines(names: list[str], chars: int = LABEL_CHARS, lines: int = LABEL_LINES) -> list[str]:
    """The class names wrapped at the commas into at most `lines` lines of `chars` characters;
    what does not fit is counted (`+3 more`)."""
    if not names:
        return ["no finding"]
    out: list[str] = []
    for index, name in enumerate(names):
        name = short_id(name, chars)
        if out and len(out[-1]) + 2 + len(name) <= chars:
            out[-1] += f", {name}"
        elif len(out) < lines:
            out.append(name)
        else:
            more = f" +{len(names) - index} more"
            last = out[-1]
            out[-1] = (last if len(last) + len(more) <= chars else short_id(last, chars - len(more))) + more
            break
    return out


def fit_text(draw, text: str, width: int) -> str:
    """`text` shortened by `short_id` until PIL draws it (default font) within `width` pixels."""
    chars = len(text)
    while chars > 5 and draw.textbbox((0, 0), short_id(text, chars))[2] > width:
        chars -= 1
    return short_id(text, chars)


def row_label(image_id: str, names: list[str]) -> str:
    """A grid row's label: the shortened id over the wrapped class names."""
    return "\n".join([short_id(image_id), *class_lines(names)])


def blend(image: np.ndarray, mask: np.ndarray | None, palette: list[list[int]]) -> np.ndarray:
    """The image with the label colours laid over it (as `wss predict` draws them), and
    ignored pixels (255, e.g. between seeds) whitened."""
    from stages.seg.predict import overlay

    if mask is None:
        return image
    out = overlay(image, mask, palette).astype(np.float32)
    ignored = mask == 255
    out[ignored] = 0.5 * out[ignored] + 0.5 * 255
    return out.astype(np.uint8)


def heatmap(image: np.ndarray, values: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    from matplotlib import colormaps

    colours = colormaps["jet"](np.clip(values, 0, 1))[..., :3] * 255
    return ((1 - alpha) * image + alpha * colours).clip(0, 255).astype(np.uint8)


def tile(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    height, width = array.shape[:2]
    size = scaled_size(height, width, TILE / max(height, width))
    out = np.full((TILE, TILE, 3), 255, np.uint8)
    out[: size[0], : size[1]] = resize_to(array, size, nearest=True)
    return out


class Columns:
    """Reads each column's picture for one image from the artifacts that exist."""

    def __init__(self, dataset: PreparedDataset, artifacts: dict[str, Path], device, seg_threshold: float):
        self.dataset, self.artifacts, self.device = dataset, artifacts, device
        self.seg_threshold = seg_threshold
        self._segmenter = None

    def picture(self, column: str, image_id: str, image: np.ndarray) -> np.ndarray | None:
        palette = self.dataset.info.palette
        if column == "image":
            return image
        if column == "ground truth":
            mask = self.dataset.read_mask(image_id, image.shape[:2])
            return None if mask is None else blend(image, mask, palette)  # missing, not an empty mask
        if column == "CAM":
            return self.cam(image_id, image)
        folder = {
            "seeds": ("irn", "seeds"),
            "pseudo-label": ("pseudo", "pseudo_labels"),
            "boundary": ("pseudo", "boundaries"),
        }.get(column)
        if folder is not None:
            path = self.artifacts.get(folder[0], Path("/nonexistent")) / folder[1] / f"{image_id}.png"
            if not path.is_file():
                return None
            if column == "boundary":
                edge = read_index_png(path).astype(np.float32) / 255
                return heatmap(image, resize_to(edge, image.shape[:2]), alpha=0.6)
            return blend(image, self.label(path, image), palette)
        if column == "prediction":
            saved = self.artifacts["seg"] / "predictions" / f"{image_id}.png"
            mask = self.label(saved, image) if saved.is_file() else self.prediction(image)
            return blend(image, mask, palette)
        raise ValueError(column)

    def label(self, path: Path, image: np.ndarray) -> np.ndarray:
        """A label map checked to fit `image` (DataError otherwise: see draw_grid)."""
        return read_label_map(path, image.shape[:2], self.dataset.info.num_classes)

    def cam(self, image_id: str, image: np.ndarray) -> np.ndarray | None:
        from stages.cam.infer import load_cam, upsample_cam

        path = self.artifacts.get("cam", Path("/nonexistent")) / "cams" / f"{image_id}.npz"
        if not path.is_file():
            return None
        cam, keys, size = load_cam(path)
        values = upsample_cam(cam, size).max(axis=0) if len(keys) else np.zeros(size, np.float32)
        return heatmap(image, values)

    def prediction(self, image: np.ndarray) -> np.ndarray:
        from stages.seg.model import load_segmenter, predict_probabilities, probabilities_to_mask

        if self._segmenter is None:
            self._segmenter = load_segmenter(self.artifacts["seg"], self.device)
        model, meta = self._segmenter
        probs = predict_probabilities(model, image, meta["task"], meta["long_side"], self.device)
        return probabilities_to_mask(probs, meta["task"], self.seg_threshold)


def stage_strips(
    dataset: PreparedDataset, stage: str, artifact: Path, images: list[tuple[str, np.ndarray]], device, seg_threshold
) -> tuple[list[str], list[tuple[str, np.ndarray]]]:
    """The columns and, per (image id, image), one strip of tiles side by side: the image, the
    stage's own outputs (`STAGE_OUTPUTS`, read from `artifact`) and the ground truth where the
    dataset has masks (for TensorBoard, after the stage)."""
    columns = ["image", *STAGE_OUTPUTS[stage]]
    if any(dataset.has_mask(image_id) for image_id, _ in images):
        columns.append("ground truth")
    reader = Columns(dataset, {stage: artifact}, device, seg_threshold)
    strips = []
    for image_id, image in images:
        tiles = []
        for column in columns:
            try:
                picture = reader.picture(column, image_id, image)
            except WssError as error:  # one bad file costs its tile
                log.warning("overlay strip: %s of %s shown as missing: %s", column, image_id, error)
                picture = None
            tiles.append(tile(picture) if picture is not None else np.full((TILE, TILE, 3), MISSING_GREY, np.uint8))
        strips.append((image_id, np.concatenate(tiles, axis=1)))
    return columns, strips


def grid_images(dataset: PreparedDataset, ids: list[str], n: int) -> list[tuple[str, np.ndarray]]:
    """The first `n` images with a labelled class (any, if none has one) that decode; the others
    are named in a warning and passed over, so one bad file does not cost the picture."""
    positives = [i for i in ids if dataset.label_vector(i).any()]
    chosen = []
    for image_id in positives or ids:
        if len(chosen) == n:
            break
        try:
            chosen.append((image_id, dataset.read_image(image_id)))
        except DataError as error:
            log.warning("overlay grid: passed over %s", error)
    return chosen


def draw_grid(
    dataset: PreparedDataset,
    artifacts: dict[str, Path],
    until: str,
    images: list[tuple[str, np.ndarray]],
    out: Path,
    device,
    seg_threshold: float = 0.5,
) -> Path:
    """Write the grid PNG of (image id, image) rows for the stages up to `until`; return its path."""
    import matplotlib.pyplot as plt

    figure = grid_figure(dataset, artifacts, until, images, device, seg_threshold)
    create_folder(out.parent)
    tmp = out.with_name(f".{out.name}.tmp.png")
    try:
        figure.savefig(tmp, dpi=GRID_DPI)
        tmp.replace(out)
    except OSError as error:  # e.g. --out names a folder
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write {out}: {error.strerror or error}") from None
    finally:
        plt.close(figure)
    return out


GRID_DPI = 80


def grid_figure(
    dataset: PreparedDataset,
    artifacts: dict[str, Path],
    until: str,
    images: list[tuple[str, np.ndarray]],
    device,
    seg_threshold: float = 0.5,
):
    """The grid as a matplotlib figure (draw_grid saves it); each row labelled by `row_label`."""
    if not images:
        raise DataError("no image to draw: none of the split's images could be read")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [
        c
        for c in COLUMNS_UNTIL[until]
        if STAGE_FOR_COLUMN.get(c, "cam") in artifacts or c == "image" or c == "ground truth"
    ]
    left_out = [c for c in COLUMNS_UNTIL[until] if c not in columns]
    if left_out:
        log.warning("overlay grid: no up-to-date artifact for %s (see `wss status`): left out", ", ".join(left_out))
    reader = Columns(dataset, artifacts, device, seg_threshold)
    figure, axes = plt.subplots(len(images), len(columns), figsize=(2 * len(columns), 2 * len(images)), squeeze=False)
    for row, (image_id, image) in enumerate(images):
        names = [dataset.classes[k] for k in np.nonzero(dataset.label_vector(image_id))[0]]
        for col, column in enumerate(columns):
            axis = axes[row, col]
            try:
                picture = reader.picture(column, image_id, image)
            except WssError as error:  # one bad file (label, mask, CAM) costs its picture, not the grid
                log.warning("overlay grid: %s of %s shown as missing: %s", column, image_id, error)
                picture = None
            axis.imshow(tile(picture) if picture is not None else np.full((TILE, TILE, 3), MISSING_GREY, np.uint8))
            if picture is None:
                axis.text(TILE / 2, TILE / 2, "missing", ha="center", va="center", fontsize=8)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(column, fontsize=9)
            if col == 0:
                axis.set_ylabel(row_label(image_id, names), fontsize=7)
    figure.tight_layout()
    return figure


def grid_captions(dataset: PreparedDataset, images: list[tuple[str, np.ndarray]]) -> list[str]:
    """Each grid row's full image id and class names, for a caption (the picture shortens them)."""
    captions = []
    for image_id, _ in images:
        names = [dataset.classes[k] for k in np.nonzero(dataset.label_vector(image_id))[0]]
        captions.append(f"{image_id}: {', '.join(names) or 'no finding'}")
    return captions
