"""Summary tables on screen and on disk."""

from __future__ import annotations

import csv
import datetime
import json
import logging
import math
from pathlib import Path

import click

from data.layout import json_text
from stages.common.tables import format_table, markdown_table

log = logging.getLogger("wss.report")
STAGE_COLUMNS = ["stage", "state", "seconds", "metric", "value", "failures", "artifact"]


def outcome_rows(outcomes) -> list[dict]:
    rows = []
    for o in outcomes:
        value = o.metrics.get(o.headline, math.nan)
        rows.append(
            {
                "stage": o.stage,
                "state": "cache hit" if o.state == "cached" else "ran",
                "seconds": round(o.seconds, 1),
                "metric": o.headline or "-",
                "value": value if isinstance(value, (int, float)) else math.nan,
                "failures": len(o.failures),
                "artifact": str(o.path),
            }
        )
    return rows


def print_outcomes(outcomes) -> None:
    rows = outcome_rows(outcomes)
    click.echo("")
    click.echo(format_table(rows, STAGE_COLUMNS, digits={"seconds": 1}))
    for o in outcomes:
        for failure in o.failures:
            click.echo(f"  {o.stage}: {failure}", err=True)


# Where each stage's metrics come from: (split, key prefix). Ground truth is read only here.
# "boxed": the cam localization scores of the images with boxes (NIH puts them in its test split).
SCORED = {
    "cam": [("train", "cam_"), ("boxed", "cam_")],
    "irn": [("train", "seed_")],
    "pseudo": [("train", "pseudo_")],
    "seg": [("val", "seg_val_"), ("train", "seg_train_")],
}
SUMMARY_METRICS = [
    "miou",
    "coverage",
    "kaggle_dice",
    "dice_pos",
    "iou_pos",
    "image_auc",
    "mask_point_accuracy",
    "point_accuracy",
]
BOXED_SPLIT = "test (boxed)"


def is_localization(name: str) -> bool:
    return name == "point_accuracy" or name.startswith(("point/", "iobb@", "pairs/"))


def metric_rows(stage: str, metrics: dict, splits: dict[str, str]) -> list[dict]:
    """One row per (stage, split) with the summary metrics and the per-class IoU; the boxed
    images' row has point localization and the mean IoBB accuracy at each threshold."""
    rows = []
    for split_role, prefix in SCORED.get(stage, []):
        values = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
        boxed = split_role == "boxed"
        values = {k: v for k, v in values.items() if is_localization(k) == boxed}
        if not any(name in values for name in SUMMARY_METRICS):
            continue
        row = {"stage": stage, "split": BOXED_SPLIT if boxed else splits.get(split_role, split_role)}
        row.update({name: values[name] for name in SUMMARY_METRICS if name in values})
        row.update({k[: -len("/mean")]: v for k, v in values.items() if k.startswith("iobb@") and k.endswith("/mean")})
        row.update({k: v for k, v in values.items() if k.startswith("iou/")})
        rows.append(row)
    return rows


def metric_columns(rows: list[dict]) -> tuple[list[str], list[str]]:
    """(summary metrics present in the rows, then IoBB accuracies; per-class IoU columns,
    background first, the classes in the order the stages wrote them)."""
    present = list(dict.fromkeys(k for r in rows for k in r))
    summary = [c for c in SUMMARY_METRICS if c in present] + [c for c in present if c.startswith("iobb@")]
    per_class = sorted((k for k in present if k.startswith("iou/")), key=lambda k: k != "iou/background")
    return summary, per_class


def print_metric_table(rows: list[dict]) -> list[str]:
    """Print the summary and per-class tables; returns the column order used."""
    summary, per_class = metric_columns(rows)
    click.echo(format_table(rows, ["stage", "split", *summary]))
    if per_class:
        click.echo("")
        click.echo(format_table(rows, ["stage", "split", *per_class]))
    return ["stage", "split", *summary, *per_class]


def evaluate_artifacts(cfg, which: str) -> list[dict]:
    """Re-score each up-to-date artifact against ground truth; one table, CSV + JSON on disk."""
    from pipeline.runner import Pipeline
    from stages.registry import STAGE_ORDER

    pipeline = Pipeline(cfg)
    names = STAGE_ORDER if which == "all" else [pipeline.stage(which).name]
    splits = {"train": cfg.data.train_split, "val": cfg.data.val_split}
    rows, found = [], 0
    for name in names:
        path = pipeline.artifact(name)
        if path is None:
            click.echo(f"{name}: no up-to-date artifact, skipped (see `wss status`)", err=True)
            continue
        found += 1
        metrics = pipeline.stage(name).evaluate(cfg, pipeline.dataset, path)
        pipeline.store.update_manifest(path, evaluation=metrics)
        stage_rows = metric_rows(name, metrics, splits)
        if not stage_rows:
            click.echo(f"{name}: no ground-truth masks to score against", err=True)
        rows.extend(stage_rows)
    if not found:
        from data.errors import WssError

        raise WssError(
            f"nothing to evaluate: no {'stage' if which == 'all' else which} artifact is up to date "
            f"for this config (run `wss run {cfg.cli_args()}`; `wss status` says why)"
        )
    if not rows:
        return rows
    columns = print_metric_table(rows)
    out = pipeline.store.root
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_table(out / "evaluation.csv", rows, columns)
        (out / "evaluation.json").write_text(json_text(rows, indent=1))
    except OSError as error:  # e.g. a read-only workdir: the table is on screen
        click.echo(f"could not write the evaluation table in {out} ({error.strerror})", err=True)
        return rows
    click.echo(f"\nwrote {out / 'evaluation.csv'} and evaluation.json")
    return rows


