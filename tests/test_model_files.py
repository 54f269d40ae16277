"""Model and checkpoint files: loading one never runs code in it.

Every loader of a model, a twin's model, a `--resume` checkpoint or the held-out checkpoint is
handed a file crafted with a `__reduce__` payload that would create a marker folder when
unpickled: the file is refused in one line (or, for the resume state, skipped with a warning)
and the marker never appears. Saved then loaded weights and metadata are identical bit for
bit; a cut-short or garbled file is one line naming it; a `model.pt` of an earlier version (a
pickled dict of tensors and plain values) still loads, through torch's restricted unpickler.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from data.errors import WssError
from tests.helpers import DEMO_CONFIG

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Payload:
    """Unpickled, it creates the folder `marker`: the code a hostile model file would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def plant_payload(path: Path, marker: Path, how: str = "torch") -> Path:
    """A file at `path` that runs the payload when unpickled: torch.save's zip archive of a
    model-looking dict, or a bare pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": {"weight": torch.zeros(2)}, "config": Payload(marker), "classes": ["a"]}
    if how == "torch":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state, protocol=2))
    return path


def test_the_planted_payload_really_runs_when_unpickled(tmp_path):
    """The test files are real exploits: an unrestricted torch.load (what wss did) runs them."""
    for how in ("torch", "pickle"):
        marker = tmp_path / f"ran-{how}"
        path = plant_payload(tmp_path / f"evil-{how}.pt", marker, how)
        try:
            torch.load(path, weights_only=False)  # the point of this test
        except RuntimeError:  # a bare pickle is no torch file, but unpickling it has run the payload
            pass
        assert marker.is_dir()


def one_line(error: BaseException, path: Path) -> str:
    message = str(error)
    assert "\n" not in message and str(path) in message, message
    assert "weights_only=False" not in message  # torch's advice to load it unsafely is not passed on
    return message


# ------------------------------------------------------------------------------ tiny models


def tiny_cam_net():
    from stages.cam.config import CamConfig
    from stages.cam.methods import build_cam_net

    cfg = CamConfig(backbone="resnet18", weights=None, method="gap", scales=[1.0], flip=False)
    return cfg, build_cam_net(cfg, 3, weights=None)


def write_cam_artifact(folder: Path) -> tuple[Path, nn.Module]:
    from stages.cam.model_file import MODEL_FILE
    from stages.common.model_files import write_model_file

    cfg, net = tiny_cam_net()
    folder.mkdir(parents=True, exist_ok=True)
    write_model_file(folder / MODEL_FILE, "cam", net, {"config": cfg.model_dump(), "classes": ["a", "b", "c"]})
    return folder, net


SEG_SECTION = SimpleNamespace(
    arch="Unet",
    encoder="resnet18",
    arch_options={"decoder_channels": [16, 16, 16, 16, 16]},
    threshold=0.5,
    predict_size=64,
    resize_long=[48, 80],
)
SEG_DATA = SimpleNamespace(
    task="multiclass", classes=["a", "b"], num_classes=2, palette=[[0, 0, 0], [200, 0, 0], [0, 200, 0]]
)


def tiny_segmenter() -> nn.Module:
    from stages.seg.model import build_segmenter

    torch.manual_seed(0)
    return build_segmenter("Unet", "resnet18", None, 3, SEG_SECTION.arch_options).eval()


def seg_artifact(folder: Path) -> tuple[Path, nn.Module]:
    from stages.seg.model import MODEL_FILE, save_segmenter

    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_segmenter()
    save_segmenter(model, folder / MODEL_FILE, SEG_SECTION, SEG_DATA)
    return folder, model


def legacy_seg_file(path: Path, model: nn.Module) -> Path:
    """A segmenter model.pt as earlier wss versions wrote it (torch.save of a dict)."""
    from stages.seg.model import inference_long_side

    torch.save(
        {
            "model": {k: v.cpu() for k, v in model.state_dict().items()},
            "arch": "Unet",
            "encoder": "resnet18",
            "arch_options": dict(SEG_SECTION.arch_options),
            "task": "multiclass",
            "classes": ["a", "b"],
            "channels": 3,
            "palette": SEG_DATA.palette,
            "threshold": 0.5,
            "long_side": inference_long_side(SEG_SECTION),
        },
        path,
    )
    return path


def same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


# ------------------------------------------------------------------------------ round trips


def test_a_model_file_round_trips_bit_for_bit(tmp_path):
    from stages.common.model_files import read_model_file, write_model_file
    from stages.seg.model import MODEL_FILE

    torch.manual_seed(0)
    base = torch.randn(4, 3, 2, 2)
    tensors = {
        "conv.weight": base.to(memory_format=torch.channels_last),  # strided: saved contiguous
        "bn.num_batches_tracked": torch.tensor(7),
        "half": torch.randn(5).to(torch.bfloat16),
        "flag": torch.tensor([True, False]),
        "empty": torch.zeros(0),
        "tied.a": base,
        "tied.b": base,
    }
    meta = {
        "config": {"scales": [1.0, 0.5], "weights": None, "crf": {"iterations": 5}},
        "classes": ["a", "é"],
        "palette": [[0, 0, 0], [255, 1, 2]],
        "threshold": 0.4,
        "history": [{"loss": float("nan")}],
    }
    write_model_file(tmp_path / MODEL_FILE, "seg", tensors, meta)
    assert [p.name for p in tmp_path.iterdir()] == [MODEL_FILE]  # no temporary file left
    (tmp_path / "plain").write_bytes(b"")  # readable as any new file is (a shared run folder), not 0600
    assert (tmp_path / MODEL_FILE).stat().st_mode == (tmp_path / "plain").stat().st_mode
    (tmp_path / "plain").unlink()
    state = read_model_file(tmp_path / MODEL_FILE, "seg", "model", "seg")
    same_weights(state.tensors, tensors)
    assert json.dumps(state.meta) == json.dumps(meta) and state.kind == "seg"
    # any safetensors reader gets the plain state dict
    from safetensors.torch import load_file

    same_weights(load_file(str(tmp_path / MODEL_FILE)), tensors)


@pytest.mark.parametrize("first_byte", [0x80, 0x50])  # a pickle's and a zip archive's first byte
def test_a_model_file_whose_header_length_starts_like_a_pickle_is_read_as_safetensors(tmp_path, first_byte):
    """A safetensors file starts with its header's length: for one length in 256 its first byte
    is 0x80, a pickle's first byte. Such a file (met in a real run: a pcam classifier whose header
    was 12,672 bytes) is read as the safetensors file it is, never handed to the pickle reader."""
    from stages.common.model_files import read_model_file, write_model_file

    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    path = tmp_path / "model.safetensors"
    for padding in range(0, 2048, 8):
        write_model_file(path, "cam", tensors, {"note": "x" * padding})
        if path.read_bytes()[0] == first_byte:
            break
    else:
        pytest.fail(f"no padding gives a header length whose first byte is {first_byte:#x}")
    state = read_model_file(path, "cam", "cam model", "cam")
    assert torch.equal(state.tensors["w"], tensors["w"]) and state.meta["note"].startswith("x")


def test_the_stages_model_files_round_trip(tmp_path):
    """cam, IRN and segmenter as their stages save and load them: identical weights and metadata."""
    from stages.cam.classifier import load_cam_net
    from stages.common.backbones import ResNetFeatures
    from stages.common.model_files import write_model_file
    from stages.irn.net import MODEL_FILE as IRN_FILE
    from stages.irn.net import BoundaryNet, load_boundary_net
    from stages.seg.model import load_segmenter

    artifact, net = write_cam_artifact(tmp_path / "cam")
    loaded, cfg, classes = load_cam_net(artifact, torch.device("cpu"))
    same_weights(loaded.state_dict(), net.state_dict())
    assert cfg == tiny_cam_net()[0] and classes == ["a", "b", "c"]

    torch.manual_seed(1)
    irn = BoundaryNet(ResNetFeatures("resnet18", weights=None), freeze_backbone=False)
    (tmp_path / "irn").mkdir()
    write_model_file(tmp_path / "irn" / IRN_FILE, "irn", irn, {"backbone": "resnet18", "config": {}})
    same_weights(load_boundary_net(tmp_path / "irn", torch.device("cpu")).state_dict(), irn.state_dict())

    folder, model = seg_artifact(tmp_path / "seg")
    loaded, meta = load_segmenter(folder, torch.device("cpu"), ["a", "b"], "multiclass")
    same_weights(loaded.state_dict(), model.state_dict())
    assert meta == {
        "arch": "Unet",
        "encoder": "resnet18",
        "arch_options": {"decoder_channels": [16] * 5},
        "task": "multiclass",
        "classes": ["a", "b"],
        "channels": 3,
        "palette": SEG_DATA.palette,
        "threshold": 0.5,
        "long_side": 64,
        "min_area": 0,  # the empty-mask rule: none
        "image_threshold": 0.0,
        "image_score": "seg",
    }


def checkpoint_round_trip(folder: Path, optimizer: str, device: torch.device) -> None:
    """Train a small channels_last net on `device` two steps, checkpoint it, load the checkpoint
    into a fresh net and optimizer: weights and the flattened optimizer state come back equal
    bit for bit (int parameter indices, Adam's betas a tuple), and a step after loading equals
    a step of the original (exactly on the CPU; cuDNN's kernels need not be deterministic)."""
    from stages.common.model_files import read_checkpoint_file, write_checkpoint

    def make():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 2))
        net = net.to(device, memory_format=torch.channels_last)  # strided weights, as fit has them on a GPU
        opt = (
            torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
            if optimizer == "sgd"
            else torch.optim.AdamW(net.parameters(), lr=0.01)
        )
        return net, opt

    def step(net, opt, seed):
        x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed)).to(device)
        loss = net(x.contiguous(memory_format=torch.channels_last)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    net, opt = make()
    for seed in range(2):
        step(net, opt, seed)
    history = [{"epoch": 1, "loss": 0.25}, {"epoch": 2, "loss": 0.125}]
    write_checkpoint(folder / "checkpoint.safetensors", net, opt, 1, history)
    fresh, fresh_opt = make()
    checkpoint = read_checkpoint_file(folder / "checkpoint.safetensors", fresh, fresh_opt)
    assert checkpoint.epoch == 1 and checkpoint.history == history
    same_weights(checkpoint.weights, {k: v.cpu() for k, v in net.state_dict().items()})
    original = opt.state_dict()
    assert checkpoint.optimizer["param_groups"] == original["param_groups"]
    assert [type(v) for v in checkpoint.optimizer["param_groups"][0].values()] == [
        type(v) for v in original["param_groups"][0].values()
    ]
    assert checkpoint.optimizer["state"].keys() == original["state"].keys()
    for index, values in original["state"].items():
        same_weights(checkpoint.optimizer["state"][index], {k: v.cpu() for k, v in values.items()})
    fresh.load_state_dict(checkpoint.weights)
    fresh_opt.load_state_dict(checkpoint.optimizer)
    step(net, opt, 2)
    step(fresh, fresh_opt, 2)
    for name, value in net.state_dict().items():
        exact = device.type == "cpu"
        torch.testing.assert_close(
            fresh.state_dict()[name], value, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6, msg=name
        )


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_checkpoint_round_trips_and_resumes_to_the_same_weights(tmp_path, optimizer):
    checkpoint_round_trip(tmp_path, optimizer, torch.device("cpu"))


# ------------------------------------------------------------------------------ hostile files


def test_a_planted_cam_irn_or_seg_model_never_runs_its_payload(tmp_path):
    """At the very path each loader reads (under the current name, and under the name earlier
    versions used), whether torch's archive or a bare pickle."""
    from stages.cam.classifier import load_cam_net
    from stages.cam.model_file import MODEL_FILE as CAM_FILE
    from stages.irn.net import MODEL_FILE as IRN_FILE
    from stages.irn.net import build_backbone, load_boundary_net
    from stages.seg.model import MODEL_FILE as SEG_FILE
    from stages.seg.model import build_segmenter, load_cam_encoder, load_segmenter

    cpu = torch.device("cpu")
    loaders = {
        "cam": (CAM_FILE, lambda a: load_cam_net(a, cpu)),
        "irn trunk from cam": (CAM_FILE, lambda a: build_backbone("resnet18", "cam", a, None)),
        "seg encoder from cam": (
            CAM_FILE,
            lambda a: load_cam_encoder(build_segmenter("Unet", "resnet18", None, 2), a, "resnet18"),
        ),
        "irn": (IRN_FILE, lambda a: load_boundary_net(a, cpu)),
        "seg folder": (SEG_FILE, lambda a: load_segmenter(a, cpu)),
        "seg folder of an earlier version": ("model.pt", lambda a: load_segmenter(a, cpu)),
        "seg file": ("evil.pt", lambda a: load_segmenter(a / "evil.pt", cpu)),
    }
    ran, messages = [], []
    for name, (file_name, load) in loaders.items():
        for how in ("torch", "pickle"):
            artifact = tmp_path / f"{name}-{how}".replace(" ", "-")
            marker = tmp_path / f"ran-{artifact.name}"
            path = plant_payload(artifact / file_name, marker, how)
            try:
                load(artifact)
                refused = None
            except Exception as error:  # checked below: a one-line WssError
                refused = error
            if marker.exists():
                ran.append(f"{name} ({how})")
            messages.append((path, refused))
    assert not ran, f"these loaders ran the payload: {ran}"
    for path, refused in messages:
        assert isinstance(refused, WssError), repr(refused)
        assert "refuses" in one_line(refused, path)


def test_wss_predict_refuses_a_planted_model_in_one_line(cli, tmp_path):
    """`wss predict --artifact evil/model.pt`, the case of the report: exit 2, one line, nothing run."""
    from PIL import Image

    marker = tmp_path / "ran"
    evil = plant_payload(tmp_path / "evil" / "model.pt", marker)
    Image.new("RGB", (32, 32)).save(tmp_path / "image.png")
    for artifact in (evil, evil.parent):
        result = cli(
            "predict",
            "-c",
            DEMO_CONFIG,
            "-o",
            f"data.root={tmp_path / 'nowhere'}",
            "-o",
            "run.device=cpu",
            tmp_path / "image.png",
            "--out",
            tmp_path / "out",
            "--artifact",
            artifact,
        )
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and str(evil) in errors[0] and "weights_only=False" not in errors[0], result.output
        assert not marker.exists()


def test_a_twin_with_a_planted_model_is_refused(tmp_path):
    from stages.cam.model_file import MODEL_FILE
    from stages.common.training import reuse_trained

    marker = tmp_path / "ran"
    path = plant_payload(tmp_path / "twin" / MODEL_FILE, marker)
    (tmp_path / "out").mkdir()
    with pytest.raises(WssError) as refused:
        reuse_trained(tiny_cam_net()[1], tmp_path / "twin", MODEL_FILE, tmp_path / "out", "cam")
    assert not marker.exists()
    assert one_line(refused.value, path).endswith("; recompute it with wss run --force cam")


def fit_tiny(out: Path, resume: bool, epochs: int = 2) -> dict:
    from stages.common.training import TrainSettings, fit
    from tests.distributed_fit import NoisySquares

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))

    def step(net, batch):
        return nn.functional.binary_cross_entropy_with_logits(net(batch["image"])[:, 0], batch["label"]), {}

    out.mkdir(parents=True, exist_ok=True)
    fit(
        model,
        NoisySquares(),
        [(list(model.parameters()), 1.0)],
        step,
        TrainSettings(epochs=epochs, batch_size=8, lr=0.1, momentum=0.9),
        torch.device("cpu"),
        out,
        resume=resume,
        desc="tiny",
    )
    return model.state_dict()


