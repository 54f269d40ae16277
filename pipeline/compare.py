"""`wss compare`: stage-1 methods side by side on the same data, through the same cache.

For each method: the run config(s), then configs/methods/<method>.yaml when it exists, then
the -o overrides, then cam.method=<method>. Stage cam runs through the Pipeline (so a second
compare reuses every artifact); the extra scores (val-tuned threshold, point localization,
parameter count) are cached in <out>/cache/ under the artifact's name, which holds its key.

With `--through irn` and a tuning split (`data.tune_split`), each method is also judged with its
own stage-2 settings: `wss tune`'s stage-2 search (pipeline.tune, cached as its artifact) chooses
them on the tuning split's masks from that method's CAMs, and the pseudo stage runs again at them
(a cached artifact like any run's, scored on train without the tuning images). Stage 2's
settings suit each method's maps differently, so a method is not ranked by the settings another
one was tuned for.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import platform
import shlex
import shutil
from pathlib import Path

import click
import numpy as np

from data.errors import WssError
from data.layout import create_folder, nan_for_null, write_json_atomic
from pipeline.commandline import WssCommand, config_options, load, setup_logging
from stages.base import PACKAGE_ROOT
from stages.common.tables import format_table, markdown_table

log = logging.getLogger("wss.compare")
PRESETS = PACKAGE_ROOT / "configs" / "methods"
DEFAULT_METHODS = "gap,dropblock,pcam,pylon,multiscale,minmax"
COLUMNS = [
    "method",
    "state",
    "cls_mean_auc",
    "cls_mean_ap",
    "cam_miou",
    "tuned_threshold",
    "cam_miou_tuned",
    "point_acc",
    "train_images_per_s",
    "parameters",
]
DIGITS = {"tuned_threshold": 2, "train_images_per_s": 1}
GLOSSARY = {
    "state": "ran now, or reused from the cache",
    "cls_mean_auc / cls_mean_ap": "image classification on the val split (mean over classes)",
    "cam_miou": "CAM mIoU on the train split at the config's fixed cam.eval_bg_threshold",
    "tuned_threshold / cam_miou_tuned": "background threshold with the best CAM mIoU on the val split's "
    "masks, and the train split's mIoU at that threshold (without the tuning split's images)",
    "point_acc": "point localization accuracy on the train split: the share of (image, labelled class) pairs whose "
    "CAM maximum falls inside the class' mask (ignore pixels do not count; mean over the classes), or inside one "
    "of its boxes on NIH's boxed images; '-' without masks or boxes",
    "train_images_per_s": "training throughput of stage cam",
    "parameters": "trainable and frozen parameters of the cam model",
    "pseudo_miou": "mIoU of the pseudo-labels (stage pseudo) on the train split (without the tuning split's images)",
    "tuned_stage2": "the stage-2 settings `wss tune` chose for the method on the tuning split's masks "
    "(the searched ones; the others are the config's)",
    "pseudo_miou_tuned": "mIoU of the method's pseudo-labels at its tuned stage-2 settings, on the train split",
}
TUNED_COLUMNS = ["tuned_stage2", "pseudo_miou_tuned"]


def method_config(paths: list[Path], overrides: list[str], method: str):
    preset = PRESETS / f"{method}.yaml"
    files = [*paths, preset] if preset.is_file() else list(paths)
    return load(files, [*overrides, f"cam.method={method}"], show_logs=False)


def parse_methods(text: str) -> list[str]:
    from stages.cam.methods import METHODS

    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise WssError(
            f"--methods: unknown method {unknown[0] if unknown else '(none)'!r} (available: {', '.join(METHODS)})"
        )
    return list(dict.fromkeys(methods))


def extra_scores(pipeline, artifact: Path, out: Path, limit: int | None) -> dict:
    """Scores `wss compare` adds to the stage's own metrics; cached per artifact."""
    from stages.cam.classifier import count_parameters, write_cams
    from stages.cam.scoring import tuned_miou
    from stages.common.runtime import resolve_device, worker_count
    from stages.common.scoring import scored_ids

    cfg, dataset = pipeline.cfg, pipeline.dataset
    # the artifact's key leaves out the val and tuning splits (they only score stage 1), so the name holds them
    name = f"{artifact.name}-val-{cfg.data.val_split}" + (f"-limit{limit}" if limit is not None else "")
    name += f"-tune-{cfg.data.tune_split}" if cfg.data.tune_split else ""
    cache = out / "cache" / f"{name}.json"
    made_by = computation_id(artifact)
    cached = read_cached_scores(cache, made_by)
    if cached is not None:
        return cached
    device = resolve_device(cfg.run.device)
    workers = worker_count(cfg.run.workers)
    work = out / "cache" / name
    shutil.rmtree(work, ignore_errors=True)  # CAMs of an earlier computation under the same name
    train_ids = dataset.split(cfg.data.train_split)[:limit]
    # the threshold is chosen on masks of images that are not scored (data.val_split may overlap train)
    in_train = set(train_ids)
    val_ids = [i for i in dataset.split(cfg.data.val_split)[:limit] if dataset.has_mask(i) and i not in in_train]
    train_ids = scored_ids(dataset, train_ids, cfg.data.tune_split)  # as every stage scores them
    scores = {"parameters": count_parameters(artifact)}
    if not val_ids:
        log.warning(
            "compare: no %s image with a mask outside the scored %s split: no tuned threshold",
            cfg.data.val_split,
            cfg.data.train_split,
        )
    else:
        write_cams(artifact, dataset, val_ids, work / "val_cams", device, workers=workers)
        threshold, miou = tuned_miou(dataset, val_ids, work / "val_cams", train_ids, artifact / "cams")
        scores.update(tuned_threshold=threshold, cam_miou_tuned=miou)
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cache, {"artifact_manifest": made_by, "scores": scores})
    return scores