TIMING_COLUMNS = ["stage", "state", "started", "seconds", "epochs", "training_seconds", "images_per_s"]
DIFFERENCE_COLUMNS = ["setting", "this run", "reference"]


def stage_timings(outcome) -> dict:
    """When the stage's artifact was computed and how long it took: the whole stage, and its
    training epochs (from metrics.jsonl; none for a stage that does not train)."""
    from pipeline.charts import epoch_records, is_number

    row = {"stage": outcome.stage, "state": "cache hit" if outcome.state == "cached" else "ran"}
    try:
        started = json.loads((outcome.path / "manifest.json").read_text()).get("started")
    except (OSError, ValueError, AttributeError):
        started = None
    if is_number(started):
        row["started"] = datetime.datetime.fromtimestamp(started).strftime("%Y-%m-%d %H:%M:%S")
    row["seconds"] = round(outcome.seconds, 1)
    records = [r for step in epoch_records(outcome.path / "metrics.jsonl").values() for r in step]
    if records:
        row["epochs"] = len(records)
        row["training_seconds"] = sum(r["seconds"] for r in records if is_number(r.get("seconds")))
        speeds = [r["images_per_s"] for r in records if is_number(r.get("images_per_s"))]
        row["images_per_s"] = sum(speeds) / len(speeds) if speeds else math.nan
    return row


def draw_curves(root: Path, outcomes) -> dict[str, Path]:
    """`curves-<stage>.png` in `root` for each trained stage (its metrics.jsonl has epochs)."""
    from pipeline.charts import training_curves

    curves = {}
    for o in outcomes:
        try:
            path = training_curves(o.stage, o.path / "metrics.jsonl", root / f"curves-{o.stage}.png")
        except Exception as error:  # a picture must never cost the user the report
            log.warning("could not draw the training curves of %s: %s", o.stage, error)
            continue
        if path is not None:
            curves[o.stage] = path
    return curves


def difference_rows(differences) -> list[dict]:
    return [{"setting": d.name, "this run": str(d.value), "reference": str(d.reference)} for d in differences]


def write_run_report(
    root: Path,
    config_source: str,
    outcomes,
    splits: dict[str, str],
    grids: dict[str, Path],
    settings: dict[str, tuple] | None = None,
    captions: dict[str, list[str]] | None = None,
) -> Path:
    """report.md, report.json and report.html in the dataset's workdir: stage table, metric
    table, timings, each stage's settings that differ from the shipped config (`settings`:
    stage -> (reference name, differences)), training curves (drawn here) and overlay grids
    (`captions`: stage -> one line per grid row, the full image id and classes)."""
    from pipeline.report_html import write_html

    settings, captions = settings or {}, captions or {}
    stage_rows = outcome_rows(outcomes)
    metric_table = [row for o in outcomes for row in metric_rows(o.stage, o.metrics, splits)]
    summary, per_class = metric_columns(metric_table)
    timings = [stage_timings(o) for o in outcomes]
    root.mkdir(parents=True, exist_ok=True)
    curves = draw_curves(root, outcomes)
    lines = [
        "# wss run report",
        "",
        f"Config: `{config_source}`",
        "",
        "## Stages",
        "",
        markdown_table(stage_rows, STAGE_COLUMNS, digits={"seconds": 1}),
        "",
        "## Metrics (ground truth used for scoring only)",
        "",
        markdown_table(metric_table, ["stage", "split", *summary]),
        "",
    ]
    if per_class:
        lines += [markdown_table(metric_table, ["stage", "split", *per_class]), ""]
    lines += ["## Timings", "", markdown_table(timings, TIMING_COLUMNS, digits=TIMING_DIGITS), ""]
    if settings:
        lines += ["## Settings", ""]
        for stage, (reference, differences) in settings.items():
            if differences:
                table = markdown_table(difference_rows(differences), DIFFERENCE_COLUMNS)
                lines += [f"{stage}: the settings that differ from {reference}", "", table, ""]
            else:
                lines += [f"{stage}: the settings of {reference}", ""]
    if curves:
        lines += ["## Training curves", ""]
        lines += [f"![{stage}: loss and images/s per epoch]({path.name})" for stage, path in curves.items()]
        lines += [""]
    if grids:
        lines += ["## Overlay grids", ""]
        lines += [f"- {stage}: [{path.name}]({path.name})" for stage, path in grids.items()]
    failures = [f"- {o.stage}: {f}" for o in outcomes for f in o.failures]
    if failures:
        lines += ["", "## Failures", "", *failures]
    (root / "report.md").write_text("\n".join(lines) + "\n")
    report = {
        "config": config_source,
        "stages": stage_rows,
        "metrics": metric_table,
        "timings": timings,
        "settings": {
            stage: {"reference": reference, "differences": difference_rows(differences)}
            for stage, (reference, differences) in settings.items()
        },
        "curves": {k: str(v) for k, v in curves.items()},
        "grids": {k: str(v) for k, v in grids.items()},
    }
    (root / "report.json").write_text(json_text(report, indent=1))
    write_html(
        root / "report.html",
        config_source,
        tables={
            "stages": (stage_rows, STAGE_COLUMNS, {"seconds": 1}),
            "metrics": (metric_table, ["stage", "split", *summary], 4),
            "per_class": (metric_table, ["stage", "split", *per_class], 4) if per_class else None,
            "timings": (timings, TIMING_COLUMNS, TIMING_DIGITS),
        },
        settings={stage: (reference, difference_rows(d)) for stage, (reference, d) in settings.items()},
        curves=curves,
        grids={stage: (path, captions.get(stage, [])) for stage, path in grids.items()},
        failures=[(o.stage, f) for o in outcomes for f in o.failures],
    )
    return root / "report.md"


TIMING_DIGITS = {"seconds": 1, "training_seconds": 1, "images_per_s": 1}


def write_table(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
