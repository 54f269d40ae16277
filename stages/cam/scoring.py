"""Extra scores of a trained cam artifact for `wss compare` (the tensor side of it).

- CAMs of a split other than the one the stage wrote (val, or the boxed NIH images);
- a background-threshold sweep: the threshold is chosen on one split's masks and applied to
  another split, so no number is tuned on the split it scores;
- point localization accuracy against NIH boxes (stages/common/localization.py).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from data.layout import PreparedDataset
from stages.cam.infer import CAM_STRIDE, cam_to_label, load_cam, write_cam_files
from stages.cam.stage import load_cam_net, read_scored_cam
from stages.common.localization import LocalizationCase, localization_accuracy
from stages.common.metrics import ConfusionMatrix

log = logging.getLogger("wss.compare")

THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95


def count_parameters(artifact: Path) -> int:
    model, _, _ = load_cam_net(artifact, torch.device("cpu"))
    return sum(p.numel() for p in model.parameters())


def write_cams(artifact: Path, dataset: PreparedDataset, ids: list[str], cam_dir: Path,
               device: torch.device, keys_of=None, workers: int = 0) -> None:
    """CAMs of `ids` with the artifact's model and inference settings, saved like the stage's
    (stages.cam.infer.write_cam_files: existing files are kept, an unreadable image is logged
    and skipped). `keys_of(id)` picks the classes (default: the image's labels)."""
    if all((cam_dir / f"{i}.npz").is_file() for i in ids):
        return
    model, cfg, _ = load_cam_net(artifact, device)
    for failure in write_cam_files(model, cfg, dataset, ids, cam_dir, device, workers, keys_of,
                                   desc="cam inference (compare)", leave=False):
        log.warning("compare: skipped %s", failure)


def threshold_sweep(dataset: PreparedDataset, ids: list[str], cam_dir: Path,
                    thresholds=THRESHOLDS) -> dict[float, float]:
    """mIoU (background + classes) of the CAMs of `ids` at every background threshold."""
    matrices = {t: ConfusionMatrix(dataset.info.num_classes + 1) for t in thresholds}
    for image_id in ids:
        pair = read_scored_cam(dataset, image_id, cam_dir)
        if pair is None:
            continue
        (full, keys), gt = pair
        for t, matrix in matrices.items():
            matrix.update(cam_to_label(full, keys, t), gt)
    return {t: float(m.miou()) for t, m in matrices.items() if m.counts.sum() > 0}


def tuned_miou(dataset: PreparedDataset, tune_ids: list[str], tune_dir: Path, score_ids: list[str],
               score_dir: Path) -> tuple[float, float]:
    """(threshold with the best mIoU on the tuning split, mIoU at it on the scored split)."""
    sweep = threshold_sweep(dataset, tune_ids, tune_dir)
    if not sweep:
        return float("nan"), float("nan")
    best = max(sweep, key=lambda t: (sweep[t], -abs(t - 0.5)))
    scored = threshold_sweep(dataset, score_ids, score_dir, (best,))
    return best, scored.get(best, float("nan"))


def point_localization(dataset: PreparedDataset, boxes_by_id: dict[str, list], cam_dir: Path) -> dict[str, float]:
    """Point localization (and IoBB) accuracy of the CAMs in `cam_dir` against boxes (data.nih.Box).

    A stride-4 map of cell i covers image pixels [4i, 4i + 4), so it is scored with the image
    size padded to a multiple of 4: the box coordinates stay exact.
    """
    cases = []
    for image_id, boxes in boxes_by_id.items():
        path = cam_dir / f"{image_id}.npz"
        if not path.is_file():
            continue
        cam, keys, _ = load_cam(path)
        padded = (cam.shape[1] * CAM_STRIDE, cam.shape[2] * CAM_STRIDE)
        by_finding: dict[str, list] = {}
        for box in boxes:
            by_finding.setdefault(box.finding, []).append((box.x, box.y, box.w, box.h))
        for finding, found in sorted(by_finding.items()):
            index = dataset.classes.index(finding)
            if index in list(keys):
                cases.append(LocalizationCase(finding, cam[list(keys).index(index)], found, padded))
    return localization_accuracy(cases) if cases else {}