def computation_id(artifact: Path) -> str:
    """Names the computation that made an artifact: `--force` makes a new one under the same
    directory name, while re-scoring (`wss evaluate`, a new cam.eval_bg_threshold) keeps it."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    made = json.dumps([manifest.get("key_parts"), manifest.get("started")], sort_keys=True, default=str)
    return hashlib.sha256(made.encode()).hexdigest()[:16]


def read_cached_scores(cache: Path, made_by: str) -> dict | None:
    """The cached scores if they were computed from this very artifact (`--force` rewrites an
    artifact under the same name, and its manifest with it); anything unreadable is recomputed."""
    try:
        cached = json.loads(cache.read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(cached, dict)
        or cached.get("artifact_manifest") != made_by
        or not isinstance(cached.get("scores"), dict)
    ):
        return None
    return nan_for_null(cached["scores"])


def compare_method(cfg, method: str, through: str, out: Path, limit: int | None) -> dict:
    from pipeline.runner import Pipeline

    pipeline = Pipeline(cfg)
    # one pass over the chain, so each stage is checked (and logged) once
    outcomes = pipeline.run(until="pseudo") if through == "irn" else [pipeline.run_stage("cam", limit=limit)]
    cam = next(o for o in outcomes if o.stage == "cam")
    row = {
        "method": method,
        "state": "ran" if any(o.state == "ran" for o in outcomes) else cam.state,
        "artifact": str(cam.path),
    }
    for key in ["cls_mean_auc", "cls_mean_ap", "cam_miou", "train_images_per_s"]:
        row[key] = cam.metrics.get(key, float("nan"))
    # the stage scores the peaks against the train split's masks, or (NIH) against the boxed images' boxes
    row["point_acc"] = cam.metrics.get("cam_mask_point_accuracy", cam.metrics.get("cam_point_accuracy", float("nan")))
    row.update(extra_scores(pipeline, cam.path, out, limit))
    for key in ["tuned_threshold", "cam_miou_tuned"]:  # no val masks
        row.setdefault(key, float("nan"))
    if through == "irn":
        row["pseudo_miou"] = outcomes[-1].metrics.get("pseudo_miou", float("nan"))
    return row


def compare_grid(cfg, params: dict[str, list]) -> dict[str, list]:
    """The stage-2 search of one method: a few walks (irn.beta halved, as configured, doubled),
    every sem_seg_bg_threshold on each walk's output, the other settings as configured; `params`
    (`--tune-params`) replaces any of them."""
    from pipeline.tune import steps

    beta = cfg.irn.beta
    grid = {
        "cam.eval_bg_threshold": [cfg.cam.eval_bg_threshold],
        "irn.beta": sorted({round(beta / 2, 6), beta, round(beta * 2, 6)}),
        "irn.exp_times": [cfg.irn.exp_times],
        "irn.sem_seg_bg_threshold": sorted({*steps(0.05, 0.95, 0.1), cfg.irn.sem_seg_bg_threshold}),
        "irn.refine_crf": [cfg.irn.refine_crf],
    }
    return {**grid, **params}


def parse_tune_params(items: tuple[str, ...] | list[str]) -> dict[str, list]:
    """`--tune-params` in `wss tune --params` syntax, limited to the settings of the walk that
    makes the pseudo-labels (irn.*)."""
    from pipeline.tune import STAGE2, parse_params

    grid = parse_params(items)
    other = [name for name in grid if name not in STAGE2 or not name.startswith("irn.")]
    if other:
        walk = ", ".join(name for name in STAGE2 if name.startswith("irn."))
        raise WssError(f"--tune-params: {other[0]} is not a stage-2 setting of the pseudo-labels ({walk})")
    return grid


def setting_text(value) -> str:
    """A setting as a -o value and as the table shows it: 10.0 -> 10, True -> true."""
    from pipeline.tune import plain

    value = plain(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def tuned_stage2(cfg, grid: dict[str, list]) -> tuple[dict, Path]:
    """The irn settings `wss tune`'s stage-2 search chooses for this config's method (cached as
    its tune artifact), and that artifact."""
    from pipeline.tune import tune

    result = tune(cfg, grid, stage2_only=True)
    chosen = {name: value for name, value in result.chosen.items() if name.startswith("irn.")}
    if not chosen:
        raise WssError(f"compare: the stage-2 search in {result.artifact} chose nothing (no scored tuning image)")
    return chosen, result.artifact


def tuned_pseudo(paths, overrides, method: str, grid: dict[str, list]) -> dict:
    """The method's stage-2 settings tuned on the tuning split, and its pseudo-labels at them
    through the cached pipeline (as `wss run -o <settings> --until pseudo` makes them)."""
    from pipeline.runner import Pipeline

    chosen, artifact = tuned_stage2(method_config(paths, overrides, method), grid)
    settings = [f"{name}={setting_text(value)}" for name, value in chosen.items()]
    outcomes = Pipeline(method_config(paths, [*overrides, *settings], method)).run(until="pseudo")
    searched = [name for name in chosen if len(grid.get(name, [])) > 1] or list(chosen)
    return {
        "tuned_stage2": ", ".join(f"{name.split('.', 1)[1]}={setting_text(chosen[name])}" for name in searched),
        "pseudo_miou_tuned": outcomes[-1].metrics.get("pseudo_miou", float("nan")),
        "tune_artifact": str(artifact),
        "tuned_settings": settings,
        "tuned_state": "ran" if any(o.state == "ran" for o in outcomes) else "cached",
    }


def stage2_note(cfg, tuned: bool, grid: dict[str, list] | None) -> str:
    """The report's line on which stage-2 settings the pseudo-labels were made with."""
    config = ", ".join(
        f"{name}={setting_text(getattr(cfg.irn, name))}"
        for name in ("beta", "exp_times", "sem_seg_bg_threshold", "refine_crf")
    )
    if not tuned:
        why = "--no-tune" if cfg.data.tune_split else "no tuning split (data.tune_split)"
        return f"Stage 2: every method's pseudo-labels at the config's settings ({config}); not tuned: {why}."
    searched = "; ".join(
        f"{name}: {', '.join(setting_text(v) for v in values)}"
        for name, values in (grid or {}).items()
        if name.startswith("irn.") and len(values) > 1
    )
    return (
        f"Stage 2: `pseudo_miou` at the config's settings ({config}) for every method; `pseudo_miou_tuned` at "
        f"each method's own, chosen by `wss tune` on the masks of the tuning split `{cfg.data.tune_split}` "
        f"(searched: {searched}); its images are left out of every score."
    )


