"""Stage `irn`: seeds from the CAMs (CRF), then the boundary network trained on their affinities.

The artifact holds `seeds/<id>.png` (0 background, k+1 class k, 255 ignored), `model.safetensors` and
`metrics.json` (seed mIoU ignoring 255, seed coverage). Pseudo-labels are a separate stage
(stages/irn/pseudo.py) so that their thresholds can change without retraining.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import torch

from data.datasets import LabelMapDataset
from data.errors import WssError
from data.layout import PreparedDataset, write_index_png, write_json_atomic
from data.parallel import parallel_map
from data.transforms import normalize_batch
from stages.base import Stage, StageInputError, StageResult, weights_file_stamp
from stages.cam.infer import CAM_STRIDE, load_cam, upsample_cam
from stages.common import distributed
from stages.common.crf import CrfParams, resolve_backend
from stages.common.model_files import write_model_file
from stages.common.runtime import resolve_device, seed_everything, worker_count
from stages.common.scoring import replace_scores, score_label_files, scored_ids
from stages.common.training import CHECKPOINT, fit, train_settings
from stages.irn.affinity import affinity_labels, affinity_loss, edge_to_affinity
from stages.irn.config import IrnConfig
from stages.irn.label_files import usable_label
from stages.irn.net import MODEL_FILE, BoundaryNet, build_backbone
from stages.irn.resident import LOADER_WORKERS, on_device, write_seeds_on_device
from stages.irn.seeds import make_seeds
from stages.irn.settings import irn_fields

log = logging.getLogger("wss.irn")


def training_ids(dataset: PreparedDataset, ids: list[str], positive_only: bool) -> list[str]:
    """The seeded images the IRN trains on: not those with an uncertain class (their seeds come
    from the certain classes' CAMs alone, and would teach that class's region as background)."""
    ids = [i for i in ids if not dataset.has_uncertain(i)]
    if not positive_only:
        return ids
    return [i for i in ids if dataset.label_vector(i).any()]


def single_threaded_worker() -> None:
    """Worker processes share the cores: one torch thread each, no oversubscription."""
    torch.set_num_threads(1)


def write_seed(
    image_id: str,
    root: str,
    cam_dir: str,
    seed_dir: str,
    fg: float,
    bg: float,
    crf: CrfParams | None,
) -> tuple[str, str | None]:
    """One image's seeds (runs in a worker process); returns (id, error message or None)."""
    try:
        dataset = PreparedDataset(root)
        cam_path = Path(cam_dir) / f"{image_id}.npz"
        if not cam_path.is_file():
            return image_id, f"{image_id}: no CAM file {cam_path}"
        cam, keys, size = load_cam(cam_path)
        image = dataset.read_image(image_id) if crf is not None and len(keys) else None
        seeds = make_seeds(upsample_cam(cam, size), keys, image, fg, bg, crf)
        write_index_png(Path(seed_dir) / f"{image_id}.png", seeds, dataset.info.palette)
        return image_id, None
    except Exception as error:  # one bad image (or CRF failure) must not stop the others
        return image_id, f"{image_id}: {type(error).__name__}: {error}"


def fitting_batch(batch_size: int, images: int) -> int:
    """The batch for `images` seeded images (fewer than `batch_size` after --limit or
    positive_only): all of them, down to a multiple of the process count under torchrun, as
    per_process_batch needs; the configured batch itself must split (checked there)."""
    if images >= batch_size:
        return batch_size
    world = distributed.world_size()
    return max(world, images - images % world)


