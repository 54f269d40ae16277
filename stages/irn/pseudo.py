"""Stage `pseudo`: boundary maps from the trained IRN, random walk of the CAMs, pseudo-labels.

Its key holds only the walk and threshold settings (the `pseudo` fields of the irn section) plus
the irn and cam keys, so `wss pseudo-labels -o irn.sem_seg_bg_threshold=0.3` regenerates the
labels from the cached IRN without retraining. Artifact: `pseudo_labels/<id>.png`,
`boundaries/<id>.png` (8-bit, stride 4, for looking at), `metrics.json`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.datasets import SafeImageDataset
from data.layout import PreparedDataset, atomic_save, write_index_png, write_json_atomic
from data.transforms import normalize
from stages.base import Stage, StageInputError, StageResult
from stages.cam.infer import load_cam
from stages.common import distributed
from stages.common.crf import resolve_backend
from stages.common.runtime import image_loader, progress, resolve_device, worker_count
from stages.common.scoring import replace_scores, score_label_files, scored_ids
from stages.irn.crf_pool import CrfPool, planes_to_label
from stages.irn.label_files import usable_label
from stages.irn.net import load_boundary_net
from stages.irn.random_walk import random_walk
from stages.irn.resident import LOADER_WORKERS, on_device, write_pseudo_labels_on_device
from stages.irn.settings import irn_fields
from stages.irn.walk_labels import fit_edge, label_planes
from stages.irn.walk_labels import walk_to_label as walk_to_label  # re-exported for callers of this stage

log = logging.getLogger("wss.pseudo")


class PseudoLabelStage(Stage):
    name = "pseudo"
    needs = ("cam", "irn")
    section = "irn"
    resume_outputs = ("pseudo_labels",)  # kept by --resume (a garbled one is made again)
    score_splits = ("tune_split",)  # its images are left out of the pseudo-label scores

    def key_config(self, cfg, task: str) -> dict:
        return irn_fields(cfg.irn, pseudo=True, run_device=cfg.run.device)

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
        device = resolve_device(cfg.run.device)
        ids = dataset.split(cfg.data.train_split)[:limit]
        cam_dir = inputs["cam"] / "cams"
        if not cam_dir.is_dir():
            raise StageInputError(f"pseudo: the cam artifact has no cams/ directory ({cam_dir})")
        model = load_boundary_net(inputs["irn"], device)
        label_dir, edge_dir = out / "pseudo_labels", out / "boundaries"
        label_dir.mkdir(parents=True, exist_ok=True)
        edge_dir.mkdir(exist_ok=True)
        refine = None
        if section.refine_crf:
            backend = resolve_backend(section.refine_crf_params.backend, device)
            refine = section.refine_crf_params.model_copy(update={"backend": backend})

        # a label is written whole and after its boundary map, so those a resumed run finds are kept
        todo = [i for i in distributed.shard(ids) if not usable_label(dataset, i, label_dir, "pseudo")]
        workers = worker_count(cfg.run.workers)
        if on_device(device, refine):  # torch refinement, or none on a CUDA device: stages/irn/resident.py
            failures, walk_seconds = write_pseudo_labels_on_device(
                model,
                dataset,
                todo,
                cam_dir,
                label_dir,
                edge_dir,
                section,
                refine,
                device,
                min(LOADER_WORKERS, workers),
            )
        else:
            failures, walk_seconds = self.walk_per_image(
                model, dataset, todo, cam_dir, label_dir, edge_dir, section, refine, device, workers
            )

        failures = distributed.all_ranks_list(failures)  # also waits until every rank wrote its labels
        walk_seconds = distributed.all_ranks_list(walk_seconds)
        metrics = {}
        if distributed.is_main():
            scored = scored_ids(dataset, ids, cfg.data.tune_split)
            metrics = score_label_files(dataset, scored, label_dir, "pseudo_", failures=failures)
            metrics["pseudo_images"] = sum(1 for _ in label_dir.glob("*.png"))
            if walk_seconds:
                metrics["walk_seconds_per_image"] = float(np.mean(walk_seconds))
            write_json_atomic(out / "metrics.json", metrics)
        return StageResult(metrics=distributed.broadcast(metrics), headline="pseudo_miou", failures=failures)

    def walk_per_image(
        self,
        model,
        dataset: PreparedDataset,
        todo: list[str],
        cam_dir: Path,
        label_dir: Path,
        edge_dir: Path,
        section,
        refine,
        device: torch.device,
        workers: int,
    ) -> tuple[list[str], list[float]]:
        """The per-image path (pydensecrf refinement, or none on a CPU): the walk on `device`, the
        label's arg-max in numpy, the CRF in `workers` spawned processes; (failures, walk seconds)."""
        failures, walk_seconds = [], []
        loader = image_loader(SafeImageDataset(dataset, todo), min(2, workers))
        with CrfPool(workers if refine else 0) as crf_pool:
            for item in progress(loader, desc="pseudo-labels", unit="img"):
                image_id = item["id"]
                if "error" in item:
                    failures.append(item["error"])
                    continue
                cam_path = cam_dir / f"{image_id}.npz"
                if not cam_path.is_file():
                    failures.append(f"{image_id}: no CAM file {cam_path}")
                    log.warning("pseudo: skipped %s (no CAM)", image_id)
                    continue
                target = label_dir / f"{image_id}.png"
                try:
                    planes, keys = self.walk_image(
                        model, item["image"], cam_path, edge_dir / f"{image_id}.png", section, device, walk_seconds
                    )
                except Exception as error:  # one bad image does not stop the others
                    failures.append(f"{image_id}: {type(error).__name__}: {error}")
                    log.warning("pseudo: skipped %s (%s)", image_id, error)
                    continue
                if refine is None or not len(keys):
                    write_index_png(target, planes_to_label(planes, keys), dataset.info.palette)
                else:
                    crf_pool.submit(image_id, item["image"], planes, keys, refine, target, dataset.info.palette)
            failures += crf_pool.finish()
        return failures, walk_seconds

    @torch.no_grad()
    def walk_image(
        self,
        model,
        image: np.ndarray,
        cam_path: Path,
        edge_path: Path,
        section,
        device: torch.device,
        walk_seconds: list,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(planes (1 + K, H, W), keys): background plane + walked, normalised CAMs at full size."""
        cam, keys, size = load_cam(cam_path)
        if len(keys) == 0:  # an image without a labelled class is all background
            return np.ones((1, *size), np.float32), keys
        x = normalize(image).unsqueeze(0).to(device)
        edge = fit_edge(model.boundary(x), cam.shape[1:])
        atomic_save(Image.fromarray((edge.cpu().numpy() * 255).round().astype(np.uint8)), edge_path)
        started = time.perf_counter()
        walked = random_walk(
            torch.from_numpy(cam).to(device), edge, section.walk_radius, section.beta, section.exp_times
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        walk_seconds.append(time.perf_counter() - started)
        return label_planes(walked, size, section.sem_seg_bg_threshold), keys

    def evaluate(self, cfg, dataset: PreparedDataset, artifact: Path) -> dict:
        ids = scored_ids(dataset, dataset.split(cfg.data.train_split), cfg.data.tune_split)
        return score_label_files(dataset, ids, artifact / "pseudo_labels", "pseudo_")

    def rescore(self, cfg, dataset, artifact: Path, metrics: dict, scored_with: dict, limit=None) -> dict:
        """The pseudo-label scores again, with the current tuning split left out."""
        return replace_scores(metrics, ("pseudo_",), self.evaluate(cfg, dataset, artifact), keep=("pseudo_images",))
