"""CAM files scored against the masks: one split at the stage's background threshold (the
`cam_` metrics, with the point localization of each labelled class' peak), or a sweep of
thresholds, where the threshold is chosen on one split's masks and applied to another so that
no number is tuned on the split it scores (`wss compare`)."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from data.errors import DataError
from data.layout import PreparedDataset
from stages.cam.infer import CamFileError, cam_to_label, load_cam, upsample_cam
from stages.common.localization import MaskPointAccuracy
from stages.common.scoring import SegmentationScorer, left_out_of_scores

THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95


def read_scored_cam(dataset: PreparedDataset, image_id: str, cam_dir: Path, failures: list[str] | None = None):
    """((CAM at full size, keys), ground truth) of one image, or None where the mask or the CAM
    is missing, or either is unreadable or their sizes differ (stages.common.scoring.left_out_of_scores)."""
    path = cam_dir / f"{image_id}.npz"
    if not dataset.has_mask(image_id) or not path.is_file():
        return None
    try:
        cam, keys, size = load_cam(path)
        gt = dataset.read_mask(image_id, size)
    except (CamFileError, DataError) as error:
        left_out_of_scores(error, failures)
        return None
    return (upsample_cam(cam, size), keys), gt


def score_cams(
    dataset: PreparedDataset,
    ids: list[str],
    cam_dir: Path,
    bg_threshold: float,
    failures: list[str] | None = None,
    points: bool = False,
) -> dict:
    """CAM mIoU (and per-class IoU; binary: Dice) on the images of `ids` that have masks, and with
    `points` their point localization on the masks (stages.common.localization.MaskPointAccuracy)
    in the same pass. An unreadable CAM or mask, or a mask of another size, is left out and
    listed in `failures`."""
    scorer = SegmentationScorer.of(dataset)
    peaks = MaskPointAccuracy(dataset.classes)
    for image_id in tqdm(ids, desc="cam evaluate", unit="img", leave=False):
        pair = read_scored_cam(dataset, image_id, cam_dir, failures)
        if pair is None:
            continue
        (cam, keys), gt = pair
        scorer.update(cam_to_label(cam, keys, bg_threshold), gt)
        if points:
            peaks.update(cam, keys, gt)
    return {**scorer.metrics("cam_"), **peaks.metrics("cam_")}


def threshold_sweep(
    dataset: PreparedDataset, ids: list[str], cam_dir: Path, thresholds=THRESHOLDS
) -> dict[float, float]:
    """mIoU (background + classes) of the CAMs of `ids` at every background threshold."""
    scorers = {t: SegmentationScorer(dataset.classes) for t in thresholds}
    for image_id in ids:
        pair = read_scored_cam(dataset, image_id, cam_dir)
        if pair is None:
            continue
        (full, keys), gt = pair
        for t, scorer in scorers.items():
            scorer.update(cam_to_label(full, keys, t), gt)
    return {t: float(s.miou()) for t, s in scorers.items() if s.matrix.counts.sum() > 0}


def tuned_miou(
    dataset: PreparedDataset, tune_ids: list[str], tune_dir: Path, score_ids: list[str], score_dir: Path
) -> tuple[float, float]:
    """(threshold with the best mIoU on the tuning split, mIoU at it on the scored split)."""
    sweep = threshold_sweep(dataset, tune_ids, tune_dir)
    if not sweep:
        return float("nan"), float("nan")
    best = max(sweep, key=lambda t: (sweep[t], -abs(t - 0.5)))
    scored = threshold_sweep(dataset, score_ids, score_dir, (best,))
    return best, scored.get(best, float("nan"))
