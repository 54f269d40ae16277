"""Stage irn + pseudo: the network, the label rule, and the stages through the CLI and the cache."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from data.errors import WssError
from data.layout import PreparedDataset, read_index_png
from stages.common.backbones import STAGE_STRIDES, ResNetFeatures
from stages.irn.net import BoundaryNet
from stages.irn.pseudo import walk_to_label
from tests.helpers import DEMO_CONFIG
from tests.test_backbones import cell_centre, centre_px, impulse_stages, inner_cell

FAST_IRN = {
    "irn.epochs": "1",
    "irn.batch_size": "8",
    "irn.crop_size": "64",
    "irn.resize_long": "[56,72]",
    "irn.lr": "0.05",
    "irn.exp_times": "4",
}


def irn_overrides(demo_overrides, root, workdir, **extra):
    args = demo_overrides(root, workdir)
    for key, value in {**FAST_IRN, **extra}.items():
        args += ["-o", f"{key}={value}"]
    return args


# ----------------------------------------------------------------------------------- network
def test_boundary_net_is_stride_4_and_trains_only_its_branch():
    torch.manual_seed(0)
    net = BoundaryNet(ResNetFeatures("resnet18"), freeze_backbone=True).train()
    x = torch.randn(2, 3, 72, 56)
    out = net(x)
    assert out.shape == (2, 1, 18, 14)
    out.sigmoid().mean().backward()
    assert all(p.grad is None for p in net.backbone.parameters())
    assert all(p.grad is not None for p in net.branches.parameters())
    assert net.fuse.weight.grad is not None
    assert not net.backbone.training  # frozen BatchNorm statistics


def test_boundary_net_fine_tuned_backbone_gets_gradients():
    net = BoundaryNet(ResNetFeatures("resnet18"), freeze_backbone=False).train()
    net(torch.randn(2, 3, 64, 64)).mean().backward()
    assert net.backbone.layer4[0].conv1.weight.grad is not None
    trunk, head = net.param_groups(1.0)
    assert len(trunk[0]) == len(list(net.backbone.parameters()))


@pytest.mark.parametrize("size", [(33, 47), (75, 101), (64, 96)])
def test_boundary_net_is_stride_4_at_any_size(size):
    net = BoundaryNet(ResNetFeatures("resnet18")).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, *size))
    assert out.shape == (1, 1, math.ceil(size[0] / 4), math.ceil(size[1] / 4))


@pytest.mark.parametrize("size", [(75, 101), (375, 500)])
@pytest.mark.parametrize("stage", [2, 3, 4])
def test_boundary_net_keeps_deep_cells_over_their_pixels(size, stage):
    """A signal in one cell of layer2/3/4 lands at that cell's pixel centre on the stride-4 grid,
    also where a side is not a multiple of 16 (VOC's 500x375), as the CAMs it is used with do."""
    height, width = size
    stride = STAGE_STRIDES[stage]
    cell = inner_cell(height, width, stride)
    net = BoundaryNet(ResNetFeatures("resnet18"), freeze_backbone=False)
    net.backbone.forward_stages = lambda x: impulse_stages(height, width, stage, cell)
    net.branches = nn.ModuleList(nn.Identity() for _ in net.branches)
    net.fuse = nn.Identity()  # keep the five upsampled stages apart
    with torch.no_grad():
        out = net(torch.zeros(1, 3, height, width))
    assert out.shape == (1, 5, math.ceil(height / 4), math.ceil(width / 4))
    y, x = centre_px(out[0, stage], 4)
    assert abs(y - cell_centre(cell[0], stride)) < 0.01 and abs(x - cell_centre(cell[1], stride)) < 0.01


def test_boundary_is_mirror_averaged_probability():
    net = BoundaryNet(ResNetFeatures("resnet18")).eval()
    x = torch.randn(1, 3, 64, 64)
    edge = net.boundary(x)
    assert edge.shape == (16, 16)
    assert float(edge.min()) >= 0 and float(edge.max()) <= 1
    torch.testing.assert_close(edge, net.boundary(x.flip(-1)).flip(-1), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------- label rule
def test_walk_to_label_known_answer():
    # two classes (keys 1 and 2) on a 2x3 stride-4 grid -> 8x12 image, cropped to 7x10
    walked = torch.tensor([[[4.0, 4.0, 0.0], [0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0], [0.0, 2.0, 2.0]]])
    label = walk_to_label(walked, np.array([1, 2]), (7, 10), bg_threshold=0.25)
    assert label.shape == (7, 10)
    assert set(np.unique(label)) == {0, 2, 3}  # background, class 1 -> 2, class 2 -> 3
    assert label[0, 0] == 2 and label[6, 9] == 3 and label[0, 9] == 0
    # the overall maximum normalises: class 2 peaks at 0.5, still above the 0.25 background
    assert (label == 3).sum() > 0
    # ... and below a 0.6 background, where a per-class maximum (1.0) would have kept it
    above = walk_to_label(walked, np.array([1, 2]), (7, 10), bg_threshold=0.6)
    assert above[0, 0] == 2 and not (above == 3).any()


def test_walk_to_label_only_uses_labelled_classes():
    walked = torch.rand(1, 5, 5)
    label = walk_to_label(walked, np.array([7]), (20, 20), bg_threshold=0.0)
    assert set(np.unique(label)) <= {0, 8}


# ----------------------------------------------------------------------------------- stages
@pytest.fixture(scope="module")
def chain(tmp_path_factory, synthetic_dataset):
    """A cam -> irn -> pseudo run on the tiny synthetic set, shared by the tests below."""
    from click.testing import CliRunner

    from pipeline.cli import main
    from tests.helpers import FAST_CAM

    root = synthetic_dataset()
    workdir = tmp_path_factory.mktemp("irn-runs")
    args = ["-o", f"data.root={root}", "-o", f"run.workdir={workdir}"]
    for key, value in {**FAST_CAM, **FAST_IRN}.items():
        args += ["-o", f"{key}={value}"]
    result = CliRunner().invoke(main, ["run", "-c", str(DEMO_CONFIG), "--until", "pseudo", *args])
    assert result.exit_code == 0, result.output + str(result.exception)
    return root, workdir, args


def artifact(workdir: Path, stage: str) -> Path:
    found = sorted((workdir / "synthetic").glob(f"{stage}-*"))
    assert len(found) == 1, found
    return found[0]


def test_chain_writes_seeds_and_pseudo_labels_for_every_train_image(chain):
    from pipeline.config import load_config
    from pipeline.runner import Pipeline

    root, workdir, args = chain
    dataset = PreparedDataset(root)
    ids = dataset.split("train")
    pipeline = Pipeline(load_config(DEMO_CONFIG, [a for a in args if a != "-o"]))
    irn, pseudo = pipeline.artifact("irn"), pipeline.artifact("pseudo")
    for image_id in ids:
        seeds = read_index_png(irn / "seeds" / f"{image_id}.png")
        label = read_index_png(pseudo / "pseudo_labels" / f"{image_id}.png")
        allowed = {0} | {int(k) + 1 for k in np.nonzero(dataset.label_vector(image_id))[0]}
        assert set(np.unique(label)) <= allowed, image_id
        assert set(np.unique(seeds)) <= allowed | {255}, image_id
        assert label.shape == dataset.read_image(image_id).shape[:2]
    metrics = json.loads((pseudo / "metrics.json").read_text())
    assert 0 <= metrics["pseudo_miou"] <= 1 and metrics["pseudo_images"] == len(ids)
    seed_metrics = json.loads((irn / "metrics.json").read_text())
    assert 0 < seed_metrics["seed_coverage"] <= 1
    assert (workdir / "synthetic" / "report.md").is_file()
    assert (workdir / "synthetic" / "overlays-irn.png").is_file()


def test_pseudo_threshold_change_reuses_the_trained_irn(chain, cli):
    root, workdir, args = chain
    irn_before = artifact(workdir, "irn")
    foreground = {}
    for threshold in ["0.3", "0.6"]:
        result = cli("pseudo-labels", "-c", DEMO_CONFIG, *args, "-o", f"irn.sem_seg_bg_threshold={threshold}")
        assert result.exit_code == 0, result.output
        made = [
            p
            for p in (workdir / "synthetic").glob("pseudo-*")
            if str(json.loads((p / "manifest.json").read_text())["config"]["irn"]["sem_seg_bg_threshold"]) == threshold
        ]
        assert len(made) == 1
        foreground[threshold] = sum((read_index_png(p) > 0).sum() for p in (made[0] / "pseudo_labels").glob("*.png"))
    assert artifact(workdir, "irn") == irn_before
    assert foreground["0.6"] <= foreground["0.3"]  # a higher background threshold can only shrink the foreground


def test_interrupted_pseudo_labels_resume_where_they_stopped(chain, cli, tmp_path, monkeypatch):
    import stages.irn.pseudo as pseudo

    root, workdir, args = chain
    workdir2 = shutil.copytree(workdir, tmp_path / "runs")
    args = [a.replace(str(workdir), str(workdir2)) for a in args] + ["-o", "irn.sem_seg_bg_threshold=0.45"]
    real_write, written = pseudo.write_index_png, []

    def stop_after_three(path, *rest):
        if len(written) == 3:
            raise KeyboardInterrupt
        real_write(path, *rest)
        written.append(path)

    monkeypatch.setattr(pseudo, "write_index_png", stop_after_three)
    result = cli("run", "-c", DEMO_CONFIG, "--until", "pseudo", *args)
    assert result.exit_code == 130, result.output
    status = cli("status", "-c", DEMO_CONFIG, *args).output
    assert "pseudo   interrupted with 3 files in pseudo_labels/ (resume with --resume, which keeps them)" in status
    stamps = {path: path.stat().st_mtime_ns for path in written}
    monkeypatch.setattr(pseudo, "write_index_png", real_write)
    result = cli("run", "-c", DEMO_CONFIG, "--until", "pseudo", "--resume", *args)
    assert result.exit_code == 0, result.output
    made = [
        p
        for p in (workdir2 / "synthetic").glob("pseudo-*")
        if json.loads((p / "manifest.json").read_text())["config"]["irn"]["sem_seg_bg_threshold"] == 0.45
    ]
    assert len(made) == 1
    labels = sorted((made[0] / "pseudo_labels").glob("*.png"))
    assert len(labels) == len(PreparedDataset(root).split("train"))
    for path, stamp in stamps.items():  # written before the stop, kept as they were
        kept = made[0] / "pseudo_labels" / path.name
        assert kept.stat().st_mtime_ns == stamp


def test_pseudo_labels_refuses_an_option_that_would_retrain_the_irn(chain, cli):
    root, workdir, args = chain
    before = sorted((workdir / "synthetic").iterdir())
    result = cli("pseudo-labels", "-c", DEMO_CONFIG, *args, "-o", "irn.epochs=2")
    assert result.exit_code == 2, result.output
    assert "irn: no up-to-date artifact" in result.output and "epochs" in result.output
    assert "Traceback" not in result.output
    assert sorted((workdir / "synthetic").iterdir()) == before  # nothing trained, nothing started


def test_stale_cam_is_named_not_used(chain, cli):
    root, workdir, args = chain
    result = cli("run-stage", "irn", "-c", DEMO_CONFIG, *args, "-o", "cam.weight_decay=0.003")
    assert result.exit_code != 0
    assert "cam" in result.output and "weight_decay" in result.output
    status = cli("status", "-c", DEMO_CONFIG, *args, "-o", "irn.conf_fg_threshold=0.9")
    assert "irn" in status.output and "stale" in status.output and "conf_fg_threshold" in status.output


def test_image_without_cam_is_reported_and_skipped(chain, cli, tmp_path):
    root, workdir, args = chain
    workdir2 = tmp_path / "runs"
    shutil.copytree(workdir, workdir2)
    cam = artifact(workdir2, "cam")
    missing = sorted((cam / "cams").glob("*.npz"))[0]
    missing.unlink()
    args2 = [a.replace(str(workdir), str(workdir2)) for a in args]
    result = cli("run-stage", "irn", "-c", DEMO_CONFIG, *args2, "--force")
    assert result.exit_code == 0, result.output
    assert missing.stem in result.output and "no CAM file" in result.output


@pytest.mark.slow
def test_negative_images_get_all_background_pseudo_labels(synthetic_dataset, tmp_path, demo_overrides, cli):
    root = synthetic_dataset(n=24, variant="binary")
    args = irn_overrides(demo_overrides, root, tmp_path, **{"irn.positive_only": "true"})
    result = cli("run", "-c", DEMO_CONFIG, *args, "--until", "pseudo")
    assert result.exit_code == 0, result.output + str(result.exception)
    dataset = PreparedDataset(root)
    pseudo = sorted((tmp_path / dataset.name).glob("pseudo-*"))[0]
    negatives = [i for i in dataset.split("train") if not dataset.label_vector(i).any()]
    assert negatives
    for image_id in negatives:
        assert not read_index_png(pseudo / "pseudo_labels" / f"{image_id}.png").any()


@pytest.mark.parametrize("workers", ["2", "0"])  # the pool computes, the second is a cache hit
def test_crf_refinement_in_process_and_in_workers(chain, cli, workers):
    root, workdir, args = chain
    result = cli(
        "pseudo-labels",
        "-c",
        DEMO_CONFIG,
        *args,
        "-o",
        "irn.refine_crf=true",
        "-o",
        f"run.workers={workers}",
        "-o",
        "irn.sem_seg_bg_threshold=0.2",
    )
    assert result.exit_code == 0, result.output + str(result.exception)
    dataset = PreparedDataset(root)
    refined = [
        p
        for p in (workdir / "synthetic").glob("pseudo-*")
        if json.loads((p / "manifest.json").read_text())["config"]["irn"]["refine_crf"]
    ]
    assert len(refined) == 1  # the worker count is not part of the key: the second run is a cache hit
    for image_id in dataset.split("train"):
        label = read_index_png(refined[0] / "pseudo_labels" / f"{image_id}.png")
        allowed = {0} | {int(k) + 1 for k in np.nonzero(dataset.label_vector(image_id))[0]}
        assert set(np.unique(label)) <= allowed


def test_torch_seed_crf_makes_its_own_seeds_that_agree_with_pydensecrf(chain, cli, tmp_path):
    """`irn.crf.backend: torch` on the CPU makes the seeds on the device path: an irn artifact of
    its own (the backend is in the key) whose seeds are pydensecrf's on >= 99% of the pixels."""
    root, workdir, args = chain
    workdir = shutil.copytree(workdir, tmp_path / "runs")  # the other tests find one irn artifact
    args = [a.replace(str(chain[1]), str(workdir)) for a in args]
    result = cli("run", "-c", DEMO_CONFIG, *args, "--until", "irn", "-o", "irn.crf.backend=torch")
    assert result.exit_code == 0, result.output + str(result.exception)
    configs = {p: json.loads((p / "manifest.json").read_text())["config"]["irn"] for p in workdir.glob("*/irn-*")}
    made = {irn["crf"]["backend"]: p for p, irn in configs.items() if irn.get("use_crf")}
    assert set(made) == {"auto", "torch"}  # the manifest holds the config as written; auto is pydensecrf here
    ids = PreparedDataset(root).split("train")
    seeds = {b: np.stack([read_index_png(p / "seeds" / f"{i}.png") for i in ids]) for b, p in made.items()}
    assert (seeds["torch"] == seeds["auto"]).mean() >= 0.99


def test_torch_crf_refinement_agrees_with_pydensecrf_refinement(chain, cli):
    """`refine_crf_params.backend: torch` on the CPU refines in this process: an artifact of its
    own (the backend is in the key) whose labels are pydensecrf's on >= 99% of the pixels."""
    root, workdir, args = chain
    labels = {}
    for backend in ("pydensecrf", "torch"):
        result = cli(
            "pseudo-labels",
            "-c",
            DEMO_CONFIG,
            *args,
            "-o",
            "irn.refine_crf=true",
            "-o",
            f"irn.refine_crf_params.backend={backend}",
            "-o",
            "run.workers=0",
            "-o",
            "irn.sem_seg_bg_threshold=0.35",  # this test's own artifacts
        )
        assert result.exit_code == 0, result.output + str(result.exception)
        configs = {
            p: json.loads((p / "manifest.json").read_text())["config"]["irn"] for p in workdir.glob("*/pseudo-*")
        }
        [made] = [
            p
            for p, irn in configs.items()
            if irn["sem_seg_bg_threshold"] == 0.35 and irn.get("refine_crf_params", {}).get("backend") == backend
        ]
        labels[backend] = np.stack(
            [read_index_png(made / "pseudo_labels" / f"{i}.png") for i in PreparedDataset(root).split("train")]
        )
    assert (labels["torch"] == labels["pydensecrf"]).mean() >= 0.99


def test_irn_and_pseudo_keys_leave_out_settings_nothing_reads():
    """Another value of a CRF that is switched off, of the probability CRF's unused gt_prob or
    of AdamW's momentum must not retrain the IRN or redo the pseudo-labels; the same settings in
    use are in the keys."""
    from pipeline.config import load_config
    from stages.irn.pseudo import PseudoLabelStage
    from stages.irn.stage import IrnStage

    def keys(*overrides):
        cfg = load_config(DEMO_CONFIG, list(overrides))
        return IrnStage().key_config(cfg, "multiclass"), PseudoLabelStage().key_config(cfg, "multiclass")

    irn, pseudo = keys("irn.use_crf=false", "irn.refine_crf=false", "irn.optimizer=adamw")
    assert not {"crf", "momentum"} & set(irn) and "refine_crf_params" not in pseudo
    assert keys(
        "irn.use_crf=false",
        "irn.crf.bilateral_sxy=50",
        "irn.refine_crf=false",
        "irn.refine_crf_params.bilateral_sxy=50",
        "irn.optimizer=adamw",
        "irn.momentum=0.5",
    ) == (irn, pseudo)
    irn, pseudo = keys("irn.use_crf=true", "irn.refine_crf=true", "irn.optimizer=sgd")
    assert {"crf", "momentum"} <= set(irn) and "gt_prob" not in pseudo["refine_crf_params"]
    assert keys(
        "irn.use_crf=true", "irn.refine_crf=true", "irn.optimizer=sgd", "irn.refine_crf_params.gt_prob=0.6"
    ) == (irn, pseudo)
    assert (
        keys("irn.use_crf=true", "irn.refine_crf=true", "irn.optimizer=sgd", "irn.refine_crf_params.bilateral_sxy=37")[
            1
        ]
        != pseudo
    )


def test_the_keys_hold_the_crf_backend_that_runs_on_the_device(monkeypatch):
    """`crf.backend: auto` is pydensecrf on a CPU and torch on a CUDA device: the keys hold the
    resolved backend, so one config makes different seeds and pseudo-labels there (the two CRFs
    agree to float rounding, not bit for bit) and the same ones as naming that backend."""
    from pipeline.config import load_config
    from stages.irn.pseudo import PseudoLabelStage
    from stages.irn.stage import IrnStage

    def keys(*overrides):
        cfg = load_config(DEMO_CONFIG, ["irn.use_crf=true", "irn.refine_crf=true", *overrides])
        return IrnStage().key_config(cfg, "multiclass"), PseudoLabelStage().key_config(cfg, "multiclass")

    def backends(pair):
        return pair[0]["crf"]["backend"], pair[1]["refine_crf_params"]["backend"]

    on_cpu, on_gpu = keys("run.device=cpu"), keys("run.device=cuda:1")  # a key never starts CUDA
    assert backends(on_cpu) == ("pydensecrf", "pydensecrf") and backends(on_gpu) == ("torch", "torch")
    assert on_cpu[0] != on_gpu[0] and on_cpu[1] != on_gpu[1]
    assert keys("run.device=cpu", "irn.crf.backend=pydensecrf", "irn.refine_crf_params.backend=pydensecrf") == on_cpu
    assert keys("run.device=cuda", "irn.crf.backend=auto") == on_gpu
    torch_on_cpu = keys("run.device=cpu", "irn.crf.backend=torch", "irn.refine_crf_params.backend=torch")
    assert backends(torch_on_cpu) == ("torch", "torch")
    assert backends(keys("run.device=cuda", "irn.crf.backend=pydensecrf")) == ("pydensecrf", "torch")
    for available, backend in ((False, "pydensecrf"), (True, "torch")):  # run.device=auto: where it runs
        monkeypatch.setattr(torch.cuda, "is_available", lambda available=available: available)
        assert backends(keys("run.device=auto")) == (backend, backend)
    with pytest.raises(WssError, match="backend"):
        keys("irn.crf.backend=cuda")


def test_an_affinity_radius_without_pairs_is_a_config_error():
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="irn.radius must be >= 2, got 1"):
        load_config(DEMO_CONFIG, ["irn.radius=1"])


# ------------------------------------------------------------------------ bad files in artifacts
def test_label_scoring_leaves_out_bad_labels_and_masks_and_lists_them(synthetic_dataset, tmp_path, caplog):
    """Seeds and pseudo-labels are scored image by image: a file that does not decode, or a mask
    of another size, is named and left out; the others are scored."""
    from data.layout import write_index_png
    from stages.common.scoring import score_label_files

    dataset = PreparedDataset(shutil.copytree(synthetic_dataset(), tmp_path / "data"))
    ids = dataset.split("train")[:6]
    labels = tmp_path / "seeds"
    labels.mkdir()
    for image_id in ids:
        write_index_png(labels / f"{image_id}.png", dataset.read_mask(image_id), dataset.info.palette)
    (labels / f"{ids[0]}.png").write_bytes(b"garbled")
    cut = labels / f"{ids[1]}.png"
    cut.write_bytes(cut.read_bytes()[:70])
    dataset.mask_path(ids[2]).write_bytes(b"garbled mask")
    write_index_png(dataset.mask_path(ids[3]), np.zeros((8, 8), np.uint8), dataset.info.palette)
    failures = []
    metrics = score_label_files(dataset, ids, labels, "seed_", ignore_unlabelled=True, failures=failures)
    assert metrics["seed_scored_images"] == 2 and metrics["seed_miou"] == 1.0
    named = [labels / f"{ids[0]}.png", cut, dataset.mask_path(ids[2]), dataset.mask_path(ids[3])]
    assert [f.split(":")[0] for f in failures] == [str(p) for p in named]
    assert all(str(p) in caplog.text for p in named)
    assert score_label_files(dataset, ids, labels, "seed_", ignore_unlabelled=True)["seed_scored_images"] == 2


def test_a_resumed_run_makes_a_garbled_label_again(tiny_synthetic, tmp_path, caplog):
    from data.layout import write_index_png
    from stages.irn.label_files import usable_label

    dataset = PreparedDataset(tiny_synthetic)
    good, garbled = dataset.split("train")[:2]
    write_index_png(tmp_path / f"{good}.png", dataset.read_mask(good), dataset.info.palette)
    (tmp_path / f"{garbled}.png").write_bytes(b"garbled")
    assert usable_label(dataset, good, tmp_path, "irn")
    assert not usable_label(dataset, garbled, tmp_path, "irn")
    assert not (tmp_path / f"{garbled}.png").exists()  # made again by the resumed run, never trained on
    assert f"{garbled}.png: not a readable label PNG" in caplog.text
    assert not usable_label(dataset, "no-such-id", tmp_path, "irn")


def test_a_batch_larger_than_the_seeded_images_shrinks_to_a_multiple_of_the_processes(monkeypatch):
    from stages.common import distributed
    from stages.irn.stage import fitting_batch

    assert fitting_batch(8, 20) == 8 and fitting_batch(8, 7) == 7
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    assert fitting_batch(8, 7) == 6 and fitting_batch(8, 20) == 8 and fitting_batch(8, 1) == 2


def _reference_scores(dataset, ids, folder: Path, ignore_pred: bool) -> tuple[float, float]:
    """(mIoU over the classes that occur, share of labelled pixels) counted here pixel by pixel,
    independently of stages/common/metrics.py."""
    from PIL import Image

    classes = dataset.info.num_classes + 1
    inter, union = np.zeros(classes), np.zeros(classes)
    labelled = total = 0
    for image_id in ids:
        pred = np.array(Image.open(folder / f"{image_id}.png"))
        gt = np.array(Image.open(dataset.mask_path(image_id)))
        total += pred.size
        labelled += int((pred != 255).sum())
        keep = (gt != 255) & ((pred != 255) if ignore_pred else True)
        p, g = pred[keep], gt[keep]
        for c in range(classes):
            inter[c] += ((p == c) & (g == c)).sum()
            union[c] += ((p == c) | (g == c)).sum()
    return float((inter[union > 0] / union[union > 0]).mean()), labelled / total


def test_stage2_scores_are_those_of_the_written_labels(chain):
    """seed mIoU (ignoring 255), seed coverage and pseudo-label mIoU are the scores of the PNGs
    the stages wrote against the masks: a scorer that compared the masks with themselves, or
    with anything else, fails here (and with it the stage-2 quality margin's meaning)."""
    from pipeline.config import load_config
    from pipeline.runner import Pipeline

    root, workdir, args = chain
    dataset = PreparedDataset(root)
    ids = dataset.split("train")
    pipeline = Pipeline(load_config(DEMO_CONFIG, [a for a in args if a != "-o"]))
    irn, pseudo = pipeline.artifact("irn"), pipeline.artifact("pseudo")
    seeds = json.loads((irn / "metrics.json").read_text())
    miou, coverage = _reference_scores(dataset, ids, irn / "seeds", ignore_pred=True)
    assert seeds["seed_miou"] == pytest.approx(miou) and seeds["seed_coverage"] == pytest.approx(coverage)
    labels = json.loads((pseudo / "metrics.json").read_text())
    miou, coverage = _reference_scores(dataset, ids, pseudo / "pseudo_labels", ignore_pred=False)
    assert labels["pseudo_miou"] == pytest.approx(miou) and coverage == 1.0
    assert labels["pseudo_miou"] < 0.99  # a tiny 1-epoch run: perfect labels would mean scoring the masks


def test_a_crf_failure_on_one_image_is_listed_and_the_others_go_on(chain, cli, tmp_path, monkeypatch):
    import stages.irn.stage as irn_stage

    root, workdir, args = chain
    workdir2 = shutil.copytree(workdir, tmp_path / "runs")
    args = [a.replace(str(workdir), str(workdir2)) for a in args]
    victim = PreparedDataset(root).split("train")[1]
    real = irn_stage.make_seeds

    def failing(cam, keys, image, *rest, **options):
        if (
            image is not None
            and image.shape == PreparedDataset(root).read_image(victim).shape
            and np.array_equal(image, PreparedDataset(root).read_image(victim))
        ):
            raise RuntimeError("simulated CRF failure")
        return real(cam, keys, image, *rest, **options)

    monkeypatch.setattr(irn_stage, "make_seeds", failing)
    result = cli("run", "-c", DEMO_CONFIG, "--until", "irn", "--force", "irn", *args)
    assert result.exit_code == 0, result.output
    assert f"{victim}: RuntimeError: simulated CRF failure" in result.output
    irn = artifact(workdir2, "irn")
    assert json.loads((irn / "manifest.json").read_text())["failures"] == [
        f"{victim}: RuntimeError: simulated CRF failure"
    ]
    written = {p.stem for p in (irn / "seeds").glob("*.png")}
    assert written == set(PreparedDataset(root).split("train")) - {victim}
