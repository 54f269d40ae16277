"""The stage-1 methods: `cam.method` -> the builder of its CamNet and the settings only it reads.

A method is its module (the net: `nets.py`, `pcam.py`, `pylon.py`, ...) plus one entry here: a
builder and, when the method reads settings of its own, a small model of them with bounds and
descriptions. The choices of `cam.method`, the `cam.<setting>` keys of every method (flat, as the
presets write them) and the settings left out of the cam key under another method are derived
from METHODS (stages/cam/config.py).

This module imports no torch: the config reads it (`wss config show`, `wss prepare` load configs
in a fraction of torch's import time); each builder imports its net when it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Callable

from pydantic import Field

from data.errors import WssError
from stages.common.settings import Float, Section


@dataclass(frozen=True)
class CamMethod:
    build: Callable[..., Any]  # (cam section, num_classes, weights) -> CamNet
    settings: type[Section] | None = None  # the settings only this method reads, as cam.<name>


def build_gap(cfg, num_classes: int, weights: str | None):
    from stages.cam.nets import GapNet

    return GapNet(num_classes, cfg.backbone, weights, cfg.loss)


class DropBlockSettings(Section):
    dropblock_prob: Float = Field(
        0.1, ge=0, le=1, description="DropBlock's drop probability after layer3 and layer4 while training."
    )
    dropblock_size: int = Field(5, ge=1, description="DropBlock's block side, shrunk to fit a smaller map.")


def build_dropblock(cfg, num_classes: int, weights: str | None):
    from stages.cam.nets import GapNet

    return GapNet(num_classes, cfg.backbone, weights, cfg.loss, cfg.dropblock_prob, cfg.dropblock_size)


def build_pcam(cfg, num_classes: int, weights: str | None):
    from stages.cam.pcam import PcamNet

    return PcamNet(num_classes, cfg.backbone, weights, cfg.loss)


class PylonSettings(Section):
    pylon_channels: int = Field(128, ge=1, description="Width of PYLON's decoder.")


def build_pylon(cfg, num_classes: int, weights: str | None):
    from stages.cam.pylon import PylonNet

    return PylonNet(num_classes, cfg.backbone, weights, cfg.loss, cfg.pylon_channels)


class MultiscaleSettings(Section):
    multiscale_stages: list[Annotated[int, Field(ge=0, le=4)]] = Field(
        [2, 3, 4], min_length=1, description="The trunk stages with a CAM classifier: 0 the stem, 1-4 layer1-4."
    )


def build_multiscale(cfg, num_classes: int, weights: str | None):
    from stages.cam.multiscale import MultiscaleNet

    return MultiscaleNet(num_classes, cfg.backbone, weights, cfg.loss, cfg.multiscale_stages)


class MinMaxSettings(Section):
    minmax_k: Float = Field(10.0, gt=0, description="Sharpness of the soft mask M = sigmoid(k (S - 0.5)).")
    minmax_entropy_weight: Float = Field(1.0, ge=0, description="Weight of the max-entropy term on x*(1-M).")
    minmax_erase_steps: int = Field(
        0, ge=0, description="Recursive erasing: extra localizer passes on the erased image (0: none)."
    )


def build_minmax(cfg, num_classes: int, weights: str | None):
    from stages.cam.minmax import MinMaxNet

    return MinMaxNet(
        num_classes, cfg.backbone, weights, cfg.loss, cfg.minmax_k, cfg.minmax_entropy_weight, cfg.minmax_erase_steps
    )


METHODS: dict[str, CamMethod] = {
    "gap": CamMethod(build_gap),
    "dropblock": CamMethod(build_dropblock, DropBlockSettings),
    "pcam": CamMethod(build_pcam),
    "pylon": CamMethod(build_pylon, PylonSettings),
    "multiscale": CamMethod(build_multiscale, MultiscaleSettings),
    "minmax": CamMethod(build_minmax, MinMaxSettings),
}


def build_cam_net(cfg, num_classes: int, weights: str | None = "config"):
    """The CamNet of the cam section `cfg`. `weights="config"` takes cfg.weights; pass None to
    skip loading (e.g. before a checkpoint)."""
    if cfg.method not in METHODS:
        raise WssError(f"cam.method {cfg.method!r} is not available (available: {', '.join(METHODS)})")
    net = METHODS[cfg.method].build(cfg, num_classes, cfg.weights if weights == "config" else weights)
    net.backbone.freeze(cfg.frozen_stages, cfg.freeze_bn)
    return net
