"""The `wss` command line: every command is registered here, one per job (`compare`, `tune` and
`predict` are written in their own modules). What the commands share (-c/-o, config loading,
logging, one-line user errors) is pipeline/commandline.py."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from data.errors import WssError

# before any module that imports torch or tqdm: it sets the environment they read
from pipeline.commandline import WssGroup, config_options, load, setup_logging
from pipeline.compare import compare_command
from pipeline.predict import predict_command
from pipeline.tune import tune_command

log = logging.getLogger("wss")


# The commands that run as several processes under torchrun (training data-parallel,
# per-image work sharded by rank); every other command is one process's job.
TORCHRUN_COMMANDS = ("run", "run-stage", "pseudo-labels")


@click.group(cls=WssGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def main(ctx):
    """wss: weakly supervised semantic segmentation, from image-level labels to pixel masks.

    \b
    Quick start:
      wss prepare synthetic --out runs/data/synthetic
      wss run -c configs/demo.yaml

    \b
    Several GPUs (or processes):
      torchrun --nproc_per_node=4 --no-python wss run -c configs/siim.yaml
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and ctx.invoked_subcommand not in TORCHRUN_COMMANDS:
        raise WssError(
            f"`wss {ctx.invoked_subcommand}` runs in one process; under torchrun ({world} processes) "
            f"only {', '.join(TORCHRUN_COMMANDS)} do"
        )


def start_processes(cfg) -> bool:
    """Join torchrun's process group (a no-op without torchrun); True on the rank that reports.
    The command calls `finish_processes` when its work is done."""
    from stages.common import distributed

    distributed.init_from_env(cfg.run.device)
    return distributed.is_main()


def finish_processes() -> None:
    from stages.common import distributed

    distributed.finish()


# ------------------------------------------------------------------------------------ prepare
@main.group()
def prepare():
    """Convert a raw dataset into the prepared layout every stage reads."""


@prepare.command("synthetic")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--n",
    default=400,
    show_default=True,
    type=click.IntRange(min=2),
    help="Number of images (a fifth of them form the val split).",
)
@click.option(
    "--size",
    default=128,
    show_default=True,
    type=click.IntRange(min=32),
    help="Image side in pixels (at least 32: room for a body and its mark).",
)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option(
    "--variant",
    type=click.Choice(["multiclass", "binary"]),
    default="multiclass",
    show_default=True,
    help="binary mimics SIIM: one finding class, many negative images.",
)
@click.option(
    "--mark-scale",
    default=1.5,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Size of the class marks; smaller is harder for the classifier.",
)
@click.option(
    "--negatives",
    default=0.5,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="binary variant: the share of images without a finding (SIIM: about 0.78).",
)
@click.option(
    "--tune",
    "tune_count",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Also write splits/tune.txt: this many train images drawn with --seed, for data.tune_split "
    "(they stay in train; every stage leaves them out of its scores).",
)
@click.option("--force", is_flag=True, help="Rewrite even if an identical dataset is already there.")
def prepare_synthetic(
    out: Path,
    n: int,
    size: int,
    seed: int,
    variant: str,
    mark_scale: float,
    negatives: float,
    tune_count: int,
    force: bool,
):
    """Generate the synthetic benchmark (deterministic in --seed).

    \b
    Example:
      wss prepare synthetic --out runs/data/synthetic --n 400 --size 128 --seed 0
      wss prepare synthetic --out runs/data/synthetic-tune --tune 16
    """
    import json

    from tqdm.auto import tqdm

    from data.layout import create_folder, write_text_atomic
    from data.synthetic import SyntheticSpec, train_size, write_synthetic

    setup_logging()
    spec = SyntheticSpec(
        n=n, size=size, seed=seed, variant=variant, mark_scale=mark_scale, positive_fraction=round(1 - negatives, 6)
    )
    if tune_count > train_size(spec):
        raise WssError(f"--tune {tune_count}: the train split has only {train_size(spec)} images")
    stamp = out / "synthetic.json"
    # the stamp names the tuning split only when there is one: a dataset prepared without it keeps its stamp
    wanted = json.dumps({**spec.__dict__, **({"tune": tune_count} if tune_count else {})}, sort_keys=True)
    if not force and stamp.is_file() and stamp.read_text() == wanted and (out / "dataset.json").is_file():
        click.echo(f"synthetic dataset already prepared in {out} (same spec), skipping")
        return
    create_folder(out)
    (out / "dataset.json").unlink(missing_ok=True)  # until rewritten, it is not a dataset,
    stamp.unlink(missing_ok=True)  # and its spec is unknown: a killed run leaves neither behind
    write_synthetic(out, spec, progress=lambda ids: tqdm(ids, desc="synthetic", unit="img"), tune=tune_count)
    write_text_atomic(stamp, wanted)
    tuned = f" (tuning split: {tune_count} train images in splits/tune.txt, for -o data.tune_split=tune)"
    click.echo(f"wrote {n} images to {out}" + (tuned if tune_count else ""))


