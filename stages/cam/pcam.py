"""PCAM: probabilistic-CAM pooling (Ye et al. 2020, CheXpert localization).

A bias-carrying 1x1 classifier turns the feature map into a logit map; p = sigmoid(map)
says how likely each position shows the class; the pooled feature of class c is the
p_c-weighted average of the feature map (weights normalised over space), and the *same*
classifier applied to that pooled feature gives the image logit of class c. Trained with
the configured loss (the preset uses BCE).

The heatmap is the logit map (ReLU'd like any CAM), not p. Both rank the positions alike, but
p saturates: sigmoid is 1.0 in float32 above a logit of about 17, and the CAM files' float16
cannot tell 0.9995 from 1, so a trained PCAM's p has many cells tied at its maximum, over the
object and beyond, and its peak is merely the first of them (measured in docs/methods.md;
`bench/cam_heatmaps.py` compares the two on any model). The image logit is the p-weighted mean
of the logit map, so a confidently present class has a positive peak there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stages.cam.nets import CamNet
from stages.common.backbones import ResNetFeatures


def pcam_pool(features: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) features, (B, C, h, w) probabilities -> (B, C, D) per-class pooled features."""
    weights = prob.flatten(2)
    weights = weights / weights.sum(dim=2, keepdim=True).clamp_min(1e-8)
    return torch.einsum("bcn,bdn->bcd", weights, features.flatten(2))


class PcamNet(CamNet):
    """ResNet (stride 16) -> 1x1 conv with bias -> sigmoid map -> PCAM pooling -> same 1x1 conv.

    Multi-scale + flip inference is used as it is: the per-scale ReLU'd logit maps are summed
    over scales and flips and divided by their per-class maximum like any CAM.
    """

    def __init__(self, num_classes: int, backbone: str = "resnet50", weights: str | None = None, loss: str = "bce"):
        super().__init__()
        self.backbone = ResNetFeatures(backbone, weights)
        self.loss_kind = loss
        self.classifier = nn.Conv2d(self.backbone.channels[-1], num_classes, 1, bias=True)

    def head_modules(self) -> list[nn.Module]:
        return [self.classifier]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def logit_map(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)

    def probability_map(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit_map(features))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        pooled = pcam_pool(features, self.probability_map(features))  # (B, C, D)
        weight = self.classifier.weight.flatten(1)  # (C, D)
        return (pooled * weight).sum(dim=2) + self.classifier.bias

    def forward(self, x: torch.Tensor) -> dict:
        return {"logits": self.classify(self.features(x))}

    def cam_maps(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.logit_map(self.features(x)))
