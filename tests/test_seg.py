"""Stage `seg`: training on pseudo-labels, task modes, resume, held-out checkpoint choice, scoring.

The "pseudo" input here is made from the synthetic masks: fine for testing the segmenter
itself, which must never read masks before its model is fixed (checked below).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch

from data.errors import DataError, WssError
from data.layout import IGNORE_INDEX, PreparedDataset, read_index_png, write_index_png
from pipeline.config import load_config
from stages.common.model_files import read_model_file, write_model_file
from stages.common.scoring import SegmentationScorer
from stages.common.training import CHECKPOINT
from stages.seg import stage as seg_stage
from stages.seg.data import PseudoLabelDataset, pseudo_label_items, read_pseudo_label
from stages.seg.losses import LOSSES, SegLoss
from stages.seg.model import MODEL_FILE, SegModelError, build_segmenter, load_segmenter
from stages.seg.stage import HOLDOUT_FILE, SegStage, split_holdout

# Seconds on a CPU: tiny crops, resnet18 from scratch, main-process loading.
FAST_SEG = [
    "seg.arch=Unet",
    "seg.encoder=resnet18",
    "seg.encoder_weights=null",
    "seg.epochs=2",
    "seg.batch_size=4",
    "seg.crop_size=32",
    "seg.resize_long=[32,48]",
    "seg.lr=0.003",
    "seg.losses={ce: 1.0, dice: 0.5}",
    "run.device=cpu",
    "run.workers=0",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_pseudo(root: Path, dest: Path, drop_negatives: bool = False, missing: tuple[str, ...] = ()) -> Path:
    """A stand-in pseudo artifact: the train masks with a 255 border, as pseudo-labels have."""
    dataset = PreparedDataset(root)
    labels = dest / "pseudo_labels"
    labels.mkdir(parents=True)
    for image_id in dataset.split("train"):
        if image_id in missing or (drop_negatives and not dataset.label_vector(image_id).any()):
            continue
        mask = dataset.read_mask(image_id).copy()
        mask[:3] = IGNORE_INDEX
        write_index_png(labels / f"{image_id}.png", mask, dataset.info.palette)
    return dest


def run_seg(root: Path, pseudo: Path, out: Path, *extra: str, resume: bool = False, limit=None):
    cfg = load_config(None, [f"data.root={root}", *FAST_SEG, *extra])
    out.mkdir(parents=True, exist_ok=True)
    result = SegStage().run(cfg, PreparedDataset(root), {"pseudo": pseudo}, out, resume=resume, limit=limit)
    return cfg, result


def smp_iou(pred_dir: Path, dataset: PreparedDataset, ids: list[str]) -> np.ndarray:
    """Per-class IoU over a split from smp's functional metrics (the reference)."""
    classes = dataset.info.num_classes + 1
    preds = torch.stack([torch.from_numpy(read_index_png(pred_dir / f"{i}.png").astype(np.int64)) for i in ids])
    masks = torch.stack([torch.from_numpy(dataset.read_mask(i).astype(np.int64)) for i in ids])
    tp, fp, fn, tn = smp.metrics.get_stats(
        preds, masks, mode="multiclass", num_classes=classes, ignore_index=IGNORE_INDEX
    )
    tp, fp, fn = tp.sum(0).double(), fp.sum(0).double(), fn.sum(0).double()
    return (tp / (tp + fp + fn)).numpy()


@pytest.fixture(scope="module")
def multiclass_run(synthetic_dataset, tmp_path_factory):
    root = synthetic_dataset(n=24, size=64)
    base = tmp_path_factory.mktemp("seg-mc")
    pseudo = make_pseudo(root, base / "pseudo")
    cfg, result = run_seg(
        root, pseudo, base / "out", "seg.epochs=3", "seg.arch_options={decoder_channels: [64, 32, 16, 16, 16]}"
    )
    return root, base / "out", cfg, result


