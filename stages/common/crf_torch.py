"""Fully connected CRF (Krähenbühl & Koltun 2011) in plain PyTorch, on the CPU or a CUDA device.

The same model as pydensecrf's ``DenseCRF2D`` with ``addPairwiseGaussian`` and
``addPairwiseBilateral`` (Potts compatibility, diagonal kernel, symmetric normalisation) and
its mean-field inference, with the Gaussian filtering done as pydensecrf does it: on a
permutohedral lattice (Adams, Baek & Davis 2010, "Fast high-dimensional filtering using the
permutohedral lattice"). Every step of pydensecrf's lattice is reproduced in its float32
arithmetic: the feature scaling, the rounding to the nearest remainder-0 lattice point (half to
even), the rank tournament and barycentric weights, the lattice points that its SSE code adds
for zero features when N is not a multiple of 4, the [1/2, 1, 1/2] blur along each of the d + 1
lattice directions in turn, the slice with its constant 1 / (1 + 2^-d), and the normalisation
computed in double. Only the order of float32 sums differs: the marginals agree with
pydensecrf's to about 1e-5 (tests/test_crf_torch.py), the labels on every pixel measured.

Why a lattice and not a truncated window (ConvCRF) or the dense N x N kernel: the bilateral
kernel's spatial range (IRNet: 50 px) is a large fraction of the image; the lattice covers it
with time and memory linear in the pixels. Why plain torch: the lattice's hash table becomes
sorting and binary search over int64 codes of the lattice keys (`torch.unique`,
`torch.searchsorted`), splat, blur and slice become sparse CSR products (cuSPARSE on CUDA), so
one code path runs on the CPU and on CUDA with nothing compiled at install time.

Public pieces: `Lattice` (one feature set, its filter), `PairwiseKernel` / `image_kernels`
(the two kernels of an image), `mean_field` (inference over one or several unaries that share
the image), `label_crf` / `prob_crf` (the two CRFs of crf.py on tensors), `label_unary`
(pydensecrf.utils.unary_from_labels with zero_unsure=False) and `prob_unary` (-log of clipped
probabilities).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

_CODE_LIMIT = 1 << 62  # lattice key codes are int64; stay well clear of overflow


class _KeyIndex:
    """Exact index of integer keys (the columns of a (d, K) int64 tensor): ids 0..M-1, look-ups.

    A key is folded into one int64 code coordinate by coordinate (code * span + offset); when
    the next fold could overflow, the code so far is first replaced by its rank among the
    distinct codes, so any key range works. Look-ups of keys that are not present give -1.
    """

    def __init__(self, keys: torch.Tensor):
        self.low = keys.min(dim=1).values.tolist()
        self.span = [high - low + 1 for high, low in zip(keys.max(dim=1).values.tolist(), self.low)]
        self.levels: list[torch.Tensor | None] = []  # per coordinate: the distinct codes so far
        code = torch.zeros(keys.shape[1], dtype=torch.int64, device=keys.device)
        bound = 1  # codes lie in [0, bound)
        for axis, (low, span) in enumerate(zip(self.low, self.span)):
            if bound * span >= _CODE_LIMIT:
                distinct, code = torch.unique(code, return_inverse=True)
                self.levels.append(distinct)
                bound = distinct.numel()
            else:
                self.levels.append(None)
            code = code * span + (keys[axis] - low)
            bound *= span
        self.codes, self.ids = torch.unique(code, return_inverse=True)

    def __len__(self) -> int:
        return self.codes.numel()

    @staticmethod
    def _find(sorted_codes: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """Position of each code in `sorted_codes`; -1 where absent or where the code is -1."""
        where = torch.searchsorted(sorted_codes, code).clamp_(max=max(sorted_codes.numel() - 1, 0))
        return torch.where((code >= 0) & (sorted_codes[where] == code), where, -1)

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """Ids of the columns of `keys` (-1 where a key is not in the index)."""
        code = torch.zeros(keys.shape[1], dtype=torch.int64, device=keys.device)
        missing = torch.zeros(keys.shape[1], dtype=torch.bool, device=keys.device)
        for axis, (low, span, distinct) in enumerate(zip(self.low, self.span, self.levels)):
            if distinct is not None:
                code = self._find(distinct, torch.where(missing, -1, code))
                missing |= code < 0
            offset = keys[axis] - low
            missing |= (offset < 0) | (offset >= span)
            code = code * span + offset
        return self._find(self.codes, torch.where(missing, -1, code))


def _elevation_scale(d: int) -> list[float]:
    """Per-feature scale of the elevation into the lattice's hyperplane, as pydensecrf computes it
    (float32 of a double product): sqrt(2/3) (d + 1) / sqrt((i + 1)(i + 2)) for feature i."""
    inv_std_dev = float(np.float32(math.sqrt(2.0 / 3.0) * (d + 1)))
    return [float(np.float32(1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev)) for i in range(d)]


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A CSR matrix, with int32 indices where they fit (the index arrays are the bulk of the
    lattice's memory)."""
    index = torch.int32 if max(values.numel(), *shape) < 2**31 else torch.int64
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the operations used are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow.to(index), col.to(index), values, shape, check_invariants=False)


