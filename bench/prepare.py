"""Benchmark of `wss prepare siim` and `wss prepare coco`: images per second and peak memory.

SIIM (the default): generates N 1024x1024 JPEG-compressed DICOMs (as Kaggle's SIIM files are)
and an RLE CSV, then prepares a quarter of them and all of them, each with 1 and with N workers,
every run in a fresh process so that peak-memory figures do not leak between runs. The point of
the second size: peak memory must not grow with the number of files.

COCO (``--dataset coco``): generates an instances file of N images (by default 40,000, about
half of train2014) with COCO's density, ~7 polygon instances an image of ~25 vertices each (about
4 KB of JSON an image, as instances_train2014.json's 330 MB for 82,783 images), every image a
hard link to one 640x480 JPEG; then prepares a quarter and all of it (1 and N workers), and
measures, each in a fresh process, what reading the same file whole costs: ``json.load`` and
pycocotools' ``COCO()`` index (what each worker would hold without the streamed index).

Memory is reported two ways:
- ``tree peak``: the largest sum of resident set sizes over the run's process tree (the run and
  its workers), sampled from /proc every 50 ms (Linux);
- ``main``/``worker``: peak RSS of the main process (VmHWM) and of its largest worker
  (getrusage of the children). RSS counts the libraries shared by the forked workers once per
  process, so the tree figure is an upper bound of the memory really used.

    python bench/prepare.py --n 2000 [--workers 4] [--size 1024] [--keep DIR]
    python bench/prepare.py --dataset coco [--n 40000] [--workers 4] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.monitor import tree_rss_bytes  # noqa: E402
from data.dicom import write_dicom  # noqa: E402
from data.rle import siim_rle_encode  # noqa: E402

# --------------------------------------------------------------------------------------------
# Synthetic SIIM-like data
# --------------------------------------------------------------------------------------------


def synthetic_radiograph(rng: np.random.Generator, size: int = 1024) -> np.ndarray:
    """A smooth chest-like picture (two dark lungs in a bright body) with mild noise, so that
    the JPEG is about as large as a real one."""
    y, x = np.mgrid[0:size, 0:size] / size
    body = 200 - 120 * ((x - 0.5) ** 2 + (y - 0.55) ** 2)
    for centre in (0.3, 0.7):
        cx = centre + rng.normal(0, 0.02)
        body -= 90 * np.exp(-(((x - cx) / 0.14) ** 2 + ((y - 0.5) / 0.25) ** 2))
    body += rng.normal(0, 3, (size, size))
    return np.clip(body, 0, 255).astype(np.uint8)


def synthetic_rows(rng: np.random.Generator, size: int = 1024) -> list[str]:
    """EncodedPixels rows of one image: a quarter are positive, some with two regions."""
    if rng.random() >= 0.25:
        return ["-1"]
    rows = []
    for _ in range(1 + int(rng.random() < 0.3)):
        mask = np.zeros((size, size), np.uint8)
        top, left = rng.integers(50, size - 300, 2)
        height, width = rng.integers(30, 250, 2)
        mask[top : top + height, left : left + width] = 1
        rows.append(siim_rle_encode(mask))
    return rows


def generate(folder: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """n DICOMs nested as study/series/<id>.dcm and a Kaggle-style CSV; returns (dir, csv)."""
    rng = np.random.default_rng(seed)
    dicoms = folder / "dicom"
    lines = ["ImageId, EncodedPixels"]
    started = time.perf_counter()
    bases = [synthetic_radiograph(rng) for _ in range(8)]
    for k in range(n):
        image_id = f"1.2.276.0.7230010.3.1.4.{k}"
        target = dicoms / f"study{k % 97}" / f"series{k}"
        target.mkdir(parents=True, exist_ok=True)
        image = np.roll(bases[k % 8], int(rng.integers(-40, 40)), axis=1)
        write_dicom(target / f"{image_id}.dcm", image, jpeg=True, sop_instance_uid=image_id)
        lines += [f"{image_id},{row}" for row in synthetic_rows(rng)]
    (folder / "train-rle.csv").write_text("\n".join(lines) + "\n")
    size_mb = sum(p.stat().st_size for p in dicoms.rglob("*.dcm")) / 2**20
    print(f"generated {n} DICOMs ({size_mb:.0f} MiB) in {time.perf_counter() - started:.0f} s", flush=True)
    return dicoms, folder / "train-rle.csv"


def subset(dicoms: Path, csv_path: Path, folder: Path, n: int) -> tuple[Path, Path]:
    """The first n images (hard links, or copies across file systems) and their CSV rows."""
    chosen = sorted(dicoms.rglob("*.dcm"), key=lambda p: int(p.stem.rsplit(".", 1)[1]))[:n]
    ids = {p.stem for p in chosen}
    for path in chosen:
        target = folder / "dicom" / path.relative_to(dicoms)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy(path, target)
    lines = csv_path.read_text().splitlines()
    (folder / "train-rle.csv").write_text(
        "\n".join([lines[0]] + [line for line in lines[1:] if line.split(",")[0] in ids]) + "\n"
    )
    return folder / "dicom", folder / "train-rle.csv"


# --------------------------------------------------------------------------------------------
# Synthetic COCO-like instances file
# --------------------------------------------------------------------------------------------

COCO_WIDTH, COCO_HEIGHT = 640, 480


def coco_polygon(rng: np.random.Generator) -> list[float]:
    """A star-shaped polygon of ~25 vertices inside the image, coordinates with 2 decimals."""
    vertices = int(rng.integers(12, 40))
    cx, cy = rng.uniform(80, COCO_WIDTH - 80), rng.uniform(80, COCO_HEIGHT - 80)
    angles = np.sort(rng.uniform(0, 2 * np.pi, vertices))
    radii = rng.uniform(15, 75, vertices)
    xs = np.clip(cx + radii * np.cos(angles), 0, COCO_WIDTH - 1)
    ys = np.clip(cy + radii * np.sin(angles), 0, COCO_HEIGHT - 1)
    return [round(float(v), 2) for pair in zip(xs, ys) for v in pair]


def generate_coco(folder: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """instances.json of n images (each a hard link to one JPEG in images/) and ~7.3 instances
    an image over COCO's 80 category ids, written element by element; returns (json, images)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    picture = folder / "picture.jpg"
    pixels = (rng.random((COCO_HEIGHT, COCO_WIDTH, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(picture, quality=90)
    category_ids = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
    path = folder / "instances.json"
    annotation_id = 0
    with open(path, "w") as handle:
        handle.write('{"info": {"description": "wss bench"}, "licenses": [], "images": [')
        for k in range(n):
            name = f"COCO_train2014_{k:012d}.jpg"
            try:
                os.link(picture, images / name)
            except OSError:
                shutil.copy(picture, images / name)
            entry = {
                "license": 1,
                "file_name": name,
                "coco_url": "",
                "height": COCO_HEIGHT,
                "width": COCO_WIDTH,
                "date_captured": "2013-11-14 16:28:13",
                "flickr_url": "",
                "id": k,
            }
            handle.write(("," if k else "") + json.dumps(entry))
        handle.write('], "annotations": [')
        for k in range(n):
            for _ in range(int(rng.poisson(7.3))):
                polygon = coco_polygon(rng)
                xs, ys = polygon[0::2], polygon[1::2]
                annotation = {
                    "segmentation": [polygon],
                    "area": 1000.0,
                    "iscrowd": 0,
                    "image_id": k,
                    "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                    "category_id": int(rng.choice(category_ids)),
                    "id": annotation_id,
                }
                handle.write(("," if annotation_id else "") + json.dumps(annotation))
                annotation_id += 1
        categories = [{"supercategory": "thing", "id": i, "name": f"class{i}"} for i in category_ids]
        handle.write('], "categories": ' + json.dumps(categories) + "}")
    print(
        f"generated {n} COCO images, {annotation_id} instances, {path.stat().st_size / 2**20:.0f} MiB of JSON "
        f"in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return path, images


def coco_subset(path: Path, images: Path, folder: Path, n: int) -> tuple[Path, Path]:
    """The first n images of an instances file and their annotations (json.load: a bench helper)."""
    data = json.loads(path.read_text())
    data["images"] = data["images"][:n]
    kept = {entry["id"] for entry in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in kept]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "instances.json").write_text(json.dumps(data))
    return folder / "instances.json", images


# --------------------------------------------------------------------------------------------
# One measured run (in its own process)
# --------------------------------------------------------------------------------------------


class TreeMemorySampler(threading.Thread):
    def __init__(self, interval: float = 0.05):
        super().__init__(daemon=True)
        self.interval, self.peak, self.running = interval, 0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, tree_rss_bytes(os.getpid()))
            time.sleep(self.interval)

    def stop(self) -> int:
        self.running = False
        self.join()
        return self.peak


def run_one(dicoms: str, csv_path: str, workers: int, size: int, dataset: str = "siim") -> dict:
    """One preparation (SIIM: dicoms, csv_path; COCO: the instances file, the image folder), or
    for COCO with workers 0 the reading of the instances file whole (size 0: json.load, 1:
    pycocotools' COCO())."""
    out = Path(tempfile.mkdtemp(prefix="wss-bench-out-"))
    sampler = TreeMemorySampler() if Path("/proc/self/statm").exists() else None
    if sampler:
        sampler.start()
    started = time.perf_counter()
    try:
        if dataset == "siim":
            from data.siim import prepare_siim

            report = prepare_siim(dicoms, csv_path, out, size=size, workers=workers, progress=False)
        elif workers == 0:
            report = load_whole(dicoms, size)
        else:
            from data.coco import prepare_coco

            report = prepare_coco(dicoms, csv_path, out, workers=workers, progress=False)
        seconds = time.perf_counter() - started
    finally:
        tree_peak = sampler.stop() if sampler else 0
        shutil.rmtree(out, ignore_errors=True)
    return {
        "images": report.counts.get("prepared", 0),
        "workers": workers,
        "seconds": seconds,
        "per_second": report.counts.get("prepared", 0) / seconds,
        "tree_peak_mib": tree_peak / 2**20,
        "main_peak_mib": main_peak_bytes() / 2**20,
        "worker_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * _RUSAGE_UNIT / 2**20,
    }


_RUSAGE_UNIT = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux


def main_peak_bytes() -> int:
    """This process's peak RSS. Linux keeps ru_maxrss across exec, so a child would report the
    parent's peak; VmHWM belongs to this process's own memory map."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _RUSAGE_UNIT


class _Loaded:
    """What run_one reports for a whole-file read: the images it holds."""

    def __init__(self, images: int):
        self.counts = {"prepared": images}


def load_whole(path: str, how: int) -> _Loaded:
    if how == 0:
        with open(path) as handle:
            return _Loaded(len(json.load(handle)["images"]))
    import contextlib
    import io

    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its progress
        return _Loaded(len(COCO(path).imgs))


def measured(dicoms: Path, csv_path: Path, workers: int, size: int, dataset: str = "siim") -> dict:
    command = [
        sys.executable,
        __file__,
        "--run-one",
        str(dicoms),
        str(csv_path),
        "--workers",
        str(workers),
        "--size",
        str(size),
        "--dataset",
        dataset,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["siim", "coco"], default="siim")
    parser.add_argument("--n", type=int, default=None, help="images to generate (SIIM 2000, COCO 40000)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="N (default: CPU count)")
    parser.add_argument("--size", type=int, default=1024, help="prepared size (default 1024)")
    parser.add_argument("--keep", type=Path, help="generate into this folder and keep it")
    parser.add_argument("--run-one", nargs=2, metavar=("DICOM_DIR", "CSV"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        print(json.dumps(run_one(*args.run_one, workers=args.workers, size=args.size, dataset=args.dataset)))
        return
    if args.dataset == "coco":
        bench_coco(args.n or 40000, args.workers, args.keep)
        return
    args.n = args.n or 2000

    folder = args.keep or Path(tempfile.mkdtemp(prefix="wss-bench-siim-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        dicoms, csv_path = generate(folder / "all", args.n)
        small = max(1, args.n // 4)
        sets = [(small, *subset(dicoms, csv_path, folder / "small", small)), (args.n, dicoms, csv_path)]
        worker_counts = sorted({1, max(1, args.workers)})
        print(
            f"{'files':>6} {'workers':>7} {'seconds':>8} {'DICOM/s':>8} {'tree peak MiB':>14} "
            f"{'main MiB':>9} {'worker MiB':>11}"
        )
        for n, set_dicoms, set_csv in sets:
            for workers in worker_counts:
                r = measured(set_dicoms, set_csv, workers, args.size)
                print(
                    f"{r['images']:>6} {r['workers']:>7} {r['seconds']:>8.1f} {r['per_second']:>8.1f} "
                    f"{r['tree_peak_mib']:>14.0f} {r['main_peak_mib']:>9.0f} {r['worker_peak_mib']:>11.0f}",
                    flush=True,
                )
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


def bench_coco(n: int, workers: int, keep: Path | None) -> None:
    folder = keep or Path(tempfile.mkdtemp(prefix="wss-bench-coco-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        path, images = generate_coco(folder / "all", n)
        small = max(1, n // 4)
        sets = [coco_subset(path, images, folder / "small", small), (path, images)]
        print(
            f"{'images':>7} {'JSON MiB':>8} {'how':>22} {'seconds':>8} {'img/s':>7} {'tree peak MiB':>14} "
            f"{'main MiB':>9} {'worker MiB':>11}"
        )
        for set_path, set_images in sets:
            runs = [(f"wss prepare coco, {w} w", w, 0) for w in sorted({1, max(1, workers)})]
            runs += [("json.load (whole)", 0, 0), ("pycocotools COCO()", 0, 1)]
            for how, run_workers, whole in runs:
                r = measured(set_path, set_images, run_workers, whole, "coco")
                print(
                    f"{r['images']:>7} {set_path.stat().st_size / 2**20:>8.0f} {how:>22} {r['seconds']:>8.1f} "
                    f"{r['per_second']:>7.0f} {r['tree_peak_mib']:>14.0f} {r['main_peak_mib']:>9.0f} "
                    f"{r['worker_peak_mib']:>11.0f}",
                    flush=True,
                )
    finally:
        if keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
