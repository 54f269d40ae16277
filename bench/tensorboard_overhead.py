"""What TensorBoard logging costs each stage: the stage run with run.tensorboard on and off.

    python bench/tensorboard_overhead.py [--stages cam,irn,pseudo,seg] [--repeats 5] [--n 96]
                                         [--size 128] [--device cpu] [--log-every 10]

A synthetic dataset (--n images of --size px) and configs/demo.yaml at a few epochs. The chain
runs once (warm-up, and the upstream of every stage); then each stage is computed again
(`force`) --repeats times with TensorBoard on and off, in alternating order, and the wall time
of the whole Pipeline.run_stage call is taken (training, inference, commit and, with
TensorBoard, the scores, settings and overlay strips written after the commit). Printed per
stage: the median wall seconds each way, the overhead of their medians, and two direct
measures of what the writer costs that do not depend on the noise between runs: the seconds
spent inside the recorder's calls (per-step and per-epoch scalars, flushes) and the seconds of
the after-stage summary (overlay strips drawn from the artifact, images and text written).
The warm-up runs with TensorBoard on; the one-off import of the writer is timed apart.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipeline.runner as runner  # noqa: E402
from data.synthetic import SyntheticSpec, write_synthetic  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.tensorboard_log import TensorBoardRun  # noqa: E402
from stages.common.tables import format_table  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
SETTINGS = {  # the demo's networks at a few epochs (training dominates, as in a real run)
    "cam.epochs": 3,
    "irn.epochs": 2,
    "seg.epochs": 2,
    "run.workers": 0,
}


class Probe:
    """Wraps the runner's open_run and log_finished_stage to add up the time they take."""

    def __init__(self):
        self.recorder_seconds = 0.0
        self.summary_seconds = 0.0
        self.open_run, self.log_finished_stage = runner.open_run, runner.log_finished_stage

    def install(self):
        def open_run(*args, **kwargs):
            board = self.open_run(*args, **kwargs)
            self.board = board
            return board

        def log_finished_stage(*args, **kwargs):
            if isinstance(self.board, TensorBoardRun):  # the calls while the stage ran
                self.recorder_seconds += self.board.busy_seconds
            started = time.perf_counter()
            self.log_finished_stage(*args, **kwargs)
            self.summary_seconds += time.perf_counter() - started

        runner.open_run, runner.log_finished_stage = open_run, log_finished_stage

    def take(self) -> tuple[float, float]:
        taken = (self.recorder_seconds, self.summary_seconds)
        self.recorder_seconds = self.summary_seconds = 0.0
        return taken


def import_seconds() -> float:
    """Seconds to import torch.utils.tensorboard in a fresh process that has imported torch."""
    code = (
        "import time, torch; started = time.perf_counter(); from torch.utils.tensorboard import SummaryWriter; "
        "print(time.perf_counter() - started)"
    )
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="cam,irn,pseudo,seg")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--log-every", type=int, default=None, help="cam/irn/seg.log_every (default: the config's)")
    args = parser.parse_args()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]

    with tempfile.TemporaryDirectory() as tmp:
        root = write_synthetic(Path(tmp) / "data", SyntheticSpec(n=args.n, size=args.size, seed=0))
        values = {**SETTINGS, "data.root": root, "run.workdir": Path(tmp) / "runs", "run.device": args.device}
        if args.log_every is not None:
            values.update({f"{section}.log_every": args.log_every for section in ("cam", "irn", "seg")})
        overrides = [f"{key}={value}" for key, value in values.items()]
        pipelines = {
            mode: runner.Pipeline(load_config(DEMO, [*overrides, f"run.tensorboard={mode == 'on'}"]))
            for mode in ("on", "off")
        }
        probe = Probe()
        probe.install()
        pipelines["on"].run()  # warm-up (tensorboard imported, as once per process); the upstream
        seconds = {(stage, mode): [] for stage in stages for mode in ("on", "off")}
        inside = {stage: [] for stage in stages}
        for repeat in range(args.repeats):
            for mode in ("on", "off") if repeat % 2 == 0 else ("off", "on"):
                for stage in stages:
                    started = time.perf_counter()
                    pipelines[mode].run_stage(stage, force=True)
                    seconds[stage, mode].append(time.perf_counter() - started)
                    recorder, summary = probe.take()
                    if mode == "on":
                        inside[stage].append((recorder, summary))
                    print(
                        f"repeat {repeat + 1} {stage} tensorboard {mode}: {seconds[stage, mode][-1]:.2f} s", flush=True
                    )
    rows = []
    for stage in stages:
        on, off = statistics.median(seconds[stage, "on"]), statistics.median(seconds[stage, "off"])
        recorder = statistics.median(r for r, _ in inside[stage])
        summary = statistics.median(s for _, s in inside[stage])
        rows.append(
            {
                "stage": stage,
                "off_s": off,
                "on_s": on,
                "overhead_%": 100 * (on - off) / off,
                "recorder_s": recorder,
                "summary_s": summary,
                "writer_%": 100 * (recorder + summary) / off,
                "spread_off_%": 100 * (max(seconds[stage, "off"]) - min(seconds[stage, "off"])) / off,
            }
        )
    print(f"\nmedians of {args.repeats} runs each way; {args.n} images of {args.size} px; device {args.device}")
    print(f"importing torch.utils.tensorboard (once per process, in the first stage): {import_seconds():.2f} s")
    print(format_table(rows, list(rows[0]), {"off_s": 2, "on_s": 2, "recorder_s": 3, "summary_s": 3}))


if __name__ == "__main__":
    main()
