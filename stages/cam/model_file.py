"""The cam stage's model file, as the stages that start from the classifier read it: its
metadata, and the weights of its ResNet trunk (the irn stage's trunk, seg's encoder with
`seg.encoder_weights: cam`). Loading the whole classifier is stages.cam.classifier."""

from __future__ import annotations

from pathlib import Path

from stages.base import StageInputError
from stages.common.model_files import StateFile, read_model_file

MODEL_FILE = "model.safetensors"
TRUNK_PREFIX = "backbone."  # a CamNet holds its ResNetFeatures trunk as `backbone` (stages/cam/nets.py)


def read_cam_model(artifact: Path) -> StateFile:
    """The model file of a cam artifact: its weights and metadata (config, classes), checked."""
    path = Path(artifact) / MODEL_FILE
    state = read_model_file(path, "cam", "cam model", "cam", required={"config": dict, "classes": list})
    if not all(isinstance(name, str) for name in state.meta["classes"]):
        raise StageInputError(
            f"{path}: unreadable cam model (its classes are not names); recompute it with wss run --force cam"
        )
    return state


def read_cam_trunk(path: Path, required: dict | None = None) -> tuple[dict, dict]:
    """(metadata, the trunk's weights under their stages.common.backbones.ResNetFeatures names)
    of the cam model file `path`, its metadata checked to hold `required` (read_model_file)."""
    state = read_model_file(path, "cam", "cam model", "cam", required=required)
    trunk = {k[len(TRUNK_PREFIX) :]: v for k, v in state.tensors.items() if k.startswith(TRUNK_PREFIX)}
    return state.meta, trunk
