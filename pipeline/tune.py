"""`wss tune`: the settings downstream of the trained networks, chosen on the cached artifacts.

Nothing is trained: the stages run as `wss run --until` runs them (cached), then

- on the masks of the tuning split (`data.tune_split`): `cam.eval_bg_threshold`, and the walk's
  `irn.beta`, `irn.exp_times`, `irn.sem_seg_bg_threshold`, `irn.refine_crf` (stages.tuning.stage2:
  one walk per (beta, exp_times), every threshold applied to its output);
- on a binary task, the empty-mask rule (`seg.min_area`, `seg.image_score`,
  `seg.image_threshold`) from image labels alone, on the part of train the segmenter never trained
  on (`seg.checkpoint: pseudo_holdout`), and `seg.threshold` too where the tuning split has masks
  (stages.tuning.empty_masks).

The result is cached like a stage under `<workdir>/<dataset>/tune-<key12>/` (the key covers the
upstream artifacts' keys, the dataset's fingerprint, the grid, the tuning split and the code) and
holds the table (rows.json, table.md), a plot of the best score against each parameter
(tune.png) and `tuned.yaml`, a config overlay to layer with `-c`. Nothing is ever chosen on the
masks of a split a stage reports: a tuning split that is the train split, or shares an image with
the val split, is refused.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import yaml

from data.errors import WssError
from data.layout import write_json_atomic, write_text_atomic
from pipeline.commandline import WssCommand, config_options, load
from stages.code_version import code_version
from stages.common.tables import format_table, markdown_table

log = logging.getLogger("wss.tune")
TUNE = "tune"  # the artifact's stage name: <workdir>/<dataset>/tune-<key12>/
OVERLAY = "tuned.yaml"
ROWS = "rows.json"

# name -> type of every setting `wss tune` searches, and which search it belongs to
STAGE2 = {
    "cam.eval_bg_threshold": float,
    "irn.beta": float,
    "irn.exp_times": int,
    "irn.sem_seg_bg_threshold": float,
    "irn.refine_crf": bool,
}
RULE = {"seg.threshold": float, "seg.min_area": int, "seg.image_score": str, "seg.image_threshold": float}
TUNABLE = {**STAGE2, **RULE}


class TuneError(WssError):
    """A tuning request that cannot be honoured (a split that is reported on, an unknown setting)."""


# ------------------------------------------------------------------------------------ the grid


def steps(start: float, stop: float, step: float) -> list[float]:
    """start, start + step, ... up to stop included (rounded, so 0.1:0.9:0.1 ends at 0.9)."""
    if step <= 0 or stop < start:
        raise TuneError(
            f"--params: a range START:STOP:STEP needs STEP > 0 and STOP >= START, got {start}:{stop}:{step}"
        )
    count = int(math.floor((stop - start) / step + 1e-9)) + 1
    return [round(start + i * step, 6) for i in range(count)]


def parse_value(name: str, text: str):
    kind = TUNABLE[name]
    text = text.strip()
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise TuneError(f"--params {name}: {text!r} is not true or false")
        return text.lower() == "true"
    if kind is str:
        if text not in ("seg", "cam", "mean"):
            raise TuneError(f"--params {name}: {text!r} is not one of seg, cam, mean")
        return text
    try:
        value = kind(text)
    except ValueError:
        raise TuneError(f"--params {name}: {text!r} is not a{'n integer' if kind is int else ' number'}") from None
    if value < 0 or (name.endswith("threshold") and value > 1):
        raise TuneError(f"--params {name}: {text} is out of range")
    return value


def parse_params(items: tuple[str, ...] | list[str]) -> dict[str, list]:
    """`--params NAME=V1,V2,...` or `NAME=START:STOP:STEP` (numbers) -> {name: values}."""
    grid: dict[str, list] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or name not in TUNABLE:
            raise TuneError(f"--params {item!r}: expected NAME=VALUES with NAME one of {', '.join(TUNABLE)}")
        if ":" in text and TUNABLE[name] in (int, float):
            try:
                start, stop, step = (float(part) for part in text.split(":"))
            except ValueError:
                raise TuneError(f"--params {item!r}: a range is START:STOP:STEP") from None
            values = [parse_value(name, str(v)) for v in steps(start, stop, step)]
        else:
            values = [parse_value(name, part) for part in text.split(",") if part.strip()]
        if not values:
            raise TuneError(f"--params {item!r}: no value")
        grid[name] = list(dict.fromkeys(values))
    return grid


def default_grid(cfg, masks: bool) -> dict[str, list]:
    """What is searched unless --params says otherwise: wide threshold ranges with the config's
    own value among them, the walk's beta halved and doubled, CRF on and off, and the empty-mask
    rule's three settings; without masks to check pixels against, seg.threshold stays as
    configured."""
    beta = cfg.irn.beta

    def around(values: list[float], current: float) -> list[float]:
        return sorted({*values, current})

    return {
        "cam.eval_bg_threshold": around(steps(0.05, 0.95, 0.05), cfg.cam.eval_bg_threshold),
        "irn.beta": sorted({round(beta / 2, 6), beta, round(beta * 2, 6)}),
        "irn.exp_times": [cfg.irn.exp_times],
        "irn.sem_seg_bg_threshold": around(steps(0.05, 0.95, 0.1), cfg.irn.sem_seg_bg_threshold),
        "irn.refine_crf": [False, True],
        "seg.threshold": around(steps(0.3, 0.7, 0.1), cfg.seg.threshold) if masks else [cfg.seg.threshold],
        "seg.min_area": [0, 4, 8, 16, 32, 64, 128],
        "seg.image_score": ["seg", "cam", "mean"],
        "seg.image_threshold": [0.0, *steps(0.05, 0.95, 0.05)],
    }


def current_values(cfg) -> dict:
    """The config's value of every tunable setting."""
    return {name: getattr(cfg.section(name.split(".")[0]), name.split(".")[1]) for name in TUNABLE}