def test_multiclass_end_to_end(multiclass_run):
    root, out, cfg, result = multiclass_run
    dataset = PreparedDataset(root)
    metrics = result.metrics
    assert result.headline == "seg_val_miou" and not result.failures
    assert metrics["seg_trained_images"] == len(dataset.split("train"))
    for split in ["val", "train"]:
        ids = dataset.split(split)
        assert metrics[f"seg_{split}_scored_images"] == len(ids)
        assert 0 <= metrics[f"seg_{split}_miou"] <= 1
        for name in ["background", *dataset.classes]:
            assert f"seg_{split}_iou/{name}" in metrics
        for image_id in ids:  # whole-image predictions, palette PNGs of class indices
            pred = read_index_png(out / "predictions" / f"{image_id}.png")
            assert pred.shape == (64, 64) and pred.max() <= 3
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(metrics, nan_ok=True)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and losses[-1] < losses[0]
    model, meta = load_segmenter(out, torch.device("cpu"), dataset.classes, "multiclass")
    assert meta["channels"] == 4 and meta["long_side"] == 40 and meta["palette"] == dataset.info.palette
    assert model.decoder.blocks[-1].conv2[0].out_channels == 16  # rebuilt with its arch_options


def test_scores_agree_with_smp_and_evaluate(multiclass_run):
    root, out, cfg, result = multiclass_run
    dataset = PreparedDataset(root)
    for split in ["val", "train"]:
        reference = smp_iou(out / "predictions", dataset, dataset.split(split))
        ours = [result.metrics[f"seg_{split}_iou/{n}"] for n in ["background", *dataset.classes]]
        np.testing.assert_allclose(ours, reference, rtol=1e-12)
        assert result.metrics[f"seg_{split}_miou"] == pytest.approx(np.nanmean(reference), rel=1e-12)
    again = SegStage().evaluate(cfg, dataset, out)
    assert again == pytest.approx({k: v for k, v in result.metrics.items() if k in again}, nan_ok=True)
    assert "seg_val_miou" in again and "seg_train_miou" in again


def test_binary_end_to_end(synthetic_dataset, tmp_path):
    root = synthetic_dataset(n=24, size=64, variant="binary")
    dataset = PreparedDataset(root)
    train = dataset.split("train")
    positive = [i for i in train if dataset.label_vector(i).any()]
    negatives = [i for i in train if not dataset.label_vector(i).any()]
    assert positive and negatives
    # negatives have no pseudo-label (all background); one positive lost its pseudo-label
    pseudo = make_pseudo(root, tmp_path / "pseudo", drop_negatives=True, missing=(positive[0],))
    cfg, result = run_seg(root, pseudo, tmp_path / "out", "seg.threshold=0.5")
    assert result.headline == "seg_val_kaggle_dice"
    assert len(result.failures) == 1 and positive[0] in result.failures[0]
    assert result.metrics["seg_trained_images"] == len(train) - 1
    for key in ["kaggle_dice", "dice_pos", "iou_pos", "image_auc", "miou", "iou/finding"]:
        assert f"seg_val_{key}" in result.metrics
    model, meta = load_segmenter(tmp_path / "out", torch.device("cpu"))
    assert meta["channels"] == 1 and meta["task"] == "binary"
    # the Kaggle score is the mean per-image Dice, empty vs empty = 1 (smp: zero_division=1)
    val = dataset.split("val")
    preds = torch.stack(
        [torch.from_numpy(read_index_png(tmp_path / "out" / "predictions" / f"{i}.png").astype(np.int64)) for i in val]
    )
    masks = torch.stack([torch.from_numpy(dataset.read_mask(i).astype(np.int64)) for i in val])
    assert set(np.unique(preds.numpy())) <= {0, 1}
    tp, fp, fn, tn = smp.metrics.get_stats(preds[:, None], masks[:, None], mode="binary", threshold=None)
    per_image = smp.metrics.f1_score(tp, fp, fn, tn, reduction="none", zero_division=1.0)
    assert result.metrics["seg_val_kaggle_dice"] == pytest.approx(float(per_image.double().mean()), rel=1e-6)
    again = SegStage().evaluate(cfg, dataset, tmp_path / "out")
    assert again["seg_val_image_auc"] == pytest.approx(result.metrics["seg_val_image_auc"], nan_ok=True)


def test_binary_negative_without_pseudo_label_is_background(synthetic_dataset, tmp_path):
    root = synthetic_dataset(n=24, size=64, variant="binary")
    dataset = PreparedDataset(root)
    pseudo = make_pseudo(root, tmp_path / "p", drop_negatives=True)
    items, failures = pseudo_label_items(dataset, dataset.split("train"), pseudo / "pseudo_labels")
    assert not failures
    negative = [i for i, (image_id, path) in enumerate(items) if path is None]
    assert negative
    sample = PseudoLabelDataset(dataset, items, (64, 64), 64)[negative[0]]
    assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (64, 64, 3)
    assert set(sample["label"].unique().tolist()) == {0}


