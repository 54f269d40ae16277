"""Stage-1 speed: the real training loop against the bare model step, and CAM inference.

    python bench/stage_cam.py [--device auto|cpu|cuda] [--size PX] [--batch B] [--backbone NAME]
                              [--steps N] [--workers W] [--method gap|dropblock]

- bare step: forward + loss + backward + optimizer step on one batch already on the device
  (AMP bf16 + channels_last on CUDA, as in the loop), after warm-up steps; CUDA synchronised;
- real loop: stages.common.training.fit for two epochs of N batches over the real
  ClassificationDataset (PNG decode, augmentation, DataLoader workers, pinned uint8
  host->device copies, normalisation on the device, progress bar; per-epoch checkpoint
  excluded) at the same batch and crop size. Both epochs are reported: the first pays for
  worker start-up and the first step's warm-up (cuDNN autotuning), the second is the steady
  state (fit keeps its workers between epochs);
- CAM inference: the stage's own (stages.cam.infer.write_cam_files: resizing in loader
  workers, batches of one image size on CUDA, the float work on the device, .npz files written
  by writer threads) at --cam-scales with flip; `--cam-batch N` forces N images a batch
  (default: the stage's rule, one image at a time on a CPU).

The images are a few synthetic ones written to a temporary prepared dataset and listed
repeatedly, so the loader decodes real PNG files of the requested size. Defaults: on a CPU
resnet18 at 128 px, batch 16; on CUDA resnet50 at 512 px, batch 32 (bf16).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import images_per_second, synchronize, training_step  # noqa: E402
from data.datasets import ClassificationDataset  # noqa: E402
from data.layout import PreparedDataset  # noqa: E402
from data.synthetic import SyntheticSpec, write_synthetic  # noqa: E402
from data.transforms import normalize_batch  # noqa: E402
from stages.cam.config import CamConfig  # noqa: E402
from stages.cam.infer import write_cam_files  # noqa: E402
from stages.cam.methods import build_cam_net  # noqa: E402
from stages.common.runtime import resolve_device, seed_everything, worker_count  # noqa: E402
from stages.common.tables import format_table  # noqa: E402
from stages.common.training import PREFETCH_FACTOR, TrainSettings, fit, make_optimizer  # noqa: E402


def bare_step_rate(model, cfg: CamConfig, device, batch: int, size: int, steps: int, warmup: int) -> float:
    """Images/s of forward+backward+step on tensors already on the device."""
    channels_last = device.type == "cuda"
    model.to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(
        model.param_groups(cfg.head_lr_mult),
        TrainSettings(epochs=1, batch_size=batch, lr=cfg.lr, optimizer=cfg.optimizer),
    )
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, model.classifier.out_channels, device=device) > 0.5).float()

    step = training_step(model, optimizer, lambda: model.loss(model(x), y)[0], device)
    return images_per_second(step, batch, steps, warmup, device)


def loop_rate(
    model, cfg: CamConfig, data: PreparedDataset, device, batch: int, size: int, steps: int, workers: int, out: Path
) -> tuple[float, float]:
    """(first-epoch, second-epoch) images/s of the real training loop (steps batches each)."""
    ids = data.split("train")
    ids = (ids * math.ceil(batch * steps / len(ids)))[: batch * steps]
    dataset = ClassificationDataset(data, ids, (size, size), size)
    settings = TrainSettings(
        epochs=2, batch_size=batch, lr=cfg.lr, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay, workers=workers
    )
    history = fit(
        model,
        dataset,
        model.param_groups(cfg.head_lr_mult),
        lambda net, b: model.loss(net(normalize_batch(b["image"])), b["label"]),
        settings,
        device,
        out,
        desc="bench",
    )
    return history[0]["images_per_s"], history[-1]["images_per_s"]


def loop_steps(steps: int, workers: int) -> int:
    """Batches per loop epoch: while epoch 1 ends (its checkpoint written), the workers already
    load up to workers x PREFETCH_FACTOR batches of epoch 2; timed over 8x that many, those
    ready-made batches cannot hide a loader that is too slow."""
    return max(steps, 8 * workers * PREFETCH_FACTOR)


def cam_rate(
    model,
    cfg: CamConfig,
    data: PreparedDataset,
    device,
    count: int,
    workers: int,
    out: Path,
    images_per_batch: int | None = None,
) -> float:
    """images/s of the stage's own CAM inference (write_cam_files: loader workers read and
    resize, the device normalises, flips and runs every scale over a batch of one image size,
    writer threads write the files), worker start-up included; after one warm-up batch."""
    model = model.to(memory_format=torch.contiguous_format).eval()
    ids = data.split("train")
    warm_up = ids[: images_per_batch or 1]
    write_cam_files(model, cfg, data, warm_up, out / "warm-up", device, 0, images_per_batch=images_per_batch)
    ids = (ids * math.ceil(count / len(ids)))[:count]
    synchronize(device)
    start = time.perf_counter()
    failures = write_cam_files(model, cfg, data, ids, out / "cams", device, workers, images_per_batch=images_per_batch)
    synchronize(device)
    assert not failures, failures
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int, default=None, help="crop / image side (CPU 128, CUDA 512)")
    parser.add_argument("--batch", type=int, default=None, help="CPU 16, CUDA 32")
    parser.add_argument("--backbone", default=None, help="CPU resnet18, CUDA resnet50")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed bare steps (CPU 8, CUDA 60); loop epochs take at least 8 x workers x prefetch batches",
    )
    parser.add_argument("--workers", type=int, default=-1, help="loader workers (-1: one per core, max 8)")
    parser.add_argument("--method", default="gap")
    parser.add_argument("--cam-images", type=int, default=None, help="CPU 16, CUDA 200")
    parser.add_argument("--cam-scales", default="1.0,0.5,1.5,2.0")
    parser.add_argument(
        "--cam-batch", type=int, default=None, help="images a CAM batch (default: the stage's rule, 1 on a CPU)"
    )
    parser.add_argument("--skip-training", action="store_true", help="time the CAM inference only")
    args = parser.parse_args()

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    size = args.size or (512 if cuda else 128)
    batch = args.batch or (32 if cuda else 16)
    backbone = args.backbone or ("resnet50" if cuda else "resnet18")
    steps = args.steps or (60 if cuda else 8)
    cam_images = args.cam_images or (200 if cuda else 16)
    workers = worker_count(args.workers)
    if cuda:
        torch.backends.cudnn.benchmark = True
    cfg = CamConfig(
        method=args.method,
        backbone=backbone,
        weights=None,
        optimizer="sgd",
        lr=0.01,
        scales=[float(s) for s in args.cam_scales.split(",")],
        flip=True,
    )
    seed_everything(0)

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        data = PreparedDataset(write_synthetic(Path(tmp) / "data", SyntheticSpec(n=40, size=size, seed=0)))
        print(f"wrote 40 synthetic {size}px images in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        model = build_cam_net(cfg, len(data.classes))
        rows = []
        if not args.skip_training:
            bare = bare_step_rate(model, cfg, device, batch, size, steps, warmup=3 if cuda else 1)
            first, loop = loop_rate(
                model, cfg, data, device, batch, size, loop_steps(steps, workers), workers, Path(tmp)
            )
            rows = [
                {"measure": "bare model step (train)", "images/s": f"{bare:.1f}", "vs bare": "100%"},
                {
                    "measure": f"real loop ({workers} workers), epoch 1 (worker start, autotune)",
                    "images/s": f"{first:.1f}",
                    "vs bare": f"{100 * first / bare:.0f}%",
                },
                {
                    "measure": f"real loop ({workers} workers), epoch 2",
                    "images/s": f"{loop:.1f}",
                    "vs bare": f"{100 * loop / bare:.0f}%",
                },
            ]
        cams = cam_rate(model, cfg, data, device, cam_images, workers, Path(tmp), args.cam_batch)

    per_batch = args.cam_batch or ("by size" if cuda else 1)
    rows.append(
        {
            "measure": f"CAM inference (scales {args.cam_scales}, flip, {workers} workers, {per_batch} img/batch)",
            "images/s": f"{cams:.2f}",
            "vs bare": "-",
        }
    )
    name = (
        torch.cuda.get_device_name(device)
        if cuda
        else f"CPU, {len(os.sched_getaffinity(0))} cores, {torch.get_num_threads()} torch threads"
    )
    print(
        f"{args.method}/{backbone} OS16, {size}x{size}, batch {batch}, {steps} bare steps, "
        f"{loop_steps(steps, workers)} loop steps per epoch, "
        f"{'bf16 + channels_last' if cuda else 'fp32'} on {name}; load average {os.getloadavg()[0]:.1f}"
    )
    print(format_table(rows, ["measure", "images/s", "vs bare"]))


if __name__ == "__main__":
    main()
