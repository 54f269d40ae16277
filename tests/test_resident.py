"""Stage 2 on the device (stages/irn/resident.py), run here on the CPU: the same seeds and
pseudo-labels as the per-image path (identical without a CRF; >= 99% of the pixels with the torch
CRF against pydensecrf), which path runs where, and one bad image listed while the others are
written. tests/test_cuda.py repeats the comparisons on a GPU."""

from __future__ import annotations

import importlib.util
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data.layout import PreparedDataset, read_index_png
from data.transforms import normalize
from stages.cam.config import CamConfig
from stages.cam.infer import write_cam_files
from stages.cam.nets import GapNet
from stages.common.backbones import ResNetFeatures
from stages.common.crf import CrfParams
from stages.irn.net import BoundaryNet
from stages.irn.pseudo import PseudoLabelStage
from stages.irn.resident import normalized, on_device, write_pseudo_labels_on_device, write_seeds_on_device
from stages.irn.stage import write_seed

CPU = torch.device("cpu")
needs_pydensecrf = pytest.mark.skipif(
    importlib.util.find_spec("pydensecrf") is None, reason="pydensecrf2 is not installed"
)
WALK = SimpleNamespace(walk_radius=5, beta=10.0, exp_times=4, sem_seg_bg_threshold=0.25)


def cam_files(prepared_root, folder):
    """(dataset, ids, cam folder): a copy of a prepared set with the CAM files of a random
    classifier (scale 1, flip), maps with confident, unsure and background pixels."""
    root = shutil.copytree(prepared_root, folder / "data")
    dataset = PreparedDataset(root)
    ids = dataset.split("train")[:12]
    torch.manual_seed(0)
    net = GapNet(len(dataset.classes), "resnet18", None).eval()
    cam_dir = folder / "cams"
    assert write_cam_files(net, CamConfig(scales=[1.0], flip=True), dataset, ids, cam_dir, CPU, workers=0) == []
    return dataset, ids, cam_dir


def random_boundary_net():
    torch.manual_seed(1)
    return BoundaryNet(ResNetFeatures("resnet18"), freeze_backbone=True).eval()


@pytest.fixture(scope="module")
def cams(tiny_synthetic, tmp_path_factory):
    return cam_files(tiny_synthetic, tmp_path_factory.mktemp("resident"))


@pytest.fixture(scope="module")
def boundary_net():
    return random_boundary_net()


def read_all(folder, ids) -> np.ndarray:
    return np.concatenate([read_index_png(folder / f"{i}.png").ravel() for i in ids])


def test_which_path_runs():
    """On the device: a CRF on torch, or no CRF on a GPU; pydensecrf keeps the per-image path."""
    cuda = torch.device("cuda")
    assert on_device(cuda, None) and on_device(cuda, CrfParams()) and on_device(CPU, CrfParams(backend="torch"))
    assert not on_device(CPU, None) and not on_device(CPU, CrfParams())
    assert not on_device(cuda, CrfParams(backend="pydensecrf"))


def test_normalisation_on_the_device_is_normalize():
    image = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    assert torch.equal(normalized(torch.from_numpy(image)), normalize(image)[None])


def per_image_seeds(dataset, ids, cam_dir, seed_dir, crf):
    seed_dir.mkdir()
    for image_id in ids:
        assert write_seed(image_id, str(dataset.root), str(cam_dir), str(seed_dir), 0.30, 0.05, crf) == (image_id, None)


def test_seeds_without_crf_are_those_of_the_per_image_path(cams, tmp_path):
    dataset, ids, cam_dir = cams
    per_image_seeds(dataset, ids, cam_dir, tmp_path / "pool", None)
    (tmp_path / "device").mkdir()
    failures = write_seeds_on_device(dataset, ids, cam_dir, tmp_path / "device", 0.30, 0.05, None, CPU, 2)
    assert failures == []
    expected = read_all(tmp_path / "pool", ids)
    assert {0, 255} < set(np.unique(expected))  # background, unsure and some class
    assert np.array_equal(read_all(tmp_path / "device", ids), expected)


