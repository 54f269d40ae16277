"""Summary tables on screen and on disk."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import click

from stages.common.metrics import format_table


def outcome_rows(outcomes) -> list[dict]:
    rows = []
    for o in outcomes:
        value = o.metrics.get(o.headline, math.nan)
        rows.append({"stage": o.stage, "state": "cache hit" if o.state == "cached" else "ran",
                     "seconds": round(o.seconds, 1), "metric": o.headline or "-",
                     "value": value if isinstance(value, (int, float)) else math.nan,
                     "failures": len(o.failures), "artifact": str(o.path)})
    return rows


def print_outcomes(outcomes) -> None:
    rows = outcome_rows(outcomes)
    click.echo("")
    click.echo(format_table(rows, ["stage", "state", "seconds", "metric", "value", "failures", "artifact"]))
    for o in outcomes:
        for failure in o.failures:
            click.echo(f"  {o.stage}: {failure}", err=True)


def evaluate_artifacts(cfg, which: str) -> list[dict]:
    """Re-score each up-to-date artifact against ground truth; one table, CSV + JSON on disk."""
    from pipeline.runner import Pipeline
    from stages.registry import STAGE_ORDER
    pipeline = Pipeline(cfg)
    names = STAGE_ORDER if which == "all" else [pipeline.stage(which).name]
    rows = []
    for name in names:
        path = pipeline.artifact(name)
        if path is None:
            click.echo(f"{name}: no up-to-date artifact, skipped (see `wss status`)", err=True)
            continue
        stage = pipeline.stage(name)
        metrics = stage.evaluate(cfg, pipeline.dataset, path)
        pipeline.store.update_manifest(path, evaluation=metrics)
        rows.append({"stage": name, **metrics})
    if not rows:
        return rows
    columns = ["stage"] + sorted({k for r in rows for k in r if k != "stage"}, key=_metric_order)
    click.echo(format_table(rows, columns[:1] + [c for c in columns[1:] if "/" not in c]))
    per_class = [c for c in columns if "/" in c]
    if per_class:
        click.echo("")
        click.echo(format_table(rows, ["stage"] + per_class))
    out = pipeline.store.root
    out.mkdir(parents=True, exist_ok=True)
    write_table(out / "evaluation.csv", rows, columns)
    (out / "evaluation.json").write_text(json.dumps(rows, indent=1))
    click.echo(f"\nwrote {out / 'evaluation.csv'} and evaluation.json")
    return rows


def _metric_order(name: str) -> tuple:
    return ("/" in name, name)


def write_table(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