def test_normalize_batch_matches_the_per_image_normalize():
    """The training steps normalise uint8 batches on the device; inference uses `normalize`."""
    from data.transforms import normalize, normalize_batch

    images = np.random.default_rng(0).integers(0, 256, (3, 17, 23, 3), dtype=np.uint8)
    images[0, 0, :3] = [[0, 0, 0], [255, 255, 255], [128, 64, 32]]
    batch = normalize_batch(torch.from_numpy(images))
    assert batch.shape == (3, 3, 17, 23) and batch.dtype == torch.float32
    for image, normalized in zip(images, batch):
        torch.testing.assert_close(normalized, normalize(image), rtol=0, atol=1e-6)


def test_resume_continues_to_the_same_model(synthetic_dataset, tmp_path, monkeypatch):
    root = synthetic_dataset(n=24, size=64)
    pseudo = make_pseudo(root, tmp_path / "pseudo")
    run_seg(root, pseudo, tmp_path / "straight", limit=8)

    original = PseudoLabelDataset.set_epoch

    def crash_in_second_epoch(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        original(self, epoch)

    monkeypatch.setattr(PseudoLabelDataset, "set_epoch", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_seg(root, pseudo, tmp_path / "resumed", limit=8)
    assert (tmp_path / "resumed" / CHECKPOINT).is_file()
    assert not (tmp_path / "resumed" / MODEL_FILE).exists()
    monkeypatch.setattr(PseudoLabelDataset, "set_epoch", original)
    run_seg(root, pseudo, tmp_path / "resumed", resume=True, limit=8)

    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    straight = read_model_file(tmp_path / "straight" / MODEL_FILE, "seg", "model", "seg").tensors
    resumed = read_model_file(tmp_path / "resumed" / MODEL_FILE, "seg", "model", "seg").tensors
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6)


def test_pseudo_holdout_chooses_by_pseudo_labels_without_masks(synthetic_dataset, tmp_path, monkeypatch):
    root = synthetic_dataset(n=24, size=64)
    pseudo = make_pseudo(root, tmp_path / "pseudo")
    scoring = {"on": False}
    read_mask = PreparedDataset.read_mask
    predict_split = SegStage.predict_split

    def guarded_read_mask(self, image_id, *shape):
        if not scoring["on"]:
            raise AssertionError(f"ground truth of {image_id} read before the model was fixed")
        return read_mask(self, image_id, *shape)

    def scoring_predict_split(self, *args, **kwargs):  # the only place masks may be read
        scoring["on"] = True
        return predict_split(self, *args, **kwargs)

    monkeypatch.setattr(PreparedDataset, "read_mask", guarded_read_mask)
    monkeypatch.setattr(SegStage, "predict_split", scoring_predict_split)
    cfg, result = run_seg(
        root, pseudo, tmp_path / "out", "seg.checkpoint=pseudo_holdout", "seg.holdout_fraction=0.25", "seg.epochs=3"
    )
    state = seg_stage.read_holdout(
        tmp_path / "out" / HOLDOUT_FILE, build_segmenter(cfg.seg.arch, cfg.seg.encoder, None, 4, cfg.seg.arch_options)
    )
    assert sorted(state["scores"]) == [0, 1, 2]
    best = max(state["scores"], key=state["scores"].get)
    assert result.metrics["seg_holdout_epoch"] == best + 1
    assert result.metrics["seg_holdout_miou"] == state["scores"][best]
    assert result.metrics["seg_holdout_images"] == 5  # a quarter of 19 train images
    assert result.metrics["seg_trained_images"] == 14
    saved = read_model_file(tmp_path / "out" / MODEL_FILE, "seg", "model", "seg").tensors
    for key, value in state["best_model"].items():
        assert torch.equal(saved[key], value)


def test_split_holdout_is_seeded_and_disjoint():
    items = [(f"i{k}", None) for k in range(20)]
    train, held = split_holdout(items, 0.1, seed=3)
    assert len(held) == 2 and len(train) == 18 and not set(train) & set(held)
    assert split_holdout(items, 0.1, seed=3) == (train, held)
    with pytest.raises(WssError, match="holdout_fraction"):
        split_holdout(items, 1.5, seed=0)


def test_scorer_agrees_with_smp_on_random_masks():
    rng = np.random.default_rng(0)

    class Info:
        classes = ["a", "b", "c"]
        task = "multiclass"

    scorer = SegmentationScorer.of(Info)
    preds = rng.integers(0, 4, (6, 16, 16))
    targets = rng.integers(0, 4, (6, 16, 16))
    targets[rng.random(targets.shape) < 0.2] = IGNORE_INDEX
    for pred, target in zip(preds, targets):
        scorer.update(pred, target)
    tp, fp, fn, tn = smp.metrics.get_stats(
        torch.from_numpy(preds), torch.from_numpy(targets), mode="multiclass", num_classes=4, ignore_index=IGNORE_INDEX
    )
    reference = smp.metrics.iou_score(tp.sum(0), fp.sum(0), fn.sum(0), tn.sum(0), reduction="none")
    metrics = scorer.metrics("seg_val_")
    np.testing.assert_allclose(
        [metrics[f"seg_val_iou/{n}"] for n in ["background", "a", "b", "c"]], reference.numpy(), rtol=1e-6
    )


def test_scorer_known_answer_binary():
    class Info:
        classes = ["finding"]
        task = "binary"

    scorer = SegmentationScorer.of(Info)
    target = np.zeros((4, 4), np.uint8)
    target[:2, :2] = 1  # 4 pixels
    pred = np.zeros((4, 4), np.uint8)
    pred[:2, :1] = 1  # 2 of them
    scorer.update(pred, target, 0.9)  # Dice 2*2/(2+4) = 2/3
    scorer.update(np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8), 0.1)  # empty vs empty: 1
    scorer.update(np.ones((4, 4), np.uint8), np.zeros((4, 4), np.uint8), 0.8)  # false positive: 0
    metrics = scorer.metrics("seg_val_")
    assert metrics["seg_val_kaggle_dice"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert metrics["seg_val_dice_pos"] == pytest.approx(2 / 3)
    assert metrics["seg_val_image_auc"] == pytest.approx(1.0)
    assert SegmentationScorer.of(Info).metrics("seg_val_") == {"seg_val_scored_images": 0}


@pytest.mark.parametrize("task", ["binary", "multiclass"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_ignore_unlabelled_pixels(task, name):
    """Appending ignored pixels changes no loss; every loss gives finite gradients."""
    torch.manual_seed(0)
    channels = 1 if task == "binary" else 4
    logits = torch.randn(2, channels, 8, 8, requires_grad=True)
    target = torch.randint(0, 2 if task == "binary" else 4, (2, 8, 8))
    target[0, 0] = IGNORE_INDEX
    loss_fn = SegLoss({name: 1.0}, task)
    value, logs = loss_fn(logits, target)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all() and f"loss_{name}" in logs
    padded_logits = torch.cat([logits.detach(), torch.randn(2, channels, 8, 8) * 5], dim=-1)
    padded_target = torch.cat([target, torch.full((2, 8, 8), IGNORE_INDEX)], dim=-1)
    padded, _ = loss_fn(padded_logits, padded_target)
    assert padded.item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6)


def test_cross_entropy_known_answers():
    target = torch.tensor([[[0, 1], [IGNORE_INDEX, 2]]])
    value, _ = SegLoss({"ce": 1.0}, "multiclass")(torch.zeros(1, 4, 2, 2), target)
    assert value.item() == pytest.approx(np.log(4))
    value, _ = SegLoss({"bce": 1.0}, "binary")(torch.zeros(1, 1, 2, 2), torch.tensor([[[0, 1], [1, 255]]]))
    assert value.item() == pytest.approx(np.log(2))
    all_ignored = torch.full((1, 2, 2), IGNORE_INDEX)
    for task, channels in [("multiclass", 4), ("binary", 1)]:
        logits = torch.zeros(1, channels, 2, 2, requires_grad=True)
        value, _ = SegLoss({name: 1.0 for name in LOSSES}, task)(logits, all_ignored)
        assert value.item() == 0.0
        value.backward()  # still a graph: the training step does not break on such a batch
        assert torch.equal(logits.grad, torch.zeros_like(logits))
    diverged = torch.full((1, 4, 2, 2), float("nan"))
    value, _ = SegLoss({"ce": 1.0, "focal": 1.0}, "multiclass")(diverged, target)
    assert torch.isnan(value)  # divergence is not hidden: the training loop stops on it


def test_loss_config_errors():
    with pytest.raises(WssError, match="unknown loss 'tversky'"):
        SegLoss({"tversky": 1.0}, "binary")
    with pytest.raises(WssError, match="at least one loss"):
        SegLoss({"ce": 0.0}, "binary")


def test_encoder_weights_offline_fails_fast(monkeypatch):
    import segmentation_models_pytorch.encoders as encoders

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(encoders, "hf_hub_download", offline)
    with pytest.raises(SegModelError) as error:
        build_segmenter("Unet", "resnet18", "imagenet", 2)
    message = str(error.value)
    assert "smp-hub/resnet18.imagenet" in message and "seg.encoder_weights: /path/to/" in message
    assert "null" in message


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_encoder_weights_from_a_local_file(tmp_path, suffix):
    torch.manual_seed(1)
    source = build_segmenter("Unet", "resnet18", None, 2)
    state = {k: v.contiguous() for k, v in source.encoder.state_dict().items()}
    path = tmp_path / f"encoder{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({**state, "fc.weight": torch.zeros(3, 3)}, path)  # a classifier head is dropped
    torch.manual_seed(2)
    model = build_segmenter("Unet", "resnet18", str(path), 2)
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value)
    with pytest.raises(SegModelError, match="not found"):
        build_segmenter("Unet", "resnet18", str(tmp_path / "missing.pth"), 2)
    with pytest.raises(SegModelError, match="does not fit"):
        build_segmenter("Unet", "resnet34", str(path), 2)


def test_encoder_weights_of_another_depth_are_refused(tmp_path):
    """resnet34's blocks shared with resnet18 have the same shapes: only its extra keys tell."""
    from torchvision import models

    deeper, right = tmp_path / "resnet34.pth", tmp_path / "resnet18.pth"
    torch.save(models.resnet34(weights=None).state_dict(), deeper)
    torch.save(models.resnet18(weights=None).state_dict(), right)  # with its fc.* classifier
    with pytest.raises(SegModelError) as error:
        build_segmenter("Unet", "resnet18", str(deeper), 2)
    message = str(error.value)
    assert str(deeper) in message and "resnet18" in message and "unexpected" in message
    assert "layer1.2." in message and "\n" not in message
    build_segmenter("Unet", "resnet18", str(right), 2)


def test_timm_encoder_weights_from_a_timm_checkpoint(tmp_path):
    """A timm file names the whole network (`conv1.weight`, `fc.*`; EfficientNet's `conv_head`
    and `bn2`, which a features-only encoder leaves out; ConvNeXt's `stages.0`, which it renames
    `stages_0`); smp's `tu-` encoder holds the rest under `model.`. Every encoder tensor comes
    from the file; a deeper network's file is refused."""
    import timm
    from safetensors.torch import save_file

    for name in ("resnet18", "efficientnet_b0", "convnext_atto"):
        torch.manual_seed(3)
        network = timm.create_model(name, pretrained=False)
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(path))
        torch.manual_seed(4)
        loaded = build_segmenter("Unet", f"tu-{name}", str(path), 2).encoder.state_dict()
        source = network.state_dict()
        for key, value in loaded.items():  # `model.` + the key, or with a flattened top module
            inner = key[len("model.") :]
            original = inner if inner in source else inner.replace("_", ".", 1)
            assert torch.equal(value, source[original]), key
    deeper = tmp_path / "resnet34.pth"
    torch.save(timm.create_model("resnet34", pretrained=False).state_dict(), deeper)
    with pytest.raises(SegModelError, match=r"resnet34.pth does not fit encoder tu-resnet18: .*layer1\.2\."):
        build_segmenter("Unet", "tu-resnet18", str(deeper), 2)
    with pytest.raises(SegModelError, match="file not found"):
        build_segmenter("Unet", "tu-resnet18", str(tmp_path / "missing.pth"), 2)


