"""Metric known answers (computed by hand in the comments) and agreement with smp.metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from data.errors import DataError
from stages.common.metrics import (
    BinarySegmentationScores,
    ConfusionMatrix,
    average_precision,
    classification_scores,
    dice,
    iou_binary,
    roc_auc,
)
from stages.common.tables import format_table, markdown_table

# A 3-class pair used by several tests.
# target            pred
# 0 0 1 1           0 1 1 1
# 0 0 1 1           0 0 1 2
# 2 2 2 2           2 2 2 2
# class 0: TP 3 (the three 0->0), FP 0, FN 1 (target 0 predicted 1)      IoU 3/4 = 0.75
# class 1: TP 3, FP 1 (that target-0 pixel), FN 1 (target 1 predicted 2) IoU 3/5 = 0.6
# class 2: TP 4, FP 1 (that target-1 pixel), FN 0                        IoU 4/5 = 0.8
# mIoU = (0.75 + 0.6 + 0.8) / 3 = 0.71666..., pixel accuracy = 10 / 12
TARGET = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2]], dtype=np.uint8)
PRED = np.array([[0, 1, 1, 1], [0, 0, 1, 2], [2, 2, 2, 2]], dtype=np.uint8)


def scored(pred, target, num_classes=3, **kwargs) -> ConfusionMatrix:
    matrix = ConfusionMatrix(num_classes)
    matrix.update(pred, target, **kwargs)
    return matrix


def reference_iou(preds, targets, num_classes, ignore_index=255):
    """Slow per-class IoU from boolean masks, the textbook definition."""
    preds, targets = np.concatenate([p.ravel() for p in preds]), np.concatenate([t.ravel() for t in targets])
    keep = targets != ignore_index
    preds, targets = preds[keep], targets[keep]
    result = []
    for c in range(num_classes):
        intersection = np.sum((preds == c) & (targets == c))
        union = np.sum((preds == c) | (targets == c))
        result.append(intersection / union if union else np.nan)
    return np.array(result)


# ----------------------------------------------------------------- confusion matrix, known answers


def test_hand_made_multiclass_pair():
    matrix = scored(PRED, TARGET)
    np.testing.assert_allclose(matrix.iou(), [0.75, 0.6, 0.8])
    assert matrix.miou() == pytest.approx(2.15 / 3)
    assert matrix.pixel_accuracy() == pytest.approx(10 / 12)
    np.testing.assert_array_equal(matrix.matrix, [[3, 1, 0], [0, 3, 1], [0, 0, 4]])


def test_mask_against_itself_scores_one():
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 5, size=(40, 30)).astype(np.uint8)
    mask[:5] = 255
    matrix = scored(mask, mask, num_classes=5)
    np.testing.assert_allclose(matrix.iou(), 1.0)
    assert matrix.miou() == 1.0
    assert matrix.pixel_accuracy() == 1.0


def test_shifted_copy():
    # 4x8 mask, columns 0-3 class 0 and 4-7 class 1; the prediction is shifted right by one
    # column (columns 0-4 class 0, 5-7 class 1).
    # class 0: TP 16, pred 20, target 16 -> union 20 -> IoU 0.8
    # class 1: TP 12, pred 12, target 16 -> union 16 -> IoU 0.75
    # mIoU 0.775, pixel accuracy 28 / 32
    target = np.zeros((4, 8), np.uint8)
    target[:, 4:] = 1
    pred = np.zeros_like(target)
    pred[:, 5:] = 1
    matrix = scored(pred, target, num_classes=2)
    np.testing.assert_allclose(matrix.iou(), [0.8, 0.75])
    assert matrix.miou() == pytest.approx(0.775)
    assert matrix.pixel_accuracy() == pytest.approx(28 / 32)


def test_ignored_target_pixels_are_left_out():
    # Ignoring target (0, 1) removes the one target-0-predicted-1 pixel:
    # class 0: TP 3, FP 0, FN 0 -> 1.0; class 1: TP 3, FP 0, FN 1 -> 0.75; class 2 unchanged 0.8
    target = TARGET.copy()
    target[0, 1] = 255
    matrix = scored(PRED, target)
    np.testing.assert_allclose(matrix.iou(), [1.0, 0.75, 0.8])
    assert matrix.pixel_accuracy() == pytest.approx(10 / 11)
    assert matrix.coverage() == 1.0


def test_unlabelled_predictions_count_as_misses_or_are_ignored():
    # pred (1, 3) becomes 255 where the target is 1 (it was a wrong 2).
    pred = PRED.copy()
    pred[1, 3] = 255
    # Default: a miss of class 1 only. class 1: TP 3, FP 1, FN 1 -> 0.6; class 2: TP 4, FP 0 -> 1.0
    missed = scored(pred, TARGET)
    np.testing.assert_allclose(missed.iou(), [0.75, 0.6, 1.0])
    assert missed.pixel_accuracy() == pytest.approx(10 / 12)
    # ignore_pred: the pixel is left out. class 1: TP 3, FP 1, FN 0 -> 0.75
    seeds = scored(pred, TARGET, ignore_pred=True)
    np.testing.assert_allclose(seeds.iou(), [0.75, 0.75, 1.0])
    assert seeds.pixel_accuracy() == pytest.approx(10 / 11)
    assert seeds.coverage() == pytest.approx(11 / 12)


def test_absent_class_is_nan_and_left_out_of_the_mean():
    target = np.array([[0, 0], [1, 1]])
    matrix = scored(target, target, num_classes=4)
    assert np.isnan(matrix.iou()[2:]).all()
    assert matrix.miou() == 1.0
    assert math.isnan(ConfusionMatrix(3).miou())


def test_bincount_matches_slow_reference_and_merge_matches_single_pass():
    rng = np.random.default_rng(1)
    preds = [rng.integers(0, 6, size=(17, 23)) for _ in range(6)]
    targets = [np.where(rng.random((17, 23)) < 0.1, 255, rng.integers(0, 6, size=(17, 23))) for _ in range(6)]
    single = ConfusionMatrix(6)
    for p, t in zip(preds, targets):
        single.update(p, t)
    np.testing.assert_allclose(single.iou(), reference_iou(preds, targets, 6))
    first, second = ConfusionMatrix(6), ConfusionMatrix(6)
    for p, t in zip(preds[:2], targets[:2]):
        first.update(p, t)
    second.update(np.stack(preds[2:]), np.stack(targets[2:]))  # a batch counts like its images
    first.merge(second)
    np.testing.assert_array_equal(first.counts, single.counts)
    assert first.total_pixels == single.total_pixels


def test_bad_values_are_reported():
    with pytest.raises(DataError, match="7"):
        scored(PRED, np.full_like(TARGET, 7))
    with pytest.raises(ValueError, match="outside classes"):
        scored(np.full_like(PRED, 3), TARGET)
    with pytest.raises(ValueError, match="differ"):
        scored(PRED[:2], TARGET)
    with pytest.raises(ValueError, match="merge"):
        ConfusionMatrix(3).merge(ConfusionMatrix(4))


def test_to_dict_names_every_class():
    metrics = scored(PRED, TARGET).to_dict(["background", "cat", "dog"], prefix="cam_")
    assert metrics["cam_miou"] == pytest.approx(2.15 / 3)
    assert metrics["cam_iou/dog"] == pytest.approx(0.8)
    assert set(metrics) == {"cam_miou", "cam_pixel_accuracy", "cam_iou/background", "cam_iou/cat", "cam_iou/dog"}
    with pytest.raises(ValueError, match="3 class names"):
        scored(PRED, TARGET).to_dict(["a", "b"])


def test_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    matrix = scored(torch.from_numpy(PRED), torch.from_numpy(TARGET))
    np.testing.assert_allclose(matrix.iou(), [0.75, 0.6, 0.8])


# ----------------------------------------------------------------- binary masks, known answers


def test_dice_and_iou_of_one_image():
    # target 4 pixels, prediction 6 pixels, 3 shared: TP 3, FP 3, FN 1
    # Dice = 2*3 / (2*3 + 3 + 1) = 0.6, IoU = 3 / (3 + 3 + 1) = 3/7
    target = np.zeros((4, 4), np.uint8)
    target[0, :4] = 1
    pred = np.zeros((4, 4), bool)
    pred[0, 1:4] = True
    pred[1, 0:3] = True
    assert dice(pred, target) == pytest.approx(0.6)
    assert iou_binary(pred, target) == pytest.approx(3 / 7)


def test_empty_mask_conventions():
    empty, full = np.zeros((3, 3), np.uint8), np.ones((3, 3), np.uint8)
    assert dice(empty, empty) == 1.0 and iou_binary(empty, empty) == 1.0
    assert dice(full, empty) == 0.0 and dice(empty, full) == 0.0
    assert iou_binary(full, empty) == 0.0


def test_binary_ignore_index():
    # the only disagreeing pixel is ignored: a perfect score; an all-ignored image is empty-empty
    target = np.array([[1, 1, 255], [0, 0, 0]])
    pred = np.array([[1, 1, 1], [0, 0, 0]])
    assert dice(pred, target) == 1.0
    assert dice(pred, np.full_like(target, 255)) == 1.0


def test_binary_scores_hand_made_split():
    # image   target  pred                         Dice   IoU    image outcome
    # a       empty   empty                        1      -      TN
    # b       empty   2 px                         0      -      FP
    # c       4 px    same 4 px                    1      1      TP   (TP 4, FP 0, FN 0)
    # d       4 px    2 of them + 2 outside        0.5    1/3  TP   (TP 2, FP 2, FN 2)
    # e       2 px    empty                        0      0      FN   (TP 0, FP 0, FN 2)
    # kaggle = (1 + 0 + 1 + 0.5 + 0) / 5 = 0.5; dice_pos = 1.5 / 3 = 0.5; iou_pos = (4/3) / 3
    # pooled over positives: TP 6, FP 2, FN 4 -> Dice 12 / 18, IoU 6 / 12
    z = np.zeros((4, 4), np.uint8)
    four = z.copy()
    four[0] = 1
    half = z.copy()
    half[0, :2] = 1
    half[1, :2] = 1
    two = z.copy()
    two[3, :2] = 1
    scores = BinarySegmentationScores()
    per_image = [
        scores.update(z, z),
        scores.update(two, z),
        scores.update(four, four),
        scores.update(half, four),
        scores.update(z, two),
    ]
    assert per_image == pytest.approx([1, 0, 1, 0.5, 0])
    summary = scores.summary()
    assert summary["kaggle_dice"] == pytest.approx(0.5)
    assert summary["dice_pos"] == pytest.approx(0.5)
    assert summary["iou_pos"] == pytest.approx(4 / 9)
    assert summary["dice_pos_global"] == pytest.approx(12 / 18)
    assert summary["iou_pos_global"] == pytest.approx(0.5)
    assert (summary["images"], summary["positives"]) == (5, 3)
    assert [summary[f"image_{k}"] for k in ("tp", "fp", "tn", "fn")] == [2, 1, 1, 1]
    assert "image_auc" not in summary


def test_binary_scores_merge_and_image_auc():
    rng = np.random.default_rng(2)
    preds = rng.random((10, 8, 8)) < rng.choice([0.0, 0.2], size=(10, 1, 1))
    targets = rng.random((10, 8, 8)) < rng.choice([0.0, 0.3], size=(10, 1, 1))
    image_scores = rng.random(10)
    whole = BinarySegmentationScores()
    whole.update_batch(preds, targets, image_scores)
    halves = BinarySegmentationScores()
    halves.update_batch(preds[:4], targets[:4], image_scores[:4])
    rest = BinarySegmentationScores()
    rest.update_batch(preds[4:], targets[4:], image_scores[4:])
    merged = halves.merge(rest).summary()
    expected = whole.summary()
    assert merged.keys() == expected.keys()
    for key in expected:
        assert merged[key] == pytest.approx(expected[key], nan_ok=True), key
    labels = targets.reshape(10, -1).any(axis=1)
    assert expected["image_auc"] == pytest.approx(roc_auc(image_scores, labels))


def test_binary_scores_of_nothing_and_partial_image_scores():
    summary = BinarySegmentationScores().summary(prefix="seg_")
    assert math.isnan(summary["seg_kaggle_dice"]) and summary["seg_images"] == 0
    partial = BinarySegmentationScores()
    partial.update(np.zeros((2, 2)), np.zeros((2, 2)), score=0.3)
    partial.update(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="1 of 2"):
        partial.summary()


# ----------------------------------------------------------------- agreement with smp.metrics


@pytest.fixture(scope="module")
def smp_metrics():
    pytest.importorskip("torch")
    return pytest.importorskip("segmentation_models_pytorch").metrics


def test_multiclass_agrees_with_smp_including_ignore_and_unlabelled(smp_metrics):
    import torch

    rng = np.random.default_rng(3)
    num_classes = 5
    target = rng.integers(0, num_classes, size=(4, 24, 32))
    pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, num_classes, size=target.shape))
    target[rng.random(target.shape) < 0.1] = 255
    pred[rng.random(pred.shape) < 0.05] = 255  # unlabelled predictions: misses, as in smp
    tp, fp, fn, tn = smp_metrics.get_stats(
        torch.from_numpy(pred), torch.from_numpy(target), mode="multiclass", num_classes=num_classes, ignore_index=255
    )
    matrix = scored(pred, target, num_classes=num_classes)
    # per-class IoU = IoU of the class's counts summed over images (reduction "none" on sums)
    per_class = smp_metrics.iou_score(tp.sum(0), fp.sum(0), fn.sum(0), tn.sum(0), reduction="none")
    np.testing.assert_allclose(matrix.iou(), per_class.numpy(), rtol=1e-6)
    # mIoU = "macro" (counts summed over images, IoU per class, mean) when every class occurs
    assert matrix.miou() == pytest.approx(float(smp_metrics.iou_score(tp, fp, fn, tn, reduction="macro")))
    # pixel accuracy = "micro" recall: sum of TP over the scored pixels
    assert matrix.pixel_accuracy() == pytest.approx(float(smp_metrics.recall(tp, fp, fn, tn, reduction="micro")))
    np.testing.assert_array_equal(matrix.true_positives(), tp.sum(0).numpy())
    np.testing.assert_array_equal(matrix.false_positives(), fp.sum(0).numpy())
    np.testing.assert_array_equal(matrix.false_negatives(), fn.sum(0).numpy())


def test_binary_agrees_with_smp(smp_metrics):
    import torch

    rng = np.random.default_rng(4)
    n = 16
    # per-image foreground rates with zeros, so that empty targets and predictions occur
    targets = rng.random((n, 20, 20)) < rng.choice([0.0, 0.1, 0.4], size=(n, 1, 1))
    preds = rng.random((n, 20, 20)) < rng.choice([0.0, 0.1, 0.4], size=(n, 1, 1))
    preds[:3] = targets[:3]  # a few perfect ones too
    scores = BinarySegmentationScores()
    scores.update_batch(preds, targets)
    summary = scores.summary()

    def stats(index):
        as_tensor = lambda a: torch.from_numpy(a[index, None].astype(np.int64))  # noqa: E731
        return smp_metrics.get_stats(as_tensor(preds), as_tensor(targets), mode="binary")

    everything = stats(slice(None))
    positive = stats(targets.reshape(n, -1).any(axis=1))
    # Kaggle score = per-image Dice averaged over images, 0/0 (empty vs empty) -> 1
    kaggle = smp_metrics.f1_score(*everything, reduction="micro-imagewise", zero_division=1.0)
    assert summary["kaggle_dice"] == pytest.approx(float(kaggle))
    assert summary["dice_pos"] == pytest.approx(float(smp_metrics.f1_score(*positive, reduction="micro-imagewise")))
    assert summary["iou_pos"] == pytest.approx(float(smp_metrics.iou_score(*positive, reduction="micro-imagewise")))
    # dataset-level Dice / IoU on positives = "micro" (pixel counts pooled over images)
    assert summary["dice_pos_global"] == pytest.approx(float(smp_metrics.f1_score(*positive, reduction="micro")))
    assert summary["iou_pos_global"] == pytest.approx(float(smp_metrics.iou_score(*positive, reduction="micro")))


# ----------------------------------------------------------------- classification


def test_auc_and_ap_hand_made():
    # scores 0.1 0.4 0.35 0.8, labels 0 0 1 1: of the 4 (pos, neg) pairs, 3 are ordered -> AUC 0.75
    # ranked: 0.8 (1), 0.4 (0), 0.35 (1), 0.1 (0); precision at each positive 1/1 and 2/3
    # AP = 0.5 * 1 + 0.5 * 2/3 = 5/6
    scores, labels = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    assert roc_auc(scores, labels) == pytest.approx(0.75)
    assert average_precision(scores, labels) == pytest.approx(5 / 6)


def test_classification_scores_skips_classes_with_one_label_value():
    # class a: the hand-made case above; class b: perfect ranking (AUC 1, AP 1); class c: all 0
    scores = np.array([[0.1, 0.9, 0.5], [0.4, 0.1, 0.2], [0.35, 0.8, 0.3], [0.8, 0.2, 0.9]])
    targets = np.array([[0, 1, 0], [0, 0, 0], [1, 1, 0], [1, 0, 0]])
    result = classification_scores(scores, targets, ["a", "b", "c"])
    assert result["auc/a"] == pytest.approx(0.75) and result["ap/a"] == pytest.approx(5 / 6)
    assert result["auc/b"] == 1.0 and result["ap/b"] == 1.0
    assert math.isnan(result["auc/c"]) and math.isnan(result["ap/c"])
    assert result["mean_auc"] == pytest.approx(0.875)
    assert result["mean_ap"] == pytest.approx((5 / 6 + 1) / 2)
    one_class = classification_scores(scores[:, 0], targets[:, 0], prefix="cls_")
    assert one_class["cls_mean_auc"] == pytest.approx(0.75)
    assert math.isnan(classification_scores(scores[:, 2:], targets[:, 2:])["mean_ap"])


def test_classification_scores_rejects_bad_input():
    with pytest.raises(ValueError, match="0/1"):
        classification_scores(np.zeros((2, 1)), np.array([[2], [0]]))
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        classification_scores(np.zeros((2, 2)), np.zeros((2, 3)))


# ----------------------------------------------------------------- tables


def test_format_table_aligns_columns():
    rows = [
        {"stage": "cam", "miou": 0.41234, "images": 400},
        {"stage": "pseudo-labels", "miou": float("nan")},
        {"stage": "seg", "miou": 0.6},
    ]
    assert format_table(rows, digits=3).splitlines() == [
        "stage           miou  images",
        "-------------  -----  ------",
        "cam            0.412     400",
        "pseudo-labels      -",
        "seg            0.600",
    ]
    assert format_table(rows, columns=["miou"]).splitlines()[2] == "0.4123"


def test_digits_per_column_and_the_markdown_table_of_the_same_cells():
    rows = [{"stage": "cam", "seconds": 169.7, "value": 0.55491}, {"stage": "seg", "seconds": float("nan")}]
    assert format_table(rows, digits={"seconds": 1}).splitlines()[2:] == [
        "cam      169.7  0.5549",
        "seg          -",
    ]
    assert markdown_table(rows, ["stage", "seconds", "value"], digits={"seconds": 1}).splitlines() == [
        "| stage | seconds | value |",
        "|---|---|---|",
        "| cam | 169.7 | 0.5549 |",
        "| seg | - |  |",
    ]
