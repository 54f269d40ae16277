"""The `seg` section of a run config."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from stages.common.settings import (
    BatchSize,
    CropSize,
    Epochs,
    Float,
    Keywords,
    LearningRate,
    Momentum,
    NamedWeights,
    Optimizer,
    ResizeLong,
    Section,
    WeightDecay,
)

EMPTY_MASK_RULE = (
    " Binary tasks only (multiclass: not in the key). Used only to predict (the seg stage's masks, "
    "`wss predict` and submission.csv): a new value reuses the trained segmenter, under either "
    "`checkpoint`. `wss tune` chooses it from image labels, without masks."
)
PREDICTION_ONLY = (
    " Used only to predict: a new value reuses the trained segmenter, unless `checkpoint: "
    "pseudo_holdout` predicts with it to choose the epoch."
)


class SegConfig(Section):
    """Stage 3: a segmentation-models-pytorch segmenter trained on the pseudo-labels."""

    arch: str = Field("Unet", description="Any segmentation-models-pytorch architecture name.")
    encoder: str = Field("resnet34", description="Any segmentation-models-pytorch encoder name.")
    encoder_weights: Optional[str] = Field(
        "imagenet",
        description="The encoder's start: null (random), `imagenet` (downloaded once), `cam` (the stage-1 "
        "classifier's trunk, which needs `encoder` = `cam.backbone`) or a local source: for the resnet18/34/50 "
        "encoders any source `cam.weights` takes (a wss cam artifact, whose cache key enters the key; a "
        "torchvision / timm ResNet checkpoint), for other encoders a state dict of the encoder (`tu-` "
        "encoders: a timm checkpoint of the network); a file's size and modification time enter the key.",
    )
    arch_options: Keywords = Field(
        {},
        description="Keyword arguments of the smp architecture, e.g. `{decoder_channels: [64, 32, 16, 16, 16]}` "
        "for a lighter Unet decoder on a CPU.",
    )
    losses: NamedWeights = Field(
        {"ce": 1.0, "dice": 1.0},
        description="The loss: a weighted sum of `ce`, `bce`, `dice`, `lovasz`, `focal` (from `smp.losses`).",
    )
    epochs: Epochs = 20
    batch_size: BatchSize = 16
    optimizer: Optimizer = "adamw"
    lr: LearningRate = 1e-3
    momentum: Momentum = 0.9
    weight_decay: WeightDecay = 1e-4
    crop_size: CropSize = 512
    resize_long: ResizeLong = [320, 640]
    # the checkpoint choice never looks at ground truth
    checkpoint: Literal["last", "pseudo_holdout"] = Field(
        "last",
        description="The model kept: the last epoch's, or the best epoch on the *pseudo-labels* of a "
        "held-out `holdout_fraction` of the train split.",
    )
    holdout_fraction: Float = Field(
        0.1,
        gt=0,
        le=0.9,
        description="The share of the train split held out under `checkpoint: pseudo_holdout` (else not in the key).",
    )
    threshold: Float = Field(
        0.5,
        ge=0,
        le=1,
        description="Binary tasks: the probability above which a pixel is "
        "foreground (multiclass takes the argmax: not in the key)." + PREDICTION_ONLY,
    )
    min_area: int = Field(
        0,
        ge=0,
        description="The empty-mask rule: connected foreground regions (8-connected) smaller than this many "
        "pixels are removed; counted at the prediction size (the prepared size on SIIM), scaled with "
        "the image's area by `wss predict`; 0: none." + EMPTY_MASK_RULE,
    )
    image_threshold: Float = Field(
        0.0,
        ge=0,
        le=1,
        description="The empty-mask rule: an image whose score (`image_score`) is below it gets an empty "
        "mask; 0: never." + EMPTY_MASK_RULE,
    )
    image_score: Literal["seg", "cam", "mean"] = Field(
        "seg",
        description="The empty-mask rule's image score, also what `image_scores.json` and the image AUC "
        "hold: `seg` the segmenter's largest foreground probability, `cam` the stage-1 classifier's "
        "probability (of the image resized to the prediction size), `mean` their mean." + EMPTY_MASK_RULE,
    )
    predict_size: Optional[int] = Field(
        None,
        ge=16,
        description="The long side images are resized to for "
        "prediction; null: the middle of `resize_long`." + PREDICTION_ONLY,
    )
