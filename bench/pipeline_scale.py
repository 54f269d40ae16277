"""The whole pipeline at dataset scale: measure a slice of every stage, project the full run.

    python bench/pipeline_scale.py [--device auto|cpu|cuda] [--n 1024] [--siim-n N] [--size 512]
                                   [--datasets voc,siim] [--workers -1] [--out DIR] [--keep DIR]

For each dataset it writes a synthetic set of --size px images in that dataset's form (VOC: --n
images; SIIM: --siim-n, by default half of --n, at least 32), runs every stage with the shipped
config's settings through `Pipeline.run_stage` (what `wss run` calls), and projects the wall time
of the published run from what it measured:

- voc: data/synthetic_voc.py writes a VOC 2012 release tree (the 20 classes, palette masks with
  255 bands, Annotations XML, train / val / train_aug lists in VOC's proportions), prepared as
  `wss prepare voc` does; configs/voc.yaml. Projected for train_aug (10,582 images; val 1,449)
  at the config's epochs (cam 5, irn 3, seg 30; CAMs at 4 scales + flip).
- siim: the synthetic benchmark's binary variant (grayscale; 22% positive, as SIIM's train
  set; a tenth val); configs/siim.yaml. Projected for about 10,800 train and 1,200 val images
  at its epochs (cam 10, irn 3 on the positives, seg 20 with a tenth held out; 3 CAM scales).

Changed from the configs: no pretrained weights (cam.weights and seg.encoder_weights null,
irn.backbone_init cam where it is imagenet): the machine may be offline, and the weights' values
do not change the work done; learning rates a hundredth of the published ones, at which random
weights do not diverge to a NaN loss (which stops a stage) and which change no work either.
Every training stage trains 2 epochs. On a slice too small for the configured batches (a CPU
smoke run with --n 16), the batches shrink to fit and it says so.

Measured per stage: wall time, the seconds of each training epoch's loop and its images (the
stage's metrics.jsonl), the wall time between epoch ends (log records), peak GPU memory
(torch.cuda.max_memory_allocated), mean GPU utilisation and peak host memory of the process tree
(bench/monitor.py), and the machine's CPU busy fraction.

Projection. Each stage runs twice: on the whole slice, and with `--limit m` (the first m images
of each split: at most 32, or up to the second positive image under irn.positive_only) reading
the same upstream artifacts. A stage's time is modelled as

    warm-up + E x (N / r + o) + a + b x X

- r: images per second of the training loop in epoch 2 (steady state, whole slice);
- warm-up: what epoch 1's loop took beyond N / r (loader workers starting, first steps);
- o: the time between two epochs' loops (checkpoint, held-out scoring) linear in N, fitted on
  the two runs;
- a + b x X: the rest of the stage (model set-up, inference, scoring, commit) linear in the
  images X it reads (cam, seg: train + val; irn, pseudo: train), fitted on the two runs;
- N: training images per epoch; E: the published epochs.

Each figure is printed as soon as its stage ends; the tables go to --out as JSON and Markdown.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the wss command: no spinning OpenMP threads

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.monitor import Sampler, cpu_busy, cpu_times  # noqa: E402

GIB = 2**30
STAGES = ("cam", "irn", "pseudo", "seg")
TRAINED = {"cam": "cam", "irn": "irn", "seg": "seg"}  # stage -> its fit()'s name in metrics.jsonl
REST_SPLITS = {"cam": ("train", "val"), "irn": ("train",), "pseudo": ("train",), "seg": ("train", "val")}
SLICE_EPOCHS = 2
SMALL = 32  # images per split of the small run (at most)
LR_DIVISOR = 100  # learning rates for random weights


@dataclass(frozen=True)
class Target:
    """A published run to project: its config, split sizes and the share of positive images."""

    name: str
    config: str
    train: int
    val: int
    positive_fraction: float = 1.0


TARGETS = {
    "voc": Target("VOC train_aug", "configs/voc.yaml", train=10_582, val=1_449),
    "siim": Target("SIIM", "configs/siim.yaml", train=10_800, val=1_200, positive_fraction=0.22),
}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def make_dataset(name: str, folder: Path, n: int, size: int, workers: int) -> Path:
    """The prepared synthetic set of dataset `name` in `folder`; returns its root."""
    if name == "voc":
        from data.synthetic_voc import VocSpec, write_voc_release
        from data.voc import prepare_voc

        write_voc_release(folder / "release", VocSpec(n=n, size=size, seed=0), workers=workers)
        prepare_voc(folder / "release", folder / "prepared", workers=workers, progress=False)
        return folder / "prepared"
    from data.synthetic import SyntheticSpec, write_synthetic

    spec = SyntheticSpec(
        n=n, size=size, seed=0, variant="binary", positive_fraction=TARGETS["siim"].positive_fraction, val_fraction=0.1
    )
    return write_synthetic(folder / "prepared", spec, workers=workers)


# --------------------------------------------------------------------------------------------
# One stage run
# --------------------------------------------------------------------------------------------


class EpochEnds(logging.Handler):
    """When fit() logs the end of each epoch (after its checkpoint): the wall time between two
    epochs beyond the later one's loop is the per-epoch overhead."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.times: dict[str, list[float]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        if " epoch %d/%d" in str(record.msg) and args:
            self.times.setdefault(str(args[0]), []).append(record.created)


