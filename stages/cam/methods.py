"""`cam.method` -> a builder of its CamNet. A plain dict: adding a method is one entry."""
from __future__ import annotations

from stages.cam.config import CamConfig
from stages.cam.nets import CamNet, GapNet


def build_gap(cfg: CamConfig, num_classes: int, weights: str | None) -> CamNet:
    return GapNet(num_classes, cfg.backbone, weights, cfg.loss)


def build_dropblock(cfg: CamConfig, num_classes: int, weights: str | None) -> CamNet:
    return GapNet(num_classes, cfg.backbone, weights, cfg.loss, cfg.dropblock_prob, cfg.dropblock_size)


METHODS = {
    "gap": build_gap,
    "dropblock": build_dropblock,
}


def build_cam_net(cfg: CamConfig, num_classes: int, weights: str | None = "config") -> CamNet:
    """`weights="config"` takes cfg.weights; pass None to skip loading (e.g. before a checkpoint)."""
    if cfg.method not in METHODS:
        from data.errors import WssError
        raise WssError(f"cam.method {cfg.method!r} is not available (available: {', '.join(METHODS)})")
    return METHODS[cfg.method](cfg, num_classes, cfg.weights if weights == "config" else weights)