class Lattice:
    """The permutohedral lattice of one feature set and its (unnormalised) Gaussian filter.

    features: (N, d) float32, already divided by the kernel's standard deviations. `filter`
    approximates out_i = sum_j exp(-|f_i - f_j|^2 / 2) in_j (up to a constant factor) exactly
    as pydensecrf's lattice does, as three sparse operators: splat (M x N, barycentric weights), d + 1 blurs (M x M,
    [1/2, 1, 1/2] along one lattice direction each) and slice (N x M, barycentric weights times
    1 / (1 + 2^-d)). Memory is linear in N: (d + 1) entries per point in splat and slice, at
    most 3 per lattice point in each blur (M <= N (d + 1), far fewer on images).

    When N is not a multiple of 4, the lattice also holds the simplex of a zero feature vector,
    without weight, as pydensecrf's SSE lattice does (it pads its last block of 4 points with
    zero features and inserts their lattice points): those points take part in the blur.
    """

    def __init__(self, features: torch.Tensor):
        if features.ndim != 2:
            raise ValueError(f"features must be (N, d), got shape {tuple(features.shape)}")
        device = features.device
        n_points, d = features.shape
        self.n_points, self.d = n_points, d
        features = features.to(torch.float32).t()  # (d, N): one contiguous row per coordinate

        # Elevate onto the hyperplane sum(x) = 0 of R^(d+1): running sums from the last feature,
        # in pydensecrf's float32 operation order.
        scale = _elevation_scale(d)
        elevated = torch.empty(d + 1, n_points, dtype=torch.float32, device=device)
        running = torch.zeros(n_points, dtype=torch.float32, device=device)
        for j in range(d, 0, -1):
            scaled = features[j - 1] * scale[j - 1]
            torch.sub(running, scaled * j, out=elevated[j])
            running = running + scaled
        elevated[0] = running

        # Nearest remainder-0 lattice point: each coordinate rounded to a multiple of d + 1
        # (round half to even, as the SSE conversion), then the rank of each coordinate's residual.
        down = float(np.float32(1.0) / np.float32(d + 1))
        rounded = torch.round(elevated * down)
        rem0 = rounded * (d + 1)
        excess = rounded.sum(dim=0).to(torch.int64)
        residual = elevated - rem0
        # rank_i = #{j > i: r_i < r_j} + #{j < i: r_j >= r_i} (pydensecrf's pairwise tournament)
        rank = torch.zeros(d + 1, n_points, dtype=torch.int64, device=device)
        for i in range(d):
            for j in range(i + 1, d + 1):
                less = residual[i] < residual[j]
                rank[i] += less
                rank[j] += ~less
        # A point off the plane (excess != 0) moves to the neighbouring remainder-0 point.
        rank += excess
        rem0 = rem0.to(torch.int64)
        wrap = (rank < 0).to(torch.int64) - (rank > d).to(torch.int64)
        rank += (d + 1) * wrap
        rem0 += (d + 1) * wrap

        # Barycentric weights: coordinate i adds v_i at slot d - rank_i and removes it at the next.
        v = (elevated - rem0.to(torch.float32)) * down
        slot = d - rank
        barycentric = torch.zeros(d + 2, n_points, dtype=torch.float32, device=device).scatter_(
            0, slot, v
        ) - torch.zeros(d + 2, n_points, dtype=torch.float32, device=device).scatter_(0, slot + 1, v)
        barycentric[0] += 1.0 + barycentric[d + 1]
        barycentric = barycentric[: d + 1]

        # The d + 1 vertices of each point's simplex: vertex r adds r to every coordinate and
        # wraps those whose rank exceeds d - r. A key is its first d coordinates (they sum to 0).
        remainder = torch.arange(d + 1, device=device)[:, None]
        keys = torch.stack([rem0[i] + remainder - (d + 1) * (rank[i] + remainder > d) for i in range(d)])
        keys = keys.reshape(d, -1)  # column r * N + n: vertex r of point n
        if n_points % 4:
            keys = torch.cat([keys, self._origin_keys(d, device)], dim=1)
        index = _KeyIndex(keys)
        self.n_lattice = n_lattice = len(index)
        offsets = index.ids[: n_points * (d + 1)].view(d + 1, n_points)

        # slice: row n holds the point's d + 1 vertices, columns sorted
        vertex, order = offsets.t().sort(dim=1)
        weights = barycentric.t().gather(1, order) * (1.0 / (1.0 + 2.0**-d))
        crow = torch.arange(0, n_points * (d + 1) + 1, d + 1, device=device)
        self.slice = _csr(crow, vertex.reshape(-1), weights.reshape(-1), (n_points, n_lattice))
        # splat: row m holds the points that have m as a vertex
        flat = offsets.reshape(-1)
        order = torch.argsort(flat, stable=True)
        crow = torch.zeros(n_lattice + 1, dtype=torch.int64, device=device)
        crow[1:] = torch.cumsum(torch.bincount(flat, minlength=n_lattice), 0)
        self.splat = _csr(crow, order % n_points, barycentric.reshape(-1)[order], (n_lattice, n_points))

        # blur j: new_m = old_m + (old_n1 + old_n2) / 2 with n1, n2 = key_m +- ((d + 1) e_j - 1)
        lattice_keys = torch.empty(d, n_lattice, dtype=torch.int64, device=device)
        lattice_keys[:, index.ids] = keys
        self.blur = []
        for j in range(d + 1):
            step = torch.full((d, 1), -1, dtype=torch.int64, device=device)
            if j < d:
                step[j] = d
            columns = torch.stack(
                [
                    torch.arange(n_lattice, device=device),
                    index.lookup(lattice_keys + step),
                    index.lookup(lattice_keys - step),
                ],
                dim=1,
            )
            values = torch.tensor([1.0, 0.5, 0.5], device=device).expand(n_lattice, 3)
            present = columns >= 0
            columns, order = torch.where(present, columns, n_lattice).sort(dim=1)
            present = present.gather(1, order)
            crow = torch.zeros(n_lattice + 1, dtype=torch.int64, device=device)
            crow[1:] = torch.cumsum(present.sum(dim=1), 0)
            self.blur.append(_csr(crow, columns[present], values.gather(1, order)[present], (n_lattice, n_lattice)))

    @staticmethod
    def _origin_keys(d: int, device: torch.device) -> torch.Tensor:
        """(d, d + 1) keys of the simplex of a zero feature vector: vertex r has r at the first
        d + 1 - r coordinates and r - (d + 1) at the rest."""
        coordinate = torch.arange(d, device=device)[:, None]
        remainder = torch.arange(d + 1, device=device)[None, :]
        return torch.where(coordinate <= d - remainder, remainder, remainder - (d + 1))

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """Splat (N, C) float32 values onto the lattice, blur, slice back: (N, C)."""
        if values.ndim != 2 or values.shape[0] != self.n_points:
            raise ValueError(f"values must be ({self.n_points}, C), got shape {tuple(values.shape)}")
        lattice = self.splat @ values
        for blur in self.blur:
            lattice = blur @ lattice
        return self.slice @ lattice


