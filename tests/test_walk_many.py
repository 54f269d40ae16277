"""`random_walk_many`, the walk search's shared path, returns for every (beta, exp_times) exactly
the tensor `random_walk` returns alone, while computing the beta-free tables once per image and
one walk per beta."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stages.irn import random_walk as walk_module
from stages.irn.random_walk import random_walk, random_walk_many, transition_csr

REPO = Path(__file__).resolve().parents[1]


def random_inputs(channels: int, height: int, width: int, dtype: torch.dtype, seed: int):
    """CAMs in [0, 1) and a boundary map with a few strong boundaries (cubed uniform noise)."""
    generator = torch.Generator().manual_seed(seed)
    cams = torch.rand(channels, height, width, generator=generator, dtype=torch.float64).to(dtype)
    edge = (torch.rand(height, width, generator=generator, dtype=torch.float64) ** 3).to(dtype)
    return cams, edge


@pytest.mark.parametrize(
    "channels, height, width, radius",
    [(1, 12, 17, 5), (2, 20, 20, 5), (5, 9, 11, 3), (21, 16, 7, 4), (3, 1, 13, 5), (2, 4, 4, 9)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_combination_is_the_single_walk_bit_for_bit(channels, height, width, radius, dtype):
    cams, edge = random_inputs(channels, height, width, dtype, seed=channels * 100 + height)
    betas, exp_times = (20.0, 2.0, 10.0), (5, 0, 3)  # unsorted: the walk stops at every 2^k on its way
    walks = random_walk_many(cams, edge, radius, betas, exp_times)
    assert set(walks) == {(b, e) for b in betas for e in exp_times}
    for (beta, exp), walked in walks.items():
        alone = random_walk(cams, edge, radius, beta, exp)
        assert walked.dtype == dtype and walked.shape == cams.shape
        assert torch.equal(walked, alone), (beta, exp)


def test_the_walk_is_the_products_with_the_public_transition():
    """An independent route to the same floats: 2^exp_times CSR products with `transition_csr`'s T^T."""
    cams, edge = random_inputs(4, 13, 15, torch.float64, seed=7)
    walks = random_walk_many(cams, edge, 5, (4.0, 10.0), (1, 4))
    for beta in (4.0, 10.0):
        step = transition_csr(edge, 5, beta, transpose=True)
        walk = (cams * (1 - edge)).reshape(4, -1).T.contiguous()
        for done in range(1, 17):
            walk = torch.sparse.mm(step, walk)
            if done in (2, 16):
                assert torch.equal(walks[(beta, {2: 1, 16: 4}[done])], walk.T.reshape(4, 13, 15))


def test_the_beta_free_tables_are_built_once_and_one_walk_runs_per_beta(monkeypatch):
    calls = {"path_max": 0, "layout": 0, "products": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(walk_module, "_path_max_edge", counted("path_max", walk_module._path_max_edge))
    monkeypatch.setattr(walk_module, "_csr_layout", counted("layout", walk_module._csr_layout))
    monkeypatch.setattr(torch.sparse, "mm", counted("products", torch.sparse.mm))
    cams, edge = random_inputs(3, 12, 17, torch.float32, seed=1)
    random_walk_many(cams, edge, 5, (5.0, 10.0, 20.0), (2, 4, 6))
    assert calls == {"path_max": 1, "layout": 1, "products": 3 * 2**6}


def test_repeated_settings_no_class_and_bad_exp_times():
    cams, edge = random_inputs(2, 8, 9, torch.float64, seed=3)
    walks = random_walk_many(cams, edge, 4, (10.0, 10.0), (3, 3))
    assert list(walks) == [(10.0, 3)] and torch.equal(walks[(10.0, 3)], random_walk(cams, edge, 4, 10.0, 3))
    assert random_walk_many(cams, edge, 4, (10.0,), ()) == {}
    none = random_walk_many(torch.zeros(0, 8, 9), edge.float(), 4, (5.0, 10.0), (2, 4))
    assert len(none) == 4 and all(w.shape == (0, 8, 9) for w in none.values())
    with pytest.raises(ValueError, match="exp_times must be >= 0"):
        random_walk_many(cams, edge, 4, (10.0,), (2, -1))
    with pytest.raises(ValueError, match="same H, W"):
        random_walk_many(cams, edge[:-1], 4, (10.0,), (2,))


TRITON_WALK_MANY = """
import torch
from stages.irn import walk_kernel
from stages.irn.random_walk import _neighbour_table, random_walk, random_walk_many, walk_offsets
walk_kernel.available = lambda device: True  # the interpreter runs the kernel on CPU tensors
for classes, (height, width), radius in ((3, (9, 11), 3), (1, (6, 7), 4)):
    generator = torch.Generator().manual_seed(classes)
    cams = torch.rand(classes, height, width, generator=generator, dtype=torch.float64)
    edge = torch.rand(height, width, generator=generator, dtype=torch.float64) ** 3
    weights, _, _ = _neighbour_table(edge, radius, 10.0)
    step, offsets = weights / weights.sum(0), walk_offsets(radius)
    for steps, walked in walk_kernel.stencil_walk_stops(cams, step, offsets, [0, 1, 3]).items():
        assert torch.equal(walked, walk_kernel.stencil_walk(cams, step, offsets, steps))
    walks = random_walk_many(cams, edge, radius, (5.0, 10.0), (2, 0, 1))
    for (beta, exp), walked in walks.items():
        assert torch.equal(walked, random_walk(cams, edge, radius, beta, exp)), (classes, beta, exp)
assert walk_kernel._failure is None, walk_kernel._failure  # the kernel ran, not the CSR fallback
print("ok")
"""


@pytest.mark.slow
def test_the_gpu_kernel_path_shares_exactly_under_the_triton_interpreter():
    """The CUDA path (`stencil_walk_stops`), run by Triton's CPU interpreter: every stop of one
    kernel walk is the walk of that many steps alone, and so every (beta, exp_times)."""
    pytest.importorskip("triton", reason="this torch build comes without Triton (the GPU walk kernel)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", TRITON_WALK_MANY], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
