"""Min-max entropy localization (Belharbi et al., weakly supervised pointwise localization).

A localizer gives per-class maps S in [0, 1] and a soft mask M = sigmoid(k (S - 0.5)) (the
union over classes); a second classifier sees the image kept by the mask, x*M, and the rest,
x*(1-M). The classifier must recognise the labels from x*M (low entropy) while its
predictions on x*(1-M) are pushed to maximum entropy, so the mask has to take *all* the
evidence, not just the most discriminative spot. The localizer keeps its own classification
loss (GAP of its logit map), which also gives the image scores used for AUC. Multi-label
data use the per-class binary entropy. The heatmap is S.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stages.cam.nets import CamNet, classification_loss
from stages.common.backbones import ResNetFeatures


def binary_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-class entropy (nats) of sigmoid(logits), computed stably; log 2 at logit 0."""
    logits = logits.float()
    p = torch.sigmoid(logits)
    return p * F.softplus(-logits) + (1 - p) * F.softplus(logits)


def max_entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """log 2 - mean per-class binary entropy: >= 0, zero exactly for uniform (p = 0.5) predictions."""
    return math.log(2.0) - binary_entropy(logits).mean()


def split_image(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x*M, x*(1-M)) with the mask resized to the image: the two parts add up to x."""
    mask = F.interpolate(mask, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return x * mask, x * (1 - mask)


class MinMaxNet(CamNet):
    """Localizer: ResNet (stride 16) -> 1x1 conv with bias -> S = sigmoid; classifier: a second
    ResNet -> GAP -> linear.

    With `erase_steps` > 0 (recursive erasing) the localizer runs again on the image with the
    current mask erased, and S becomes the element-wise max over the passes, so later passes
    can add regions the first one missed; inference does the same passes so that the heatmap
    matches what was trained. Multi-scale + flip inference is used as it is: each scale's S
    is in [0, 1], and the sum over scales and flips is max-normalised per class.
    """

    def __init__(self, num_classes: int, backbone: str = "resnet50", weights: str | None = None,
                 loss: str = "bce", k: float = 10.0, entropy_weight: float = 1.0, erase_steps: int = 0):
        super().__init__()
        self.backbone = ResNetFeatures(backbone, weights)
        self.loss_kind = loss
        self.k, self.entropy_weight, self.erase_steps = k, entropy_weight, erase_steps
        self.localizer = nn.Conv2d(self.backbone.channels[-1], num_classes, 1, bias=True)
        self.classifier_trunk = ResNetFeatures(backbone, weights)
        self.classifier_fc = nn.Linear(self.classifier_trunk.channels[-1], num_classes)

    def head_modules(self) -> list[nn.Module]:
        return [self.localizer, self.classifier_fc]

    # -- the localizer
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.localizer(features).mean(dim=(2, 3))

    def soft_mask(self, heat: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) maps in [0, 1] -> (B, 1, h, w) soft mask of their union."""
        return torch.sigmoid(self.k * (heat - 0.5)).amax(dim=1, keepdim=True)

    def localize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image logits of the first pass, S after the erasing passes)."""
        logit_map = self.localizer(self.features(x))
        heat = torch.sigmoid(logit_map)
        for _ in range(self.erase_steps):
            _, rest = split_image(x, self.soft_mask(heat))
            heat = torch.maximum(heat, torch.sigmoid(self.localizer(self.features(rest))))
        return logit_map.mean(dim=(2, 3)), heat

    # -- the classifier of the masked parts
    def judge(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier_fc(self.classifier_trunk(x).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> dict:
        logits, heat = self.localize(x)
        mask = self.soft_mask(heat)
        kept, rest = split_image(x, mask)
        return {"logits": logits, "fg_logits": self.judge(kept), "bg_logits": self.judge(rest), "mask": mask}

    def loss(self, outputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        localizer = classification_loss(outputs["logits"], labels, self.loss_kind)
        foreground = classification_loss(outputs["fg_logits"], labels, self.loss_kind)
        background = max_entropy_loss(outputs["bg_logits"])
        total = localizer + foreground + self.entropy_weight * background
        return total, {"loc_loss": localizer.detach(), "fg_loss": foreground.detach(),
                       "bg_entropy_gap": background.detach(), "mask_area": outputs["mask"].detach().float().mean()}

    def cam_maps(self, x: torch.Tensor) -> torch.Tensor:
        return self.localize(x)[1]
