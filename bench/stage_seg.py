"""Stage-3 speed: the real segmenter training loop against the bare smp step, and inference.

    python bench/stage_seg.py [--device auto|cpu|cuda] [--size PX] [--batch B] [--steps N]
                              [--arch Unet] [--encoder resnet34] [--workers W] [--distinct K]

- bare step: forward + loss (the stage's SegLoss, ce + dice) + backward + AdamW step on one
  batch already on the device, AMP bf16 + channels_last on CUDA as in the loop, after warm-up;
- real loop: stages.common.training.fit over the stage's PseudoLabelDataset (PNG decode of
  image and pseudo-label, resize-long in [0.625, 1.25] x size, flip, pad-crop to size,
  DataLoader workers, pinned uint8 host->device copies, normalisation on the device); two
  epochs of N batches, both reported: the first pays for worker start-up and cuDNN autotuning,
  the second is the steady state (fit keeps its workers between epochs);
- inference: whole-image predict_probabilities (batch 1, pad to 32, upsample) per image.

Images: K synthetic ones of the requested size written to a temporary prepared dataset
and listed repeatedly, so the loader decodes real files. Defaults: CUDA Unet-ResNet34 at
512 px, batch 16 (bf16); CPU Unet-ResNet34 at 128 px, batch 8.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import images_per_second, synchronize, training_step  # noqa: E402
from data.layout import PreparedDataset  # noqa: E402
from data.synthetic import SyntheticSpec, write_synthetic  # noqa: E402
from data.transforms import normalize_batch  # noqa: E402
from stages.common.runtime import resolve_device, seed_everything, worker_count  # noqa: E402
from stages.common.tables import format_table  # noqa: E402
from stages.common.training import PREFETCH_FACTOR, TrainSettings, fit, make_optimizer  # noqa: E402
from stages.seg.data import PseudoLabelDataset  # noqa: E402
from stages.seg.losses import SegLoss  # noqa: E402
from stages.seg.model import build_segmenter, output_channels, predict_probabilities  # noqa: E402

LOSSES = {"ce": 1.0, "dice": 1.0}


def make_data(tmp: Path, size: int, distinct: int) -> tuple[PreparedDataset, list]:
    root = write_synthetic(tmp / "data", SyntheticSpec(n=distinct, size=size, seed=0))
    dataset = PreparedDataset(root)
    pseudo = tmp / "pseudo"
    pseudo.mkdir()
    items = []
    for image_id in dataset.split("train") + dataset.split("val"):
        shutil.copy(dataset.mask_path(image_id), pseudo / f"{image_id}.png")
        items.append((image_id, pseudo / f"{image_id}.png"))
    return dataset, items


def bare_rate(model, loss, device, batch: int, size: int, steps: int, warmup: int = 5) -> float:
    """Images/s of forward + loss + backward + optimizer step on tensors already on the device."""
    channels_last = device.type == "cuda"
    model.to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(
        [(list(model.parameters()), 1.0)], TrainSettings(epochs=1, batch_size=batch, lr=1e-3, optimizer="adamw")
    )
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (batch, size, size), device=device)

    step = training_step(model, optimizer, lambda: loss(model(x), y)[0], device)
    return images_per_second(step, batch, steps, warmup, device)


def loop_rate(
    model, loss, dataset, items, device, batch: int, size: int, steps: int, workers: int, out: Path
) -> tuple[float, float]:
    """(first-epoch, second-epoch) images/s of the real fit() loop."""
    repeated = (items * (batch * steps // len(items) + 1))[: batch * steps]
    long_range = (round(size * 0.625), round(size * 1.25))
    train_set = PseudoLabelDataset(dataset, repeated, long_range, size, seed=0)
    settings = TrainSettings(epochs=2, batch_size=batch, lr=1e-3, optimizer="adamw", workers=workers)
    history = fit(
        model,
        train_set,
        [(list(model.parameters()), 1.0)],
        lambda m, b: loss(m(normalize_batch(b["image"])), b["label"].long()),
        settings,
        device,
        out,
        desc="bench seg",
    )
    return history[0]["images_per_s"], history[-1]["images_per_s"]


def inference_rate(model, dataset, items, device, size: int, count: int) -> float:
    model.eval()
    images = [dataset.read_image(image_id) for image_id, _ in items[:count]]
    predict_probabilities(model, images[0], "multiclass", size, device)  # warm-up
    synchronize(device)
    started = time.perf_counter()
    for image in images:
        predict_probabilities(model, image, "multiclass", size, device)
    synchronize(device)
    return len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int, default=None, help="crop side (default 512 on CUDA, 128 on CPU)")
    parser.add_argument("--batch", type=int, default=None, help="default 16 on CUDA, 8 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed batches (default 60 on CUDA, 4 on CPU)")
    parser.add_argument("--arch", default="Unet")
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--workers", type=int, default=-1, help="loader workers; -1 = one per core, max 8")
    parser.add_argument("--distinct", type=int, default=32, help="distinct synthetic images on disk")
    args = parser.parse_args()

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    size = args.size or (512 if cuda else 128)
    batch = args.batch or (16 if cuda else 8)
    steps = args.steps or (60 if cuda else 4)
    workers = worker_count(args.workers)
    if cuda:
        torch.backends.cudnn.benchmark = True
    seed_everything(0)
    loss = SegLoss(LOSSES, "multiclass")
    channels = output_channels("multiclass", 3)

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        dataset, items = make_data(Path(tmp), size, args.distinct)
        print(f"wrote {len(items)} synthetic {size}px images in {time.perf_counter() - started:.1f} s", flush=True)
        bare = bare_rate(build_segmenter(args.arch, args.encoder, None, channels), loss, device, batch, size, steps)
        model = build_segmenter(args.arch, args.encoder, None, channels)
        (Path(tmp) / "fit").mkdir()
        # while epoch 1 ends the workers already load up to workers x PREFETCH_FACTOR batches of
        # epoch 2: timed over 8x that many, those ready-made batches cannot hide a slow loader
        fit_steps = max(steps, 8 * workers * PREFETCH_FACTOR)
        first, loop = loop_rate(model, loss, dataset, items, device, batch, size, fit_steps, workers, Path(tmp) / "fit")
        infer = inference_rate(model, dataset, items, device, size, min(len(items), 32))

    name = f"{args.arch}-{args.encoder}"
    print(
        f"\n{name}, {size}x{size}, batch {batch}, {steps} bare steps, {fit_steps} loop steps per epoch, device {device}"
        f"{' (' + torch.cuda.get_device_name(device) + ', bf16)' if cuda else ''}, {workers} loader workers"
    )
    rows = [
        {"measure": "bare smp step (forward+loss+backward+AdamW)", "images/s": bare, "of bare": 1.0},
        {"measure": "real loop fit(), epoch 1 (worker start, autotune)", "images/s": first, "of bare": first / bare},
        {"measure": "real loop fit(), epoch 2", "images/s": loop, "of bare": loop / bare},
        {"measure": "whole-image inference (batch 1)", "images/s": infer},
    ]
    print(format_table(rows, ["measure", "images/s", "of bare"], digits=2))


if __name__ == "__main__":
    main()
