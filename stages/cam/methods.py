"""`cam.method` -> a builder of its CamNet. A plain dict: adding a method is one entry."""
from __future__ import annotations

from stages.cam.config import CamConfig
from stages.cam.minmax import MinMaxNet
from stages.cam.multiscale import MultiscaleNet
from stages.cam.nets import CamNet, GapNet
from stages.cam.pcam import PcamNet
from stages.cam.pylon import PylonNet


def build_gap(cfg: CamConfig, num_classes: int, weights: str | None) -> CamNet:
    return GapNet(num_classes, cfg.backbone, weights, cfg.loss)


def build_dropblock(cfg: CamConfig, num_classes: int, weights: str | None) -> CamNet:
    return GapNet(num_classes, cfg.backbone, weights, cfg.loss, cfg.dropblock_prob, cfg.dropblock_size)


def build_pcam(cfg: CamConfig, num_classes: int, weights: str | None) -> CamNet:
    return PcamNet(num_classes, cfg.backbone, weights, cfg.loss)


def build_pylon(cfg: CamConfig, num_classes: int, weights: str | None) -> CamNet:
    return PylonNet(num_classes, cfg.backbone, weights, cfg.loss, cfg.pylon_channels)


def build_multiscale(cfg: CamConfig, num_classes: int, weights: str | None) -> CamNet:
    return MultiscaleNet(num_classes, cfg.backbone, weights, cfg.loss, cfg.multiscale_stages)


def build_minmax(cfg: CamConfig, num_classes: int, weights: str | None) -> CamNet:
    return MinMaxNet(num_classes, cfg.backbone, weights, cfg.loss, cfg.minmax_k, cfg.minmax_entropy_weight,
                     cfg.minmax_erase_steps)


METHODS = {
    "gap": build_gap,
    "dropblock": build_dropblock,
    "pcam": build_pcam,
    "pylon": build_pylon,
    "multiscale": build_multiscale,
    "minmax": build_minmax,
}


def build_cam_net(cfg: CamConfig, num_classes: int, weights: str | None = "config") -> CamNet:
    """`weights="config"` takes cfg.weights; pass None to skip loading (e.g. before a checkpoint)."""
    if cfg.method not in METHODS:
        from data.errors import WssError
        raise WssError(f"cam.method {cfg.method!r} is not available (available: {', '.join(METHODS)})")
    net = METHODS[cfg.method](cfg, num_classes, cfg.weights if weights == "config" else weights)
    net.backbone.freeze(cfg.frozen_stages, cfg.freeze_bn)
    return net