# ------------------------------------------------------------------------------ the tuning split


def check_tune_split(cfg, dataset) -> list[str]:
    """The tuning split's ids; refuses (TuneError) a split that a stage reports scores on: the
    train split itself (stages 1-2 would have nothing left to report) or one sharing an image
    with the val split (the segmenter's reported scores)."""
    name = cfg.data.tune_split
    if not name:
        return []
    if name == cfg.data.train_split:
        raise TuneError(
            f"data.tune_split {name!r} is the train split, on which stages 1-2 report their scores: "
            f"tune on a split of a few annotated images (its images are then left out of the train scores)"
        )
    if name == cfg.data.val_split:
        raise TuneError(f"data.tune_split {name!r} is the val split, on which the segmenter reports its scores")
    ids = dataset.split(name)
    shared = sorted(set(ids) & set(dataset.split(cfg.data.val_split)))
    if shared:
        raise TuneError(
            f"data.tune_split {name!r} shares {len(shared)} image(s) with the val split {cfg.data.val_split!r} "
            f"(e.g. {shared[0]}), on which the segmenter reports its scores"
        )
    return ids


# ---------------------------------------------------------------------------------- the search


@dataclass
class TuneResult:
    artifact: Path
    rows: dict  # search -> rows
    chosen: dict  # setting -> value
    notes: list[str]
    state: str  # ran | cached