@dataclass
class Run:
    """One stage run: its wall time split into training loops, gaps between them and the rest."""

    wall: float
    epoch_seconds: list[float]
    epoch_images: list[float]
    gaps: list[float]  # per epoch after the first: wall time between epoch ends beyond the loop
    images: int  # X: the images the rest of the stage reads
    gpu_busy: float | None = None
    gpu_peak_bytes: int | None = None
    host_peak_bytes: int = 0
    cpu_busy: float | None = None

    @property
    def train_images(self) -> float:
        return self.epoch_images[-1] if self.epoch_images else 0.0

    @property
    def overhead(self) -> float:
        """o: the mean wall time between two epochs' loops."""
        return sum(self.gaps) / len(self.gaps) if self.gaps else 0.0

    @property
    def rest(self) -> float:
        """The stage's time outside its training loops and the gaps between epochs."""
        return self.wall - sum(self.epoch_seconds) - len(self.epoch_seconds) * self.overhead


def epoch_log(artifact: Path, desc: str) -> list[dict]:
    path = artifact / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [record for record in map(json.loads, filter(str.strip, lines)) if record.get("stage_step") == desc]


def run_stage(pipeline, stage: str, limit: int | None, sampler: Sampler | None, ends: EpochEnds, device) -> Run:
    import torch

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    ends.times.clear()
    before, start = cpu_times(), time.perf_counter()
    outcome = pipeline.run_stage(stage, force=True, limit=limit)
    if cuda:
        torch.cuda.synchronize(device)
    end = time.perf_counter()
    epochs = epoch_log(outcome.path, TRAINED[stage]) if stage in TRAINED else []
    seconds = [float(e["seconds"]) for e in epochs]
    images = [float(e["images_per_s"]) * float(e["seconds"]) for e in epochs]
    stamps = ends.times.get(TRAINED.get(stage, ""), [])
    gaps = [max(0.0, later - earlier - loop) for earlier, later, loop in zip(stamps, stamps[1:], seconds[1:])]
    data = pipeline.dataset
    splits = {"train": pipeline.cfg.data.train_split, "val": pipeline.cfg.data.val_split}
    count = sum(len(data.split(splits[s])[:limit]) for s in REST_SPLITS[stage])
    run = Run(end - start, seconds, images, gaps, count, cpu_busy=cpu_busy(before, cpu_times()))
    if sampler is not None:
        window = sampler.window(start, end)
        run.gpu_busy, run.host_peak_bytes = window["gpu_busy"], window["host_peak_bytes"]
    if cuda:
        run.gpu_peak_bytes = torch.cuda.max_memory_allocated(device)
    return run


# --------------------------------------------------------------------------------------------
# The model and the projection
# --------------------------------------------------------------------------------------------


def two_point(x_small: float, y_small: float, x_full: float, y_full: float) -> tuple[float, float]:
    """(a, b) of y = a + b x through the two runs, neither negative; where timing noise makes
    the line fall or start below zero, all of y_full is taken as proportional to x (a = 0)."""
    if x_full <= 0:
        return max(0.0, y_full), 0.0
    if x_full > x_small:
        b = (y_full - y_small) / (x_full - x_small)
        a = y_full - b * x_full
        if b >= 0 and a >= 0:
            return a, b
    return 0.0, max(0.0, y_full) / x_full


