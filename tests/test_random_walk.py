"""The sparse random walk equals IRNet's dense formulation; the transition is column-stochastic;
a closed boundary keeps the walk inside."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.irn.affinity import path_offsets
from stages.irn.random_walk import (
    dense_affinity,
    random_walk,
    random_walk_dense,
    transition_csr,
    walk_offsets,
)

REPO = Path(__file__).resolve().parents[1]


def random_inputs(height: int, width: int, channels: int = 3, seed: int = 0):
    """Float64 CAMs and a boundary map with a few strong boundaries (cubed uniform noise)."""
    generator = torch.Generator().manual_seed(seed)
    cams = torch.rand(channels, height, width, generator=generator, dtype=torch.float64)
    edge = torch.rand(height, width, generator=generator, dtype=torch.float64) ** 3
    return cams, edge


def slow_dense_affinity(edge: np.ndarray, radius: int) -> np.ndarray:
    """Pure-Python A over every ordered pair of pixels closer than the radius (and A_ii = 1),
    the segment walked from the end where the offset lies in the half-plane."""
    height, width = edge.shape
    pixels = [(y, x) for y in range(height) for x in range(width)]
    dense = np.eye(len(pixels))
    for i, (y1, x1) in enumerate(pixels):
        for j, (y2, x2) in enumerate(pixels):
            dy, dx = y2 - y1, x2 - x1
            if not 0 < dy * dy + dx * dx < radius * radius:
                continue
            if dy > 0 or (dy == 0 and dx > 0):
                (start_y, start_x), path = (y1, x1), path_offsets(dy, dx)
            else:
                (start_y, start_x), path = (y2, x2), path_offsets(-dy, -dx)
            dense[i, j] = 1 - max(edge[start_y + py, start_x + px] for py, px in path)
    return dense


def test_dense_affinity_equals_a_pure_python_reference():
    _, edge = random_inputs(5, 6, seed=3)
    for radius in (2, 3):
        got = dense_affinity(edge, radius).numpy()
        np.testing.assert_allclose(got, slow_dense_affinity(edge.numpy(), radius), atol=1e-12)
        np.testing.assert_array_equal(got, got.T)
        np.testing.assert_array_equal(np.diag(got), 1.0)


@pytest.mark.parametrize(
    "height, width, radius, beta, exp_times",
    [
        (12, 17, 5, 10.0, 8),
        (12, 17, 3, 10.0, 8),
        (9, 11, 5, 4.0, 5),
        (16, 7, 7, 10.0, 6),
        (1, 13, 5, 10.0, 4),  # a single row
        (4, 4, 9, 2.0, 3),  # radius larger than the grid
    ],
)
def test_sparse_walk_equals_the_dense_formulation(height, width, radius, beta, exp_times):
    cams, edge = random_inputs(height, width, seed=height * width + radius)
    sparse = random_walk(cams, edge, radius=radius, beta=beta, exp_times=exp_times)
    dense = random_walk_dense(cams, edge, radius=radius, beta=beta, exp_times=exp_times)
    assert sparse.shape == cams.shape and sparse.dtype == torch.float64
    assert ((sparse - dense).norm() / dense.norm()).item() < 1e-5
    np.testing.assert_allclose(sparse.numpy(), dense.numpy(), rtol=1e-6, atol=1e-12)


def test_transition_is_column_stochastic_csr():
    _, edge = random_inputs(12, 17, seed=5)
    transition = transition_csr(edge, radius=5, beta=10.0)
    assert transition.layout == torch.sparse_csr and transition.shape == (204, 204)
    with torch.sparse.check_sparse_tensor_invariants():  # sorted, in range, consistent
        torch.sparse_csr_tensor(
            transition.crow_indices(), transition.col_indices(), transition.values(), transition.shape
        )
    dense = transition.to_dense()
    assert (dense >= 0).all()
    np.testing.assert_allclose(dense.sum(dim=0).numpy(), 1.0, atol=1e-12)
    scaled = dense_affinity(edge, 5) ** 10.0
    np.testing.assert_allclose(dense.numpy(), (scaled / scaled.sum(dim=0)).numpy(), atol=1e-12)
    np.testing.assert_array_equal(transition_csr(edge, 5, 10.0, transpose=True).to_dense().numpy(), dense.T.numpy())
    # entries per column: the pixel itself plus every neighbour inside the image
    assert transition.values().numel() == sum(
        1 for y in range(12) for x in range(17) for dy, dx in walk_offsets(5) if 0 <= y + dy < 12 and 0 <= x + dx < 17
    )


def ring_edge(size: int, shape: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A one-pixel boundary closing a region: a square ring (4-connected) or a diamond, whose
    pixels only touch diagonally (8-connected): a thin path could slip through its corners."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = size // 2
    if shape == "square":
        distance = torch.maximum((ys - centre).abs(), (xs - centre).abs())
    else:
        distance = (ys - centre).abs() + (xs - centre).abs()
    return (distance == 8).double(), distance < 8


@pytest.mark.parametrize("shape", ["square", "diamond"])
def test_a_closed_boundary_keeps_the_walk_inside(shape):
    edge, inside = ring_edge(24, shape)
    cams = torch.zeros(2, 24, 24, dtype=torch.float64)
    cams[0, 10:13, 11:13] = 1.0  # a blob inside the ring
    cams[1] = (~inside).double() * 0.5  # and a class living outside it
    walk = random_walk(cams, edge, radius=5, beta=10.0, exp_times=8)
    outside = ~inside & (edge == 0)
    assert walk[0][outside].abs().max() < 1e-12
    assert walk[1][inside].abs().max() < 1e-12
    assert (walk[0][inside] > 0).all() and (walk[1][outside] > 0).all()  # spread over its whole region
    assert (walk[:, edge > 0] == 0).all()  # boundary pixels start at 0 and only see themselves


def test_a_constant_map_without_boundaries_stays_constant():
    cams = torch.full((2, 10, 13), 0.25, dtype=torch.float64)
    walk = random_walk(cams, torch.zeros(10, 13, dtype=torch.float64), radius=4, beta=10.0, exp_times=5)
    np.testing.assert_allclose(walk.numpy(), 0.25, rtol=1e-12)


def test_float32_edge_cases_and_errors():
    cams, edge = random_inputs(12, 17)
    walk = random_walk(cams.float(), edge.float())
    assert walk.dtype == torch.float32 and walk.device == cams.device
    reference = random_walk_dense(cams, edge)
    assert ((walk.double() - reference).norm() / reference.norm()).item() < 1e-4
    assert random_walk(torch.zeros(0, 12, 17), edge.float()).shape == (0, 12, 17)
    with pytest.raises(ValueError, match="same H, W"):
        random_walk(cams, edge[:-1])


TRITON_WALK = """
import torch
from stages.irn.random_walk import _neighbour_table, random_walk, walk_offsets
from stages.irn import walk_kernel
for classes, (height, width), radius in ((3, (12, 17), 5), (1, (9, 6), 3), (40, (7, 11), 4)):
    generator = torch.Generator().manual_seed(classes)
    cams = torch.rand(classes, height, width, generator=generator, dtype=torch.float64)
    edge = torch.rand(height, width, generator=generator, dtype=torch.float64) ** 3
    weights, _, _ = _neighbour_table(edge, radius, 10.0)
    kernel = walk_kernel.stencil_walk(cams * (1 - edge), weights / weights.sum(0), walk_offsets(radius), 16)
    csr = random_walk(cams, edge, radius, 10.0, exp_times=4)
    error = ((kernel - csr).norm() / csr.norm()).item()
    assert error < 1e-12, (classes, radius, error)
