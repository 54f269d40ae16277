"""Time of `wss tune`'s stage-2 search (stages.tuning.stage2.walk_rows) on a config's cached
cam and irn artifacts, to set against one epoch of the irn stage on the same data.

    python bench/tune_walk.py -c CONFIG [-o KEY=VALUE ...] [--images 40] [--betas 3] [--exp-times 6,8]
        [--thresholds 10] [--crf] [--threads 1] [--rows FILE]

The first --images train images with a mask stand in for a tuning split (timing only: the scores
it prints choose nothing). The grid is --thresholds values of irn.sem_seg_bg_threshold x --betas
values of irn.beta (the config's beta halved, kept, doubled, ...) x the --exp-times values
(default: the config's irn.exp_times alone); --crf adds the CRF rows (three thresholds at the
best walk). One irn epoch: the `irn epoch k/N` progress bars of the run's log, or
bench/stage_irn.py. On a loaded CPU, --threads 1 keeps torch's threads from waiting on each other.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config  # noqa: E402
from pipeline.runner import Pipeline  # noqa: E402
from stages.common.runtime import resolve_device  # noqa: E402
from stages.tuning.stage2 import WalkGrid, tuning_cams, walk_rows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", action="append", required=True)
    parser.add_argument("-o", "--override", action="append", default=[])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--betas", type=int, default=3)
    parser.add_argument("--exp-times", default="", help="comma-separated irn.exp_times values (default: the config's)")
    parser.add_argument("--thresholds", type=int, default=10)
    parser.add_argument("--crf", action="store_true")
    parser.add_argument("--rows", type=Path, help="also write the search's rows to this JSON file")
    parser.add_argument("--threads", type=int, default=0, help="torch's CPU threads (0: its default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config([Path(c) for c in args.config], args.override)
    pipeline = Pipeline(cfg)
    dataset = pipeline.dataset
    ids = [i for i in dataset.split(cfg.data.train_split) if dataset.has_mask(i)][: args.images]
    device = resolve_device(cfg.run.device)
    cam_files, _ = tuning_cams(pipeline.require("cam"), dataset, ids, Path(tempfile.mkdtemp()), device, 0)
    betas = tuple(cfg.irn.beta * 2.0 ** (k - args.betas // 2) for k in range(args.betas))
    thresholds = tuple(round(0.05 + 0.9 * k / max(1, args.thresholds - 1), 4) for k in range(args.thresholds))
    exp_times = tuple(int(e) for e in args.exp_times.split(",")) if args.exp_times else (cfg.irn.exp_times,)
    grid = WalkGrid(betas, exp_times, thresholds, cfg.irn.walk_radius, cfg.irn.refine_crf_params if args.crf else None)
    timings: dict = {}
    started = time.perf_counter()
    rows = walk_rows(dataset, cam_files, pipeline.require("irn"), grid, device, timings)
    total = time.perf_counter() - started
    if args.rows:
        args.rows.write_text(json.dumps(rows, indent=1))
    print(
        json.dumps(
            {
                "images": len(cam_files),
                "grid": f"{len(thresholds)} thresholds x {len(betas)} betas x exp_times {list(exp_times)}"
                + (" + CRF" if args.crf else ""),
                "rows": len(rows),
                "seconds": round(total, 2),
                "walk_seconds": round(timings.get("walk_seconds", 0.0), 2),
                "crf_seconds": round(timings.get("crf_seconds", 0.0), 2),
                "device": str(device),
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
