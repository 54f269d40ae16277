"""A synthetic weak-supervision benchmark that runs on a CPU.

Each object is a large smooth body whose class is shown only by a small mark inside it; the
same bodies also appear unmarked as distractors, on a textured, X-ray-like background. A
classifier can only tell the classes by the marks, so its CAMs cover the mark and miss most of
the body: a refinement stage that learns where bodies end has real work to do. The ground
truth is the whole body of every marked object.

Deterministic: image i depends only on (seed, i), whatever the number of workers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from data.layout import DatasetInfo, DatasetWriter, atomic_save, default_palette, write_index_png
from data.parallel import parallel_map

MULTICLASS_CLASSES = ["ring", "cross", "square"]
BINARY_CLASSES = ["finding"]


@dataclass(frozen=True)
class SyntheticSpec:
    n: int = 400
    size: int = 128
    seed: int = 0
    variant: str = "multiclass"  # multiclass | binary
    val_fraction: float = 0.2
    positive_fraction: float = 0.5  # binary variant: images with a finding
    # Size of the class marks (1.0: a 9 px ring, cross or square). At 1.0 a ResNet-18 trained
    # from scratch on 320 images for 14 CPU epochs localises only ~half of them; at 1.5 it finds
    # ~90% (measured on a development set, seed 1), which gives stage 2 CAMs worth refining.
    mark_scale: float = 1.5
    rib_contrast: float = 0.03  # amplitude of the rib-like background bands

    @property
    def classes(self) -> list[str]:
        return BINARY_CLASSES if self.variant == "binary" else MULTICLASS_CLASSES


def xray_background(rng: np.random.Generator, size: int, rib_contrast: float = 0.03) -> np.ndarray:
    """Smooth multi-scale noise, a vertical exposure gradient and faint rib-like bands."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    coarse = ndimage.gaussian_filter(rng.standard_normal((size, size)), size / 10)
    fine = ndimage.gaussian_filter(rng.standard_normal((size, size)), 1.0)
    coarse /= coarse.std() + 1e-8
    fine /= fine.std() + 1e-8
    phase = rng.uniform(0, 2 * np.pi)
    ribs = np.sin(2 * np.pi * (yy * rng.uniform(5, 8) + 0.15 * np.sin(2 * np.pi * xx)) + phase)
    image = 0.35 + 0.12 * yy + 0.05 * coarse + 0.025 * fine + rib_contrast * ribs
    return image


def body_mask(rng: np.random.Generator, size: int, center: tuple[float, float], radius: float) -> np.ndarray:
    """A blob: an ellipse whose radius wobbles smoothly with the angle."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    angle = rng.uniform(0, np.pi)
    elong = rng.uniform(0.75, 1.0)
    dy, dx = yy - center[0], xx - center[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / elong
    theta = np.arctan2(v, u)
    wobble = sum(rng.uniform(-0.08, 0.08) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    return np.hypot(u, v) <= radius * (1 + wobble)


def mark_mask(kind: str, size: int, center: tuple[float, float], scale: float) -> np.ndarray:
    """The class evidence: a small ring, cross or square (a dot for the binary finding)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dy, dx = yy - center[0], xx - center[1]
    r = np.hypot(dy, dx)
    if kind == "ring":
        return (r <= 4.0 * scale) & (r >= 2.2 * scale)
    if kind == "cross":
        arm, half = 4.5 * scale, 1.1 * scale
        return ((np.abs(dy) <= half) & (np.abs(dx) <= arm)) | ((np.abs(dx) <= half) & (np.abs(dy) <= arm))
    if kind == "square":
        return (np.abs(dy) <= 3.0 * scale) & (np.abs(dx) <= 3.0 * scale)
    if kind == "finding":
        return r <= 3.2 * scale
    raise ValueError(f"unknown mark {kind!r}")


def place_centers(rng: np.random.Generator, count: int, size: int, radius: float) -> list[tuple[float, float]]:
    """Centres far enough apart that bodies rarely touch, inside the image."""
    centers: list[tuple[float, float]] = []
    margin = radius * 0.9
    for _ in range(200 * count):
        if len(centers) == count:
            break
        c = (rng.uniform(margin, size - margin), rng.uniform(margin, size - margin))
        if all(np.hypot(c[0] - o[0], c[1] - o[1]) > 2.05 * radius for o in centers):
            centers.append(c)
    return centers


