"""A user's own folder through every command, with configs/folder.yaml (made small): nested ids
(two images share a file name in two folders), a DICOM and a 16-bit TIFF among PNGs, masks or
none, one class or several, CheXpert-style uncertain labels. Every per-image file of every
artifact is named by the flat id, and every command finds them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from data.layout import PreparedDataset, encode_id, read_index_png
from tests.helpers import REPO, overrides
from tests.test_folder import make_user_folder, user_path

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CONFIG = REPO / "configs" / "folder.yaml"

# What the test changes in configs/folder.yaml: offline, 64 px, seconds.
SMALL = {
    "cam.weights": "null",
    "cam.backbone": "resnet18",
    "cam.epochs": "2",
    "cam.batch_size": "8",
    "cam.lr": "0.002",
    "cam.crop_size": "64",
    "cam.resize_long": "[56,72]",
    "cam.scales": "[1.0]",
    "irn.epochs": "1",
    "irn.batch_size": "4",
    "irn.crop_size": "64",
    "irn.resize_long": "[56,72]",
    "irn.exp_times": "4",
    "seg.encoder": "resnet18",
    "seg.encoder_weights": "null",
    "seg.epochs": "2",
    "seg.batch_size": "4",
    "seg.crop_size": "64",
    "seg.resize_long": "[56,72]",
    "run.workers": "0",
    "run.device": "cpu",
}


def stage_table(output: str) -> dict[str, str]:
    found = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[0] in ("cam", "irn", "pseudo", "seg") and parts[1] in ("ran", "cache"):
            found[parts[0]] = parts[1]
    return found


@pytest.mark.slow
def test_a_nested_multiclass_folder_with_masks_through_every_command(cli, tmp_path):
    case = make_user_folder(tmp_path / "user", n=24, size=64)
    root, workdir = tmp_path / "mine", tmp_path / "runs"
    prepared = cli(
        "prepare",
        "folder",
        "--images",
        case["images"],
        "--labels",
        case["csv"],
        "--masks",
        case["masks"],
        "--classes",
        case["classes_file"],
        "--out",
        root,
        "--val-fraction",
        "0.25",
    )
    assert prepared.exit_code == 0, prepared.output
    dataset = PreparedDataset(root)
    train, val = dataset.split("train"), dataset.split("val")
    assert {encode_id(user_path(0)), encode_id(user_path(1))} <= set(train + val)  # same name, two folders
    args = ["-c", CONFIG, "-o", f"data.root={root}", "-o", f"run.workdir={workdir}", *overrides(SMALL)]

    run = cli("run", *args)
    assert run.exit_code == 0, run.output
    assert stage_table(run.output) == dict.fromkeys(["cam", "irn", "pseudo", "seg"], "ran")
    report = json.loads((workdir / "mine" / "report.json").read_text())
    artifacts = {row["stage"]: Path(row["artifact"]) for row in report["stages"]}
    for image_id in train:
        assert (artifacts["cam"] / "cams" / f"{image_id}.npz").is_file()
        assert (artifacts["irn"] / "seeds" / f"{image_id}.png").is_file()
        assert (artifacts["pseudo"] / "pseudo_labels" / f"{image_id}.png").is_file()
        assert (artifacts["pseudo"] / "boundaries" / f"{image_id}.png").is_file() or not dataset.label_vector(
            image_id
        ).any()
    for image_id in val:
        prediction = read_index_png(artifacts["seg"] / "predictions" / f"{image_id}.png")
        assert prediction.shape == dataset.read_mask(image_id).shape
    metrics = json.loads((artifacts["cam"] / "metrics.json").read_text())
    assert metrics["cam_scored_images"] == len(train)  # every nested id found its mask

    again = cli("pseudo-labels", *args, "-o", "irn.sem_seg_bg_threshold=0.3")
    assert again.exit_code == 0, again.output
    new_pseudo = [p for p in (workdir / "mine").glob("pseudo-*") if p != artifacts["pseudo"]]
    assert len(new_pseudo) == 1 and len(list((new_pseudo[0] / "pseudo_labels").glob("*.png"))) == len(train)

    redone = cli("run-stage", "pseudo", *args, "--force")
    assert redone.exit_code == 0, redone.output
    assert len(list((artifacts["pseudo"] / "pseudo_labels").glob("*.png"))) == len(train)

    evaluated = cli("evaluate", *args)
    assert evaluated.exit_code == 0, evaluated.output
    rows = json.loads((workdir / "mine" / "evaluation.json").read_text())
    assert {(r["stage"], r["split"]) for r in rows} == {
        ("cam", "train"),
        ("irn", "train"),
        ("pseudo", "train"),
        ("seg", "val"),
        ("seg", "train"),
    }

    inputs = [case["images"] / "site2", case["images"] / f"{user_path(3)}.dcm"]
    predicted = cli("predict", *args, *inputs, "--out", tmp_path / "pred")
    assert predicted.exit_code == 0, predicted.output
    assert (tmp_path / "pred" / "masks" / f"{Path(user_path(3)).name}.png").is_file()
    assert (tmp_path / "pred" / "masks" / f"{Path(user_path(2)).name}.png").is_file()  # site2/patient2/scan2.tif

    grid = cli("visualize", *args, "--stage", "seg", "--n", "4", "--out", tmp_path / "grid.png")
    assert grid.exit_code == 0 and (tmp_path / "grid.png").stat().st_size > 0, grid.output

    compared = cli("compare", *args, "--methods", "gap", "--limit", "8", "--out", tmp_path / "compare")
    assert compared.exit_code == 0, compared.output
    assert (tmp_path / "compare" / "overlays.png").is_file()

    status = cli("status", *args)
    assert status.exit_code == 0 and status.output.count("up to date") == 4, status.output


@pytest.mark.slow
def test_a_binary_folder_without_masks_and_with_uncertain_labels_runs_and_predicts(cli, tmp_path):
    case = make_user_folder(tmp_path / "user", n=20, size=64, variant="binary", layout="wide", masks=False)
    rows = list(csv.reader(case["csv"].read_text().splitlines()))
    uncertain = [rows[k][0] for k in (3, 7, 11)]  # CheXpert's -1 on three images
    for k in (3, 7, 11):
        rows[k][-1] = "-1.0"
    case["csv"].write_text("\n".join(",".join(row) for row in rows) + "\n")
    root, workdir = tmp_path / "xrays", tmp_path / "runs"
    prepared = cli(
        "prepare", "folder", "--images", case["images"], "--labels", case["csv"], "--out", root, "--val-fraction", "0.2"
    )
    assert prepared.exit_code == 0, prepared.output
    dataset = PreparedDataset(root)
    assert dataset.task == "binary" and sorted(dataset.uncertain) == sorted(encode_id(r) for r in uncertain)
    args = ["-c", CONFIG, "-o", f"data.root={root}", "-o", f"run.workdir={workdir}", *overrides(SMALL)]

    run = cli("run", *args)
    assert run.exit_code == 0, run.output
    report = json.loads((workdir / "xrays" / "report.json").read_text())
    artifacts = {row["stage"]: Path(row["artifact"]) for row in report["stages"]}
    train = dataset.split("train")
    certain_positives = [i for i in train if dataset.label_vector(i).any() and not dataset.has_uncertain(i)]
    assert f"training on {len(certain_positives)}" in run.output  # irn: positives, uncertain ones out
    seg_metrics = json.loads((artifacts["seg"] / "metrics.json").read_text())
    held_out = seg_metrics.get("seg_holdout_images", 0)
    assert seg_metrics["seg_trained_images"] + held_out == len([i for i in train if not dataset.has_uncertain(i)])

    evaluated = cli("evaluate", *args)
    assert evaluated.exit_code == 0, evaluated.output
    predicted = cli("predict", *args, case["images"], "--out", tmp_path / "pred")
    # two files named img (site0/img.png, site1/img.png): outputs go by the file name, so the
    # second is reported and skipped; every other image is predicted
    assert predicted.exit_code == 1 and "same name as" in predicted.output
    submission = (tmp_path / "pred" / "submission.csv").read_text().splitlines()
    assert len(submission) == 1 + 19
    assert np.isin(read_index_png(tmp_path / "pred" / "masks" / "scan5.png"), (0, 1)).all()
