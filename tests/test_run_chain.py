"""`wss run` over the whole chain: caching across stages, evaluate, visualize."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import DEMO_CONFIG, FAST_CAM, REPO

FAST_CHAIN = {
    **FAST_CAM,
    "irn.epochs": "1",
    "irn.batch_size": "8",
    "irn.crop_size": "64",
    "irn.resize_long": "[56,72]",
    "irn.exp_times": "4",
    "seg.epochs": "1",
    "seg.batch_size": "8",
    "seg.crop_size": "64",
    "seg.resize_long": "[56,72]",
}


@pytest.fixture(scope="module")
def chain_args(tmp_path_factory, synthetic_dataset):
    root = synthetic_dataset()
    workdir = tmp_path_factory.mktemp("chain")
    args = ["-c", str(DEMO_CONFIG), "-o", f"data.root={root}", "-o", f"run.workdir={workdir}"]
    for key, value in FAST_CHAIN.items():
        args += ["-o", f"{key}={value}"]
    return args, workdir


def states(output: str) -> dict[str, str]:
    """stage -> 'ran' | 'cache hit' from the run table."""
    found = {}
    for line in output.splitlines():
        parts = line.split()
        if parts and parts[0] in ("cam", "irn", "pseudo", "seg") and len(parts) > 2:
            if parts[1] == "ran" or parts[1:3] == ["cache", "hit"]:
                found[parts[0]] = "ran" if parts[1] == "ran" else "cache hit"
    return found


@pytest.mark.slow
def test_run_twice_then_change_seg_then_change_irn(cli, chain_args):
    args, workdir = chain_args
    first = cli("run", *args)
    assert first.exit_code == 0, first.output + str(first.exception)
    assert states(first.output) == dict.fromkeys(["cam", "irn", "pseudo", "seg"], "ran")
    report = workdir / "synthetic" / "report.md"
    assert "seg_val_miou" in report.read_text() and (workdir / "synthetic" / "overlays-seg.png").is_file()

    second = cli("run", *args)
    assert states(second.output) == dict.fromkeys(["cam", "irn", "pseudo", "seg"], "cache hit")

    seg_changed = cli("run", *args, "-o", "seg.lr=0.0005")
    assert states(seg_changed.output) == {"cam": "cache hit", "irn": "cache hit", "pseudo": "cache hit", "seg": "ran"}

    irn_changed = cli("run", *args, "-o", "irn.conf_fg_threshold=0.5")
    assert states(irn_changed.output) == {"cam": "cache hit", "irn": "ran", "pseudo": "ran", "seg": "ran"}


def test_a_new_cam_scoring_threshold_rescores_the_cached_cams_without_retraining(cli, chain_args, monkeypatch):
    from data.layout import PreparedDataset
    from stages.cam.scoring import score_cams
    from stages.cam.stage import CamStage

    args, workdir = chain_args
    assert cli("run", *args, "--until", "cam").exit_code == 0
    (artifact,) = (workdir / "synthetic").glob("cam-*")
    manifest = json.loads((artifact / "manifest.json").read_text())
    trained = (artifact / "model.safetensors").stat().st_mtime_ns
    dataset = PreparedDataset(args[3].split("=", 1)[1])
    ids = sorted(p.stem for p in (artifact / "cams").glob("*.npz"))
    for threshold in [0.3, 0.6]:  # 0.6: the demo config's own, which the artifact was first scored with
        result = cli("run", *args, "--until", "cam", "-o", f"cam.eval_bg_threshold={threshold}")
        assert result.exit_code == 0, result.output
        assert states(result.output) == {"cam": "cache hit"}
        expected = score_cams(dataset, ids, artifact / "cams", threshold)["cam_miou"]
        rescored = json.loads((artifact / "manifest.json").read_text())
        assert rescored["metrics"]["cam_miou"] == pytest.approx(expected)
        assert json.loads((artifact / "metrics.json").read_text())["cam_miou"] == pytest.approx(expected)
        (table_row,) = [line for line in result.output.splitlines() if line.startswith("cam ") and "cam_miou" in line]
        assert f"{expected:.4f}" in table_row
        assert rescored["scored_with"] == {"eval_bg_threshold": threshold, "data.val_split": "val"}
        assert rescored["metrics"]["cls_mean_auc"] == manifest["metrics"]["cls_mean_auc"]  # kept, not rescored
    assert rescored["metrics"]["cam_miou"] == pytest.approx(manifest["metrics"]["cam_miou"])
    assert (artifact / "model.safetensors").stat().st_mtime_ns == trained
    status = cli("status", *args, "-o", "cam.eval_bg_threshold=0.45").output.splitlines()
    assert "up to date" in status[0]
    assert (
        "scored with eval_bg_threshold=0.6, data.val_split=val; a run re-scores it with "
        "eval_bg_threshold=0.45, data.val_split=val" in status[1]
    )

    # another val split: the saved classifier is scored on it, nothing is retrained
    classified = []
    original = CamStage.classify_split
    monkeypatch.setattr(
        CamStage,
        "classify_split",
        lambda self, model, ds, ids, *a, **k: classified.append(ids) or original(self, model, ds, ids, *a, **k),
    )
    on_train = cli("run", *args, "--until", "cam", "-o", "data.val_split=train")
    assert on_train.exit_code == 0, on_train.output
    assert states(on_train.output) == {"cam": "cache hit"}
    moved = json.loads((artifact / "manifest.json").read_text())
    assert moved["scored_with"] == {"eval_bg_threshold": 0.6, "data.val_split": "train"}
    assert classified == [dataset.split("train")]
    assert moved["metrics"]["cam_miou"] == pytest.approx(manifest["metrics"]["cam_miou"])
    assert cli("run", *args, "--until", "cam").exit_code == 0
    assert classified[1:] == [dataset.split("val")]
    back = json.loads((artifact / "manifest.json").read_text())["metrics"]
    assert back["cls_mean_auc"] == pytest.approx(manifest["metrics"]["cls_mean_auc"], abs=1e-6)
    assert (artifact / "model.safetensors").stat().st_mtime_ns == trained

    # another process recomputing the artifact (`--force`) holds its lock: no re-scoring under it
    import fcntl

    from pipeline.cache import ArtifactStore

    before = (artifact / "manifest.json").read_text()
    with open(ArtifactStore(workdir, "synthetic").lock_path(artifact.name), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        blocked = cli("run", *args, "--until", "cam", "-o", "cam.eval_bg_threshold=0.3")
    assert blocked.exit_code != 0 and "being recomputed or removed by another wss process" in blocked.output
    assert (artifact / "manifest.json").read_text() == before


def test_a_limited_try_is_rescored_on_its_share_of_the_new_val_split(cli, chain_args, monkeypatch):
    from data.layout import PreparedDataset
    from stages.cam.stage import CamStage

    args, _ = chain_args
    first = cli("run-stage", "cam", *args, "--limit", "8")
    assert first.exit_code == 0, first.output
    classified = []
    original = CamStage.classify_split
    monkeypatch.setattr(
        CamStage,
        "classify_split",
        lambda self, model, ds, ids, *a, **k: classified.append(ids) or original(self, model, ds, ids, *a, **k),
    )
    result = cli("run-stage", "cam", *args, "--limit", "8", "-o", "data.val_split=train")
    assert result.exit_code == 0, result.output
    assert "up to date" in result.output
    assert classified == [PreparedDataset(args[3].split("=", 1)[1]).split("train")[:8]]


def test_evaluate_and_visualize_the_finished_chain(cli, chain_args):
    args, workdir = chain_args
    assert cli("run", *args).exit_code == 0
    result = cli("evaluate", *args)
    assert result.exit_code == 0, result.output
    rows = json.loads((workdir / "synthetic" / "evaluation.json").read_text())
    assert {(r["stage"], r["split"]) for r in rows} == {
        ("cam", "train"),
        ("irn", "train"),
        ("pseudo", "train"),
        ("seg", "val"),
        ("seg", "train"),
    }
    assert all(0.0 <= r["miou"] <= 1.0 for r in rows)
    out = workdir / "grid.png"
    shown = cli("visualize", *args, "--stage", "seg", "--n", "3", "--out", out)
    assert shown.exit_code == 0, shown.output
    from PIL import Image

    assert Image.open(out).size[0] > Image.open(out).size[1]  # 7 columns, 3 rows
    blocked = cli("visualize", *args, "--stage", "cam", "--out", out / "under-a-file.png")
    assert blocked.exit_code == 2 and "cannot create the output folder" in blocked.output
    assert "Traceback" not in blocked.output


def test_a_model_planted_in_a_copied_workdir_runs_no_code(cli, chain_args, tmp_path):
    """A shared run folder whose models carry a pickle payload: `wss status` still says up to
    date (it reads no model); `wss run --force seg` (the segmenter starts from the planted
    classifier) stops with one line naming the file; `wss visualize --stage seg`, left to
    predict with the planted segmenter, shows those pictures as missing with a one-line
    warning naming it. The payload never runs."""
    import shutil

    from stages.cam.model_file import MODEL_FILE as CAM_FILE
    from stages.seg.model import MODEL_FILE as SEG_FILE
    from tests.test_model_files import plant_payload

    args, workdir = chain_args
    assert cli("run", *args).exit_code == 0
    copy = tmp_path / "copied"
    shutil.copytree(workdir, copy)
    copied = [arg.replace(str(workdir), str(copy)) for arg in args]
    marker = tmp_path / "ran"
    planted = {
        stage: [plant_payload(artifact / name, marker) for artifact in (copy / "synthetic").glob(f"{stage}-*")]
        for stage, name in (("cam", CAM_FILE), ("seg", SEG_FILE))
    }  # every artifact of the folder
    for seg in (copy / "synthetic").glob("seg-*"):
        shutil.rmtree(seg / "predictions")  # visualize predicts what is not saved
    status = cli("status", *copied)
    assert status.exit_code == 0 and status.output.count("up to date") == 4, status.output

    forced = cli("run", *copied, "--force", "seg")
    errors = [line for line in forced.output.splitlines() if line.startswith("error:")]
    assert forced.exit_code not in (0, None) and len(errors) == 1, forced.output
    assert any(str(path) in errors[0] for path in planted["cam"]) and "refuses" in errors[0], errors[0]
    assert "Traceback" not in forced.output and not marker.exists()

    shown = cli("visualize", *copied, "--stage", "seg", "--n", "2", "--out", tmp_path / "grid.png")
    assert shown.exit_code == 0, shown.output
    warnings = [line for line in shown.output.splitlines() if "prediction of" in line and "shown as missing" in line]
    assert len(warnings) == 2 and all(
        any(str(path) in line for path in planted["seg"]) and "refuses" in line for line in warnings
    ), shown.output
    assert not marker.exists()


def test_report_json_is_strict_json_when_a_metric_is_missing(tmp_path):
    """A stage without a metric (a dataset without masks) has NaN in the table: null in the JSON."""
    from pipeline.report import write_run_report
    from pipeline.runner import Outcome

    outcomes = [Outcome("cam", "ran", tmp_path / "cam-x", 1.0, {"cam_miou": float("nan")}, "cam_miou")]
    write_run_report(tmp_path, "demo.yaml", outcomes, {"train": "train", "val": "val"}, {})
    text = (tmp_path / "report.json").read_text()
    assert "NaN" not in text
    assert json.loads(text)["stages"][0]["value"] is None


def test_metric_table_columns_keep_the_class_order_whatever_the_hash_seed():
    """The per-class IoU columns come in the order the stages wrote the classes (background
    first): not a set's order, which changes with each process's hash seed."""
    import subprocess
    import sys

    script = (
        "from pipeline.report import metric_rows, metric_columns; "
        "m = {'cam_miou': .5, 'cam_iou/background': .9, 'cam_iou/ring': .1, 'cam_iou/cross': .2, "
        "'cam_iou/square': .3, 'cam_iou/disc': .4}; "
        "print(metric_columns(metric_rows('cam', m, {'train': 'train'}))[1])"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            cwd=REPO,
        ).stdout
        for seed in range(6)
    }
    assert outputs == {"['iou/background', 'iou/ring', 'iou/cross', 'iou/square', 'iou/disc']\n"}


def test_overlay_grid_names_the_columns_it_leaves_out(tiny_synthetic, tmp_path, caplog):
    import torch

    from data.layout import PreparedDataset
    from pipeline.visualize import draw_grid, grid_images

    dataset = PreparedDataset(tiny_synthetic)
    images = grid_images(dataset, dataset.split("train"), 2)
    grid = draw_grid(dataset, {}, "seg", images, tmp_path / "grid.png", torch.device("cpu"))
    assert grid.is_file()
    assert "no up-to-date artifact for CAM, seeds, boundary, pseudo-label, prediction" in caplog.text


def test_ground_truth_of_an_image_without_mask_is_missing_not_an_empty_mask(synthetic_dataset, tmp_path):
    import shutil

    import numpy as np
    import torch

    from data.layout import PreparedDataset
    from pipeline.visualize import Columns

    root = tmp_path / "data"
    shutil.copytree(synthetic_dataset(), root)
    dataset = PreparedDataset(root)
    with_mask, without = [i for i in dataset.split("train") if dataset.label_vector(i).any()][:2]
    dataset.mask_path(without).unlink()
    columns = Columns(dataset, {}, torch.device("cpu"), 0.5)
    image = np.zeros((64, 64, 3), np.uint8)
    assert columns.picture("ground truth", without, image) is None
    assert columns.picture("ground truth", with_mask, image) is not None


def test_overlay_grid_passes_over_an_image_that_does_not_decode(synthetic_dataset, tmp_path, caplog):
    import shutil

    from data.layout import PreparedDataset
    from pipeline.visualize import grid_images

    root = tmp_path / "data"
    shutil.copytree(synthetic_dataset(), root)
    dataset = PreparedDataset(root)
    ids = dataset.split("train")
    positives = [i for i in ids if dataset.label_vector(i).any()]
    dataset.image_path(positives[1]).write_bytes(b"not a png")
    chosen = grid_images(dataset, ids, 3)
    assert [image_id for image_id, _ in chosen] == [positives[0], *positives[2:4]]
    assert all(image.shape == (64, 64, 3) for _, image in chosen)
    assert positives[1] in caplog.text


def test_evaluate_with_nothing_up_to_date_is_an_error(cli, synthetic_dataset, tmp_path):
    result = cli(
        "evaluate",
        "-c",
        str(DEMO_CONFIG),
        "-o",
        f"data.root={synthetic_dataset()}",
        "-o",
        f"run.workdir={tmp_path}",
        "--stage",
        "seg",
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "nothing to evaluate: no seg artifact is up to date" in result.output


@pytest.mark.parametrize(
    "override, message",
    [
        ("seg.arch=Unett", "Wrong architecture type `Unett`"),
        ("seg.losses={dise: 1.0}", "seg.losses: unknown loss 'dise'"),
        ("seg.encoder_weights=/no/such/encoder.pth", "seg.encoder_weights: file not found"),
    ],
)
def test_a_seg_typo_stops_the_run_before_the_first_stage_computes(cli, synthetic_dataset, tmp_path, override, message):
    assert_stops_before_the_first_stage(cli, synthetic_dataset(), tmp_path, override, message)


def assert_stops_before_the_first_stage(cli, root, workdir, override: str, message: str) -> None:
    args = ["-c", str(DEMO_CONFIG), "-o", f"data.root={root}", "-o", f"run.workdir={workdir}"]
    for key, value in FAST_CHAIN.items():
        args += ["-o", f"{key}={value}"]
    result = cli("run", *args, "-o", override)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert message in result.output
    assert not list(workdir.glob("*/cam-*")) and not list(workdir.glob("*/.cam-*"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("irn.backbone_init=imagenet", "irn.backbone_init: imagenet: could not download ImageNet weights for resnet18"),
        ("seg.encoder_weights=imagenet", "could not download ImageNet weights for encoder resnet18"),
    ],
)
def test_offline_imagenet_weights_of_a_later_stage_stop_the_run_before_the_first_stage(
    cli, synthetic_dataset, tmp_path, monkeypatch, override, message
):
    """Without internet the IRN's or the segmenter's ImageNet weights fail before the classifier
    trains, not hours later."""
    import segmentation_models_pytorch.encoders as encoders

    from stages.common.backbones import IMAGENET_WEIGHTS

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached download answers instead
    monkeypatch.setattr(type(IMAGENET_WEIGHTS["resnet18"]), "get_state_dict", offline)
    monkeypatch.setattr(encoders, "hf_hub_download", offline)
    assert_stops_before_the_first_stage(cli, synthetic_dataset(), tmp_path, override, message)


@pytest.mark.slow
def test_a_new_prediction_size_reuses_the_trained_segmenter(cli, chain_args, monkeypatch):
    import torch

    import stages.seg.stage as seg_stage
    from pipeline.config import load_config
    from stages.common.model_files import read_model_file
    from stages.seg.model import MODEL_FILE

    args, workdir = chain_args
    assert cli("run", *args).exit_code == 0
    before = {p.name for p in (workdir / "synthetic").glob("seg-*")}

    def no_training(*a, **k):
        raise RuntimeError("trained again")

    def no_preflight(*a, **k):  # it would build (and with encoder_weights: imagenet, download) the model
        raise RuntimeError("checked the settings of a model that is reused")

    monkeypatch.setattr(seg_stage, "fit", no_training)
    monkeypatch.setattr(seg_stage.SegStage, "preflight", no_preflight)
    result = cli("run", *args, "-o", "seg.predict_size=96")
    assert result.exit_code == 0, result.output + str(result.exception)
    assert states(result.output) == {"cam": "cache hit", "irn": "cache hit", "pseudo": "cache hit", "seg": "ran"}
    assert "reusing the model trained in" in result.output
    (new,) = [p for p in (workdir / "synthetic").glob("seg-*") if p.name not in before]
    twin = Path(json.loads((new / "manifest.json").read_text())["inputs"]["trained"])
    assert twin.name in before
    old_state = read_model_file(twin / MODEL_FILE, "seg", "model", "seg")
    new_state = read_model_file(new / MODEL_FILE, "seg", "model", "seg")
    assert new_state.meta["long_side"] == 96 and old_state.meta["long_side"] != 96
    for name, weights in old_state.tensors.items():
        assert torch.equal(new_state.tensors[name], weights), name
    assert len(list((new / "predictions").glob("*.png"))) == len(list((twin / "predictions").glob("*.png")))

    # another val split is only predicted: the same segmenter predicts it
    on_train = cli("run", *args, "-o", "data.val_split=train")
    assert on_train.exit_code == 0, on_train.output + str(on_train.exception)
    assert states(on_train.output) == {"cam": "cache hit", "irn": "cache hit", "pseudo": "cache hit", "seg": "ran"}
    assert "reusing the model trained in" in on_train.output
    (moved,) = [p for p in (workdir / "synthetic").glob("seg-*") if p.name not in before | {new.name}]
    assert Path(json.loads((moved / "manifest.json").read_text())["inputs"]["trained"]).name in before | {new.name}
    metrics = json.loads((moved / "metrics.json").read_text())
    assert metrics["seg_val_miou"] == pytest.approx(metrics["seg_train_miou"])

    # pseudo_holdout chooses its checkpoint by predicting with threshold and predict_size: only the
    # val split and the empty-mask rule (which that choice does not apply) may change under it,
    # and the reusing artifact reports the twin's choice
    holdout = load_config([DEMO_CONFIG], [*args[3::2], "seg.checkpoint=pseudo_holdout"])
    assert seg_stage.SegStage().inference_settings(holdout) == (
        "min_area",
        "image_threshold",
        "image_score",
        "data.val_split",
    )
    chosen = workdir / "holdout-artifact"
    chosen.mkdir()
    (chosen / "metrics.json").write_text(json.dumps({**metrics, "seg_holdout_epoch": 3}))
    assert seg_stage.holdout_choice(chosen) == {"seg_holdout_epoch": 3}


def test_overlay_grid_shows_a_bad_label_or_mask_as_missing(synthetic_dataset, tmp_path, caplog):
    """A garbled pseudo-label, a seed of another size or a garbled mask cost their picture only."""
    import shutil

    import torch

    from data.layout import PreparedDataset, write_index_png
    from pipeline.visualize import draw_grid, grid_images

    root = tmp_path / "data"
    shutil.copytree(synthetic_dataset(), root)
    dataset = PreparedDataset(root)
    images = grid_images(dataset, dataset.split("train"), 2)
    (first, _), (second, _) = images
    for folder in ["pseudo/pseudo_labels", "irn/seeds"]:
        (tmp_path / folder).mkdir(parents=True)
        for image_id, _ in images:
            write_index_png(tmp_path / folder / f"{image_id}.png", dataset.read_mask(image_id), dataset.info.palette)
    bad_label = tmp_path / "pseudo" / "pseudo_labels" / f"{first}.png"
    bad_label.write_bytes(b"garbled")
    bad_seed = tmp_path / "irn" / "seeds" / f"{second}.png"
    write_index_png(bad_seed, dataset.read_mask(second)[:30], dataset.info.palette)
    dataset.mask_path(second).write_bytes(b"garbled")
    artifacts = {"irn": tmp_path / "irn", "pseudo": tmp_path / "pseudo"}
    grid = draw_grid(dataset, artifacts, "irn", images, tmp_path / "grid.png", torch.device("cpu"))
    assert grid.is_file()
    assert f"pseudo-label of {first} shown as missing: {bad_label}: not a readable label PNG" in caplog.text
    assert f"seeds of {second} shown as missing: {bad_seed}: label is 64x30" in caplog.text
    assert f"ground truth of {second} shown as missing: {dataset.mask_path(second)}" in caplog.text


def test_evaluate_and_visualize_pass_over_garbled_labels_in_the_artifacts(cli, chain_args):
    args, workdir = chain_args
    assert cli("run", *args).exit_code == 0
    from data.layout import PreparedDataset

    dataset = PreparedDataset(args[3].split("=", 1)[1])
    shown_id = next(i for i in dataset.split("train") if dataset.label_vector(i).any())  # in the grid
    found = {
        line.split()[0]: Path(line.split()[-1])
        for line in cli("status", *args).output.splitlines()
        if "up to date" in line
    }  # the artifacts of this config (earlier tests made others)
    garbled = [
        found["irn"] / "seeds" / f"{shown_id}.png",
        found["pseudo"] / "pseudo_labels" / f"{shown_id}.png",
        found["seg"] / "predictions" / f"{dataset.split('val')[0]}.png",
    ]
    kept = {path: path.read_bytes() for path in garbled}
    try:
        for path in garbled:
            path.write_bytes(b"garbled")
        result = cli("evaluate", *args)
        assert result.exit_code == 0, result.output
        assert "Traceback" not in result.output
        assert all(f"left out {path}: not a readable label PNG" in result.output for path in garbled)
        shown = cli("visualize", *args, "--stage", "seg", "--n", "2", "--out", workdir / "grid-garbled.png")
        assert shown.exit_code == 0, shown.output
        assert all(f"{path}: not a readable label PNG" in shown.output for path in garbled[:2])
    finally:
        for path, content in kept.items():
            path.write_bytes(content)