def rule_search(cfg, pipeline, grid: dict, tune_ids: list[str], limit: int | None, device, notes: list[str]):
    """The empty-mask rule's rows (stages.tuning.empty_masks) and the images they rest on."""
    from stages.seg.holdout import held_out_items
    from stages.seg.model import inference_long_side, load_segmenter
    from stages.seg.postprocess import ClassifierScore
    from stages.tuning.empty_masks import RuleGrid, holdout_evidence, rule_rows, tune_evidence

    dataset = pipeline.dataset
    model, _ = load_segmenter(pipeline.require("seg"), device, dataset.classes, "binary")
    classifier = None
    if set(grid["seg.image_score"]) - {"seg"}:
        classifier = ClassifierScore(pipeline.require("cam"), device)
    thresholds = grid["seg.threshold"]
    long_side = inference_long_side(cfg.seg)
    evidence = []
    if cfg.seg.checkpoint == "pseudo_holdout":
        train_ids = dataset.split(cfg.data.train_split)
        label_dir = pipeline.require("pseudo") / "pseudo_labels"
        items = held_out_items(dataset, train_ids, label_dir, cfg.seg.holdout_fraction, cfg.run.seed)
        tuned = set(tune_ids)
        items = [item for item in items if item[0] not in tuned][:limit]
        evidence += holdout_evidence(dataset, items, model, classifier, thresholds, long_side, device)
    else:
        notes.append(
            "seg.checkpoint: last trains the segmenter on all of train: no unseen image to choose the "
            "empty-mask rule on from image labels; "
            + ("chosen on the tuning split alone" if tune_ids else "not tuned (set data.tune_split)")
        )
    if tune_ids:
        evidence += tune_evidence(dataset, tune_ids, model, classifier, thresholds, long_side, device)
    rule_grid = RuleGrid(
        tuple(thresholds),
        tuple(grid["seg.min_area"]),
        tuple(grid["seg.image_score"]),
        tuple(grid["seg.image_threshold"]),
        long_side,
    )
    return rule_rows(evidence, rule_grid)


def choose_rule(rows: list[dict], current: dict, with_masks: bool) -> dict | None:
    """The rule with the best balanced accuracy of "mask not empty" against the image labels
    (held-out train and tuning images pooled); among equals, the best Kaggle Dice on the tuning
    split's masks (where there are some), else against the held-out pseudo-labels."""
    from stages.tuning.choice import best_row

    tie_break = "tune_kaggle_dice" if with_masks else "holdout_kaggle_dice"
    return best_row(rows, "balanced_accuracy", current, tie_break=tie_break)


def missing_labels(rows: list[dict]) -> str | None:
    """ "positive" or "negative" when the rule's images lack that label: balanced accuracy on one
    label alone would choose a rule that empties (or keeps) every mask."""
    if not rows:
        return "labelled"
    for label, rate in (("positive", "nonempty_positives"), ("negative", "nonempty_negatives")):
        if not isinstance(rows[0].get(rate), (int, float)) or math.isnan(rows[0][rate]):
            return label
    return None


def stage2_search(cfg, pipeline, grid: dict, tune_ids: list[str], out: Path, device, timings: dict):
    from stages.tuning.stage2 import WalkGrid, cam_threshold_rows, tuning_cams, walk_rows

    dataset = pipeline.dataset
    cam_files, failures = tuning_cams(pipeline.require("cam"), dataset, tune_ids, out / "cams", device, cfg.run.workers)
    for failure in failures:
        log.warning("tune: %s", failure)
    cam_rows = cam_threshold_rows(dataset, cam_files, grid["cam.eval_bg_threshold"])
    walk_grid = WalkGrid(
        tuple(grid["irn.beta"]),
        tuple(grid["irn.exp_times"]),
        tuple(grid["irn.sem_seg_bg_threshold"]),
        cfg.irn.walk_radius,
        cfg.irn.refine_crf_params if True in grid["irn.refine_crf"] else None,
    )
    rows = walk_rows(dataset, cam_files, pipeline.require("irn"), walk_grid, device, timings)
    if False not in grid["irn.refine_crf"]:
        rows = [row for row in rows if row["irn.refine_crf"]]
    return cam_rows, rows


