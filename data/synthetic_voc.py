"""A synthetic dataset in the PASCAL VOC 2012 release format, at any size and image count.

It writes what `wss prepare voc` reads, so that a benchmark (bench/pipeline_scale.py) or a test
can run the VOC path end to end at VOC's image size without the download:

    <out>/VOCdevkit/VOC2012/JPEGImages/<id>.jpg
                            SegmentationClass/<id>.png   palette PNG: 0 background, 1-20 the
                                                         classes, 255 a band along every outline
                            Annotations/<id>.xml         one <object> per visible object
                            ImageSets/Segmentation/{train,val,train_aug}.txt

The splits keep VOC 2012 + SBD's proportions: val is 1,449 of every 12,031 images, train_aug the
other 10,582, and train (1,464 of them in VOC) the first part of train_aug.

Each image is a smooth, textured background with 1 to 4 objects; an object's class is a (shape,
colour) pair (four shapes, five colours: 20 classes), so a classifier can learn the classes and
a CAM has something to find. Objects drawn later hide those below; an object hidden entirely (or
but for a sliver inside the 255 band) is neither in the mask nor in the XML. Deterministic:
image i depends only on (seed, i), whatever the number of workers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image

from data.layout import IGNORE_INDEX, default_palette
from data.parallel import parallel_map
from data.voc import CLASSES

VOC_TRAIN_AUG, VOC_VAL, VOC_TRAIN = 10_582, 1_449, 1_464
SHAPES = ("ellipse", "rectangle", "triangle", "diamond")
COLOURS = np.array([[200, 40, 40], [40, 170, 60], [50, 70, 210], [220, 190, 40], [170, 60, 190]], np.float32)


@dataclass(frozen=True)
class VocSpec:
    n: int = 64
    size: int = 512
    seed: int = 0
    border: int | None = None  # half-width of the 255 band along outlines; None: size // 170, at least 1
    quality: int = 90  # JPEG quality

    @property
    def band(self) -> int:
        return self.border if self.border is not None else max(1, self.size // 170)


def image_id(index: int) -> str:
    return f"2026_{index:06d}"


def split_ids(spec: VocSpec) -> dict[str, list[str]]:
    """train_aug, val and train (a part of train_aug) in VOC 2012 + SBD's proportions; none empty
    when n >= 3."""
    ids = [image_id(i) for i in range(spec.n)]
    n_val = min(spec.n - 1, max(1, round(spec.n * VOC_VAL / (VOC_VAL + VOC_TRAIN_AUG))))
    order = np.random.default_rng([spec.seed, 10**9]).permutation(spec.n)
    val = sorted(ids[i] for i in order[:n_val])
    train_aug = sorted(ids[i] for i in order[n_val:])
    n_train = max(1, round(len(train_aug) * VOC_TRAIN / VOC_TRAIN_AUG))
    return {"train_aug": train_aug, "val": val, "train": train_aug[:n_train]}


def _shape_mask(kind: str, size: int, box: tuple[float, float, float, float], angle: float) -> np.ndarray:
    """A filled shape inside box (top, left, height, width), turned by `angle` about its centre."""
    top, left, height, width = box
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = top + height / 2, left + width / 2
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / (width / 2)
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / (height / 2)
    if kind == "ellipse":
        return u * u + v * v <= 1
    if kind == "rectangle":
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if kind == "triangle":
        return (v <= 0.9) & (v >= 1.8 * np.abs(u) - 0.9)
    return np.abs(u) + np.abs(v) <= 1  # diamond


def _outline_band(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within `radius` of a change of class (VOC's void band along object outlines)."""
    padded = np.pad(mask, radius, mode="edge")
    high, low = padded.copy(), padded.copy()
    for axis in (0, 1):  # separable max and min filters over a (2r + 1) square
        shifted_high, shifted_low = high.copy(), low.copy()
        for step in range(1, radius + 1):
            for shift in (step, -step):
                np.maximum(shifted_high, np.roll(high, shift, axis=axis), out=shifted_high)
                np.minimum(shifted_low, np.roll(low, shift, axis=axis), out=shifted_low)
        high, low = shifted_high, shifted_low
    inner = slice(radius, radius + mask.shape[0]), slice(radius, radius + mask.shape[1])
    return high[inner] != low[inner]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth colour noise: a coarse random grid upsampled, plus a little pixel noise (float HxWx3)."""
    coarse = rng.uniform(60, 190, (6, 6, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32)
    return smooth + rng.normal(0, 6, (size, size, 3)).astype(np.float32)


def generate_voc_image(spec: VocSpec, index: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(RGB uint8 HxWx3, class-index mask uint8 HxW with 255 bands, visible objects as
    {"name", "bbox": (xmin, ymin, xmax, ymax)} 1-based as in VOC's XML)."""
    rng = np.random.default_rng([spec.seed, index])
    size = spec.size
    image = _background(rng, size)
    objects = np.zeros((size, size), np.int32)  # object number + 1 at each pixel, 0 background
    classes = []
    for number in range(int(rng.integers(1, 5))):
        cls = int(rng.integers(0, len(CLASSES)))
        height, width = rng.uniform(0.2, 0.5, 2) * size
        top, left = rng.uniform(0, size - height), rng.uniform(0, size - width)
        shape = _shape_mask(SHAPES[cls % len(SHAPES)], size, (top, left, height, width), rng.uniform(0, np.pi))
        colour = COLOURS[cls // len(SHAPES)] + rng.normal(0, 12, 3)
        shade = 1 + 0.15 * np.sin(np.mgrid[0:size, 0:size][1] / size * rng.uniform(6, 14))[..., None]
        image[shape] = (colour * shade)[shape] + rng.normal(0, 8, (int(shape.sum()), 3))
        objects[shape] = number + 1
        classes.append(cls)
    mask = np.zeros((size, size), np.uint8)
    for number, cls in enumerate(classes):
        mask[objects == number + 1] = cls + 1
    band = _outline_band(mask, spec.band)
    mask[band] = IGNORE_INDEX
    visible = []
    for number, cls in enumerate(classes):
        ys, xs = np.nonzero((objects == number + 1) & ~band)  # a sliver inside the band is not seen
        if len(ys):
            visible.append(
                {
                    "name": CLASSES[cls],
                    "bbox": (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1),
                }
            )
    return np.clip(image, 0, 255).astype(np.uint8), mask, visible


def annotation_xml(name: str, size: int, objects: list[dict]) -> str:
    parts = [
        f"<annotation><folder>VOC2012</folder><filename>{escape(name)}.jpg</filename>",
        f"<size><width>{size}</width><height>{size}</height><depth>3</depth></size><segmented>1</segmented>",
    ]
    for obj in objects:
        xmin, ymin, xmax, ymax = obj["bbox"]
        parts.append(
            f"<object><name>{obj['name']}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>0</difficult><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
            f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>\n"


def _write_one(index: int, spec: VocSpec, voc: str) -> str:
    image, mask, objects = generate_voc_image(spec, index)
    name, root = image_id(index), Path(voc)
    Image.fromarray(image).save(root / "JPEGImages" / f"{name}.jpg", quality=spec.quality)
    picture = Image.fromarray(mask, mode="P")
    picture.putpalette([v for colour in default_palette(256) for v in colour])
    picture.save(root / "SegmentationClass" / f"{name}.png")
    (root / "Annotations" / f"{name}.xml").write_text(annotation_xml(name, spec.size, objects))
    return name


def write_voc_release(out: str | Path, spec: VocSpec, workers: int = 1, progress: bool = False) -> Path:
    """Write the VOC 2012 release tree under `out` (`out/VOCdevkit/VOC2012`, returned)."""
    voc = Path(out) / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    job = functools.partial(_write_one, spec=spec, voc=str(voc))
    for _ in parallel_map(job, list(range(spec.n)), workers, progress, "voc images"):
        pass
    for name, ids in split_ids(spec).items():
        (voc / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    return voc
