"""Random walk over boundary-aware affinities (IRNet's propagation), without an N x N matrix.

IRNet's mathematics, for an H x W grid at stride 4 with N = H * W pixels:
  A_ij = 1 - max boundary on the segment i -> j for |i - j| < radius (both directions), A_ii = 1,
  T = A^beta / colsum(A^beta)                      (column-stochastic),
  walk = (cams * (1 - boundary)) @ T^(2^exp_times)  (rows = classes).
IRNet builds the dense T and squares it exp_times times. Here T has at most K = 2P + 1
entries per column (P half-plane neighbour offsets), and x @ T is applied 2^exp_times times.
Because A is symmetric, (x @ T)_j = sum_i A_ji x_i / s_j: each step replaces a pixel's value by
the A^beta-weighted mean over its neighbours, so memory stays linear in N.

On the CPU the steps are torch.sparse.mm of T^T in CSR with the (N, C) matrix of all classes.
Measured on 2 CPU cores at 128x128, 21 classes, radius 5, 256 steps: 0.43 s, against 11 s for a
gather stencil (neighbour table (N, K), y_j = sum_k w_jk x_nbr(j,k)) and 30 s for its (C, N)
variant; the dense walk takes 6 s at 64x64 already (bench/random_walk.py). On a CUDA GPU each
step is one Triton kernel over the (K, H, W) weights instead (stages/irn/walk_kernel.py):
cuSPARSE's product took 61 us a step there.

The walk is iterated step by step, so the result for exp_times = k is the state after 2^k steps
of any longer walk, to the bit; `random_walk_many` serves a grid of (beta, exp_times), as the
walk search of `wss tune` needs, from one set of beta-free tables and one walk per beta.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from stages.irn import walk_kernel
from stages.irn.affinity import neighbour_offsets, path_offsets


def walk_offsets(radius: int) -> list[tuple[int, int]]:
    """Offsets of the transition, lexicographic: the pixel itself and both directions of every pair."""
    half = neighbour_offsets(radius)
    return sorted([(0, 0), *half, *[(-dy, -dx) for dy, dx in half]])


@lru_cache(maxsize=None)
def _path_rows(radius: int) -> torch.Tensor:
    """(K, L): for each of `walk_offsets(radius)`, the path pixels of the pair as rows of the
    (2r - 1)^2 unfolded window around a pixel; rows padded by repeating a path pixel (no max changes).

    A pair seen from its second pixel, offset (dy, dx) = -e with e in the half plane, has the path
    of e from the partner: the same pixels, hence the same affinity, as IRNet's pair (partner, pixel).
    """
    margin, window = radius - 1, 2 * radius - 1
    half = set(neighbour_offsets(radius))
    rows = []
    for dy, dx in walk_offsets(radius):
        if (dy, dx) == (0, 0) or (dy, dx) in half:
            path = path_offsets(dy, dx)
        else:
            path = [(dy + py, dx + px) for py, px in path_offsets(-dy, -dx)]
        rows.append([(py + margin) * window + px + margin for py, px in path])
    longest = max(map(len, rows))
    return torch.tensor([row + row[:1] * (longest - len(row)) for row in rows], dtype=torch.long)


def _path_max_edge(edge: torch.Tensor, radius: int) -> torch.Tensor:
    """(K, H, W): the strongest boundary on the path of each pixel's pair with each walk offset.

    The same maxima as `edge_to_affinity` takes, for all offsets at once and without autograd:
    the map is padded with 1 (a partner outside the image gets affinity 0) and unfolded into the
    window around every pixel, and each path step is one row selection of that (3-5x faster
    than per-offset slices on the CPU, and few kernels on a GPU).
    """
    height, width = edge.shape
    margin = radius - 1  # |dy|, |dx| < radius: every path pixel lies in the window
    padded = F.pad(edge, (margin, margin, margin, margin), value=1.0)
    window = F.unfold(padded[None, None], 2 * margin + 1)[0]  # (window^2, H * W)
    rows = _path_rows(radius).to(edge.device)
    strongest = window[rows[:, 0]]
    for step in range(1, rows.shape[1]):
        torch.maximum(strongest, window[rows[:, step]], out=strongest)
    return strongest.view(-1, height, width)


@dataclass(frozen=True)
class _PairTable:
    """What the transition takes from the boundary map whatever beta is, each (K, H, W) over
    `walk_offsets(radius)`: A before the power (1 - the strongest boundary on the pair's path,
    at least 0), partner flat indices and validity. Built once per image, it serves every beta."""

    openness: torch.Tensor
    partner: torch.Tensor
    valid: torch.Tensor
    centre: int  # the plane of offset (0, 0): A_ii = 1


def _pair_table(edge: torch.Tensor, radius: int) -> _PairTable:
    """Plane k at pixel (y, x) describes the pair (y, x) -> (y + dy_k, x + dx_k). Invalid entries
    (partner outside the image) point at the pixel itself."""
    height, width = edge.shape
    offsets = walk_offsets(radius)
    openness = (1 - _path_max_edge(edge, radius)).clamp_min(0)
    centre = offsets.index((0, 0))

    offsets = torch.tensor(offsets, device=edge.device).view(-1, 2, 1, 1)
    ys = torch.arange(height, device=edge.device).view(1, height, 1)
    xs = torch.arange(width, device=edge.device).view(1, 1, width)
    partner_y, partner_x = ys + offsets[:, 0], xs + offsets[:, 1]
    valid = (partner_y >= 0) & (partner_y < height) & (partner_x >= 0) & (partner_x < width)
    partner = torch.where(valid, partner_y * width + partner_x, ys * width + xs)
    return _PairTable(openness, partner, valid, centre)


def _pair_weights(pairs: _PairTable, beta: float) -> torch.Tensor:
    """A^beta (K, H, W): 1 on the centre plane, 0 where the partner is outside the image."""
    weights = pairs.openness.pow(beta)
    weights[pairs.centre] = 1.0  # A_ii = 1
    return weights * pairs.valid


def _neighbour_table(edge: torch.Tensor, radius: int, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights A^beta, partner flat indices and validity, each (K, H, W), for `walk_offsets(radius)`.

    Plane k at pixel (y, x) describes the pair (y, x) -> (y + dy_k, x + dx_k). Invalid entries
    (partner outside the image) have weight 0 and point at the pixel itself.
    """
    pairs = _pair_table(edge, radius)
    return _pair_weights(pairs, beta), pairs.partner, pairs.valid


