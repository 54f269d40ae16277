"""The segmenter: an smp model, its weights, whole-image inference, and the saved model file.

The task mode decides the head everywhere: "binary" is one sigmoid channel (foreground
probability), "multiclass" is a softmax over background + the dataset's classes.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from data.errors import WssError
from data.transforms import normalize, resize_long
from stages.cam.model_file import MODEL_FILE as CAM_MODEL_FILE
from stages.cam.model_file import read_cam_trunk
from stages.common.model_files import load_weights, read_model_file, write_model_file
from stages.common.runtime import autocast
from stages.common.trunk_weights import RESNETS, read_trunk, read_weights_file, rename_cam_key

MODEL_FILE = "model.safetensors"
LEGACY_MODEL_FILE = "model.pt"  # a pickled model of an earlier wss version: read safely, never written
PAD_MULTIPLE = 32  # smp encoders downsample 5 times: inputs must be divisible by 32


class SegModelError(WssError):
    """A model file or encoder weights that cannot be used as asked."""


def output_channels(task: str, num_classes: int) -> int:
    return 1 if task == "binary" else num_classes + 1


def build_segmenter(
    arch: str, encoder: str, encoder_weights: str | None, channels: int, options: dict | None = None
) -> torch.nn.Module:
    """smp.create_model with user errors (unknown names, offline ImageNet) as one-line WssErrors."""
    options = dict(options or {})
    _check_options(arch, encoder, options)
    if encoder_weights not in (None, "imagenet", "cam") and encoder.startswith("tu-"):
        return _timm_encoder_from_file(arch, encoder, Path(encoder_weights).expanduser(), channels, options)
    download = None
    if encoder_weights == "imagenet":
        download = True if encoder.startswith("tu-") else "imagenet"
    try:
        model = smp.create_model(arch, encoder_name=encoder, encoder_weights=download, classes=channels, **options)
    except KeyError as error:  # smp names the known architectures / encoders / weights itself
        raise SegModelError(f"seg: {error.args[0] if error.args else error}") from None
    except TypeError as error:  # an option the architecture does not take
        raise SegModelError(f"seg.arch_options: {arch} does not accept them ({error})") from None
    except Exception as error:  # hub, network and file errors differ by platform
        if download is None:
            raise
        repo = _hub_repo(encoder)
        raise SegModelError(
            f"seg: could not download ImageNet weights for encoder {encoder} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Offline? On a machine with internet run "
            f"`hf download {repo} model.safetensors`, copy the file here and set "
            f"`seg.encoder_weights: /path/to/model.safetensors` (a .pth state dict of the encoder works too), "
            f"or `seg.encoder_weights: null` to train from scratch."
        ) from None
    if encoder_weights not in (None, "imagenet", "cam") and encoder in RESNETS:  # a ResNet trunk of any source
        trunk = read_trunk(
            encoder_weights, encoder, setting="seg.encoder_weights", depth_setting="seg.encoder", error=SegModelError
        )
        model.encoder.load_state_dict(trunk)  # smp's resnet encoders are torchvision's trunk, names and all
    elif encoder_weights not in (None, "imagenet", "cam"):  # "cam" is loaded by the stage: it needs the artifact
        load_encoder_weights(model, Path(encoder_weights).expanduser(), encoder)
    return model


def input_multiple(model: torch.nn.Module) -> int:
    """The multiple that the model's input sides must be, as smp's own `check_input_shape` decides it:
    the encoder's output stride, or 1 where the architecture says it takes any size."""
    if not getattr(model, "requires_divisible_input_shape", True):
        return 1
    return int(getattr(model.encoder, "output_stride", PAD_MULTIPLE))


