"""The stage contract (stages.base.Stage): every stage is a subclass, a new one needs only its
name, section, key_config and run, and the runner, status, clean and evaluate use the defaults."""

from __future__ import annotations

import pytest

from pipeline import runner
from pipeline.clean import clean
from pipeline.report import evaluate_artifacts
from stages.base import Stage, StageResult, section_dict
from stages.registry import STAGE_ORDER, all_stages
from tests.test_cache import make_pipeline, with_stage


class MinimalCam(Stage):
    """A stage that overrides nothing it need not."""

    name, section = "cam", "cam"

    def key_config(self, cfg, task) -> dict:
        return section_dict(cfg.cam)

    def run(self, cfg, dataset, inputs, out, *, resume=False, limit=None) -> StageResult:
        (out / "result.txt").write_text("done")
        return StageResult(metrics={"cam_miou": 0.5}, headline="cam_miou")

    def code_version(self) -> str:  # its module is outside the repository's packages: no closure to hash
        return "minimal-1"


def test_every_registered_stage_is_a_stage_in_run_order():
    stages = all_stages()
    assert list(stages) == STAGE_ORDER
    assert all(isinstance(stage, Stage) and stage.name == name for name, stage in stages.items())


def test_the_defaults_are_those_of_a_stage_without_the_trait(tiny_synthetic, tmp_path):
    stage = MinimalCam()
    pipeline = make_pipeline(tiny_synthetic, tmp_path)
    assert stage.needs == () and stage.splits == ("train_split",)
    assert stage.score_settings == () and stage.score_splits == ()
    assert stage.resume_files == () and stage.resume_outputs == ()
    assert stage.preflight(pipeline.cfg, pipeline.dataset) is None
    assert stage.inference_settings(pipeline.cfg) == ()
    assert stage.evaluate(pipeline.cfg, pipeline.dataset, tmp_path) == {}
    assert stage.rescore(pipeline.cfg, pipeline.dataset, tmp_path, {"cam_miou": 0.5}, {}) == {"cam_miou": 0.5}
    assert stage.code_modules() == (__name__,)
    with pytest.raises(ValueError, match=f"no module '{__name__}'"):
        Stage.code_version(stage)


def test_a_stage_needs_its_own_key_config_and_run():
    class Incomplete(Stage):
        name, section = "cam", "cam"

        def key_config(self, cfg, task) -> dict:
            return {}

    with pytest.raises(TypeError, match="run"):
        Incomplete()


def test_settings_that_only_score_need_a_rescore():
    with pytest.raises(TypeError, match="only score .*threshold.* but no rescore"):

        class Unscored(MinimalCam):
            score_settings = ("threshold",)


def test_a_minimal_stage_runs_through_the_pipeline_status_clean_and_evaluate(
    tiny_synthetic, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(runner, "all_stages", lambda: {**all_stages(), "cam": MinimalCam()})
    pipeline = with_stage(make_pipeline(tiny_synthetic, tmp_path, "cam.epochs=2"), MinimalCam())
    old = pipeline.run_stage("cam")
    assert old.state == "ran" and (old.path / "result.txt").is_file()
    assert pipeline.run_stage("cam").state == "cached"
    assert pipeline.status_of("cam").state == "up to date"

    pipeline = with_stage(make_pipeline(tiny_synthetic, tmp_path, "cam.epochs=3"), MinimalCam())
    status = pipeline.status_of("cam")
    assert status.state == "stale" and status.path == old.path  # no inference settings: no twin
    rows, _, _ = clean(pipeline, delete=False)
    assert [row["key"] for row in rows] == [old.path.name.split("-")[1]]

    pipeline.run_stage("cam")
    rows = evaluate_artifacts(pipeline.cfg, "cam")  # a Pipeline of its own, with MinimalCam
    assert rows == [] and "cam: no ground-truth masks to score against" in capsys.readouterr().err
