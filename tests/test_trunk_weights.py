"""A ResNet trunk started from any source (stages/common/trunk_weights.py): a wss cam artifact of
another method, a timm or torchvision checkpoint, for cam.weights, seg.encoder_weights and
irn.backbone_init alike; refused in one line when it is of another depth or would run code; the
source in the cache key."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torchvision import models

from data.errors import WssError
from pipeline.config import load_config
from pipeline.runner import Pipeline
from stages.base import section_dict
from stages.cam.methods import build_cam_net
from stages.cam.model_file import MODEL_FILE
from stages.common.backbones import IMAGENET_WEIGHTS, ResNetFeatures
from stages.common.model_files import write_model_file
from stages.common.trunk_weights import WeightsError, read_trunk, trunk_depth
from tests.helpers import DEMO_CONFIG, FAST_CAM, overrides

CLASSES = ["disc", "ring", "square"]


def cam_config(**values):
    return load_config(DEMO_CONFIG, [f"{k}={v}" for k, v in {"cam.backbone": "resnet18", **values}.items()])


def cam_artifact(folder, method: str = "pylon", backbone: str = "resnet18", key: str = "a" * 64, seed: int = 5):
    """A cam artifact folder as the cache leaves it: the classifier of `method` (its weights
    random but not torchvision's initialisation) and the manifest with its key."""
    torch.manual_seed(seed)
    section = cam_config(**{"cam.method": method, "cam.backbone": backbone, "cam.weights": "null"}).cam
    net = build_cam_net(section, len(CLASSES), weights=None)
    with torch.no_grad():  # BatchNorm statistics as a trained trunk has them, not the 0/1 of a new one
        for module in net.backbone.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.num_batches_tracked.fill_(7)
    folder.mkdir(parents=True, exist_ok=True)
    write_model_file(folder / MODEL_FILE, "cam", net, {"config": section_dict(section), "classes": CLASSES})
    (folder / "manifest.json").write_text(json.dumps({"stage": "cam", "key": key}))
    return folder, net


def timm_resnet(name: str) -> dict:
    """A state dict in the layout of timm's ResNets (e.g. the hub's resnet50.a1_in1k): torchvision's
    names, a classifier `fc`, and no BatchNorm `num_batches_tracked` counters."""
    torch.manual_seed(11)
    state = getattr(models, name)(weights=None).state_dict()
    return {k: v.clone() for k, v in state.items() if not k.endswith("num_batches_tracked")}


class RunsCode:
    """A pickle that leaves a file behind when loaded unsafely."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------------------------------ cam.weights
@pytest.mark.parametrize("as_file", [False, True])
def test_a_cam_artifact_of_one_method_starts_the_trunk_of_another(tmp_path, as_file):
    """The trunk of a PYLON classifier becomes a GAP classifier's, tensor for tensor (BatchNorm
    statistics included); the GAP head is new: what the same seed gives without weights."""
    folder, source = cam_artifact(tmp_path / "cam-pylon", "pylon")
    weights = folder / MODEL_FILE if as_file else folder
    section = cam_config(**{"cam.method": "gap", "cam.weights": str(weights)}).cam
    torch.manual_seed(9)
    started = build_cam_net(section, len(CLASSES))
    torch.manual_seed(9)
    fresh = build_cam_net(section, len(CLASSES), weights=None)
    trunk = source.backbone.state_dict()
    assert trunk.keys() == started.backbone.state_dict().keys()
    for name, value in started.backbone.state_dict().items():
        assert torch.equal(value, trunk[name]), name
    assert torch.equal(started.classifier.weight, fresh.classifier.weight)
    assert not torch.equal(started.backbone.stem[0].weight, fresh.backbone.stem[0].weight)


def test_a_gap_artifact_starts_a_multiscale_trunk(tmp_path):
    folder, source = cam_artifact(tmp_path / "cam-gap", "gap", seed=6)
    section = cam_config(**{"cam.method": "multiscale", "cam.weights": str(folder)}).cam
    started = build_cam_net(section, len(CLASSES))
    for name, value in started.backbone.state_dict().items():
        assert torch.equal(value, source.backbone.state_dict()[name]), name


@pytest.mark.parametrize("layout", ["safetensors", "state_dict", "model", "ddp"])
def test_a_timm_resnet_checkpoint_loads(tmp_path, layout):
    """timm's resnet50 layout (no num_batches_tracked, a 1000-class fc), as a safetensors file or a
    .pth wrapped as training scripts save it; the counters it lacks start at zero."""
    state = timm_resnet("resnet50")
    if layout == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "checkpoint.pth"
        if layout == "ddp":
            payload = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
        else:
            payload = {layout: state, "epoch": 3, "arch": "resnet50"}
        torch.save(payload, path)
    trunk = ResNetFeatures("resnet50", str(path))
    assert torch.equal(trunk.stem[0].weight, state["conv1.weight"])
    assert torch.equal(trunk.layer3[5].bn3.running_var, state["layer3.5.bn3.running_var"])
    assert torch.equal(trunk.layer4[0].downsample[0].weight, state["layer4.0.downsample.0.weight"])
    assert int(trunk.stem[1].num_batches_tracked) == 0


def test_depths_are_told_apart_by_their_names():
    for name in ("resnet18", "resnet34", "resnet50"):
        assert trunk_depth(timm_resnet(name)) == name
    assert trunk_depth({"conv1.weight": torch.zeros(1)}) is None


@pytest.mark.parametrize("source", ["checkpoint", "artifact"])
def test_a_trunk_of_another_depth_is_one_line_naming_the_file_and_both_depths(tmp_path, source):
    from stages.cam.stage import CamStage

    if source == "checkpoint":
        path = tmp_path / "resnet50.safetensors"
        save_file(timm_resnet("resnet50"), str(path))
        depth = "resnet50"
    else:
        folder, _ = cam_artifact(tmp_path / "cam-34", "gap", backbone="resnet34")
        path, depth = folder / MODEL_FILE, "resnet34"
    cfg = cam_config(**{"cam.weights": str(path.parent if source == "artifact" else path)})
    with pytest.raises(WeightsError) as info:
        CamStage().preflight(cfg, None)
    message = str(info.value)
    assert message.startswith(f"cam.weights: {depth} weights in {path} but cam.backbone is resnet18"), message
    assert "\n" not in message


def test_a_resnet_variant_with_other_layers_is_refused(tmp_path):
    """timm's resnet50d has a deep stem (conv1.0, conv1.1, ...) where resnet50 has one conv1."""
    state = timm_resnet("resnet50")
    weight = state.pop("conv1.weight")
    state.update({"conv1.0.weight": weight[:32].clone(), "conv1.1.weight": weight[32:].clone()})
    path = tmp_path / "resnet50d.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError, match=r"do not fit resnet50: .*unexpected keys conv1\.0\.weight") as info:
        read_trunk(str(path), "resnet50")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["trunk.pth", "model.safetensors"])
