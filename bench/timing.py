"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of `fn`, CUDA synchronised before and after."""
    synchronize(device)
    started = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - started


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds of `repeats` calls of `fn` after one untimed warm-up call."""
    fn()
    return statistics.median(call_seconds(fn, device) for _ in range(repeats))


def training_step(model, optimizer, loss_of: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], None]:
    """One bare forward + backward + optimizer step on tensors already on the device."""
    from stages.common.runtime import autocast

    def step() -> None:
        with autocast(device):
            loss = loss_of()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def images_per_second(
    step: Callable[[], None], images_per_step: int, steps: int, warmup: int, device: torch.device
) -> float:
    """Throughput of `step` after `warmup` untimed calls (CUDA synchronised around the timing)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return images_per_step * steps / (time.perf_counter() - started)
