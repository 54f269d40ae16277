"""The `seg` section of a run config."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional


@dataclass
class SegConfig:
    arch: str = "Unet"  # any segmentation_models_pytorch architecture name
    encoder: str = "resnet34"  # any smp encoder name
    # null | imagenet | cam (the stage-1 classifier's trunk; same ResNet) | /path/to/encoder.pth or .safetensors
    encoder_weights: Optional[str] = "imagenet"
    # extra keyword arguments of the smp architecture, e.g. {decoder_channels: [64, 32, 16, 16, 16]}
    # for a lighter Unet decoder on a CPU
    arch_options: dict[str, Any] = field(default_factory=dict)
    losses: dict[str, float] = field(default_factory=lambda: {"ce": 1.0, "dice": 1.0})  # ce, dice, lovasz, focal
    epochs: int = 20
    batch_size: int = 16
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    crop_size: int = 512
    resize_long: list[int] = field(default_factory=lambda: [320, 640])
    # checkpoint choice never looks at ground truth: the last epoch, or the best score on the
    # pseudo-labels of a held-out part of the train split
    checkpoint: Literal["last", "pseudo_holdout"] = "last"
    holdout_fraction: float = 0.1
    threshold: float = 0.5  # binary tasks: probability above which a pixel is foreground
    predict_size: Optional[int] = None  # resize inputs' long side for prediction (null = as trained)
