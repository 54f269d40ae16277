"""Multi-scale CAM with learned layer relevance weights (chest X-ray localization papers).

A bias-free 1x1 CAM classifier sits on each chosen backbone stage; per class, convex weights
over the stages (softmax of learned logits) mix the per-stage image scores for the loss, and
at inference the CAM is the same convex mix of the per-stage CAMs upsampled to the finest
chosen stage. Shallow stages add resolution, deep stages add semantics, and each class learns
how much to trust each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from data.errors import WssError
from stages.cam.nets import CamNet
from stages.common.backbones import STAGE_NAMES, STAGE_STRIDES, ResNetFeatures, upsample_cells


class MultiscaleNet(CamNet):
    """ResNet stages `stages` (indices into [stem, layer1, layer2, layer3, layer4]) -> one 1x1
    classifier each -> GAP scores mixed by per-class softmax weights.

    `features(x)` concatenates the chosen stages' features upsampled (bilinear, by their stride
    ratio, cells kept over their pixels: see upsample_cells) to the finest stage, so the forward
    pass, Grad-CAM++ and `cam_maps` all use one tensor; a 1x1 conv commutes with that linear
    upsampling, so its CAM is exactly the weighted sum of the upsampled per-stage CAMs.
    Multi-scale + flip inference is used as it is (maps at stride `cam_stride` are resized to
    stride 4 by the inference code).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        weights: str | None = None,
        loss: str = "soft_margin",
        stages: list[int] = (2, 3, 4),
    ):
        super().__init__()
        stages = list(stages)
        if not stages or len(set(stages)) != len(stages) or not all(0 <= s <= 4 for s in stages):
            raise WssError(
                f"cam.multiscale_stages must be distinct indices in 0..4 (stem, layer1..layer4), got {stages}"
            )
        self.backbone = ResNetFeatures(backbone, weights)
        self.loss_kind = loss
        self.stages = sorted(stages)
        for name in STAGE_NAMES[self.stages[-1] + 1 :]:
            # never run, so frozen: no loss reaches them (multi-process training refuses such
            # parameters), and the trunk handed to stage 2 keeps their initial weights
            getattr(self.backbone, name).requires_grad_(False)
        self.cam_stride = min(STAGE_STRIDES[s] for s in self.stages)
        self.splits = [self.backbone.channels[s] for s in self.stages]
        self.classifiers = nn.ModuleList(nn.Conv2d(c, num_classes, 1, bias=False) for c in self.splits)
        self.mixer = StageMixer(num_classes, len(self.stages))

    def head_modules(self) -> list[nn.Module]:
        return [self.classifiers, self.mixer]

    def stage_weights(self) -> torch.Tensor:
        """(C, K) convex weights: non-negative, summing to 1 over the stages of each class."""
        return torch.softmax(self.mixer.logits.float(), dim=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        all_stages = self.backbone.forward_stages(x, last=self.stages[-1])
        chosen = [all_stages[s] for s in self.stages]
        size = chosen[0].shape[-2:]  # sorted: the first is (one of) the finest
        chosen = [upsample_cells(f, STAGE_STRIDES[s] // self.cam_stride, size) for f, s in zip(chosen, self.stages)]
        return torch.cat(chosen, dim=1)

    def stage_cams(self, features: torch.Tensor) -> torch.Tensor:
        """(B, K, C, h, w): the raw CAM of every stage."""
        parts = torch.split(features, self.splits, dim=1)
        return torch.stack([conv(part) for conv, part in zip(self.classifiers, parts)], dim=1)

    def combine(self, per_stage: torch.Tensor) -> torch.Tensor:
        """Mix (B, K, C, ...) over K with the per-class weights -> (B, C, ...)."""
        weights = self.stage_weights().to(per_stage.dtype).t()  # (K, C)
        shape = (1, *weights.shape) + (1,) * (per_stage.dim() - 3)
        return (per_stage * weights.view(shape)).sum(dim=1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.combine(self.stage_cams(features).mean(dim=(3, 4)))

    def forward(self, x: torch.Tensor) -> dict:
        return {"logits": self.classify(self.features(x))}

    def cam_maps(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.combine(self.stage_cams(self.features(x))))


class StageMixer(nn.Module):
    """The learned per-class logits over the stages (uniform weights at the start)."""

    def __init__(self, num_classes: int, num_stages: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_classes, num_stages))
