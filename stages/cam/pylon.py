"""PYLON: Pyramid Localization Network (Preechakul et al. 2022, chest X-ray localization).

Encoder -> pyramid attention on the deepest feature -> three upsampling modules with
encoder skips down to stride 4 -> 1x1 head giving per-class logit maps; the image logit is
the global *max* of the map. There is no global average pooling and no GroupNorm anywhere,
so the stride-4 logit map itself is the heatmap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stages.cam.nets import CamNet
from stages.common.backbones import STAGE_STRIDES, ResNetFeatures, upsample_cells


def conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def upsample_like(x: torch.Tensor, ref: torch.Tensor, factor: int) -> torch.Tensor:
    """A trunk stage's map `x` upsampled by its stride ratio `factor` onto `ref`'s grid
    (upsample_cells): a coarse cell stays over the pixel it is centred on."""
    return upsample_cells(x, factor, ref.shape[-2:])


def unpool(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The inverse of the pyramid's 2x2 max-pool: cell m pooled cells 2m and 2m + 1, so it is
    centred between them, unlike a trunk's centred strides; bilinear x2 without aligned corners
    puts it there, and the crop drops the half cell ceil_mode added."""
    up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    return up[..., : ref.shape[-2], : ref.shape[-1]]


class PyramidAttention(nn.Module):
    """A one-channel attention pyramid multiplying a 1x1-projected feature.

    Three levels, each halving the resolution with a max-pool and then a 7x7, 5x5 and 3x3
    conv-BN-ReLU; coarse levels are upsampled x2 and added to finer ones, the sum is upsampled
    x2 to the input size and multiplies the projection. ceil_mode keeps tiny maps at least 1x1
    (cell m pools the cells 2m, 2m + 1: `unpool` puts it back over them).
    (PAN's global-pooling branch is left out, as in PYLON.)
    """

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.project = conv_bn_relu(cin, cout, 1)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.down7 = conv_bn_relu(cin, 1, 7)
        self.down5 = conv_bn_relu(1, 1, 5)
        self.down3 = conv_bn_relu(1, 1, 3)
        self.out7 = conv_bn_relu(1, 1, 7)
        self.out5 = conv_bn_relu(1, 1, 5)
        self.out3 = conv_bn_relu(1, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a7 = self.down7(self.pool(x))
        a5 = self.down5(self.pool(a7))
        a3 = self.down3(self.pool(a5))
        att = self.out3(a3)
        att = self.out5(a5) + unpool(att, a5)
        att = self.out7(a7) + unpool(att, a7)
        return self.project(x) * unpool(att, x)


class Upsample(nn.Module):
    """Bilinearly upsample the top-down path by `factor` (its stride / the skip's stride) onto
    the skip's grid and add the skip through two 1x1 conv-BN-ReLU (the first keeps its width):
    the published model's default "2layer" UP module."""

    def __init__(self, skip_channels: int, channels: int, factor: int):
        super().__init__()
        self.skip = nn.Sequential(
            conv_bn_relu(skip_channels, skip_channels, 1), conv_bn_relu(skip_channels, channels, 1)
        )
        self.factor = factor

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return upsample_like(x, skip, self.factor) + self.skip(skip)


class PylonNet(CamNet):
    """ResNet (layer4 at stride 16) + pyramid attention + decoder (skips layer3, layer2, layer1).

    Multi-scale + flip inference is used as it is: the stride-4 logit maps of each scale are
    ReLU'd, resized to the common stride-4 grid, summed and max-normalised per class.
    """

    cam_stride = 4

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        weights: str | None = None,
        loss: str = "bce",
        channels: int = 128,
    ):
        super().__init__()
        self.backbone = ResNetFeatures(backbone, weights)
        self.loss_kind = loss
        enc = self.backbone.channels
        self.attention = PyramidAttention(enc[4], channels)
        # strides 16 (layer4) -> 16 (layer3) -> 8 (layer2) -> 4 (layer1)
        self.up = nn.ModuleList(
            [Upsample(enc[i], channels, STAGE_STRIDES[i + 1] // STAGE_STRIDES[i]) for i in (3, 2, 1)]
        )
        self.head = nn.Conv2d(channels, num_classes, 1)

    def head_modules(self) -> list[nn.Module]:
        return [self.attention, self.up, self.head]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder output at stride 4 (what Grad-CAM++ differentiates against)."""
        stages = self.backbone.forward_stages(x)
        y = self.attention(stages[4])
        for module, skip in zip(self.up, (stages[3], stages[2], stages[1])):
            y = module(y, skip)
        return y

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features).amax(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> dict:
        logit_map = self.head(self.features(x))
        return {"logits": logit_map.amax(dim=(2, 3)), "logit_map": logit_map}

    def cam_maps(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.head(self.features(x)))
