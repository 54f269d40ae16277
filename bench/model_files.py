"""Time writing and reading a training checkpoint: wss's safetensors files against torch.save / torch.load.

A checkpoint is written after every epoch, so its cost is paid epochs times per stage. The
model is stage 1's classifier (GAP on a stride-16 ResNet) with the SGD momentum buffers of a
trained step, as `fit` checkpoints it.

    python bench/model_files.py [--backbone resnet50] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.cam.config import CamConfig  # noqa: E402
from stages.cam.methods import build_cam_net  # noqa: E402
from stages.common.model_files import read_checkpoint_file, write_checkpoint  # noqa: E402


def best_of(repeats: int, job) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        job()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50", choices=["resnet18", "resnet34", "resnet50"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_cam_net(CamConfig(backbone=args.backbone, weights=None), 20, weights=None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(torch.randn(2, 3, 64, 64))["logits"].sum().backward()
    optimizer.step()
    history = [{"epoch": 1, "loss": 0.5}]
    with tempfile.TemporaryDirectory() as folder:
        new, old = Path(folder) / "checkpoint.safetensors", Path(folder) / "checkpoint.pt"
        write_new = best_of(args.repeats, lambda: write_checkpoint(new, model, optimizer, 0, history))
        write_old = best_of(
            args.repeats,
            lambda: torch.save(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0, "history": history}, old
            ),
        )
        read_new = best_of(args.repeats, lambda: read_checkpoint_file(new, model, optimizer))
        read_old = best_of(args.repeats, lambda: torch.load(old, weights_only=True))
        print(f"{args.backbone} classifier + SGD momentum, best of {args.repeats}:")
        print(
            f"  safetensors (wss): {new.stat().st_size / 2**20:.1f} MiB, write {write_new:.3f} s, "
            f"read and check {read_new:.3f} s"
        )
        print(
            f"  torch.save/load:   {old.stat().st_size / 2**20:.1f} MiB, write {write_old:.3f} s, read {read_old:.3f} s"
        )


if __name__ == "__main__":
    main()