def overlay_grid(rows: list[dict], dataset, train_ids: list[str], path: Path, n: int = 8, cell: int = 160) -> None:
    """The same `n` train images (rows) under each method (columns): the CAM of the image's first
    labelled class as a heatmap over the image. Reads the stage's stride-4 CAM files."""
    from PIL import Image, ImageDraw

    from pipeline.visualize import fit_text, heatmap
    from stages.cam.infer import load_cam, upsample_cam

    artifacts = [Path(r["artifact"]) for r in rows]
    ids = [
        i
        for i in train_ids
        if dataset.label_vector(i).any() and all((a / "cams" / f"{i}.npz").is_file() for a in artifacts)
    ][:n]
    if not ids:
        return
    header = 18
    grid = Image.new("RGB", (cell * (len(rows) + 1), header + cell * len(ids)), "white")
    draw = ImageDraw.Draw(grid)
    for col, title in enumerate(["image"] + [r["method"] for r in rows]):
        draw.text((col * cell + 4, 3), title, fill="black")
    for row_index, image_id in enumerate(ids):
        image = dataset.read_image(image_id)
        top = header + row_index * cell
        first_class = int(np.nonzero(dataset.label_vector(image_id))[0][0])
        grid.paste(Image.fromarray(image).resize((cell, cell)), (0, top))
        for col, artifact in enumerate(artifacts, start=1):
            cam, keys, size = load_cam(artifact / "cams" / f"{image_id}.npz")
            heat = upsample_cam(cam, size)[list(keys).index(first_class)]
            grid.paste(Image.fromarray(heatmap(image, heat)).resize((cell, cell)), (col * cell, top))
        for line, text in enumerate([image_id, dataset.classes[first_class]]):  # long ids shortened to the cell
            draw.text((4, top + 3 + 12 * line), fit_text(draw, text, cell - 8), fill="yellow")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    grid.save(tmp)
    tmp.replace(path)


