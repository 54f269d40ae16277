"""Stage 2 on the device: seeds and pseudo-labels computed where the model runs, from the CAM
file to the label PNG.

Which path runs (`on_device`): this one when the CRF the pass uses (the seed CRF for seeds, the
refining CRF for pseudo-labels) resolves to the torch backend on `run.device` (so always with
`backend: auto` on a CUDA GPU), or when the pass uses no CRF and `run.device` is a CUDA GPU.
A CRF on pydensecrf (a CPU's `auto`, or named) keeps the per-image path with its CRF worker
processes, bit for bit.

Loader workers read the CAM file (float16 maps) and the image (uint8) and hand them over; on the
device: the CAM upsampling (`upsample_cam`'s rule), the thresholds with the background plane,
both label CRFs on one lattice, the seed assembly; or the IRN's boundary map, the random walk,
the label planes, the optional probability CRF and the arg-max. Writer threads encode the PNGs
(data.writer), so the device does not wait for zlib. Images go one at a time: the images of a
split differ in size (VOC), each CRF builds the lattice of its own image, and memory stays
linear in the pixels of one image; loading and writing overlap the device.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data.errors import WssError
from data.layout import PreparedDataset, atomic_save, write_index_png
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, uint8_tensor
from data.writer import BackgroundWriter
from stages.cam.infer import load_cam, upsample_cam_tensor
from stages.common import distributed
from stages.common.crf import CrfParams, crf_image, kernel_args, resolve_backend
from stages.common.runtime import image_loader, progress
from stages.irn.random_walk import random_walk
from stages.irn.seeds import assemble_seeds, check_keys, confident_indices
from stages.irn.walk_labels import fit_edge, label_planes_tensor, planes_to_label_tensor, refine_probabilities

log = logging.getLogger("wss.irn")

LOADER_WORKERS = 4  # loader processes at most: each reads a CAM file and decodes an image per image


def on_device(device: torch.device, crf: CrfParams | None) -> bool:
    """True where a stage-2 pass runs on the device: its CRF (None: none) resolves to the torch
    backend on `device`, or it has none and `device` is a CUDA GPU."""
    if crf is None:
        return device.type == "cuda"
    return resolve_backend(crf.backend, device) == "torch"


class CamImageDataset(Dataset):
    """{"id", "cam" float16 (K, h, w), "keys", "size", "image" uint8 (H, W, 3) or None} of each
    id, read in a loader worker; {"id", "error"} for a missing or unreadable CAM file or image.
    The image is read where `with_image` and the image has a labelled class (an image without
    one is all background and needs neither CRF nor walk)."""

    def __init__(self, dataset: PreparedDataset, ids: list[str], cam_dir: Path, with_image: bool):
        self.dataset, self.ids, self.cam_dir, self.with_image = dataset, list(ids), Path(cam_dir), with_image

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        cam_path = self.cam_dir / f"{image_id}.npz"
        if not cam_path.is_file():
            return {"id": image_id, "error": f"{image_id}: no CAM file {cam_path}"}
        try:
            cam, keys, size = load_cam(cam_path, dtype=np.float16)
            image = self.dataset.read_image(image_id) if self.with_image and len(keys) else None
        except WssError as error:
            return {"id": image_id, "error": f"{image_id}: {error}"}
        return {"id": image_id, "cam": cam, "keys": keys, "size": size, "image": image}


def image_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """The image as the CRF takes it (uint8 (H, W, 3), grey repeated), on `device`."""
    return uint8_tensor(crf_image(image)).to(device, non_blocking=True)


def normalized(image: torch.Tensor) -> torch.Tensor:
    """uint8 (H, W, 3) -> (1, 3, H, W): data.transforms.normalize's arithmetic (the same float32
    operations, so the same numbers) on the image's device."""
    mean = torch.from_numpy(IMAGENET_MEAN).to(image.device)
    std = torch.from_numpy(IMAGENET_STD).to(image.device)
    return ((image.float() / 255.0 - mean) / std).permute(2, 0, 1)[None].contiguous()


def seeds_on_device(
    cam: torch.Tensor,
    keys: np.ndarray,
    size: tuple[int, int],
    image: torch.Tensor | None,
    fg_threshold: float,
    bg_threshold: float,
    crf: CrfParams | None,
) -> torch.Tensor:
    """Seed labels (H, W) uint8 on the CAM's device: stages.irn.seeds.make_seeds of
    upsample_cam(cam), with the torch label CRF (both maps on one lattice) on `image`'s device."""
    keys = check_keys(tuple(cam.shape), keys)
    if keys.size == 0:
        return torch.zeros(size, dtype=torch.uint8, device=cam.device)
    indices = confident_indices(upsample_cam_tensor(cam.float(), size), fg_threshold, bg_threshold)
    if crf is not None:
        from stages.common.crf_torch import label_crf

        indices = label_crf(image, indices, keys.size + 1, crf.gt_prob, **kernel_args(crf))
    return assemble_seeds(indices, torch.from_numpy(keys).to(cam.device))