def load_cam_encoder(model: torch.nn.Module, cam_artifact: Path, encoder: str) -> None:
    """Start the encoder from the stage-1 classifier's trunk (`seg.encoder_weights: cam`).

    Without ImageNet weights the segmenter would have to learn from scratch what the classifier
    already knows (which evidence tells the classes apart). The classifier's ResNet has the
    same parameters as smp's ResNet encoder of that depth; only its layer4 runs dilated instead
    of strided, which changes no weight shape.
    """
    path = Path(cam_artifact) / CAM_MODEL_FILE
    if not path.is_file():
        raise SegModelError(f"seg.encoder_weights: cam, but the cam artifact {cam_artifact} has no {CAM_MODEL_FILE}")
    meta, cam_trunk = read_cam_trunk(path, required={"config": dict})
    backbone = meta["config"].get("backbone")
    if backbone != encoder:
        raise SegModelError(
            f"seg.encoder_weights: cam needs seg.encoder to be the classifier's backbone ({backbone}), got {encoder}"
        )
    trunk = {rename_cam_key(key): value for key, value in cam_trunk.items()}
    load_weights(model.encoder, trunk, path, f"{encoder} encoder (seg.encoder_weights: cam)", "cam", SegModelError)


def architecture_options(arch: str) -> set[str] | None:
    """The keyword options of smp architecture `arch` that a config may set (None: unknown name)."""
    model_class = smp.MODEL_ARCHITECTURES_MAPPING.get(arch.lower())
    if model_class is None:
        return None
    set_here = {"encoder_name", "encoder_weights", "classes", "in_channels"}
    return set(inspect.signature(model_class.__init__).parameters) - {"self", "kwargs"} - set_here


def _check_options(arch: str, encoder: str, options: dict) -> None:
    """smp passes unknown keywords on to the encoder, which ignores them unless it is a timm one."""
    known = architecture_options(arch)
    if known is None or not options:
        return
    unknown = [key for key in options if key not in known]
    if unknown and not encoder.startswith("tu-"):
        raise SegModelError(
            f"seg.arch_options: {arch} has no option {unknown[0]!r} (options: {', '.join(sorted(known))})"
        )


def _hub_repo(encoder: str) -> str:
    if encoder.startswith("tu-"):  # timm's default pretrained tag, e.g. timm/resnet18.a1_in1k
        return _timm_network(encoder).pretrained_cfg.get("hf_hub_id") or f"timm/{encoder[3:]}"
    from segmentation_models_pytorch.encoders import encoders

    settings = encoders.get(encoder, {}).get("pretrained_settings", {}).get("imagenet", {})
    return settings.get("repo_id", f"<the Hugging Face repo of {encoder}>")


def _timm_network(encoder: str) -> torch.nn.Module:
    import timm

    return timm.create_model(encoder[3:], pretrained=False)


def _timm_encoder_from_file(arch: str, encoder: str, path: Path, channels: int, options: dict) -> torch.nn.Module:
    """A `tu-` encoder from a local timm checkpoint (the whole network's, as on the hub): timm
    loads it as it loads the hub's file, and so knows how its features-only network renames
    (`stages.0` -> `stages_0`) and leaves out (the classifier) layers of the whole network's.
    timm only warns about keys that do not fit a features-only network, so the file is checked
    against the whole network first: a deeper network's file shares the shallower one's names."""
    state = read_weights_file(path, f"a timm checkpoint of {encoder[3:]}", SegModelError, "seg.encoder_weights")
    network = _timm_network(encoder)
    head = network.pretrained_cfg.get("classifier") or "fc"  # e.g. fc, head.fc, classifier
    known = set(network.state_dict())
    unexpected = sorted(set(state) - known)
    missing = sorted(k for k in known - set(state) if not k.startswith(f"{head}."))
    if unexpected or missing:
        problem = (
            f"{len(unexpected)} unexpected keys {', '.join(unexpected[:3])}"
            if unexpected
            else f"missing {', '.join(missing[:3])}"
        )
        raise SegModelError(
            f"seg.encoder_weights: {path} does not fit encoder {encoder}: {problem}"
            f"{', ...' if len(unexpected or missing) > 3 else ''} (the weights of another network?)"
        )
    try:
        return smp.create_model(
            arch,
            encoder_name=encoder,
            encoder_weights=True,
            classes=channels,
            pretrained_cfg_overlay={"file": str(path)},
            **options,
        )
    except Exception as error:  # timm's strict load_state_dict, unreadable files
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = (lines[-1] if lines else type(error).__name__)[:300]
        raise SegModelError(f"seg.encoder_weights: {path} does not fit encoder {encoder}: {detail}") from None