def write_report(
    rows: list[dict],
    columns: list[str],
    out: Path,
    cfg,
    argv: list[str],
    has_grid: bool,
    has_chart: bool = False,
    notes: tuple[str, ...] = (),
) -> None:
    with open(out / "compare.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    machine = f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, run.device={cfg.run.device}"
    parts = [
        f"# Stage-1 methods on `{cfg.data.root}`",
        "",
        f"Command: `{' '.join(shlex.quote(a) for a in argv)}`",
        "",
        f"Machine: {machine}",
        "",
        markdown_table(rows, columns, DIGITS),
        "",
        *[line for note in notes for line in (note, "")],
    ]
    parts += [
        f"- **{name}**: {text}" for name, text in GLOSSARY.items() if any(c in name.split(" / ") for c in columns)
    ]
    if has_chart:
        parts += ["", "![The table's scores as bars, one panel per column](compare.png)"]
    if has_grid:
        parts += ["", "![CAMs of the same train images under each method](overlays.png)"]
    (out / "compare.md").write_text("\n".join(parts) + "\n")


@click.command("compare", cls=WssCommand)
@config_options(
    config_help="YAML run config (repeatable: later files win).",
    override_help="Override a config value for every method, e.g. -o cam.epochs=3 (repeatable).",
)
@click.option("--methods", default=DEFAULT_METHODS, show_default=True, help="Comma-separated cam.method values.")
@click.option(
    "--through",
    type=click.Choice(["cam", "irn"]),
    default="cam",
    show_default=True,
    help="irn: also run stage 2 up to the pseudo-labels and report their mIoU.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder (default <workdir>/<dataset>/compare).",
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=None, help="Use only the first N images of each split (quick tries)."
)
@click.option(
    "--tune/--no-tune",
    default=None,
    help="With --through irn: tune each method's stage-2 settings on data.tune_split and report its pseudo-label "
    "mIoU at them too [default: tune when data.tune_split is set].",
)
@click.option(
    "--tune-params",
    multiple=True,
    metavar="NAME=VALUES",
    help="A searched irn setting and its values, as wss tune --params (repeatable) [default: irn.beta halved, as "
    "configured and doubled; irn.sem_seg_bg_threshold=0.05:0.95:0.1].",
)
def compare_command(
    config_path,
    overrides,
    methods: str,
    through: str,
    out: Path | None,
    limit: int | None,
    tune: bool | None,
    tune_params: tuple[str, ...],
):
    """Run stage 1 with each method (cached like any stage) and tabulate them side by side.

    \b
    Example:
      wss compare -c configs/demo.yaml --methods gap,pcam,pylon,multiscale,minmax
      wss compare -c configs/siim.yaml --methods gap,pylon --through irn
      wss compare -c configs/demo.yaml -o data.tune_split=tune --through irn --tune-params irn.beta=5,10
    """
    if through == "irn" and limit is not None:
        raise WssError("--limit works with --through cam only (stage 2 reads the full cam artifact)")
    if tune and through != "irn":
        raise WssError("--tune tunes the stage-2 settings: it needs --through irn")
    if tune is False and tune_params:
        raise WssError("--tune-params with --no-tune: nothing would be tuned")
    params = parse_tune_params(tune_params)
    names = parse_methods(methods)
    configs = {m: method_config(list(config_path), list(overrides), m) for m in names}
    first = configs[names[0]]
    if tune and not first.data.tune_split:
        raise WssError(
            "--tune needs a tuning split: set data.tune_split to a split of a few images with masks "
            "(e.g. `wss prepare synthetic --tune N` writes splits/tune.txt)"
        )
    tuning = through == "irn" and bool(first.data.tune_split) and tune is not False
    if tune_params and not tuning:
        raise WssError("--tune-params needs --through irn and data.tune_split")
    setup_logging(first.run.verbose)
    from pipeline.runner import Pipeline
    from pipeline.tune import check_tune_split

    pipeline = Pipeline(first)
    dataset = pipeline.dataset
    if tuning:
        check_tune_split(first, dataset)  # refused before any stage runs
    out = out or Path(first.run.workdir) / dataset.name / "compare"
    create_folder(out)
    rows = []
    grid = None
    for method in names:
        log.info("compare: method %s", method)
        row = compare_method(configs[method], method, through, out, limit)
        if tuning:
            grid = compare_grid(configs[method], params)
            log.info("compare: method %s, its stage-2 settings on the tuning split", method)
            row.update(tuned_pseudo(list(config_path), list(overrides), method, grid))
            row["state"] = "ran" if "ran" in (row["state"], row.pop("tuned_state")) else row["state"]
        rows.append(row)
    columns = COLUMNS + (["pseudo_miou"] if through == "irn" else []) + (TUNED_COLUMNS if tuning else [])
    overlay_grid(rows, dataset, dataset.split(first.data.train_split)[:limit], out / "overlays.png")
    has_grid = (out / "overlays.png").is_file()
    chart = comparison_chart(rows, columns, out / "compare.png")
    argv = ["wss", "compare", *_argv_of(config_path, overrides, methods, through, limit, tune, tune_params)]
    notes = (stage2_note(first, tuning, grid),) if through == "irn" else ()
    write_report(rows, columns, out, first, argv, has_grid, chart is not None, notes)
    if tuning:
        write_json_atomic(
            out / "tuned.json",
            {r["method"]: {"settings": r["tuned_settings"], "tune_artifact": r["tune_artifact"]} for r in rows},
        )
    else:
        (out / "tuned.json").unlink(missing_ok=True)  # an earlier compare's: not this table's
    click.echo(format_table(rows, columns, DIGITS))
    pictures = [path for path in (chart, out / "overlays.png" if has_grid else None) if path is not None]
    click.echo(f"wrote {out / 'compare.md'}, {out / 'compare.csv'}" + "".join(f", {path}" for path in pictures))


def comparison_chart(rows: list[dict], columns: list[str], path: Path) -> Path | None:
    """compare.png: the table's numeric columns as bars, one per method; None when it cannot be drawn."""
    from pipeline.charts import bar_chart

    try:
        return bar_chart(rows, columns, "method", path, "wss compare: stage-1 methods on the same data")
    except Exception as error:  # a picture must never cost the user the table
        log.warning("could not draw %s: %s", path, error)
        return None


def _argv_of(config_paths, overrides, methods, through, limit, tune=None, tune_params=()) -> list[str]:
    args = [a for p in config_paths for a in ("-c", str(p))] + [a for o in overrides for a in ("-o", o)]
    args += ["--methods", methods] + (["--through", through] if through != "cam" else [])
    args += {True: ["--tune"], False: ["--no-tune"], None: []}[tune]
    args += [a for p in tune_params for a in ("--tune-params", p)]
    return args + (["--limit", str(limit)] if limit is not None else [])
