"""The stage contract: what the pipeline needs to know about a stage, and nothing more."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from data.errors import WssError
from stages.code_version import code_version

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
ARTIFACT_MANIFEST = "manifest.json"  # written last into a complete artifact (pipeline.cache.MANIFEST)
ARTIFACT_MODEL_FILE = "model.safetensors"  # the trained model of a cam / irn / seg artifact


class StageInputError(WssError):
    """An upstream artifact or an input file a stage needs is missing or unusable."""


@dataclass
class StageResult:
    metrics: dict[str, float] = field(default_factory=dict)
    headline: str = ""  # the metric the run summary shows, e.g. "cam_miou"
    failures: list[str] = field(default_factory=list)  # per-image problems, listed at the end


class Stage(ABC):
    """The contract between the pipeline and a stage: everything the runner, `wss status`,
    `wss clean` and `wss evaluate` may ask of one.

    A stage is a subclass that sets `name`, `section` (and `needs` when it reads upstream
    artifacts), implements `key_config` and `run`, and overrides whichever of the other
    members does not fit it; each default below is what a stage without that trait needs.
    """

    name: ClassVar[str]  # "cam" | "irn" | "pseudo" | "seg"
    section: ClassVar[str]  # the config section it reads
    needs: ClassVar[tuple[str, ...]] = ()  # upstream stage names; their artifacts come as inputs[name]
    # The `data` split settings the output depends on; they join the key.
    splits: ClassVar[tuple[str, ...]] = ("train_split",)
    # `data` splits that are only scored (cam's val split: classification AUC / AP). With
    # score_settings they make a cached artifact re-scored, not recomputed (see rescore).
    score_splits: ClassVar[tuple[str, ...]] = ()
    # Names of section fields that only score the output (key_config leaves them out).
    score_settings: ClassVar[tuple[str, ...]] = ()
    # Files in the partial folder that only `--resume` of the interrupted stage reads (the
    # training checkpoint with its optimizer state, about 3x the model); the runner deletes them
    # when the stage has finished, before it commits.
    resume_files: ClassVar[tuple[str, ...]] = ()
    # Folders of per-image files in the partial folder that `--resume` keeps (cams, seeds,
    # pseudo-labels); `wss status` counts them for an interrupted stage.
    resume_outputs: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if (cls.score_settings or cls.score_splits) and cls.rescore is Stage.rescore:
            raise TypeError(
                f"{cls.__name__} has settings that only score "
                f"({', '.join((*cls.score_settings, *cls.score_splits))}) but no rescore"
            )

    @abstractmethod
    def key_config(self, cfg: Any, task: str) -> dict:
        """The section's settings that make the artifact; `task` is the dataset's
        binary|multiclass (a setting that only one task or one optimizer reads stays out of the
        other's key), and score_settings stay out."""

    @abstractmethod
    def run(
        self,
        cfg: Any,
        dataset: Any,
        inputs: dict[str, Path],
        out: Path,
        *,
        resume: bool = False,
        limit: int | None = None,
    ) -> StageResult:
        """Compute the artifact into `out` (the partial folder) from the upstream artifacts in
        `inputs`; `resume` continues what an interrupted run left there, `limit` takes the first
        N images of each split."""

    def evaluate(self, cfg: Any, dataset: Any, artifact: Path) -> dict:
        """The metrics `wss evaluate` prints: the complete `artifact` scored against the ground
        truth. Default: nothing to score."""
        return {}

    def preflight(self, cfg: Any, dataset: Any) -> None:
        """Cheap checks of the stage's options (names a library must know, files that must exist)
        that raise WssError; `wss run` calls it for every stage it is about to compute before the
        first one starts, so that a typo in the last stage does not surface after hours of the
        first ones. Default: nothing to check."""

    def rescore(
        self, cfg: Any, dataset: Any, artifact: Path, metrics: dict, scored_with: dict, limit: int | None = None
    ) -> dict:
        """The cached artifact's `metrics` with the scores recomputed that the changed
        score_settings / score_splits values change (`scored_with` holds the values they were
        scored with, score_splits as `data.<name>`). A stage with either must override it; one
        without has nothing to re-score."""
        return metrics

    def inference_settings(self, cfg: Any) -> tuple[str, ...]:
        """Section fields (or dotted `data.<split>`) used only after training: a run whose key
        differs from a complete artifact's in those alone gets that artifact as
        inputs["trained"] and reuses its model instead of training. Default: none."""
        return ()

    def code_modules(self) -> tuple[str, ...]:
        """The modules the stage's code version starts from (their import closure is walked):
        the stage's own module. A stage that runs code it does not import adds its module."""
        return (type(self).__module__,)

    def code_version(self) -> str:
        """Hash of the code the stage's results depend on (stages.code_version): the import
        closure of code_modules() within the repository, without NOT_RESULT_BEARING."""
        return code_version(self.code_modules(), skip=NOT_RESULT_BEARING)


# Modules that cannot change a stage's result: the code-version walk does not enter them, so
# editing them recomputes nothing. Only presentation of what is already computed belongs here;
# whatever computes, reads or writes a stage's outputs or scores stays in its code version.
NOT_RESULT_BEARING = {
    "stages.common.tables": "text and Markdown tables of metrics already computed, for the log and reports",
    "stages.common.run_log": "the recorder the training loop reports values it already computed to (TensorBoard)",
}


def section_dict(section: Any, only: set[str] | None = None, skip: set[str] | None = None) -> dict:
    """A config section's settings as plain data (nested sections as mappings), for keys and files."""
    values = section.model_dump()
    if only is not None:
        values = {k: v for k, v in values.items() if k in only}
    if skip is not None:
        values = {k: v for k, v in values.items() if k not in skip}
    return values


def weights_file_stamp(weights: str | None) -> str | None:
    """What identifies a local weights source in the cache key. A wss artifact (its folder, or its
    model file beside its manifest) is its cache key: the same trained model wherever the run
    folder was copied. Any other file is its size and mtime: a file overwritten in place under
    the same path (a re-trained encoder) makes the stage stale. None for null, imagenet and
    seg's `cam` (the cam stage's key covers that)."""
    if weights in (None, "imagenet", "cam"):
        return None
    path = Path(weights).expanduser()
    artifact_key = wss_artifact_key(path.parent if path.is_file() and path.name == ARTIFACT_MODEL_FILE else path)
    if artifact_key is not None:
        return f"artifact:{artifact_key}"
    if path.is_dir():
        path = path / ARTIFACT_MODEL_FILE
    if not path.is_file():
        return "missing"  # the stage itself reports it when it runs
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def wss_artifact_key(folder: Path) -> str | None:
    """The cache key in the manifest of a complete artifact folder holding a model file (the
    manifest pipeline.cache writes last), or None."""
    try:
        manifest = json.loads((folder / ARTIFACT_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    key = manifest.get("key") if isinstance(manifest, dict) else None
    return key if isinstance(key, str) and key and (folder / ARTIFACT_MODEL_FILE).is_file() else None
