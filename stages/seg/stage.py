"""Stage `seg`: train an smp segmenter on the pseudo-labels, predict and score val and train.

Ground truth is read only after training, to score the finished model. The checkpoint is the
last epoch, or (`checkpoint: pseudo_holdout`) the epoch that best fits the pseudo-labels of a
held-out part of the train split.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from data.datasets import SafeImageDataset
from data.layout import PreparedDataset, write_index_png, write_json_atomic
from data.transforms import normalize_batch, resize_long
from stages.base import Stage, StageInputError, StageResult, section_dict, weights_file_stamp
from stages.common import distributed
from stages.common.model_files import FileRefused, read_state_file, refusal, weights_problem, write_state_file
from stages.common.runtime import image_loader, progress, resolve_device, seed_everything, worker_count
from stages.common.scoring import SegmentationScorer, replace_scores, score_label_files, scored_ids
from stages.common.tables import per_class_table
from stages.common.training import CHECKPOINT, fit, reuse_trained, train_settings, unused_training_settings
from stages.seg.data import PseudoLabelDataset, pseudo_label_items, read_pseudo_label
from stages.seg.holdout import split_holdout
from stages.seg.losses import SegLoss
from stages.seg.model import (
    MODEL_FILE,
    SegModelError,
    build_segmenter,
    inference_long_side,
    input_multiple,
    load_cam_encoder,
    output_channels,
    predict_probabilities,
    probabilities_to_mask,
    save_segmenter,
)
from stages.seg.postprocess import ClassifierScore, EmptyMaskRule

RULE_SETTINGS = ("min_area", "image_threshold", "image_score")  # the empty-mask rule, binary tasks only

log = logging.getLogger("wss.seg")
PREDICTIONS = "predictions"
IMAGE_SCORES = "image_scores.json"  # binary: each image's score under seg.image_score (for AUC)
HOLDOUT_FILE = "holdout_best.safetensors"


class SegStage(Stage):
    name = "seg"
    needs = ("cam", "pseudo")  # cam: for `encoder_weights: cam`
    splits = ("train_split", "val_split")  # trained on train, predicts val too
    section = "seg"
    resume_files = (CHECKPOINT, HOLDOUT_FILE)  # the held-out scores of the epochs trained so far
    score_splits = ("tune_split",)  # its images are left out of the val and train scores

    def key_config(self, cfg, task: str) -> dict:
        section = cfg.seg
        unused = unused_training_settings(section)
        if section.checkpoint == "last":
            unused.add("holdout_fraction")
        if task != "binary":
            unused.update(("threshold", *RULE_SETTINGS))  # multiclass takes the argmax
        return {**section_dict(section, skip=unused), "weights_file": weights_file_stamp(section.encoder_weights)}

    def inference_settings(self, cfg) -> tuple[str, ...]:
        """Used only after training (to predict): a new value reuses the segmenter of an artifact
        trained with the same settings (Pipeline.trained_twin). The val split and the empty-mask
        rule always (the held-out part comes from train, and the checkpoint choice does not apply
        the rule); threshold and predict_size not under pseudo_holdout, whose checkpoint choice
        predicts with them."""
        if cfg.seg.checkpoint == "last":
            return ("threshold", "predict_size", *RULE_SETTINGS, "data.val_split")
        return (*RULE_SETTINGS, "data.val_split")

    def preflight(self, cfg, dataset: PreparedDataset) -> None:
        """Architecture, encoder, options and loss names exist; the crop fits the model; the encoder
        weights load into the encoder (a local file is read now; ImageNet weights are downloaded
        into the hub's cache). seg.predict_size needs no check: prediction pads to a multiple of 32,
        which every smp output stride (8, 16, 32) divides."""
        section = cfg.seg
        SegLoss(section.losses, dataset.task)
        model = build_segmenter(
            section.arch,
            section.encoder,
            None,
            output_channels(dataset.task, dataset.info.num_classes),
            section.arch_options,
        )
        check_crop_size(section, input_multiple(model))
        if section.encoder_weights == "cam" and section.encoder != cfg.cam.backbone:
            raise SegModelError(
                f"seg.encoder_weights: cam needs seg.encoder to be the classifier's backbone "
                f"(cam.backbone {cfg.cam.backbone}), got {section.encoder}"
            )
        if (
            section.encoder_weights not in (None, "imagenet", "cam")
            and not Path(section.encoder_weights).expanduser().exists()  # a file, or a cam artifact's folder
        ):
            raise SegModelError(f"seg.encoder_weights: file not found: {section.encoder_weights}")
        if section.encoder_weights not in (None, "cam"):  # a garbled file, another encoder's; offline
            build_segmenter(
                section.arch,
                section.encoder,
                section.encoder_weights,
                output_channels(dataset.task, dataset.info.num_classes),
                section.arch_options,
            )

    def run(
        self,
        cfg,
        dataset: PreparedDataset,
        inputs: dict[str, Path],
        out: Path,
        *,
        resume: bool = False,
        limit: int | None = None,
    ) -> StageResult:
        section = cfg.seg
        seed_everything(cfg.run.seed)
        device = resolve_device(cfg.run.device)
        label_dir = Path(inputs["pseudo"]) / "pseudo_labels"
        if not label_dir.is_dir():
            raise StageInputError(f"seg: the pseudo artifact has no pseudo_labels/ folder: {label_dir}")
        train_ids = dataset.split(cfg.data.train_split)[:limit]
        val_ids = dataset.split(cfg.data.val_split)[:limit]
        items, failures = pseudo_label_items(dataset, train_ids, label_dir)
        if not items:
            raise StageInputError(f"seg: none of the {len(train_ids)} train images has a pseudo-label in {label_dir}")
        holdout = []
        if section.checkpoint == "pseudo_holdout":
            items, holdout = split_holdout(items, section.holdout_fraction, cfg.run.seed)
        log.info(
            "seg: %s/%s (%s) on %d images with pseudo-labels (%d held out, %d skipped), device %s",
            section.arch,
            section.encoder,
            dataset.task,
            len(items),
            len(holdout),
            len(failures),
            device,
        )

        twin = inputs.get("trained")
        model = build_segmenter(
            section.arch,
            section.encoder,
            None if twin else section.encoder_weights,
            output_channels(dataset.task, dataset.info.num_classes),
            section.arch_options,
        )
        tracker = None
        if twin is not None:  # trained with these settings before: only predict again
            history = reuse_trained(model, Path(twin), MODEL_FILE, out, "seg")
            model.to(device)
            if device.type == "cuda":  # as fit leaves it, and as predict_probabilities feeds it
                model.to(memory_format=torch.channels_last)
        else:
            if section.encoder_weights == "cam":
                load_cam_encoder(model, inputs["cam"], section.encoder)
            train_set = PseudoLabelDataset(dataset, items, section.resize_long, section.crop_size, cfg.run.seed)
            if holdout and distributed.is_main():  # under torchrun rank 0 scores the epochs and chooses
                tracker = HoldoutTracker(model, dataset, holdout, section, device, out / HOLDOUT_FILE)
                train_set.on_new_epoch = lambda epoch: tracker.score_epoch(epoch - 1)
            loss = SegLoss(section.losses, dataset.task)
            history = fit(
                model,
                train_set,
                [(list(model.parameters()), 1.0)],
                lambda m, batch: loss(m(normalize_batch(batch["image"])), batch["label"].long()),
                train_settings(section, cfg.run),
                device,
                out,
                resume=resume,
                desc="seg",
            )
        metrics = {
            "train_images_per_s": float(np.mean([h["images_per_s"] for h in history])) if history else 0.0,
            "seg_trained_images": len(items),
            "seg_skipped_images": len(failures),
        }
        if tracker is not None:
            tracker.score_epoch(section.epochs - 1)
            metrics.update(tracker.choose(model))
        elif twin is not None:  # the epoch the twin chose on its held-out part, which is this one's
            metrics.update(holdout_choice(Path(twin)))
        rule = EmptyMaskRule.of(section) if dataset.task == "binary" else None
        classifier = ClassifierScore(inputs["cam"], device) if rule is not None and rule.reads_classifier else None
        distributed.sync_module(model)  # every rank predicts with the weights rank 0 chose
        model.eval()  # still channels_last on CUDA, as predict_probabilities feeds it
        if distributed.is_main():
            save_segmenter(model, out / MODEL_FILE, section, dataset.info)

        # Only now, with the model fixed, is the ground truth read: to score it.
        for split, ids in (("val", val_ids), ("train", train_ids)):
            split_metrics, split_failures = self.predict_split(
                model, section, dataset, ids, out, device, cfg.run.workers, split, classifier, cfg.data.tune_split
            )
            metrics.update(split_metrics)
            failures += split_failures
        if distributed.is_main():
            write_json_atomic(out / "metrics.json", metrics)
            log.info("seg metrics on split %r:\n%s", cfg.data.val_split, per_class_table(metrics, "seg_val_", dataset))
        return StageResult(metrics=metrics, headline=headline_metric(dataset.task), failures=failures)

    def evaluate(self, cfg, dataset: PreparedDataset, artifact: Path) -> dict:
        """Re-score the saved predictions of a finished artifact against the masks."""
        metrics = {}
        for split, name in (("val", cfg.data.val_split), ("train", cfg.data.train_split)):
            ids = scored_ids(dataset, dataset.split(name), cfg.data.tune_split)
            metrics.update(score_predictions(dataset, ids, Path(artifact), f"seg_{split}_"))
        return metrics

    def rescore(self, cfg, dataset, artifact: Path, metrics: dict, scored_with: dict, limit=None) -> dict:
        """The val and train scores again, with the current tuning split left out."""
        return replace_scores(metrics, ("seg_val_", "seg_train_"), self.evaluate(cfg, dataset, artifact))

    @torch.no_grad()
    def predict_split(
        self,
        model,
        section,
        dataset: PreparedDataset,
        ids: list[str],
        out: Path,
        device,
        workers: int,
        split: str,
        classifier: ClassifierScore | None = None,
        tune_split: str | None = None,
    ) -> tuple[dict, list[str]]:
        """Predict whole images (under torchrun, this rank's share) into predictions/<id>.png,
        with the empty-mask rule of a binary task (`classifier`: the stage-1 classifier, for
        seg.image_score cam / mean), then score the split from those files where masks exist,
        the tuning split's images left out."""
        pred_dir = out / PREDICTIONS
        pred_dir.mkdir(parents=True, exist_ok=True)
        image_scores, failures = {}, []
        long_side = inference_long_side(section)
        rule = EmptyMaskRule.of(section)
        loader = image_loader(SafeImageDataset(dataset, distributed.shard(ids)), min(2, worker_count(workers)))
        for item in progress(loader, desc=f"seg predict {split}", unit="img", leave=False):
            if "error" in item:
                failures.append(item["error"])
                log.warning("seg: skipped %s", item["error"])
                continue
            probs = predict_probabilities(model, item["image"], dataset.task, long_side, device)
            pred = probabilities_to_mask(probs, dataset.task, section.threshold)
            if dataset.task == "binary":
                cam_score = classifier(resize_long(item["image"], long_side)) if classifier is not None else None
                score = rule.score(float(probs.max()), cam_score)
                pred = rule.apply(pred, score, long_side)
                image_scores[item["id"]] = score
            write_index_png(pred_dir / f"{item['id']}.png", pred, dataset.info.palette)
        failures = distributed.all_ranks_list(failures)  # also waits until every rank wrote its share
        image_scores = {k: v for part in distributed.gather(image_scores) for k, v in part.items()}
        metrics = {}
        if distributed.is_main():
            if dataset.task == "binary":
                write_json_atomic(out / IMAGE_SCORES, {**read_image_scores(out), **image_scores}, indent=None)
            metrics = score_predictions(dataset, scored_ids(dataset, ids, tune_split), out, f"seg_{split}_", failures)
        return distributed.broadcast(metrics), failures


def read_image_scores(out: Path) -> dict:
    """Image scores a resumed run wrote before (predictions are redone anyway, so an unreadable
    file costs nothing but its entries)."""
    try:
        saved = json.loads((out / IMAGE_SCORES).read_text())
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def check_crop_size(section, multiple: int) -> None:
    """Fail before training, not at its first batch, when smp would refuse the crops."""
    crop = section.crop_size
    if crop % multiple:
        low = crop // multiple * multiple
        nearest = f"{low} or {low + multiple}" if low else f"{multiple}"
        raise SegModelError(
            f"seg.crop_size: {section.arch}/{section.encoder} takes only multiples of {multiple}, "
            f"got {crop}; use {nearest}"
        )


def score_predictions(
    dataset: PreparedDataset, ids: list[str], artifact: Path, prefix: str, failures: list[str] | None = None
) -> dict:
    """Scores of the predictions/<id>.png of `ids` that exist, against the masks that exist. A
    prediction or mask that does not decode, or the two of other sizes, is left out and listed
    in `failures`."""
    return score_label_files(
        dataset, ids, Path(artifact) / PREDICTIONS, prefix, failures=failures, image_scores=read_image_scores(artifact)
    )


def headline_metric(task: str) -> str:
    return "seg_val_kaggle_dice" if task == "binary" else "seg_val_miou"


class HoldoutTracker:
    """Scores each epoch's model on held-out pseudo-labels (mIoU) and keeps the best weights.

    The scores and the best weights live in one file beside the checkpoint, so a resumed run
    still knows the epochs scored before it was interrupted.
    """

    def __init__(self, model, dataset: PreparedDataset, items: list, section, device, path: Path):
        self.model, self.dataset, self.items, self.section = model, dataset, items, section
        self.device, self.path = device, path
        self.state = {"scores": {}, "best_epoch": None, "best_model": None}
        if path.is_file():  # a resumed run: the epochs scored before (an unreadable file: from here on)
            try:
                self.state = read_holdout(path, model)
            except StageInputError as error:
                log.warning("seg: %s; the epochs trained before are not candidates", error)

    @torch.no_grad()
    def score_epoch(self, epoch: int) -> None:
        """Score the model as it is after (0-based) `epoch`; a no-op for an epoch scored before."""
        if epoch in self.state["scores"]:
            return
        was_training = self.model.training
        self.model.eval()
        scorer = SegmentationScorer(self.dataset.classes)
        long_side = inference_long_side(self.section)
        for image_id, path in self.items:
            image = self.dataset.read_image(image_id)
            target = read_pseudo_label(path, image.shape[:2], self.dataset.info.num_classes)
            probs = predict_probabilities(self.model, image, self.dataset.task, long_side, self.device)
            scorer.update(probabilities_to_mask(probs, self.dataset.task, self.section.threshold), target)
        self.model.train(was_training)
        score = scorer.miou()
        best = self.state["best_epoch"]
        self.state["scores"][epoch] = score
        if math.isfinite(score) and (best is None or score > self.state["scores"][best]):
            self.state["best_epoch"] = epoch
            self.state["best_model"] = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        write_holdout(self.path, self.state)
        log.info("seg: epoch %d held-out pseudo-label mIoU %.4f", epoch + 1, score)

    def choose(self, model) -> dict:
        """Load the best epoch's weights into `model`; metrics saying which epoch and how it scored."""
        best = self.state["best_epoch"]
        if best is None:
            log.warning("seg: no epoch had a finite held-out score; keeping the last epoch")
            return {}
        model.load_state_dict(self.state["best_model"])
        return {
            "seg_holdout_epoch": best + 1,
            "seg_holdout_miou": float(self.state["scores"][best]),
            "seg_holdout_images": len(self.items),
        }


def write_holdout(path: Path, state: dict) -> None:
    """The held-out scores ({epoch: mIoU}) and the best epoch's weights, as a safe model file."""
    write_state_file(
        path,
        "holdout",
        state["best_model"] or {},
        {"scores": {str(epoch): score for epoch, score in state["scores"].items()}, "best_epoch": state["best_epoch"]},
    )


def read_holdout(path: Path, model: torch.nn.Module) -> dict:
    """What `write_holdout` wrote, checked (scores per epoch, a best epoch among them whose
    weights fit `model`); StageInputError in one line otherwise."""
    saved = read_state_file(path, "holdout", "held-out scores", None)
    scores, best = saved.meta.get("scores"), saved.meta.get("best_epoch")
    try:
        if not isinstance(scores, dict) or not all(
            k.isdigit() and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in scores.items()
        ):
            raise FileRefused("its scores are not numbers by epoch")
        scores = {int(k): float(v) for k, v in scores.items()}
        if best is not None and (not isinstance(best, int) or isinstance(best, bool) or best not in scores):
            raise FileRefused(f"its best epoch {best!r} was not scored")
        if best is None and saved.tensors:
            raise FileRefused("weights without a best epoch")
        problem = weights_problem(model, saved.tensors) if best is not None else None
        if problem is not None:
            raise FileRefused(f"{problem}: they are of another model")
    except FileRefused as reason:
        raise refusal(path, "held-out scores", str(reason), None) from None
    return {"scores": scores, "best_epoch": best, "best_model": saved.tensors if best is not None else None}


def holdout_choice(artifact: Path) -> dict:
    """The `seg_holdout_*` metrics of a finished artifact (none under checkpoint: last)."""
    try:
        metrics = json.loads((artifact / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in metrics.items() if k.startswith("seg_holdout_")}
