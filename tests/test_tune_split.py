"""`data.tune_split`: the images `wss tune` chooses settings on are left out of every score a
stage reports (stages 1-2 on train, the segmenter's val and train), as a re-score, not a recompute."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from data.layout import PreparedDataset, write_index_png
from pipeline.config import load_config
from pipeline.runner import scoring_values
from stages.cam.infer import save_cam
from stages.cam.stage import CamStage
from stages.common.scoring import scored_ids
from stages.irn.pseudo import PseudoLabelStage
from stages.irn.stage import IrnStage
from stages.seg.stage import SegStage

TUNE = 5  # train images in the tuning split


def dataset_with_tune_split(synthetic_dataset, tmp_path: Path) -> PreparedDataset:
    root = tmp_path / "data"
    shutil.copytree(synthetic_dataset(n=24, size=64), root)
    dataset = PreparedDataset(root)
    (root / "splits" / "tune.txt").write_text("\n".join(dataset.split("train")[:TUNE]) + "\n")
    return PreparedDataset(root)


def label_files(dataset: PreparedDataset, folder: Path, ids: list[str]) -> None:
    """The masks themselves as label files: every image scores, so counts are exact."""
    folder.mkdir(parents=True)
    for image_id in ids:
        write_index_png(folder / f"{image_id}.png", dataset.read_mask(image_id), dataset.info.palette)


def config(root: Path, tune: str | None):
    return load_config(None, [f"data.root={root}", f"data.tune_split={'null' if tune is None else tune}"])


def test_scored_ids_leave_the_tuning_split_out(synthetic_dataset, tmp_path):
    dataset = dataset_with_tune_split(synthetic_dataset, tmp_path)
    train = dataset.split("train")
    assert scored_ids(dataset, train, None) == train
    assert scored_ids(dataset, train, "tune") == train[TUNE:]
    assert scored_ids(dataset, dataset.split("val"), "tune") == dataset.split("val")


def test_seed_and_pseudo_label_scores_leave_the_tuning_split_out(synthetic_dataset, tmp_path):
    dataset = dataset_with_tune_split(synthetic_dataset, tmp_path)
    train = dataset.split("train")
    irn, pseudo = tmp_path / "irn", tmp_path / "pseudo"
    label_files(dataset, irn / "seeds", train)
    label_files(dataset, pseudo / "pseudo_labels", train)
    for stage, artifact, prefix in ((IrnStage(), irn, "seed_"), (PseudoLabelStage(), pseudo, "pseudo_")):
        before = stage.evaluate(config(dataset.root, None), dataset, artifact)
        assert before[f"{prefix}scored_images"] == len(train)
        after = stage.rescore(config(dataset.root, "tune"), dataset, artifact, {**before, "other": 1}, {})
        assert after[f"{prefix}scored_images"] == len(train) - TUNE
        assert after["other"] == 1


def test_cam_scores_leave_the_tuning_split_out(synthetic_dataset, tmp_path):
    dataset = dataset_with_tune_split(synthetic_dataset, tmp_path)
    train = dataset.split("train")
    cams = tmp_path / "cam" / "cams"
    cams.mkdir(parents=True)
    for image_id in train:
        mask = dataset.read_mask(image_id)
        keys = [int(k) for k in np.flatnonzero(dataset.label_vector(image_id))]
        cam = np.stack([(mask == k + 1).astype(np.float32) for k in keys]) if keys else np.zeros((0, *mask.shape))
        save_cam(cams / f"{image_id}.npz", cam.astype(np.float32), keys, mask.shape)
    stage = CamStage()
    before = stage.evaluate(config(dataset.root, None), dataset, tmp_path / "cam")
    after = stage.evaluate(config(dataset.root, "tune"), dataset, tmp_path / "cam")
    assert before["cam_scored_images"] == len(train)
    assert after["cam_scored_images"] == len(train) - TUNE


def test_seg_scores_leave_the_tuning_split_out(synthetic_dataset, tmp_path):
    dataset = dataset_with_tune_split(synthetic_dataset, tmp_path)
    train = dataset.split("train")
    label_files(dataset, tmp_path / "seg" / "predictions", train + dataset.split("val"))
    after = SegStage().evaluate(config(dataset.root, "tune"), dataset, tmp_path / "seg")
    assert after["seg_train_scored_images"] == len(train) - TUNE
    assert after["seg_val_scored_images"] == len(dataset.split("val"))


def test_a_tuning_split_is_a_scoring_only_setting(synthetic_dataset, tmp_path):
    """Unset, it is absent from what a stage was scored with (an artifact scored before the key
    existed is not re-scored); set, a new value re-scores stages 1-2 and never enters their keys."""
    for stage in (CamStage(), IrnStage(), PseudoLabelStage(), SegStage()):
        assert "data.tune_split" not in scoring_values(stage, {}, {"tune_split": None})
        assert scoring_values(stage, {}, {"tune_split": "tune"})["data.tune_split"] == "tune"
    cfg, tuned = config(tmp_path, None), config(tmp_path, "tune")
    for stage in (CamStage(), IrnStage(), PseudoLabelStage()):
        assert stage.key_config(cfg, "multiclass") == stage.key_config(tuned, "multiclass")
