"""Seeds: IRNet's rule on a hand-built CAM (known answers), the empty case, and a CRF sanity check."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from scipy import ndimage

from stages.common.crf import CrfParams
from stages.irn.seeds import IGNORE, make_seeds


def hand_built_cams() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two CAMs on a 6x8 grid for classes 0 and 2 (seed labels 1 and 3) and the expected seeds.

    Row by row: strong (> 0.30) -> the class, weak (0.05 < cam <= 0.30) -> ignored,
    faint (<= 0.05) -> background. Thresholds are inclusive on the background side.
    """
    cam_a = np.array(
        [
            [0.9, 0.9, 0.31, 0.30, 0.2, 0.06, 0.05, 0.0],
            [0.9, 0.9, 0.31, 0.30, 0.2, 0.06, 0.05, 0.0],
            [0.0, 0.0, 0.00, 0.00, 0.0, 0.00, 0.00, 0.0],
            [0.0, 0.0, 0.00, 0.00, 0.0, 0.00, 0.00, 0.0],
            [0.5, 0.5, 0.00, 0.00, 0.0, 0.00, 0.00, 0.0],
            [0.0, 0.0, 0.00, 0.00, 0.0, 0.00, 0.00, 0.0],
        ],
        dtype=np.float32,
    )
    cam_b = np.array(
        [
            [0.0, 0.0, 0.00, 0.00, 0.0, 0.00, 0.00, 0.0],
            [0.0, 0.0, 0.00, 0.00, 0.0, 0.00, 0.00, 0.0],
            [0.0, 0.0, 0.00, 0.00, 0.0, 0.00, 0.00, 0.0],
            [0.8, 0.1, 0.04, 0.00, 0.0, 0.00, 0.00, 0.0],
            [0.6, 0.4, 0.00, 0.00, 0.0, 0.00, 0.00, 0.0],  # overlaps cam_a (0.5): the larger wins
            [0.0, 0.0, 0.00, 0.00, 0.0, 0.00, 0.00, 0.1],
        ],
        dtype=np.float32,
    )
    expected = np.array(
        [
            [1, 1, 1, 255, 255, 255, 0, 0],
            [1, 1, 1, 255, 255, 255, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
            [3, 255, 0, 0, 0, 0, 0, 0],
            [3, 1, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 255],
        ],
        dtype=np.uint8,
    )
    return np.stack([cam_a, cam_b]), np.array([0, 2]), expected


def test_seeds_follow_irnets_rule_on_a_hand_built_cam():
    cams, keys, expected = hand_built_cams()
    seeds = make_seeds(cams, keys, image_rgb=None, crf=None)
    assert seeds.dtype == np.uint8 and seeds.shape == expected.shape
    np.testing.assert_array_equal(seeds, expected)


def test_thresholds_move_the_bands():
    cams, keys, _ = hand_built_cams()
    seeds = make_seeds(cams, keys, image_rgb=None, fg_threshold=0.55, bg_threshold=0.0, crf=None)
    assert seeds[0, 0] == 1 and seeds[4, 0] == 3  # 0.9 and 0.6 stay foreground
    assert seeds[4, 1] == IGNORE and seeds[0, 2] == IGNORE  # 0.4 and 0.31 are now weak
    assert seeds[2, 0] == 0  # cam exactly 0 is background even at bg_threshold 0


def test_an_image_without_labelled_class_is_all_background():
    seeds = make_seeds(np.zeros((0, 5, 7), np.float32), np.zeros(0, int), image_rgb=None)
    assert seeds.shape == (5, 7) and seeds.dtype == np.uint8 and not seeds.any()


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="len\\(keys\\)"):
        make_seeds(np.zeros((2, 5, 5), np.float32), np.array([0]), image_rgb=None, crf=None)
    with pytest.raises(ValueError, match="class indices"):
        make_seeds(np.zeros((1, 5, 5), np.float32), np.array([-1]), image_rgb=None, crf=None)


@pytest.mark.skipif(importlib.util.find_spec("pydensecrf") is None, reason="pydensecrf2 is not installed")
def test_seeds_with_crf_snap_to_the_object():
    """A gray square on black, its CAM blurred past the edges: the CRF-ed seeds keep the square
    as class 4 (key 3), mark the far background 0, and never put the class outside the square."""
    size, lo, hi = 48, 14, 34
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[lo:hi, lo:hi] = 180
    square = image[..., 0] > 0
    cam = ndimage.gaussian_filter(square.astype(np.float32), 3)
    cam /= cam.max()
    seeds = make_seeds(cam[None], np.array([3]), image, crf=CrfParams())
    assert set(np.unique(seeds)) <= {0, 4, IGNORE}
    assert not (seeds[~square] == 4).any()
    assert (seeds[square] == 4).mean() > 0.9
    assert (seeds[:4, :4] == 0).all() and (seeds[-4:, -4:] == 0).all()


def seed_scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An image with two coloured boxes on noise and their CAMs (classes 1 and 6), blurred past
    the boxes' edges so that the CRF has edges to snap to."""
    rng = np.random.default_rng(seed)
    height, width = 72, 96
    image = rng.integers(0, 40, (height, width, 3)).astype(np.int64)
    cams = np.zeros((2, height, width), np.float32)
    for plane, (y0, y1, x0, x1) in enumerate([(8, 40, 10, 50), (30, 66, 45, 90)]):
        image[y0:y1, x0:x1] += rng.integers(60, 200, 3)
        cams[plane, y0:y1, x0:x1] = 1.0
        cams[plane] = ndimage.gaussian_filter(cams[plane], 4)
    cams /= cams.max(axis=(1, 2), keepdims=True)
    return np.clip(image, 0, 255).astype(np.uint8), cams, np.array([1, 6])


@pytest.mark.skipif(importlib.util.find_spec("pydensecrf") is None, reason="pydensecrf2 is not installed")
def test_pydensecrf_seeds_are_the_two_label_crfs_one_at_a_time():
    """With pydensecrf the seeds are bit for bit IRNet's rule written with numpy and one
    `crf_label` per threshold (the process-pool path keeps its results)."""
    from stages.common.crf import crf_label

    image, cams, keys = seed_scene()
    params = CrfParams(backend="pydensecrf")
    label_of = np.concatenate([[0], keys + 1])
    conf = []
    for threshold in (0.30, 0.05):
        index = np.concatenate([np.full((1, *cams.shape[1:]), threshold, np.float32), cams]).argmax(0)
        conf.append(label_of[crf_label(image, index, len(label_of), params)])
    expected = np.where(conf[0] == 0, np.where(conf[1] == 0, 0, IGNORE), conf[0]).astype(np.uint8)
    assert np.array_equal(make_seeds(cams, keys, image, crf=params), expected)
    assert np.array_equal(make_seeds(cams, keys, image, crf=CrfParams()), expected)  # auto on the CPU


@pytest.mark.skipif(importlib.util.find_spec("pydensecrf") is None, reason="pydensecrf2 is not installed")
def test_torch_crf_seeds_agree_with_pydensecrf_seeds():
    """The torch backend (both label maps on one lattice, here on the CPU) gives the seeds of
    pydensecrf on >= 99% of the pixels (the CRFs agree to float rounding)."""
    image, cams, keys = seed_scene(seed=3)
    reference = make_seeds(cams, keys, image, crf=CrfParams(backend="pydensecrf"))
    on_torch = make_seeds(cams, keys, image, crf=CrfParams(backend="torch"), device="cpu")
    assert {0, 2, 7} <= set(np.unique(reference))
    assert (on_torch == reference).mean() >= 0.99
