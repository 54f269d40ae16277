"""Benchmark of `wss predict` on one very large image: peak memory of the process tree and wall time.

Generates a compressible RGB PNG of `--side` x `--side` pixels (13000 by default: 169
megapixels, ~0.5 MB on disk, under Pillow's decompression-bomb error limit but over its warning
limit) and a tiny binary segmenter artifact (Unet-ResNet18, random weights: the memory and time
of prediction do not depend on what the weights learned), then runs

    wss predict -c <config> IMAGE --out OUT --artifact ART [--probabilities]

in a child process and reports
- ``tree peak``: the largest sum of proportional set sizes (PSS: a page shared by n processes
  counts 1/n in each) over the command's process tree (the command and its loader workers),
  sampled from /proc every 50 ms (Linux): the memory the command holds. Beside it the sum of
  resident set sizes, which counts the pages that forked workers share with the main process
  once per process: an upper bound;
- ``largest process``: the peak RSS of the largest single process of the tree (getrusage of
  the children, measured from a small wrapper process so that this script's own size does not
  count);
- the wall time, and whether Pillow's raw DecompressionBombWarning reached the output.

    python bench/predict_memory.py [--side 13000] [--workers 2] [--probabilities] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.monitor import tree_rss_bytes  # noqa: E402
from data.images import open_image  # noqa: E402

_RUSAGE_UNIT = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux


def write_large_png(path: Path, side: int) -> Path:
    """A `side` x `side` RGB PNG of smooth gradients and flat discs: most rows repeat the one
    above, so it compresses to well under 1 MB at 13000 px. Drawn in bands of rows so that
    this generator needs about one copy of the image."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (side, side))
    columns = np.arange(side)
    row = np.stack(
        [(columns * 255 // max(1, side - 1)), np.full(side, 90), 255 - columns * 255 // max(1, side - 1)], axis=1
    ).astype(np.uint8)
    band = max(1, side // 16)
    for top in range(0, side, band):  # 16 horizontal bands, each a left-right gradient tinted by its height
        height = min(band, side - top)
        tinted = row.copy()
        tinted[:, 1] = 40 + 200 * top // side
        image.paste(Image.fromarray(np.broadcast_to(tinted, (height, side, 3)).copy()), (0, top))
    draw = ImageDraw.Draw(image)
    for k, (cx, cy, r) in enumerate([(0.3, 0.35, 0.12), (0.7, 0.6, 0.18), (0.45, 0.8, 0.08)]):
        box = [int((cx - r) * side), int((cy - r) * side), int((cx + r) * side), int((cy + r) * side)]
        draw.ellipse(box, fill=(240, 240 - 60 * k, 40 * k))
    image.save(path, format="PNG", compress_level=9)
    return path


def write_tiny_artifact(folder: Path, long_side: int = 512) -> Path:
    """A seg artifact folder holding the model file of a small binary Unet-ResNet18 (random weights)."""
    import torch

    from stages.seg.model import MODEL_FILE, build_segmenter, save_segmenter

    torch.manual_seed(0)
    section = SimpleNamespace(
        arch="Unet",
        encoder="resnet18",
        arch_options={"decoder_channels": [64, 32, 16, 16, 16]},
        threshold=0.5,
        predict_size=long_side,
        resize_long=[long_side, long_side],
    )
    info = SimpleNamespace(task="binary", classes=["finding"], num_classes=1, palette=[[0, 0, 0], [255, 0, 0]])
    model = build_segmenter(section.arch, section.encoder, None, 1, section.arch_options)
    folder.mkdir(parents=True, exist_ok=True)
    save_segmenter(model, folder / MODEL_FILE, section, info)
    return folder


def write_config(path: Path, workers: int) -> Path:
    path.write_text(f"data:\n  root: {path.parent / 'no-dataset'}\nrun:\n  device: cpu\n  workers: {workers}\n")
    return path


def tree_pss_bytes(pid: int) -> int:
    """Proportional set size of pid and all its descendants (Linux): pages shared by forked
    workers are divided among them, so the sum is the memory the tree really holds."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    children.setdefault(int(handle.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        stack.extend(children.get(current, []))
        try:
            with open(f"/proc/{current}/smaps_rollup") as handle:
                total += next(int(line.split()[1]) * 1024 for line in handle if line.startswith("Pss:"))
        except (OSError, StopIteration, ValueError):
            pass
    return total


class TreeMemorySampler(threading.Thread):
    """Largest resident set (RSS and PSS) of `pid` and its descendants, sampled every `interval` s."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak, self.peak_pss, self.running = pid, interval, 0, 0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, tree_rss_bytes(self.pid))
            self.peak_pss = max(self.peak_pss, tree_pss_bytes(self.pid))
            time.sleep(self.interval)

    def stop(self) -> int:
        self.running = False
        self.join()
        return self.peak


def predict_command(image: Path, out: Path, config: Path, artifact: Path, probabilities: bool) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "predict",
        "-c",
        str(config),
        str(image),
        "--out",
        str(out),
        "--artifact",
        str(artifact),
    ]
    return command + (["--probabilities"] if probabilities else [])


def run_measured(command: list[str]) -> dict:
    """Run `command` as a grandchild under a small wrapper (this process imported torch; a child
    forked from it would start with its resident size as its getrusage peak), sampling its tree."""
    wrapper = (
        "import json, resource, subprocess, sys\n"
        "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "print(json.dumps({'rc': done.returncode, 'output': done.stdout + done.stderr,\n"
        "                  'maxrss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n"
    )
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        HF_HUB_OFFLINE="1",
        TQDM_DISABLE="1",
    )
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-c", wrapper, *command], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env
    )
    sampler = TreeMemorySampler(process.pid)
    sampler.start()
    stdout, _ = process.communicate()
    seconds = time.perf_counter() - started
    tree_peak = sampler.stop()
    result = json.loads(stdout.strip().splitlines()[-1])
    return {
        "rc": result["rc"],
        "seconds": seconds,
        "tree_peak_mib": tree_peak / 2**20,
        "tree_pss_peak_mib": sampler.peak_pss / 2**20,
        "largest_process_mib": result["maxrss"] * _RUSAGE_UNIT / 2**20,
        "output": result["output"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=13000, help="image side in pixels (default 13000)")
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="run.workers of the config (default 2; `wss predict` uses min(4, workers) loader workers)",
    )
    parser.add_argument("--long-side", type=int, default=512, help="the model's predict size (default 512)")
    parser.add_argument("--probabilities", action="store_true", help="also write the probabilities .npy")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = parser.parse_args()

    folder = args.keep or Path(tempfile.mkdtemp(prefix="wss-bench-predict-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        image = folder / f"large-{args.side}.png"
        if not image.is_file():
            started = time.perf_counter()
            write_large_png(image, args.side)
            print(
                f"generated {image.name}: {args.side}x{args.side} RGB, {image.stat().st_size / 2**10:.0f} KiB "
                f"in {time.perf_counter() - started:.0f} s",
                flush=True,
            )
        artifact = write_tiny_artifact(folder / "seg-tiny", args.long_side)
        config = write_config(folder / "predict.yaml", args.workers)
        out = folder / "out"
        shutil.rmtree(out, ignore_errors=True)
        result = run_measured(predict_command(image, out, config, artifact, args.probabilities))
        bomb = "DecompressionBombWarning" in result["output"]
        print(
            f"wss predict {args.side}x{args.side} (workers {args.workers}, long side {args.long_side}"
            f"{', probabilities' if args.probabilities else ''}): exit {result['rc']}, "
            f"{result['seconds']:.1f} s wall, tree peak PSS {result['tree_pss_peak_mib']:.0f} MiB "
            f"(RSS {result['tree_peak_mib']:.0f} MiB), "
            f"largest process {result['largest_process_mib']:.0f} MiB, "
            f"Pillow's raw warning {'shown' if bomb else 'not shown'}"
        )
        if result["rc"] != 0:
            print(result["output"][-3000:])
        for name in ("masks", "overlays"):
            for path in sorted((out / name).glob("*.png")):
                with open_image(path, max_pixels=2**62) as written:
                    print(
                        f"  {name}/{path.name}: {written.size[0]}x{written.size[1]} {written.mode}, "
                        f"{path.stat().st_size / 2**10:.0f} KiB"
                    )
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
