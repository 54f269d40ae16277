"""CAMs against NIH's boxes: which images have boxes, and the point localization and IoBB
accuracy of their CAMs (the metrics are stages/common/localization.py)."""

from __future__ import annotations

from pathlib import Path

from data.boxes import BOXES_NAME, boxes_by_image, read_boxes
from data.layout import PreparedDataset
from stages.cam.infer import CAM_STRIDE, load_cam
from stages.common.localization import LocalizationCase, localization_accuracy

BOXED_CAMS = "boxed_cams"  # NIH: CAMs of the images with boxes (test split), for localization


def boxed_images(dataset: PreparedDataset) -> dict[str, list]:
    """{image id: its boxes} of the prepared images that have boxes, sorted by id (NIH's
    boxes.csv; empty elsewhere). NIH preparation puts them, and their patients, in the test
    split: the classifier never trains on them, and the stage writes their CAMs to
    `boxed_cams/` to score localization."""
    path = dataset.root / BOXES_NAME
    if not path.is_file():
        return {}
    grouped = boxes_by_image(read_boxes(path))
    return {image_id: grouped[image_id] for image_id in sorted(grouped) if image_id in dataset.labels}


def localization_metrics(dataset: PreparedDataset, ids: list[str], cam_dir: Path) -> dict:
    """Point localization / IoBB of the CAMs of `ids` against their boxes (NIH), when they have some."""
    boxes = boxed_images(dataset)
    scores = point_localization(dataset, {i: boxes[i] for i in ids if i in boxes}, cam_dir)
    renamed = {"cam_point_accuracy" if k == "point/mean" else f"cam_{k}": v for k, v in scores.items()}
    return {k: float(v) for k, v in renamed.items()}


def point_localization(dataset: PreparedDataset, boxes_by_id: dict[str, list], cam_dir: Path) -> dict[str, float]:
    """Point localization (and IoBB) accuracy of the CAMs in `cam_dir` against boxes (data.boxes.Box).

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
