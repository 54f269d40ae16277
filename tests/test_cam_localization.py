"""`wss evaluate --stage cam` on NIH: point localization of CAMs against the prepared boxes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data.layout import PreparedDataset
from data.nih import BOXES_NAME, prepare_nih, read_boxes
from stages.cam.infer import save_cam, strided_size
from stages.cam.stage import localization_metrics

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "samples" / "nih"


@pytest.fixture(scope="module")
def nih(tmp_path_factory) -> PreparedDataset:
    if not (SAMPLES / "images").is_dir():
        pytest.skip(f"NIH samples not found: {SAMPLES}")
    out = tmp_path_factory.mktemp("nih")
    prepare_nih(SAMPLES / "images", SAMPLES / "Data_Entry_2017_v2020.csv.gz", SAMPLES / "BBox_List_2017.csv",
                out, progress=False)
    return PreparedDataset(out)


def write_peaked_cams(dataset: PreparedDataset, cam_dir: Path, inside: bool) -> list[str]:
    """One CAM per boxed image whose single maximum lies inside (or far outside) its first box."""
    cam_dir.mkdir()
    boxes = {}
    for box in read_boxes(dataset.root / BOXES_NAME):
        boxes.setdefault(box.image_id, []).append(box)
    for image_id, found in boxes.items():
        size = dataset.read_image(image_id).shape[:2]
        keys = sorted({dataset.classes.index(b.finding) for b in found})
        cam = np.zeros((len(keys), *strided_size(*size)), np.float32)
        for row, key in enumerate(keys):
            box = next(b for b in found if dataset.classes.index(b.finding) == key)
            cx, cy = box.x + box.w / 2, box.y + box.h / 2
            if not inside:  # the opposite corner of the image from the box centre
                cx, cy = (size[1] - 1 - cx), (size[0] - 1 - cy)
                if any(b.x <= cx <= b.x + b.w and b.y <= cy <= b.y + b.h for b in found):
                    cx, cy = 2.0, 2.0
            cam[row, int(cy) // 4, int(cx) // 4] = 1.0
        save_cam(cam_dir / f"{image_id}.npz", cam, keys, size)
    return list(boxes)


def test_cam_peaked_inside_the_boxes_localizes_every_finding(nih, tmp_path):
    ids = write_peaked_cams(nih, tmp_path / "cams", inside=True)
    metrics = localization_metrics(nih, ids, tmp_path / "cams")
    assert metrics["cam_point_accuracy"] == 1.0
    assert sum(v for k, v in metrics.items() if k.startswith("cam_pairs/")) >= len(ids)


def test_cam_peaked_outside_the_boxes_localizes_nothing(nih, tmp_path):
    ids = write_peaked_cams(nih, tmp_path / "cams", inside=False)
    assert localization_metrics(nih, ids, tmp_path / "cams")["cam_point_accuracy"] == 0.0


def test_datasets_without_boxes_get_no_localization_metrics(tiny_synthetic, tmp_path):
    dataset = PreparedDataset(tiny_synthetic)
    assert localization_metrics(dataset, dataset.split("train"), tmp_path) == {}