class PairwiseKernel:
    """One Potts pairwise term of pydensecrf (NORMALIZE_SYMMETRIC): mean field adds
    compat * norm * filter(norm * Q) to -unary for every label, norm = 1 / sqrt(filter(1)).

    norm and compat are folded into the splat and slice weights, so a message is the lattice's
    d + 3 sparse products and nothing else.
    """

    def __init__(self, features: torch.Tensor, compat: float):
        lattice = Lattice(features)
        ones = torch.ones(lattice.n_points, 1, dtype=torch.float32, device=features.device)
        # in double, as pydensecrf (1.0 / sqrt(float + 1e-20)), then float32
        self.norm = (1.0 / torch.sqrt(lattice.filter(ones).double() + 1e-20)).float().view(-1)
        self.compat = float(compat)
        self.n_points, self.n_lattice = lattice.n_points, lattice.n_lattice
        splat, slice_ = lattice.splat, lattice.slice
        self.splat = _csr(
            splat.crow_indices(),
            splat.col_indices(),
            splat.values() * self.norm[splat.col_indices().long()],
            splat.shape,
        )
        row_scale = (self.compat * self.norm).repeat_interleave(lattice.d + 1)  # d + 1 entries per row
        self.slice = _csr(slice_.crow_indices(), slice_.col_indices(), slice_.values() * row_scale, slice_.shape)
        self.blur = lattice.blur

    def message(self, q: torch.Tensor) -> torch.Tensor:
        """compat * norm * filter(norm * q) for q (N, C) float32: what mean field adds to -unary."""
        lattice = self.splat @ q
        for blur in self.blur:
            lattice = blur @ lattice
        return self.slice @ lattice