def test_timm_encoder_offline_names_its_hub_repo(monkeypatch):
    import timm.models._builder as builder

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(builder, "load_pretrained", offline)
    with pytest.raises(SegModelError, match="hf download timm/resnet18.a1_in1k model.safetensors"):
        build_segmenter("Unet", "tu-resnet18", "imagenet", 2)


def test_encoder_weights_from_the_stage1_classifier(tmp_path):
    """`encoder_weights: cam`: every trunk tensor of the cam model lands in smp's encoder, and the
    encoder then computes what the classifier's trunk computes up to its (dilated) layer4."""
    from stages.cam.model_file import MODEL_FILE
    from stages.cam.nets import GapNet
    from stages.seg.model import load_cam_encoder

    torch.manual_seed(3)
    classifier = GapNet(3, "resnet18").eval()
    write_model_file(tmp_path / MODEL_FILE, "cam", classifier, {"config": {"backbone": "resnet18"}, "classes": []})
    model = build_segmenter("Unet", "resnet18", "cam", 4).eval()
    load_cam_encoder(model, tmp_path, "resnet18")
    assert torch.equal(model.encoder.conv1.weight, classifier.backbone.stem[0].weight)
    assert torch.equal(model.encoder.bn1.running_var, classifier.backbone.stem[1].running_var)
    assert torch.equal(model.encoder.layer4[1].conv2.weight, classifier.backbone.layer4[1].conv2.weight)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(
            model.encoder(x)[4],
            classifier.backbone.layer3(
                classifier.backbone.layer2(classifier.backbone.layer1(classifier.backbone.stem(x)))
            ),
            atol=1e-5,
        )
    with pytest.raises(SegModelError, match=r"classifier's backbone \(resnet18\), got resnet34"):
        load_cam_encoder(build_segmenter("Unet", "resnet34", "cam", 4), tmp_path, "resnet34")
    with pytest.raises(SegModelError, match=f"has no {MODEL_FILE}"):
        load_cam_encoder(model, tmp_path / "elsewhere", "resnet18")


