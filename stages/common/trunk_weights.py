"""The weights a ResNet trunk starts from, read from any source a config names: `cam.weights`,
`seg.encoder_weights` (smp's resnet encoders) and `irn.backbone_init` all go through `read_trunk`.

A source is
- `imagenet`: torchvision's ImageNet weights (downloaded once into torch's cache);
- a wss cam artifact, its folder or its model file: the trunk of a trained stage-1 classifier of
  any method (its head is left out: whoever loads the trunk builds a new one);
- a ResNet checkpoint file (.pth / .pt / .safetensors) of torchvision or timm, bare or wrapped in
  {"state_dict": ...} / {"model": ...}, its names optionally under DistributedDataParallel's
  `module.`. timm's plain ResNets (resnet18/34/50, e.g. `resnet50.a1_in1k`) name their tensors as
  torchvision's do (conv1, bn1, layer1..4 with downsample.0/.1, fc); timm's published files may
  lack BatchNorm's `num_batches_tracked` counters, which only count updates and start at zero here.
  Variants with other layers (the deep stem of resnet50d: conv1.0, ...) do not fit and are refused.

Loading never runs code: a safetensors file is parsed, any other through torch's restricted
unpickler (weights_only=True). The trunk comes back under torchvision's names (smp's resnet
encoders use them too), checked against the expected depth: a file of another depth is one line
naming the file and both depths, before any weight is copied.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from torchvision import models

from data.errors import WssError
from stages.base import StageInputError
from stages.cam.model_file import MODEL_FILE as CAM_MODEL_FILE
from stages.cam.model_file import read_cam_trunk
from stages.common.model_files import FORMAT

RESNETS = {"resnet18": models.resnet18, "resnet34": models.resnet34, "resnet50": models.resnet50}
IMAGENET_WEIGHTS = {
    "resnet18": models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": models.ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": models.ResNet50_Weights.IMAGENET1K_V1,
}
# (bottleneck blocks, blocks in layer1..4) of each ResNet depth: what tells them apart by names alone
DEPTHS = {
    "resnet18": (False, (2, 2, 2, 2)),
    "resnet34": (False, (3, 4, 6, 3)),
    "resnet50": (True, (3, 4, 6, 3)),
    "resnet101": (True, (3, 4, 23, 3)),
    "resnet152": (True, (3, 8, 36, 3)),
}
WRAPPERS = ("state_dict", "model")  # the checkpoint entries that hold the weights (training scripts, timm)
# A CamNet's trunk (stages.common.backbones.ResNetFeatures) keeps torchvision's conv1 / bn1 in its stem
CAM_STEM_NAMES = {"stem.0.": "conv1.", "stem.1.": "bn1."}


class WeightsError(WssError):
    pass


def read_trunk(
    source: str | None,
    backbone: str,
    *,
    setting: str = "",
    depth_setting: str = "",
    error: type[WssError] = WeightsError,
) -> dict[str, torch.Tensor] | None:
    """The trunk weights of ResNet `backbone` (conv1, bn1, layer1..4; no fc) from `source` (see the
    module docstring), under torchvision's names, every tensor the trunk has present with its
    shape; None for a null source (random initialisation). Every problem raises `error` in one
    line, after the `setting` that named the source and naming `depth_setting` (e.g. cam.backbone)
    where the depths differ."""
    if source is None:
        return None
    where = f"{setting}: " if setting else ""
    if backbone not in RESNETS:
        raise error(f"{where}no {backbone} trunk can be read (ResNet trunks: {', '.join(RESNETS)})")
    if source == "imagenet":
        return check_trunk(imagenet_state(backbone, where), backbone, "ImageNet", where, depth_setting, error)
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / CAM_MODEL_FILE).is_file():
            raise error(f"{where}{path} is a folder without {CAM_MODEL_FILE}: not a wss cam artifact")
        path = path / CAM_MODEL_FILE
    return check_trunk(read_source(path, backbone, where, error), backbone, path, where, depth_setting, error)


def imagenet_state(backbone: str, where: str = "") -> dict:
    """torchvision's ImageNet weights of `backbone`, downloaded once into torch's cache; offline,
    a WeightsError that says how to use a downloaded file instead."""
    try:
        return IMAGENET_WEIGHTS[backbone].get_state_dict(progress=False)
    except Exception as error:  # urllib/ssl/socket errors differ by platform
        url = IMAGENET_WEIGHTS[backbone].url
        raise WeightsError(
            f"{where}could not download ImageNet weights for {backbone} ({type(error).__name__}: {error}). "
            f"Offline? Download {url} elsewhere and set `cam.weights: /path/to/{url.rsplit('/', 1)[-1]}` "
            f"(or `-o cam.weights=/path`), or `cam.weights: null` to train from scratch."
        ) from None


def is_wss_file(path: Path) -> bool:
    """Whether `path` is a safetensors file wss wrote (read from its header alone)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return (handle.metadata() or {}).get("format") == FORMAT
    except Exception:  # noqa: BLE001 - any unreadable header: not a wss file, read_weights_file says why
        return False