def tune(
    cfg, params: dict[str, list], limit: int | None = None, force: bool = False, stage2_only: bool = False
) -> TuneResult:
    """Run what the search needs, search (or reuse the cached search) and write its artifact.

    `stage2_only` searches the stage-2 settings alone (`wss compare` judges each stage-1 method
    by its own): no segmenter is trained for the empty-mask rule, and a tuning split is required."""
    from pipeline.cache import StageKey
    from pipeline.runner import Pipeline
    from stages.common.runtime import resolve_device
    from stages.tuning.choice import best_row
    from stages.tuning.stage2 import objective

    pipeline = Pipeline(cfg)
    dataset = pipeline.dataset
    binary = dataset.task == "binary"
    tune_ids = [i for i in check_tune_split(cfg, dataset) if dataset.has_mask(i)][:limit]
    if cfg.data.tune_split and not tune_ids:
        raise TuneError(f"data.tune_split {cfg.data.tune_split!r} has no image with a mask to tune on")
    if stage2_only and not tune_ids:
        raise TuneError("the stage-2 settings are tuned on the masks of data.tune_split: set it")
    if not tune_ids and not binary:
        raise TuneError(
            "nothing to tune without masks on a multiclass task: set data.tune_split to a split of a few "
            "images annotated with masks (e.g. one of `wss prepare folder --splits`)"
        )
    grid = {**default_grid(cfg, bool(tune_ids)), **params}
    rule = binary and not stage2_only
    if not rule:
        grid = {name: values for name, values in grid.items() if name in STAGE2}
    if not tune_ids:
        grid = {name: values for name, values in grid.items() if name in RULE}
    pipeline.run(until="seg" if rule else "irn")
    needs = ("cam", "irn", "pseudo", "seg") if rule else ("cam", "irn")
    key = StageKey(
        TUNE,
        {
            "config": {
                "grid": grid,
                "limit": limit,
                "tune_split": cfg.data.tune_split,
                "tune_ids": tune_ids,
                "data": {"train_split": cfg.data.train_split, "val_split": cfg.data.val_split},
                "run": {"seed": cfg.run.seed},
                "seg": {
                    "checkpoint": cfg.seg.checkpoint,
                    "holdout_fraction": cfg.seg.holdout_fraction,
                    "predict_size": cfg.seg.predict_size,
                },
                "irn": {
                    "walk_radius": cfg.irn.walk_radius,
                    "refine_crf_params": cfg.irn.refine_crf_params.model_dump(),
                },
            },
            "dataset": pipeline.fingerprint,
            "upstream": {need: pipeline.key(need).digest for need in needs},
            "code": code_version(["pipeline.tune"]),
        },
    )
    done = None if force else pipeline.store.complete(key)
    if done is not None:
        manifest = pipeline.store.read_manifest(done) or {}
        log.info("tune: up to date (%s), skipping", done)
        rows = json.loads((done / ROWS).read_text())
        return TuneResult(done, rows, manifest.get("chosen", {}), manifest.get("notes", []), "cached")
    device = resolve_device(cfg.run.device)
    current = current_values(cfg)
    rows: dict[str, list] = {}
    chosen: dict = {}
    notes: list[str] = []
    timings: dict = {}
    started = time.time()
    inputs = [pipeline.require(need) for need in needs]
    with pipeline.store.writing(key) as partial, pipeline.store.reading(inputs):
        if tune_ids:
            t0 = time.perf_counter()
            rows["cam"], rows["walk"] = stage2_search(cfg, pipeline, grid, tune_ids, partial, device, timings)
            timings["stage2_seconds"] = time.perf_counter() - t0
            score = objective(dataset.task)
            cam_best = best_row(rows["cam"], score, current)
            walk_best = best_row(rows["walk"], score, current)
            for best, names in ((cam_best, ("cam.eval_bg_threshold",)), (walk_best, tuple(STAGE2)[1:])):
                if best is not None:
                    chosen.update({name: best[name] for name in names})
        if rule:
            t0 = time.perf_counter()
            rows["rule"] = rule_search(cfg, pipeline, grid, tune_ids, limit, device, notes)
            timings["rule_seconds"] = time.perf_counter() - t0
            missing = missing_labels(rows["rule"])
            if missing:
                notes.append(f"the empty-mask rule is not chosen: its images include no {missing} image")
            else:
                best = choose_rule(rows["rule"], current, bool(tune_ids))
                if best is not None:
                    chosen.update({name: best[name] for name in RULE})
        shutil.rmtree(partial / "cams", ignore_errors=True)
        write_json_atomic(partial / ROWS, rows, indent=None)
        write_text_atomic(partial / "table.md", markdown_tables(rows, dataset.task) + "\n")
        write_text_atomic(partial / OVERLAY, overlay_text(cfg, chosen, current, tune_ids, rows, notes))
        plot_profiles(rows, dataset.task, partial / "tune.png")
        final = pipeline.store.commit(
            key,
            partial,
            {"chosen": chosen, "notes": notes, "timings": timings, "seconds": time.time() - started},
        )
    return TuneResult(final, rows, chosen, notes, "ran")