@needs_pydensecrf
def test_torch_crf_seeds_agree_with_the_pydensecrf_pool(cams, tmp_path):
    dataset, ids, cam_dir = cams
    per_image_seeds(dataset, ids, cam_dir, tmp_path / "pool", CrfParams(backend="pydensecrf"))
    (tmp_path / "device").mkdir()
    failures = write_seeds_on_device(
        dataset, ids, cam_dir, tmp_path / "device", 0.30, 0.05, CrfParams(backend="torch"), CPU, 0
    )
    assert failures == []
    assert (read_all(tmp_path / "device", ids) == read_all(tmp_path / "pool", ids)).mean() >= 0.99


def test_a_bad_image_or_cam_file_is_listed_and_the_others_written(cams, tmp_path):
    dataset, ids, cam_dir = cams
    root = shutil.copytree(dataset.root, tmp_path / "data")
    broken = PreparedDataset(root)
    cam_copy = shutil.copytree(cam_dir, tmp_path / "cams")
    (cam_copy / f"{ids[1]}.npz").unlink()
    (cam_copy / f"{ids[2]}.npz").write_bytes(b"not a zip")
    labelled = [i for i in ids[3:] if broken.label_vector(i).any()]
    broken.image_path(labelled[0]).write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    (tmp_path / "seeds").mkdir()
    failures = write_seeds_on_device(
        broken, ids, cam_copy, tmp_path / "seeds", 0.30, 0.05, CrfParams(backend="torch"), CPU, 2
    )
    assert sorted(f.split(":")[0] for f in failures) == sorted([ids[1], ids[2], labelled[0]])
    assert "no CAM file" in next(f for f in failures if f.startswith(ids[1]))
    written = {p.stem for p in (tmp_path / "seeds").glob("*.png")}
    assert written == set(ids) - {ids[1], ids[2], labelled[0]}


def per_image_pseudo(model, dataset, ids, cam_dir, out, refine):
    (out / "labels").mkdir(parents=True)
    (out / "edges").mkdir()
    failures, _ = PseudoLabelStage().walk_per_image(
        model, dataset, ids, cam_dir, out / "labels", out / "edges", WALK, refine, CPU, 0
    )
    assert failures == []


def device_pseudo(model, dataset, ids, cam_dir, out, refine, workers=2, device=CPU):
    (out / "labels").mkdir(parents=True)
    (out / "edges").mkdir()
    failures, seconds = write_pseudo_labels_on_device(
        model.to(device), dataset, ids, cam_dir, out / "labels", out / "edges", WALK, refine, device, workers
    )
    assert failures == [] and len(seconds) == sum(1 for i in ids if dataset.label_vector(i).any())


def test_pseudo_labels_without_crf_are_those_of_the_per_image_path(cams, boundary_net, tmp_path):
    dataset, ids, cam_dir = cams
    per_image_pseudo(boundary_net, dataset, ids, cam_dir, tmp_path / "pool", None)
    device_pseudo(boundary_net, dataset, ids, cam_dir, tmp_path / "device", None)
    expected = read_all(tmp_path / "pool" / "labels", ids)
    assert len(set(np.unique(expected))) > 1
    assert np.array_equal(read_all(tmp_path / "device" / "labels", ids), expected)
    for image_id in ids:  # the boundary maps too, and none for an image without a class
        pool_edge, device_edge = (tmp_path / path / "edges" / f"{image_id}.png" for path in ("pool", "device"))
        assert pool_edge.is_file() == device_edge.is_file() == bool(dataset.label_vector(image_id).any())
        if pool_edge.is_file():
            assert pool_edge.read_bytes() == device_edge.read_bytes()


@needs_pydensecrf
def test_torch_crf_refinement_agrees_with_the_pydensecrf_pool(cams, boundary_net, tmp_path):
    dataset, ids, cam_dir = cams
    per_image_pseudo(boundary_net, dataset, ids, cam_dir, tmp_path / "pool", CrfParams(backend="pydensecrf"))
    device_pseudo(boundary_net, dataset, ids, cam_dir, tmp_path / "device", CrfParams(backend="torch"), workers=0)
    agree = read_all(tmp_path / "device" / "labels", ids) == read_all(tmp_path / "pool" / "labels", ids)
    assert agree.mean() >= 0.99
