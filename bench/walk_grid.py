"""Time of a walk search's grid on one image: `random_walk` once per (beta, exp_times) against
`random_walk_many` (the beta-free tables once, one walk per beta to the largest exp_times).

    python bench/walk_grid.py [--device cpu|cuda] [--size 32] [--classes 2] [--radius 5]
        [--betas 5,10,20] [--exp-times 6] [--repeats 5] [--threads 1]

Random CAMs and boundary map on a --size x --size grid (stride 4: 32 is a 128 px image).
Seconds as [median, fastest] of --repeats runs after one warm-up (CUDA synchronised), the two
ways alternating; it also checks that both give the same tensors bit for bit. On a loaded CPU,
--threads 1 keeps torch's threads from waiting on each other.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import call_seconds  # noqa: E402
from stages.irn.random_walk import random_walk, random_walk_many  # noqa: E402


def timed(fns: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """{name: (median, fastest) seconds of `repeats` calls} after one warm-up call each; the
    calls alternate between the functions, so that a shared machine's load falls on all alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(call_seconds(fn, device))
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--radius", type=int, default=5)
    parser.add_argument("--betas", default="5,10,20")
    parser.add_argument("--exp-times", default="6")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch's CPU threads (0: its default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    betas = [float(b) for b in args.betas.split(",")]
    exp_times = [int(e) for e in args.exp_times.split(",")]
    generator = torch.Generator().manual_seed(0)
    cams = torch.rand(args.classes, args.size, args.size, generator=generator).to(device)
    edge = (torch.rand(args.size, args.size, generator=generator) ** 3).to(device)

    def one_by_one() -> dict:
        return {(b, e): random_walk(cams, edge, args.radius, b, e) for b in betas for e in exp_times}

    def shared() -> dict:
        return random_walk_many(cams, edge, args.radius, betas, exp_times)

    alone, together = one_by_one(), shared()
    same = all(torch.equal(alone[key], together[key]) for key in alone)
    seconds = timed({"one_by_one": one_by_one, "shared": shared}, device, args.repeats)
    print(
        json.dumps(
            {
                "grid": f"{args.size}x{args.size}, {args.classes} classes, betas {betas}, exp_times {exp_times}",
                "device": str(device),
                "threads": torch.get_num_threads(),
                "one_by_one_s": [round(t, 4) for t in seconds["one_by_one"]],
                "shared_s": [round(t, 4) for t in seconds["shared"]],
                "speedup_median": round(seconds["one_by_one"][0] / seconds["shared"][0], 2),
                "speedup_fastest": round(seconds["one_by_one"][1] / seconds["shared"][1], 2),
                "bit_identical": same,
            }
        )
    )


if __name__ == "__main__":
    main()
