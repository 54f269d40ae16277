"""The `cam` section of a run config."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

Method = Literal["gap", "dropblock", "pcam", "pylon", "multiscale", "minmax"]


@dataclass
class CamConfig:
    method: Method = "gap"
    backbone: Literal["resnet18", "resnet34", "resnet50"] = "resnet50"
    weights: Optional[str] = "imagenet"  # null | imagenet | /path/to/resnet.pth
    loss: Literal["soft_margin", "bce"] = "soft_margin"
    # training (IRNet's defaults)
    epochs: int = 5
    batch_size: int = 16
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1  # the backbone's learning rate; the new head gets lr * head_lr_mult
    head_lr_mult: float = 10.0
    momentum: float = 0.0
    weight_decay: float = 1e-4
    crop_size: int = 512
    resize_long: list[int] = field(default_factory=lambda: [320, 640])
    # the trunk as IRNet trains it (frozen_stages 2, freeze_bn true; needs pretrained weights):
    frozen_stages: int = -1  # stem (0) and layer1..N kept at their initial weights; -1 trains all
    freeze_bn: bool = False  # BatchNorm normalises with its stored statistics, never updates them
    # method: dropblock (DropBlock after layer3 and layer4)
    dropblock_prob: float = 0.1
    dropblock_size: int = 5
    # methods of the chest X-ray localization papers (stages/cam/pcam.py, pylon.py, multiscale.py,
    # minmax.py; presets with their defaults in configs/methods/)
    pylon_channels: int = 128  # decoder width
    multiscale_stages: list[int] = field(default_factory=lambda: [2, 3, 4])  # 0 stem, 1..4 layer1..4
    minmax_k: float = 10.0  # soft-mask sharpness: M = sigmoid(k (S - 0.5))
    minmax_entropy_weight: float = 1.0  # weight of the max-entropy term on x*(1-M)
    minmax_erase_steps: int = 0  # recursive erasing: extra localizer passes on the erased image
    # CAM inference
    extract: Literal["cam", "gradcam++"] = "cam"
    scales: list[float] = field(default_factory=lambda: [1.0, 0.5, 1.5, 2.0])
    flip: bool = True
    # evaluation: the background threshold is fixed, never tuned on the scored split
    eval_bg_threshold: float = 0.15


# The settings only one method reads: another method's are left out of the cam key, so that
# `-o cam.minmax_k=5` under `method: gap` does not retrain anything.
METHOD_SETTINGS = {
    "dropblock": ("dropblock_prob", "dropblock_size"),
    "pylon": ("pylon_channels",),
    "multiscale": ("multiscale_stages",),
    "minmax": ("minmax_k", "minmax_entropy_weight", "minmax_erase_steps"),
}


def other_methods_settings(cfg: CamConfig) -> set[str]:
    return {name for method, names in METHOD_SETTINGS.items() if method != cfg.method for name in names}
