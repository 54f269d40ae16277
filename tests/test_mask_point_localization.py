"""Point localization on masks (PYLON's point accuracy with masks in place of boxes): the peak
of each labelled class' CAM inside that class' mask, reported by the cam stage and `wss compare`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from stages.cam.infer import save_cam, strided_size
from stages.cam.scoring import score_cams
from stages.common.localization import IGNORE, MaskPointAccuracy, peak_in_mask
from tests.helpers import DEMO_CONFIG, FAST_CAM, REPO, overrides


def peak_at(shape, y, x, value=1.0) -> np.ndarray:
    cam = np.full(shape, 0.1, np.float32)
    cam[y, x] = value
    return cam


def test_a_peak_inside_outside_or_on_an_ignore_pixel():
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 2:5] = 1
    mask[4, 4] = IGNORE  # a boundary pixel of the object
    assert peak_in_mask(peak_at((8, 8), 3, 3), mask, 1) is True
    assert peak_in_mask(peak_at((8, 8), 6, 6), mask, 1) is False
    assert peak_in_mask(peak_at((8, 8), 4, 4), mask, 1) is False  # ignore is not inside
    assert peak_in_mask(peak_at((8, 8), 3, 3), mask, 2) is None  # no pixel of class 2: no pair
    ties = np.zeros((8, 8), np.float32)  # a flat map points at its first cell
    assert peak_in_mask(ties, mask, 1) is False
    with pytest.raises(ValueError, match="cannot be scored"):
        peak_in_mask(np.zeros((4, 4)), mask, 1)


def test_multiclass_accuracy_is_the_mean_over_classes_of_their_hits():
    """Image 1: cat hit, dog miss. Image 2: cat miss, dog hit; a car labelled but with no mask
    pixel is skipped. cat 1/2, dog 1/2 -> 0.5; image 3: dog hit -> dog 2/3."""
    scores = MaskPointAccuracy(["cat", "dog", "car"])
    mask = np.zeros((6, 6), np.uint8)
    mask[0:2, 0:2] = 1  # cat
    mask[4:6, 4:6] = 2  # dog
    cat_corner, dog_corner = peak_at((6, 6), 0, 0), peak_at((6, 6), 5, 5)
    scores.update(np.stack([cat_corner, cat_corner]), [0, 1], mask)
    scores.update(np.stack([dog_corner, dog_corner, dog_corner]), [0, 1, 2], mask)
    metrics = scores.metrics("cam_")
    assert metrics == {
        "cam_mask_point/cat": 0.5,
        "cam_mask_point/dog": 0.5,
        "cam_mask_point_accuracy": 0.5,
        "cam_mask_point_pairs": 4.0,
    }
    scores.update(dog_corner[None], [1], mask)
    assert scores.metrics("cam_")["cam_mask_point/dog"] == pytest.approx(2 / 3)
    assert scores.metrics("cam_")["cam_mask_point_accuracy"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert MaskPointAccuracy(["cat"]).metrics("cam_") == {}  # nothing scored: no number


class MaskDataset:
    """What score_cams reads of a prepared dataset: classes, task, and masks by id."""

    def __init__(self, classes, task, masks):
        self.classes, self.task, self.masks = classes, task, masks

    def has_mask(self, image_id):
        return image_id in self.masks

    def read_mask(self, image_id, shape=None):
        return self.masks[image_id]


def write_peak_cam(cam_dir, image_id, cell, keys, size=(16, 16)):
    """A stride-4 CAM file whose only peak is one cell: upsampled to the image, its maximum is
    inside that cell's 4 x 4 pixel block."""
    cam = np.full((len(keys), size[0] // 4, size[1] // 4), 0.1, np.float32)
    cam[:, cell[0], cell[1]] = 1.0
    save_cam(cam_dir / f"{image_id}.npz", cam, keys, size)


def test_binary_cam_files_scored_against_the_positive_class(tmp_path):
    """SIIM-like: one class; the positive images' CAMs are scored (hit, miss, on ignore), a
    negative image (no key, an empty mask) is not a pair."""
    masks = {name: np.zeros((16, 16), np.uint8) for name in ("hit", "miss", "ignored", "negative")}
    for name in ("hit", "miss", "ignored"):
        masks[name][4:12, 4:12] = 1
    masks["ignored"][4:8, 4:8] = IGNORE
    dataset = MaskDataset(["pneumothorax"], "binary", masks)
    write_peak_cam(tmp_path, "hit", (2, 2), [0])
    write_peak_cam(tmp_path, "miss", (0, 3), [0])
    write_peak_cam(tmp_path, "ignored", (1, 1), [0])
    write_peak_cam(tmp_path, "negative", (1, 1), [])
    metrics = score_cams(dataset, list(masks), tmp_path, 0.15, points=True)
    assert metrics["cam_mask_point/pneumothorax"] == pytest.approx(1 / 3)
    assert metrics["cam_mask_point_accuracy"] == pytest.approx(1 / 3)
    assert metrics["cam_mask_point_pairs"] == 3
    plain = score_cams(dataset, list(masks), tmp_path, 0.15)  # the CAM mIoU scores alone, as the sweep reads them
    assert plain == {k: v for k, v in metrics.items() if "mask_point" not in k}


def test_multiclass_cam_files(tmp_path):
    mask = np.zeros((16, 16), np.uint8)
    mask[0:8, 0:8] = 1  # class a, top left
    mask[8:16, 8:16] = 2  # class b, bottom right
    dataset = MaskDataset(["a", "b"], "multiclass", {"one": mask, "two": mask})
    write_peak_cam(tmp_path, "one", (0, 0), [0, 1])  # a hit, b miss (both maps peak top left)
    cam = np.full((2, 4, 4), 0.1, np.float32)
    cam[0, 3, 3], cam[1, 3, 3] = 1.0, 1.0  # a miss, b hit
    save_cam(tmp_path / "two.npz", cam, [0, 1], (16, 16))
    metrics = score_cams(dataset, ["one", "two"], tmp_path, 0.15, points=True)
    assert metrics["cam_mask_point/a"] == 0.5 and metrics["cam_mask_point/b"] == 0.5
    assert metrics["cam_mask_point_accuracy"] == 0.5 and metrics["cam_mask_point_pairs"] == 4


def pairs_with_mask_pixels(root, ids) -> int:
    from data.layout import PreparedDataset

    dataset = PreparedDataset(root)
    return sum(int((dataset.read_mask(i) == k + 1).any()) for i in ids for k in np.nonzero(dataset.label_vector(i))[0])


def test_the_cam_stage_and_compare_report_it(cli, tiny_synthetic, tmp_path):
    """The cam stage's metrics (metrics.json and the manifest) carry the mask point accuracy over
    every (train image, labelled class) pair with mask pixels; `wss compare` reports it as point_acc."""
    from data.layout import PreparedDataset

    workdir = tmp_path / "runs"
    fast = {**FAST_CAM, "cam.epochs": "1", "data.root": tiny_synthetic, "run.workdir": workdir}
    result = cli("compare", "-c", DEMO_CONFIG, *overrides(fast), "--methods", "gap", "--out", tmp_path / "cmp")
    assert result.exit_code == 0, result.output
    (artifact,) = workdir.glob("*/cam-*")
    metrics = json.loads((artifact / "metrics.json").read_text())
    assert json.loads((artifact / "manifest.json").read_text())["metrics"] == metrics
    dataset = PreparedDataset(tiny_synthetic)
    train = dataset.split("train")
    assert metrics["cam_mask_point_pairs"] == pairs_with_mask_pixels(tiny_synthetic, train)
    assert 0.0 <= metrics["cam_mask_point_accuracy"] <= 1.0
    per_class = [metrics[f"cam_mask_point/{name}"] for name in dataset.classes]
    assert metrics["cam_mask_point_accuracy"] == pytest.approx(np.mean(per_class))
    (row,) = csv.DictReader(open(tmp_path / "cmp" / "compare.csv"))
    assert float(row["point_acc"]) == pytest.approx(metrics["cam_mask_point_accuracy"])
    assert "inside the class' mask" in (tmp_path / "cmp" / "compare.md").read_text()


# ------------------------------------------------------------------------------ real masks
SAMPLES = REPO.parent / "shared" / "samples"


def full_block(mask: np.ndarray, label: int) -> tuple[int, int] | None:
    """A stride-4 cell whose 4 x 4 pixel block is all `label` in `mask` (the middle one), or None."""
    rows, cols = mask.shape[0] // 4, mask.shape[1] // 4
    blocks = mask[: rows * 4, : cols * 4].reshape(rows, 4, cols, 4)
    found = np.argwhere((blocks == label).all(axis=(1, 3)))
    return tuple(found[len(found) // 2]) if len(found) else None


def peaks_on_real_masks(dataset, cam_dir: Path) -> dict[str, float]:
    """CAM files for every image with a mask whose peaks are put, pair by pair in turn, on a block
    of the class (a hit) or of the background (a miss); the accuracy each class must get."""
    hits: dict[str, list[bool]] = {}
    cam_dir.mkdir(parents=True, exist_ok=True)
    turn = 0
    for image_id in sorted(dataset.labels):
        mask = dataset.read_mask(image_id)
        if mask is None:
            continue
        keys = [int(k) for k in np.nonzero(dataset.label_vector(image_id))[0]]
        cam = np.full((len(keys), *strided_size(*mask.shape)), 0.1, np.float32)
        for n, key in enumerate(keys):
            if not (mask == key + 1).any():
                continue  # labelled, but no pixel to point at: not a pair
            inside = full_block(mask, key + 1)
            hit = inside is not None and turn % 2 == 0
            turn += 1
            cam[(n, *(inside if hit else full_block(mask, 0)))] = 1.0
            hits.setdefault(dataset.classes[key], []).append(hit)
        save_cam(cam_dir / f"{image_id}.npz", cam, keys, mask.shape)
    return {name: float(np.mean(found)) for name, found in hits.items()}


def assert_scores(dataset, cam_dir, expected):
    metrics = score_cams(dataset, sorted(dataset.labels), cam_dir, 0.15, points=True)
    assert {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("cam_mask_point/")} == expected
    assert metrics["cam_mask_point_accuracy"] == pytest.approx(np.mean(list(expected.values())))


def test_voc_masks_with_their_ignore_borders(tmp_path):
    from data.layout import PreparedDataset
    from data.voc import prepare_voc

    if not (SAMPLES / "voc" / "VOCdevkit" / "VOC2012" / "JPEGImages").is_dir():
        pytest.skip(f"VOC samples not found: {SAMPLES / 'voc'}")
    prepare_voc(SAMPLES / "voc", tmp_path / "voc", progress=False)
    dataset = PreparedDataset(tmp_path / "voc")
    expected = peaks_on_real_masks(dataset, tmp_path / "cams")
    assert expected and any(value > 0 for value in expected.values())
    assert_scores(dataset, tmp_path / "cams", expected)


def test_siim_masks_score_the_positive_class(tmp_path):
    from data.layout import PreparedDataset
    from data.siim import prepare_siim

    if not (SAMPLES / "siim" / "dicom").is_dir():
        pytest.skip(f"SIIM samples not found: {SAMPLES / 'siim'}")
    prepare_siim(
        SAMPLES / "siim" / "dicom", SAMPLES / "siim" / "train-rle-sample.csv", tmp_path / "siim", progress=False
    )
    dataset = PreparedDataset(tmp_path / "siim")
    expected = peaks_on_real_masks(dataset, tmp_path / "cams")
    assert list(expected) == ["pneumothorax"] and 0 < expected["pneumothorax"] < 1
    assert_scores(dataset, tmp_path / "cams", expected)
