"""The empty-mask rule of binary tasks (stages.seg.postprocess): known answers, the model file
carrying it, and `wss predict` applying it (refusing a classifier score it cannot compute)."""

from __future__ import annotations

import numpy as np
import pytest

from data.errors import WssError
from data.layout import read_index_png
from pipeline.config import load_config
from stages.common.model_files import read_model_file, write_model_file
from stages.seg.model import MODEL_FILE, SegModelError
from stages.seg.postprocess import EmptyMaskRule, area_at, image_score, remove_small_regions
from stages.seg.predict import predict_inputs
from stages.seg.stage import SegStage
from tests.test_predict import train_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_small_regions_are_removed_counting_diagonal_neighbours():
    mask = np.zeros((8, 8), np.uint8)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = 1  # one 3-pixel region (8-connected)
    mask[5:8, 5:8] = 1  # 9 pixels
    mask[0, 7] = 1  # a single pixel
    assert remove_small_regions(mask, 0) is mask and remove_small_regions(mask, 1) is mask
    kept3 = remove_small_regions(mask, 3)
    assert kept3[0, 7] == 0 and kept3[:3, :3].sum() == 3 and kept3[5:, 5:].sum() == 9
    kept4 = remove_small_regions(mask, 4)
    assert kept4.sum() == 9 and kept4[5:, 5:].all()
    assert remove_small_regions(mask, 10).sum() == 0
    assert mask.sum() == 13  # the input is left as it was


def test_min_area_scales_with_the_image_area():
    assert area_at(0, (512, 512), 128) == 0
    assert area_at(10, (128, 128), 128) == 10
    assert area_at(10, (256, 128), 128) == 40  # long side twice the prediction size: 4x the area
    assert area_at(10, (64, 64), 128) == 2  # rounded, at least 1
    assert area_at(10, (64, 64), None) == 10


def test_image_scores_and_the_threshold():
    assert image_score("seg", 0.4, None) == 0.4
    assert image_score("cam", 0.4, 0.8) == 0.8
    assert image_score("mean", 0.4, 0.8) == pytest.approx(0.6)
    with pytest.raises(WssError, match="stage-1 classifier"):
        image_score("mean", 0.4, None)
    with pytest.raises(WssError, match="image_score"):
        EmptyMaskRule(image_score="max")
    mask = np.zeros((16, 16), np.uint8)
    mask[2:10, 2:10] = 1
    mask[14, 14] = 1
    assert not EmptyMaskRule().active
    assert EmptyMaskRule().apply(mask, 0.0, 16) is mask  # the default changes nothing
    rule = EmptyMaskRule(min_area=2, image_threshold=0.5)
    assert rule.apply(mask, 0.49, 16).sum() == 0
    assert rule.apply(mask, 0.5, 16).sum() == 64  # at the threshold: kept, the stray pixel removed
    assert not rule.decides_with_classifier and EmptyMaskRule(image_threshold=0.5, image_score="cam").reads_classifier


def test_rule_of_a_config_section_and_of_a_model_file():
    cfg = load_config(None, ["seg.min_area=7", "seg.image_threshold=0.3", "seg.image_score=mean"])
    assert EmptyMaskRule.of(cfg.seg) == EmptyMaskRule(7, 0.3, "mean")
    assert EmptyMaskRule.of({"threshold": 0.5}) == EmptyMaskRule()  # a file written without the rule


def test_rule_settings_are_binary_inference_settings(tmp_path):
    cfg = load_config(None, ["seg.min_area=7"])
    stage = SegStage()
    assert "min_area" not in stage.key_config(cfg, "multiclass")
    assert stage.key_config(cfg, "binary")["min_area"] == 7
    for checkpoint in ("last", "pseudo_holdout"):
        settings = stage.inference_settings(load_config(None, [f"seg.checkpoint={checkpoint}"]))
        assert {"min_area", "image_threshold", "image_score"} <= set(settings)


@pytest.fixture(scope="module")
def binary_segmenter(synthetic_dataset, tmp_path_factory):
    root = synthetic_dataset(n=24, size=64, variant="binary")
    return root, train_tiny(root, tmp_path_factory.mktemp("rule-bin"))


def with_rule(artifact, folder, **rule):
    state = read_model_file(artifact / MODEL_FILE, "seg", "model", "seg")
    path = folder / "ruled.safetensors"
    write_model_file(path, "seg", state.tensors, {**state.meta, **rule})
    return path


def test_predict_applies_the_models_rule(binary_segmenter, tmp_path):
    root, artifact = binary_segmenter
    images = sorted((root / "images").iterdir())[:4]
    plain = predict_inputs(artifact, images, tmp_path / "plain", device="cpu", threshold=0.0)
    assert plain.written and all(read_index_png(tmp_path / "plain" / "masks" / f"{s}.png").any() for s in plain.written)
    emptied = with_rule(artifact, tmp_path, image_threshold=1.0)  # no probability reaches 1: every mask empty
    report = predict_inputs(emptied, images, tmp_path / "ruled", device="cpu", threshold=0.0)
    assert report.written == plain.written
    assert not any(read_index_png(tmp_path / "ruled" / "masks" / f"{s}.png").any() for s in report.written)
    with open(report.submission) as rows:
        assert all(line.rstrip().endswith(",-1") for line in list(rows)[1:])  # Kaggle's empty mask


def test_predict_refuses_a_classifier_rule_without_its_classifier(binary_segmenter, tmp_path):
    root, artifact = binary_segmenter
    ruled = with_rule(artifact, tmp_path, image_threshold=0.5, image_score="cam")
    with pytest.raises(WssError, match="cam artifact is not known"):
        predict_inputs(ruled, [root / "images"], tmp_path / "out", device="cpu")
    bad = with_rule(artifact, tmp_path, image_score="max")
    with pytest.raises(SegModelError, match="image_score"):
        predict_inputs(bad, [root / "images"], tmp_path / "out", device="cpu")


def test_the_seg_stage_predicts_with_the_rule(binary_segmenter, tmp_path):
    """predict_split: an image threshold no score reaches empties every mask; the image scores
    stay the segmenter's (seg.image_score: seg)."""
    import json

    import torch

    from data.layout import PreparedDataset
    from stages.seg.model import load_segmenter

    root, artifact = binary_segmenter
    dataset = PreparedDataset(root)
    model, _ = load_segmenter(artifact, torch.device("cpu"))
    ids = dataset.split("val")
    stage = SegStage()
    for name, rule in (("plain", []), ("ruled", ["seg.image_threshold=1.0"])):
        section = load_config(None, ["seg.resize_long=[32,48]", "seg.threshold=0.0", *rule]).seg
        out = tmp_path / name
        metrics, failures = stage.predict_split(model, section, dataset, ids, out, torch.device("cpu"), 0, "val")
        masks = [read_index_png(out / "predictions" / f"{i}.png") for i in ids]
        assert not failures and metrics["seg_val_scored_images"] == len(ids)
        assert all(mask.any() for mask in masks) if name == "plain" else not any(mask.any() for mask in masks)
        scores = json.loads((out / "image_scores.json").read_text())
        assert set(scores) == set(ids) and all(0 <= s < 1 for s in scores.values())
