"""Stage-1 methods of the chest X-ray papers (pcam, pylon, multiscale, minmax) and `wss compare`.

Per method: output shapes, gradients to every parameter, the unit check of its distinctive
piece, and training through the real cam stage beating both trivial baselines (gap and
dropblock too: that is the cam stage's own end-to-end proof).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stages.cam.config import CamConfig
from stages.cam.infer import multiscale_cam
from stages.cam.methods import METHODS, build_cam_net
from stages.common.backbones import STAGE_STRIDES, upsample_cells
from tests.test_backbones import cell_centre, centre_px, impulse_stages, inner_cell
from tests.test_cam_stage import trivial_baselines

NEW_METHODS = ["pcam", "pylon", "multiscale", "minmax"]
NUM_CLASSES = 3


def tiny_net(method: str, **extra):
    torch.manual_seed(0)
    return build_cam_net(CamConfig(method=method, backbone="resnet18", weights=None, **extra), NUM_CLASSES)


@pytest.fixture(scope="module")
def nets():
    return {m: tiny_net(m) for m in NEW_METHODS}


# ------------------------------------------------------------------------------ common contract
@pytest.mark.parametrize("method", NEW_METHODS)
def test_output_shapes_at_several_sizes(nets, method):
    net = nets[method].eval()
    with torch.no_grad():
        for height, width in [(64, 64), (48, 80), (33, 47), (75, 101)]:
            x = torch.randn(2, 3, height, width)
            out = net(x)
            maps = net.cam_maps(x)
            stride = net.cam_stride
            assert out["logits"].shape == (2, NUM_CLASSES)
            assert maps.shape == (2, NUM_CLASSES, math.ceil(height / stride), math.ceil(width / stride))
            assert (maps >= 0).all()
            assert net.classify(net.features(x)).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("method", NEW_METHODS)
def test_multiscale_flip_inference_gives_stride4_normalised_maps(nets, method):
    net = nets[method].eval()
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    cam = multiscale_cam(net, image, [0, 2], [1.0, 0.5, 1.5], True, torch.device("cpu"))
    assert cam.shape == (2, 13, 18)
    peaks = cam.max(axis=(1, 2))  # 1, or 0 where an untrained map is all negative (pylon's logits)
    assert all(math.isclose(p, 1.0, abs_tol=1e-5) or p == 0 for p in peaks) and peaks.max() > 0
    assert cam.min() >= 0


@pytest.mark.parametrize("method", NEW_METHODS)
def test_gradients_reach_every_trainable_parameter(method):
    net = tiny_net(method).train()
    x = torch.randn(4, 3, 64, 64)
    labels = torch.tensor([[1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.float32)
    loss, logs = net.loss(net(x), labels)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    dead = [
        name for name, p in net.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert dead == []
    groups = net.param_groups(10.0)
    assert sum(len(params) for params, _ in groups) == len(list(net.parameters()))
    assert groups[1][1] == 10.0 and len(groups[1][0]) > 0


def test_dropblock_trains_on_maps_smaller_than_its_block():
    """A 5-block on the 4x4 map of a 64 px crop (3x5, 3x3, 1x1 too) shrinks to an odd size that fits."""
    net = tiny_net("dropblock", dropblock_prob=0.3, dropblock_size=5).train()
    for height, width in [(64, 64), (48, 80), (33, 47), (16, 16)]:
        assert net(torch.randn(2, 3, height, width))["logits"].shape == (2, NUM_CLASSES)
    torch.manual_seed(0)
    dropped = net.drop4(torch.ones(8, 16, 4, 4))
    assert (dropped == 0).any() and (dropped > 0).any() and torch.isfinite(dropped).all()


def test_every_method_is_registered():
    assert set(NEW_METHODS) <= set(METHODS)
    for method in NEW_METHODS:
        assert (Path(__file__).resolve().parents[1] / "configs" / "methods" / f"{method}.yaml").is_file()


# ------------------------------------------------------------------------------ PCAM
def test_pcam_pooled_feature_is_the_explicit_weighted_sum(nets):
    from stages.cam.pcam import pcam_pool

    net = nets["pcam"].eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 80)
        features = net.features(x)
        prob = torch.sigmoid(net.classifier(features))
        pooled = pcam_pool(features, prob)
        logits = net(x)["logits"]
    weight, bias = net.classifier.weight.flatten(1), net.classifier.bias
    for b in range(2):
        for c in range(NUM_CLASSES):
            explicit = torch.zeros(features.shape[1], dtype=torch.float64)
            total = 0.0
            for i in range(features.shape[2]):
                for j in range(features.shape[3]):
                    p = float(prob[b, c, i, j])
                    explicit += p * features[b, :, i, j].double()
                    total += p
            explicit /= total
            assert torch.allclose(pooled[b, c].double(), explicit, atol=1e-5)
            assert torch.isclose(logits[b, c].double(), explicit @ weight[c].double() + bias[c].double(), atol=1e-4)
    assert torch.allclose(net.cam_maps(x), torch.relu(torch.logit(prob.double())).float(), atol=1e-4)
    # the image logit is the p-weighted mean of the logit map
    logit_map = net.classifier(features).flatten(2)
    weighted = (prob.flatten(2) * logit_map).sum(2) / prob.flatten(2).sum(2)
    assert torch.allclose(weighted, logits, atol=1e-4)


def test_pcam_heatmap_peak_survives_saturated_probabilities():
    """With logits far above 17, sigmoid is 1.0 over the whole region in float32: the peak of p
    is then the first tied cell. The heatmap keeps the logits' order, so its peak is the true one."""
    net = tiny_net("pcam").eval()
    features = torch.zeros(1, net.classifier.in_channels, 6, 7)
    features[0, 0] = torch.linspace(30, 60, 42).view(6, 7)
    features[0, 0, 4, 5] = 100.0
    with torch.no_grad():
        net.classifier.weight.zero_()
        net.classifier.bias.zero_()
        net.classifier.weight[:, 0] = 1.0
        prob = net.probability_map(features)
        heat = torch.relu(net.logit_map(features))
    assert int((prob[0, 0] == prob[0, 0].max()).sum()) > 1  # saturated: ties
    assert divmod(int(heat[0, 0].argmax()), 7) == (4, 5)