def finish_prepare(report) -> None:
    """Print the preparation summary; fail only when nothing usable was produced."""
    click.echo(report.summary())
    if not report.ok:
        raise click.ClickException("nothing usable was prepared (see the report above)")


@prepare.command("siim")
@click.option(
    "--dicom-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder searched recursively for .dcm files.",
)
@click.option(
    "--rle-csv",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="train-rle.csv (with or without header, BOM and CRLF accepted).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--size", default=1024, show_default=True, help="Image side after resizing (0 keeps it).")
@click.option("--val-fraction", default=0.1, show_default=True)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--workers", default=1, show_default=True, help="Worker processes.")
@click.option(
    "--force",
    is_flag=True,
    help="Redo every image instead of keeping those whose inputs are unchanged (files whose "
    "content comes out the same are kept); also accepts another --size.",
)
def prepare_siim_command(
    dicom_dir: Path, rle_csv: Path, out: Path, size: int, val_fraction: float, seed: int, workers: int, force: bool
):
    """SIIM-ACR Pneumothorax: DICOMs + RLE CSV -> prepared layout (resumable: a rerun redoes what
    changed in the inputs and removes what they lost).

    \b
    Example:
      wss prepare siim --dicom-dir siim/dicom-images-train --rle-csv siim/train-rle.csv \\
          --out runs/data/siim --size 1024 --workers 8
    """
    from data.siim import prepare_siim

    setup_logging()
    finish_prepare(prepare_siim(dicom_dir, rle_csv, out, size or None, val_fraction, seed, workers, force=force))


