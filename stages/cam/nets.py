"""Stage-1 classifiers. Every method is a `CamNet`: the training loop, CAM inference and
Grad-CAM++ only use this interface, so each method's maps flow into stage 2 unchanged.

    forward(x)           -> {"logits": (B, C), ...whatever its loss needs}
    loss(outputs, y)     -> (scalar, {name: float} for the log)
    features(x)          -> the tensor Grad-CAM++ differentiates against
    classify(f)          -> (B, C) logits from those features
    cam_maps(x)          -> (B, C, h, w) non-negative class maps at the method's own stride
    param_groups()       -> [(backbone params, 1.0), (new head params, head_lr_mult)]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import DropBlock2d, drop_block2d

from stages.common.backbones import ResNetFeatures


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """Multi-label loss over (B, C) logits and 0/1 labels. A label of -1 (uncertain, see
    data.datasets.ClassificationDataset) is left out: the loss is the mean over the known entries,
    which both kinds reduce to (soft margin is the mean of the per-entry binary cross-entropy)."""
    logits, labels = logits.float(), labels.float()
    known = labels >= 0
    if not bool(known.all()):
        per_entry = F.binary_cross_entropy_with_logits(logits, labels.clamp(min=0), reduction="none")
        return (per_entry * known).sum() / known.sum().clamp(min=1)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, labels)
    return F.multilabel_soft_margin_loss(logits, labels)


class CamNet(nn.Module):
    backbone: ResNetFeatures
    loss_kind: str = "soft_margin"
    cam_stride: int = 16

    def loss(self, outputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return classification_loss(outputs["logits"], labels, self.loss_kind), {}

    def head_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def param_groups(self, head_lr_mult: float = 10.0) -> list[tuple[list, float]]:
        head = [p for m in self.head_modules() for p in m.parameters()]
        head_ids = {id(p) for p in head}
        trunk = [p for p in self.parameters() if id(p) not in head_ids]
        return [(trunk, 1.0), (head, head_lr_mult)]


class FittingDropBlock2d(DropBlock2d):
    """torchvision's DropBlock2d with the block shrunk to the largest odd size that fits the map:
    torchvision clips the block to the map side and then refuses an even result (a 5-block on
    the 4x4 map of a 64 px crop at output stride 16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = min(self.block_size, x.shape[-2], x.shape[-1])
        size -= 1 - size % 2
        return drop_block2d(x, self.p, size, self.inplace, self.eps, self.training)


class GapNet(CamNet):
    """IRNet's classifier: ResNet (stride 16) -> GAP -> bias-free 1x1 conv.

    The CAM of class c is the same 1x1 conv applied before pooling. With `dropblock_prob` > 0
    DropBlock follows layer3 and layer4 during training: the regularized classifier of the
    chest X-ray pipeline, which spreads evidence beyond the single most discriminative spot.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        weights: str | None = None,
        loss: str = "soft_margin",
        dropblock_prob: float = 0.0,
        dropblock_size: int = 5,
    ):
        super().__init__()
        self.backbone = ResNetFeatures(backbone, weights)
        self.loss_kind = loss
        self.classifier = nn.Conv2d(self.backbone.channels[-1], num_classes, 1, bias=False)
        if dropblock_prob > 0:
            self.drop3 = FittingDropBlock2d(dropblock_prob, dropblock_size)
            self.drop4 = FittingDropBlock2d(dropblock_prob, dropblock_size)
        else:
            self.drop3 = self.drop4 = nn.Identity()

    def head_modules(self) -> list[nn.Module]:
        return [self.classifier]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = b.layer2(b.layer1(b.stem(x)))
        x = self.drop3(b.layer3(x))
        return self.drop4(b.layer4(x))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        pooled = features.mean(dim=(2, 3), keepdim=True)
        return self.classifier(pooled).flatten(1)

    def forward(self, x: torch.Tensor) -> dict:
        return {"logits": self.classify(self.features(x))}

    def cam_maps(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(F.conv2d(self.features(x), self.classifier.weight))