def affinity_step(radius: int):
    def step(model: BoundaryNet, batch: dict) -> tuple[torch.Tensor, dict]:
        edge = torch.sigmoid(model(normalize_batch(batch["image"])).float())
        label = batch["label"]
        if edge.shape[-2:] != label.shape[-2:]:
            raise WssError(
                f"irn: boundary map {tuple(edge.shape[-2:])} and stride-4 seeds "
                f"{tuple(label.shape[-2:])} differ; irn.crop_size must be a multiple of 4"
            )
        aff = edge_to_affinity(edge, radius)
        bg_pos, fg_pos, neg = affinity_labels(label, radius, dtype=torch.bool)
        loss = affinity_loss(aff, bg_pos, fg_pos, neg)
        return loss.total, {"bg_pos": loss.bg_pos.detach(), "fg_pos": loss.fg_pos.detach(), "neg": loss.neg.detach()}

    return step


class IrnStage(Stage):
    name = "irn"
    needs = ("cam",)
    section = "irn"
    resume_files = (CHECKPOINT,)
    resume_outputs = ("seeds",)  # kept by --resume (a garbled one is made again)
    score_splits = ("tune_split",)  # its images are left out of the seed scores

    def key_config(self, cfg, task: str) -> dict:
        fields = irn_fields(cfg.irn, pseudo=False, run_device=cfg.run.device)
        if cfg.irn.backbone_init not in ("cam", "imagenet", "none"):  # a local trunk source
            fields["backbone_init_file"] = weights_file_stamp(cfg.irn.backbone_init)
        return fields

    def preflight(self, cfg, dataset: PreparedDataset) -> None:
        """`backbone_init: imagenet` or a local source loads its weights into the trunk before any
        stage computes (imagenet: downloaded once into torch's cache when online, or the local file
        of cam.weights): offline, or with a file that is missing, garbled, another network's or of
        another depth, it fails here, not after the classifier."""
        if cfg.irn.backbone_init not in ("cam", "imagenet", "none"):  # a cam artifact, a checkpoint
            from stages.common.trunk_weights import read_trunk

            read_trunk(
                cfg.irn.backbone_init, cfg.cam.backbone, setting="irn.backbone_init", depth_setting="cam.backbone"
            )
        if cfg.irn.backbone_init != "imagenet":
            return
        from stages.common.backbones import ResNetFeatures, WeightsError

        try:
            ResNetFeatures(cfg.cam.backbone, cfg.cam.weights or "imagenet")
        except WeightsError as error:
            raise WeightsError(
                f"irn.backbone_init: imagenet: {error} The IRN's trunk reads the file of "
                f"cam.weights (setting it retrains the classifier); irn.backbone_init: cam "
                f"needs no download."
            ) from None

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
        section = cfg.irn
        seed_everything(cfg.run.seed)
        device = resolve_device(cfg.run.device)
        ids = dataset.split(cfg.data.train_split)[:limit]
        cam_dir = inputs["cam"] / "cams"
        seed_dir = out / "seeds"
        seed_dir.mkdir(parents=True, exist_ok=True)

        failures = self.write_seeds(
            dataset, distributed.shard(ids), cam_dir, seed_dir, section, cfg.run.workers, device
        )
        failures = distributed.all_ranks_list(failures)  # also waits until every rank wrote its seeds
        seeded = [i for i in ids if (seed_dir / f"{i}.png").is_file()]
        train_ids = training_ids(dataset, seeded, section.positive_only)
        if not train_ids:
            raise StageInputError(
                f"irn: no image of split {cfg.data.train_split!r} got seeds "
                f"({len(failures)} failures, first: {failures[:1]})"
            )
        metrics = {}
        if distributed.is_main():
            scored = scored_ids(dataset, seeded, cfg.data.tune_split)
            metrics = score_label_files(dataset, scored, seed_dir, "seed_", ignore_unlabelled=True, failures=failures)
        metrics = distributed.broadcast(metrics)
        log.info(
            "irn: seeds for %d images (mIoU %.4f ignoring 255, coverage %.3f); training on %d",
            len(seeded),
            metrics.get("seed_miou", float("nan")),
            metrics.get("seed_coverage", float("nan")),
            len(train_ids),
        )

        cam_backbone = cfg.cam.backbone  # the cam artifact is current for this config, so it is this trunk
        backbone = build_backbone(cam_backbone, section.backbone_init, inputs["cam"], cfg.cam.weights)
        model = BoundaryNet(backbone, section.freeze_backbone)
        if section.crop_size % CAM_STRIDE:
            raise WssError(f"irn.crop_size must be a multiple of {CAM_STRIDE}, got {section.crop_size}")
        train_set = LabelMapDataset(
            dataset, train_ids, seed_dir, section.resize_long, section.crop_size, cfg.run.seed, label_stride=CAM_STRIDE
        )
        settings = train_settings(section, cfg.run, batch_size=fitting_batch(section.batch_size, len(train_ids)))
        history = fit(
            model,
            train_set,
            model.param_groups(section.head_lr_mult),
            affinity_step(section.radius),
            settings,
            device,
            out,
            resume=resume,
            desc="irn",
        )
        if history:
            metrics["irn_final_loss"] = float(history[-1]["loss"])
            metrics["train_images_per_s"] = float(np.mean([h["images_per_s"] for h in history]))
        if distributed.is_main():
            write_model_file(
                out / MODEL_FILE,
                "irn",
                model.to(memory_format=torch.contiguous_format),
                {"backbone": cam_backbone, "config": irn_fields(section, pseudo=False, run_device=cfg.run.device)},
            )
            write_json_atomic(out / "metrics.json", metrics)
        metrics = distributed.broadcast(metrics)
        return StageResult(metrics=metrics, headline="seed_miou", failures=failures)

    def write_seeds(
        self,
        dataset: PreparedDataset,
        ids: list[str],
        cam_dir: Path,
        seed_dir: Path,
        section: IrnConfig,
        workers: int,
        device: torch.device,
    ) -> list[str]:
        """The seed PNGs of `ids`; the failures. The seed CRF runs on the backend `crf.backend`
        resolves to on `device`: with torch (or without a CRF on a CUDA device) the seeds are
        made on the device (stages/irn/resident.py), with pydensecrf in spawned worker processes."""
        if not cam_dir.is_dir():
            raise StageInputError(f"irn: the cam artifact has no cams/ directory ({cam_dir})")
        crf = None
        if section.use_crf:
            crf = section.crf.model_copy(update={"backend": resolve_backend(section.crf.backend, device)})
        todo = [i for i in ids if not usable_label(dataset, i, seed_dir, "irn")]
        if on_device(device, crf):
            fg, bg = section.conf_fg_threshold, section.conf_bg_threshold
            loaders = min(LOADER_WORKERS, worker_count(workers))
            return write_seeds_on_device(dataset, todo, cam_dir, seed_dir, fg, bg, crf, device, loaders)
        job = functools.partial(
            write_seed,
            root=str(dataset.root),
            cam_dir=str(cam_dir),
            seed_dir=str(seed_dir),
            fg=section.conf_fg_threshold,
            bg=section.conf_bg_threshold,
            crf=crf,
        )
        failures = []
        for image_id, error in parallel_map(
            job,
            todo,
            worker_count(workers),
            distributed.is_main(),
            "irn seeds",
            start_method="spawn",
            initializer=single_threaded_worker,
        ):
            if error:
                failures.append(error)
                log.warning("irn: skipped %s", error)
        return failures

    def evaluate(self, cfg, dataset: PreparedDataset, artifact: Path) -> dict:
        ids = scored_ids(dataset, dataset.split(cfg.data.train_split), cfg.data.tune_split)
        return score_label_files(dataset, ids, artifact / "seeds", "seed_", ignore_unlabelled=True)

    def rescore(self, cfg, dataset, artifact: Path, metrics: dict, scored_with: dict, limit=None) -> dict:
        """The seed scores again, with the current tuning split left out."""
        return replace_scores(metrics, ("seed_",), self.evaluate(cfg, dataset, artifact))
