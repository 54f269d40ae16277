"""Fully connected CRF (Krähenbühl & Koltun), as IRNet uses it, on one of two backends.

Three entry points: `crf_label` snaps a hard label map to image edges (IRNet's
``crf_inference_label``, used for the seeds), `crf_labels` does so for several label maps of
one image at once (the seed pass's two maps: one lattice, one batched mean field on the torch
backend) and `crf_prob` refines class probabilities (optional pseudo-label refinement).

Backends (`CrfParams.backend`, or the `backend=` argument): ``pydensecrf`` (pip package
``pydensecrf2``, a compiled extension on the CPU) and ``torch`` (`stages.common.crf_torch`: the
same model and the same lattice in plain PyTorch, on any torch device); ``auto`` is torch on a
CUDA device and pydensecrf elsewhere (`resolve_backend`). Both are imported only when a CRF
runs: this module stays free of torch (the CRF worker processes import it) and a missing
pydensecrf is a clear user error, not an ImportError at import time of the whole stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import ConfigDict, Field

from data.errors import WssError
from stages.common.settings import Float, Section

INSTALL_HINT = "pip install pydensecrf2==1.1"
BACKENDS = ("auto", "pydensecrf", "torch")


class CrfUnavailable(WssError):
    """The dense CRF was asked for but `pydensecrf` is not installed."""


class CrfParams(Section):
    """CRF settings (also the `irn.crf` and `irn.refine_crf_params` config sections); the defaults
    are IRNet's seed CRF, written as floats so that a file or `-o` giving the default (read as a
    float) keeps the cache key. Frozen: one value, shared and hashable."""

    model_config = ConfigDict(frozen=True)

    gt_prob: Float = Field(
        0.7,
        gt=0,
        le=0.99,
        description="The label CRF's confidence in the labels it is given (the seeds' CRF; `refine_crf` reads none).",
    )
    gauss_sxy: Float = Field(3.0, gt=0, description="Spatial width of the smoothness kernel, in pixels.")
    gauss_compat: Float = Field(3.0, ge=0, description="Weight of the smoothness kernel.")
    bilateral_sxy: Float = Field(50.0, gt=0, description="Spatial width of the appearance kernel, in pixels.")
    bilateral_srgb: Float = Field(5.0, gt=0, description="Colour width of the appearance kernel.")
    bilateral_compat: Float = Field(10.0, ge=0, description="Weight of the appearance kernel.")
    iterations: int = Field(10, ge=1, description="Mean-field iterations.")
    backend: Literal["auto", "pydensecrf", "torch"] = Field(
        "auto",
        description="Where the CRF runs: `pydensecrf` (the compiled extension, in CPU worker processes), `torch` "
        "(the same model in PyTorch, on `run.device`) or `auto`: torch on a CUDA device, "
        "pydensecrf elsewhere. The cache key holds the backend `auto` resolves to (the two agree to float "
        "rounding, not bit for bit). On torch, the pass that uses this CRF (seeds, or pseudo-labels) runs on "
        "the device from the CAM file to the label PNG; on pydensecrf, image by image with CRF worker processes.",
    )


def resolve_backend(backend: str = "auto", device=None) -> str:
    """The backend that runs: "pydensecrf" or "torch". `device` (a torch device or its name,
    None = the CPU) is where the torch backend runs; "auto" takes torch on a CUDA device only,
    so the CPU default stays pydensecrf."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown CRF backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    return "torch" if str(device or "cpu").split(":")[0] == "cuda" else "pydensecrf"


def kernel_args(params: CrfParams) -> dict:
    """The torch backend's keyword arguments: iterations and the two kernels' parameters."""
    return {
        "iterations": params.iterations,
        "gauss_sxy": params.gauss_sxy,
        "gauss_compat": params.gauss_compat,
        "bilateral_sxy": params.bilateral_sxy,
        "bilateral_srgb": params.bilateral_srgb,
        "bilateral_compat": params.bilateral_compat,
    }


def _densecrf():
    """Import pydensecrf lazily; a missing install becomes a one-line user error."""
    try:
        import pydensecrf.densecrf as dcrf
        import pydensecrf.utils as crf_utils
    except ImportError as error:
        raise CrfUnavailable(f"the dense CRF needs pydensecrf ({error}); install it with: {INSTALL_HINT}") from None
    return dcrf, crf_utils


