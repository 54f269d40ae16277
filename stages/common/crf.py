"""Fully connected CRF (Krähenbühl & Koltun) over `pydensecrf`, as IRNet uses it.

Two entry points: `crf_label` snaps a hard label map to image edges (IRNet's
``crf_inference_label``, used for the seeds) and `crf_prob` refines class probabilities
(used for optional pseudo-label refinement). `pydensecrf` (pip package ``pydensecrf2``) is a
compiled extension that some installs lack, so it is imported only when a CRF is run and its
absence is a clear user error, not an ImportError at import time of the whole stage.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.errors import WssError

INSTALL_HINT = "pip install pydensecrf2==1.1"


class CrfUnavailable(WssError):
    """The dense CRF was asked for but `pydensecrf` is not installed."""


@dataclass(frozen=True)
class CrfParams:
    """CRF settings (also the `irn.crf` config section); the defaults are IRNet's seed CRF,
    written as floats so that a file or `-o` giving the default (read as a float) keeps the cache key."""

    gt_prob: float = 0.7
    gauss_sxy: float = 3.0
    gauss_compat: float = 3.0
    bilateral_sxy: float = 50.0
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 10.0
    iterations: int = 10


def _densecrf():
    """Import pydensecrf lazily; a missing install becomes a one-line user error."""
    try:
        import pydensecrf.densecrf as dcrf
        import pydensecrf.utils as crf_utils
    except ImportError as error:
        raise CrfUnavailable(f"the dense CRF needs pydensecrf ({error}); install it with: {INSTALL_HINT}") from None
    return dcrf, crf_utils


def _crf_image(image: np.ndarray) -> np.ndarray:
    """The image as the C-contiguous uint8 HxWx3 array the bilateral kernel requires.

    Grayscale images (HxW or HxWx1, e.g. X-rays) are repeated to three channels.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"the CRF needs a uint8 image, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"the CRF needs an HxWx3 image, got shape {image.shape}")
    return np.ascontiguousarray(image)


def _run(image: np.ndarray, unary: np.ndarray, n_labels: int, params: CrfParams) -> np.ndarray:
    """Mean-field inference with IRNet's two kernels; returns Q as (n_labels, H, W) float32."""
    dcrf, _ = _densecrf()
    height, width = image.shape[:2]
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=image,
                             compat=params.bilateral_compat)
    q = crf.inference(params.iterations)
    return np.asarray(q, dtype=np.float32).reshape(n_labels, height, width)


def crf_label(image_rgb: np.ndarray, labels: np.ndarray, n_labels: int,
              params: CrfParams = CrfParams()) -> np.ndarray:
    """Refine a hard label map (values in [0, n_labels)) along image edges; returns int64 HxW labels.

    Unary: probability ``gt_prob`` for the given label, the rest shared by the other labels;
    label 0 is an ordinary label (``zero_unsure=False``), as in IRNet's ``crf_inference_label``.
    """
    image = _crf_image(image_rgb)
    labels = np.asarray(labels)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels {labels.shape} and image {image.shape[:2]} differ in size")
    if n_labels < 2:
        raise ValueError(f"the label CRF needs at least 2 labels, got {n_labels}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_labels):
        raise ValueError(f"labels must lie in [0, {n_labels}), got [{labels.min()}, {labels.max()}]")
    _, crf_utils = _densecrf()
    unary = crf_utils.unary_from_labels(labels.astype(np.int64), n_labels, gt_prob=params.gt_prob,
                                        zero_unsure=False)
    return _run(image, unary, n_labels, params).argmax(axis=0)


def crf_prob(image_rgb: np.ndarray, probs: np.ndarray, params: CrfParams = CrfParams()) -> np.ndarray:
    """Refine class probabilities (C, H, W); returns the CRF marginals (C, H, W) float32.

    Unary = -log(p) with p clipped at 1e-5 (``gt_prob`` is not used here).
    """
    image = _crf_image(image_rgb)
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs must be (C, H, W) with H, W = {image.shape[:2]}, got {probs.shape}")
    unary = -np.log(np.clip(probs, 1e-5, 1.0)).reshape(probs.shape[0], -1)
    return _run(image, unary, probs.shape[0], params)
