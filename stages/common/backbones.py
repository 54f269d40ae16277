"""torchvision ResNets as stride-16 feature extractors, with honest weight loading.

`weights` is None (random init), "imagenet" (torchvision's download: needs internet once) or
a path to a local state dict (.pth) of the same torchvision architecture.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from data.errors import WssError

RESNETS = {"resnet18": models.resnet18, "resnet34": models.resnet34, "resnet50": models.resnet50}
IMAGENET_WEIGHTS = {
    "resnet18": models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": models.ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": models.ResNet50_Weights.IMAGENET1K_V1,
}


class WeightsError(WssError):
    pass


def stage_channels(name: str) -> list[int]:
    """Output channels of [stem, layer1, layer2, layer3, layer4]."""
    expansion = 4 if name == "resnet50" else 1
    return [64] + [c * expansion for c in (64, 128, 256, 512)]


def load_state_dict(name: str, weights: str | None) -> dict | None:
    if weights is None:
        return None
    if weights == "imagenet":
        try:
            return IMAGENET_WEIGHTS[name].get_state_dict(progress=False)
        except Exception as error:  # urllib/ssl/socket errors differ by platform
            url = IMAGENET_WEIGHTS[name].url
            raise WeightsError(
                f"could not download ImageNet weights for {name} ({type(error).__name__}: {error}). "
                f"Offline? Download {url} elsewhere and set `cam.weights: /path/to/{url.rsplit('/', 1)[-1]}` "
                f"(or `-o cam.weights=/path`), or `cam.weights: null` to train from scratch."
            ) from None
    return read_weights_file(Path(weights).expanduser(), f"a torchvision {name} state dict")


def read_weights_file(path: Path, expected: str, error: type[WssError] = WeightsError, setting: str = "") -> dict:
    """A state dict from a local .pth / .pt (torch) or .safetensors file, unwrapped from a
    {"state_dict": ...} checkpoint; a missing or unreadable file raises `error` in one line naming
    it (after the `setting` that names it, when given)."""
    where = f"{setting}: " if setting else ""
    if not path.is_file():
        raise error(f"{where}weights file not found: {path} (expected {expected})")
    problem = file_problem(path)
    if problem is None:
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path), device="cpu")
            else:
                with warnings.catch_warnings():  # a legacy pickle's protocol: not the file's fault
                    warnings.filterwarnings("ignore", message="Detected pickle protocol")
                    state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as reason:
            problem = load_problem(reason)
    if problem is not None:
        raise error(f"{where}{path}: not a readable PyTorch state dict ({problem}; expected {expected})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise error(f"{where}{path}: holds a {type(state).__name__}, not a state dict (expected {expected})")
    return state


def file_problem(path: Path) -> str | None:
    """What makes a weights file unreadable before any loader tries it: empty, or (a .pth / .pt)
    neither of torch's formats, a zip archive or a pickle (a text file, random bytes)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(2)
    except OSError as failure:
        return f"cannot read it: {failure.strerror}"
    if not head:
        return "the file is empty"
    if path.suffix != ".safetensors" and not head.startswith((b"PK", b"\x80")):
        return "not a PyTorch file: neither a zip archive nor a pickle"
    return None


def load_problem(reason: Exception) -> str:
    """Why torch or safetensors refused a file, in one line: their messages span several lines,
    and the weights-only unpickler's advises loading the file in a way that can run its code."""
    text, prefix = str(reason), ""
    if text.startswith("Weights only load failed"):  # more than tensors (code, objects), or garbled
        text = (
            text.split("WeightsUnpickler error:", 1)[1]
            if "WeightsUnpickler error:" in text
            else "\n".join(text.splitlines()[1:])
        )
        prefix = "torch's weights-only loader refused it: "
    first = next((line.strip() for line in text.splitlines() if line.strip()), "").rstrip(".")
    return prefix + first[:200] if first else type(reason).__name__


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
        state = load_state_dict(name, weights)
        if state is not None:
            try:
                missing, unexpected = net.load_state_dict(state, strict=False)
            except RuntimeError as error:  # tensor shapes differ: another architecture
                first = str(error).strip().splitlines()[-1].strip()
                raise WeightsError(f"weights {weights} do not fit {name}: {first}") from None
            trunk_missing = [k for k in missing if not k.startswith("fc.")]
            if trunk_missing:
                raise WeightsError(f"weights {weights} do not fit {name}: missing {trunk_missing[:3]}...")
            # keys the trunk lacks mean another architecture, e.g. a resnet34 file (its extra
            # blocks) given for a resnet18, whose shared blocks have the same shapes
            extra = [k for k in unexpected if not k.startswith("fc.")]
            if extra:
                raise WeightsError(
                    f"weights {weights} do not fit {name}: {len(extra)} unexpected keys "
                    f"{', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''} "
                    f"(the weights of another network?)"
                )
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
