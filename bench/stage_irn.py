"""Stage-2 inference throughput: seeds and pseudo-labels per second, per path.

    python bench/stage_irn.py [--device cpu|cuda] [--size 128] [--images 16] [--classes 2]
                              [--backbone resnet18] [--crf-workers 0,2] [--loaders 2]

Random-weight IRN and random CAMs (the speed does not depend on what was learned), images from
the synthetic generator written as a prepared dataset with their CAM files. Rows:

- pseudo-labels, per-image path (what a CPU runs with pydensecrf): the stage's own per-image
  code (`PseudoLabelStage.walk_image` and `CrfPool`) for each CRF worker count; `none` = no CRF;
- pseudo-labels on the device (stages/irn/resident.py, what a GPU runs): without refinement and
  with the torch CRF, `--loaders` loader workers reading the CAM files and images;
- seeds, per-image path (pydensecrf in `--crf-workers` spawned processes, their start included)
  and on the device (both label CRFs on one lattice, torch), through `IrnStage.write_seeds`.

Each row is timed over --images images after one warm-up image; the walk's share of the time is
printed where the walk runs.
"""

from __future__ import annotations

import argparse
import os
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


def per_image_rows(stage, model, images, cam_paths, out: Path, device, section, crf_workers: str) -> list[dict]:
    rows = []
    for text in crf_workers.split(","):
        workers = None if text == "none" else int(text)
        run_once(stage, model, images[:1], cam_paths[:1], out, workers, device, section)  # warm-up
        seconds, walk = run_once(stage, model, images[1:], cam_paths[1:], out, workers, device, section)
        crf = "none" if workers is None else f"pydensecrf, {workers} workers"
        rows.append(row("pseudo-labels", "per image", crf, len(images) - 1, seconds, walk))
    return rows


def row(labels: str, path: str, crf: str, images: int, seconds: float, walk: float | None) -> dict:
    return {
        "labels": labels,
        "path": path,
        "crf": crf,
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "walk_share": "-" if walk is None else f"{walk / seconds:.2f}",
    }


def timed(run, warm_up, ids: list[str], device) -> float:
    run(ids[:1], warm_up)
    synchronize(device)
    started = time.perf_counter()
    run(ids[1:], None)
    synchronize(device)
    return time.perf_counter() - started


def device_rows(model, dataset, ids, cam_dir: Path, out: Path, device, section, loaders: int) -> list[dict]:
    rows = []
    for crf, refine in (("none", None), ("torch", CrfParams(backend="torch"))):
        walk: list[float] = []

        def run(batch, warm_up, refine=refine, walk=walk):
            folder = out / f"pseudo-{crf}-{'warm' if warm_up is not None else 'timed'}"
            (folder / "edges").mkdir(parents=True)
            failures, seconds = write_pseudo_labels_on_device(
                model, dataset, batch, cam_dir, folder, folder / "edges", section, refine, device, loaders
            )
            assert not failures, failures
            if warm_up is None:
                walk.extend(seconds)

        seconds = timed(run, True, ids, device)
        rows.append(row("pseudo-labels", "on device", crf, len(ids) - 1, seconds, sum(walk)))
    return rows


def seed_rows(dataset, ids, cam_dir: Path, out: Path, device, crf_workers: str) -> list[dict]:
    rows = []
    pool_workers = [int(text) for text in crf_workers.split(",") if text != "none"]
    runs = [(f"pydensecrf, {w} workers", "pydensecrf", w) for w in pool_workers] + [("torch", "torch", 0)]
    for crf, backend, workers in runs:
        section = IrnConfig(crf=CrfParams(backend=backend))

        def run(batch, warm_up, section=section, workers=workers, backend=backend):
            folder = out / f"seeds-{backend}-{workers}-{'warm' if warm_up is not None else 'timed'}"
            folder.mkdir(parents=True)
            failures = IrnStage().write_seeds(dataset, batch, cam_dir, folder, section, workers, device)
            assert not failures, failures

        seconds = timed(run, True, ids, device)
        path = "on device" if backend == "torch" else "per image"
        rows.append(row("seeds", path, crf, len(ids) - 1, seconds, None))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--classes", type=int, default=2, help="labelled classes per image")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--crf-workers", default="none,0,2", help="comma list; none = no CRF refinement")
    parser.add_argument("--loaders", type=int, default=2, help="loader workers of the on-device path")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = BoundaryNet(ResNetFeatures(args.backbone)).to(device).eval()
    section = IrnConfig()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset = PreparedDataset(write_synthetic(tmp / "data", SyntheticSpec(n=args.images + 1, size=args.size)))
        ids = sorted(dataset.split("train") + dataset.split("val"))[: args.images + 1]
        images = [dataset.read_image(i) for i in ids]
        keys = list(range(args.classes))
        cam_dir = tmp / "cams"
        cam_dir.mkdir()
        for i, (image_id, image) in enumerate(zip(ids, images)):
            cam = np.random.default_rng(i).random((args.classes, *strided_size(*image.shape[:2])), dtype=np.float32)
            save_cam(cam_dir / f"{image_id}.npz", cam, keys, image.shape[:2])
        cam_paths = [cam_dir / f"{i}.npz" for i in ids]
        rows += per_image_rows(PseudoLabelStage(), model, images, cam_paths, tmp, device, section, args.crf_workers)
        rows += device_rows(model, dataset, ids, cam_dir, tmp, device, section, args.loaders)
        rows += seed_rows(dataset, ids, cam_dir, tmp, device, args.crf_workers)
    print(
        f"stage-2 inference, {args.size}x{args.size} images ({args.size // 4}x{args.size // 4} walk grid), "
        f"{args.classes} classes, {args.backbone}, device {device}, torch threads {torch.get_num_threads()}, "
        f"{len(os.sched_getaffinity(0))} cores, load average {os.getloadavg()[0]:.1f}"
    )
    print(format_table(rows, ["labels", "path", "crf", "images", "seconds", "images_per_s", "walk_share"]))


if __name__ == "__main__":
    # The CRF workers are spawned and import this file again (as __mp_main__): torch and the
    # network are imported here only, so that they start as fast as under `wss` itself.
    import torch

    from bench.timing import synchronize
    from data.layout import PreparedDataset
    from data.synthetic import SyntheticSpec, write_synthetic
    from stages.cam.infer import save_cam, strided_size
    from stages.common.backbones import ResNetFeatures
    from stages.common.tables import format_table
    from stages.irn.config import IrnConfig
    from stages.irn.net import BoundaryNet
    from stages.irn.pseudo import PseudoLabelStage
    from stages.irn.resident import write_pseudo_labels_on_device
    from stages.irn.stage import IrnStage

    main()
