"""Stage `cam`: train the classifier, score it, write the CAMs of the train split."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from data.datasets import ClassificationDataset, SafeImageDataset
from data.layout import PreparedDataset, write_json_atomic
from data.transforms import normalize_batch, uint8_tensor
from stages.base import Stage, StageResult, section_dict, weights_file_stamp
from stages.cam.config import other_methods_settings
from stages.cam.infer import write_cam_files
from stages.cam.localization import BOXED_CAMS, boxed_images, localization_metrics
from stages.cam.methods import build_cam_net
from stages.cam.model_file import MODEL_FILE, read_cam_model
from stages.cam.scoring import score_cams
from stages.common import distributed
from stages.common.metrics import classification_scores
from stages.common.model_files import load_weights, write_model_file
from stages.common.runtime import image_loader, progress, resolve_device, seed_everything, worker_count
from stages.common.scoring import scored_ids
from stages.common.tables import per_class_table
from stages.common.training import CHECKPOINT, fit, reuse_trained, train_settings, unused_training_settings

log = logging.getLogger("wss.cam")


def cam_ids(cfg, dataset: PreparedDataset, artifact: Path) -> list[str]:
    """The train-split images the artifact has a CAM file for."""
    return [i for i in dataset.split(cfg.data.train_split) if (artifact / "cams" / f"{i}.npz").is_file()]


class CamStage(Stage):
    name = "cam"
    section = "cam"
    resume_files = (CHECKPOINT,)
    resume_outputs = ("cams", BOXED_CAMS)  # written whole, kept by --resume
    # Only scores the CAMs: left out of the key, so that a new threshold re-scores the cached
    # CAMs (Pipeline.rescored) instead of retraining stage 1 and everything after it.
    score_settings = ("eval_bg_threshold",)
    # classification AUC / AP only: another val split re-scores the model; the tuning split's images
    # are left out of the CAM scores
    score_splits = ("val_split", "tune_split")

    def inference_settings(self, cfg) -> tuple[str, ...]:
        """Used only after training: a new value reuses the classifier of an artifact trained with
        the same settings (Pipeline.trained_twin) and runs inference again."""
        return ("extract", "scales", "flip")

    def key_config(self, cfg, task: str) -> dict:
        skip = set(self.score_settings) | other_methods_settings(cfg.cam) | unused_training_settings(cfg.cam)
        return {**section_dict(cfg.cam, skip=skip), "weights_file": weights_file_stamp(cfg.cam.weights)}

    def preflight(self, cfg, dataset: PreparedDataset) -> None:
        """cam.weights is read as a trunk of cam.backbone before any stage computes: a source
        that is missing, garbled, another network's or of another depth stops the run here in one
        line, and ImageNet weights are downloaded into torch's cache now (offline: they fail now,
        not after other stages)."""
        from stages.common.trunk_weights import read_trunk

        read_trunk(cfg.cam.weights, cfg.cam.backbone, setting="cam.weights", depth_setting="cam.backbone")

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
        section = cfg.cam
        seed_everything(cfg.run.seed)
        device = resolve_device(cfg.run.device)
        train_ids = dataset.split(cfg.data.train_split)[:limit]
        val_ids = dataset.split(cfg.data.val_split)[:limit]
        log.info(
            "cam: %s/%s on %d train images (%s), device %s",
            section.method,
            section.backbone,
            len(train_ids),
            dataset.name,
            device,
        )

        dataset.check_images_open(train_ids)
        twin = inputs.get("trained")
        if twin is None:
            if (section.freeze_bn or section.frozen_stages >= 0) and not section.weights:
                log.warning(
                    "cam: frozen_stages / freeze_bn keep parts of a randomly initialised trunk as "
                    "they are (cam.weights is null): they are meant for pretrained weights"
                )
            model = build_cam_net(section, dataset.info.num_classes)
            train_set = ClassificationDataset(dataset, train_ids, section.resize_long, section.crop_size, cfg.run.seed)
            history = fit(
                model,
                train_set,
                model.param_groups(section.head_lr_mult),
                lambda net, b: model.loss(net(normalize_batch(b["image"])), b["label"]),
                train_settings(section, cfg.run),
                device,
                out,
                resume=resume,
                desc="cam",
            )
        else:
            model = build_cam_net(section, dataset.info.num_classes, weights=None)
            history = reuse_trained(model, Path(twin), MODEL_FILE, out, "cam")
            model.to(device)
        if distributed.is_main():
            write_model_file(
                out / MODEL_FILE, "cam", model, {"config": section_dict(section), "classes": list(dataset.classes)}
            )
        model = model.to(memory_format=torch.contiguous_format).eval()

        metrics = {"train_images_per_s": float(np.mean([h["images_per_s"] for h in history])) if history else 0.0}
        failures: list[str] = []
        metrics.update(self.classify_split(model, dataset, val_ids, device, cfg.run.workers, failures))
        failures += self.write_cams(
            model, section, dataset, distributed.shard(train_ids), out / "cams", device, cfg.run.workers
        )
        boxed = list(boxed_images(dataset))[:limit]  # NIH: held-out images with boxes, for localization
        if boxed:
            failures += self.write_cams(
                model, section, dataset, distributed.shard(boxed), out / BOXED_CAMS, device, cfg.run.workers
            )
        failures = distributed.all_ranks_list(failures)  # also waits until every rank wrote its CAMs
        if distributed.is_main():
            scored = scored_ids(dataset, train_ids, cfg.data.tune_split)
            metrics.update(score_cams(dataset, scored, out / "cams", section.eval_bg_threshold, failures, points=True))
            metrics.update(localization_metrics(dataset, boxed, out / BOXED_CAMS))
            write_json_atomic(out / "metrics.json", metrics)
            log.info("cam metrics on split %r:\n%s", cfg.data.train_split, per_class_table(metrics, "cam_", dataset))
        metrics = distributed.broadcast(metrics)
        return StageResult(metrics=metrics, headline=headline_metric(metrics), failures=failures)

    def rescore(
        self, cfg, dataset: PreparedDataset, artifact: Path, metrics: dict, scored_with: dict, limit: int | None = None
    ) -> dict:
        """The run's metrics with the CAM scores recomputed at the current threshold (localization
        recomputed with them, as it also goes by the `cam_` prefix), and the classification scores
        with the saved model when the val split is another."""
        metrics = {
            **{k: v for k, v in metrics.items() if not k.startswith("cam_")},
            **self.evaluate(cfg, dataset, artifact),
        }
        if scored_with.get("data.val_split") != cfg.data.val_split:
            device = resolve_device(cfg.run.device)
            model = build_cam_net(cfg.cam, dataset.info.num_classes, weights=None)
            load_weights(model, read_cam_model(artifact).tensors, artifact / MODEL_FILE, "cam model", "cam")
            model = model.to(device).eval()
            val_ids = dataset.split(cfg.data.val_split)[:limit]
            metrics = {
                **{k: v for k, v in metrics.items() if not k.startswith("cls_")},
                **self.classify_split(model, dataset, val_ids, device, cfg.run.workers, whole=True),
            }
        return metrics

    def evaluate(self, cfg, dataset: PreparedDataset, artifact: Path) -> dict:
        ids = scored_ids(dataset, cam_ids(cfg, dataset, artifact), cfg.data.tune_split)
        metrics = score_cams(dataset, ids, artifact / "cams", cfg.cam.eval_bg_threshold, points=True)
        metrics.update(localization_metrics(dataset, list(boxed_images(dataset)), artifact / BOXED_CAMS))
        return metrics

    @torch.no_grad()
    def classify_split(
        self,
        model,
        dataset: PreparedDataset,
        ids: list[str],
        device,
        workers: int,
        failures: list[str] | None = None,
        whole: bool = False,
    ) -> dict:
        """Image-level AUC / AP on a split, whole images at scale 1. Unreadable images are
        skipped and listed in `failures`. Under torchrun each rank scores its share, unless
        `whole` (one process re-scoring alone)."""
        scores, targets = [], []
        share = ids if whole else distributed.shard(ids)
        loader = image_loader(SafeImageDataset(dataset, share), min(2, worker_count(workers)))
        for item in progress(loader, desc="cam classify val", unit="img", leave=False):
            if "error" in item:
                log.warning("cam: skipped %s", item["error"])
                if failures is not None:
                    failures.append(item["error"])
                continue
            x = normalize_batch(uint8_tensor(item["image"])[None].to(device))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(x)["logits"].float()
            scores.append(torch.sigmoid(logits)[0].cpu().numpy())
            targets.append(dataset.label_vector(item["id"]))
        if not whole:
            scores, targets = distributed.all_ranks_list(scores), distributed.all_ranks_list(targets)
        if not scores:
            return {}
        result = classification_scores(np.stack(scores), np.stack(targets), dataset.classes, prefix="cls_")
        return {k: float(v) for k, v in result.items()}

    def write_cams(
        self, model, section, dataset: PreparedDataset, ids: list[str], cam_dir: Path, device, workers: int
    ) -> list[str]:
        failures = write_cam_files(model, section, dataset, ids, cam_dir, device, worker_count(workers))
        for failure in failures:
            log.warning("cam: skipped %s", failure)
        return failures


def headline_metric(metrics: dict) -> str:
    """CAM mIoU where the train split has masks; point localization where only boxes score the
    CAMs (NIH)."""
    if "cam_miou" not in metrics and "cam_point_accuracy" in metrics:
        return "cam_point_accuracy"
    return "cam_miou"
