"""Benchmark of `wss prepare siim`: DICOMs per second and peak memory, 1 vs N workers.

Generates N 1024x1024 JPEG-compressed DICOMs (as Kaggle's SIIM files are) and an RLE CSV,
then prepares a quarter of them and all of them, each with 1 and with N workers, every run in
a fresh process so that peak-memory figures do not leak between runs. The point of the
second size: peak memory must not grow with the number of files.

Memory is reported two ways:
- ``tree peak``: the largest sum of resident set sizes over the run's process tree (the run and
  its workers), sampled from /proc every 50 ms (Linux);
- ``main``/``worker``: peak RSS of the main process (VmHWM) and of its largest worker
  (getrusage of the children). RSS counts the libraries shared by the forked workers once per
  process, so the tree figure is an upper bound of the memory really used.

    python bench/prepare.py --n 2000 [--workers 4] [--size 1024] [--keep DIR]
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
        mask[top:top + height, left:left + width] = 1
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
    (folder / "train-rle.csv").write_text("\n".join([lines[0]] + [l for l in lines[1:] if l.split(",")[0] in ids]) + "\n")
    return folder / "dicom", folder / "train-rle.csv"


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


def run_one(dicoms: str, csv_path: str, workers: int, size: int) -> dict:
    from data.siim import prepare_siim

    out = Path(tempfile.mkdtemp(prefix="wss-bench-out-"))
    sampler = TreeMemorySampler() if Path("/proc/self/statm").exists() else None
    if sampler:
        sampler.start()
    started = time.perf_counter()
    try:
        report = prepare_siim(dicoms, csv_path, out, size=size, workers=workers, progress=False)
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


def measured(dicoms: Path, csv_path: Path, workers: int, size: int) -> dict:
    command = [sys.executable, __file__, "--run-one", str(dicoms), str(csv_path),
               "--workers", str(workers), "--size", str(size)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="DICOMs to generate (default 2000)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="N (default: CPU count)")
    parser.add_argument("--size", type=int, default=1024, help="prepared size (default 1024)")
    parser.add_argument("--keep", type=Path, help="generate into this folder and keep it")
    parser.add_argument("--run-one", nargs=2, metavar=("DICOM_DIR", "CSV"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        print(json.dumps(run_one(*args.run_one, workers=args.workers, size=args.size)))
        return

    folder = args.keep or Path(tempfile.mkdtemp(prefix="wss-bench-siim-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        dicoms, csv_path = generate(folder / "all", args.n)
        small = max(1, args.n // 4)
        sets = [(small, *subset(dicoms, csv_path, folder / "small", small)), (args.n, dicoms, csv_path)]
        worker_counts = sorted({1, max(1, args.workers)})
        print(f"{'files':>6} {'workers':>7} {'seconds':>8} {'DICOM/s':>8} {'tree peak MiB':>14} "
              f"{'main MiB':>9} {'worker MiB':>11}")
        for n, set_dicoms, set_csv in sets:
            for workers in worker_counts:
                r = measured(set_dicoms, set_csv, workers, args.size)
                print(f"{r['images']:>6} {r['workers']:>7} {r['seconds']:>8.1f} {r['per_second']:>8.1f} "
                      f"{r['tree_peak_mib']:>14.0f} {r['main_peak_mib']:>9.0f} {r['worker_peak_mib']:>11.0f}",
                      flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
