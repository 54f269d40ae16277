"""ResNet trunks at output stride 16, and weight loading that never downloads in tests."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision import models

from data.errors import WssError
from stages.common.backbones import (
    IMAGENET_WEIGHTS,
    STAGE_STRIDES,
    ResNetFeatures,
    WeightsError,
    stage_channels,
    upsample_cells,
)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_output_stride_16_and_channels(name):
    net = ResNetFeatures(name).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        maps = net.forward_stages(x)
    strides = [64 // m.shape[2] for m in maps]
    assert strides == [4, 4, 8, 16, 16]
    assert [m.shape[3] for m in maps] == [24, 24, 12, 6, 6]
    assert [m.shape[1] for m in maps] == stage_channels(name) == net.channels
    # layer4 keeps the resolution by dilating its 3x3 convolutions
    dilated = [m for m in net.layer4.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert dilated and all(m.dilation == (2, 2) and m.stride == (1, 1) for m in dilated)


def test_odd_input_sizes_round_up():
    with torch.no_grad():
        out = ResNetFeatures("resnet18").eval()(torch.randn(1, 3, 65, 70))
    assert out.shape[2:] == (5, 5)


def test_unknown_backbone_is_a_user_error():
    with pytest.raises(WssError, match="unknown backbone 'resnet99'"):
        ResNetFeatures("resnet99")


def test_imagenet_offline_fails_fast_naming_the_local_alternative(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached download can answer instead

    def offline(self, *args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(type(IMAGENET_WEIGHTS["resnet18"]), "get_state_dict", offline)
    with pytest.raises(WeightsError) as info:
        ResNetFeatures("resnet18", "imagenet")
    message = str(info.value)
    assert "resnet18" in message and "name resolution" in message
    assert "cam.weights: /path/to/resnet18-" in message and ".pth" in message
    assert "cam.weights: null" in message
    assert "\n" not in message


def saved_resnet(tmp_path, name: str = "resnet18", wrap: bool = False):
    torch.manual_seed(1)
    net = getattr(models, name)(weights=None)
    state = net.state_dict()
    path = tmp_path / f"{name}.pth"
    torch.save({"state_dict": state} if wrap else state, path)
    return path, state


@pytest.mark.parametrize("wrap", [False, True])
def test_weights_from_a_local_file(tmp_path, wrap):
    path, state = saved_resnet(tmp_path, wrap=wrap)
    net = ResNetFeatures("resnet18", str(path))
    assert torch.equal(net.stem[0].weight, state["conv1.weight"])
    assert torch.equal(net.stem[1].running_var, state["bn1.running_var"])
    assert torch.equal(net.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])


def test_weights_file_errors(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        ResNetFeatures("resnet18", str(tmp_path / "absent.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable PyTorch state dict"):
        ResNetFeatures("resnet18", str(garbage))
    path, _ = saved_resnet(tmp_path, "resnet18")
    with pytest.raises(WssError):  # resnet18 weights do not fit resnet50
        ResNetFeatures("resnet50", str(path))


def test_weights_of_another_depth_are_refused(tmp_path):
    """resnet34's blocks shared with resnet18 have the same shapes: only its extra keys tell."""
    path, _ = saved_resnet(tmp_path, "resnet34")
    with pytest.raises(WeightsError) as info:
        ResNetFeatures("resnet18", str(path))
    message = str(info.value)
    assert str(path) in message and "resnet18" in message and "unexpected" in message
    assert "layer1.2." in message and "\n" not in message
    ResNetFeatures("resnet34", str(path))  # the right trunk takes it, fc.* and all


# ----------------------------------------------------------------------------- cell alignment
def impulse_stages(height: int, width: int, stage: int, cell: tuple[int, int]) -> list[torch.Tensor]:
    """Stand-in trunk outputs (one channel per stage) for a height x width image: zero but for
    one cell of `stage`, to see where a network puts that cell on a finer grid."""
    outputs = [torch.zeros(1, 1, math.ceil(height / s), math.ceil(width / s)) for s in STAGE_STRIDES]
    outputs[stage][0, 0, cell[0], cell[1]] = 1.0
    return outputs


def centre_px(values: torch.Tensor, stride: int) -> tuple[float, float]:
    """(y, x) centroid, in continuous image coordinates, of a (h, w) map of a stride-s network,
    whose cell i is centred on pixel s i, i.e. at s i + 0.5 (see the receptive-field test)."""
    values = values.clamp_min(0).double()
    ys = torch.arange(values.shape[0], dtype=torch.float64) * stride + 0.5
    xs = torch.arange(values.shape[1], dtype=torch.float64) * stride + 0.5
    total = values.sum()
    return float(values.sum(1) @ ys / total), float(values.sum(0) @ xs / total)


def inner_cell(height: int, width: int, stride: int) -> tuple[int, int]:
    """A cell near the bottom-right corner, where a squeezed map is furthest off, whose bilinear
    spread still fits inside the image."""
    return math.ceil(height / stride) - 2, math.ceil(width / stride) - 3


