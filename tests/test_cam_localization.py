"""`wss evaluate --stage cam` on NIH: point localization of CAMs against the prepared boxes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data.layout import PreparedDataset
from data.nih import BOXES_NAME, prepare_nih, read_boxes
from stages.cam.infer import save_cam, strided_size
from stages.cam.localization import localization_metrics

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "samples" / "nih"


@pytest.fixture(scope="module")
def nih(tmp_path_factory) -> PreparedDataset:
    if not (SAMPLES / "images").is_dir():
        pytest.skip(f"NIH samples not found: {SAMPLES}")
    out = tmp_path_factory.mktemp("nih")
    prepare_nih(
        SAMPLES / "images",
        SAMPLES / "Data_Entry_2017_v2020.csv.gz",
        SAMPLES / "BBox_List_2017.csv",
        out,
        progress=False,
    )
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


def fake_nih(folder: Path) -> PreparedDataset:
    """24 patients of 64 px X-rays, half with an 'Atelectasis' blob, 4 of those boxed: NIH
    preparation puts the boxed patients in the test split."""
    import csv

    from PIL import Image

    images = folder / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries, boxes = [], []
    for patient in range(1, 25):
        image_id = f"{patient:08d}_000.png"
        pixels = rng.integers(60, 90, (64, 64)).astype(np.uint8)
        finding = "Atelectasis" if patient % 2 else "No Finding"
        if patient % 2:
            pixels[12:28, 10:30] = 230
            if patient <= 8:
                boxes.append([image_id, "Atelectasis", 10, 12, 20, 16])
        Image.fromarray(pixels).save(images / image_id)
        entries.append([image_id, finding, 0, str(patient)])
    with open(folder / "entries.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["Image Index", "Finding Labels", "Follow-up #", "Patient ID"], *entries])
    with open(folder / "boxes.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["Image Index", "Finding Label", "Bbox [x,y,w,h]", "", "", ""], *boxes])
    prepare_nih(images, folder / "entries.csv", folder / "boxes.csv", folder / "out", progress=False)
    return PreparedDataset(folder / "out")


def test_the_cam_stage_scores_localization_on_the_held_out_boxed_images(cli, tmp_path):
    """The boxed images are all in NIH's test split, never in train: the stage writes their CAMs
    to boxed_cams/ and `wss evaluate --stage cam` scores point localization on them."""
    from tests.helpers import DEMO_CONFIG, FAST_CAM, overrides

    dataset = fake_nih(tmp_path / "nih")
    boxed = {box.image_id for box in read_boxes(dataset.root / BOXES_NAME)}
    assert boxed and boxed <= set(dataset.split("test")) and not boxed & set(dataset.split("train"))
    args = [
        "-c",
        DEMO_CONFIG,
        *overrides({**FAST_CAM, "cam.epochs": "1", "data.root": dataset.root, "run.workdir": tmp_path / "runs"}),
    ]
    result = cli("run-stage", "cam", *args)
    assert result.exit_code == 0, result.output
    (artifact,) = (tmp_path / "runs" / "nih").glob("cam-*")
    assert {p.stem for p in (artifact / "boxed_cams").glob("*.npz")} == boxed
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert 0.0 <= manifest["metrics"]["cam_point_accuracy"] <= 1.0
    assert manifest["headline"] == "cam_point_accuracy"  # no masks: localization is the stage's score
    result = cli("evaluate", *args, "--stage", "cam")
    assert result.exit_code == 0 and "point" in result.output, result.output
    (row,) = json.loads((tmp_path / "runs" / "nih" / "evaluation.json").read_text())
    assert row["split"] == "test (boxed)" and row["point_accuracy"] == manifest["metrics"]["cam_point_accuracy"]
    assert row["iobb@0.5"] == manifest["metrics"]["cam_iobb@0.5/mean"]
    rescored = cli("run-stage", "cam", *args, "-o", "cam.eval_bg_threshold=0.5")  # re-scored, not retrained
    assert rescored.exit_code == 0, rescored.output
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["scored_with"] == {"eval_bg_threshold": 0.5, "data.val_split": "val"}
    assert 0.0 <= manifest["metrics"]["cam_point_accuracy"] <= 1.0