def write_seeds_on_device(
    dataset: PreparedDataset,
    ids: list[str],
    cam_dir: Path,
    seed_dir: Path,
    fg_threshold: float,
    bg_threshold: float,
    crf: CrfParams | None,
    device: torch.device,
    workers: int,
) -> list[str]:
    """seeds/<id>.png of `ids` (see `seeds_on_device`); the failures, one line per image."""
    failures = []
    loader = image_loader(CamImageDataset(dataset, ids, cam_dir, with_image=crf is not None), workers)
    with BackgroundWriter() as writer:
        for item in progress(loader, desc="irn seeds", unit="img", disable=not distributed.is_main()):
            image_id = item["id"]
            if "error" in item:
                failures.append(item["error"])
                log.warning("irn: skipped %s", item["error"])
                continue
            try:
                image = image_tensor(item["image"], device) if item["image"] is not None else None
                cam = torch.from_numpy(item["cam"]).to(device, non_blocking=True)
                seeds = seeds_on_device(cam, item["keys"], item["size"], image, fg_threshold, bg_threshold, crf)
                seeds = seeds.cpu().numpy()
            except Exception as error:  # one bad image (or a CRF failure) must not stop the others
                failures.append(f"{image_id}: {type(error).__name__}: {error}")
                log.warning("irn: skipped %s", failures[-1])
                continue
            writer.submit(image_id, write_index_png, seed_dir / f"{image_id}.png", seeds, dataset.info.palette)
        failures += writer.close()
    return failures


@torch.no_grad()
def pseudo_label_on_device(
    model, cam: torch.Tensor, keys: np.ndarray, size: tuple[int, int], image: torch.Tensor | None, section, refine
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """(label (H, W) uint8, boundary map (h, w) uint8 or None, walk seconds) of one image on the
    CAM's device: the per-image path's computation (stages/irn/pseudo.py walk_image and
    crf_pool.refine_and_write), with the torch probability CRF (`refine`, or None) on the device."""
    keys = check_keys(tuple(cam.shape), keys)
    device = cam.device
    if keys.size == 0:  # an image without a labelled class is all background
        return torch.zeros(size, dtype=torch.uint8, device=device), None, 0.0
    edge = fit_edge(model.boundary(normalized(image)), tuple(cam.shape[1:]))
    edge_png = (edge * 255).round().to(torch.uint8)
    started = time.perf_counter()
    walked = random_walk(cam.float(), edge, section.walk_radius, section.beta, section.exp_times)
    if device.type == "cuda":
        torch.cuda.synchronize()
    walk_seconds = time.perf_counter() - started
    planes = label_planes_tensor(walked, size, section.sem_seg_bg_threshold)
    if refine is not None:
        from stages.common.crf_torch import prob_crf

        planes = prob_crf(image, refine_probabilities(planes)[None], **kernel_args(refine))[0]
    return planes_to_label_tensor(planes, torch.from_numpy(keys).to(device)), edge_png, walk_seconds


def write_pseudo_files(label_path: Path, label: np.ndarray, edge_path: Path, edge: np.ndarray | None, palette) -> None:
    """The boundary PNG, then the label PNG (a resumed run keeps the labels it finds, so a label
    is written last, each file whole)."""
    if edge is not None:
        atomic_save(Image.fromarray(edge), edge_path)
    write_index_png(label_path, label, palette)


def write_pseudo_labels_on_device(
    model,
    dataset: PreparedDataset,
    ids: list[str],
    cam_dir: Path,
    label_dir: Path,
    edge_dir: Path,
    section,
    refine: CrfParams | None,
    device: torch.device,
    workers: int,
) -> tuple[list[str], list[float]]:
    """pseudo_labels/<id>.png and boundaries/<id>.png of `ids` (see `pseudo_label_on_device`);
    (the failures, one line per image; the walk's seconds per image)."""
    failures, walk_seconds = [], []
    loader = image_loader(CamImageDataset(dataset, ids, cam_dir, with_image=True), workers)
    with BackgroundWriter() as writer:
        for item in progress(loader, desc="pseudo-labels", unit="img"):
            image_id = item["id"]
            if "error" in item:
                failures.append(item["error"])
                log.warning("pseudo: skipped %s", item["error"])
                continue
            try:
                image = image_tensor(item["image"], device) if item["image"] is not None else None
                cam = torch.from_numpy(item["cam"]).to(device, non_blocking=True)
                label, edge, seconds = pseudo_label_on_device(
                    model, cam, item["keys"], item["size"], image, section, refine
                )
                label, edge = label.cpu().numpy(), None if edge is None else edge.cpu().numpy()
            except Exception as error:  # one bad image does not stop the others
                failures.append(f"{image_id}: {type(error).__name__}: {error}")
                log.warning("pseudo: skipped %s", failures[-1])
                continue
            if edge is not None:
                walk_seconds.append(seconds)
            writer.submit(
                image_id,
                write_pseudo_files,
                label_dir / f"{image_id}.png",
                label,
                edge_dir / f"{image_id}.png",
                edge,
                dataset.info.palette,
            )
        failures += writer.close()
    return failures, walk_seconds
