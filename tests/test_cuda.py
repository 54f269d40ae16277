"""On a CUDA GPU: the paths the CPU suite cannot reach (bf16 autocast and channels_last in every
stage's training and inference, the random walk's Triton kernel, a GPU-trained model used on a CPU).

Skipped without a GPU. `make gpu-check` runs this file and the benches on a machine with one.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers import DEMO_CONFIG, FAST_CAM

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (`make gpu-check` runs these on a machine with one)"
    ),
]

CUDA_CHAIN = {
    **FAST_CAM,
    "run.device": "cuda",
    "run.workers": "2",
    "cam.epochs": "2",
    "irn.epochs": "1",
    "irn.batch_size": "8",
    "irn.crop_size": "64",
    "irn.resize_long": "[56,72]",
    "irn.exp_times": "4",
    "seg.epochs": "2",
    "seg.batch_size": "8",
    "seg.crop_size": "64",
    "seg.resize_long": "[56,72]",
}


def random_inputs(height: int, width: int, channels: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    cams = torch.rand(channels, height, width, generator=generator, dtype=torch.float64)
    edge = torch.rand(height, width, generator=generator, dtype=torch.float64) ** 3
    return cams.to("cuda", dtype), edge.to("cuda", dtype)


def test_walk_kernel_on_cuda_equals_the_dense_walk_and_the_cpu():
    from stages.irn import walk_kernel
    from stages.irn.random_walk import random_walk, random_walk_dense

    assert walk_kernel.available(torch.device("cuda")), "Triton missing: the GPU walk would fall back to cuSPARSE"
    cams, edge = random_inputs(12, 17, 3, torch.float64)
    sparse = random_walk(cams, edge, radius=5, beta=10.0, exp_times=8)
    dense = random_walk_dense(cams, edge, radius=5, beta=10.0, exp_times=8)
    assert sparse.device.type == "cuda"
    assert ((sparse - dense).norm() / dense.norm()).item() < 1e-5

    cams32, edge32 = random_inputs(40, 52, 4, torch.float32, seed=1)
    on_gpu = random_walk(cams32, edge32).cpu().double()
    on_cpu = random_walk(cams32.cpu().double(), edge32.cpu().double())
    # float32 over 256 steps against float64: 1.5e-5 on the CPU; a wrong kernel would be off by O(1)
    assert ((on_gpu - on_cpu).norm() / on_cpu.norm()).item() < 1e-3

    for classes in (1, 40):  # one class; more classes than one program takes (two class blocks)
        cams, edge = random_inputs(23, 9, classes, torch.float64, seed=classes)
        on_gpu = random_walk(cams, edge, radius=4, exp_times=5).cpu()
        on_cpu = random_walk(cams.cpu(), edge.cpu(), radius=4, exp_times=5)
        assert ((on_gpu - on_cpu).norm() / on_cpu.norm()).item() < 1e-12


def peak_walk_memory(side: int, classes: int) -> int:
    from stages.irn.random_walk import random_walk

    cams, edge = random_inputs(side, side, classes, torch.float32)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    random_walk(cams, edge, exp_times=8)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_sparse_walk_memory_grows_linearly_with_the_pixels():
    small, large = peak_walk_memory(64, 21), peak_walk_memory(128, 21)
    # 4x the pixels: linear memory is ~4x, the dense N x N transition would be 16x (1 GiB at 128x128)
    assert large < 6 * small, (small, large)
    assert large < 256 * 2**20, large


def test_multiscale_cam_on_cuda_in_bf16_matches_the_cpu():
    from stages.cam.infer import multiscale_cam
    from stages.cam.nets import GapNet

    torch.manual_seed(0)
    model = GapNet(3, "resnet18", None).eval()
    image = np.random.default_rng(0).integers(0, 256, (72, 88, 3), dtype=np.uint8)
    args = dict(keys=[0, 2], scales=[1.0, 0.5, 1.5], flip=True)
    on_cpu = multiscale_cam(model, image, device=torch.device("cpu"), **args)
    on_gpu = multiscale_cam(
        model.to("cuda", memory_format=torch.channels_last), image, device=torch.device("cuda"), **args
    )
    assert on_gpu.shape == on_cpu.shape == (2, 18, 22)
    for cpu_map, gpu_map in zip(on_cpu, on_gpu):  # bf16 moves values a little, not the picture
        assert np.isclose(gpu_map.max(), 1.0, atol=1e-3)
        assert np.corrcoef(cpu_map.ravel(), gpu_map.ravel())[0, 1] > 0.98


def test_whole_chain_trains_on_cuda_and_its_model_predicts_on_the_cpu(cli, synthetic_dataset, tmp_path):
    from data.layout import PreparedDataset, read_index_png
    from stages.seg.predict import predict_inputs

    root = synthetic_dataset()
    args = ["-c", str(DEMO_CONFIG), "-o", f"data.root={root}", "-o", f"run.workdir={tmp_path / 'runs'}"]
    for key, value in CUDA_CHAIN.items():
        args += ["-o", f"{key}={value}"]
    result = cli("run", *args)
    assert result.exit_code == 0, result.output + str(result.exception)
    report = json.loads((tmp_path / "runs" / "synthetic" / "report.json").read_text())
    assert [(s["stage"], s["state"]) for s in report["stages"]] == [(n, "ran") for n in ("cam", "irn", "pseudo", "seg")]
    scored = {(row["stage"], row["split"]): row["miou"] for row in report["metrics"]}
    assert set(scored) >= {("cam", "train"), ("irn", "train"), ("pseudo", "train"), ("seg", "val")}
    assert all(0.0 <= miou <= 1.0 for miou in scored.values()), scored

    artifact = next((tmp_path / "runs" / "synthetic").glob("seg-*/"))
    images = [root / "images" / f"{i}.png" for i in PreparedDataset(root).split("val")[:4]]
    masks = {}
    for device in ["cuda", "cpu"]:
        done = predict_inputs(artifact, images, tmp_path / device, device=device)
        assert not done.failures and len(done.written) == len(images), done.failures
        masks[device] = np.stack([read_index_png(tmp_path / device / "masks" / f"{p.stem}.png") for p in images])
    assert (masks["cuda"] == masks["cpu"]).mean() > 0.9


def crf_scene(height: int, width: int, n_labels: int, seed: int = 0):
    """Random coloured rectangles on a noisy background, their labels with 20% noise, soft probabilities."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 40, (height, width, 3))
    labels = np.zeros((height, width), np.int64)
    for k in range(1, n_labels):
        y, x = np.sort(rng.integers(0, height, 2)), np.sort(rng.integers(0, width, 2))
        image[y[0] : y[1] + 1, x[0] : x[1] + 1] += rng.integers(40, 200, 3)
        labels[y[0] : y[1] + 1, x[0] : x[1] + 1] = k
    noisy = np.where(rng.random(labels.shape) < 0.2, rng.integers(0, n_labels, labels.shape), labels)
    probs = np.eye(n_labels, dtype=np.float32)[noisy].transpose(2, 0, 1) + rng.random(
        (n_labels, height, width), dtype=np.float32
    )
    return np.clip(image, 0, 255).astype(np.uint8), noisy, probs / probs.sum(0)