@dataclass
class StageModel:
    rate: float | None  # r, training images per second (epoch 2)
    warmup: float
    overhead_fixed: float  # o = overhead_fixed + overhead_per_image x N
    overhead_per_image: float
    fixed: float  # a
    per_image: float  # b

    def seconds(self, epochs: int, train_images: float, images: float) -> float:
        training = 0.0
        if self.rate:
            training = self.warmup + epochs * (
                train_images / self.rate + self.overhead_fixed + self.overhead_per_image * train_images
            )
        return training + self.fixed + self.per_image * images


def stage_model(full: Run, small: Run) -> StageModel:
    rate = None
    if full.epoch_seconds and full.epoch_seconds[-1] > 0:
        rate = full.epoch_images[-1] / full.epoch_seconds[-1]
    warmup = max(0.0, full.epoch_seconds[0] - full.epoch_images[0] / rate) if rate else 0.0
    o_fixed, o_per_image = two_point(small.train_images, small.overhead, full.train_images, full.overhead)
    fixed, per_image = two_point(small.images, small.rest, full.images, full.rest)
    return StageModel(rate, warmup, o_fixed, o_per_image, fixed, per_image)


def target_counts(stage: str, cfg, target: Target) -> tuple[int, float, int]:
    """(epochs, training images per epoch, images X) of the published run of `target`."""
    sizes = {"train": target.train, "val": target.val}
    images = sum(sizes[s] for s in REST_SPLITS[stage])
    if stage == "cam":
        return cfg.cam.epochs, target.train, images
    if stage == "irn":
        positives = target.positive_fraction if cfg.irn.positive_only else 1.0
        return cfg.irn.epochs, target.train * positives, images
    if stage == "seg":
        kept = 1 - cfg.seg.holdout_fraction if cfg.seg.checkpoint == "pseudo_holdout" else 1.0
        return cfg.seg.epochs, target.train * kept, images
    return 0, 0.0, images


# --------------------------------------------------------------------------------------------
# One dataset
# --------------------------------------------------------------------------------------------


def slice_config(name: str, root: Path, workdir: Path, device: str, workers: int, batch_cap: dict):
    from pipeline.config import load_config

    target = TARGETS[name]
    overrides = [
        f"data.root={root}",
        f"run.workdir={workdir}",
        f"run.device={device}",
        f"run.workers={workers}",
        "cam.weights=null",
        "seg.encoder_weights=null",
        f"cam.epochs={SLICE_EPOCHS}",
        f"irn.epochs={SLICE_EPOCHS}",
        f"seg.epochs={SLICE_EPOCHS}",
    ]
    published = load_config([ROOT / target.config])
    for section in ("cam", "irn", "seg"):  # from random weights the published rates diverge (a NaN loss stops a stage)
        overrides.append(f"{section}.lr={getattr(published, section).lr / LR_DIVISOR:g}")
    if published.irn.backbone_init == "imagenet":
        overrides.append("irn.backbone_init=cam")
    for section, cap in batch_cap.items():
        if getattr(published, section).batch_size > cap:
            overrides.append(f"{section}.batch_size={cap}")
    return published, load_config([ROOT / target.config], overrides)


