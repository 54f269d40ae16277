"""TensorBoard event files: one TensorBoard run per artifact, so `tensorboard --logdir runs/`
shows every stage a config computed, side by side.

A run lives in `<workdir>/<dataset>/tensorboard/<stage>-<key12>/`, the artifact's folder name.
While a stage trains, the training loop reports to it through `stages.common.run_log`:

- `train/<term>` and `train/lr` at the loop's progress cadence (every `log_every` steps and at
  the end of each epoch): each loss term averaged over the steps since the previous point, from
  sums the loop already reads then (no extra GPU wait);
- `epoch/<term>`, `epoch/images_per_s`, `epoch/seconds`, `epoch/epoch`: metrics.jsonl's records.

Every curve's x axis is the optimizer step (an epoch's record at the step that ends it), as in
Lightning and detectron2. A stage that reuses a trained twin's model (same training settings)
trains nothing: its curves are in the twin's run.

When the stage has finished, `log_finished_stage` adds `score/<metric>` (the stage's metrics.json,
at step 0), the text `settings` (the key's settings that differ from the shipped config the run
started from, see `pipeline.settings_diff`), the same differences in TensorBoard's HPARAMS tab
with the scores, and a few overlay strips (image | the stage's own outputs | ground truth).

Only rank 0 writes. A stage computed afresh (not `--resume`) starts its run folder afresh; a
resumed one writes a session start at the step after its checkpoint, so TensorBoard drops what
the interrupted run logged past the checkpoint (each epoch's record is flushed before its
checkpoint is written, so the epochs kept are all on disk). Without the `tensorboard` package,
or with `run.tensorboard: false`, nothing is written (a warning once per process in the first
case). A write that fails (a full disk) warns
once and stops the run's logging, never the stage.
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
import time
from pathlib import Path

from stages.common import distributed
from stages.common.run_log import RunLog

log = logging.getLogger("wss.tensorboard")
OVERLAY_IMAGES = 4  # overlay strips per stage
_warned_missing = False


def run_folder(store_root: Path, artifact_name: str) -> Path:
    """The TensorBoard run of the artifact named `artifact_name` (`cam-0123456789ab`)."""
    return store_root / "tensorboard" / artifact_name


def summary_writer_class():
    """torch.utils.tensorboard's SummaryWriter, or None when the `tensorboard` package cannot be
    imported (warned once per process)."""
    global _warned_missing
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        if not _warned_missing:
            log.warning(
                "run.tensorboard: the tensorboard package cannot be imported (%s): no TensorBoard event files "
                "(install it from requirements.txt, or set run.tensorboard=false to silence this)",
                error,
            )
            _warned_missing = True
        return None
    return SummaryWriter


def open_run(enabled: bool, folder: Path, resume: bool) -> RunLog:
    """The recorder of one stage's run: a TensorBoardRun on rank 0 when `enabled` (run.tensorboard)
    and the package is there, the do-nothing RunLog otherwise."""
    if not enabled or not distributed.is_main():
        return RunLog()
    writer_class = summary_writer_class()
    if writer_class is None:
        return RunLog()
    if not resume:  # the stage computes afresh: so does its TensorBoard run
        shutil.rmtree(folder, ignore_errors=True)
    continued = resume and any(folder.glob("events.out.tfevents.*"))
    try:
        writer = writer_class(log_dir=str(folder), flush_secs=30)
    except OSError as error:
        log.warning("TensorBoard: cannot write in %s (%s): no event files for this stage", folder, error)
        return RunLog()
    return TensorBoardRun(writer, folder, continued)


def guarded(method):
    """A recorder call that never costs the stage: the first failure warns and ends the run's
    logging. Also counts the seconds spent in the calls (bench/tensorboard_overhead.py)."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if self.broken:
            return None
        started = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        except Exception as error:  # a picture must never cost the user the run's results
            self.broken = True
            log.warning("TensorBoard: could not write to %s (%s): no more events for this stage", self.folder, error)
            return None
        finally:
            self.busy_seconds += time.perf_counter() - started

    return call


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class TensorBoardRun(RunLog):
    """One artifact's TensorBoard run. `continued`: the folder held an interrupted run's events."""

    def __init__(self, writer, folder: Path, continued: bool = False):
        self.writer, self.folder, self.continued = writer, folder, continued
        self.broken = False
        self.busy_seconds = 0.0

    @guarded
    def resumed(self, first_step: int, steps_per_epoch: int, history: list[dict]) -> None:
        if not self.continued:  # no event of the interrupted run (it logged none): the checkpoint's epochs
            for record in history:
                self.epoch(int(record["epoch"]) * steps_per_epoch, record)
            return
        # TensorBoard drops every event at or past a session START's step: what the interrupted
        # run logged past its checkpoint (its epochs up to the checkpoint were flushed before it)
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        start = SessionLog(status=SessionLog.START)
        self.writer.file_writer.add_event(Event(step=first_step + 1, wall_time=time.time(), session_log=start))

    @guarded
    def step(self, step: int, values: dict[str, float], lr: float) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"train/{name}", value, step)
        self.writer.add_scalar("train/lr", lr, step)

    @guarded
    def epoch(self, step: int, record: dict) -> None:
        for name, value in record.items():
            if name not in ("epoch", "stage_step") and is_number(value):
                self.writer.add_scalar(f"epoch/{name}", value, step)
        self.writer.add_scalar("epoch/epoch", record["epoch"], step)
        self.writer.flush()  # on disk before the checkpoint: a resumed run finds every epoch it keeps

    @guarded
    def finished(self, metrics: dict, settings: str, hparams: dict, strips: list, columns: list[str]) -> None:
        """The stage's scores, its settings text and HPARAMS entry, and overlay strips
        [(image id, HxWx3 uint8)] whose columns are `columns`."""
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        scores = {f"score/{name}": float(value) for name, value in metrics.items() if is_number(value)}
        for tag, value in scores.items():
            self.writer.add_scalar(tag, value, 0)
        self.writer.add_text("settings", settings, 0)
        headline = {tag: value for tag, value in scores.items() if "/" not in tag[len("score/") :]}
        # the session's summaries alone: without an experiment summary TensorBoard's HPARAMS tab
        # takes the union of every run's settings (one run's experiment would hide the others')
        _, session_start, session_end = hparams_summary({k: hparam_value(v) for k, v in hparams.items()}, headline)
        self.writer.file_writer.add_summary(session_start, 0)
        self.writer.file_writer.add_summary(session_end, 0)
        for index, (image_id, strip) in enumerate(strips):
            self.writer.add_image(f"overlay/{index}", strip, 0, dataformats="HWC")
        if strips:
            listed = "\n".join(f"- overlay/{i}: `{image_id}`" for i, (image_id, _) in enumerate(strips))
            self.writer.add_text("overlays", f"Columns: {' | '.join(columns)}\n\n{listed}", 0)

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception as error:  # the stage's results are committed; its pictures are a bonus
            log.warning("TensorBoard: could not finish %s (%s)", self.folder, error)


