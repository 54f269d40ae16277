"""The one scorer (stages.common.scoring) gives exactly the metrics of the scorers it replaced:
cam's CAM scores, irn's seed and pseudo-label scores, seg's prediction scores and compare's
threshold sweep, each written out here as it was (a ConfusionMatrix and, on a binary dataset,
BinarySegmentationScores, with the metric prefix added by hand)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from data.layout import PreparedDataset, write_index_png
from stages.cam.infer import cam_to_label, save_cam, strided_size
from stages.cam.scoring import read_scored_cam, score_cams, threshold_sweep
from stages.common.metrics import BinarySegmentationScores, ConfusionMatrix
from stages.common.scoring import read_scored_pair, score_label_files


def old_evaluate_cams(dataset, ids, cam_dir, bg_threshold, failures=None) -> dict:
    matrix = ConfusionMatrix(dataset.info.num_classes + 1)
    binary = BinarySegmentationScores() if dataset.task == "binary" else None
    scored = 0
    for image_id in ids:
        pair = read_scored_cam(dataset, image_id, cam_dir, failures)
        if pair is None:
            continue
        (cam, keys), gt = pair
        pred = cam_to_label(cam, keys, bg_threshold)
        matrix.update(pred, gt)
        if binary is not None:
            binary.update(pred, gt)
        scored += 1
    if not scored:
        return {"cam_scored_images": 0}
    metrics = {f"cam_{k}": float(v) for k, v in matrix.to_dict(["background", *dataset.classes]).items()}
    if binary is not None:
        metrics.update({f"cam_{k}": float(v) for k, v in binary.summary().items()})
    metrics["cam_scored_images"] = scored
    return metrics


def old_evaluate_labels(dataset, ids, label_dir, prefix, ignore_pred, failures=None) -> dict:
    matrix = ConfusionMatrix(dataset.info.num_classes + 1)
    binary = BinarySegmentationScores() if dataset.task == "binary" and not ignore_pred else None
    scored = 0
    for image_id in ids:
        pair = read_scored_pair(dataset, image_id, label_dir / f"{image_id}.png", failures)
        if pair is None:
            continue
        pred, gt = pair
        matrix.update(pred, gt, ignore_pred=ignore_pred)
        if binary is not None:
            binary.update(pred, gt)
        scored += 1
    if not scored:
        return {f"{prefix}scored_images": 0}
    metrics = {f"{prefix}{k}": float(v) for k, v in matrix.to_dict(["background", *dataset.classes]).items()}
    if ignore_pred:
        metrics[f"{prefix}coverage"] = float(matrix.coverage())
    if binary is not None:
        metrics.update({f"{prefix}{k}": float(v) for k, v in binary.summary().items()})
    metrics[f"{prefix}scored_images"] = scored
    return metrics


def old_score_predictions(dataset, ids, pred_dir, prefix, image_scores, failures=None) -> dict:
    classes = ["background", *dataset.classes]
    matrix = ConfusionMatrix(len(classes))
    binary = BinarySegmentationScores() if dataset.task == "binary" else None
    images = 0
    for image_id in ids:
        pair = read_scored_pair(dataset, image_id, pred_dir / f"{image_id}.png", failures)
        if pair is None:
            continue
        matrix.update(*pair)
        if binary is not None:
            binary.update(*pair, image_scores.get(image_id))
        images += 1
    if not images:
        return {f"{prefix}scored_images": 0}
    result = {k: float(v) for k, v in matrix.to_dict(classes, prefix).items()}
    if binary is not None:
        result.update({k: float(v) for k, v in binary.summary(prefix).items()})
    result[f"{prefix}scored_images"] = images
    return result


def old_threshold_sweep(dataset, ids, cam_dir, thresholds) -> dict:
    matrices = {t: ConfusionMatrix(dataset.info.num_classes + 1) for t in thresholds}
    for image_id in ids:
        pair = read_scored_cam(dataset, image_id, cam_dir)
        if pair is None:
            continue
        (full, keys), gt = pair
        for t, matrix in matrices.items():
            matrix.update(cam_to_label(full, keys, t), gt)
    return {t: float(m.miou()) for t, m in matrices.items() if m.counts.sum() > 0}


def assert_same(new: dict, old: dict) -> None:
    """The same keys in the same order, values of the same type, equal (nan equal to nan)."""
    assert list(new) == list(old)
    for key in old:
        same = new[key] == old[key] or (isinstance(old[key], float) and math.isnan(old[key]) and math.isnan(new[key]))
        assert same and type(new[key]) is type(old[key]), (key, new[key], old[key])


@pytest.fixture(params=["multiclass", "binary"])
def dataset(request, synthetic_dataset):
    return PreparedDataset(synthetic_dataset(variant=request.param))


def label_files(dataset, folder, ids, rng, unlabelled: float = 0.0, garble: int = 0) -> None:
    """Random label PNGs for `ids` (a share of 255 pixels), the first `garble` of them cut short."""
    for n, image_id in enumerate(ids):
        height, width = dataset.read_image(image_id).shape[:2]
        label = rng.integers(0, dataset.info.num_classes + 1, (height, width)).astype(np.uint8)
        label[rng.random(label.shape) < unlabelled] = 255
        path = folder / f"{image_id}.png"
        write_index_png(path, label, dataset.info.palette)
        if n < garble:
            path.write_bytes(path.read_bytes()[:30])


def cam_files(dataset, folder, ids, rng) -> None:
    for image_id in ids:
        keys = [int(k) for k in np.nonzero(dataset.label_vector(image_id))[0]]
        height, width = dataset.read_image(image_id).shape[:2]
        cam = rng.random((len(keys), *strided_size(height, width))).astype(np.float32)
        save_cam(folder / f"{image_id}.npz", cam, keys, (height, width))


def test_cams_score_as_before(dataset, tmp_path):
    rng = np.random.default_rng(0)
    ids = dataset.split("train")
    cam_files(dataset, tmp_path, ids[:-2], rng)  # the last two have no CAM: not scored
    (tmp_path / f"{ids[0]}.npz").write_bytes(b"garbled")
    for threshold in (0.3, 0.6):
        new_failures, old_failures = [], []
        assert_same(
            score_cams(dataset, ids, tmp_path, threshold, new_failures),
            old_evaluate_cams(dataset, ids, tmp_path, threshold, old_failures),
        )
        assert new_failures == old_failures and len(new_failures) == 1
    assert_same(score_cams(dataset, ids[-2:], tmp_path, 0.5), old_evaluate_cams(dataset, ids[-2:], tmp_path, 0.5))
    thresholds = (0.05, 0.5, 0.95)
    assert threshold_sweep(dataset, ids, tmp_path, thresholds) == old_threshold_sweep(
        dataset, ids, tmp_path, thresholds
    )
    assert threshold_sweep(dataset, ids[-2:], tmp_path, thresholds) == {}


@pytest.mark.parametrize("prefix, unlabelled", [("seed_", 0.3), ("pseudo_", 0.0)])
def test_seeds_and_pseudo_labels_score_as_before(dataset, tmp_path, prefix, unlabelled):
    rng = np.random.default_rng(1)
    ids = dataset.split("train")
    label_files(dataset, tmp_path, ids[:-1], rng, unlabelled, garble=1)
    seeds = prefix == "seed_"
    new_failures, old_failures = [], []
    new = score_label_files(dataset, ids, tmp_path, prefix, ignore_unlabelled=seeds, failures=new_failures)
    assert_same(new, old_evaluate_labels(dataset, ids, tmp_path, prefix, seeds, old_failures))
    assert new_failures == old_failures and len(new_failures) == 1
    assert (f"{prefix}coverage" in new) == seeds and (f"{prefix}kaggle_dice" in new) == (
        dataset.task == "binary" and not seeds
    )
    assert_same(
        score_label_files(dataset, [], tmp_path, prefix, ignore_unlabelled=seeds),
        old_evaluate_labels(dataset, [], tmp_path, prefix, seeds),
    )


@pytest.mark.parametrize("with_scores", [True, False])
def test_predictions_score_as_before(dataset, tmp_path, with_scores):
    rng = np.random.default_rng(2)
    ids = dataset.split("val")
    label_files(dataset, tmp_path, ids, rng)
    scores = {i: float(rng.random()) for i in ids} if with_scores else {}
    new = score_label_files(dataset, ids, tmp_path, "seg_val_", image_scores=scores)
    assert_same(new, old_score_predictions(dataset, ids, tmp_path, "seg_val_", scores))
    assert ("seg_val_image_auc" in new) == (with_scores and dataset.task == "binary")