# ------------------------------------------------------------------------------ PYLON
def test_pylon_logit_is_the_max_of_its_map_without_gap_or_groupnorm(nets):
    net = nets["pylon"].eval()
    banned = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.GroupNorm, nn.AdaptiveMaxPool2d)
    assert not [m for m in net.modules() if isinstance(m, banned)]
    with torch.no_grad():
        x = torch.randn(2, 3, 96, 64)
        out = net(x)
        assert out["logit_map"].shape == (2, NUM_CLASSES, 24, 16)  # stride 4
        assert torch.equal(out["logits"], out["logit_map"].flatten(2).max(dim=2).values)
        assert torch.allclose(net.cam_maps(x), F.relu(out["logit_map"]))
    assert net.cam_stride == 4


@pytest.mark.parametrize("size", [(12, 12), (11, 7)])
def test_pylon_attention_puts_a_pooled_cell_back_between_the_cells_it_pooled(size):
    """The pyramid's 2x2 max-pool is not centred as the trunk's strides are: cell m covers
    2m and 2m + 1, so on the way back it lands at 2m + 0.5."""
    from stages.cam.pylon import unpool

    pooled = torch.nn.MaxPool2d(2, ceil_mode=True)(torch.zeros(1, 1, *size))
    pooled[0, 0, 2, 1] = 1.0
    up = unpool(pooled, torch.zeros(1, 1, *size))[0, 0]
    assert up.shape == size
    ys, xs = torch.arange(size[0], dtype=torch.float32), torch.arange(size[1], dtype=torch.float32)
    assert float(up.sum(1) @ ys / up.sum()) == pytest.approx(4.5)
    assert float(up.sum(0) @ xs / up.sum()) == pytest.approx(2.5)


def test_pylon_upsamples_by_the_stride_ratio(nets):
    """layer4 -> layer3 -> layer2 -> layer1 is stride 16 -> 16 -> 8 -> 4 (layer4 is dilated)."""
    assert [module.factor for module in nets["pylon"].up] == [1, 2, 2]


