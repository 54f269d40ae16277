"""The stage contract: what the pipeline needs to know about a stage, and nothing more."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from data.errors import WssError

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


class StageInputError(WssError):
    """An upstream artifact or an input file a stage needs is missing or unusable."""


@dataclass
class StageResult:
    metrics: dict[str, float] = field(default_factory=dict)
    headline: str = ""  # the metric the run summary shows, e.g. "cam_miou"
    failures: list[str] = field(default_factory=list)  # per-image problems, listed at the end


class Stage(Protocol):
    name: str  # "cam" | "irn" | "pseudo" | "seg"
    needs: tuple[str, ...]  # upstream stage names
    section: str  # the config section it reads

    # the section's settings that make the artifact; `task` is the dataset's binary|multiclass
    # (a setting that only one task or one optimizer reads stays out of the other's key)
    def key_config(self, cfg: Any, task: str) -> dict: ...

    def code_version(self) -> str: ...

    def run(self, cfg: Any, dataset: Any, inputs: dict[str, Path], out: Path, *,
            resume: bool = False, limit: int | None = None) -> StageResult: ...

    # Optional: `preflight(cfg, dataset) -> None` checks the stage's options cheaply (names a
    # library must know, files that must exist) and raises WssError; `wss run` calls it for every
    # stage it is about to compute before the first one starts, so that a typo in the last stage
    # does not surface after hours of the first ones.
    # Optional: `splits`, the `data` split settings the output depends on (default
    # ("train_split",)); they join the key. `score_splits`: splits that are only scored.
    # Optional: `score_settings`, names of section fields that only score the output (left out of
    # key_config), with `rescore(cfg, dataset, artifact, metrics, scored_with, limit) -> metrics`
    # recomputing the scores the changed values (settings and score_splits as `data.<name>`)
    # change; a cached artifact scored with other values is re-scored, not recomputed.
    # Optional: `resume_files`, names of files in the partial folder that only `--resume` of the
    # interrupted stage reads (the training checkpoint with its optimizer state, about 3x the
    # model); the runner deletes them when the stage has finished, before it commits.
    # Optional: `resume_outputs`, folders of per-image files in the partial folder that `--resume`
    # keeps (cams, seeds, pseudo-labels); `wss status` counts them for an interrupted stage.
    # Optional: `inference_settings(cfg) -> tuple[str, ...]`, section fields used only after
    # training; a run whose key differs from a complete artifact's in those alone gets that
    # artifact as inputs["trained"] and reuses its model instead of training.


def section_dict(section: Any, only: set[str] | None = None, skip: set[str] | None = None) -> dict:
    """A config section's settings as plain data (nested sections as mappings), for keys and files."""
    values = section.model_dump()
    if only is not None:
        values = {k: v for k, v in values.items() if k in only}
    if skip is not None:
        values = {k: v for k, v in values.items() if k not in skip}
    return values


def weights_file_stamp(weights: str | None) -> str | None:
    """Size and mtime of a local weights file, for the cache key: a file overwritten in place
    under the same path (a re-trained encoder) makes the stage stale. None for null, imagenet
    and seg's `cam` (the cam stage's key covers that)."""
    if weights in (None, "imagenet", "cam"):
        return None
    path = Path(weights).expanduser()
    if not path.is_file():
        return "missing"  # the stage itself reports it when it runs
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def source_hash(*relative_paths: str) -> str:
    """Hash of the source files a stage's results depend on: editing them makes artifacts stale."""
    digest = hashlib.sha256()
    for rel in relative_paths:
        path = PACKAGE_ROOT / rel
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(PACKAGE_ROOT)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]
