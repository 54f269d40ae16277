"""The settings that set an artifact apart: its key's settings that differ from the shipped
config the run started from (TensorBoard's text summary, report.html's settings tables)."""

from __future__ import annotations

from pipeline.config import load_config
from pipeline.settings_diff import ABSENT, Difference, differences, reference_config
from tests.helpers import DEMO_CONFIG, REPO


def test_differences_name_each_dotted_setting_once():
    ours = {"cam": {"lr": 0.1, "scales": (1.0, 0.5), "method": "gap"}, "limit": 8}
    theirs = {"cam": {"lr": 0.2, "scales": [1.0, 0.5], "method": "gap", "drop": 0.3}}
    assert differences(ours, theirs) == [
        Difference("cam.lr", 0.1, 0.2),
        Difference("limit", 8, ABSENT),
        Difference("cam.drop", ABSENT, 0.3),
    ]
    assert differences(ours, ours) == []
    assert str(ABSENT) == "-"


def test_the_reference_is_the_shipped_config_the_run_started_from(tmp_path):
    name, reference = reference_config(load_config(DEMO_CONFIG, ["cam.lr=0.5"]))
    assert name == "configs/demo.yaml" and reference.cam.lr == load_config(DEMO_CONFIG).cam.lr != 0.5

    mine = tmp_path / "mine.yaml"
    mine.write_text(f"base: {DEMO_CONFIG}\ncam:\n  lr: 0.25\n")
    name, reference = reference_config(load_config(mine))
    assert name == "configs/demo.yaml" and reference.cam.lr != 0.25  # its own file is what differs

    alone = tmp_path / "alone.yaml"
    alone.write_text("cam:\n  lr: 0.25\n")
    assert reference_config(load_config(alone))[0] == "the defaults"
    assert load_config([DEMO_CONFIG, REPO / "configs" / "methods" / "pcam.yaml"]).files[0] == DEMO_CONFIG.resolve()


def test_a_stage_shows_only_its_own_key_settings(tiny_synthetic, tmp_path):
    from pipeline.runner import Pipeline

    base = [f"data.root={tiny_synthetic}", f"run.workdir={tmp_path}"]
    cfg = load_config(DEMO_CONFIG, [*base, "irn.sem_seg_bg_threshold=0.3", "run.workers=0", "run.tensorboard=false"])
    pipeline = Pipeline(cfg)
    assert pipeline.setting_differences("cam") == ("configs/demo.yaml", [])
    assert pipeline.setting_differences("irn") == ("configs/demo.yaml", [])
    reference = load_config(DEMO_CONFIG).irn.sem_seg_bg_threshold
    assert pipeline.setting_differences("pseudo") == (
        "configs/demo.yaml",
        [Difference("irn.sem_seg_bg_threshold", 0.3, reference)],
    )
    _, with_limit = pipeline.setting_differences("cam", limit=8)
    assert with_limit == [Difference("limit", 8, ABSENT)]
    # run.tensorboard says how to run, not what is computed: the same artifact either way
    assert pipeline.key("cam").digest == Pipeline(load_config(DEMO_CONFIG, base)).key("cam").digest