def pixel_grid(height: int, width: int, sxy: float, device: torch.device) -> torch.Tensor:
    """(H * W, 2) features (x / sxy, y / sxy) in row-major pixel order, float32 as pydensecrf."""
    scale = torch.tensor(sxy, dtype=torch.float32, device=device)
    y, x = torch.meshgrid(
        torch.arange(height, dtype=torch.float32, device=device),
        torch.arange(width, dtype=torch.float32, device=device),
        indexing="ij",
    )
    return torch.stack([x.reshape(-1) / scale, y.reshape(-1) / scale], dim=1)


def image_kernels(
    image: torch.Tensor,
    gauss_sxy: float,
    gauss_compat: float,
    bilateral_sxy: float,
    bilateral_srgb: float,
    bilateral_compat: float,
) -> list[PairwiseKernel]:
    """The appearance-free Gaussian kernel and the bilateral kernel of an (H, W, 3) uint8 image,
    on the image tensor's device, in pydensecrf's order (Gaussian first)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"the CRF needs an (H, W, 3) uint8 image, got {tuple(image.shape)} {image.dtype}")
    height, width = image.shape[:2]
    srgb = torch.tensor(bilateral_srgb, dtype=torch.float32, device=image.device)
    colour = image.reshape(-1, 3).to(torch.float32) / srgb
    return [
        PairwiseKernel(pixel_grid(height, width, gauss_sxy, image.device), gauss_compat),
        PairwiseKernel(
            torch.cat([pixel_grid(height, width, bilateral_sxy, image.device), colour], dim=1), bilateral_compat
        ),
    ]


def mean_field(unary: torch.Tensor, kernels: list[PairwiseKernel], iterations: int) -> torch.Tensor:
    """Mean-field marginals Q for unary energies (B, L, N) that share the kernels: B independent
    problems of L labels each (e.g. the seed pass's two label maps of one image), filtered
    together as B * L channels, since the filter acts on each channel alone.

    Q = softmax(-U); then `iterations` times Q = softmax(-U + sum_k message_k(Q)) over the labels.
    """
    if unary.ndim != 3:
        raise ValueError(f"unary must be (B, L, N), got shape {tuple(unary.shape)}")
    batch, labels, n_points = unary.shape
    negative = -unary.to(torch.float32).permute(2, 0, 1)  # (N, B, L): channels contiguous per pixel
    q = torch.softmax(negative, dim=2)
    for _ in range(iterations):
        energy = negative.clone()
        flat_q = q.reshape(n_points, batch * labels)
        for kernel in kernels:
            energy += kernel.message(flat_q).view(n_points, batch, labels)
        q = torch.softmax(energy, dim=2)
    return q.permute(1, 2, 0).contiguous()


def label_crf(
    image: torch.Tensor, labels: torch.Tensor, n_labels: int, gt_prob: float, iterations: int, **kernel: float
) -> torch.Tensor:
    """Label CRF of (B, H, W) label maps of one (H, W, 3) uint8 image: (B, H, W) int64 labels.

    All B maps share one lattice per kernel and run as one mean field of B * n_labels channels
    (IRNet's seed pass: the foreground and the background map). `kernel`: the keyword
    arguments of `image_kernels`. Runs on the image's device.
    """
    batch, height, width = labels.shape
    unary = label_unary(labels.reshape(batch, height * width), n_labels, gt_prob)
    q = mean_field(unary, image_kernels(image, **kernel), iterations)
    return q.argmax(dim=1).view(batch, height, width)


def prob_crf(image: torch.Tensor, probs: torch.Tensor, iterations: int, **kernel: float) -> torch.Tensor:
    """Probability CRF of (B, C, H, W) class probabilities of one (H, W, 3) uint8 image: the
    marginals (B, C, H, W) float32, unary -log(p) with p clipped to [1e-5, 1]."""
    batch, channels, height, width = probs.shape
    unary = prob_unary(probs).reshape(batch, channels, height * width)
    return mean_field(unary, image_kernels(image, **kernel), iterations).view(batch, channels, height, width)


def label_unary(labels: torch.Tensor, n_labels: int, gt_prob: float) -> torch.Tensor:
    """pydensecrf.utils.unary_from_labels(labels, n_labels, gt_prob, zero_unsure=False) for
    (B, N) int labels in [0, n_labels): (B, L, N) float32 energies, -log(gt_prob) at the given
    label and -log((1 - gt_prob) / (L - 1)) elsewhere (label 0 is an ordinary label)."""
    if not 0 < gt_prob < 1:
        raise ValueError(f"gt_prob must lie in (0, 1), got {gt_prob}")
    if n_labels < 2:
        raise ValueError(f"the label CRF needs at least 2 labels, got {n_labels}")
    other = np.float32(-math.log((1.0 - gt_prob) / (n_labels - 1)))
    given = np.float32(-math.log(gt_prob))
    unary = torch.full(
        (labels.shape[0], n_labels, labels.shape[1]), float(other), dtype=torch.float32, device=labels.device
    )
    unary.scatter_(1, labels[:, None, :].to(torch.int64), float(given))
    return unary


def prob_unary(probs: torch.Tensor) -> torch.Tensor:
    """-log(p) with p clipped to [1e-5, 1], float32 (as pydensecrf.utils.unary_from_softmax)."""
    return -torch.log(probs.to(torch.float32).clamp(1e-5, 1.0))
