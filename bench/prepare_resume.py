"""Benchmark of re-running `wss prepare siim` into a prepared folder: what a rerun costs when
nothing changed, when a few labels changed, and for a folder prepared before manifests existed
(every image verified: masks recomputed from the rows, images kept unless their DICOM is newer).

Generates N JPEG-compressed 1024x1024 DICOMs and their RLE CSV (as bench/prepare.py), prepares
them once, then times each rerun and checks that it rewrote only what it had to:

    python bench/prepare_resume.py --n 500 [--workers 1] [--size 512]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.prepare import generate  # noqa: E402
from data.prepare_manifest import MANIFEST_NAME  # noqa: E402
from data.siim import prepare_siim  # noqa: E402


def mtimes(out: Path) -> dict[str, int]:
    return {f"{sub}/{p.name}": p.stat().st_mtime_ns for sub in ("images", "masks") for p in (out / sub).iterdir()}


def timed(label: str, dicoms: Path, csv_path: Path, out: Path, size: int, workers: int) -> None:
    before = mtimes(out) if (out / "images").is_dir() else {}
    started = time.perf_counter()
    report = prepare_siim(dicoms, csv_path, out, size=size, workers=workers, progress=False)
    seconds = time.perf_counter() - started
    after = mtimes(out)
    rewritten = sum(1 for name, mtime in after.items() if before.get(name) != mtime)
    counts = ", ".join(
        f"{k} {v}" for k, v in sorted(report.counts.items()) if k in ("converted", "relabelled", "resumed", "verified")
    )
    print(
        f"{label:<34} {seconds:>7.2f} s {report.counts['prepared'] / seconds:>9.0f} img/s   "
        f"files rewritten {rewritten:>5}   ({counts})",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="DICOMs to generate (default 500)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--size", type=int, default=512, help="prepared size (default 512)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="wss-bench-resume-"))
    try:
        dicoms, csv_path = generate(folder / "all", args.n)
        out = folder / "out"
        timed("first preparation", dicoms, csv_path, out, args.size, args.workers)
        timed("rerun, nothing changed", dicoms, csv_path, out, args.size, args.workers)
        lines = csv_path.read_text().splitlines()
        positives = sorted({line.split(",")[0] for line in lines[1:] if line.split(",", 1)[1].strip() != "-1"})
        flipped = set(positives[: max(1, args.n // 100)])  # 1% of the images: positive -> -1
        kept = [line for line in lines if line.split(",")[0] not in flipped]
        csv_path.write_text("\n".join(kept + [f"{i},-1" for i in sorted(flipped)]) + "\n")
        timed(f"rerun, {len(flipped)} positives now -1", dicoms, csv_path, out, args.size, args.workers)
        os.unlink(out / MANIFEST_NAME)
        timed("rerun of a folder without manifest", dicoms, csv_path, out, args.size, args.workers)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