# ------------------------------------------------------------------------------ multiscale
def test_multiscale_weights_are_convex_and_the_cam_is_their_weighted_sum():
    net = tiny_net("multiscale").eval()
    with torch.no_grad():
        net.mixer.logits.copy_(torch.randn_like(net.mixer.logits) * 2)
        weights = net.stage_weights()
        assert weights.shape == (NUM_CLASSES, 3)
        assert (weights >= 0).all() and torch.allclose(weights.sum(dim=1), torch.ones(NUM_CLASSES))
        x = torch.randn(1, 3, 75, 101)
        stages = net.backbone.forward_stages(x)
        h, w = finest = stages[2].shape[-2:]
        expected = torch.zeros(1, NUM_CLASSES, *finest)
        for k, (index, conv) in enumerate(zip([2, 3, 4], net.classifiers)):
            factor = STAGE_STRIDES[index] // 8  # by the stride ratio
            cam_k = upsample_cells(conv(stages[index]), factor, (h, w))  # linear: conv and upsampling commute
            expected += weights[:, k].view(1, -1, 1, 1) * cam_k
        assert torch.allclose(net.cam_maps(x), F.relu(expected), atol=1e-5)
        assert torch.allclose(net(x)["logits"], expected.mean(dim=(2, 3)), atol=1e-5)


@pytest.mark.parametrize("size", [(75, 101), (375, 500)])
@pytest.mark.parametrize("stages", [[2, 3, 4], [0, 2, 3]])
def test_multiscale_keeps_deep_cells_over_their_pixels(size, stages):
    """A signal in one cell of a coarser stage lands at that cell's pixel centre on the finest
    chosen stage's grid, also where a side is not a multiple of 16 (VOC's 500x375)."""
    height, width = size
    net = tiny_net("multiscale", multiscale_stages=stages)
    for k, stage in enumerate(stages[1:], start=1):
        stride = STAGE_STRIDES[stage]
        cell = inner_cell(height, width, stride)
        net.backbone.forward_stages = lambda x, last=4: impulse_stages(height, width, stage, cell)[: last + 1]
        with torch.no_grad():
            features = net.features(torch.zeros(1, 3, height, width))
        assert features.shape == (1, len(stages), math.ceil(height / net.cam_stride), math.ceil(width / net.cam_stride))
        y, x = centre_px(features[0, k], net.cam_stride)
        assert abs(y - cell_centre(cell[0], stride)) < 0.01 and abs(x - cell_centre(cell[1], stride)) < 0.01


def test_multiscale_without_the_deep_stages_trains_every_parameter_it_leaves_unfrozen():
    """Stages [1, 2] never run layer3/layer4: they are frozen, and every parameter left
    trainable gets a gradient (multi-process training stops on any that does not)."""
    net = tiny_net("multiscale", multiscale_stages=[1, 2]).train()
    assert net.cam_stride == 4
    loss, _ = net.loss(net(torch.randn(2, 3, 64, 64)), torch.tensor([[1.0, 0, 1], [0, 1, 0]]))
    loss.backward()
    trainable = {name: p for name, p in net.named_parameters() if p.requires_grad}
    assert not any(name.startswith(("backbone.layer3", "backbone.layer4")) for name in trainable)
    assert [name for name, p in trainable.items() if p.grad is None] == []


def test_multiscale_rejects_bad_stages():
    """The config refuses a stage out of 0..4 (test_config); the net, built from code, refuses it too."""
    from data.errors import WssError
    from stages.cam.multiscale import MultiscaleNet

    for stages in ([2, 7], [2, 2]):
        with pytest.raises(WssError, match="multiscale_stages"):
            MultiscaleNet(NUM_CLASSES, "resnet18", None, stages=stages)


