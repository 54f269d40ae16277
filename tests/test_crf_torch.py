"""The torch dense CRF: the lattice against a scalar reference, the whole CRF against pydensecrf2
on real VOC photos and synthetic images, the backend choice and its contracts (CPU only; the
CUDA == CPU check is in test_cuda.py)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from stages.common import crf_torch
from stages.common.crf import (
    CrfParams,
    CrfUnavailable,
    crf_label,
    crf_labels,
    crf_prob,
    resolve_backend,
)

needs_crf = pytest.mark.skipif(importlib.util.find_spec("pydensecrf") is None, reason="pydensecrf2 is not installed")

REPO = Path(__file__).resolve().parents[1]
VOC = REPO.parent / "shared" / "samples" / "voc"
PHOTO_500 = ("VOCdevkit/VOC2012/JPEGImages/2007_000063.jpg", "VOCdevkit/VOC2012/SegmentationClass/2007_000063.png")
VAL_513 = sorted(path.name.removesuffix("_image.png") for path in (VOC / "val513" / "images").glob("*_image.png"))
QUICK_513 = ["120", "294", "582"]  # three-class photos; every other val513 photo runs under -m slow


# ---------------------------------------------------------------------------------------------
# A scalar permutohedral lattice (Adams et al. 2010, as pydensecrf builds it): one point at a
# time, a dict for the hash table, full (d + 1)-coordinate keys, the rank from a stable sort.


def reference_filter(features: np.ndarray, values: np.ndarray) -> np.ndarray:
    n_points, d = features.shape
    inv_std_dev = np.float32(np.sqrt(2.0 / 3.0) * (d + 1))
    scale = np.array([1.0 / np.sqrt((i + 2) * (i + 1)) * float(inv_std_dev) for i in range(d)], np.float32)
    down = np.float32(1.0) / np.float32(d + 1)
    table: dict[tuple[int, ...], int] = {}

    def simplex(feature):
        cf = feature.astype(np.float32) * scale
        elevated = np.zeros(d + 1, np.float32)
        running = np.float32(0)
        for j in range(d, 0, -1):
            elevated[j] = running - np.float32(j) * cf[j - 1]
            running = np.float32(running + cf[j - 1])
        elevated[0] = running
        rem0 = np.round(elevated * down) * (d + 1)  # numpy rounds half to even, as SSE does
        excess = int(np.round(elevated * down).sum())
        residual = elevated - rem0
        rank = np.empty(d + 1, np.int64)
        rank[np.argsort(-residual, kind="stable")] = np.arange(d + 1)
        rank += excess
        rem0 = rem0 + (d + 1) * ((rank < 0).astype(int) - (rank > d).astype(int))
        rank = rank % (d + 1)
        bary = np.zeros(d + 2, np.float32)
        for i in range(d + 1):
            v = np.float32((elevated[i] - rem0[i]) * down)
            bary[d - rank[i]] += v
            bary[d - rank[i] + 1] -= v
        bary[0] += np.float32(1) + bary[d + 1]
        keys = [tuple(int(k) for k in rem0 + r - (d + 1) * (rank + r > d)) for r in range(d + 1)]
        return keys, bary[: d + 1]

    points = []
    for feature in features:
        keys, bary = simplex(feature)
        points.append(([table.setdefault(key, len(table)) for key in keys], bary))
    if n_points % 4:  # pydensecrf's SSE padding: zero features join the lattice without weight
        for key in simplex(np.zeros(d, np.float32))[0]:
            table.setdefault(key, len(table))
    lattice = np.zeros((len(table), values.shape[1]))
    for (vertices, bary), value in zip(points, values):
        for vertex, weight in zip(vertices, bary):
            lattice[vertex] += weight * value
    keys = list(table)
    for j in range(d + 1):
        step = np.full(d + 1, -1)
        step[j] = d
        blurred = lattice.copy()
        for index, key in enumerate(keys):
            for sign in (1, -1):
                neighbour = table.get(tuple(int(k) for k in np.array(key) + sign * step))
                if neighbour is not None:
                    blurred[index] += 0.5 * lattice[neighbour]
        lattice = blurred
    alpha = 1.0 / (1.0 + 2.0**-d)
    return np.stack([sum(w * alpha * lattice[v] for v, w in zip(vertices, bary)) for vertices, bary in points])


@pytest.mark.parametrize("n_points, d, spread", [(40, 2, 1.5), (37, 5, 1.0), (23, 3, 4.0), (1, 4, 1.0)])
def test_lattice_filter_equals_a_scalar_reference_lattice(n_points, d, spread):
    rng = np.random.default_rng(n_points)
    features = (rng.normal(size=(n_points, d)) * spread).astype(np.float32)
    values = rng.random((n_points, 3)).astype(np.float32)
    lattice = crf_torch.Lattice(torch.from_numpy(features))
    out = lattice.filter(torch.from_numpy(values)).double().numpy()
    np.testing.assert_allclose(out, reference_filter(features, values.astype(np.float64)), rtol=1e-5, atol=1e-6)


def test_lattice_filter_is_linear_and_approximates_a_gaussian():
    y, x = np.mgrid[:24, :20]
    features = np.stack([x.ravel() / 3.0, y.ravel() / 3.0], 1).astype(np.float32)
    lattice = crf_torch.Lattice(torch.from_numpy(features))
    rng = np.random.default_rng(0)
    a, b = (torch.from_numpy(rng.random((len(features), 2)).astype(np.float32)) for _ in range(2))
    torch.testing.assert_close(
        lattice.filter(2 * a - 3 * b), 2 * lattice.filter(a) - 3 * lattice.filter(b), rtol=1e-5, atol=1e-5
    )
    # up to a constant, the dense Gaussian exp(-|f_i - f_j|^2 / 2) (measured: correlation 0.998)
    dense = np.exp(-((features[:, None] - features[None]) ** 2).sum(-1) / 2) @ a.double().numpy()
    assert np.corrcoef(lattice.filter(a).double().numpy().ravel(), dense.ravel())[0, 1] > 0.995


def test_key_index_folds_huge_key_ranges_without_collisions():
    rng = np.random.default_rng(0)
    keys = rng.integers(-(2**40), 2**40, size=(4, 300)) // 7 * 7  # 4 x 41 bits: the codes must be ranked
    keys = np.concatenate([keys, keys[:, :50]], axis=1)  # duplicates
    index = crf_torch._KeyIndex(torch.from_numpy(keys))
    assert any(level is not None for level in index.levels)  # the ranking path ran
    ids = index.ids.numpy()
    distinct = {tuple(column) for column in keys.T}
    assert len(index) == len(distinct)
    for column, key_id in zip(keys.T, ids):  # equal keys share an id, different keys do not
        assert (ids[(keys == column[:, None]).all(0)] == key_id).all()
    absent = keys[:, :20] + np.array([[0], [0], [0], [1]])
    present = np.array([tuple(column) in distinct for column in absent.T])
    found = index.lookup(torch.from_numpy(absent)).numpy()
    assert ((found >= 0) == present).all()
    np.testing.assert_array_equal(index.lookup(torch.from_numpy(keys)).numpy(), ids)


# ---------------------------------------------------------------------------------------------
# The whole CRF against pydensecrf2


def reference_marginals(image: np.ndarray, unary: np.ndarray, params: CrfParams) -> np.ndarray:
    import pydensecrf.densecrf as dcrf

    height, width = image.shape[:2]
    crf = dcrf.DenseCRF2D(width, height, unary.shape[0])
    crf.setUnaryEnergy(np.ascontiguousarray(unary.reshape(unary.shape[0], -1), dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=np.ascontiguousarray(image),
        compat=params.bilateral_compat,
    )
    return np.asarray(crf.inference(params.iterations), np.float32).reshape(unary.shape[0], height, width)


def torch_marginals(image: np.ndarray, unaries: list[np.ndarray], params: CrfParams) -> list[np.ndarray]:
    """Marginals of several (L, H, W) unaries of one image, with the image's kernels built once."""
    kernels = crf_torch.image_kernels(
        torch.from_numpy(np.ascontiguousarray(image)),
        params.gauss_sxy,
        params.gauss_compat,
        params.bilateral_sxy,
        params.bilateral_srgb,
        params.bilateral_compat,
    )
    return [
        crf_torch.mean_field(torch.from_numpy(unary.reshape(1, unary.shape[0], -1)), kernels, params.iterations)[0]
        .reshape(unary.shape)
        .numpy()
        for unary in unaries
    ]