def generate_image(spec: SyntheticSpec, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One (image uint8 HxW, mask uint8 HxW of class indices, multi-hot label) triple."""
    scene = generate_scene(spec, index)
    return scene["image"], scene["mask"], scene["label"]


def generate_scene(spec: SyntheticSpec, index: int) -> dict[str, np.ndarray]:
    """The image, its ground truth, and what tests and benchmarks may want to know besides:
    `bodies` (every body, distractors included, numbered from 1) and `marks` (bool)."""
    rng = np.random.default_rng([spec.seed, index])
    size = spec.size
    scale = size / 128
    image = xray_background(rng, size, spec.rib_contrast)
    mask = np.zeros((size, size), np.uint8)
    label = np.zeros(len(spec.classes), np.float32)

    if spec.variant == "binary":
        positive = rng.random() < spec.positive_fraction
        marked = [0] if positive else []
        n_distractors = int(rng.integers(1, 3))
    else:
        marked = list(rng.integers(0, len(spec.classes), size=int(rng.integers(1, 3))))
        n_distractors = int(rng.integers(0, 2))
    radius = rng.uniform(20, 26) * scale
    centers = place_centers(rng, len(marked) + n_distractors, size, radius)
    marked = marked[: len(centers)]

    bodies = np.zeros((size, size), np.uint8)
    marks = np.zeros((size, size), bool)
    texture = ndimage.gaussian_filter(rng.standard_normal((size, size)), 1.5)
    texture /= texture.std() + 1e-8
    for i, center in enumerate(centers):
        body = body_mask(rng, size, center, radius * rng.uniform(0.85, 1.15))
        soft = ndimage.gaussian_filter(body.astype(np.float64), 1.0)
        image += soft * (rng.uniform(0.14, 0.2) + 0.03 * texture)
        bodies[body] = i + 1
        if i < len(marked):
            cls = int(marked[i])
            mask[body] = cls + 1
            label[cls] = 1
            inner = ndimage.binary_erosion(body, iterations=int(8 * scale * spec.mark_scale))
            ys, xs = np.nonzero(inner)
            pick = rng.integers(len(ys)) if len(ys) else None
            spot = (ys[pick], xs[pick]) if pick is not None else center
            shape = mark_mask(spec.classes[cls], size, spot, scale * spec.mark_scale)
            image += 0.28 * ndimage.gaussian_filter(shape.astype(np.float64), 0.6)
            marks |= shape
    image += 0.015 * rng.standard_normal((size, size))
    return {
        "image": (np.clip(image, 0, 1) * 255).astype(np.uint8),
        "mask": mask,
        "label": label,
        "bodies": bodies,
        "marks": marks,
    }


def synthetic_info(spec: SyntheticSpec) -> DatasetInfo:
    return DatasetInfo(
        name=f"synthetic-{spec.variant}" if spec.variant != "multiclass" else "synthetic",
        task="binary" if spec.variant == "binary" else "multiclass",
        classes=list(spec.classes),
        palette=default_palette(len(spec.classes) + 1),
    )


def _write_one(index: int, spec: SyntheticSpec, out: str) -> tuple[str, np.ndarray]:
    """Image and mask of image `index` (in a worker process too); returns (id, label)."""
    info, image_id = synthetic_info(spec), f"syn{index:05d}"
    image, mask, label = generate_image(spec, index)
    atomic_save(Image.fromarray(image), Path(out) / "images" / f"{image_id}{info.image_ext}")
    write_index_png(Path(out) / "masks" / f"{image_id}.png", mask, info.palette)
    return image_id, label


def train_size(spec: SyntheticSpec) -> int:
    """Images in the train split: the val split takes val_fraction of them, neither split empty."""
    return spec.n - min(spec.n - 1, max(1, int(round(spec.n * spec.val_fraction))))


def tune_split(train: list[str], count: int, seed: int) -> list[str]:
    """`count` train images drawn with `seed` (for `data.tune_split`, on whose masks `wss tune`
    chooses the settings downstream of the networks). They stay in the train split, whose image
    labels the networks train on; every stage leaves them out of its scores. Drawn from a stream
    of their own, so the train and val splits are the same with or without them."""
    if count > len(train):
        raise ValueError(f"a tuning split of {count} images from a train split of {len(train)}")
    if count <= 0:
        return []
    drawn = np.random.default_rng([seed, 10**9 + 1]).choice(len(train), size=count, replace=False)
    return sorted(train[i] for i in drawn)


def write_synthetic(out: str | Path, spec: SyntheticSpec, progress=None, workers: int = 1, tune: int = 0) -> Path:
    """Write the prepared layout (images, eval masks, labels, train/val splits). `workers`
    processes generate the images (the same ones whatever their number). `tune` > 0 also writes
    a tuning split (splits/tune.txt, see tune_split)."""
    writer = DatasetWriter(out, synthetic_info(spec))
    ids = [f"syn{i:05d}" for i in range(spec.n)]
    job = functools.partial(_write_one, spec=spec, out=str(out))
    if workers > 1:
        labels = dict(parallel_map(job, list(range(spec.n)), workers, progress is not None, "synthetic"))
    else:
        labels = dict(job(i) for i, _ in enumerate(progress(ids) if progress else ids))
    n_val = spec.n - train_size(spec)
    order = np.random.default_rng([spec.seed, 10**9]).permutation(spec.n)
    val = sorted(ids[i] for i in order[:n_val])
    train = sorted(ids[i] for i in order[n_val:])
    writer.write_labels(labels)
    writer.write_split("train", train)
    writer.write_split("val", val)
    writer.write_split("tune", tune_split(train, tune, spec.seed))
    writer.write_info()
    return Path(out)