def transition_csr(edge: torch.Tensor, radius: int = 5, beta: float = 10.0, transpose: bool = False) -> torch.Tensor:
    """IRNet's transition T = A^beta / colsum (N, N) as a sparse CSR tensor on edge's device and dtype.

    `edge` (H, W) is the boundary map in [0, 1]; pixels are flattened row-major. `transpose`
    gives T^T (row j = column j of T), the operand of the walk's sparse products.
    """
    weights, partner, valid = _neighbour_table(edge, radius, beta)
    colsum = weights.sum(dim=0)  # A is symmetric: the sum over j's neighbours is column j's sum
    if transpose:  # T^T[j, i] = A_ij / s_j
        values = weights / colsum
    else:  # T[i, j] = A_ij / s_j, with j the partner of i
        values = weights / colsum.flatten()[partner]
    return _csr_from_table(values, partner, valid)


def transition_stencil(edge: torch.Tensor, radius: int = 5, beta: float = 10.0) -> torch.Tensor:
    """T^T as (K, H, W): plane k at pixel j is T^T[j, j + walk_offsets(radius)[k]] (0 off the image),
    the GPU kernel's operand; the same values as `transition_csr(..., transpose=True)`."""
    weights, _, _ = _neighbour_table(edge, radius, beta)
    return weights / weights.sum(dim=0)


@dataclass(frozen=True)
class _CsrLayout:
    """The sparsity structure of a CSR (N, N) built from (K, H, W) tables, the same for every beta."""

    crow: torch.Tensor
    col: torch.Tensor
    by_row: torch.Tensor  # (N, K): which table entries the rows hold
    size: int


def _csr_layout(columns: torch.Tensor, valid: torch.Tensor) -> _CsrLayout:
    """Row n holds the columns[k, n] of the valid k; walk_offsets is lexicographic, so each
    row's columns come out sorted."""
    n = columns[0].numel()
    by_row = valid.flatten(1).T  # (N, K)
    counts = by_row.sum(dim=1)
    crow = torch.zeros(n + 1, dtype=torch.long, device=columns.device)
    crow[1:] = counts.cumsum(dim=0)
    return _CsrLayout(crow, columns.flatten(1).T[by_row], by_row, n)


def _csr(layout: _CsrLayout, values: torch.Tensor) -> torch.Tensor:
    """CSR (N, N) of `layout` whose row n holds values[k, n] (values (K, H, W))."""
    val = values.flatten(1).T[layout.by_row]
    with warnings.catch_warnings():  # torch warns that CSR support is "beta" and (torch 2.11) that the
        # invariant checks are off: they are, on purpose, for a table built valid by construction
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        return torch.sparse_csr_tensor(
            layout.crow, layout.col, val, size=(layout.size, layout.size), check_invariants=False
        )


