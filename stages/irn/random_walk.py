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
"""

from __future__ import annotations

import warnings
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


def _neighbour_table(edge: torch.Tensor, radius: int, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights A^beta, partner flat indices and validity, each (K, H, W), for `walk_offsets(radius)`.

    Plane k at pixel (y, x) describes the pair (y, x) -> (y + dy_k, x + dx_k). Invalid entries
    (partner outside the image) have weight 0 and point at the pixel itself.
    """
    height, width = edge.shape
    offsets = walk_offsets(radius)
    weights = (1 - _path_max_edge(edge, radius)).clamp_min(0).pow(beta)
    weights[offsets.index((0, 0))] = 1.0  # A_ii = 1

    offsets = torch.tensor(offsets, device=edge.device).view(-1, 2, 1, 1)
    ys = torch.arange(height, device=edge.device).view(1, height, 1)
    xs = torch.arange(width, device=edge.device).view(1, 1, width)
    partner_y, partner_x = ys + offsets[:, 0], xs + offsets[:, 1]
    valid = (partner_y >= 0) & (partner_y < height) & (partner_x >= 0) & (partner_x < width)
    partner = torch.where(valid, partner_y * width + partner_x, ys * width + xs)
    return weights * valid, partner, valid


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


def _csr_from_table(values: torch.Tensor, columns: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """CSR (N, N) whose row n holds values[k, n] at columns[k, n] for the valid k (tables are (K, H, W)).

    walk_offsets is lexicographic, so each row's columns come out sorted.
    """
    n = values[0].numel()
    by_row = valid.flatten(1).T  # (N, K)
    counts = by_row.sum(dim=1)
    crow = torch.zeros(n + 1, dtype=torch.long, device=values.device)
    crow[1:] = counts.cumsum(dim=0)
    col = columns.flatten(1).T[by_row]
    val = values.flatten(1).T[by_row]
    with warnings.catch_warnings():  # torch warns that CSR support is "beta" and (torch 2.11) that the
        # invariant checks are off: they are, on purpose, for a table built valid by construction
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        return torch.sparse_csr_tensor(crow, col, val, size=(n, n), check_invariants=False)


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
    _check_inputs(cams, edge)
    channels, height, width = cams.shape
    edge = edge.to(device=cams.device, dtype=cams.dtype)
    with torch.no_grad():
        if walk_kernel.available(cams.device):
            try:
                return walk_kernel.stencil_walk(
                    cams * (1 - edge), transition_stencil(edge, radius, beta), walk_offsets(radius), 2**exp_times
                )
            except Exception as error:  # noqa: BLE001 - any failure to build or launch it: the CSR walk runs anywhere
                walk_kernel.disable(error)
        step = transition_csr(edge, radius, beta, transpose=True)
        walk = (cams * (1 - edge)).reshape(channels, height * width).T.contiguous()  # (N, C)
        for _ in range(2**exp_times):
            walk = torch.sparse.mm(step, walk)
    return walk.T.reshape(channels, height, width)


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
