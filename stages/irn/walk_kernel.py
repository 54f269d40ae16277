"""The random walk on a GPU: each step y = T^T x as one Triton kernel, a stencil with per-pixel weights.

T^T has the same K offsets at every pixel (`walk_offsets`), so a step needs no index arrays:
pixel j of every class gathers sum_k w[k, j] * x[j + offset_k] from a copy of x padded with
zeros. The weights (K x N, a few MB) stay in the GPU's cache across the 2^exp_times steps and
two ping-pong buffers are reused, so a step is one small launch. cuSPARSE's CSR product, the
CPU path, took 61 us a step on an H200 at 128x128 and 21 classes; see bench/random_walk.py.
"""

from __future__ import annotations

import logging

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheels of torch come without Triton: the CSR walk is used there
    triton = None

PIXELS_PER_PROGRAM = 128
MAX_CLASSES_PER_PROGRAM = 32  # a program reads its pixels' weights once for up to this many classes


log = logging.getLogger("wss.walk")
_failure: str | None = None  # why the kernel could not run here (then the CSR walk is used)


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda" and _failure is None


def disable(error: Exception) -> None:
    """Fall back to the CSR walk for the rest of the process, e.g. where Triton finds no C
    compiler to build its launcher or does not support the GPU; says so once."""
    global _failure
    _failure = f"{type(error).__name__}: {error}".splitlines()[0]
    log.warning("random walk: the Triton kernel failed (%s); using the slower CSR walk instead", _failure)


if triton is not None:

    @triton.jit
    def _stencil_step(
        source,
        target,
        weights,
        offsets,
        n_offsets,
        classes,
        height,
        width,
        padded_width,
        margin,
        plane_size,
        BLOCK_PIXELS: tl.constexpr,
        BLOCK_CLASSES: tl.constexpr,
    ):
        """target[c, j] = sum_k weights[k, j] * source[c, j + offsets[k]], in padded planes."""
        pixel = tl.program_id(0) * BLOCK_PIXELS + tl.arange(0, BLOCK_PIXELS)
        channel = tl.program_id(1) * BLOCK_CLASSES + tl.arange(0, BLOCK_CLASSES)
        pixel_ok = pixel < height * width
        both_ok = (channel < classes)[:, None] & pixel_ok[None, :]
        centre = (pixel // width + margin) * padded_width + pixel % width + margin
        planes = channel[:, None] * plane_size
        total = tl.zeros((BLOCK_CLASSES, BLOCK_PIXELS), dtype=source.dtype.element_ty)
        for k in range(n_offsets):
            weight = tl.load(weights + k * height * width + pixel, mask=pixel_ok, other=0.0)
            value = tl.load(source + planes + (centre + tl.load(offsets + k))[None, :], mask=both_ok, other=0.0)
            total += weight[None, :] * value
        tl.store(target + planes + centre[None, :], total, mask=both_ok)


def stencil_walk(
    start: torch.Tensor, weights: torch.Tensor, offsets: list[tuple[int, int]], steps: int
) -> torch.Tensor:
    """Apply `steps` times x <- T^T x to `start` (C, H, W), with T^T[j, j + offsets[k]] = weights[k, j].

    `weights` (K, H, W) is 0 where the partner falls outside the image; |dy|, |dx| of every
    offset must not exceed the margin the planes are padded by.
    """
    return stencil_walk_stops(start, weights, offsets, [steps])[steps]


def stencil_walk_stops(
    start: torch.Tensor, weights: torch.Tensor, offsets: list[tuple[int, int]], stops: list[int]
) -> dict[int, torch.Tensor]:
    """{s: `stencil_walk(start, weights, offsets, s)`} for every s in `stops`, from one walk of
    max(stops) steps: the state after s steps is the same launches on the same buffers whether
    the walk ends there or goes on, so each is bit for bit the walk of s steps alone."""
    classes, height, width = start.shape
    steps = max(stops, default=0)
    if classes == 0 or steps == 0:
        return {s: start.clone() for s in stops}
    margin = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    padded_width = width + 2 * margin
    planes = torch.zeros((2, classes, height + 2 * margin, padded_width), dtype=start.dtype, device=start.device)
    planes[0, :, margin : margin + height, margin : margin + width] = start
    flat_offsets = torch.tensor([dy * padded_width + dx for dy, dx in offsets], dtype=torch.int32, device=start.device)
    weights = weights.to(start.dtype).contiguous()
    block_classes = min(MAX_CLASSES_PER_PROGRAM, max(2, triton.next_power_of_2(classes)))
    grid = (triton.cdiv(height * width, PIXELS_PER_PROGRAM), triton.cdiv(classes, block_classes))

    def interior(buffer: int) -> torch.Tensor:
        return planes[buffer, :, margin : margin + height, margin : margin + width].clone()

    by_steps = {0: interior(0)} if 0 in stops else {}
    for step in range(steps):  # margins stay 0: the kernel writes interior pixels only
        _stencil_step[grid](
            planes[step % 2],
            planes[1 - step % 2],
            weights,
            flat_offsets,
            len(offsets),
            classes,
            height,
            width,
            padded_width,
            margin,
            planes[0, 0].numel(),
            BLOCK_PIXELS=PIXELS_PER_PROGRAM,
            BLOCK_CLASSES=block_classes,
        )
        if step + 1 in stops:
            by_steps[step + 1] = interior((step + 1) % 2)
    return by_steps