def _csr_from_table(values: torch.Tensor, columns: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """CSR (N, N) whose row n holds values[k, n] at columns[k, n] for the valid k (tables are (K, H, W))."""
    return _csr(_csr_layout(columns, valid), values)


def _check_inputs(cams: torch.Tensor, edge: torch.Tensor) -> None:
    if cams.ndim != 3 or edge.ndim != 2 or cams.shape[1:] != edge.shape:
        raise ValueError(
            f"cams must be (C, H, W) and edge (H, W) of the same H, W; got {tuple(cams.shape)} and {tuple(edge.shape)}"
        )


def random_walk(
    cams: torch.Tensor, edge: torch.Tensor, radius: int = 5, beta: float = 10.0, exp_times: int = 8
) -> torch.Tensor:
    """Propagate CAMs (C, H, W) within the regions closed by the boundary map `edge` (H, W); (C, H, W).

    Same result as `random_walk_dense` (IRNet's propagate_to_edge) with memory linear in H * W:
    2^exp_times sparse products with T^T for all classes at once, as CSR products on the CPU and
    as a stencil kernel on a CUDA GPU. Runs on the device and in the dtype of `cams`.
    """
    return random_walk_many(cams, edge, radius, (beta,), (exp_times,))[(beta, exp_times)]


def random_walk_many(
    cams: torch.Tensor,
    edge: torch.Tensor,
    radius: int = 5,
    betas: Sequence[float] = (10.0,),
    exp_times: Sequence[int] = (8,),
) -> dict[tuple[float, int], torch.Tensor]:
    """`random_walk` for every (beta, exp_times) of the two lists: {(beta, exp_times): (C, H, W)},
    each bit for bit the tensor `random_walk(cams, edge, radius, beta, exp_times)` returns.

    The search over walk settings (`wss tune`) pays once per image for what beta does not change
    (the boundary maxima on every pair's path, the neighbour table, the CSR structure), and once
    per beta for the walk of the largest 2^exp_times steps: the walk is x <- x T applied step by
    step, so the state after 2^k steps is, operation for operation, the result for exp_times = k.
    """
    _check_inputs(cams, edge)
    if any(exp < 0 for exp in exp_times):
        raise ValueError(f"exp_times must be >= 0; got {list(exp_times)}")
    stops = sorted({2**exp for exp in exp_times})
    edge = edge.to(device=cams.device, dtype=cams.dtype)
    walks: dict[tuple[float, int], torch.Tensor] = {}
    with torch.no_grad():
        pairs = _pair_table(edge, radius)
        start = cams * (1 - edge)
        layout: _CsrLayout | None = None
        for beta in dict.fromkeys(betas):
            weights = _pair_weights(pairs, beta)
            by_steps = None
            if walk_kernel.available(cams.device):
                try:
                    by_steps = walk_kernel.stencil_walk_stops(
                        start, weights / weights.sum(dim=0), walk_offsets(radius), stops
                    )
                except Exception as error:  # noqa: BLE001 - any failure to build or launch it: the CSR walk runs anywhere
                    walk_kernel.disable(error)
            if by_steps is None:
                if layout is None:
                    layout = _csr_layout(pairs.partner, pairs.valid)
                by_steps = _csr_walk_stops(_csr(layout, weights / weights.sum(dim=0)), start, stops)
            walks.update({(beta, exp): by_steps[2**exp] for exp in exp_times})
    return walks


def _csr_walk_stops(step: torch.Tensor, start: torch.Tensor, stops: list[int]) -> dict[int, torch.Tensor]:
    """{s: start (C, H, W) after s products with the CSR `step` (T^T)} for the step counts (>= 1) in `stops`."""
    channels, height, width = start.shape
    walk = start.reshape(channels, height * width).T.contiguous()  # (N, C)
    by_steps = {}
    for done in range(1, max(stops, default=0) + 1):
        walk = torch.sparse.mm(step, walk)
        if done in stops:
            by_steps[done] = walk.T.reshape(channels, height, width)
    return by_steps


def dense_affinity(edge: torch.Tensor, radius: int = 5) -> torch.Tensor:
    """IRNet's dense affinity A (N, N): both directions of every pair within the radius, A_ii = 1, 0 elsewhere."""
    weights, partner, valid = _neighbour_table(edge, radius, beta=1.0)
    n = edge.numel()
    valid = valid.flatten(1)
    rows = torch.arange(n, device=edge.device).expand(valid.shape)
    dense = torch.zeros((n, n), dtype=edge.dtype, device=edge.device)
    dense[rows[valid], partner.flatten(1)[valid]] = weights.flatten(1)[valid]
    return dense


def random_walk_dense(
    cams: torch.Tensor, edge: torch.Tensor, radius: int = 5, beta: float = 10.0, exp_times: int = 8
) -> torch.Tensor:
    """The reference: IRNet's to_transition_matrix + propagate_to_edge with a dense N x N matrix.

    T = A^beta / colsum, squared exp_times times, walk = (cams * (1 - edge)) @ T. Memory and time
    grow as N^2 and N^3: only for small grids and for comparison.
    """
    _check_inputs(cams, edge)
    channels, height, width = cams.shape
    edge = edge.to(device=cams.device, dtype=cams.dtype)
    with torch.no_grad():
        scaled = dense_affinity(edge, radius).pow(beta)
        transition = scaled / scaled.sum(dim=0, keepdim=True)
        for _ in range(exp_times):
            transition = transition @ transition
        walk = (cams * (1 - edge)).reshape(channels, height * width) @ transition
    return walk.reshape(channels, height, width)