def test_unknown_arch_or_encoder_is_a_user_error():
    with pytest.raises(SegModelError, match="Wrong architecture"):
        build_segmenter("NoSuchNet", "resnet18", None, 2)
    with pytest.raises(SegModelError, match="Wrong encoder name"):
        build_segmenter("Unet", "no-such-encoder", None, 2)
    with pytest.raises(SegModelError, match="arch_options"):
        build_segmenter("Unet", "resnet18", None, 2, {"no_such_option": 1})


def test_bad_pseudo_labels_name_the_file(tmp_path):
    path = tmp_path / "x.png"
    mask = np.zeros((8, 8), np.uint8)
    mask[0, 0] = 7
    write_index_png(path, mask, [[0, 0, 0], [255, 0, 0]])
    with pytest.raises(DataError, match=r"x\.png.*value 7"):
        read_pseudo_label(path, (8, 8), num_classes=3)
    with pytest.raises(DataError, match=r"x\.png.*8x8 but its image is 16x8"):
        read_pseudo_label(path, (8, 16), num_classes=3)
    mask[0, 0] = IGNORE_INDEX
    write_index_png(path, mask, [[0, 0, 0], [255, 0, 0]])
    assert read_pseudo_label(path, (8, 8), num_classes=1)[0, 0] == IGNORE_INDEX