# ------------------------------------------------------------------------------ minmax
def test_minmax_entropy_term_is_maximal_for_uniform_predictions():
    from stages.cam.minmax import binary_entropy, max_entropy_loss

    p = torch.tensor([0.01, 0.2, 0.5, 0.7, 0.999])
    logits = torch.log(p / (1 - p))
    explicit = -(p * torch.log(p) + (1 - p) * torch.log(1 - p))
    assert torch.allclose(binary_entropy(logits), explicit, atol=1e-5)
    assert int(binary_entropy(logits).argmax()) == 2
    assert abs(float(max_entropy_loss(torch.zeros(4, 3)))) < 1e-7
    others = [float(max_entropy_loss(torch.full((4, 3), v))) for v in (-3.0, -0.5, 0.5, 3.0)]
    assert min(others) > 0
    assert torch.isfinite(binary_entropy(torch.tensor([-200.0, 200.0]))).all()


def test_minmax_masks_are_complementary_and_erasing_only_adds():
    from stages.cam.minmax import split_image

    net = tiny_net("minmax").eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        out = net(x)
        mask = out["mask"]
        assert mask.shape == (2, 1, 4, 4) and (mask >= 0).all() and (mask <= 1).all()
        kept, rest = split_image(x, mask)
        assert torch.allclose(kept + rest, x, atol=1e-6)
        heat = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1)
        assert torch.allclose(net.soft_mask(heat), torch.sigmoid(net.k * (heat - 0.5)))
        plain = net.cam_maps(x)
        assert (plain >= 0).all() and (plain <= 1).all()
        net.erase_steps = 2
        erased = net.cam_maps(x)
        assert (erased >= plain - 1e-6).all()


def test_minmax_mask_cells_stay_over_their_pixels():
    """The stride-16 mask is upsampled onto the image cell by cell, also for sides that are not
    multiples of 16."""
    from stages.cam.minmax import split_image

    height, width = 75, 101
    mask = torch.zeros(1, 1, math.ceil(height / 16), math.ceil(width / 16))
    cell = inner_cell(height, width, 16)
    mask[0, 0, cell[0], cell[1]] = 1.0
    kept, rest = split_image(torch.ones(1, 3, height, width), mask)
    assert kept.shape == rest.shape == (1, 3, height, width)
    y, x = centre_px(kept[0, 0], 1)
    assert abs(y - cell_centre(cell[0], 16)) < 0.01 and abs(x - cell_centre(cell[1], 16)) < 0.01


def test_minmax_maps_are_rescaled_per_image_and_weighted_by_class_probability():
    from stages.cam.minmax import rescale

    maps = torch.tensor([[[[2.0, 4.0], [6.0, 10.0]], [[-1.0, -1.0], [-1.0, -1.0]]]])
    scaled = rescale(maps)
    assert torch.allclose(scaled[0, 0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert torch.all(scaled[0, 1] == 0)  # a flat map has no extent, not a division by zero
    net = tiny_net("minmax")
    # one class the image surely has, one it surely has not: the mask follows the first only
    logit_map = torch.zeros(1, 3, 2, 2)
    logit_map[0, 0] = torch.tensor([[20.0, 30.0], [40.0, 50.0]])
    logit_map[0, 1] = torch.tensor([[-90.0, -50.0], [-90.0, -90.0]])
    expected = torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]])
    assert torch.allclose(net.mask_map(logit_map)[0, 0], expected, atol=1e-4)


def test_minmax_mask_does_not_train_the_localizer_head():
    """As in the authors' code the mask is detached: the x*M / x*(1-M) terms train the shared
    trunk and the classifier head; the localizer head learns from its own classification loss."""
    net = tiny_net("minmax").train()
    labels = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.float32)
    out = net(torch.randn(2, 3, 64, 64))
    from stages.cam.minmax import max_entropy_loss
    from stages.cam.nets import classification_loss

    masked = classification_loss(out["fg_logits"], labels, net.loss_kind) + max_entropy_loss(out["bg_logits"])
    masked.backward()
    assert net.localizer.weight.grad is None or not net.localizer.weight.grad.any()
    assert net.classifier_fc.weight.grad.abs().sum() > 0
    assert net.backbone.layer1[0].conv1.weight.grad.abs().sum() > 0