print("ok")
"""


@pytest.mark.slow
def test_gpu_walk_kernel_equals_the_csr_walk_under_the_triton_interpreter():
    """The GPU path's Triton kernel, run by Triton's CPU interpreter: one class, 3 and 40 classes
    (more than one program's block), radii 3-5, non-square grids. tests/test_cuda.py runs it compiled."""
    pytest.importorskip("triton", reason="this torch build comes without Triton (the GPU walk kernel)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", TRITON_WALK], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_a_failing_gpu_kernel_falls_back_to_the_csr_walk_once(monkeypatch, caplog):
    """Where Triton cannot build or launch the kernel (no C compiler, say), the walk still runs."""
    from stages.irn import walk_kernel

    cams, edge = random_inputs(12, 17)
    expected = random_walk(cams, edge, exp_times=4)  # on the CPU: the CSR walk
    calls = []

    def broken(*args):
        calls.append(args)
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(walk_kernel, "_failure", None)
    monkeypatch.setattr(walk_kernel, "available", lambda device: walk_kernel._failure is None)  # as on a GPU
    monkeypatch.setattr(walk_kernel, "stencil_walk_stops", broken)
    with caplog.at_level("WARNING", logger="wss.walk"):
        first = random_walk(cams, edge, exp_times=4)
        second = random_walk(cams, edge, exp_times=4)
    assert len(calls) == 1  # tried once, then the CSR walk for the rest of the process
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert [r.getMessage() for r in caplog.records] == [
        "random walk: the Triton kernel failed (RuntimeError: Failed to find C compiler. Please specify via CC "
        "environment variable.); using the slower CSR walk instead"
    ]
