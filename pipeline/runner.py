"""The stage graph: resolve order, compute keys, skip what is up to date, run the rest."""

from __future__ import annotations

import functools
import json
import logging
import platform
import shutil
import time
from contextlib import closing
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from data.errors import WssError
from data.layout import PreparedDataset, nan_for_null, write_json_atomic
from pipeline.cache import ArtifactStore, CacheError, StageKey, explain_difference
from pipeline.config import Config
from pipeline.settings_diff import Difference, differences, reference_config, sectioned
from pipeline.tensorboard_log import log_finished_stage, open_run, run_folder
from stages.base import Stage, StageInputError, section_dict
from stages.common import distributed, run_log
from stages.common.elapsed import ELAPSED_FILE, mark_elapsed, start_clock
from stages.common.model_files import checkpoint_epoch
from stages.common.training import CHECKPOINT
from stages.registry import STAGE_ORDER, all_stages

log = logging.getLogger("wss")


@dataclass
class Outcome:
    stage: str
    state: str  # "cached" | "ran"
    path: Path
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)
    headline: str = ""
    failures: list = field(default_factory=list)

    @property
    def headline_value(self) -> str:
        value = self.metrics.get(self.headline)
        return f"{self.headline}={value:.4f}" if isinstance(value, (int, float)) else ""


@dataclass
class StageStatus:
    stage: str
    state: str  # "up to date" | "stale" | "missing" | "interrupted" (a .partial that --resume continues)
    path: Path | None
    reasons: list[str]
    note: str = ""  # follows the state: "after epoch 2 of 4 (resume with --resume)"

    @property
    def summary(self) -> str:
        return f"{self.state} {self.note}" if self.note else self.state


# What the runner itself writes in a .partial folder: a stage that fails leaving nothing else
# there computed nothing, and the folder goes.
BOOKKEEPING = ("log.txt", ELAPSED_FILE)


def remove_if_nothing_computed(partial: Path) -> None:
    """Remove the .partial folder of a stage that stopped before writing any result (a missing
    input, a bad option found late, Ctrl-C at once): nothing there to resume or to look at but
    a log whose lines the terminal showed."""
    made = (p for p in partial.rglob("*") if p.is_file() and not (p.parent == partial and p.name in BOOKKEEPING))
    if next(made, None) is None:
        shutil.rmtree(partial, ignore_errors=True)


def upstream_closure(name: str, stages: dict) -> list[str]:
    """`name` and everything it needs, in run order."""
    wanted = {name}
    for stage_name in reversed(STAGE_ORDER):
        if stage_name in wanted:
            wanted.update(stages[stage_name].needs)
    return [s for s in STAGE_ORDER if s in wanted]


def training_parts(parts: dict, inference_settings) -> dict:
    """A stage's key parts without its inference settings (a dotted `data.val_split` names a field
    of the key's data part), as JSON would store them."""
    parts = json.loads(json.dumps(parts, default=str))
    config = parts.get("config", {})
    for name in inference_settings:
        section, _, field = name.rpartition(".")
        (config.setdefault(section, {}) if section else config)[field] = "(inference)"
    return parts


def scoring_values(stage: Stage, section: dict, data: dict) -> dict:
    """A stage's scoring-only settings among its section's values, and the splits it only scores
    (cam's val split) as `data.<name>`."""
    values = {k: v for k, v in section.items() if k in stage.score_settings}
    # a split left unset (data.tune_split: null) is recorded by its absence, as before it existed
    values.update({f"data.{split}": data.get(split) for split in stage.score_splits if data.get(split) is not None})
    return values


def settings_text(values: dict, section: str = "") -> str:
    """`cam.eval_bg_threshold=0.6, data.val_split=val`: a dotted name is already whole."""
    return (
        ", ".join(f"{section + '.' if section and '.' not in k else ''}{k}={v}" for k, v in values.items())
        or "other settings"
    )


def software_versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in ["wss", "torch", "torchvision", "segmentation-models-pytorch", "numpy", "pydensecrf2"]:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def resume_note(work: list[str]) -> str:
    """`after epoch 2 of 4 (resume with --resume)`, `with 12 files in seeds/ (resume with --resume,
    which keeps them)`."""
    keeps = ", which keeps them" if any(part.startswith("with ") for part in work) else ""
    return f"{' '.join(work)} (resume with --resume{keeps})"