def hparam_value(value):
    """TensorBoard's HPARAMS take numbers, text and booleans: lists and mappings become text."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def settings_markdown(stage: str, artifact: str, reference: str, differences: list) -> str:
    """The run's text summary: which artifact, and its key's settings that differ from `reference`."""
    head = f"**{stage}**, artifact `{artifact}`. Settings that differ from {reference}"
    if not differences:
        return f"{head}: none."
    rows = "\n".join(f"| `{d.name}` | `{d.value}` | `{d.reference}` |" for d in differences)
    return f"{head}:\n\n| setting | this run | {reference} |\n|---|---|---|\n{rows}"


def log_finished_stage(recorder: RunLog, pipeline, name: str, artifact: Path, metrics: dict, limit: int | None) -> None:
    """After stage `name` committed `artifact`: its scores, settings and overlays in its run.
    Never raises: the stage's results are committed, its pictures are a bonus."""
    if not isinstance(recorder, TensorBoardRun) or recorder.broken:
        return
    from pipeline.visualize import grid_images, stage_strips
    from stages.common.runtime import resolve_device

    cfg, dataset = pipeline.cfg, pipeline.dataset
    try:
        reference, differences = pipeline.setting_differences(name, limit)
    except Exception as error:
        log.warning("TensorBoard: no settings summary for %s (%s)", name, error)
        reference, differences = "the shipped config", []
    strips, columns = [], []
    try:
        images = grid_images(dataset, dataset.split(cfg.data.train_split)[:limit], OVERLAY_IMAGES)
        device = resolve_device(cfg.run.device)
        columns, strips = stage_strips(dataset, name, artifact, images, device, cfg.seg.threshold)
    except Exception as error:
        log.warning("TensorBoard: no overlay images for %s (%s)", name, error)
    hparams = {"stage": name, **{d.name: d.value for d in differences}}
    settings = settings_markdown(name, artifact.name, reference, differences)
    recorder.finished(metrics, settings, hparams, strips, columns)
