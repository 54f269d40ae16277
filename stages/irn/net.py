"""The Inter-pixel Relation Network's boundary branch (IRNet, Ahn et al. 2019).

Features of the five backbone stages each pass a 1x1 conv + GroupNorm + ReLU, are upsampled to
stride 4 by their stride ratio (each cell over the pixel it is centred on: see upsample_cells)
and fused by a 1x1 conv into one boundary map (sigmoid). Affinities between pixels are derived from it
(stages/irn/affinity.py), so the boundary map is all the network learns.
The displacement branch (instance segmentation) is not part of wss.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from stages.base import StageInputError
from stages.cam.model_file import MODEL_FILE as CAM_MODEL_FILE
from stages.cam.model_file import read_cam_trunk
from stages.common.backbones import RESNETS, STAGE_STRIDES, ResNetFeatures, upsample_cells
from stages.common.model_files import load_weights, read_model_file

BRANCH_CHANNELS = 32
MODEL_FILE = "model.safetensors"  # the irn artifact's trained boundary network


def boundary_block(in_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, BRANCH_CHANNELS, 1, bias=False), nn.GroupNorm(4, BRANCH_CHANNELS), nn.ReLU(inplace=True)
    )


class BoundaryNet(nn.Module):
    """ResNet trunk (frozen or fine-tuned) + boundary branch; forward -> logits (B, 1, H/4, W/4)."""

    def __init__(self, backbone: ResNetFeatures, freeze_backbone: bool = True):
        super().__init__()
        self.backbone = backbone
        self.freeze_backbone = freeze_backbone
        # the stem (64 channels) and the four layers
        self.branches = nn.ModuleList(boundary_block(c) for c in [64, *backbone.channels[1:]])
        self.fuse = nn.Conv2d(BRANCH_CHANNELS * len(self.branches), 1, 1, bias=True)
        if freeze_backbone:
            for parameter in self.backbone.parameters():
                parameter.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # a frozen trunk keeps its BatchNorm statistics
        return self

    def head_modules(self) -> list[nn.Module]:
        return [self.branches, self.fuse]

    def param_groups(self, head_lr_mult: float = 10.0) -> list[tuple[list, float]]:
        head = [p for m in self.head_modules() for p in m.parameters()]
        trunk = [] if self.freeze_backbone else list(self.backbone.parameters())
        return [(trunk, 1.0), (head, head_lr_mult)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.freeze_backbone:
            with torch.no_grad():
                stages = self.backbone.forward_stages(x)
        else:
            stages = self.backbone.forward_stages(x)
        size = stages[0].shape[-2:]  # stride 4
        fused = []
        for branch, feature, stride in zip(self.branches, stages, STAGE_STRIDES):
            out = branch(feature.detach() if self.freeze_backbone else feature)
            fused.append(upsample_cells(out, stride // STAGE_STRIDES[0], size))
        return self.fuse(torch.cat(fused, dim=1))

    @torch.no_grad()
    def boundary(self, x: torch.Tensor) -> torch.Tensor:
        """Boundary probabilities (H/4, W/4) of one image (1, 3, H, W), averaged with its mirror."""
        both = torch.cat([x, x.flip(-1)])
        prob = torch.sigmoid(self(both).float())
        return (prob[0, 0] + prob[1, 0].flip(-1)) / 2


def build_backbone(name: str, init: str, cam_artifact: Path | None, weights: str | None) -> ResNetFeatures:
    """The IRN trunk: `init` cam (the stage-1 classifier's trunk), imagenet (`weights`), none, or
    any other source stages.common.trunk_weights reads (a cam artifact, a ResNet checkpoint)."""
    if init == "cam":
        path = Path(cam_artifact) / CAM_MODEL_FILE
        if not path.is_file():
            raise StageInputError(f"irn: the cam artifact {cam_artifact} has no {CAM_MODEL_FILE}")
        backbone = ResNetFeatures(name, weights=None)
        _, trunk = read_cam_trunk(path)
        load_weights(backbone, trunk, path, f"{name} trunk of the IRN", "cam")
        return backbone
    if init == "imagenet":
        return ResNetFeatures(name, weights=weights or "imagenet")
    return ResNetFeatures(name, weights=None if init == "none" else init)


def load_boundary_net(artifact: Path, device: torch.device) -> BoundaryNet:
    """The trained boundary network of an irn artifact (the pseudo stage walks with it)."""
    path = Path(artifact) / MODEL_FILE
    state = read_model_file(path, "irn", "IRN model", "irn", required={"backbone": str})
    backbone = state.meta["backbone"]
    if backbone not in RESNETS:
        raise StageInputError(
            f"{path}: unreadable IRN model (unknown backbone {backbone!r}); recompute it with wss run --force irn"
        )
    model = BoundaryNet(ResNetFeatures(backbone, weights=None), freeze_backbone=False)
    load_weights(model, state.tensors, path, f"{backbone} IRN", "irn")
    return model.to(device).eval()