def test_missing_pseudo_folder_is_an_input_error(synthetic_dataset, tmp_path):
    root = synthetic_dataset(n=24, size=64)
    with pytest.raises(WssError, match="pseudo_labels"):
        run_seg(root, tmp_path / "nothing", tmp_path / "out")
    (tmp_path / "empty" / "pseudo_labels").mkdir(parents=True)
    with pytest.raises(WssError, match="none of the"):
        run_seg(root, tmp_path / "empty", tmp_path / "out")


def test_stage_contract():
    stage = SegStage()
    cfg = load_config(None, FAST_SEG)
    assert stage.name == "seg" and stage.needs == ("cam", "pseudo") and stage.section == "seg"
    assert stage.key_config(cfg, "binary")["encoder"] == "resnet18"


def test_seg_key_leaves_out_settings_that_change_nothing():
    """threshold only cuts binary probabilities, holdout_fraction only serves pseudo_holdout,
    momentum only SGD: another value of an unused one must not retrain the segmenter."""
    stage = SegStage()
    adamw = load_config(None, FAST_SEG + ["seg.optimizer=adamw", "seg.checkpoint=last"])
    key = stage.key_config(adamw, "multiclass")
    assert not {"threshold", "holdout_fraction", "momentum"} & set(key)
    sgd = load_config(None, FAST_SEG + ["seg.optimizer=sgd", "seg.checkpoint=pseudo_holdout"])
    assert {"threshold", "holdout_fraction", "momentum"} <= set(stage.key_config(sgd, "binary"))
    assert len(stage.code_version()) == 16
    assert seg_stage.headline_metric("binary") == "seg_val_kaggle_dice"