def cell_centre(index: int, stride: int) -> float:
    return stride * index + 0.5


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_a_trunk_cell_is_centred_on_pixel_stride_times_index(name):
    """The convention upsample_cells and CAM inference rely on, proved by symmetry: if cell n of a
    stride-s map is centred on pixel s n, mirroring an image s k + 1 pixels wide maps cell n onto
    cell k - n, so every stage of a trunk with mirror-symmetric kernels commutes with the flip.
    Were cell n centred on s n + s / 2 (covering [s n, s n + s)), that would hold for width s k."""
    torch.manual_seed(0)
    net = ResNetFeatures(name).eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.copy_((module.weight + module.weight.flip(-1)) / 2)
        for width, centred in [(16 * 5 + 1, True), (16 * 5, False)]:
            x = torch.randn(1, 3, 16 * 3 + 1, width)
            plain, mirrored = net.forward_stages(x), net.forward_stages(x.flip(-1))
            for stage, (a, b) in enumerate(zip(plain, mirrored)):
                assert torch.allclose(a.flip(-1), b, atol=1e-4) == centred, (width, stage)


@pytest.mark.parametrize("size", [(75, 101), (375, 500), (64, 96)])
@pytest.mark.parametrize("source, target", [(16, 4), (16, 8), (8, 4), (16, 1)])
def test_upsample_cells_keeps_a_coarse_cell_over_its_pixels(size, source, target):
    height, width = size
    coarse = torch.zeros(1, 1, math.ceil(height / source), math.ceil(width / source))
    cell = inner_cell(height, width, source)
    coarse[0, 0, cell[0], cell[1]] = 1.0
    fine_size = (math.ceil(height / target), math.ceil(width / target))
    fine = upsample_cells(coarse, source // target, fine_size)
    assert fine.shape[-2:] == fine_size
    y, x = centre_px(fine[0, 0], target)
    assert y == pytest.approx(cell_centre(cell[0], source), abs=1e-6)
    assert x == pytest.approx(cell_centre(cell[1], source), abs=1e-6)
    assert fine[0, 0, cell[0] * source // target, cell[1] * source // target] == 1  # a centre keeps its value


def test_upsample_cells_fills_the_last_cells_with_the_border_value():
    coarse = torch.arange(6, dtype=torch.float32).view(1, 1, 2, 3)
    fine = upsample_cells(coarse, 4, (7, 12))
    assert fine[0, 0, 0].tolist() == [0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2, 2, 2]
    assert fine[0, 0, :, 0].tolist() == [0, 0.75, 1.5, 2.25, 3, 3, 3]
    with pytest.raises(ValueError, match="does not cover"):
        upsample_cells(coarse, 4, (9, 12))


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_irnet_trunk_trains_layer3_and_layer4_with_fixed_batchnorm_statistics():
    """cam.frozen_stages 2 + cam.freeze_bn (configs/voc.yaml): one training step of a GAP
    classifier changes no weight of the stem, layer1 and layer2 and no BatchNorm statistic,
    and does change layer3, layer4 and the head; the optimizer holds no frozen parameter."""
    from stages.cam.config import CamConfig
    from stages.cam.methods import build_cam_net
    from stages.common.training import TrainSettings, make_optimizer

    torch.manual_seed(0)
    net = build_cam_net(CamConfig(backbone="resnet18", weights=None, frozen_stages=2, freeze_bn=True), 3).train()
    before = _snapshot(net)
    optimizer = make_optimizer(net.param_groups(10.0), TrainSettings(epochs=1, batch_size=2, lr=0.1))
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    frozen = [p for name in ("stem", "layer1", "layer2") for p in getattr(net.backbone, name).parameters()]
    assert frozen and not any(id(p) in in_optimizer for p in frozen)

    loss = net.loss(net(torch.randn(2, 3, 64, 64)), torch.tensor([[1, 0, 1], [0, 1, 0]]))[0]
    loss.backward()
    optimizer.step()
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith(("backbone.stem", "backbone.layer1", "backbone.layer2")) for k in changed)
    assert not any(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
    assert any(k.startswith("backbone.layer3") and k.endswith("conv1.weight") for k in changed)
    assert any(k.startswith("backbone.layer4") for k in changed) and "classifier.weight" in changed
    assert net.training and net.backbone.layer3.training  # only the BatchNorm modules are held in eval


def test_default_trunk_trains_every_stage_and_its_batchnorm_statistics():
    net = ResNetFeatures("resnet18").train()
    before = _snapshot(net)
    net(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert not torch.equal(before["stem.1.running_mean"], net.state_dict()["stem.1.running_mean"])


@pytest.mark.parametrize("bad", [-2, 5])
def test_frozen_stages_out_of_range_is_an_error(bad):
    with pytest.raises(WssError, match="frozen_stages"):
        ResNetFeatures("resnet18").freeze(bad)
