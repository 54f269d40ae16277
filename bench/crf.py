"""Dense CRF speed: the torch backend against pydensecrf2 on one core and on all cores.

    python bench/crf.py [--device cpu|cuda] [--size 512] [--labels 3,21] [--iterations 10]
                        [--repeats 5] [--workers N] [--threads N]

One --size x --size photo (a VOC val513 photo cropped, when ../shared/samples has one, else a
synthetic scene: the lattice's size depends on the image), IRNet's seed CRF parameters with
--iterations. For each label count:
- pydensecrf, 1 core: one label CRF in this process (median of --repeats after a warm-up);
- pydensecrf, all cores: --workers processes (default: every core) each running whole CRFs,
  2 x --workers images per measurement after a warm-up; the figure is wall time / images;
- torch on --device: one label CRF through `stages.common.crf.crf_label` (lattices built, mean
  field, arg-max, the copy back), with the lattice build alone and the peak CUDA memory;
- seed pass: IRNet's two label CRFs of one image (foreground and background seeds), pydensecrf
  twice on one core against `crf_labels` (torch: one lattice, one batched mean field).
Times are per image, CUDA synchronised. The torch figures on a CPU use torch's threads
(printed; --threads sets them); pydensecrf has one thread per process.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import median_seconds  # noqa: E402
from stages.common import crf_torch  # noqa: E402
from stages.common.crf import CrfParams, crf_label, crf_labels  # noqa: E402

VAL_513 = Path(__file__).resolve().parents[2] / "shared" / "samples" / "voc" / "val513" / "images" / "0_image.png"


def bench_image(size: int) -> tuple[np.ndarray, str]:
    """A real photo cropped (or tiled) to size x size when the samples are there, else a synthetic scene."""
    if VAL_513.exists():
        from PIL import Image

        photo = np.array(Image.open(VAL_513).convert("RGB"))
        reps = (-(-size // photo.shape[0]), -(-size // photo.shape[1]), 1)
        return np.ascontiguousarray(np.tile(photo, reps)[:size, :size]), f"{VAL_513.name} (cropped/tiled)"
    rng = np.random.default_rng(0)
    image = rng.integers(0, 40, (size, size, 3))
    for _ in range(12):
        y, x = np.sort(rng.integers(0, size, 2)), np.sort(rng.integers(0, size, 2))
        image[y[0] : y[1], x[0] : x[1]] += rng.integers(40, 200, 3)
    return np.clip(image, 0, 255).astype(np.uint8), "synthetic scene"


def label_maps(size: int, n_labels: int, count: int) -> list[np.ndarray]:
    """Blob-like label maps (arg-max of smooth random fields), like thresholded CAMs."""
    generator = torch.Generator().manual_seed(n_labels)
    fields = torch.rand(count, n_labels, size // 16 + 1, size // 16 + 1, generator=generator)
    fields = torch.nn.functional.interpolate(fields, size=(size, size), mode="bilinear", align_corners=False)
    return list(fields.argmax(dim=1).numpy())


def pydensecrf_job(image: np.ndarray, labels: np.ndarray, n_labels: int, iterations: int) -> None:
    crf_label(image, labels, n_labels, CrfParams(iterations=iterations), backend="pydensecrf")


def one_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"


def pool_seconds(image, labels, n_labels, iterations, workers: int) -> float:
    """Per-image wall time of `workers` processes running whole CRFs, after each has run one."""
    with multiprocessing.get_context("spawn").Pool(workers, initializer=one_thread) as pool:
        job = (image, labels, n_labels, iterations)
        pool.starmap(pydensecrf_job, [job] * workers)
        started = time.perf_counter()
        pool.starmap(pydensecrf_job, [job] * (2 * workers), chunksize=1)
        return (time.perf_counter() - started) / (2 * workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--labels", default="3,21", help="comma list of label counts")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="pydensecrf processes (0: skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but no CUDA GPU is available")
    image, source = bench_image(args.size)
    params = CrfParams(iterations=args.iterations)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} torch threads"
    print(
        f"dense CRF: {args.size}x{args.size} {source}, {args.iterations} iterations, IRNet's seed kernels; "
        f"torch {torch.__version__} on {args.device} ({where}); {os.cpu_count()} CPU cores, "
        f"pydensecrf pool of {args.workers}"
    )
    kernels = crf_torch.image_kernels(
        torch.from_numpy(image).to(device),
        params.gauss_sxy,
        params.gauss_compat,
        params.bilateral_sxy,
        params.bilateral_srgb,
        params.bilateral_compat,
    )
    print(
        f"lattice points: Gaussian {kernels[0].n_lattice}, bilateral {kernels[1].n_lattice} "
        f"for {args.size * args.size} pixels"
    )
    header = (
        f"{'labels':>6} | {'pyd 1 core ms':>13} {'pyd pool ms':>11} | {'torch ms':>9} {'build ms':>8} "
        f"{'peak MB':>8} | {'x 1 core':>8} {'x pool':>7} | {'seed pass: pyd ms':>17} {'torch ms':>9} {'x':>6}"
    )
    print(header)
    print("-" * len(header))
    for n_labels in [int(n) for n in args.labels.split(",")]:
        print(row(image, n_labels, params, device, args), flush=True)


def row(image: np.ndarray, n_labels: int, params: CrfParams, device: torch.device, args) -> str:
    """The table row of one label count."""
    fg, bg = label_maps(args.size, n_labels, 2)
    cpu = torch.device("cpu")
    one_core = median_seconds(lambda: pydensecrf_job(image, fg, n_labels, args.iterations), args.repeats, cpu)
    pool = pool_seconds(image, fg, n_labels, args.iterations, args.workers) if args.workers else float("nan")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ours = median_seconds(
        lambda: crf_label(image, fg, n_labels, params, backend="torch", device=device), args.repeats, device
    )
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    seed_pyd = median_seconds(
        lambda: crf_labels(image, [fg, bg], n_labels, params, backend="pydensecrf"), max(1, args.repeats // 2), cpu
    )
    seed_ours = median_seconds(
        lambda: crf_labels(image, [fg, bg], n_labels, params, backend="torch", device=device), args.repeats, device
    )
    build = median_seconds(
        lambda: crf_torch.image_kernels(
            torch.from_numpy(image).to(device),
            params.gauss_sxy,
            params.gauss_compat,
            params.bilateral_sxy,
            params.bilateral_srgb,
            params.bilateral_compat,
        ),
        args.repeats,
        device,
    )
    return (
        f"{n_labels:>6} | {one_core * 1e3:>13.1f} {pool * 1e3:>11.1f} | {ours * 1e3:>9.1f} {build * 1e3:>8.1f} "
        f"{peak:>8.0f} | {one_core / ours:>7.1f}x {pool / ours:>6.1f}x | {seed_pyd * 1e3:>17.1f} "
        f"{seed_ours * 1e3:>9.1f} {seed_pyd / seed_ours:>5.1f}x"
    )


if __name__ == "__main__":
    main()