@pytest.mark.parametrize(
    "arch, crop, nearest", [("FPN", 48, "32 or 64"), ("UnetPlusPlus", 20, "use 32"), ("DeepLabV3Plus", 40, "32 or 48")]
)
def test_preflight_refuses_a_crop_the_architecture_cannot_take(synthetic_dataset, arch, crop, nearest):
    dataset = PreparedDataset(synthetic_dataset(n=24, size=64))
    cfg = load_config(None, [*FAST_SEG, f"seg.arch={arch}", f"seg.crop_size={crop}"])
    with pytest.raises(SegModelError, match=rf"seg\.crop_size.*{arch}.*{nearest}"):
        SegStage().preflight(cfg, dataset)
    # smp 0.6's Unet states (requires_divisible_input_shape = False) that it takes any size
    SegStage().preflight(load_config(None, [*FAST_SEG, "seg.crop_size=40"]), dataset)


def test_image_scores_cut_short_by_a_kill_are_read_as_none(tmp_path):
    """`--resume` of a binary seg stage killed while writing image_scores.json continues."""
    from stages.seg.stage import IMAGE_SCORES, read_image_scores

    (tmp_path / IMAGE_SCORES).write_text('{"a": 0.5, "b')
    assert read_image_scores(tmp_path) == {}
    (tmp_path / IMAGE_SCORES).write_text('{"a": 0.5}')
    assert read_image_scores(tmp_path) == {"a": 0.5}


def test_bad_pseudo_labels_and_masks_are_listed_and_the_others_used(synthetic_dataset, tmp_path):
    """A pseudo-label that does not decode or fit its image is skipped before training; a mask
    that does not decode or fit is left out of the scores; both are listed, the stage finishes."""
    import shutil

    from PIL import Image

    root = shutil.copytree(synthetic_dataset(n=24, size=64), tmp_path / "data")
    dataset = PreparedDataset(root)
    pseudo = make_pseudo(root, tmp_path / "pseudo")
    train, val = dataset.split("train")[:8], dataset.split("val")[:8]
    labels = [pseudo / "pseudo_labels" / f"{i}.png" for i in train[:3]]
    labels[0].write_bytes(b"garbled")
    labels[1].write_bytes(labels[1].read_bytes()[:70])
    Image.new("P", (32, 64)).save(labels[2])
    masks = [dataset.mask_path(val[0]), dataset.mask_path(val[1])]
    masks[0].write_bytes(b"garbled")
    Image.new("L", (64, 32)).save(masks[1])

    items, skipped = pseudo_label_items(dataset, train, pseudo / "pseudo_labels")
    assert [i for i, _ in items] == train[3:] and [s.split(":")[0] for s in skipped] == [str(p) for p in labels]
    assert "label is 32x64 but its image is 64x64" in skipped[2]

    _, result = run_seg(root, pseudo, tmp_path / "out", "seg.epochs=1", limit=8)
    assert result.metrics["seg_trained_images"] == 5 and result.metrics["seg_skipped_images"] == 3
    assert result.metrics["seg_val_scored_images"] == len(val) - 2 and result.metrics["seg_train_scored_images"] == 8
    assert [f.split(":")[0] for f in result.failures] == [str(p) for p in labels + masks]
    assert "mask is 64x32 but its image is 64x64" in result.failures[-1]
    assert (tmp_path / "out" / MODEL_FILE).is_file()

    (tmp_path / "out" / "predictions" / f"{val[2]}.png").write_bytes(b"garbled")
    cfg = load_config(None, [f"data.root={root}", *FAST_SEG])
    rescored = SegStage().evaluate(cfg, dataset, tmp_path / "out")  # `wss evaluate`
    assert rescored["seg_val_scored_images"] == len(val) - 3