def test_a_pickle_payload_is_refused_and_never_runs(tmp_path, name):
    marker = tmp_path / "owned"
    folder = tmp_path / "cam-x"
    folder.mkdir()
    path = folder / name
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": RunsCode(marker)}, handle, protocol=2)
    for source in (path, folder) if name == MODEL_FILE else (path,):
        with pytest.raises(WeightsError) as info:
            read_trunk(str(source), "resnet18", setting="cam.weights")
        message = str(info.value)
        assert message.startswith("cam.weights: ") and str(path) in message and "\n" not in message
    assert not marker.exists()


def test_a_folder_without_a_model_file_is_not_an_artifact(tmp_path):
    with pytest.raises(WeightsError, match="without model.safetensors: not a wss cam artifact"):
        read_trunk(str(tmp_path), "resnet18", setting="cam.weights")


def test_another_kind_of_wss_model_file_is_refused(tmp_path):
    path = tmp_path / MODEL_FILE
    write_model_file(path, "irn", {"x": torch.zeros(1)}, {"backbone": "resnet18"})
    with pytest.raises(WeightsError, match="it is a wss IRN model file, not a cam model file"):
        read_trunk(str(path), "resnet18", setting="cam.weights")


def test_imagenet_offline_keeps_its_one_line_message(monkeypatch, tmp_path):
    from stages.cam.stage import CamStage

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(self, *args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(type(IMAGENET_WEIGHTS["resnet18"]), "get_state_dict", offline)
    with pytest.raises(WeightsError) as info:
        CamStage().preflight(cam_config(**{"cam.weights": "imagenet"}), None)
    message = str(info.value)
    assert message.startswith("cam.weights: could not download ImageNet weights for resnet18"), message
    assert "cam.weights: null" in message
    assert "\n" not in message


# ------------------------------------------------------------------------------ the cache key
def keys(root, workdir, *values: str) -> dict[str, str]:
    pipeline = Pipeline(load_config(DEMO_CONFIG, [f"data.root={root}", f"run.workdir={workdir}", *values]))
    return {stage: pipeline.key(stage).digest for stage in ("cam", "irn", "seg")}


def test_the_source_artifact_key_and_the_file_stamp_enter_the_key(tiny_synthetic, tmp_path):
    folder, _ = cam_artifact(tmp_path / "cam-src", "gap")
    for setting, stage in (("cam.weights", "cam"), ("seg.encoder_weights", "seg"), ("irn.backbone_init", "irn")):
        for source in (folder, folder / MODEL_FILE):
            (folder / "manifest.json").write_text(json.dumps({"stage": "cam", "key": "a" * 64}))
            before = keys(tiny_synthetic, tmp_path, f"{setting}={source}")[stage]
            os.utime(folder / MODEL_FILE, ns=(1, 1))  # copied without its times: the same trained model
            assert keys(tiny_synthetic, tmp_path, f"{setting}={source}")[stage] == before
            (folder / "manifest.json").write_text(json.dumps({"stage": "cam", "key": "b" * 64}))
            assert keys(tiny_synthetic, tmp_path, f"{setting}={source}")[stage] != before, (setting, source)
    checkpoint = tmp_path / "resnet18.pth"
    torch.save(timm_resnet("resnet18"), checkpoint)
    before = keys(tiny_synthetic, tmp_path, f"irn.backbone_init={checkpoint}")
    os.utime(checkpoint, ns=(checkpoint.stat().st_mtime_ns + 10**9,) * 2)
    after = keys(tiny_synthetic, tmp_path, f"irn.backbone_init={checkpoint}")
    assert after["cam"] == before["cam"] and after["irn"] != before["irn"]


def test_a_named_source_adds_nothing_to_the_irn_key(tiny_synthetic, tmp_path):
    from stages.irn.stage import IrnStage

    for init in ("cam", "imagenet", "none"):
        cfg = load_config(DEMO_CONFIG, [f"data.root={tiny_synthetic}", f"irn.backbone_init={init}"])
        assert "backbone_init_file" not in IrnStage().key_config(cfg, "multiclass")


# ------------------------------------------------------------------------------ seg and irn
@pytest.mark.parametrize("source", ["artifact", "timm"])
def test_seg_and_irn_take_the_same_sources(tmp_path, source):
    from stages.irn.net import build_backbone
    from stages.seg.model import build_segmenter

    if source == "artifact":
        path, net = cam_artifact(tmp_path / "cam-minmax", "minmax")
        expected = {
            k.replace("stem.0.", "conv1.").replace("stem.1.", "bn1."): v for k, v in net.backbone.state_dict().items()
        }
    else:
        path = tmp_path / "resnet18.safetensors"
        save_file(timm_resnet("resnet18"), str(path))
        expected = {k: v for k, v in timm_resnet("resnet18").items() if not k.startswith("fc.")}
    encoder = build_segmenter("Unet", "resnet18", str(path), 2).encoder.state_dict()
    irn = build_backbone("resnet18", str(path), None, None).state_dict()
    irn = {k.replace("stem.0.", "conv1.").replace("stem.1.", "bn1."): v for k, v in irn.items()}
    for state in (encoder, irn):
        assert state.keys() == {*expected, *(k for k in state if k.endswith("num_batches_tracked"))}
        for name, value in expected.items():
            assert torch.equal(state[name], value), name


def test_seg_and_irn_refuse_another_depth_in_one_line(tmp_path):
    from stages.irn.stage import IrnStage
    from stages.seg.model import SegModelError, build_segmenter

    path, _ = cam_artifact(tmp_path / "cam-18", "gap")
    with pytest.raises(SegModelError) as info:
        build_segmenter("Unet", "resnet34", str(path), 2)
    assert str(info.value).startswith(f"seg.encoder_weights: resnet18 weights in {path / MODEL_FILE} but seg.encoder")
    cfg = cam_config(**{"cam.backbone": "resnet34", "irn.backbone_init": str(path)})
    with pytest.raises(WssError) as info:
        IrnStage().preflight(cfg, None)
    message = str(info.value)
    assert message.startswith("irn.backbone_init: resnet18 weights in ") and "cam.backbone is resnet34" in message
    assert "\n" not in message


# ------------------------------------------------------------------------------ a run
def test_a_trained_cam_artifact_starts_another_method_through_the_cli(cli, tiny_synthetic, tmp_path):
    """`wss run-stage cam` trains GAP; a PCAM run started from that artifact reads its trunk,
    and its own artifact is keyed by the GAP artifact's key."""
    workdir = tmp_path / "runs"
    fast = {**FAST_CAM, "cam.epochs": "1", "data.root": tiny_synthetic, "run.workdir": workdir}
    result = cli("run-stage", "cam", "-c", DEMO_CONFIG, *overrides(fast))
    assert result.exit_code == 0, result.output
    (gap,) = workdir.glob("*/cam-*")
    fast.update({"cam.method": "pcam", "cam.weights": gap})
    result = cli("run-stage", "cam", "-c", DEMO_CONFIG, *overrides(fast))
    assert result.exit_code == 0, result.output
    (pcam,) = [p for p in workdir.glob("*/cam-*") if p != gap]
    manifest = json.loads((pcam / "manifest.json").read_text())
    gap_key = json.loads((gap / "manifest.json").read_text())["key"]
    assert gap_key in json.dumps(manifest["key_parts"])
