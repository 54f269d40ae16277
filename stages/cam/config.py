"""The `cam` section of a run config: the settings every method reads, plus `method` and each
method's own settings, both derived from the method registry (stages/cam/methods.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal, Optional

from pydantic import Field, create_model

from stages.cam.methods import METHODS, CamMethod
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

CAM_DOC = """Stage 1: a classifier trained on the image-level labels, and its class activation maps (CAMs) of
the train split. `method` and each method's own settings come from the method registry
(stages/cam/methods.py)."""
INFERENCE_ONLY = " Used only to infer the CAMs: a new value reuses the trained classifier."


class CamCommon(Section):
    """The cam settings of every method."""

    backbone: Literal["resnet18", "resnet34", "resnet50"] = Field(
        "resnet50", description="The classifier's ResNet trunk, at output stride 16."
    )
    weights: Optional[str] = Field(
        "imagenet",
        description="The trunk's start: null (random), `imagenet` (torchvision's weights, downloaded "
        "once), a wss cam artifact (its folder or model file, of any method: its trunk is taken, the head "
        "is new; its cache key enters the key) or a torchvision / timm ResNet checkpoint (.pth, .pt, "
        ".safetensors; its size and modification time enter the key). Its depth must be `backbone`'s.",
    )
    loss: Literal["soft_margin", "bce"] = Field("soft_margin", description="The multilabel classification loss.")
    # training (IRNet's defaults)
    epochs: Epochs = 5
    batch_size: BatchSize = 16
    optimizer: Optimizer = "sgd"
    lr: LearningRate = Field(0.1, description="The trunk's learning rate; the new head's is `lr * head_lr_mult`.")
    head_lr_mult: HeadLrMult = 10.0
    momentum: Momentum = 0.0
    weight_decay: WeightDecay = 1e-4
    crop_size: CropSize = 512
    resize_long: ResizeLong = [320, 640]
    # the trunk as IRNet trains it (frozen_stages 2, freeze_bn true; needs pretrained weights)
    frozen_stages: int = Field(
        -1,
        ge=-1,
        le=4,
        description=(
            "The stem (0) and layer1..N are kept at their initial weights; -1 trains them all. IRNet trains "
            "layer3-4 only (2, with `freeze_bn`, as `configs/voc.yaml`); meant for pretrained weights."
        ),
    )
    freeze_bn: bool = Field(
        False, description="BatchNorm normalises with its stored statistics and never updates them."
    )
    # CAM inference
    extract: Literal["cam", "gradcam++"] = Field(
        "cam", description="The maps: the method's own CAMs, or Grad-CAM++ on its features." + INFERENCE_ONLY
    )
    scales: list[Annotated[Float, Field(gt=0)]] = Field(
        [1.0, 0.5, 1.5, 2.0], min_length=1, description="The image scales whose CAMs are summed." + INFERENCE_ONLY
    )
    flip: bool = Field(True, description="Add the CAMs of the mirrored image." + INFERENCE_ONLY)
    # evaluation
    eval_bg_threshold: Float = Field(
        0.15,
        ge=0,
        le=1,
        description="The CAM score under which a pixel is background when the CAMs are scored: "
        "fixed, never tuned on the scored split. Scoring only: not in the key, a new "
        "value re-scores the cached CAMs.",
    )


METHOD_SETTINGS_AFTER = "freeze_bn"  # where a method's own settings go in the section (and `config show`)


def cam_config_model(methods: Mapping[str, CamMethod]) -> type[Section]:
    """The model of the `cam` section for a registry of methods: `method` is one of its names,
    and each method's settings are flat `cam.<setting>` keys (a name two methods share, or that
    the section already has, is a programming error)."""
    own: dict = {}
    for name, method in methods.items():
        for key, field in method.settings.model_fields.items() if method.settings else ():
            if key in CamCommon.model_fields or key in own:
                raise ValueError(f"cam method {name!r}: its setting {key!r} is already a cam setting")
            own[key] = (field.annotation, field)
    common = [(key, (field.annotation, field)) for key, field in CamCommon.model_fields.items()]
    cut = [key for key, _ in common].index(METHOD_SETTINGS_AFTER) + 1
    method = (Literal[tuple(methods)], Field("gap", description="The stage-1 classifier ([methods](methods.md))."))
    return create_model(
        "CamConfig",
        __base__=Section,
        __module__=__name__,
        __doc__=CAM_DOC,
        method=method,
        **dict(common[:cut]),
        **own,
        **dict(common[cut:]),
    )


CamConfig = cam_config_model(METHODS)


def method_of_setting(methods: Mapping[str, CamMethod] = METHODS) -> dict[str, str]:
    """`cam.<setting>` -> the method that reads it, for the settings of one method only."""
    return {key: name for name, method in methods.items() if method.settings for key in method.settings.model_fields}


def other_methods_settings(cfg, methods: Mapping[str, CamMethod] = METHODS) -> set[str]:
    """The settings only other methods than `cfg.method` read: left out of the cam key, so that
    `-o cam.minmax_k=5` under `method: gap` retrains nothing."""
    return {key for key, name in method_of_setting(methods).items() if name != cfg.method}
