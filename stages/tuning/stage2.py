"""Stage-2 settings searched on the tuning split's masks, from the cached artifacts.

- `cam.eval_bg_threshold` from the CAM files: the cam artifact's where the tuning split lies in
  train, else CAMs its classifier writes for the tuning images.
- The walk (`irn.beta`, `irn.exp_times`), `irn.sem_seg_bg_threshold` and `irn.refine_crf`, with
  the pseudo stage's own computation (stages.irn.pseudo): each image's boundary map and the
  walk's beta-free tables are computed once, the walk runs once per beta to the largest
  exp_times and leaves the smaller ones on its way (`random_walk_many`, bit for bit the single
  walks), and every threshold is applied to the walked maps (stride 4, small). A grid of T
  thresholds, B betas and E exp_times costs B walks of the longest length per image, not
  T x B x E pseudo-label runs. The CRF refinement, which costs far more than a walk, is tried at the
  best (beta, exp_times) only, for its best few thresholds.

Scores are those of the stages (stages.common.scoring): mIoU, and on a binary task the Kaggle
Dice and the Dice on positive images. Only masks of the tuning split are read.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.errors import DataError
from data.layout import PreparedDataset
from data.transforms import normalize
from stages.cam.classifier import load_cam_net
from stages.cam.infer import CamFileError, cam_to_label, load_cam, write_cam_files
from stages.cam.scoring import read_scored_cam
from stages.common.crf import CrfParams, crf_prob
from stages.common.runtime import progress
from stages.common.scoring import SegmentationScorer, left_out_of_scores
from stages.irn.crf_pool import planes_to_label
from stages.irn.net import load_boundary_net
from stages.irn.pseudo import fit_edge, label_planes
from stages.irn.random_walk import random_walk, random_walk_many

log = logging.getLogger("wss.tune")
CRF_THRESHOLDS = 3  # the CRF is tried at the best (beta, exp_times) for this many of its best thresholds


def objective(task: str) -> str:
    """The score settings are chosen by: Kaggle Dice on a binary task (negatives count as the
    Kaggle metric counts them), mIoU otherwise."""
    return "kaggle_dice" if task == "binary" else "miou"


def summary(scorer: SegmentationScorer) -> dict:
    """The scores a tuning table shows: mIoU, and on a binary task Kaggle Dice and Dice on positives."""
    metrics = scorer.metrics("")
    keep = ("miou", "kaggle_dice", "dice_pos", "scored_images")
    return {name: metrics[name] for name in keep if name in metrics}


def tuning_cams(
    cam_artifact: Path, dataset: PreparedDataset, ids: list[str], out_dir: Path, device: torch.device, workers: int
) -> tuple[dict[str, Path], list[str]]:
    """{id: CAM file} of the tuning images and the problems: the cam artifact's file where it
    has one, else one its classifier writes into `out_dir` (an image outside the train split)."""
    have = {i: Path(cam_artifact) / "cams" / f"{i}.npz" for i in ids}
    have = {i: path for i, path in have.items() if path.is_file()}
    missing = [i for i in ids if i not in have]
    failures: list[str] = []
    if missing:
        model, cam_cfg, _ = load_cam_net(Path(cam_artifact), device)
        failures = write_cam_files(
            model, cam_cfg, dataset, missing, out_dir, device, workers, desc="cam inference (tune)", leave=False
        )
        have.update({i: out_dir / f"{i}.npz" for i in missing if (out_dir / f"{i}.npz").is_file()})
    return {i: have[i] for i in ids if i in have}, failures


def cam_threshold_rows(dataset: PreparedDataset, cam_files: dict[str, Path], thresholds: list[float]) -> list[dict]:
    """One row per `cam.eval_bg_threshold`: the CAMs of the tuning images against their masks."""
    scorers = {t: SegmentationScorer.of(dataset) for t in thresholds}
    for image_id, path in cam_files.items():
        pair = read_scored_cam(dataset, image_id, path.parent)
        if pair is None:
            continue
        (cam, keys), gt = pair
        for t, scorer in scorers.items():
            scorer.update(cam_to_label(cam, keys, t), gt)
    return [{"cam.eval_bg_threshold": t, **summary(scorer)} for t, scorer in scorers.items()]


@dataclass(frozen=True)
class WalkGrid:
    betas: tuple[float, ...]
    exp_times: tuple[int, ...]
    thresholds: tuple[float, ...]
    walk_radius: int
    crf: CrfParams | None = None  # the refining CRF's parameters when refine_crf is searched


@dataclass
class WalkImage:
    """What the walk of one tuning image needs again for the CRF step."""

    cam: np.ndarray
    keys: np.ndarray
    size: tuple[int, int]
    edge: torch.Tensor | None
    gt: np.ndarray


def walk_rows(
    dataset: PreparedDataset,
    cam_files: dict[str, Path],
    irn_artifact: Path,
    grid: WalkGrid,
    device: torch.device,
    timings: dict | None = None,
) -> list[dict]:
    """One row per (beta, exp_times, sem_seg_bg_threshold, refine_crf) with the scores of the
    tuning images' pseudo-labels against their masks (see the module's docstring)."""
    started = time.perf_counter()
    model = load_boundary_net(Path(irn_artifact), device)
    walks = [(beta, exp) for beta in grid.betas for exp in grid.exp_times]
    scorers = {(b, e, t): SegmentationScorer.of(dataset) for b, e in walks for t in grid.thresholds}
    images: dict[str, WalkImage] = {}
    for image_id, path in progress(list(cam_files.items()), desc="tune walk", unit="img", leave=False):
        try:
            cam, keys, size = load_cam(path)
            gt = dataset.read_mask(image_id, size)
        except (CamFileError, DataError) as error:
            left_out_of_scores(error)
            continue
        if gt is None:
            continue
        if len(keys) == 0:  # no labelled class: all background, whatever the walk
            background = np.zeros(size, np.uint8)
            for scorer in scorers.values():
                scorer.update(background, gt)
            images[image_id] = WalkImage(cam, keys, size, None, gt)
            continue
        with torch.no_grad():
            x = normalize(dataset.read_image(image_id)).unsqueeze(0).to(device)
            edge = fit_edge(model.boundary(x), cam.shape[1:])
        cams = torch.from_numpy(cam).to(device)
        walked = random_walk_many(cams, edge, grid.walk_radius, grid.betas, grid.exp_times)
        for beta, exp in walks:
            planes = label_planes(walked[(beta, exp)], size, 0.0)
            for t in grid.thresholds:
                planes[0] = t
                scorers[(beta, exp, t)].update(planes_to_label(planes, keys), gt)
        images[image_id] = WalkImage(cam, keys, size, edge.cpu(), gt)
    rows = [
        {
            "irn.beta": b,
            "irn.exp_times": e,
            "irn.sem_seg_bg_threshold": t,
            "irn.refine_crf": False,
            **summary(scorer),
        }
        for (b, e, t), scorer in scorers.items()
    ]
    if timings is not None:
        timings["walk_seconds"] = time.perf_counter() - started
    if grid.crf is not None and images:
        started = time.perf_counter()
        rows += crf_rows(dataset, images, rows, grid, device)
        if timings is not None:
            timings["crf_seconds"] = time.perf_counter() - started
    return rows


def crf_rows(
    dataset: PreparedDataset, images: dict[str, WalkImage], rows: list[dict], grid: WalkGrid, device
) -> list[dict]:
    """`refine_crf: true` rows at the best (beta, exp_times) of `rows`, for its best
    CRF_THRESHOLDS thresholds (each a CRF per image)."""
    score = objective(dataset.task)
    ranked = sorted(rows, key=lambda row: -np.nan_to_num(row.get(score, np.nan), nan=-1.0))
    beta, exp = ranked[0]["irn.beta"], ranked[0]["irn.exp_times"]
    same_walk = [row for row in ranked if (row["irn.beta"], row["irn.exp_times"]) == (beta, exp)]
    thresholds = [row["irn.sem_seg_bg_threshold"] for row in same_walk[:CRF_THRESHOLDS]]
    scorers = {t: SegmentationScorer.of(dataset) for t in thresholds}
    for image_id, walk in progress(list(images.items()), desc="tune crf", unit="img", leave=False):
        if walk.edge is None:
            for scorer in scorers.values():
                scorer.update(np.zeros(walk.size, np.uint8), walk.gt)
            continue
        cams = torch.from_numpy(walk.cam).to(device)
        planes = label_planes(random_walk(cams, walk.edge.to(device), grid.walk_radius, beta, exp), walk.size, 0.0)
        image = dataset.read_image(image_id)
        for t, scorer in scorers.items():
            planes[0] = t
            probs = planes / planes.sum(0, keepdims=True).clip(1e-5)  # as the pseudo stage's CRF pool
            scorer.update(planes_to_label(crf_prob(image, probs, grid.crf), walk.keys), walk.gt)
    return [
        {"irn.beta": beta, "irn.exp_times": exp, "irn.sem_seg_bg_threshold": t, "irn.refine_crf": True, **summary(s)}
        for t, s in scorers.items()
    ]