# ---------------------------------------------------------------------------------- the output


def score_columns(rows: list[dict]) -> list[str]:
    names = [n for n in rows[0] if n not in TUNABLE] if rows else []
    return names


def top_rows(rows: list[dict], score: str, count: int, tie_break: str | None = None) -> list[dict]:
    """The best `count` rows by `score`, then `tie_break` (the order the choice ranks them in)."""

    def rank(row):
        second = row.get(tie_break) if tie_break else None
        second = second if isinstance(second, (int, float)) and not math.isnan(second) else -math.inf
        return (-row[score], -second)

    ranked = [row for row in rows if isinstance(row.get(score), (int, float)) and not math.isnan(row[score])]
    return sorted(ranked, key=rank)[:count]


SEARCH_SCORE = {"cam": None, "walk": None, "rule": "balanced_accuracy"}


def tables(rows: dict, task: str, count: int = 10) -> list[tuple[str, list[str], list[dict]]]:
    """(title, columns, rows) of the best `count` rows of each search: the score it is chosen by
    first, then the settings, then the other scores."""
    from stages.tuning.stage2 import objective

    out = []
    for search, found in rows.items():
        if not found:
            continue
        score = SEARCH_SCORE[search] or objective(task)
        names = [n for n in found[0] if n in TUNABLE]
        columns = [score, *names, *(c for c in score_columns(found) if c != score)]
        tie_break = (
            ("tune_kaggle_dice" if "tune_kaggle_dice" in found[0] else "holdout_kaggle_dice")
            if search == "rule"
            else None
        )
        best = top_rows(found, score, count, tie_break)
        out.append((f"{search}: best {len(best)} of {len(found)} by {score}", columns, best))
    return out


def markdown_tables(rows: dict, task: str) -> str:
    return "\n\n".join(f"### {title}\n\n{markdown_table(body, columns)}" for title, columns, body in tables(rows, task))