def test_torch_crf_on_cuda_equals_the_torch_crf_on_the_cpu():
    from stages.common import crf_torch
    from stages.common.crf import CrfParams, crf_labels, crf_prob

    params = CrfParams()
    for height, width, n_labels in [(97, 83, 3), (256, 200, 21)]:  # 97 * 83 is odd: padding points
        image, labels, probs = crf_scene(height, width, n_labels, seed=height)
        # the lattices are built from the same float32 arithmetic: the same number of points
        for device in ("cpu", "cuda"):
            kernels = crf_torch.image_kernels(
                torch.from_numpy(image).to(device),
                params.gauss_sxy,
                params.gauss_compat,
                params.bilateral_sxy,
                params.bilateral_srgb,
                params.bilateral_compat,
            )
            sizes = [kernel.n_lattice for kernel in kernels]
            if device == "cpu":
                cpu_sizes = sizes
        assert sizes == cpu_sizes
        on_gpu, on_cpu = (crf_prob(image, probs, params, backend="torch", device=device) for device in ("cuda", "cpu"))
        # float32 sums in another order: measured on the CPU against pydensecrf, 2e-5 at most
        assert np.abs(on_gpu - on_cpu).max() < 1e-4
        maps = [labels, np.roll(labels, 7, axis=1)]
        on_gpu = crf_labels(image, maps, n_labels, params, backend="auto", device="cuda")  # auto on CUDA is torch
        on_cpu = crf_labels(image, maps, n_labels, params, backend="torch", device="cpu")
        for gpu_map, cpu_map in zip(on_gpu, on_cpu):
            assert (gpu_map == cpu_map).mean() >= 0.999


def peak_crf_memory(side: int, n_labels: int) -> int:
    from stages.common.crf import CrfParams
    from stages.common.crf_torch import label_crf

    image, labels, _ = crf_scene(side, side, n_labels)
    image, labels = torch.from_numpy(image).cuda(), torch.from_numpy(np.stack([labels, labels])).cuda()
    params = CrfParams()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    label_crf(
        image,
        labels,
        n_labels,
        params.gt_prob,
        iterations=params.iterations,
        gauss_sxy=params.gauss_sxy,
        gauss_compat=params.gauss_compat,
        bilateral_sxy=params.bilateral_sxy,
        bilateral_srgb=params.bilateral_srgb,
        bilateral_compat=params.bilateral_compat,
    )
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_torch_crf_memory_grows_linearly_with_the_pixels():
    small, large = peak_crf_memory(256, 21), peak_crf_memory(512, 21)
    # 4x the pixels: linear memory is ~4x; the dense N x N kernel would be 16x (256 GiB at 512 x 512)
    assert large < 6 * small, (small, large)
    assert large < 2 * 2**30, large


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_checkpoint_of_a_cuda_model_round_trips(tmp_path, optimizer):
    """channels_last weights and optimizer state on the GPU: written as contiguous CPU tensors,
    loaded back equal, and the resumed step continues as the original."""
    from tests.test_model_files import checkpoint_round_trip

    checkpoint_round_trip(tmp_path, optimizer, torch.device("cuda"))