def batch_caps(cfg, data) -> tuple[int, dict]:
    """The small run's images per split, and the batch sizes (where smaller than configured)
    that let both runs train at least one whole batch. Under irn.positive_only the small run
    reaches at least 2 positive images (IRN training needs images with a class)."""
    train = data.split(cfg.data.train_split)
    small = max(2, min(SMALL, len(train) // 2))
    if cfg.irn.positive_only:
        positives = [k for k, image_id in enumerate(train) if data.label_vector(image_id).any()]
        if len(positives) < 3:
            raise SystemExit(f"{len(positives)} positive train images in the slice: raise --siim-n")
        small = max(small, positives[1] + 1)
    seg_items = small
    if cfg.seg.checkpoint == "pseudo_holdout":  # as stages.seg.stage.split_holdout counts
        seg_items -= min(small - 1, max(1, round(cfg.seg.holdout_fraction * small)))
    return small, {"cam": small, "seg": seg_items}


def measure_dataset(name: str, args, device, folder: Path, sampler: Sampler | None, ends: EpochEnds) -> dict:
    from data.layout import PreparedDataset
    from pipeline.runner import Pipeline

    target = TARGETS[name]
    started = time.perf_counter()
    images = args.n if name == "voc" else args.siim_n
    root = make_dataset(name, folder / "data", images, args.size, args.prepare_workers)
    prepare_seconds = time.perf_counter() - started
    data = PreparedDataset(root)
    published, _ = slice_config(name, root, folder / "work", args.device, args.workers, {})
    train_count = len(data.split(published.data.train_split))
    small, caps = batch_caps(published, data)
    published, cfg = slice_config(name, root, folder / "work", args.device, args.workers, caps)
    changed = [o for o in cfg.overrides if o.split("=")[0].endswith("batch_size")]
    print(
        f"\n== {name}: {images} images of {args.size} px written and prepared in {prepare_seconds:.1f} s "
        f"(train {train_count}, val {len(data.split(published.data.val_split))}); small runs: --limit {small}"
        + (f"; batches lowered to fit the slice: {', '.join(changed)}" if changed else ""),
        flush=True,
    )
    pipeline = Pipeline(cfg)
    full: dict[str, Run] = {}
    for stage in STAGES:
        full[stage] = run_stage(pipeline, stage, None, sampler, ends, device)
        print(stage_line(stage, full[stage]), flush=True)
    small_runs: dict[str, Run] = {}
    for stage in STAGES:
        small_runs[stage] = run_stage(pipeline, stage, small, None, ends, device)
        print(f"   {stage} --limit {small}: {small_runs[stage].wall:.1f} s", flush=True)

    rows = []
    for stage in STAGES:
        model = stage_model(full[stage], small_runs[stage])
        epochs, train_images, read = target_counts(stage, published, target)
        rows.append(
            {
                "stage": stage,
                "full": asdict(full[stage]),
                "small": asdict(small_runs[stage]),
                "model": asdict(model),
                "target": {"epochs": epochs, "train_images": train_images, "images": read},
                "projected_seconds": model.seconds(epochs, train_images, read),
            }
        )
    return {
        "dataset": name,
        "target": asdict(target),
        "images": images,
        "size": args.size,
        "train": train_count,
        "small_limit": small,
        "overrides": list(cfg.overrides),
        "prepare_seconds": prepare_seconds,
        "stages": rows,
        "measured_seconds": sum(r["full"]["wall"] + r["small"]["wall"] for r in rows),
        "projected_seconds": sum(r["projected_seconds"] for r in rows),
    }


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / GIB:.2f}"


def stage_line(stage: str, run: Run) -> str:
    train = (
        f"{sum(run.epoch_seconds):.1f} s training ({run.train_images / run.epoch_seconds[-1]:.1f} img/s in "
        f"epoch {len(run.epoch_seconds)})"
        if run.epoch_seconds
        else "no training"
    )
    return (
        f"   {stage}: {run.wall:.1f} s for {run.images} images ({run.images / run.wall:.2f} img/s); {train}; "
        f"GPU busy {percent(run.gpu_busy)}, GPU peak {gib(run.gpu_peak_bytes)} GiB, host peak "
        f"{gib(run.host_peak_bytes)} GiB, CPU busy {percent(run.cpu_busy)}"
    )


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f}"


def measured_table(result: dict) -> list[str]:
    lines = [
        "| stage | slice images | wall s | img/s | training s | train img/s (epoch 2) | other s | GPU busy "
        "| GPU peak GiB | host peak GiB | CPU busy |",
        "|---|" + "---|" * 10,
    ]
    for row in result["stages"]:
        run, model = Run(**row["full"]), row["model"]
        rate = f"{model['rate']:.1f}" if model["rate"] else "-"
        lines.append(
            f"| {row['stage']} | {run.images} | {run.wall:.1f} | {run.images / run.wall:.2f} | "
            f"{sum(run.epoch_seconds):.1f} | {rate} | {run.wall - sum(run.epoch_seconds):.1f} | "
            f"{percent(run.gpu_busy)} | {gib(run.gpu_peak_bytes)} | {gib(run.host_peak_bytes)} | "
            f"{percent(run.cpu_busy)} |"
        )
    return lines


def projection_table(result: dict) -> list[str]:
    target = result["target"]
    lines = [
        f"| stage | epochs | train images/epoch | images read | warm-up s | s per epoch | fixed s "
        f"| ms per image | projected min ({target['name']}) |",
        "|---|" + "---|" * 8,
    ]
    for row in result["stages"]:
        model, goal = row["model"], row["target"]
        per_epoch = "-"
        if model["rate"]:
            seconds = (
                goal["train_images"] / model["rate"]
                + model["overhead_fixed"]
                + model["overhead_per_image"] * goal["train_images"]
            )
            per_epoch = f"{seconds:.1f}"
        lines.append(
            f"| {row['stage']} | {goal['epochs'] or '-'} | {goal['train_images']:.0f} | {goal['images']} | "
            f"{model['warmup']:.1f} | {per_epoch} | {model['fixed']:.1f} | {1000 * model['per_image']:.1f} | "
            f"{minutes(row['projected_seconds'])} |"
        )
    lines.append(f"| **total** | | | | | | | | **{minutes(result['projected_seconds'])}** |")
    return lines