def test_resume_with_a_planted_checkpoint_trains_from_the_start_and_runs_nothing(tmp_path, caplog):
    """A `.partial` folder in a copied workdir holding a crafted checkpoint (under the current
    name and under the name earlier versions used): `--resume` warns and trains afresh."""
    from stages.common.training import CHECKPOINT

    straight = fit_tiny(tmp_path / "straight", resume=False)
    marker = tmp_path / "ran"
    for name in {CHECKPOINT, "checkpoint.pt"}:
        plant_payload(tmp_path / "out" / name, marker)
    with caplog.at_level(logging.WARNING):
        resumed = fit_tiny(tmp_path / "out", resume=True)
    assert not marker.exists()
    assert f"{tmp_path / 'out' / CHECKPOINT}: unreadable checkpoint (" in caplog.text
    assert "training from the start" in caplog.text
    same_weights(resumed, straight)


def test_a_planted_holdout_checkpoint_is_not_a_candidate_and_runs_nothing(tmp_path, caplog):
    from stages.seg.stage import HOLDOUT_FILE, HoldoutTracker

    marker = tmp_path / "ran"
    path = plant_payload(tmp_path / HOLDOUT_FILE, marker)
    with caplog.at_level(logging.WARNING):
        tracker = HoldoutTracker(tiny_segmenter(), None, [], SEG_SECTION, torch.device("cpu"), path)
    assert not marker.exists()
    assert tracker.state == {"scores": {}, "best_epoch": None, "best_model": None}
    assert f"{path}: unreadable held-out scores (" in caplog.text and "not candidates" in caplog.text