def test_minmax_running_statistics_come_from_the_whole_images_only():
    """A training step's BatchNorm running statistics are those of the localizer's pass over
    the images: the passes over x*M and x*(1-M) use their batch statistics but record none."""
    import copy

    from stages.cam.minmax import split_image

    net = tiny_net("minmax").train()
    twin = copy.deepcopy(net)
    x = torch.randn(4, 3, 64, 64) * 2 + 1
    out = net(x)
    twin.localize(x)
    for (name, ours), theirs in zip(net.backbone.state_dict().items(), twin.backbone.state_dict().values()):
        assert torch.equal(ours, theirs), name
    assert not torch.equal(net.backbone.stem[1].running_mean, tiny_net("minmax").backbone.stem[1].running_mean)
    kept, rest = split_image(x, out["mask"].detach())
    with torch.no_grad():  # the same forward with statistics recorded: batch statistics, same outputs
        assert torch.allclose(twin.judge(kept), out["fg_logits"], atol=1e-5)
        assert torch.allclose(twin.judge(rest), out["bg_logits"], atol=1e-5)
    assert {m.momentum for m in net.modules() if isinstance(m, nn.BatchNorm2d)} == {0.1}  # restored


def test_minmax_loss_is_the_sum_of_its_terms():
    net = tiny_net("minmax", minmax_entropy_weight=0.5).train()
    labels = torch.tensor([[1, 0, 0], [0, 1, 1]], dtype=torch.float32)
    out = net(torch.randn(2, 3, 64, 64))
    loss, logs = net.loss(out, labels)
    assert math.isclose(
        float(loss.detach()), float(logs["loc_loss"] + logs["fg_loss"] + 0.5 * logs["bg_entropy_gap"]), rel_tol=1e-5
    )


# ------------------------------------------------------------------------------ compare's scores
def _write_cam_files(cam_dir: Path, dataset, ids, inside: float, outside: float) -> None:
    """Stride-4 CAMs that are `inside` on each labelled class's ground truth and `outside` elsewhere."""
    from stages.cam.infer import save_cam

    cam_dir.mkdir(parents=True, exist_ok=True)
    for image_id in ids:
        gt = dataset.read_mask(image_id)
        keys = [int(k) for k in np.nonzero(dataset.label_vector(image_id))[0]]
        small = gt[::4, ::4]
        cam = np.stack([np.where(small == k + 1, inside, outside) for k in keys]).astype(np.float32)
        save_cam(cam_dir / f"{image_id}.npz", cam, keys, gt.shape)


def test_tuned_threshold_is_chosen_on_one_split_and_applied_to_the_other(synthetic_dataset, tmp_path):
    from data.layout import PreparedDataset
    from stages.cam.scoring import threshold_sweep, tuned_miou

    dataset = PreparedDataset(synthetic_dataset(n=16, size=64))
    val, train = dataset.split("val"), dataset.split("train")
    _write_cam_files(tmp_path / "val", dataset, val, inside=0.8, outside=0.1)
    _write_cam_files(tmp_path / "train", dataset, train, inside=0.3, outside=0.05)
    sweep = threshold_sweep(dataset, val, tmp_path / "val")
    assert sweep[0.45] > 0.7 and sweep[0.05] < 0.5 and sweep[0.9] < 0.5
    threshold, miou = tuned_miou(dataset, val, tmp_path / "val", train, tmp_path / "train")
    assert threshold == max(sweep, key=sweep.get) and 0.3 < threshold < 0.8
    # the train CAMs (0.3 inside) would want a lower threshold; the val-chosen one is applied as is
    train_sweep = threshold_sweep(dataset, train, tmp_path / "train")
    assert train_sweep[0.15] > 0.7 and math.isclose(miou, train_sweep[threshold]) and miou < 0.5


def test_point_localization_hits_where_the_peak_is_inside_the_box(tmp_path):
    from data.nih import Box
    from stages.cam.infer import save_cam
    from stages.cam.localization import point_localization

    class Classes:
        classes = ["Mass", "Nodule"]

    cam = np.zeros((2, 16, 16), np.float32)
    cam[0, 2, 3] = 1.0  # Mass peak: cell (2, 3) -> pixels x 12..16, y 8..12
    cam[1, 10, 10] = 1.0  # Nodule peak at x 40..44, y 40..44
    save_cam(tmp_path / "a.npz", cam, [0, 1], (64, 64))
    boxes = {"a": [Box("a", "Mass", 10, 6, 8, 8), Box("a", "Nodule", 0, 0, 20, 20)]}
    scores = point_localization(Classes(), boxes, tmp_path)
    assert scores["point/Mass"] == 1.0 and scores["point/Nodule"] == 0.0 and scores["point/mean"] == 0.5