def read_source(path: Path, backbone: str, where: str, error: type[WssError]) -> dict:
    """The tensors of a cam artifact's model file or of a checkpoint file, under torchvision's
    names where the source is a wss cam model."""
    if path.is_file() and is_wss_file(path):
        try:
            _, trunk = read_cam_trunk(path)
        except StageInputError as problem:  # another kind of wss file, a garbled one
            raise error(f"{where}{problem}") from None
        return {rename_cam_key(key): value for key, value in trunk.items()}
    return unwrap(read_weights_file(path, f"a {backbone} state dict or a wss cam artifact", error, setting=where[:-2]))


def rename_cam_key(key: str) -> str:
    for old, new in CAM_STEM_NAMES.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def unwrap(state: dict) -> dict:
    """The weights of a checkpoint: inside its {"state_dict"/"model": ...} entry where it has one,
    without DistributedDataParallel's `module.` prefix."""
    for name in WRAPPERS:
        if isinstance(state.get(name), dict):
            state = state[name]
            break
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def trunk_depth(names) -> str | None:
    """The ResNet depth whose blocks these tensor names hold, or None for no known ResNet."""
    blocks = []
    for layer in range(1, 5):
        found = {m.group(1) for m in (re.match(rf"layer{layer}\.(\d+)\.", n) for n in names) if m}
        blocks.append(len(found))
    bottleneck = any(n.startswith("layer1.0.conv3.") for n in names)
    return next((depth for depth, shape in DEPTHS.items() if shape == (bottleneck, tuple(blocks))), None)


def expected_trunk(backbone: str) -> dict[str, torch.Size]:
    """{name: shape} of the torchvision `backbone`'s trunk tensors, built without allocating them."""
    with torch.device("meta"):
        net = RESNETS[backbone](weights=None)
    return {k: v.shape for k, v in net.state_dict().items() if not k.startswith("fc.")}


def check_trunk(state: dict, backbone: str, origin, where: str, depth_setting: str, error: type[WssError]) -> dict:
    """The trunk tensors of `state` (a classifier's fc.* dropped), exactly the names and shapes of
    `backbone`'s trunk; `num_batches_tracked` counters a file lacks start at zero."""
    if not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise error(f"{where}{origin}: not a state dict of named tensors")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    depth = trunk_depth(state)
    expected = expected_trunk(backbone)
    for name in expected:  # of the BatchNorm layers the file has
        layer = name.removesuffix("num_batches_tracked")
        if layer != name and name not in state and f"{layer}running_mean" in state:
            state[name] = torch.tensor(0, dtype=torch.long)
    unexpected, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
    difference = "; ".join(
        f"{len(names)} {label} keys {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
        for label, names in (("unexpected", unexpected), ("missing", missing))
        if names
    )
    if depth is not None and depth != backbone:
        named = depth_setting or "the trunk"
        raise error(
            f"{where}{depth} weights in {origin} but {named} is {backbone}: the file does not fit ({difference})"
        )
    if difference:
        raise error(f"{where}weights {origin} do not fit {backbone}: {difference} (the weights of another network?)")
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise error(
                f"{where}weights {origin} do not fit {backbone}: {name} is {tuple(state[name].shape)}, "
                f"{backbone}'s {tuple(shape)}"
            )
    return state


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