@prepare.command("voc")
@click.option(
    "--voc-root",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="VOCdevkit/VOC2012 (or a folder that contains it).",
)
@click.option(
    "--sbd-root",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder with SegmentationClassAug (adds the 10,582-image train_aug split).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--workers", default=1, show_default=True, help="Worker processes.")
@click.option(
    "--force",
    is_flag=True,
    help="Redo every image instead of keeping those whose inputs are unchanged (files whose "
    "content comes out the same are kept).",
)
def prepare_voc_command(voc_root: Path, sbd_root: Path | None, out: Path, workers: int, force: bool):
    """PASCAL VOC 2012 (+ SBD) -> prepared layout (a rerun redoes what changed in the inputs and
    removes what they lost).

    \b
    Example:
      wss prepare voc --voc-root VOCdevkit/VOC2012 --sbd-root SBD --out runs/data/voc --workers 8
    """
    from data.voc import prepare_voc

    setup_logging()
    finish_prepare(prepare_voc(voc_root, out, sbd_root, workers, force=force))


@prepare.command("nih")
@click.option("--images", "images_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--data-entry",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Data_Entry_2017.csv (image-level findings).",
)
@click.option(
    "--boxes",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="BBox_List_2017.csv (localization boxes, evaluation only).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--size",
    default=0,
    show_default=True,
    help="Image side after resizing, boxes scaled with it: the size the config trains at (0 keeps the native 1024).",
)
@click.option("--val-fraction", default=0.1, show_default=True)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--workers", default=1, show_default=True, help="Worker processes.")
@click.option(
    "--force",
    is_flag=True,
    help="Redo every image instead of keeping those whose inputs are unchanged (files whose "
    "content comes out the same are kept); also accepts another --size.",
)
def prepare_nih_command(
    images_dir: Path,
    data_entry: Path,
    boxes: Path,
    out: Path,
    size: int,
    val_fraction: float,
    seed: int,
    workers: int,
    force: bool,
):
    """NIH ChestX-ray14: images + findings + boxes -> prepared layout (resumable: a rerun redoes
    what changed in the inputs and removes what they lost).

    \b
    Example:
      wss prepare nih --images nih/images --data-entry nih/Data_Entry_2017.csv \\
          --boxes nih/BBox_List_2017.csv --out runs/data/nih --size 512 --workers 8
    """
    from data.nih import prepare_nih

    setup_logging()
    finish_prepare(
        prepare_nih(images_dir, data_entry, boxes, out, val_fraction, seed, workers, size=size or None, force=force)
    )


@prepare.command("folder")
@click.option(
    "--images",
    "images_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder searched recursively for images (any format Pillow reads) and DICOMs; an image's "
    "id is its path below it without the suffix.",
)
@click.option(
    "--labels",
    "labels_csv",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="CSV naming each image (id or path) with its classes: long 'image,labels' (names "
    "separated by |, ; or spaces) or wide (one 1/0/-1/blank column per class).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--masks",
    "masks_dir",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="Ground-truth masks for scoring only: <id>.png class indices (255 ignore), or 0/255 for one class.",
)
@click.option(
    "--splits",
    "splits_dir",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of <name>.txt image lists; without it a label-stratified train/val split.",
)
@click.option(
    "--classes",
    "classes_file",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Class names, one a line, in index order (default: the wide CSV's columns / the sorted names).",
)
@click.option(
    "--uncertain",
    type=click.Choice(["ignore", "positive", "negative"]),
    default="ignore",
    show_default=True,
    help="A -1 label: left out of the classifier's loss (and the image out of IRN and "
    "segmenter training), or taken as present / absent.",
)
@click.option(
    "--blank",
    type=click.Choice(["negative", "uncertain"]),
    default="negative",
    show_default=True,
    help="A blank cell of the wide layout (CheXpert: not mentioned).",
)
@click.option(
    "--size",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Longer image side after resizing, aspect kept (0 keeps each image's size).",
)
@click.option("--val-fraction", default=0.1, show_default=True)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option(
    "--name", default=None, help="Dataset name, the folder of its artifacts (default: the --out folder's name)."
)
@click.option("--workers", default=1, show_default=True, help="Worker processes.")
@click.option(
    "--force",
    is_flag=True,
    help="Redo every image instead of keeping those whose inputs are unchanged (files whose "
    "content comes out the same are kept); also accepts another --size.",
)
def prepare_folder_command(
    images_dir: Path,
    labels_csv: Path,
    out: Path,
    masks_dir: Path | None,
    splits_dir: Path | None,
    classes_file: Path | None,
    uncertain: str,
    blank: str,
    size: int,
    val_fraction: float,
    seed: int,
    name: str | None,
    workers: int,
    force: bool,
):
    """Your own dataset: a folder of images + a label CSV -> prepared layout (resumable: a rerun
    redoes what changed in the inputs and removes what they lost).

    \b
    Example:
      wss prepare folder --images xrays/ --labels findings.csv --out runs/data/xrays --size 512 --workers 8
    """
    from data.folder import prepare_folder

    setup_logging()
    finish_prepare(
        prepare_folder(
            images_dir,
            labels_csv,
            out,
            masks_dir=masks_dir,
            splits_dir=splits_dir,
            classes_file=classes_file,
            uncertain=uncertain,
            blank=blank,
            size=size or None,
            val_fraction=val_fraction,
            seed=seed,
            name=name,
            workers=workers,
            force=force,
        )
    )


@prepare.command("coco")
@click.option(
    "--annotations",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="instances_train2014.json (its images form the train split).",
)
@click.option(
    "--images",
    "images_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The train2014 image folder.",
)
@click.option(
    "--val-annotations",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="instances_val2014.json (its images form the val split).",
)
@click.option(
    "--val-images",
    "val_images_dir",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="The val2014 image folder.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--workers", default=1, show_default=True, help="Worker processes.")
@click.option(
    "--force",
    is_flag=True,
    help="Redo every image instead of keeping those whose inputs are unchanged (files whose "
    "content comes out the same are kept).",
)
def prepare_coco_command(
    annotations: Path,
    images_dir: Path,
    val_annotations: Path | None,
    val_images_dir: Path | None,
    out: Path,
    workers: int,
    force: bool,
):
    """MS COCO 2014: instances JSON + images -> prepared layout, 80 classes, semantic masks from
    the instances (a rerun redoes what changed in the inputs and removes what they lost).

    \b
    Example:
      wss prepare coco --annotations coco/annotations/instances_train2014.json --images coco/train2014 \\
          --val-annotations coco/annotations/instances_val2014.json --val-images coco/val2014 \\
          --out runs/data/coco --workers 8
    """
    from data.coco import prepare_coco

    setup_logging()
    finish_prepare(prepare_coco(annotations, images_dir, out, val_annotations, val_images_dir, workers, force=force))


# ---------------------------------------------------------------------------------- run stages
@main.command("run-stage")
@click.argument("stage")
@config_options
@click.option("--force", is_flag=True, help="Recompute even if an up-to-date artifact exists.")
@click.option("--resume", is_flag=True, help="Continue an interrupted training from its last checkpoint.")
@click.option(
    "--limit", type=click.IntRange(min=1), default=None, help="Use only the first N images of each split (quick tries)."
)
def run_stage(stage: str, config_path: tuple[Path, ...], overrides, force: bool, resume: bool, limit: int | None):
    """Run one stage (its inputs must be up to date).

    \b
    Example:
      wss run-stage cam -c configs/demo.yaml -o cam.epochs=3
    """
    from pipeline.report import print_outcomes
    from pipeline.runner import Pipeline

    cfg = load(config_path, overrides)
    reports = start_processes(cfg)
    pipeline = Pipeline(cfg)
    outcome = pipeline.run_stage(stage, force=force, resume=resume, limit=limit)
    if reports:
        print_outcomes([outcome])
    finish_processes()


@main.command("run")
@config_options
@click.option("--until", default=None, help="Last stage to run.")
@click.option("--force", "force", multiple=True, help="Recompute this stage and everything after it (repeatable).")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the stage that was interrupted from its .partial directory (training from its last "
    "checkpoint) instead of starting it again.",
)
def run(config_path: tuple[Path, ...], overrides, until: str | None, force: tuple[str, ...], resume: bool):
    """Run the whole chain, skipping stages whose artifact is up to date.

    \b
    Example:
      wss run -c configs/demo.yaml
      wss run -c configs/demo.yaml --until cam --force cam
      wss run -c configs/demo.yaml --resume     # after Ctrl-C in the middle of a stage
    """
    from pipeline.runner import Pipeline

    cfg = load(config_path, overrides)
    reports = start_processes(cfg)
    pipeline = Pipeline(cfg)
    for name in force:
        pipeline.stage(name)
    outcomes = pipeline.run(until=until, force=force, resume=resume)
    if reports:
        print_run_report(cfg, pipeline, outcomes)
    finish_processes()


def print_run_report(cfg, pipeline, outcomes) -> None:
    """The stage table, the overlay grid of the last stage and report.md (with report.html)."""
    from pipeline.report import print_outcomes, write_run_report

    print_outcomes(outcomes)
    grids, captions = {}, {}
    grid_stage = GRID_FOR_STAGE[outcomes[-1].stage]
    try:
        grids[grid_stage], captions[grid_stage] = overlay_grid(cfg, pipeline, grid_stage, n=8)
    except Exception as error:  # a picture must never cost the user the run's results
        log.warning("could not draw the overlay grid: %s", error)
    try:
        settings = {o.stage: pipeline.setting_differences(o.stage) for o in outcomes}
    except Exception as error:  # the report goes out without the settings
        log.warning("could not compare the settings with the shipped config: %s", error)
        settings = {}
    try:
        splits = {"train": cfg.data.train_split, "val": cfg.data.val_split}
        report = write_run_report(pipeline.store.root, cfg.source, outcomes, splits, grids, settings, captions)
    except OSError as error:  # e.g. a read-only workdir whose stages were all cached
        log.warning("could not write the run report in %s (%s)", pipeline.store.root, error.strerror)
        return
    click.echo(f"\nreport: {report}" + (f"  overlays: {grids[grid_stage]}" if grids else ""))


GRID_FOR_STAGE = {"cam": "cam", "irn": "irn", "pseudo": "irn", "seg": "seg"}


def overlay_grid(cfg, pipeline, stage: str, n: int, out: Path | None = None) -> tuple[Path, list[str]]:
    """The overlay grid of the first `n` train images over every up-to-date artifact, and a caption
    line per row (the full image id, which the picture may shorten)."""
    from pipeline.visualize import draw_grid, grid_captions, grid_images
    from stages.common.runtime import resolve_device

    artifacts = {name: path for name in pipeline.stages if (path := pipeline.artifact(name)) is not None}
    if "cam" not in artifacts:
        raise WssError("no up-to-date cam artifact for this config: run `wss run` first (see `wss status`)")
    images = grid_images(pipeline.dataset, pipeline.dataset.split(cfg.data.train_split), n)
    out = out or pipeline.store.root / f"overlays-{stage}.png"
    device = resolve_device(cfg.run.device)
    grid = draw_grid(pipeline.dataset, artifacts, stage, images, out, device, cfg.seg.threshold)
    return grid, grid_captions(pipeline.dataset, images)


@main.command("pseudo-labels")
@config_options
@click.option("--force", is_flag=True, help="Regenerate even if up to date.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run, keeping the labels already written.")
def pseudo_labels(config_path: tuple[Path, ...], overrides, force: bool, resume: bool):
    """Regenerate pseudo-labels from the cached IRN (walk and threshold options only; no retraining).

    The cam and irn artifacts must be up to date: an option that would retrain them is an error
    naming it (use `wss run --until pseudo` for that).

    \b
    Example:
      wss pseudo-labels -c configs/demo.yaml -o irn.sem_seg_bg_threshold=0.3
    """
    from pipeline.report import print_outcomes
    from pipeline.runner import Pipeline

    cfg = load(config_path, overrides)
    reports = start_processes(cfg)
    pipeline = Pipeline(cfg)
    outcome = pipeline.run_stage("pseudo", force=force, resume=resume)
    if reports:
        print_outcomes([outcome])
    finish_processes()


@main.command("visualize")
@config_options
@click.option(
    "--stage",
    type=click.Choice(["cam", "irn", "seg"]),
    default="seg",
    show_default=True,
    help="How far along the chain the columns go.",
)
@click.option("--n", default=16, show_default=True, type=click.IntRange(min=1), help="Number of images (rows).")
@click.option(
    "--out",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="PNG to write (default: <workdir>/<dataset>/overlays-<stage>.png).",
)
def visualize(config_path: tuple[Path, ...], overrides, stage: str, n: int, out: Path | None):
    """A grid PNG: image, CAM heatmap, seeds, boundary, pseudo-label, prediction, ground truth.

    \b
    Example:
      wss visualize -c configs/demo.yaml --stage irn --n 16
    """
    from pipeline.runner import Pipeline

    cfg = load(config_path, overrides)
    path, _ = overlay_grid(cfg, Pipeline(cfg), stage, n, out)
    click.echo(f"wrote {path}")


@main.command("status")
@config_options
def status(config_path: tuple[Path, ...], overrides):
    """Show every stage as up to date, stale (and why), interrupted (what --resume continues) or missing.

    \b
    Example:
      wss status -c configs/demo.yaml
    """
    from pipeline.runner import Pipeline

    cfg = load(config_path, overrides)
    for item in Pipeline(cfg).status():
        where = f"  {item.path}" if item.path else ""
        click.echo(f"{item.stage:8s} {item.summary}{where}")
        for reason in item.reasons:
            click.echo(f"           - {reason}")


@main.command("clean")
@config_options
@click.option("--yes", "delete", is_flag=True, help="Delete them (without it, only list what would go).")
def clean(config_path: tuple[Path, ...], overrides, delete: bool):
    """Remove the artifacts this config does not use (older settings, other compare methods,
    interrupted runs); keeps its own and any model its next run would reuse.

    \b
    Example:
      wss clean -c configs/demo.yaml          # list what would be removed and its size
      wss clean -c configs/demo.yaml --yes    # remove it
    """
    from pipeline.clean import clean as clean_artifacts
    from pipeline.runner import Pipeline
    from stages.common.tables import format_table

    cfg = load(config_path, overrides)
    pipeline = Pipeline(cfg)
    rows, freed, left = clean_artifacts(pipeline, delete)
    if rows:
        click.echo(format_table(rows, ["stage", "key", "what", "MiB", "modified", "differs in"], digits={"MiB": 1}))
    for why in left:
        click.echo(f"left alone: {why}", err=True)
    size = f"{freed / 2**20:.1f} MiB in {len(rows)} artifact(s)"
    if not rows:
        click.echo(f"nothing to clean in {pipeline.store.root}")
    elif delete:
        click.echo(f"removed {size} from {pipeline.store.root}")
    else:
        click.echo(f"would remove {size} from {pipeline.store.root}; run again with --yes to delete")


@main.command("evaluate")
@config_options
@click.option("--stage", "which", default="all", show_default=True, help="all, or one stage name.")
def evaluate(config_path: tuple[Path, ...], overrides, which: str):
    """Score the up-to-date artifacts where ground truth exists; write evaluation.csv/json.

    \b
    Example:
      wss evaluate -c configs/demo.yaml --stage cam
    """
    from pipeline.report import evaluate_artifacts

    cfg = load(config_path, overrides)
    evaluate_artifacts(cfg, which)


# -------------------------------------------------------------------------------------- config
@main.group()
def config():
    """Inspect run configs."""


@config.command("show")
@config_options
def config_show(config_path: tuple[Path, ...], overrides):
    """Print the resolved config (file + base + overrides, with every default).

    \b
    Example:
      wss config show -c configs/demo.yaml -o cam.epochs=3
    """
    cfg = load(config_path, overrides)
    click.echo(cfg.dump(), nl=False)


main.add_command(compare_command)
main.add_command(tune_command)
main.add_command(predict_command)

if __name__ == "__main__":
    main()
