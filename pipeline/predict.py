"""`wss predict`: masks, overlays (and a Kaggle CSV for binary tasks) for new images and DICOMs.

pipeline/cli.py registers it; the work is done by stages.seg.predict.predict_inputs, this
module only finds the model and reports.
"""

from __future__ import annotations

from pathlib import Path

import click

from data.errors import DataError
from data.images import MAX_IMAGE_PIXELS
from pipeline.commandline import WssCommand, config_options, load


@click.command("predict", cls=WssCommand)
@config_options(
    config_help="YAML run config (its seg artifact is the model); repeat to layer a preset over it.",
    override_help="Override a config value, e.g. -o run.device=cpu (repeatable). The settings "
    "that made the model must match its run's; --threshold changes the binary cut.",
)
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--probabilities", is_flag=True, help="Also save the probabilities as float16 .npy files.")
@click.option(
    "--artifact",
    type=click.Path(path_type=Path),
    default=None,
    help="A seg artifact folder (or its model.safetensors; an older model.pt is read safely) "
    "to use instead of the config's.",
)
@click.option(
    "--threshold",
    type=click.FloatRange(0, 1),
    default=None,
    help="Binary models: foreground probability cut (default: the model's seg.threshold).",
)
@click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    default=MAX_IMAGE_PIXELS,
    show_default=True,
    help="Largest image accepted, in pixels (width x height; default 16384 x 16384); a larger one is "
    "refused from its header, before it is decoded. Decoding takes about 4 bytes a pixel for colour.",
)
def predict_command(
    config_path: tuple[Path, ...],
    overrides: tuple[str, ...],
    inputs: tuple[Path, ...],
    out: Path,
    probabilities: bool,
    artifact: Path | None,
    threshold: float | None,
    max_pixels: int,
):
    """Predict image files, folders (recursive) and DICOMs: masks/, overlays/, submission.csv.

    \b
    Example:
      wss predict -c configs/siim.yaml scans/ one.dcm --out predictions/
    Exit code 1 when any input failed (the others are still written), 2 on a config/model error.
    """
    from stages.common.runtime import worker_count
    from stages.seg.predict import predict_inputs

    cfg = load(config_path, overrides, show_logs=False)
    if artifact is None:
        from pipeline.runner import Pipeline

        pipeline = Pipeline(cfg)
        artifact, dataset = pipeline.require("seg"), pipeline.dataset
    else:
        dataset = _dataset_or_none(cfg.data.root)
    report = predict_inputs(
        artifact,
        list(inputs),
        out,
        probabilities=probabilities,
        device=cfg.run.device,
        classes=dataset.classes if dataset else None,
        task=dataset.task if dataset else None,
        threshold=threshold,
        workers=min(4, worker_count(cfg.run.workers)),
        max_pixels=max_pixels,
        cam_artifact=cam_artifact_of(artifact),
    )
    click.echo(
        f"predicted {len(report.written)} file(s) into {out}"
        + (f"; submission: {report.submission}" if report.submission else "")
    )
    for line in report.failures:
        click.echo(f"failed: {line}", err=True)
    if report.failures:
        click.echo(f"{len(report.failures)} input(s) failed", err=True)
        click.get_current_context().exit(1)


def cam_artifact_of(artifact: Path) -> Path | None:
    """The cam artifact a seg artifact was computed from, as its manifest names it (the
    classifier of `seg.image_score: cam | mean`); None for a model file shared without its run
    folder, or a cam artifact no longer there."""
    import json

    folder = Path(artifact) if Path(artifact).is_dir() else Path(artifact).parent
    try:
        cam = json.loads((folder / "manifest.json").read_text())["inputs"]["cam"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Path(cam) if isinstance(cam, str) and Path(cam).is_dir() else None


def _dataset_or_none(root: str):
    """The config's dataset, to check the model's classes against; None where it is not on this machine."""
    from data.layout import PreparedDataset

    try:
        return PreparedDataset(root)
    except DataError:
        return None