def overlay_text(cfg, chosen: dict, current: dict, tune_ids: list[str], rows: dict, notes: list[str]) -> str:
    """tuned.yaml: the chosen settings as a config overlay, and in comments what they were chosen
    on (the images), by which score, and the config's values they replace."""
    lines = [
        "# wss tune: settings chosen without retraining; layer it over the config: -c CONFIG -c tuned.yaml",
        f"# dataset {cfg.data.root}; train split {cfg.data.train_split!r}, val split {cfg.data.val_split!r}",
    ]
    if tune_ids:
        what = "stage-2 settings and seg.threshold" if rows.get("rule") else "stage-2 settings"
        lines.append(f"# {what}: on the masks of {len(tune_ids)} image(s) of the tuning")
        more = " ..." if len(tune_ids) > 20 else ""
        lines.append(f"#   split {cfg.data.tune_split!r}: {', '.join(tune_ids[:20])}{more}")
    if rows.get("rule"):
        row = rows["rule"][0]
        lines.append(
            f"# empty-mask rule: by the balanced accuracy of 'mask not empty' against the image labels of "
            f"{row.get('holdout_images', 0)} held-out train image(s) (no mask read)"
            + (f" and {row.get('tune_images', 0)} tuning image(s)" if tune_ids else "")
        )
    lines += [f"# {note}" for note in notes]
    changed = {n: v for n, v in chosen.items() if v != current.get(n)}
    if any(n.startswith("irn.") for n in changed) and any(n in RULE for n in chosen):
        lines.append(
            "# the irn changes make new pseudo-labels, on which the segmenter trains again: the empty-mask rule here "
            "was chosen for the config's segmenter; run `wss tune` again with this overlay to choose it for the new one"
        )
    lines.append(
        "# changed from the config: "
        + (", ".join(f"{n} {current.get(n)!r} -> {v!r}" for n, v in changed.items()) or "nothing")
    )
    tree: dict = {}
    for name, value in chosen.items():
        section, field = name.split(".")
        tree.setdefault(section, {})[field] = plain(value)
    return "\n".join(lines) + "\n" + (yaml.safe_dump(tree, sort_keys=False) if tree else "{}\n")


def plain(value):
    """A YAML-friendly number (numpy scalars and float noise out)."""
    if isinstance(value, bool) or isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    return round(float(value), 6)


def plot_profiles(rows: dict, task: str, path: Path) -> None:
    """tune.png: for each searched setting with more than one value, the best score at each value
    (every other setting at its best)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stages.tuning.choice import profile
    from stages.tuning.stage2 import objective

    panels = []
    for search, found in rows.items():
        score = SEARCH_SCORE[search] or objective(task)
        for name in TUNABLE:
            curve = profile(found, name, score)
            if len(curve) > 1:
                panels.append((name, score, curve))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3), squeeze=False)
    for ax, (name, score, curve) in zip(axes[0], panels):
        values = list(curve)
        positions = values if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) else None
        x = positions if positions is not None else list(range(len(values)))
        order = np.argsort(x)
        ax.plot(np.asarray(x)[order], np.asarray([curve[v] for v in values])[order], marker="o")
        if positions is None:
            ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.set_xlabel(name)
        ax.set_ylabel(score)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


@click.command("tune", cls=WssCommand)
@config_options
@click.option(
    "--params",
    "params",
    multiple=True,
    metavar="NAME=VALUES",
    help="A searched setting and its values, V1,V2,... or START:STOP:STEP (repeatable), e.g. "
    "--params irn.beta=5,10,20 --params irn.sem_seg_bg_threshold=0.1:0.9:0.1; the others keep their default range.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path(OVERLAY),
    show_default=True,
    help="Where to copy the config overlay of the chosen settings.",
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=None, help="Use only the first N tuning and held-out images."
)
@click.option("--force", is_flag=True, help="Search again even if this search is cached.")
def tune_command(config_path, overrides, params, out: Path, limit: int | None, force: bool):
    """Choose the settings that need no retraining (thresholds, the walk, the CRF, the empty-mask
    rule) on the cached artifacts, and write them as a config overlay.

    \b
    Example:
      wss tune -c configs/siim.yaml -o data.tune_split=tune
      wss tune -c configs/demo.yaml --params irn.beta=5,10,20 --params irn.sem_seg_bg_threshold=0.1:0.9:0.1
      wss run -c configs/siim.yaml -c tuned.yaml
    """
    cfg = load(config_path, overrides)
    grid = parse_params(params)
    result = tune(cfg, grid, limit=limit, force=force)
    from data.layout import PreparedDataset

    task = PreparedDataset(cfg.data.root).task
    for title, columns, body in tables(result.rows, task):
        click.echo(f"{title}\n{format_table(body, columns)}\n")
    for note in result.notes:
        click.echo(f"note: {note}")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.artifact / OVERLAY, out)
    click.echo(f"tune ({result.state}): {result.artifact}; plot {result.artifact / 'tune.png'}; overlay {out}")