def machine(device) -> dict:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GIB, 1))
    return info


def report(results: list[dict], info: dict, gpu_source: str, total_seconds: float) -> str:
    where = info.get("gpu", "no GPU") + f"; {info['cpu']}, {info['cores']} cores; torch {info['torch']}"
    lines = [f"Machine: {where}. GPU utilisation from: {gpu_source}. Bench wall time {total_seconds / 60:.1f} min.", ""]
    for result in results:
        lines += (
            [
                f"### {result['dataset']}: {result['images']} images of {result['size']} px "
                f"(train {result['train']}; prepared in {result['prepare_seconds']:.1f} s)",
                "",
                "Measured (whole slice, 2 epochs per training stage):",
                "",
            ]
            + measured_table(result)
            + [
                "",
                f"Projected for {result['target']['name']} ({result['target']['train']:,} train, "
                f"{result['target']['val']:,} val images) at {result['target']['config']}'s epochs:",
                "",
            ]
            + projection_table(result)
            + [""]
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--n", type=int, default=1024, help="images of the VOC slice")
    parser.add_argument(
        "--siim-n", type=int, default=None, help="images of the SIIM slice (default: half of --n, at least 32)"
    )
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--datasets", default="voc,siim", help="comma-separated: voc, siim")
    parser.add_argument("--workers", type=int, default=-1, help="run.workers (-1: one per core, at most 8)")
    parser.add_argument(
        "--out", type=Path, default=Path("runs/pipeline-scale"), help="folder for the JSON and Markdown"
    )
    parser.add_argument("--keep", type=Path, default=None, help="write the data and artifacts here and keep them")
    parser.add_argument("--progress", action="store_true", help="draw the stages' progress bars")
    args = parser.parse_args()
    names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in names if d not in TARGETS]
    if unknown or not names:
        parser.error(f"--datasets: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(TARGETS)}")
    args.siim_n = args.siim_n or max(32, args.n // 2)
    if args.n < 8 or args.siim_n < 32:
        parser.error(
            "--n must be at least 8 and --siim-n at least 32 (both runs of every stage need a batch, "
            "and the IRN positive images)"
        )
    if not args.progress:
        os.environ["TQDM_DISABLE"] = "1"  # read when tqdm is imported, below
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from stages.common.runtime import resolve_device, worker_count

    device = resolve_device(args.device)
    args.prepare_workers = len(os.sched_getaffinity(0))
    print(
        f"pipeline scale bench: {', '.join(names)}, --n {args.n}, --size {args.size}, device {device}, "
        f"{worker_count(args.workers)} workers",
        flush=True,
    )
    logging.getLogger("wss").setLevel(logging.INFO)  # fit's epoch records (the root logger prints warnings only)
    ends = EpochEnds()
    logging.getLogger("wss.train").addHandler(ends)
    sampler = Sampler((device.index or 0) if device.type == "cuda" else None)
    info = machine(device)
    started = time.perf_counter()
    results = []
    folder = args.keep or Path(tempfile.mkdtemp(prefix="wss-scale-"))
    try:
        for name in names:
            results.append(measure_dataset(name, args, device, folder / name, sampler, ends))
            print(f"   {name}: measured in {results[-1]['measured_seconds']:.0f} s", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        sampler.stop()
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    total = time.perf_counter() - started
    text = report(results, info, sampler.gpu_source, total)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pipeline_scale.md").write_text(text + "\n")
    (args.out / "pipeline_scale.json").write_text(
        json.dumps(
            {
                "machine": info,
                "gpu_utilisation_source": sampler.gpu_source,
                "bench_seconds": total,
                "args": {k: str(v) for k, v in vars(args).items()},
                "results": results,
            },
            indent=1,
        )
        + "\n"
    )
    for result in results:
        verdict = "within" if result["projected_seconds"] <= 30 * 60 else "over"
        print(
            f"{result['target']['name']}: projected {minutes(result['projected_seconds'])} min on this machine "
            f"({verdict} 30 min)"
        )
    print(f"written: {args.out / 'pipeline_scale.md'}, {args.out / 'pipeline_scale.json'}")


if __name__ == "__main__":
    main()
