"""Time and peak memory of the sparse random walk against IRNet's dense formulation.

    python bench/random_walk.py [--device cpu|cuda] [--sizes 16,32,64,128] [--classes 21]

Each (method, grid) is measured in a fresh child process, so that one measurement's memory
cannot hide another's:
- time: median of --repeats runs after one warm-up run (CUDA synchronised), building the
  transition included; `build` is the sparse transition's construction alone;
- peak memory: on CUDA torch.cuda.max_memory_allocated; on CPU the growth of the process's
  peak resident set (VmHWM) over its resident set just before the work, after a warm-up
  on an 8x8 grid has paged in the library code (noise: a few MB). tracemalloc cannot see
  torch's allocations.
The dense walk needs three N x N matrices (N = H * W) and N^3 work per squaring: grids with
more than --dense-max-pixels pixels are skipped (default 4096 on CPU, where 64x64 takes
seconds and 128x128 would take hours; 16384 on CUDA).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import median_seconds  # noqa: E402
from stages.irn import walk_kernel  # noqa: E402
from stages.irn.random_walk import random_walk, random_walk_dense, transition_csr, transition_stencil  # noqa: E402


def resident_bytes(field: str = "VmRSS") -> int:
    """VmRSS (now) or VmHWM (peak) of this process. Not ru_maxrss: Linux carries that over from
    the parent across fork and exec, so a child would report the bench driver's size."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_one(method: str, size: int, args: argparse.Namespace) -> dict:
    """Runs in the child process: one method on one grid; returns seconds and peak bytes."""
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(size)
    cams = torch.rand(args.classes, size, size, generator=generator).to(device)
    edge = (torch.rand(size, size, generator=generator) ** 3).to(device)
    walk = random_walk if method == "sparse" else random_walk_dense
    run = lambda: walk(cams, edge, radius=args.radius, beta=args.beta, exp_times=args.exp_times)  # noqa: E731
    # page in the code (MKL; on CUDA the context and the compiled Triton kernel) on a tiny grid,
    # so that they do not count as memory
    walk(cams[:, :8, :8].contiguous(), edge[:8, :8].contiguous(), radius=args.radius, beta=args.beta, exp_times=1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = resident_bytes()
    seconds = median_seconds(run, args.repeats if method == "sparse" else max(1, args.repeats // 3), device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = resident_bytes("VmHWM") - before
    result = {"seconds": seconds, "peak_bytes": max(peak, 0)}
    if method == "sparse":
        build = transition_stencil if walk_kernel.available(device) else lambda *a: transition_csr(*a, transpose=True)
        result["build_seconds"] = median_seconds(lambda: build(edge, args.radius, args.beta), args.repeats, device)
    return result


def measure_in_child(method: str, size: int, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        __file__,
        "--one",
        method,
        str(size),
        "--device",
        args.device,
        "--classes",
        str(args.classes),
        "--radius",
        str(args.radius),
        "--beta",
        str(args.beta),
        "--exp-times",
        str(args.exp_times),
        "--repeats",
        str(args.repeats),
    ]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def agreement(size: int, args: argparse.Namespace) -> float:
    """Relative error of the sparse walk against the dense one (float32, on the bench device)."""
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(size)
    cams = torch.rand(args.classes, size, size, generator=generator).to(device)
    edge = (torch.rand(size, size, generator=generator) ** 3).to(device)
    options = dict(radius=args.radius, beta=args.beta, exp_times=args.exp_times)
    sparse, dense = random_walk(cams, edge, **options), random_walk_dense(cams, edge, **options)
    return float((sparse - dense).norm() / dense.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="16,32,64,128", help="square grid sides at stride 4")
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--radius", type=int, default=5)
    parser.add_argument("--beta", type=float, default=10.0)
    parser.add_argument("--exp-times", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--dense-max-pixels",
        type=int,
        default=None,
        help="skip the dense walk above this many pixels (default 4096 on CPU, 16384 on CUDA)",
    )
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]), args)))
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but no CUDA GPU is available")
    dense_limit = args.dense_max_pixels or (16384 if args.device.startswith("cuda") else 4096)
    threads = f", {torch.get_num_threads()} threads" if args.device == "cpu" else f", {torch.cuda.get_device_name()}"
    path = "Triton stencil kernel" if walk_kernel.available(torch.device(args.device)) else "CSR torch.sparse.mm"
    print(
        f"random walk: {args.classes} classes, radius {args.radius}, beta {args.beta:g}, "
        f"{2**args.exp_times} steps; device {args.device}{threads}; torch {torch.__version__}; "
        f"sparse walk: {path}"
    )
    header = (
        f"{'grid':>8} {'sparse s':>10} {'build s':>9} {'sparse MB':>10} {'dense s':>9} {'dense MB':>9} "
        f"{'speed-up':>9} {'rel err':>9}"
    )
    print(header)
    print("-" * len(header))
    for size in [int(s) for s in args.sizes.split(",")]:
        sparse = measure_in_child("sparse", size, args)
        row = (
            f"{size:>3}x{size:<4} {sparse['seconds']:>10.4f} {sparse['build_seconds']:>9.4f} "
            f"{sparse['peak_bytes'] / 2**20:>10.1f}"
        )
        if size * size <= dense_limit:
            dense = measure_in_child("dense", size, args)
            row += (
                f" {dense['seconds']:>9.3f} {dense['peak_bytes'] / 2**20:>9.1f} "
                f"{dense['seconds'] / sparse['seconds']:>8.1f}x {agreement(size, args):>9.1e}"
            )
        else:
            row += f" {'skipped: N > ' + str(dense_limit) + ' (--dense-max-pixels)':>40}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
