"""The `irn` section: seeds and IRN training (key of `irn`), walk and pseudo-labels (key of `pseudo`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from stages.common.crf import CrfParams
from stages.common.settings import (
    BatchSize,
    CropSize,
    Epochs,
    Float,
    HeadLrMult,
    LearningRate,
    Momentum,
    Optimizer,
    ResizeLong,
    Section,
    WeightDecay,
)


class PseudoSetting:
    """Annotated marker of an irn setting that makes the pseudo-labels (the `pseudo` stage's key),
    not the trained IRN: `walk_radius: Annotated[int, PSEUDO] = ...`."""

    def __repr__(self) -> str:
        return "PSEUDO"


PSEUDO = PseudoSetting()


class IrnConfig(Section):
    """Stage 2: seeds from the CAMs, the boundary network (IRN) trained on their affinities, and the
    random walk that turns CAMs and boundaries into pseudo-labels (the `pseudo` stage, with its
    own key: a new walk or pseudo-label setting retrains no IRN)."""

    # seeds (IR labels)
    conf_fg_threshold: Float = Field(
        0.30, ge=0, le=1, description="CAM score above which a pixel is a seed of its class."
    )
    conf_bg_threshold: Float = Field(
        0.05,
        ge=0,
        le=1,
        description="CAM score under which a pixel is a background seed; the pixels between the two "
        "thresholds are ignored, so it may not be above `conf_fg_threshold`.",
    )
    crf: CrfParams = Field(default_factory=CrfParams, description="The seed CRF's parameters (IRNet's by default).")
    use_crf: bool = Field(
        True,
        description="Snap the thresholded CAMs to image edges with the CRF; false: the "
        "seeds are the thresholded CAMs (faster, coarser) and `crf` stays out of "
        "the key.",
    )
    positive_only: bool = Field(False, description="Train the IRN on the images with a labelled class only.")
    # network and training
    backbone_init: str = Field(
        "cam",
        min_length=1,
        description="The IRN's trunk (of `cam.backbone`'s depth): `cam` (the stage-1 classifier's), "
        "`imagenet` (the weights `cam.weights` names, or ImageNet's, downloaded once), `none` (random), "
        "or any source `cam.weights` takes: a wss cam artifact (its cache key enters the key) or a "
        "torchvision / timm ResNet checkpoint (its size and modification time enter the key).",
    )
    freeze_backbone: bool = Field(True, description="Keep the trunk fixed and train the boundary branch only.")
    epochs: Epochs = 3
    batch_size: BatchSize = 32
    optimizer: Optimizer = "sgd"
    lr: LearningRate = 0.1
    head_lr_mult: HeadLrMult = Field(
        1.0, description="The boundary branch's learning rate is `lr * head_lr_mult` (the trunk is frozen by default)."
    )
    momentum: Momentum = 0.0
    weight_decay: WeightDecay = 1e-4
    crop_size: CropSize = 512
    resize_long: ResizeLong = [320, 640]
    radius: int = Field(
        10, ge=2, description="The affinity loss pairs pixels nearer than this, at stride 4 (radius 1 holds no pair)."
    )
    # random walk and pseudo-labels
    walk_radius: Annotated[int, PSEUDO] = Field(
        5, ge=1, description="Radius of the random walk's neighbours, at stride 4."
    )
    beta: Annotated[Float, PSEUDO] = Field(
        10.0, gt=0, description="The walk's affinities are the boundary-free path's, to the power beta."
    )
    exp_times: Annotated[int, PSEUDO] = Field(8, ge=0, le=16, description="The walk takes 2^exp_times steps.")
    sem_seg_bg_threshold: Annotated[Float, PSEUDO] = Field(
        0.25, ge=0, le=1, description="Walked CAM score under which a pixel is background in the pseudo-labels."
    )
    refine_crf: Annotated[bool, PSEUDO] = Field(
        False, description="Refine the pseudo-labels' class probabilities with a CRF."
    )
    refine_crf_params: Annotated[CrfParams, PSEUDO] = Field(
        default_factory=CrfParams,
        description="The refining CRF's parameters; in the key only under `refine_crf`, "
        "without `gt_prob`, which it does not read.",
    )


def pseudo_settings() -> set[str]:
    """The irn settings marked PSEUDO: they make the `pseudo` stage's key, not the `irn` one."""
    return {name for name, field in IrnConfig.model_fields.items() if PSEUDO in field.metadata}