class Pipeline:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dataset = PreparedDataset(cfg.data.root)
        self.store = ArtifactStore(cfg.run.workdir, self.dataset.name)
        self.stages: dict[str, Stage] = all_stages()
        self._fingerprint: str | None = None
        self._keys: dict[tuple[str, int | None], StageKey] = {}
        self._preflighted: set[str] = set()

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self.dataset.fingerprint()
        return self._fingerprint

    def stage(self, name: str) -> Stage:
        if name not in self.stages:
            raise WssError(f"unknown stage {name!r} (stages: {', '.join(STAGE_ORDER)})")
        return self.stages[name]

    def key_settings(self, name: str, cfg: Config, limit: int | None = None) -> dict:
        """The settings of `cfg` that make stage `name`'s artifact: the config part of its key."""
        stage = self.stage(name)
        config = stage.key_config(cfg, self.dataset.info.task)
        config["data"] = {split: getattr(cfg.data, split) for split in stage.splits}
        config["run"] = {"seed": cfg.run.seed}  # another seed trains other models
        if limit is not None:
            config["limit"] = limit
        return config

    @functools.cached_property
    def reference(self) -> tuple[str, Config]:
        """(name, config) of the shipped config the run started from (read once)."""
        return reference_config(self.cfg)

    def setting_differences(self, name: str, limit: int | None = None) -> tuple[str, list[Difference]]:
        """(reference name, settings) of stage `name`'s key that differ from the shipped config the
        run started from (pipeline.settings_diff)."""
        reference_name, reference = self.reference
        section = self.stage(name).section
        ours = sectioned(self.key_settings(name, self.cfg, limit), section)
        theirs = sectioned(self.key_settings(name, reference), section)
        return reference_name, differences(ours, theirs)

    def key(self, name: str, limit: int | None = None) -> StageKey:
        if (name, limit) not in self._keys:
            stage = self.stage(name)
            parts = {
                "config": self.key_settings(name, self.cfg, limit),
                "dataset": self.fingerprint,
                "upstream": {need: self.key(need).digest for need in stage.needs},
                "code": stage.code_version(),
            }
            self._keys[(name, limit)] = StageKey(name, parts)
        return self._keys[(name, limit)]

    def artifact(self, name: str) -> Path | None:
        return self.store.complete(self.key(name))

    def require(self, name: str) -> Path:
        """The complete, current artifact of an upstream stage, or an error that says why not."""
        path = self.artifact(name)
        if path is not None:
            return path
        status = self.status_of(name)
        why = f" ({'; '.join(status.reasons)})" if status.reasons else ""
        raise StageInputError(
            f"{name}: no up-to-date artifact for this config; the latest is {status.summary}{why}. "
            f"Run `wss run-stage {name} {self.cfg.cli_args()}` or `wss run {self.cfg.cli_args()}`."
        )

    def status_of(self, name: str) -> StageStatus:
        key = self.key(name)
        path = self.store.complete(key)
        if path is not None:
            change = self.scoring_change(self.stage(name), self.store.read_manifest(path) or {})
            notes = (
                [f"scored with {settings_text(change[1])}; a run re-scores it with {settings_text(change[0])}"]
                if change
                else []
            )
            return StageStatus(name, "up to date", path, notes)
        partial = self.store.partial_dir(key)
        work = self.resumable_work(name, partial)
        if work:
            return StageStatus(name, "interrupted", partial, [], resume_note(work))
        closest = self.closest_artifact(name)
        if closest is None:
            return StageStatus(name, "missing", None, [])
        old_path, reasons = closest
        twin = self.trained_twin(name)
        if twin is not None:
            reasons.append(f"inference settings only: a run reuses the model trained in {twin}")
        return StageStatus(name, "stale", old_path, reasons or ["key changed"])

    def resumable_work(self, name: str, partial: Path) -> list[str]:
        """What `--resume` of stage `name` continues from its .partial folder, in words: the epochs
        its checkpoint holds ("after epoch 2 of 4"), the files it keeps ("120 files in cams/");
        empty when there is nothing to continue."""
        if not partial.is_dir():
            return []
        stage, work = self.stage(name), []
        if CHECKPOINT in stage.resume_files and (partial / CHECKPOINT).is_file():
            epoch = checkpoint_epoch(partial / CHECKPOINT)  # None: unreadable, a resume starts afresh
            if epoch is not None:
                work.append(f"after epoch {epoch + 1} of {self.cfg.section(stage.section).epochs}")
        for folder in stage.resume_outputs:
            count = sum(1 for p in (partial / folder).glob("*") if p.is_file() and not p.name.startswith("."))
            if count:
                work.append(f"with {count} files in {folder}/")
        return work

    def discarding(self, name: str):
        """For ArtifactStore.writing: says so when a run without `--resume` starts a stage again
        over an interrupted run that `--resume` would have continued."""

        def note(partial: Path) -> None:
            work = self.resumable_work(name, partial)
            if work:
                log.warning(
                    "%s: starting again: discarding %s, an interrupted run (%s) that `--resume` would continue",
                    name,
                    partial,
                    " ".join(work),
                )

        return note

    def closest_artifact(self, name: str) -> tuple[Path, list[str]] | None:
        """The complete artifact of stage `name` whose key differs least from the current one
        (the newest among equals) and how it differs; `--limit` tries are not candidates."""
        key, section = self.key(name), self.stage(name).section
        candidates = [
            (path, explain_difference(manifest.get("key_parts", {}), key.parts, section))
            for path, manifest in self.store.completed(name)
            if "limit" not in manifest.get("key_parts", {}).get("config", {})
        ]
        return min(candidates, key=lambda candidate: len(candidate[1]), default=None)

    def status(self) -> list[StageStatus]:
        return [self.status_of(name) for name in STAGE_ORDER]

    def run_stage(self, name: str, force: bool = False, resume: bool = False, limit: int | None = None) -> Outcome:
        stage = self.stage(name)
        key = self.key(name, limit)
        done = distributed.broadcast(self.store.complete(key) if distributed.is_main() else None)
        if done is not None and not force:
            manifest = self.store.read_manifest(done) or {}
            log.info("%s: up to date (%s), skipping", name, done)
            metrics = distributed.broadcast(self.rescored(stage, done, manifest) if distributed.is_main() else None)
            return Outcome(name, "cached", done, manifest.get("seconds", 0.0), metrics, manifest.get("headline", ""))
        inputs = {need: self.require(need) for need in stage.needs}
        twin = (
            None if force else distributed.broadcast(self.trained_twin(name, limit) if distributed.is_main() else None)
        )
        if twin is not None:
            inputs["trained"] = twin
        if twin is None:
            self.preflight(name)
        if not distributed.is_main():
            return self.run_beside_rank0(stage, inputs, resume, limit)
        with (
            self.store.reading(inputs.values()),
            self.store.writing(key, resume=resume, before_discard=self.discarding(name)) as partial,
            # TensorBoard events (or a no-op), once this process holds the key's lock
            closing(open_run(self.cfg.run.tensorboard, self.board_folder(key), resume)) as board,
        ):
            distributed.broadcast(partial)
            distributed.check_shared_folder(partial)
            handler = logging.FileHandler(partial / "log.txt")
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
            logging.getLogger().addHandler(handler)
            started = time.time()
            before = start_clock(partial, started)  # seconds an interrupted run spent here
            failed = True
            try:
                log.info("%s: computing %s", name, self.store.final_dir(key))
                with run_log.recording(board):
                    result = stage.run(self.cfg, self.dataset, inputs, partial, resume=resume, limit=limit)
                failed = False
            finally:
                logging.getLogger().removeHandler(handler)
                handler.close()
                if failed:
                    mark_elapsed(partial)  # a --resume counts this run's time too
                    remove_if_nothing_computed(partial)
            seconds = before + time.time() - started
            for file_name in (*stage.resume_files, ELAPSED_FILE):  # finished: nothing to resume
                (partial / file_name).unlink(missing_ok=True)
            manifest = {
                "config": self.cfg.to_dict(),
                "config_file": self.cfg.source,
                "scored_with": self.score_values(stage),
                "inputs": {k: str(v) for k, v in inputs.items()},
                "dataset_root": str(Path(self.cfg.data.root).expanduser().resolve()),  # clean runs elsewhere
                "metrics": result.metrics,
                "headline": result.headline,
                "failures": result.failures,
                "started": started,
                "seconds": seconds,
                "versions": software_versions(),
            }
            final = self.store.commit(key, partial, manifest)
            log_finished_stage(board, self, name, final, result.metrics, limit)
        distributed.broadcast(final)
        log.info(
            "%s: done in %.1f s%s -> %s",
            name,
            seconds,
            f" ({before:.1f} s of them before the interruption)" if before else "",
            final,
        )
        return Outcome(name, "ran", final, seconds, result.metrics, result.headline, result.failures)

    def board_folder(self, key: StageKey) -> Path:
        """The TensorBoard run of the key's artifact."""
        return run_folder(self.store.root, self.store.final_dir(key).name)

    def preflight(self, name: str) -> None:
        """The stage's cheap checks before it computes (names a library must know; weight files
        read and fitted to their network), once per pipeline: `wss run` checks every stage it is
        about to compute before the first starts, `wss run-stage` its one stage."""
        if name not in self._preflighted:
            self.stage(name).preflight(self.cfg, self.dataset)
        self._preflighted.add(name)

    def trained_twin(self, name: str, limit: int | None = None) -> Path | None:
        """A complete artifact of stage `name` trained exactly as this config would train it: its
        key differs from the current one only in the stage's `inference_settings(cfg)` (cam.scales,
        flip, extract; seg.threshold, predict_size), so the stage can reuse its model and only
        infer again. None otherwise."""
        stage = self.stage(name)
        settings = stage.inference_settings(self.cfg)
        if not settings:
            return None
        key = self.key(name, limit)
        wanted = training_parts(key.parts, settings)
        for path, manifest in self.store.completed(name):
            if manifest.get("key") != key.digest and training_parts(manifest.get("key_parts", {}), settings) == wanted:
                return path
        return None

    def score_values(self, stage: Stage) -> dict:
        """The current values of the stage's scoring-only settings (those it leaves out of its key,
        such as cam.eval_bg_threshold)."""
        return scoring_values(stage, section_dict(self.cfg.section(stage.section)), vars(self.cfg.data))

    def scoring_change(self, stage: Stage, manifest: dict) -> tuple[dict, dict] | None:
        """(current, scored with) values of the stage's scoring-only settings when the artifact's
        metrics used others."""
        current = self.score_values(stage)
        if not (stage.score_settings or stage.score_splits):
            return None
        config = manifest.get("config", {})  # a manifest without scored_with: the config it ran with
        scored_with = manifest.get("scored_with")
        if not isinstance(scored_with, dict):  # {} is a record too: scored with no tuning split
            scored_with = scoring_values(stage, config.get(stage.section, {}), config.get("data", {}))
        return None if scored_with == current else (current, scored_with)

    def rescored(self, stage: Stage, artifact: Path, manifest: dict) -> dict:
        """The cached artifact's metrics, recomputed when a scoring-only setting differs from the
        one they were scored with; the manifest and metrics.json then record the new scores."""
        metrics = nan_for_null(manifest.get("metrics", {}))  # written as strict JSON: null for NaN
        change = self.scoring_change(stage, manifest)
        if change is None:
            return metrics
        current, scored_with = change
        log.info(
            "%s: re-scoring the cached artifact with %s (it was scored with %s)",
            stage.name,
            settings_text(current, stage.section),
            settings_text(scored_with, stage.section),
        )
        limit = manifest.get("key_parts", {}).get("config", {}).get("limit")  # a `--limit` try scores its share
        with self.store.reading([artifact]):  # no `--force` or `wss clean` elsewhere replaces it meanwhile
            if (self.store.read_manifest(artifact) or {}).get("started") != manifest.get("started"):
                raise CacheError(f"{artifact} was recomputed by another wss process; run again")
            metrics = stage.rescore(self.cfg, self.dataset, artifact, metrics, scored_with, limit=limit)
            if (
                self.store.update_manifest(artifact, metrics=metrics, scored_with=current)
                and (artifact / "metrics.json").is_file()
            ):
                write_json_atomic(artifact / "metrics.json", metrics)
        return metrics

    def run_beside_rank0(self, stage: Stage, inputs: dict[str, Path], resume: bool, limit: int | None) -> Outcome:
        """A rank > 0 under torchrun: compute its share in the partial directory rank 0 opened
        (rank 0 alone holds the lock, writes the manifest and commits)."""
        partial = distributed.broadcast()
        distributed.check_shared_folder(partial)
        started = time.time()
        result = stage.run(self.cfg, self.dataset, inputs, partial, resume=resume, limit=limit)
        final = distributed.broadcast()
        return Outcome(
            stage.name, "ran", final, time.time() - started, result.metrics, result.headline, result.failures
        )

    def run(self, until: str | None = None, force: tuple[str, ...] = (), resume: bool = False) -> list[Outcome]:
        """Run the chain up to `until`; a forced stage forces everything after it too. `resume`:
        a stage to compute continues from its .partial directory where one is left."""
        last = until or STAGE_ORDER[-1]
        order = upstream_closure(self.stage(last).name, self.stages)
        forced_from = min((order.index(s) for s in force if s in order), default=len(order))
        for i, name in enumerate(order):
            # a stage that reuses a trained twin's model builds nothing anew (no download either)
            if i >= forced_from or (self.store.complete(self.key(name)) is None and self.trained_twin(name) is None):
                self.preflight(name)
        return [self.run_stage(name, force=i >= forced_from, resume=resume) for i, name in enumerate(order)]
