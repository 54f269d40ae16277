"""torchvision ResNets as stride-16 feature extractors, with honest weight loading.

`weights` is None (random init) or any source stages.common.trunk_weights reads: "imagenet"
(torchvision's download: needs internet once), a wss cam artifact, or a torchvision / timm
ResNet checkpoint of the same depth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from data.errors import WssError
from stages.common.trunk_weights import IMAGENET_WEIGHTS as IMAGENET_WEIGHTS  # part of this module's interface
from stages.common.trunk_weights import RESNETS, read_trunk
from stages.common.trunk_weights import WeightsError as WeightsError
from stages.common.trunk_weights import read_weights_file as read_weights_file


def stage_channels(name: str) -> list[int]:
    """Output channels of [stem, layer1, layer2, layer3, layer4]."""
    expansion = 4 if name == "resnet50" else 1
    return [64] + [c * expansion for c in (64, 128, 256, 512)]


STAGE_NAMES = ("stem", "layer1", "layer2", "layer3", "layer4")
STAGE_STRIDES = (4, 4, 8, 16, 16)  # layer4 is dilated, not strided


def upsample_cells(x: torch.Tensor, factor: int, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly upsample a map by the integer stride ratio `factor`, onto a finer map of `size`.

    Every strided convolution and pooling of a ResNet trunk is centred (7x7 pad 3, 3x3 pad 1,
    1x1 pad 0), so cell n of a stride-s map is centred on pixel s n (not on s n + s / 2): fine
    cell m of the stride-(s / factor) map sits at coarse position m / factor. The coarse centres
    fall on every `factor`-th fine cell (interpolation with aligned corners over factor (h - 1) + 1
    cells); the fine cells past the last coarse centre take its value, as the border of any
    bilinear resize does. tests/test_backbones.py measures the centring on a real trunk.
    """
    if factor == 1:
        out = x
    else:
        height, width = x.shape[-2:]
        spanned = (factor * (height - 1) + 1, factor * (width - 1) + 1)
        out = F.interpolate(x, size=spanned, mode="bilinear", align_corners=True)
    if size[0] > factor * x.shape[-2] or size[1] > factor * x.shape[-1]:
        raise ValueError(f"a map of {tuple(x.shape[-2:])} upsampled x{factor} does not cover {tuple(size)}")
    pad_bottom, pad_right = max(0, size[0] - out.shape[-2]), max(0, size[1] - out.shape[-1])
    if pad_bottom or pad_right:
        out = F.pad(out, (0, pad_right, 0, pad_bottom), mode="replicate")
    return out[..., : size[0], : size[1]]


class ResNetFeatures(nn.Module):
    """ResNet trunk, output stride 16: layer4 keeps stride 1 and dilates its 3x3 convs by 2."""

    def __init__(self, name: str = "resnet50", weights: str | None = None):
        super().__init__()
        if name not in RESNETS:
            raise WssError(f"unknown backbone {name!r} (choose from {', '.join(RESNETS)})")
        net = RESNETS[name](weights=None)
        trunk = read_trunk(weights, name)  # complete and of this depth, or a one-line WeightsError
        if trunk is not None:
            net.load_state_dict(trunk, strict=False)  # all but the classifier (fc), which the trunk drops
        for module in net.layer4.modules():
            if isinstance(module, nn.Conv2d):
                if module.kernel_size == (3, 3):
                    module.stride, module.dilation, module.padding = (1, 1), (2, 2), (2, 2)
                elif module.stride == (2, 2):
                    module.stride = (1, 1)
        self.name = name
        self.channels = stage_channels(name)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.frozen_stages, self.freeze_bn = -1, False

    def freeze(self, frozen_stages: int = -1, freeze_bn: bool = False) -> None:
        """Keep the stem and layer1..layer`frozen_stages` at their initial weights (-1: none),
        and with `freeze_bn` normalise every BatchNorm with its stored statistics.

        IRNet trains its classifier this way (frozen_stages 2 and FixedBatchNorm): ImageNet
        statistics suit small batches of large crops better than the batches' own. A frozen
        stage also keeps its statistics, so that its weights and its normalisation stay a pair.
        """
        if not -1 <= frozen_stages <= 4:
            raise WssError(
                f"frozen_stages must be in -1..4 (-1 none, 0 stem, 1..4 up to layer1..4), got {frozen_stages}"
            )
        self.frozen_stages, self.freeze_bn = frozen_stages, freeze_bn
        for name in STAGE_NAMES[: frozen_stages + 1]:
            getattr(self, name).requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            for index, name in enumerate(STAGE_NAMES):
                stage = getattr(self, name)
                if index <= self.frozen_stages:
                    stage.eval()
                elif self.freeze_bn:
                    for module in stage.modules():
                        if isinstance(module, nn.BatchNorm2d):
                            module.eval()
        return self

    def forward_stages(self, x: torch.Tensor, last: int = 4) -> list[torch.Tensor]:
        """[stem (s4), layer1 (s4), layer2 (s8), layer3 (s16), layer4 (s16)], up to index `last`."""
        outputs = []
        for name in STAGE_NAMES[: last + 1]:
            x = getattr(self, name)(x)
            outputs.append(x)
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)[-1]