def load_encoder_weights(model: torch.nn.Module, path: Path, encoder: str) -> None:
    """A local state dict of an smp encoder (.safetensors, or .pth/.pt; a classifier's `fc.*`
    keys are dropped). `tu-` encoders load through timm: _timm_encoder_from_file."""
    state = read_weights_file(path, f"a state dict of encoder {encoder}", SegModelError, "seg.encoder_weights")
    wanted = set(model.encoder.state_dict())
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing = sorted(wanted - set(state))
    if missing:
        raise SegModelError(
            f"seg.encoder_weights: {path} does not fit encoder {encoder}: "
            f"missing {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}"
        )
    # keys the encoder lacks mean another architecture, e.g. a resnet34 file (its extra blocks)
    # given for a resnet18, whose shared blocks have the same shapes and would load silently
    unexpected = sorted(set(state) - wanted)
    if unexpected:
        raise SegModelError(
            f"seg.encoder_weights: {path} does not fit encoder {encoder}: "
            f"{len(unexpected)} unexpected keys {', '.join(unexpected[:3])}"
            f"{', ...' if len(unexpected) > 3 else ''} (the weights of another network?)"
        )
    try:
        model.encoder.load_state_dict(state, strict=False)
    except RuntimeError as error:  # same names, other shapes
        raise SegModelError(
            f"seg.encoder_weights: {path} does not fit encoder {encoder}: {str(error).splitlines()[-1].strip()}"
        ) from None


def inference_long_side(section) -> int:
    """The long side images are resized to for prediction: as set, or the middle of training's range."""
    if section.predict_size:
        return int(section.predict_size)
    low, high = section.resize_long
    return int(round((low + high) / 2))


# Probability values computed in one piece. A larger output (C x H x W of an image far above
# the model's input size) is computed in bands of rows of about BAND_VALUES values, so that
# memory follows the model's input size, not the image's: at 13000 x 13000 one float32 channel
# alone would take 0.7 GB. 2**24 covers every image of the supported datasets (SIIM 1024 x 1024
# binary, VOC ~500 x 375 x 21 classes) and 4096 x 4096 binary, which therefore keep the result
# of one whole-image upsampling bit for bit.
WHOLE_IMAGE_VALUES = 2**24
BAND_VALUES = 2**22


@torch.no_grad()
def predict_probabilities(
    model: torch.nn.Module, image: np.ndarray, task: str, long_side: int | None, device: torch.device
) -> torch.Tensor:
    """(C, H, W) float32 probabilities on the CPU at the image's own size.

    The image (uint8 HxWx3) is resized to `long_side`, zero-padded (the ImageNet mean after
    normalisation) to a multiple of 32, and the output is cropped and resized back.
    """
    height, width = image.shape[:2]
    resized = resize_long(image, long_side) if long_side else image
    logits = model_logits(model, resized, device)
    return _activate(_upsample(logits, (height, width)), task)[0].cpu()


@torch.no_grad()
def model_logits(model: torch.nn.Module, resized: np.ndarray, device: torch.device) -> torch.Tensor:
    """(1, C, h, w) float32 logits, on `device`, of an image already at the model's input size
    (uint8 h x w x 3): normalised, zero-padded to a multiple of 32, cropped back after."""
    x = normalize(resized).unsqueeze(0)
    h, w = x.shape[-2:]
    x = F.pad(x, (0, -w % PAD_MULTIPLE, 0, -h % PAD_MULTIPLE)).to(device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device):
        logits = model(x)
    return logits[..., :h, :w].float()


