"""The `irn` section: seeds and IRN training (key of `irn`), walk and pseudo-labels (key of `pseudo`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from stages.common.crf import CrfParams

PSEUDO = {"pseudo": True}  # fields that only change the pseudo-labels, not the trained IRN


@dataclass
class IrnConfig:
    # seeds (IR labels)
    conf_fg_threshold: float = 0.30
    conf_bg_threshold: float = 0.05
    crf: CrfParams = field(default_factory=CrfParams)
    use_crf: bool = True  # false: seeds straight from the thresholds (faster, coarser)
    positive_only: bool = False  # train the IRN on images with a labelled class only
    # network and training
    backbone_init: Literal["cam", "imagenet", "none"] = "cam"
    freeze_backbone: bool = True
    epochs: int = 3
    batch_size: int = 32
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    head_lr_mult: float = 1.0  # the boundary branch's LR multiplier (the trunk is frozen by default)
    momentum: float = 0.0
    weight_decay: float = 1e-4
    crop_size: int = 512
    resize_long: list[int] = field(default_factory=lambda: [320, 640])
    radius: int = 10  # pairs for the affinity loss, at stride 4
    # random walk and pseudo-labels
    walk_radius: int = field(default=5, metadata=PSEUDO)
    beta: float = field(default=10.0, metadata=PSEUDO)
    exp_times: int = field(default=8, metadata=PSEUDO)
    sem_seg_bg_threshold: float = field(default=0.25, metadata=PSEUDO)
    refine_crf: bool = field(default=False, metadata=PSEUDO)
    refine_crf_params: CrfParams = field(default_factory=lambda: CrfParams(), metadata=PSEUDO)