# ------------------------------------------------ stage 2 on the device, CAMs in batches (GPU)
def test_seeds_on_cuda_agree_with_the_cpu_path(synthetic_dataset, tmp_path):
    """The seeds made on the GPU (auto = the torch CRF there) agree with the per-image path's
    pydensecrf seeds on >= 99% of the pixels; without a CRF on >= 99% too (float rounding of
    the upsampling on another device)."""
    from stages.common.crf import CrfParams
    from stages.irn.resident import write_seeds_on_device
    from tests.test_resident import cam_files, per_image_seeds, read_all

    dataset, ids, cam_dir = cam_files(synthetic_dataset(), tmp_path)
    for name, crf in (("crf", CrfParams()), ("plain", None)):
        reference = CrfParams(backend="pydensecrf") if crf is not None else None
        per_image_seeds(dataset, ids, cam_dir, tmp_path / f"pool-{name}", reference)
        (tmp_path / f"gpu-{name}").mkdir()
        gpu = torch.device("cuda")
        assert write_seeds_on_device(dataset, ids, cam_dir, tmp_path / f"gpu-{name}", 0.30, 0.05, crf, gpu, 2) == []
        agree = read_all(tmp_path / f"gpu-{name}", ids) == read_all(tmp_path / f"pool-{name}", ids)
        assert agree.mean() >= 0.99, name


def test_pseudo_labels_on_cuda_agree_with_the_cpu_path(synthetic_dataset, tmp_path):
    """Pseudo-labels on the GPU (boundary net, Triton walk, torch CRF) against the per-image
    path on the CPU (pydensecrf refinement): >= 99% of the pixels, with and without refinement."""
    from stages.common.crf import CrfParams
    from tests.test_resident import cam_files, device_pseudo, per_image_pseudo, random_boundary_net, read_all

    dataset, ids, cam_dir = cam_files(synthetic_dataset(), tmp_path)
    for name, refine in (("crf", CrfParams()), ("plain", None)):
        reference = CrfParams(backend="pydensecrf") if refine is not None else None
        per_image_pseudo(random_boundary_net(), dataset, ids, cam_dir, tmp_path / f"pool-{name}", reference)
        model = random_boundary_net()
        device_pseudo(model, dataset, ids, cam_dir, tmp_path / f"gpu-{name}", refine, device=torch.device("cuda"))
        gpu = read_all(tmp_path / f"gpu-{name}" / "labels", ids)
        assert (gpu == read_all(tmp_path / f"pool-{name}" / "labels", ids)).mean() >= 0.99, name


def test_cam_batches_on_cuda_equal_one_image_at_a_time(synthetic_dataset, tmp_path):
    """CAM inference in batches of one size (the default rule on a GPU) writes each image's maps
    as one image at a time does, to bf16 rounding."""
    from data.layout import PreparedDataset
    from stages.cam.config import CamConfig
    from stages.cam.infer import load_cam, write_cam_files
    from stages.cam.nets import GapNet

    dataset = PreparedDataset(synthetic_dataset())
    ids = dataset.split("train")[:20]
    torch.manual_seed(0)
    net = GapNet(len(dataset.classes), "resnet18", None).eval().cuda()
    section, gpu = CamConfig(scales=[1.0, 0.5, 1.5, 2.0], flip=True), torch.device("cuda")
    assert write_cam_files(net, section, dataset, ids, tmp_path / "one", gpu, 2, images_per_batch=1) == []
    assert write_cam_files(net, section, dataset, ids, tmp_path / "batched", gpu, 2) == []
    for image_id in ids:
        one, batched = (load_cam(tmp_path / kind / f"{image_id}.npz")[0] for kind in ("one", "batched"))
        np.testing.assert_allclose(batched, one, atol=3e-2)


def test_a_cam_batch_at_512_px_fits_16_gb():
    """The default CAM batch (cam_batch_images) of 512 px images at configs/voc.yaml's scales and
    flip, through a ResNet-50 in bf16, peaks well below 16 GB of GPU memory."""
    from stages.cam.infer import cam_batch_images, scaled_cam_batch
    from stages.cam.nets import GapNet

    gpu, scales = torch.device("cuda"), [1.0, 0.5, 1.5, 2.0]
    images = cam_batch_images((512, 512), scales, True, gpu)
    net = GapNet(20, "resnet50", None).eval().cuda().to(memory_format=torch.channels_last)
    batch = torch.randint(0, 256, (images, 512, 512, 3), dtype=torch.uint8)
    scaled = [
        torch.nn.functional.interpolate(batch.permute(0, 3, 1, 2).float(), scale_factor=s).permute(0, 2, 3, 1)
        for s in scales
    ]
    scaled = [copy.round().clamp(0, 255).to(torch.uint8).contiguous() for copy in scaled]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    cams = scaled_cam_batch(net, scaled, (512, 512), [[0, 5, 19]] * images, True, gpu)
    peak = torch.cuda.max_memory_allocated() - base
    assert len(cams) == images and peak < 12 * 2**30, f"{images} images: {peak / 2**30:.1f} GiB"
