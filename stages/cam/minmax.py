"""Min-max entropy localization (Belharbi et al., weakly supervised pointwise localization).

A localizer gives per-class logit maps; their probability-weighted sum, rescaled to [0, 1]
per image, is S, and the soft mask is M = sigmoid(k (S - 0.5)). A classifier sees the image
kept by the mask, x*M, and the rest, x*(1-M): it must recognise the labels from x*M (low
entropy) while its predictions on x*(1-M) are pushed to maximum entropy. The localizer keeps
its own classification loss (GAP of its logit map), which also gives the image scores used
for AUC. Multi-label data use the per-class binary entropy. The heatmap of class c is its
logit map rescaled to [0, 1] the same way (a sigmoid of the logits saturates wherever they
are large and gives no extent).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from stages.cam.nets import CamNet, classification_loss
from stages.common.backbones import STAGE_STRIDES, ResNetFeatures, upsample_cells


def binary_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-class entropy (nats) of sigmoid(logits), computed stably; log 2 at logit 0."""
    logits = logits.float()
    p = torch.sigmoid(logits)
    return p * F.softplus(-logits) + (1 - p) * F.softplus(logits)


def max_entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """log 2 - mean per-class binary entropy: >= 0, zero exactly for uniform (p = 0.5) predictions."""
    return math.log(2.0) - binary_entropy(logits).mean()


def rescale(maps: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> each map rescaled to [0, 1] by its own minimum and maximum."""
    flat = maps.flatten(2)
    low, high = flat.amin(dim=2, keepdim=True), flat.amax(dim=2, keepdim=True)
    return ((flat - low) / (high - low).clamp_min(1e-6)).view_as(maps)


def split_image(
    x: torch.Tensor, mask: torch.Tensor, stride: int = STAGE_STRIDES[-1]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x*M, x*(1-M)) with the stride-`stride` mask upsampled onto the image, each cell over its
    own pixels (upsample_cells): the two parts add up to x."""
    mask = upsample_cells(mask, stride, x.shape[-2:])
    return x * mask, x * (1 - mask)


@contextmanager
def statistics_kept(module: nn.Module):
    """Within the block, the BatchNorm layers of `module` normalise as usual (batch statistics
    while training) but leave their running statistics as they are (momentum 0)."""
    layers = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(layers, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


class MinMaxNet(CamNet):
    """One ResNet trunk (stride 16) shared by the localizer (1x1 conv with bias -> class logit
    maps) and the classifier of the masked parts (GAP -> linear), as in the authors' code.

    The mask is detached, also as there: the x*M and x*(1-M) terms train the shared trunk and
    the classifier head, and the localizer head learns from its own classification loss on
    that trunk. Letting those terms reach the mask instead (measured on the development set,
    `wss prepare synthetic --seed 1`, demo settings) collapsed it to an image-independent band
    over the middle of the picture: CAM mIoU 0.193 against 0.518 with the mask detached.

    With `erase_steps` > 0 (recursive erasing) the localizer runs again on the image with the
    current mask erased, and the map becomes the element-wise max over the passes, so later
    passes can add regions the first one missed; inference does the same passes so that the
    heatmap matches what was trained. Multi-scale + flip inference is used as it is: each
    scale's map is in [0, 1], and the sum over scales and flips is max-normalised per class.

    The passes over x*M and x*(1-M) leave the trunk's BatchNorm running statistics alone:
    those statistics normalise the whole images the maps are made from, and two of the three
    passes per step (half-blanked images) would otherwise make up two thirds of them.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        weights: str | None = None,
        loss: str = "bce",
        k: float = 10.0,
        entropy_weight: float = 1.0,
        erase_steps: int = 0,
    ):
        super().__init__()
        self.backbone = ResNetFeatures(backbone, weights)
        self.loss_kind = loss
        self.k, self.entropy_weight, self.erase_steps = k, entropy_weight, erase_steps
        self.localizer = nn.Conv2d(self.backbone.channels[-1], num_classes, 1, bias=True)
        self.classifier_fc = nn.Linear(self.backbone.channels[-1], num_classes)

    def head_modules(self) -> list[nn.Module]:
        return [self.localizer, self.classifier_fc]

    # -- the localizer
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.localizer(features).mean(dim=(2, 3))

    def soft_mask(self, heat: torch.Tensor) -> torch.Tensor:
        """(B, 1, h, w) map in [0, 1] -> (B, 1, h, w) soft mask."""
        return torch.sigmoid(self.k * (heat - 0.5))

    def mask_map(self, logit_map: torch.Tensor) -> torch.Tensor:
        """The class maps weighted by the predicted class probabilities, rescaled to [0, 1]."""
        weights = torch.sigmoid(logit_map.mean(dim=(2, 3))).detach()[:, :, None, None]
        return rescale((weights * logit_map).sum(dim=1, keepdim=True))

    def localize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image logits of the first pass, per-class maps in [0, 1], mask) after the erasing passes."""
        logit_map = self.localizer(self.features(x))
        heat, area = rescale(logit_map), self.mask_map(logit_map)
        for _ in range(self.erase_steps):
            _, rest = split_image(x, self.soft_mask(area))
            more = self.localizer(self.features(rest))
            heat, area = torch.maximum(heat, rescale(more)), torch.maximum(area, self.mask_map(more))
        return logit_map.mean(dim=(2, 3)), heat, self.soft_mask(area)

    # -- the classifier of the masked parts
    def judge(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier_fc(self.features(x).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> dict:
        logits, _, mask = self.localize(x)
        kept, rest = split_image(x, mask.detach())
        with statistics_kept(self.backbone):
            fg_logits, bg_logits = self.judge(kept), self.judge(rest)
        return {"logits": logits, "fg_logits": fg_logits, "bg_logits": bg_logits, "mask": mask}

    def loss(self, outputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        localizer = classification_loss(outputs["logits"], labels, self.loss_kind)
        foreground = classification_loss(outputs["fg_logits"], labels, self.loss_kind)
        background = max_entropy_loss(outputs["bg_logits"])
        total = localizer + foreground + self.entropy_weight * background
        return total, {
            "loc_loss": localizer.detach(),
            "fg_loss": foreground.detach(),
            "bg_entropy_gap": background.detach(),
            "mask_area": outputs["mask"].detach().float().mean(),
        }

    def cam_maps(self, x: torch.Tensor) -> torch.Tensor:
        return self.localize(x)[1]