def test_the_holdout_checkpoint_round_trips(tmp_path):
    from stages.seg.stage import HOLDOUT_FILE, HoldoutTracker, write_holdout

    model = tiny_segmenter()
    best = {k: v.clone() for k, v in model.state_dict().items()}
    state = {"scores": {0: 0.5, 1: 0.75, 2: float("nan")}, "best_epoch": 1, "best_model": best}
    write_holdout(tmp_path / HOLDOUT_FILE, state)
    tracker = HoldoutTracker(model, None, [], SEG_SECTION, torch.device("cpu"), tmp_path / HOLDOUT_FILE)
    assert tracker.state["best_epoch"] == 1 and list(tracker.state["scores"]) == [0, 1, 2]
    assert tracker.state["scores"][1] == 0.75 and tracker.state["scores"][2] != tracker.state["scores"][2]
    same_weights(tracker.state["best_model"], best)


# ------------------------------------------------------------------------------ broken files


def cut_short(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", ["cut short", "garbage", "empty", "foreign safetensors", "another kind"])
def test_a_damaged_model_file_is_one_line_naming_it_and_how_to_recompute_it(tmp_path, damage):
    from safetensors.torch import save_file

    from stages.cam.classifier import load_cam_net
    from stages.cam.model_file import MODEL_FILE as CAM_FILE
    from stages.seg.model import MODEL_FILE as SEG_FILE
    from stages.seg.model import SegModelError, load_segmenter

    cam, _ = write_cam_artifact(tmp_path / "cam")
    seg, _ = seg_artifact(tmp_path / "seg")
    other_kind = {"cam": (seg / SEG_FILE).read_bytes(), "seg": (cam / CAM_FILE).read_bytes()}
    for path, stage, load, error in (
        (cam / CAM_FILE, "cam", lambda: load_cam_net(cam, torch.device("cpu")), WssError),
        (seg / SEG_FILE, "seg", lambda: load_segmenter(seg, torch.device("cpu")), SegModelError),
    ):
        if damage == "cut short":
            cut_short(path)
        elif damage == "garbage":
            path.write_bytes(b"garbled bytes, not a model")
        elif damage == "empty":
            path.write_bytes(b"")
        elif damage == "foreign safetensors":
            save_file({"weight": torch.zeros(2)}, str(path))
        else:  # the segmenter's file where the classifier's should be, and the other way round
            path.write_bytes(other_kind[stage])
        with pytest.raises(error) as refused:
            load()
        message = one_line(refused.value, path)
        assert message.startswith(f"{path}: unreadable ") and message.endswith(
            f"; recompute it with wss run --force {stage}"
        ), message


def test_weights_that_do_not_fit_are_one_line(tmp_path):
    from stages.common.model_files import write_model_file
    from stages.seg.model import MODEL_FILE, SegModelError, load_segmenter

    folder, model = seg_artifact(tmp_path / "seg")
    from stages.common.model_files import read_model_file

    state = read_model_file(folder / MODEL_FILE, "seg", "model", "seg")
    for change, expected in (
        ("shape", "segmentation_head.0.weight is (2, 16, 3, 3)"),
        ("dtype", "torch.float64"),
        ("missing", "1 missing (segmentation_head.0.bias)"),
    ):
        tensors = dict(state.tensors)
        if change == "shape":
            tensors["segmentation_head.0.weight"] = tensors["segmentation_head.0.weight"][:2].clone()
        elif change == "dtype":
            tensors["segmentation_head.0.bias"] = tensors["segmentation_head.0.bias"].double()
        else:
            del tensors["segmentation_head.0.bias"]
        write_model_file(folder / MODEL_FILE, "seg", tensors, state.meta)
        with pytest.raises(SegModelError) as refused:
            load_segmenter(folder, torch.device("cpu"))
        message = one_line(refused.value, folder / MODEL_FILE)
        assert expected in message and "do not fit the Unet/resnet18 segmenter with 3 outputs" in message, message


def test_a_checkpoint_of_another_model_or_with_odd_optimizer_state_is_refused(tmp_path, caplog):
    """Checked before anything is loaded: the run trains from the start, the model untouched."""
    from stages.common.model_files import write_checkpoint, write_state_file
    from stages.common.training import CHECKPOINT, read_checkpoint

    net = nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    path = tmp_path / CHECKPOINT
    write_checkpoint(path, nn.Linear(3, 4), torch.optim.SGD(nn.Linear(3, 4).parameters(), lr=0.1), 0, [])
    assert read_checkpoint(path, net, opt, "tiny") is None
    assert "unreadable checkpoint (weight weight is (4, 3)" in caplog.text
    write_checkpoint(path, net, opt, 0, [])
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        header = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    tensors["optimizer/0/momentum_buffer"] = torch.zeros(7)
    write_state_file(path, "checkpoint", tensors, json.loads(header["meta"]))
    assert read_checkpoint(path, net, opt, "tiny") is None
    assert "optimizer tensor optimizer/0/momentum_buffer is (7,), its parameter (2, 3)" in caplog.text
    meta = json.loads(header["meta"])
    meta["optimizer"]["param_groups"][0]["lr"] = "fast"
    write_state_file(path, "checkpoint", {**tensors, "optimizer/0/momentum_buffer": torch.zeros(2, 3)}, meta)
    assert read_checkpoint(path, net, opt, "tiny") is None
    assert "optimizer setting 'lr' is 'fast'" in caplog.text


# ------------------------------------------------------------------------------ earlier versions


def test_a_model_pt_of_an_earlier_version_still_loads_safely(tmp_path):
    """A folder with only the old `model.pt`, or the file itself: same weights and metadata as
    the current file of the same model."""
    from stages.seg.model import load_segmenter

    folder, model = seg_artifact(tmp_path / "new")
    old = tmp_path / "old"
    old.mkdir()
    legacy_seg_file(old / "model.pt", model)
    current, meta = load_segmenter(folder, torch.device("cpu"))
    for artifact in (old, old / "model.pt"):
        loaded, old_meta = load_segmenter(artifact, torch.device("cpu"), ["a", "b"], "multiclass")
        same_weights(loaded.state_dict(), current.state_dict())
        assert old_meta == meta


def test_an_old_model_pt_with_more_than_plain_values_is_refused(tmp_path):
    from stages.seg.model import SegModelError, load_segmenter

    model = tiny_segmenter()
    path = legacy_seg_file(tmp_path / "model.pt", model)
    state = torch.load(path, weights_only=True)
    torch.save({**state, "threshold": torch.tensor(0.5)}, path)  # a tensor where a number belongs
    with pytest.raises(SegModelError) as refused:
        load_segmenter(path, torch.device("cpu"))
    assert "metadata is not plain values" in one_line(refused.value, path)
    torch.save({"weights": state["model"]}, path)  # a state dict of some other program
    with pytest.raises(SegModelError) as refused:
        load_segmenter(path, torch.device("cpu"))
    assert "without the {'model': state dict} of a wss model file" in one_line(refused.value, path)


# ------------------------------------------------------------------------------ writing
# (a full disk: tests/test_unwritable.py)


def test_a_reader_sees_the_old_file_or_the_whole_new_one(tmp_path, monkeypatch):
    """Written through a temporary name: a write that fails leaves the previous file intact."""
    import stages.common.model_files as model_files

    path = tmp_path / "model.safetensors"
    model_files.write_model_file(path, "cam", {"w": torch.ones(2)}, {"v": 1})
    before = path.read_bytes()

    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError(errno.EIO, "input/output error")

    monkeypatch.setattr(model_files, "save_file", interrupted)
    with pytest.raises(OSError):
        model_files.write_model_file(path, "cam", {"w": torch.zeros(2)}, {"v": 2})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_model_file_naming_options_outside_its_architecture_is_refused(tmp_path):
    """A received file's arch_options reach smp and, for a timm encoder, timm, whose keywords
    include file paths (checkpoint_path): only the architecture's own options are taken."""
    from stages.common.model_files import read_model_file, write_model_file
    from stages.seg.model import MODEL_FILE, SegModelError, load_segmenter

    folder, _ = seg_artifact(tmp_path / "seg")
    state = read_model_file(folder / MODEL_FILE, "seg", "model", "seg")
    meta = {**state.meta, "arch_options": {**state.meta["arch_options"], "checkpoint_path": str(tmp_path / "x.pth")}}
    write_model_file(folder / MODEL_FILE, "seg", state.tensors, meta)
    with pytest.raises(SegModelError) as refused:
        load_segmenter(folder, torch.device("cpu"))
    assert "arch_options 'checkpoint_path' is not an option of Unet" in one_line(refused.value, folder / MODEL_FILE)


@pytest.mark.parametrize(
    "config, problem",
    [
        ({"method": "gap", "epochz": 3}, "unknown key 'cam.epochz' (did you mean 'cam.epochs'?)"),
        ({"method": "gap", "lr": -1.0}, "cam.lr must be > 0, got -1.0"),
        ({"method": "nonesuch"}, "cam.method must be one of gap, dropblock"),
    ],
)
def test_a_cam_model_whose_config_this_version_refuses_is_one_line(tmp_path, config, problem):
    """The classifier is rebuilt from the config in its file: a setting this version does not
    know, or a value it refuses, names the file, the key and how to recompute it."""
    from stages.cam.classifier import load_cam_net
    from stages.cam.model_file import MODEL_FILE
    from stages.common.model_files import write_model_file

    _, net = write_cam_artifact(tmp_path / "cam")
    write_model_file(tmp_path / "cam" / MODEL_FILE, "cam", net, {"config": config, "classes": ["a", "b", "c"]})
    with pytest.raises(WssError) as refused:
        load_cam_net(tmp_path / "cam", torch.device("cpu"))
    message = one_line(refused.value, tmp_path / "cam" / MODEL_FILE)
    assert problem in message and message.endswith("; recompute it with wss run --force cam"), message