# ------------------------------------------------------------------------------ training + compare
REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
# On top of tests.helpers' FAST_CAM: 96 px, so that the stride-16 maps have some extent (6 x 6).
TRAIN = {"cam.epochs": 6, "cam.crop_size": 96, "cam.resize_long": "[84,108]"}
TRAIN_KW = {k.replace(".", "__"): v for k, v in TRAIN.items()}  # as demo_overrides takes them


def preset_overrides(method: str) -> dict:
    """The preset's cam keys as -o values, so run-stage resolves the same config as compare."""
    import yaml

    preset = REPO / "configs" / "methods" / f"{method}.yaml"
    cam = yaml.safe_load(preset.read_text())["cam"] if preset.is_file() else {}
    return {f"cam__{k}": json.dumps(v) for k, v in cam.items()}


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    """A tiny set a from-scratch classifier learns in a few CPU epochs: the binary variant (is
    there a marked body?) with big marks. 48 images of 96 px, 38 for training, 17 positive."""
    from data.synthetic import SyntheticSpec, write_synthetic

    spec = SyntheticSpec(n=48, size=96, seed=0, variant="binary", mark_scale=3.0)
    return write_synthetic(tmp_path_factory.mktemp("methods-syn"), spec)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One workdir for the training tests and compare, so compare reuses their artifacts."""
    return tmp_path_factory.mktemp("methods-work")


def trained_metrics(cli, demo_overrides, learnable, workdir, method) -> dict:
    """Train `method` through `wss run-stage cam` (cached across the tests of this module)."""
    result = cli(
        "run-stage",
        "cam",
        "-c",
        DEMO,
        *demo_overrides(learnable, workdir, **{**preset_overrides(method), "cam__method": method}, **TRAIN_KW),
    )
    assert result.exit_code == 0, result.output
    artifacts = [
        p
        for p in workdir.glob("*/cam-*")
        if json.loads((p / "manifest.json").read_text())["config"]["cam"]["method"] == method
    ]
    assert len(artifacts) == 1
    return json.loads((artifacts[0] / "manifest.json").read_text())["metrics"] | {"artifact": artifacts[0]}


@pytest.mark.slow
@pytest.mark.parametrize("method", NEW_METHODS)
def test_method_trains_through_the_cam_stage(cli, demo_overrides, learnable, workdir, method):
    from data.layout import PreparedDataset
    from stages.cam.infer import load_cam

    metrics = trained_metrics(cli, demo_overrides, learnable, workdir, method)
    dataset = PreparedDataset(learnable)
    ids = dataset.split("train")
    assert metrics["cam_scored_images"] == len(ids)
    assert 0.0 <= metrics["cam_miou"] <= 1.0 and 0.0 <= metrics["cls_mean_auc"] <= 1.0
    for image_id in ids:
        cam, keys, size = load_cam(metrics["artifact"] / "cams" / f"{image_id}.npz")
        assert list(keys) == list(np.nonzero(dataset.label_vector(image_id))[0])
        assert cam.shape == (len(keys), 24, 24) and size == (96, 96)
        peaks = cam.max(axis=(1, 2))  # 0 where a class never fires (all ReLU'd away); none on negatives
        assert np.all(np.isclose(peaks, 1.0, atol=1e-2) | (peaks == 0)), peaks


PYLON_FROM_SCRATCH = (
    "from scratch, PYLON's classifier fits this 6-epoch, 38-image set (val AUC 1.0) but whether its map covers "
    "the marked body depends on the run: CAM mIoU 0.465 against 0.481 for all background with wss's earlier "
    "single-conv UP module, 0.575 with the published two-conv one (one thread, 2026-12-06). Why it can miss "
    "(measured on the same set drawn with --seed 1): the one cell that global max pooling trains sits 20-50 px "
    "beside the mark, in a direction fixed per run in the network's own frame; nothing but a pretrained, local "
    "trunk ties the peak to the evidence. On the demo-sized benchmark it stays at the all-background baseline "
    "from scratch (0.220 against 0.218) and learns on a pretrained trunk (0.440; docs/methods.md)"
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method",
    [
        "pcam",  # its logit map; its saturated probability map peaked off the body (stages/cam/pcam.py)
        pytest.param("pylon", marks=pytest.mark.xfail(strict=False, reason=PYLON_FROM_SCRATCH)),
        "gap",  # the cam stage's own proof: run-stage cam on a tiny set beats both baselines
        "dropblock",
        "multiscale",
        "minmax",
    ],
)
def test_method_beats_trivial_baselines(cli, demo_overrides, learnable, workdir, method):
    from data.layout import PreparedDataset

    metrics = trained_metrics(cli, demo_overrides, learnable, workdir, method)
    dataset = PreparedDataset(learnable)
    background, whole = trivial_baselines(dataset, dataset.split("train"))
    assert metrics["cam_miou"] > max(background, whole) + 0.02, (metrics["cam_miou"], background, whole)


@pytest.mark.slow  # trains pcam and multiscale unless the training tests above already did
def test_compare_writes_the_table_and_reuses_the_cache(demo_overrides, learnable, workdir, tmp_path):
    from click.testing import CliRunner

    from pipeline.compare import compare_command

    args = [
        "-c",
        str(DEMO),
        *[str(a) for a in demo_overrides(learnable, workdir, **TRAIN_KW)],
        "--methods",
        "pcam,multiscale",
        "--out",
        str(tmp_path / "cmp"),
    ]
    first = CliRunner().invoke(compare_command, args, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    out = tmp_path / "cmp"
    rows = list(csv.DictReader(open(out / "compare.csv")))
    assert [r["method"] for r in rows] == ["pcam", "multiscale"]
    for row in rows:
        for key in ["cls_mean_auc", "cam_miou", "cam_miou_tuned", "tuned_threshold"]:
            assert 0.0 <= float(row[key]) <= 1.0, (key, row)
        assert int(row["parameters"]) > 1_000_000 and float(row["train_images_per_s"]) > 0
    assert "| pcam |" in (out / "compare.md").read_text() and (out / "overlays.png").stat().st_size > 1000
    from PIL import Image

    assert Image.open(out / "overlays.png").size[0] == 160 * 3

    cached = sorted((out / "cache").glob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in cached]
    second = CliRunner().invoke(compare_command, args, catch_exceptions=False)
    assert second.exit_code == 0, second.output
    assert [r["state"] for r in csv.DictReader(open(out / "compare.csv"))] == ["cached", "cached"]
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    assert list(csv.DictReader(open(out / "compare.csv")))[0]["cam_miou_tuned"] == rows[0]["cam_miou_tuned"]

    # a val split that is the scored split itself leaves no image to tune the threshold on
    from pipeline.compare import extra_scores, method_config
    from pipeline.runner import Pipeline

    settings = [a for a in args[args.index("-c") + 2 : args.index("--methods")] if a != "-o"]
    pcam = Pipeline(method_config([DEMO], settings, "pcam"))
    scores = extra_scores(pcam, pcam.artifact("cam"), tmp_path / "fresh", None)
    assert scores["cam_miou_tuned"] == pytest.approx(float(rows[0]["cam_miou_tuned"]))
    tuned_on_train = Pipeline(method_config([DEMO], [*settings, "data.val_split=train"], "pcam"))
    assert "cam_miou_tuned" not in extra_scores(tuned_on_train, pcam.artifact("cam"), tmp_path / "fresh", None)


@pytest.mark.slow  # one IRN epoch on top of the multiscale cam the tests above trained
def test_compare_through_irn_adds_pseudo_label_miou_and_checks_each_stage_once(
    demo_overrides, learnable, workdir, tmp_path, monkeypatch
):
    from click.testing import CliRunner

    from pipeline.compare import compare_command
    from pipeline.runner import Pipeline

    checked = []
    original = Pipeline.run_stage
    monkeypatch.setattr(
        Pipeline, "run_stage", lambda self, name, **kw: checked.append(name) or original(self, name, **kw)
    )
    irn = {"irn__epochs": 1, "irn__crop_size": 96, "irn__resize_long": "[84,108]"}
    args = [
        "-c",
        str(DEMO),
        *[str(a) for a in demo_overrides(learnable, workdir, **TRAIN_KW, **irn)],
        "--methods",
        "multiscale",
        "--through",
        "irn",
        "--out",
        str(tmp_path / "cmp"),
    ]
    for state in ["ran", "cached"]:
        checked.clear()
        result = CliRunner().invoke(compare_command, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        (row,) = csv.DictReader(open(tmp_path / "cmp" / "compare.csv"))
        assert checked == ["cam", "irn", "pseudo"]
        assert 0.0 <= float(row["pseudo_miou"]) <= 1.0 and 0.0 <= float(row["cam_miou"]) <= 1.0
        assert row["state"] == state


def test_compare_rejects_an_unknown_method(learnable, tmp_path):
    from click.testing import CliRunner

    from pipeline.compare import compare_command

    result = CliRunner().invoke(
        compare_command, ["-c", str(DEMO), "-o", f"data.root={learnable}", "--methods", "gap,nope"]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: --methods: unknown method 'nope' (available: gap, ")


def test_compare_score_cache_is_used_only_for_the_artifact_that_made_it(tmp_path):
    from pipeline.compare import read_cached_scores

    cache = tmp_path / "cam-abc.json"
    assert read_cached_scores(cache, "m1") is None  # absent
    cache.write_text('{"artifact_manifest": "m1", "scores": {"point_acc": 0.5}}')
    assert read_cached_scores(cache, "m1") == {"point_acc": 0.5}
    assert read_cached_scores(cache, "m2") is None  # the artifact was recomputed (--force)
    cache.write_text('{"artifact_manifest": "m1", "sco')  # cut short
    assert read_cached_scores(cache, "m1") is None


def test_compare_recomputes_its_cams_when_the_artifact_was_recomputed(tiny_synthetic, tmp_path, monkeypatch):
    """The val CAMs `compare` writes for the tuned threshold belong to one computation of the
    artifact: after `--force` the old ones are not reused."""
    from types import SimpleNamespace

    from data.layout import PreparedDataset
    from pipeline.compare import extra_scores
    from pipeline.config import load_config
    from stages.cam import classifier, scoring

    found_before_writing = []

    def write_cams(artifact, dataset, ids, cam_dir, device, keys_of=None, workers=0):
        found_before_writing.append(sorted(p.name for p in cam_dir.glob("*.npz")))
        cam_dir.mkdir(parents=True, exist_ok=True)
        (cam_dir / "fresh.npz").write_text("made by this computation")

    monkeypatch.setattr(classifier, "write_cams", write_cams)
    monkeypatch.setattr(scoring, "tuned_miou", lambda *args: (0.5, 0.6))
    monkeypatch.setattr(classifier, "count_parameters", lambda artifact: 7)
    pipeline = SimpleNamespace(
        cfg=load_config(DEMO, [f"data.root={tiny_synthetic}"]), dataset=PreparedDataset(tiny_synthetic)
    )
    artifact = tmp_path / "cam-0123456789ab"
    artifact.mkdir()
    out = tmp_path / "cmp"
    for started in (1, 2):  # the second: the same artifact name recomputed by --force
        (artifact / "manifest.json").write_text(json.dumps({"key_parts": {}, "started": started}))
        assert extra_scores(pipeline, artifact, out, None)["cam_miou_tuned"] == 0.6
    assert found_before_writing == [[], []]


def test_limit_must_be_positive(cli):
    for args in (
        ["compare", "-c", "configs/demo.yaml", "--methods", "gap", "--limit", "0"],
        ["run-stage", "cam", "-c", "configs/demo.yaml", "--limit", "-5"],
    ):
        result = cli(*args)
        assert result.exit_code == 2 and "--limit" in result.output
