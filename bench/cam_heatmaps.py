"""Score a trained cam artifact's maps under each heatmap its method could be drawn with.

Which map of a network is "the CAM" is a choice: PCAM's probability map or its logit map,
PYLON's logit map or its sigmoid. Both of each pair rank the positions alike in exact
arithmetic, but a sigmoid saturates (1.0 in float32 above a logit of ~17, and the CAM files'
float16 holds no value between 0.9995 and 1), so ties at the maximum put the peak on the first
tied cell. This script re-makes the maps of one trained model (no training) with each heatmap,
at the artifact's scales and flip, through the cam stage's own writer and scorer (float16 files in
a temporary folder), and prints per heatmap: the point accuracy on the masks, the CAM mIoU at
the artifact's `eval_bg_threshold`, and the mean number of cells tied at each map's maximum.

Score it on a split you are not reporting on (a development set), not on the figures you publish.

    python bench/cam_heatmaps.py runs/dev/synthetic/cam-1a2b3c4d5e6f [--split train] [--n 150] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.layout import PreparedDataset  # noqa: E402
from stages.cam.classifier import load_cam_net  # noqa: E402
from stages.cam.infer import load_cam, write_cam_files  # noqa: E402
from stages.cam.scoring import score_cams  # noqa: E402


def heatmaps(net, method: str) -> dict:
    """{name: x -> (B, C, h, w) maps}: the method's own heatmap first, then its alternatives."""
    maps = {"own": net.cam_maps}
    if method == "pcam":
        maps["probability"] = lambda x: net.probability_map(net.features(x))
    if method == "pylon":
        maps["sigmoid"] = lambda x: torch.sigmoid(net.head(net.features(x)))
    return maps


def score(net, cfg, dataset: PreparedDataset, ids: list[str], cam_dir: Path, device: torch.device) -> dict:
    """The maps of `ids` written by the cam stage's own writer into `cam_dir` (float16, as
    stored), scored as the cam stage scores them, and the cells tied at each map's maximum."""
    write_cam_files(net, cfg, dataset, ids, cam_dir, device, workers=0, leave=False)
    metrics = score_cams(dataset, ids, cam_dir, cfg.eval_bg_threshold, points=True)
    ties = []
    for image_id in ids:
        cam = load_cam(cam_dir / f"{image_id}.npz")[0]
        ties += [int((c == c.max()).sum()) for c in cam if c.max() > 0]
    return {
        "point_acc": metrics.get("cam_mask_point_accuracy", float("nan")),
        "cam_miou": metrics["cam_miou"],
        "tied_at_max": float(np.mean(ties)) if ties else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, help="a cam artifact folder (runs/<dataset>/cam-<key>)")
    parser.add_argument("--data", type=Path, help="the prepared dataset (default: the artifact's own)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--n", type=int, default=150, help="the first N images of the split")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    net, cfg, _ = load_cam_net(args.artifact, device)
    root = args.data or Path(json.loads((args.artifact / "manifest.json").read_text())["dataset_root"])
    dataset = PreparedDataset(root)
    ids = dataset.split(args.split)[: args.n]
    print(f"{args.artifact} ({cfg.method}), {len(ids)} {args.split} images of {root}")
    print(f"{'heatmap':<12} {'point_acc':>9} {'cam_miou':>9} {'tied_at_max':>11}")
    with tempfile.TemporaryDirectory() as scratch:
        for name, maps in heatmaps(net, cfg.method).items():
            net.cam_maps = maps
            result = score(net, cfg, dataset, ids, Path(scratch) / name, device)
            print(f"{name:<12} {result['point_acc']:>9.3f} {result['cam_miou']:>9.3f} {result['tied_at_max']:>11.1f}")


if __name__ == "__main__":
    main()