def crf_image(image: np.ndarray) -> np.ndarray:
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
    if image.size == 0:
        raise ValueError(f"the CRF needs a non-empty image, got shape {image.shape}")
    return np.ascontiguousarray(image)


def _run(image: np.ndarray, unary: np.ndarray, n_labels: int, params: CrfParams) -> np.ndarray:
    """Mean-field inference with IRNet's two kernels; returns Q as (n_labels, H, W) float32."""
    dcrf, _ = _densecrf()
    height, width = image.shape[:2]
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=image, compat=params.bilateral_compat
    )
    q = crf.inference(params.iterations)
    return np.asarray(q, dtype=np.float32).reshape(n_labels, height, width)


def _check_labels(labels: np.ndarray, image: np.ndarray, n_labels: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels {labels.shape} and image {image.shape[:2]} differ in size")
    if n_labels < 2:
        raise ValueError(f"the label CRF needs at least 2 labels, got {n_labels}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_labels):
        raise ValueError(f"labels must lie in [0, {n_labels}), got [{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64)


def crf_labels(
    image_rgb: np.ndarray,
    label_maps: Sequence[np.ndarray],
    n_labels: int,
    params: CrfParams = CrfParams(),
    *,
    backend: str | None = None,
    device=None,
) -> list[np.ndarray]:
    """`crf_label` of several label maps of one image (the seed pass's foreground and background
    maps); the torch backend builds the image's lattices once and runs the maps as one batch."""
    image = crf_image(image_rgb)
    maps = [_check_labels(labels, image, n_labels) for labels in label_maps]
    if not maps:
        return []
    if resolve_backend(backend or params.backend, device) == "pydensecrf":
        _, crf_utils = _densecrf()
        return [
            _run(
                image,
                crf_utils.unary_from_labels(labels, n_labels, gt_prob=params.gt_prob, zero_unsure=False),
                n_labels,
                params,
            ).argmax(axis=0)
            for labels in maps
        ]
    import torch

    from stages.common import crf_torch

    out = crf_torch.label_crf(
        torch.from_numpy(image).to(device or "cpu"),
        torch.from_numpy(np.stack(maps)).to(device or "cpu"),
        n_labels,
        params.gt_prob,
        **kernel_args(params),
    )
    return list(out.cpu().numpy())


def crf_label(
    image_rgb: np.ndarray,
    labels: np.ndarray,
    n_labels: int,
    params: CrfParams = CrfParams(),
    *,
    backend: str | None = None,
    device=None,
) -> np.ndarray:
    """Refine a hard label map (values in [0, n_labels)) along image edges; returns int64 HxW labels.

    Unary: probability ``gt_prob`` for the given label, the rest shared by the other labels;
    label 0 is an ordinary label (``zero_unsure=False``), as in IRNet's ``crf_inference_label``.
    `backend` (default `params.backend`) and `device`: see `resolve_backend`.
    """
    return crf_labels(image_rgb, [labels], n_labels, params, backend=backend, device=device)[0]


def crf_prob(
    image_rgb: np.ndarray,
    probs: np.ndarray,
    params: CrfParams = CrfParams(),
    *,
    backend: str | None = None,
    device=None,
) -> np.ndarray:
    """Refine class probabilities (C, H, W); returns the CRF marginals (C, H, W) float32.

    Unary = -log(p) with p clipped at 1e-5 (``gt_prob`` is not used here). `backend` (default
    `params.backend`) and `device`: see `resolve_backend`.
    """
    image = crf_image(image_rgb)
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2] or probs.shape[0] == 0:
        raise ValueError(f"probs must be (C, H, W) with C >= 1 and H, W = {image.shape[:2]}, got {probs.shape}")
    if resolve_backend(backend or params.backend, device) == "pydensecrf":
        unary = -np.log(np.clip(probs, 1e-5, 1.0)).reshape(probs.shape[0], -1)
        return _run(image, unary, probs.shape[0], params)
    import torch

    from stages.common import crf_torch

    q = crf_torch.prob_crf(
        torch.from_numpy(image).to(device or "cpu"),
        torch.from_numpy(probs)[None].to(device or "cpu"),
        **kernel_args(params),
    )
    return q[0].cpu().numpy()
