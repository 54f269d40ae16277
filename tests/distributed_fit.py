"""fit() on a small BatchNorm-free net; run as `torchrun --nproc_per_node=2 tests/distributed_fit.py OUT`
(or imported and called in one process) and save the trained weights to OUT.

With the global batch equal to the whole dataset every epoch is one step whose gradient, the
mean over all images, does not depend on how the images are split over processes: the
weights after N data-parallel processes must equal those of one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

IMAGES, EPOCHS = 16, 3


class NoisySquares(Dataset):
    """Deterministic per index: any process can load any item."""

    def __len__(self) -> int:
        return IMAGES

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(index)
        return {"image": torch.rand(3, 12, 12, generator=generator), "label": torch.tensor(float(index % 2))}


def train(out: Path) -> None:
    from stages.common import distributed
    from stages.common.training import TrainSettings, fit

    distributed.init_from_env("cpu")
    torch.manual_seed(0 if distributed.is_main() else 1)  # fit must start every rank from rank 0's weights
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))
    settings = TrainSettings(epochs=EPOCHS, batch_size=IMAGES, lr=0.5, momentum=0.9, weight_decay=1e-4)

    def step(net, batch):
        logits = net(batch["image"])[:, 0]
        return nn.functional.binary_cross_entropy_with_logits(logits, batch["label"]), {}

    work = out.parent / f"{out.stem}-work"
    work.mkdir(parents=True, exist_ok=True)
    history = fit(
        model,
        NoisySquares(),
        [(list(model.parameters()), 1.0)],
        step,
        settings,
        torch.device("cpu"),
        work,
        desc="ddp-check",
    )
    if distributed.is_main():
        torch.save({"model": model.state_dict(), "history": history}, out)
    distributed.finish()  # as the CLI does: no rank leaves while another still uses the group


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    train(Path(sys.argv[1]))