@torch.no_grad()
def predict_mask(
    model: torch.nn.Module,
    resized: np.ndarray,
    size: tuple[int, int],
    task: str,
    threshold: float,
    device: torch.device,
    probabilities=None,
) -> np.ndarray:
    """uint8 (H, W) class indices at `size` for an image already resized to the model's input
    (`resized`, as `resize_long` makes it from the full image).

    Equal to `probabilities_to_mask(predict_probabilities(...))` of the full image: bit for
    bit up to WHOLE_IMAGE_VALUES probability values, where it is that computation; above, in
    bands of rows whose upsampling is the same bilinear interpolation up to float rounding
    (logits ~1e-4 apart at most: a pixel can change class only where its probabilities are
    that close to the cut or to each other).
    `probabilities`, when given, receives (first row, float32 (C, rows, W) tensor) for every
    band in order, e.g. a ProbabilityFile's `write_rows`.
    """
    logits = model_logits(model, resized, device)
    height, width = size
    channels = logits.shape[1]
    if channels * height * width <= WHOLE_IMAGE_VALUES:
        probs = _activate(_upsample(logits, size), task)[0].cpu()
        if probabilities is not None:
            probabilities(0, probs)
        return probabilities_to_mask(probs, task, threshold)
    mask = np.empty((height, width), np.uint8)
    for top, band in upsampled_bands(logits, size, max(1, BAND_VALUES // (channels * width))):
        probs = _activate(band, task)[0].cpu()
        if probabilities is not None:
            probabilities(top, probs)
        mask[top : top + probs.shape[1]] = probabilities_to_mask(probs, task, threshold)
    return mask


def upsampled_bands(logits: torch.Tensor, size: tuple[int, int], rows: int):
    """(first row, (1, C, rows, W) band) of the bilinear upsampling of (1, C, h, w) `logits` to
    `size` (align_corners=False, as F.interpolate), `rows` output rows at a time.

    Bilinear interpolation is separable: the width is interpolated once for the h input rows
    (F.interpolate along the width only: h x W values), then every output row is the blend of
    the two input rows its position falls between, with F.interpolate's source positions
    (half-pixel centres, clamped at the first row)."""
    height, width = size
    in_height = logits.shape[-2]
    across = F.interpolate(logits, size=(in_height, width), mode="bilinear", align_corners=False)
    # in float32 as F.interpolate computes them: the scale and the positions carry its rounding
    scale = torch.tensor(in_height, dtype=torch.float32) / height
    centres = ((torch.arange(height, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0).to(logits.device)
    upper = centres.floor().long().clamp(max=in_height - 1)
    lower = (upper + 1).clamp(max=in_height - 1)
    weight = (centres - upper).clamp(0, 1)[:, None]
    for top in range(0, height, rows):
        part = slice(top, min(height, top + rows))
        yield top, across[:, :, upper[part]] * (1 - weight[part]) + across[:, :, lower[part]] * weight[part]


def _upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _activate(logits: torch.Tensor, task: str) -> torch.Tensor:
    return torch.sigmoid(logits) if task == "binary" else torch.softmax(logits, dim=1)


def probabilities_to_mask(probs: torch.Tensor | np.ndarray, task: str, threshold: float) -> np.ndarray:
    """uint8 class indices: binary foreground where p > threshold, multiclass the arg-max."""
    probs = torch.as_tensor(probs)
    if task == "binary":
        return (probs[0] > threshold).to(torch.uint8).numpy()
    return probs.argmax(dim=0).to(torch.uint8).numpy()


# the metadata a segmenter model file must hold, and its types
SEGMENTER_META = {
    "arch": str,
    "encoder": str,
    "arch_options": dict,
    "task": str,
    "classes": list,
    "channels": int,
    "palette": list,
    "threshold": (int, float),
    "long_side": int,
}
# the empty-mask rule (stages.seg.postprocess) and its settings that change no mask; a file
# written without it has none
RULE_META = {"min_area": int, "image_threshold": (int, float), "image_score": str}
NO_RULE = {"min_area": 0, "image_threshold": 0.0, "image_score": "seg"}


def rule_value_fits(name: str, value) -> bool:
    """Whether a model file's empty-mask rule setting has a type and range the rule accepts."""
    if not isinstance(value, RULE_META[name]) or isinstance(value, bool):
        return False
    if name == "image_score":
        return value in ("seg", "cam", "mean")
    return value >= 0 and (name != "image_threshold" or value <= 1)


def save_segmenter(model: torch.nn.Module, path: Path, section, dataset_info) -> None:
    """Weights plus everything `load_segmenter` needs to rebuild the model and check it fits."""
    write_model_file(
        path,
        "seg",
        model,
        {
            "arch": section.arch,
            "encoder": section.encoder,
            "arch_options": dict(section.arch_options),
            "task": dataset_info.task,
            "classes": list(dataset_info.classes),
            "channels": output_channels(dataset_info.task, dataset_info.num_classes),
            "palette": [list(color) for color in dataset_info.palette],
            "threshold": section.threshold,
            "long_side": inference_long_side(section),
            **{name: getattr(section, name, NO_RULE[name]) for name in RULE_META},
        },
    )


def segmenter_file(path: Path) -> Path:
    """The model file of a seg artifact folder (the pickled one of an earlier version where it
    has only that), or `path` itself when it is a file."""
    path = Path(path)
    if path.is_dir() and not (path / MODEL_FILE).is_file() and (path / LEGACY_MODEL_FILE).is_file():
        return path / LEGACY_MODEL_FILE
    return path / MODEL_FILE if path.is_dir() else path


def load_segmenter(
    path: Path, device: torch.device, classes: list[str] | None = None, task: str | None = None
) -> tuple[torch.nn.Module, dict]:
    """The model of a seg artifact (eval mode) and its metadata (with the empty-mask rule's
    settings, none for a file written without them); checks the classes when given."""
    file = segmenter_file(path)
    if not file.is_file():
        raise SegModelError(f"no segmenter model at {file} (run `wss run-stage seg` first)")
    state = read_model_file(file, "seg", "segmenter model", "seg", SegModelError, required=SEGMENTER_META)
    meta, channels = state.meta, state.meta["channels"]
    if meta["task"] not in ("binary", "multiclass") or not all(isinstance(c, str) for c in meta["classes"]):
        raise SegModelError(
            f"{file}: unreadable segmenter model (task {meta['task']!r}, classes "
            f"{meta['classes']!r}); recompute it with wss run --force seg"
        )
    if classes is not None and list(classes) != list(meta["classes"]):
        raise SegModelError(
            f"{file}: the model was trained for classes {meta['classes']} but the config's "
            f"dataset has {list(classes)}; use the seg artifact of this config"
        )
    wrong = [name for name in RULE_META if name in meta and not rule_value_fits(name, meta[name])]
    if wrong:
        raise SegModelError(
            f"{file}: unreadable segmenter model ({wrong[0]} {meta[wrong[0]]!r}); recompute it with wss run --force seg"
        )
    meta = {**NO_RULE, **meta}  # a file written without the rule has none
    if task is not None and task != meta["task"]:
        raise SegModelError(f"{file}: the model is {meta['task']} but the config's dataset is {task}")
    # a received file's options reach smp and, for a timm encoder, timm (whose keywords include
    # file paths such as checkpoint_path): only the architecture's own options are taken
    known = architecture_options(meta["arch"]) or set()
    foreign = sorted(set(meta["arch_options"]) - known)
    if foreign:
        raise SegModelError(
            f"{file}: unreadable segmenter model (arch_options {foreign[0]!r} is not an option of "
            f"{meta['arch']}); recompute it with wss run --force seg"
        )
    model = build_segmenter(meta["arch"], meta["encoder"], None, channels, meta["arch_options"])
    load_weights(
        model,
        state.tensors,
        file,
        f"{meta['arch']}/{meta['encoder']} segmenter with {channels} outputs",
        "seg",
        SegModelError,
    )
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, meta
