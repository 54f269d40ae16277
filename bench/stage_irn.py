"""Stage-2 inference throughput: pseudo-label images/s for IRN forward + sparse walk + CRF.

    python bench/stage_irn.py [--device cpu|cuda] [--size 128] [--images 16] [--classes 2]
                              [--backbone resnet18] [--crf-workers 0,2]

Random-weight IRN and random CAMs (the speed does not depend on what was learned), images
from the synthetic generator. For each CRF worker count it runs the pseudo stage's own
per-image code (`PseudoLabelStage.walk_image` and `CrfPool`) over --images images after one
warm-up image and prints images/s, with the walk's share of the time; `none` = no CRF.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.common.crf import CrfParams  # noqa: E402
from stages.irn.crf_pool import CrfPool, planes_to_label  # noqa: E402


def run_once(stage, model, images, cam_paths, out: Path, workers: int | None, device, section) -> tuple[float, float]:
    walk_seconds: list[float] = []
    palette = [[0, 0, 0]] + [[255, 0, 0]] * 255
    started = time.perf_counter()
    with CrfPool(workers or 0) as pool:
        for i, (image, cam_path) in enumerate(zip(images, cam_paths)):
            planes, keys = stage.walk_image(model, image, cam_path, out / f"edge{i}.png", section, device, walk_seconds)
            if workers is None:
                from data.layout import write_index_png

                write_index_png(out / f"label{i}.png", planes_to_label(planes, keys), palette)
            else:
                pool.submit(str(i), image, planes, keys, CrfParams(), out / f"label{i}.png", palette)
        pool.finish()
    return time.perf_counter() - started, sum(walk_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--classes", type=int, default=2, help="labelled classes per image")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--crf-workers", default="none,0,2", help="comma list; none = no CRF refinement")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    spec = SyntheticSpec(n=args.images + 1, size=args.size)
    images = [np.repeat(generate_image(spec, i)[0][..., None], 3, axis=2) for i in range(args.images + 1)]
    model = BoundaryNet(ResNetFeatures(args.backbone)).to(device).eval()
    section = IrnConfig()
    stage = PseudoLabelStage()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        keys = list(range(args.classes))
        cam_paths = []
        for i, image in enumerate(images):
            cam = np.random.default_rng(i).random((args.classes, *strided_size(*image.shape[:2])), dtype=np.float32)
            cam_paths.append(tmp / f"cam{i}.npz")
            save_cam(cam_paths[-1], cam, keys, image.shape[:2])
        for text in args.crf_workers.split(","):
            workers = None if text == "none" else int(text)
            run_once(stage, model, images[:1], cam_paths[:1], tmp, workers, device, section)  # warm-up
            seconds, walk = run_once(stage, model, images[1:], cam_paths[1:], tmp, workers, device, section)
            rows.append(
                {
                    "crf_workers": text,
                    "images": args.images,
                    "seconds": seconds,
                    "images_per_s": args.images / seconds,
                    "walk_share": walk / seconds,
                }
            )
    print(
        f"pseudo-label inference, {args.size}x{args.size} images ({args.size // 4}x{args.size // 4} walk grid), "
        f"{args.classes} classes, {args.backbone}, device {device}, torch threads {torch.get_num_threads()}"
    )
    print(format_table(rows, ["crf_workers", "images", "seconds", "images_per_s", "walk_share"]))


if __name__ == "__main__":
    # The CRF workers are spawned and import this file again (as __mp_main__): torch and the
    # network are imported here only, so that they start as fast as under `wss` itself.
    import torch

    from data.synthetic import SyntheticSpec, generate_image
    from stages.cam.infer import save_cam, strided_size
    from stages.common.backbones import ResNetFeatures
    from stages.common.tables import format_table
    from stages.irn.config import IrnConfig
    from stages.irn.net import BoundaryNet
    from stages.irn.pseudo import PseudoLabelStage

    main()