def read_photo(image_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """RGB photo, its mask as labels 0..n-1 (ignored pixels -> 0), n (>= 2)."""
    from PIL import Image

    if not image_path.exists() or not mask_path.exists():
        pytest.skip(f"VOC sample not found: {image_path}")
    image = np.array(Image.open(image_path).convert("RGB"))
    mask = np.array(Image.open(mask_path))
    classes = np.unique(mask[mask != 255])
    return image, np.searchsorted(classes, np.where(mask == 255, 0, mask)), max(len(classes), 2)


def noisy_labels(labels: np.ndarray, n_labels: int, rng: np.random.Generator) -> np.ndarray:
    """A seed-like map: objects dilated past their edges, and random 24 px blocks relabelled."""
    noisy = labels.copy()
    for k in range(1, n_labels):
        noisy[ndimage.binary_dilation(labels == k, iterations=8)] = k
    for _ in range(12):
        y, x = rng.integers(0, labels.shape[0] - 24), rng.integers(0, labels.shape[1] - 24)
        noisy[y : y + 24, x : x + 24] = rng.integers(0, n_labels)
    return noisy


def soft_probs(labels: np.ndarray, n_labels: int, rng: np.random.Generator) -> np.ndarray:
    """CAM-like class probabilities: the blurred one-hot mask plus noise, normalised."""
    probs = np.stack([ndimage.gaussian_filter((labels == k).astype(np.float32), 8) for k in range(n_labels)])
    probs += 0.1 * rng.random(probs.shape, dtype=np.float32)
    return probs / probs.sum(0)


def assert_agrees_with_pydensecrf(image: np.ndarray, labels: np.ndarray, n_labels: int, seed: int) -> None:
    """Label CRF (IRNet's seed parameters) of the labels and of a noisy copy: >= 99% of pixels
    equal; probability CRF: arg-max >= 98% equal; all marginals within 1e-3 (max) and 1e-6
    (mean). Measured on the 15 VOC photos: 100% and 100%, max |dQ| <= 1.9e-5, mean <= 4e-9."""
    import pydensecrf.utils as crf_utils

    params, rng = CrfParams(), np.random.default_rng(seed)
    unaries = [
        crf_utils.unary_from_labels(label_map, n_labels, gt_prob=params.gt_prob, zero_unsure=False).reshape(
            (n_labels,) + labels.shape
        )
        for label_map in (labels, noisy_labels(labels, n_labels, rng))
    ]
    probs = soft_probs(labels, n_labels, rng)
    unaries.append(-np.log(np.clip(probs, 1e-5, 1.0)))
    for number, (ours, theirs) in enumerate(
        zip(torch_marginals(image, unaries, params), (reference_marginals(image, unary, params) for unary in unaries))
    ):
        assert (ours.argmax(0) == theirs.argmax(0)).mean() >= (0.99 if number < 2 else 0.98)
        assert np.abs(ours - theirs).max() < 1e-3 and np.abs(ours - theirs).mean() < 1e-6


@needs_crf
def test_torch_crf_agrees_with_pydensecrf_on_a_500_px_voc_photo():
    image, labels, n_labels = read_photo(VOC / PHOTO_500[0], VOC / PHOTO_500[1])
    assert image.shape[:2] == (375, 500)
    assert_agrees_with_pydensecrf(image, labels, n_labels, seed=0)


@needs_crf
@pytest.mark.parametrize(
    "name",
    [pytest.param(name, marks=[] if name in QUICK_513 else [pytest.mark.slow]) for name in VAL_513] or ["missing"],
)
def test_torch_crf_agrees_with_pydensecrf_on_513_px_voc_photos(name):
    image, labels, n_labels = read_photo(
        VOC / "val513" / "images" / f"{name}_image.png", VOC / "val513" / "masks" / f"{name}.png"
    )
    assert image.shape[:2] == (513, 513)  # 513 * 513 is odd: pydensecrf's padding points take part
    assert_agrees_with_pydensecrf(image, labels, n_labels, seed=int(name))


def synthetic_scene(height: int, width: int, n_labels: int, seed: int, gray: bool = False):
    """Random rectangles of random colours on a noisy background; their labels."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 40, (height, width, 3)).astype(np.int64)
    labels = np.zeros((height, width), np.int64)
    for k in range(1, n_labels):
        y, x = rng.integers(0, height, 2), rng.integers(0, width, 2)
        image[min(y) : max(y) + 1, min(x) : max(x) + 1] += rng.integers(40, 200, 3)
        labels[min(y) : max(y) + 1, min(x) : max(x) + 1] = k
    image = np.clip(image, 0, 255).astype(np.uint8)
    if gray:
        image = image.mean(2).astype(np.uint8)
    return image, labels, rng


@needs_crf
@pytest.mark.parametrize(
    "height, width, n_labels, gray",
    [(64, 80, 3, False), (31, 17, 21, False), (45, 53, 5, True), (1, 1, 2, False), (1, 9, 3, False)],
)
def test_torch_crf_agrees_with_pydensecrf_on_synthetic_images(height, width, n_labels, gray):
    image, labels, rng = synthetic_scene(height, width, n_labels, seed=height * width, gray=gray)
    noisy = np.where(rng.random(labels.shape) < 0.2, rng.integers(0, n_labels, labels.shape), labels)
    for params in (CrfParams(), CrfParams(bilateral_sxy=7, bilateral_srgb=13, gauss_sxy=2, iterations=5)):
        ours = crf_label(image, noisy, n_labels, params, backend="torch")
        np.testing.assert_array_equal(ours, crf_label(image, noisy, n_labels, params, backend="pydensecrf"))
        probs = soft_probs(noisy, n_labels, rng)
        ours, theirs = (crf_prob(image, probs, params, backend=backend) for backend in ("torch", "pydensecrf"))
        np.testing.assert_allclose(ours, theirs, atol=1e-4)


@needs_crf
def test_pydensecrf_padding_points_are_reproduced():
    """pydensecrf adds a weightless simplex at zero features when N is not a multiple of 4. With
    dark colours and a small colour range it touches the image's lattice points: without it the
    marginals here differ by 2e-3."""
    rng = np.random.default_rng(0)
    image = rng.integers(1, 40, (31, 17, 3), dtype=np.uint8)
    unary = rng.random((3, 31, 17)).astype(np.float32) * 3
    params = CrfParams(bilateral_sxy=2, bilateral_srgb=7, iterations=5)
    np.testing.assert_allclose(
        torch_marginals(image, [unary], params)[0], reference_marginals(image, unary, params), atol=1e-5
    )


# ---------------------------------------------------------------------------------------------
# Unaries, batching, the backend choice, contracts


@needs_crf
def test_label_unary_is_unary_from_labels_with_label_0_an_ordinary_label():
    import pydensecrf.utils as crf_utils

    labels = np.array([[0, 1, 2, 0], [2, 2, 1, 0]])
    ours = crf_torch.label_unary(torch.from_numpy(labels.reshape(1, -1)), 3, 0.7)[0].numpy()
    np.testing.assert_array_equal(ours, crf_utils.unary_from_labels(labels, 3, gt_prob=0.7, zero_unsure=False))
    assert ours[0, 0] == np.float32(-np.log(0.7))  # label 0 is certain, not "unsure"
    probs = np.random.default_rng(0).random((3, 4, 5)).astype(np.float32) * 1.2
    np.testing.assert_allclose(
        crf_torch.prob_unary(torch.from_numpy(probs)).numpy(),
        crf_utils.unary_from_softmax(probs).reshape(probs.shape),
        rtol=1e-6,
    )


def test_several_label_maps_in_one_batch_equal_one_at_a_time():
    image, labels, rng = synthetic_scene(40, 56, 4, seed=1)
    maps = [labels, np.where(rng.random(labels.shape) < 0.3, 0, labels), np.roll(labels, 5, axis=1)]
    batched = crf_labels(image, maps, 4, backend="torch")
    assert len(batched) == 3
    for label_map, out in zip(maps, batched):
        assert out.dtype == np.int64 and out.shape == labels.shape
        np.testing.assert_array_equal(out, crf_label(image, label_map, 4, backend="torch"))
    assert crf_labels(image, [], 4, backend="torch") == []


def test_torch_backend_snaps_an_overgrown_label_to_the_image_edge():
    image = np.zeros((40, 40, 3), np.uint8)
    image[10:30, 10:30] = 255
    labels = np.zeros((40, 40), np.int64)
    labels[8:32, 8:32] = 1
    np.testing.assert_array_equal(crf_label(image, labels, 2, backend="torch"), image[..., 0] > 0)
    np.testing.assert_array_equal(
        crf_label(image[..., 0], labels, 2, backend="torch"), crf_label(image, labels, 2, backend="torch")
    )  # grayscale


def test_one_label_probability_crf_is_certain():
    image, _, _ = synthetic_scene(9, 7, 3, seed=2)
    np.testing.assert_allclose(crf_prob(image, np.full((1, 9, 7), 0.3, np.float32), backend="torch"), 1.0)


def test_backend_resolution():
    assert resolve_backend("auto", None) == "pydensecrf"
    assert resolve_backend("auto", "cpu") == "pydensecrf"
    assert resolve_backend("auto", torch.device("cpu")) == "pydensecrf"
    assert resolve_backend("auto", "cuda") == "torch"
    assert resolve_backend("auto", torch.device("cuda", 1)) == "torch"
    assert resolve_backend("torch", "cpu") == "torch"
    assert resolve_backend("pydensecrf", "cuda:0") == "pydensecrf"
    image = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown CRF backend 'gpu'.*auto, pydensecrf, torch"):
        crf_label(image, np.zeros((4, 4), int), 2, backend="gpu")


@pytest.mark.parametrize("backend", ["torch", pytest.param("pydensecrf", marks=needs_crf)])
def test_input_errors_are_the_same_on_both_backends(backend):
    image = np.zeros((6, 5, 3), np.uint8)
    labels = np.zeros((6, 5), int)
    with pytest.raises(ValueError, match="uint8"):
        crf_label(image.astype(np.float32), labels, 2, backend=backend)
    with pytest.raises(ValueError, match="differ in size"):
        crf_labels(image, [labels, labels[:-1]], 2, backend=backend)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        crf_label(image, labels - 1, 2, backend=backend)
    with pytest.raises(ValueError, match="at least 2 labels"):
        crf_label(image, labels, 1, backend=backend)
    with pytest.raises(ValueError, match="non-empty"):
        crf_label(image[:0], labels[:0], 2, backend=backend)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        crf_prob(image, np.ones((2, 5, 5), np.float32), backend=backend)
    with pytest.raises(ValueError, match=r"C >= 1"):
        crf_prob(image, np.ones((0, 6, 5), np.float32), backend=backend)


def test_torch_backend_runs_without_pydensecrf(monkeypatch):
    image, labels, _ = synthetic_scene(12, 10, 3, seed=3)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)  # makes the import fail
    assert crf_label(image, labels, 3, backend="torch").shape == labels.shape
    with pytest.raises(CrfUnavailable):
        crf_label(image, labels, 3, backend="auto")  # auto on the CPU is pydensecrf


def test_crf_module_imports_neither_torch_nor_pydensecrf():
    """The CRF worker processes import stages.common.crf; torch there would cost seconds each."""
    code = "import sys, stages.common.crf; print('torch' in sys.modules, 'pydensecrf' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.split() == ["False", "False"]
