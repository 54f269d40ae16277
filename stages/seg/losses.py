"""Training losses of the segmenter: a weighted sum of smp losses named in `seg.losses`.

Pseudo-labels leave many pixels unlabelled (255). smp's cross-entropies zero those pixels but
still divide by every pixel, so a batch with more ignored pixels would get a smaller loss and
gradient; here their summed loss is divided by the number of labelled pixels instead.
"""

from __future__ import annotations

from typing import Callable

import torch
from segmentation_models_pytorch import losses as smp_losses

from data.errors import WssError
from data.layout import IGNORE_INDEX

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _cross_entropy(mode: str) -> LossFn:
    if mode == "binary":
        summed = smp_losses.SoftBCEWithLogitsLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    else:
        summed = smp_losses.SoftCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum", smooth_factor=0.0)

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return summed(logits, target) / (target != IGNORE_INDEX).sum().clamp_min(1)

    return loss


# name -> builder(mode); "ce" is BCE in binary mode, so configs read the same for both tasks
LOSSES: dict[str, Callable[[str], LossFn]] = {
    "ce": _cross_entropy,
    "bce": _cross_entropy,
    "dice": lambda mode: smp_losses.DiceLoss(mode, from_logits=True, ignore_index=IGNORE_INDEX),
    "lovasz": lambda mode: smp_losses.LovaszLoss(mode, ignore_index=IGNORE_INDEX),
    "focal": lambda mode: smp_losses.FocalLoss(mode, ignore_index=IGNORE_INDEX),
}


class SegLoss:
    """Weighted sum of named losses; returns (total, {"loss_<name>": value}) like fit's step wants.

    Targets are (N, H, W) class indices with 255 ignored; in binary mode the logits are
    (N, 1, H, W) and the target becomes a float (N, 1, H, W) map of 0/1/255.
    """

    def __init__(self, weights: dict[str, float], task: str):
        unknown = [name for name in weights if name not in LOSSES]
        if unknown:
            raise WssError(f"seg.losses: unknown loss {unknown[0]!r} (choose from {', '.join(LOSSES)})")
        negative = [name for name, w in weights.items() if w < 0]
        if negative:
            raise WssError(f"seg.losses: the weight of {negative[0]!r} must be >= 0, got {weights[negative[0]]}")
        if not weights or not any(w for w in weights.values()):
            raise WssError("seg.losses: give at least one loss with a non-zero weight, e.g. {ce: 1.0}")
        self.task = task
        mode = "binary" if task == "binary" else "multiclass"
        self.terms = [(name, float(w), LOSSES[name](mode)) for name, w in weights.items() if w]

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logits = logits.float()  # losses in fp32 even under bf16 autocast
        if self.task == "binary":
            target = target.unsqueeze(1).float()
        # A batch without a labelled pixel has no signal; smp then returns nan (focal) or an empty
        # tensor (multiclass Lovasz). Such terms become 0 on the device: a Python `if` here would
        # stall the GPU queue once per step. A nan with labelled pixels stays (the loop reports it).
        labelled = (target != IGNORE_INDEX).any()
        zero = logits.new_zeros(())
        total, logs = zero, {}
        for name, weight, fn in self.terms:
            value = torch.where(labelled, fn(logits, target).sum(), zero)
            logs[f"loss_{name}"] = value.detach()
            total = total + weight * value
        return total, logs
