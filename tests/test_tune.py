"""`wss tune`: the grid it reads, the splits it refuses, and the empty-mask rule search, which
reads no mask on the held-out images and scores each rule as applying it would."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data.layout import PreparedDataset
from pipeline.config import load_config
from pipeline.tune import TuneError, check_tune_split, choose_rule, parse_params, steps
from stages.common.metrics import BinarySegmentationScores
from stages.seg.model import load_segmenter, predict_probabilities
from stages.seg.postprocess import EmptyMaskRule
from stages.tuning.empty_masks import RuleGrid, holdout_evidence, rule_rows, tune_evidence
from tests.test_predict import train_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_params_values_and_ranges():
    grid = parse_params(
        ["irn.beta=5,10,20", "irn.sem_seg_bg_threshold=0.1:0.9:0.1", "irn.refine_crf=true,false", "seg.image_score=cam"]
    )
    assert grid["irn.beta"] == [5.0, 10.0, 20.0]
    assert grid["irn.sem_seg_bg_threshold"] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert grid["irn.refine_crf"] == [True, False] and grid["seg.image_score"] == ["cam"]
    assert steps(0.05, 0.95, 0.1)[-1] == 0.95 and len(steps(0.05, 0.95, 0.1)) == 10
    for bad in ("irn.gamma=1", "irn.beta", "irn.exp_times=two", "cam.eval_bg_threshold=1.5", "seg.image_score=max"):
        with pytest.raises(TuneError):
            parse_params([bad])


@pytest.fixture
def with_splits(synthetic_dataset, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(synthetic_dataset(n=24, size=64), root)
    dataset = PreparedDataset(root)
    (root / "splits" / "tune.txt").write_text("\n".join(dataset.split("train")[:4]) + "\n")
    (root / "splits" / "leaky.txt").write_text("\n".join(dataset.split("val")[:1] + dataset.split("train")[:1]) + "\n")
    return root


def test_a_tuning_split_that_is_reported_on_is_refused(with_splits, cli, tmp_path):
    dataset = PreparedDataset(with_splits)

    def cfg(tune):
        return load_config(None, [f"data.root={with_splits}", f"data.tune_split={tune}"])

    assert check_tune_split(cfg("tune"), dataset) == dataset.split("train")[:4]
    assert check_tune_split(cfg("null"), dataset) == []
    for split, why in (("train", "is the train split"), ("val", "is the val split"), ("leaky", "shares 1 image")):
        with pytest.raises(TuneError, match=why):
            check_tune_split(cfg(split), dataset)
    result = cli("tune", "-c", "configs/demo.yaml", "-o", f"data.root={with_splits}", "-o", "data.tune_split=leaky",
                 "-o", f"run.workdir={tmp_path / 'runs'}")  # fmt: skip
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("error: data.tune_split 'leaky' shares 1 image")
    assert not (tmp_path / "runs").exists()  # refused before any stage ran


@pytest.fixture(scope="module")
def binary_run(synthetic_dataset, tmp_path_factory):
    """A tiny binary segmenter and pseudo-labels (the masks themselves) of every train image."""
    root = synthetic_dataset(n=24, size=64, variant="binary")
    base = tmp_path_factory.mktemp("tune-bin")
    return PreparedDataset(root), train_tiny(root, base), base / "pseudo" / "pseudo_labels"


GRID = RuleGrid(
    thresholds=(0.3, 0.5),
    min_areas=(0, 6, 40),
    image_scores=("seg",),
    image_thresholds=(0.0, 0.5, 0.55, 0.6, 1.0),
    long_side=64,
)


def test_the_rule_search_on_held_out_images_reads_no_mask(binary_run, monkeypatch):
    dataset, artifact, labels = binary_run
    model, _ = load_segmenter(artifact, torch.device("cpu"))
    ids = dataset.split("train")
    items = [(i, labels / f"{i}.png" if dataset.label_vector(i).any() else None) for i in ids]

    def no_mask(*args, **kwargs):
        raise AssertionError("the rule search read a mask")

    monkeypatch.setattr(PreparedDataset, "read_mask", no_mask)
    monkeypatch.setattr(PreparedDataset, "has_mask", no_mask)
    evidence = holdout_evidence(dataset, items, model, None, list(GRID.thresholds), 64, torch.device("cpu"))
    rows = rule_rows(evidence, GRID)
    assert len(rows) == 2 * 3 * 1 * 5
    emptied = [row for row in rows if row["seg.image_threshold"] == 1.0]  # nothing reaches 1: all empty
    assert all(row["nonempty_negatives"] == 0 and row["balanced_accuracy"] == 0.5 for row in emptied)
    assert choose_rule(rows, {}, with_masks=False) is not None


def test_each_rule_scores_as_applying_it(binary_run):
    """The search's Kaggle Dice and non-empty rates equal those of the masks EmptyMaskRule makes
    from the same probabilities (the tuning split's masks as the reference)."""
    dataset, artifact, _ = binary_run
    model, _ = load_segmenter(artifact, torch.device("cpu"))
    ids = dataset.split("val") + dataset.split("train")[:8]
    assert not all(dataset.label_vector(i).any() for i in ids)  # negatives among them
    evidence = tune_evidence(dataset, ids, model, None, list(GRID.thresholds), 64, torch.device("cpu"))
    rows = rule_rows(evidence, GRID)
    for row in rows:
        rule = EmptyMaskRule(row["seg.min_area"], row["seg.image_threshold"], "seg")
        scores, nonempty_neg, negatives = BinarySegmentationScores(), 0, 0
        for image_id in ids:
            probs = predict_probabilities(model, dataset.read_image(image_id), "binary", 64, torch.device("cpu"))
            mask = rule.apply((probs[0].numpy() > row["seg.threshold"]).astype(np.uint8), float(probs.max()), 64)
            gt = dataset.read_mask(image_id)
            scores.update(mask, gt)
            if not gt.any():
                negatives += 1
                nonempty_neg += bool(mask.any())
        assert row["tune_kaggle_dice"] == pytest.approx(scores.summary()["kaggle_dice"], abs=1e-9), row
        assert row["tune_nonempty_negatives"] == pytest.approx(nonempty_neg / negatives), row


@pytest.mark.slow
def test_tune_end_to_end_walks_as_the_pseudo_stage_and_is_cached(cli, synthetic_dataset, tmp_path):
    """`wss tune` on a tiny binary chain: its walk at the config's settings scores the tuning
    images as the pseudo stage's own labels do; the overlay layers over the config; a second call
    reuses the cached search."""
    from stages.common.scoring import score_label_files
    from tests.test_run_chain import FAST_CHAIN

    root = tmp_path / "data"
    shutil.copytree(synthetic_dataset(n=32, size=64, variant="binary"), root)
    dataset = PreparedDataset(root)
    tune_ids = [i for i in dataset.split("train") if dataset.label_vector(i).any()][:4]
    (root / "splits" / "tune.txt").write_text("\n".join(tune_ids) + "\n")
    values = {**FAST_CHAIN, "data.root": root, "run.workdir": tmp_path / "runs", "data.tune_split": "tune"}
    values["seg.checkpoint"] = "pseudo_holdout"
    args = ["-c", "configs/demo.yaml", *[a for k, v in values.items() for a in ("-o", f"{k}={v}")]]
    params = ["--params", "irn.beta=5,10", "--params", "irn.refine_crf=false", "--params", "seg.min_area=0,8"]
    out = tmp_path / "tuned.yaml"
    result = cli("tune", *args, *params, "--out", out)
    assert result.exit_code == 0, result.output + str(result.exception)
    assert "tune (ran)" in result.output and out.is_file()
    text = out.read_text()
    assert all(i in text for i in tune_ids) and "no mask read" in text
    tuned = load_config([Path("configs/demo.yaml"), out], [f"data.root={root}"])
    assert tuned.seg.min_area in (0, 8) and tuned.irn.beta in (5.0, 10.0)

    (artifact,) = (tmp_path / "runs" / "synthetic-binary").glob("tune-*")
    rows = json.loads((artifact / "rows.json").read_text())
    cfg = load_config([Path("configs/demo.yaml")], [f"{k}={v}" for k, v in values.items()])
    (pseudo,) = (tmp_path / "runs" / "synthetic-binary").glob("pseudo-*")
    walk = [
        r
        for r in rows["walk"]
        if r["irn.beta"] == cfg.irn.beta
        and r["irn.sem_seg_bg_threshold"] == pytest.approx(cfg.irn.sem_seg_bg_threshold)
    ]
    assert len(walk) == 1  # the config's own values are on the default grid
    stage = score_label_files(dataset, tune_ids, pseudo / "pseudo_labels", "")
    assert walk[0]["miou"] == pytest.approx(stage["miou"], abs=1e-9)
    again = cli("tune", *args, *params, "--out", out)
    assert again.exit_code == 0 and "tune (cached)" in again.output


def test_the_rule_is_not_chosen_on_one_label_alone():
    """Balanced accuracy over negatives alone is won by emptying every mask: no choice then."""
    from pipeline.tune import missing_labels

    nan = float("nan")
    assert missing_labels([{"nonempty_positives": nan, "nonempty_negatives": 0.0}]) == "positive"
    assert missing_labels([{"nonempty_positives": 1.0, "nonempty_negatives": nan}]) == "negative"
    assert missing_labels([{"nonempty_positives": 1.0, "nonempty_negatives": 0.5}]) is None
    assert missing_labels([]) == "labelled"
