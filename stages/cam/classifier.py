"""A finished cam artifact's classifier: loaded from its model file, measured, and run on
images the stage wrote no CAMs for (`wss compare` scores the val split's CAMs)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from pydantic import ValidationError

from data.layout import PreparedDataset
from stages.base import StageInputError
from stages.cam.config import CamConfig
from stages.cam.infer import write_cam_files
from stages.cam.methods import build_cam_net
from stages.cam.model_file import MODEL_FILE, read_cam_model
from stages.common.model_files import load_weights
from stages.common.settings import describe_error

log = logging.getLogger("wss.compare")


def load_cam_net(artifact: Path, device: torch.device):
    """The trained classifier of a cam artifact, its config and classes (used by the cam stage,
    `wss compare`)."""
    path = Path(artifact) / MODEL_FILE
    state = read_cam_model(artifact)
    try:
        cfg = CamConfig.model_validate(state.meta["config"])
    except ValidationError as error:  # a setting this version does not know, or a value it refuses
        raise StageInputError(
            f"{path}: unreadable cam model (its config: {describe_error(error, CamConfig, 'cam')}); "
            f"recompute it with wss run --force cam"
        ) from None
    classes = state.meta["classes"]
    model = build_cam_net(cfg, len(classes), weights=None)
    load_weights(model, state.tensors, path, f"{cfg.method}/{cfg.backbone} classifier", "cam")
    return model.to(device).eval(), cfg, classes


def count_parameters(artifact: Path) -> int:
    model, _, _ = load_cam_net(artifact, torch.device("cpu"))
    return sum(p.numel() for p in model.parameters())


def write_cams(
    artifact: Path,
    dataset: PreparedDataset,
    ids: list[str],
    cam_dir: Path,
    device: torch.device,
    keys_of=None,
    workers: int = 0,
) -> None:
    """CAMs of `ids` with the artifact's model and inference settings, saved like the stage's
    (stages.cam.infer.write_cam_files: existing files are kept, an unreadable image is logged
    and skipped). `keys_of(id)` picks the classes (default: the image's labels)."""
    if all((cam_dir / f"{i}.npz").is_file() for i in ids):
        return
    model, cfg, _ = load_cam_net(artifact, device)
    for failure in write_cam_files(
        model, cfg, dataset, ids, cam_dir, device, workers, keys_of, desc="cam inference (compare)", leave=False
    ):
        log.warning("compare: skipped %s", failure)
