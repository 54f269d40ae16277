"""`wss compare --through irn` with a tuning split: each stage-1 method judged with its own stage-2
settings (chosen by `wss tune`'s search on the tuning split's masks), and `wss prepare synthetic
--tune`, which gives the synthetic benchmark such a split."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from data.layout import PreparedDataset
from pipeline.config import load_config
from tests.helpers import DEMO_CONFIG

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------ prepare synthetic --tune


def test_prepare_synthetic_tune_writes_a_seeded_split_inside_train(cli, tmp_path):
    def prepare(name, *extra):
        result = cli("prepare", "synthetic", "--out", tmp_path / name, "--n", "20", "--size", "32", *extra)
        assert result.exit_code == 0, result.output
        return PreparedDataset(tmp_path / name)

    plain = prepare("plain")
    first, again, other = (
        prepare("a", "--tune", "5"),
        prepare("b", "--tune", "5"),
        prepare("c", "--tune", "5", "--seed", "1"),
    )
    tune = first.split("tune")
    assert len(tune) == 5 and set(tune) <= set(first.split("train"))
    assert not set(tune) & set(first.split("val"))
    assert again.split("tune") == tune  # seeded
    assert set(other.split("tune")) <= set(other.split("train"))
    # the tuning split is drawn apart: train and val are those of the dataset prepared without it
    assert first.split("train") == plain.split("train") and first.split("val") == plain.split("val")
    assert not (tmp_path / "plain" / "splits" / "tune.txt").exists()
    assert (tmp_path / "plain" / "synthetic.json").read_text() == (
        tmp_path / "a" / "synthetic.json"
    ).read_text().replace(', "tune": 5', "")
    # prepared again without --tune: the stale tuning split goes
    result = cli("prepare", "synthetic", "--out", tmp_path / "a", "--n", "20", "--size", "32")
    assert result.exit_code == 0 and not (tmp_path / "a" / "splits" / "tune.txt").exists()

    too_many = cli("prepare", "synthetic", "--out", tmp_path / "d", "--n", "20", "--size", "32", "--tune", "17")
    assert too_many.exit_code == 2
    assert too_many.output.strip().splitlines() == ["error: --tune 17: the train split has only 16 images"]
    assert not (tmp_path / "d").exists()


# ----------------------------------------------------------------------------- compare's options


def test_compare_tune_without_a_tuning_split_is_a_one_line_error(cli, tiny_synthetic, tmp_path):
    base = ["compare", "-c", DEMO_CONFIG, "-o", f"data.root={tiny_synthetic}", "-o", f"run.workdir={tmp_path / 'runs'}"]
    cases = [
        (["--through", "irn", "--tune"], "error: --tune needs a tuning split: set data.tune_split"),
        (["--tune"], "error: --tune tunes the stage-2 settings: it needs --through irn"),
        (["--through", "irn", "--tune-params", "irn.beta=5,10"], "error: --tune-params needs --through irn and"),
        (["--through", "irn", "--no-tune", "--tune-params", "irn.beta=5"], "error: --tune-params with --no-tune"),
        (["--through", "irn", "--tune-params", "seg.threshold=0.5"], "error: --tune-params: seg.threshold is not"),
        (["--through", "irn", "--tune-params", "cam.eval_bg_threshold=0.5"], "error: --tune-params: cam.eval_bg"),
    ]
    for extra, message in cases:
        result = cli(*base, *extra)
        assert result.exit_code == 2, (extra, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), (extra, result.output)
    assert not (tmp_path / "runs").exists()  # refused before any stage ran


def test_the_compare_grid_is_a_few_walks_and_takes_tune_params(tiny_synthetic):
    from pipeline.compare import compare_grid, parse_tune_params, setting_text, stage2_note

    cfg = load_config(DEMO_CONFIG, [f"data.root={tiny_synthetic}", "irn.sem_seg_bg_threshold=0.3"])
    grid = compare_grid(cfg, {})
    assert grid["irn.beta"] == [cfg.irn.beta / 2, cfg.irn.beta, cfg.irn.beta * 2]
    assert 0.3 in grid["irn.sem_seg_bg_threshold"] and 0.05 in grid["irn.sem_seg_bg_threshold"]
    for name in ("irn.exp_times", "irn.refine_crf", "cam.eval_bg_threshold"):  # one walk per beta, no CRF search
        assert len(grid[name]) == 1
    mine = compare_grid(cfg, parse_tune_params(["irn.beta=5,20", "irn.refine_crf=true,false"]))
    assert mine["irn.beta"] == [5.0, 20.0] and mine["irn.refine_crf"] == [True, False]
    assert [setting_text(v) for v in (10.0, 0.45, True, 8)] == ["10", "0.45", "true", "8"]
    note = stage2_note(cfg, False, None)
    assert "config's settings" in note and "sem_seg_bg_threshold=0.3" in note and "no tuning split" in note


# ------------------------------------------------------------------------------- end to end


@pytest.mark.slow  # trains two tiny cam models and their IRNs (~1 min on two shared cores)
def test_compare_tunes_each_method_as_wss_tune_and_wss_run_would(cli, synthetic_dataset, tmp_path):
    """Each method's tuned settings are the best walk row of its own tune artifact; its
    pseudo_miou_tuned is the pseudo artifact `wss run -o <those settings>` finds in the cache,
    scored on train without the tuning images; --no-tune and no tuning split give today's table."""
    from pipeline.compare import COLUMNS
    from stages.common.scoring import score_label_files
    from stages.tuning.choice import best_row
    from tests.test_run_chain import FAST_CHAIN, states

    root = tmp_path / "data"
    shutil.copytree(synthetic_dataset(n=24, size=64), root)
    dataset = PreparedDataset(root)
    tune_ids = dataset.split("train")[:4]
    (root / "splits" / "tune.txt").write_text("\n".join(tune_ids) + "\n")
    workdir = tmp_path / "runs"
    values = {**FAST_CHAIN, "data.root": root, "run.workdir": workdir, "data.tune_split": "tune"}
    settings = [f"{k}={v}" for k, v in values.items()]
    args = ["compare", "-c", DEMO_CONFIG, *[a for s in settings for a in ("-o", s)], "--methods", "gap,dropblock"]
    args += ["--through", "irn", "--tune-params", "irn.beta=5,10", "--out", tmp_path / "cmp"]
    result = cli(*args)
    assert result.exit_code == 0, result.output + str(result.exception)
    rows = list(csv.DictReader(open(tmp_path / "cmp" / "compare.csv")))
    assert [r["method"] for r in rows] == ["gap", "dropblock"]
    assert list(rows[0]) == [*COLUMNS, "pseudo_miou", "tuned_stage2", "pseudo_miou_tuned"]
    tuned = json.loads((tmp_path / "cmp" / "tuned.json").read_text())
    report = (tmp_path / "cmp" / "compare.md").read_text()
    assert "tuning split `tune`" in report and "irn.beta: 5, 10" in report
    # the val-tuned CAM threshold's train score leaves the tuning images out too, cached under that split
    assert len(list((tmp_path / "cmp" / "cache").glob("cam-*-val-val-tune-tune.json"))) == 2
    train = dataset.split("train")
    scored = [i for i in train if i not in tune_ids]
    for row in rows:
        method = row["method"]
        assert row["tuned_stage2"].startswith("beta=") and "sem_seg_bg_threshold=" in row["tuned_stage2"]
        # the settings are the best walk row of the method's own search
        walk = json.loads((Path(tuned[method]["tune_artifact"]) / "rows.json").read_text())["walk"]
        cfg = load_config([DEMO_CONFIG], [*settings, f"cam.method={method}"])
        best = best_row(
            walk, "miou", {"irn.beta": cfg.irn.beta, "irn.sem_seg_bg_threshold": cfg.irn.sem_seg_bg_threshold}
        )
        assert f"irn.beta={best['irn.beta']:g}" in tuned[method]["settings"]
        assert (
            f"beta={best['irn.beta']:g}, sem_seg_bg_threshold={best['irn.sem_seg_bg_threshold']:g}"
            == row["tuned_stage2"]
        )
        # `wss run` with those settings finds the very artifact compare made, with the same score
        preset = ["-c", Path("configs/methods") / f"{method}.yaml"] if method != "gap" else []
        ran = cli("run", "-c", DEMO_CONFIG, *preset, *[a for s in settings for a in ("-o", s)],
                  "-o", f"cam.method={method}", *[a for s in tuned[method]["settings"] for a in ("-o", s)],
                  "--until", "pseudo")  # fmt: skip
        assert ran.exit_code == 0, ran.output
        assert states(ran.output)["pseudo"] == "cache hit"
        made = [
            (p, json.loads((p / "manifest.json").read_text())["config"])
            for p in (workdir / "synthetic").glob("pseudo-*")
        ]
        pseudo = [
            p
            for p, config in made
            if config["cam"]["method"] == method
            and config["irn"]["beta"] == best["irn.beta"]
            and config["irn"]["sem_seg_bg_threshold"] == pytest.approx(best["irn.sem_seg_bg_threshold"])
        ]
        assert len(pseudo) == 1, pseudo
        manifest = json.loads((pseudo[0] / "manifest.json").read_text())
        assert float(row["pseudo_miou_tuned"]) == pytest.approx(manifest["metrics"]["pseudo_miou"], abs=1e-6)
        # scored on train without the tuning images
        own = score_label_files(dataset, scored, pseudo[0] / "pseudo_labels", "")
        assert float(row["pseudo_miou_tuned"]) == pytest.approx(own["miou"], abs=1e-6)
        assert float(row["pseudo_miou_tuned"]) >= 0.0

    again = cli(*args)  # everything cached: the search, the pseudo-labels at the tuned settings
    assert again.exit_code == 0 and [r["state"] for r in csv.DictReader(open(tmp_path / "cmp" / "compare.csv"))] == [
        "cached",
        "cached",
    ]

    # --no-tune, and no tuning split at all: the table of a compare without tuning
    for extra in (["-o", "data.tune_split=null"], ["--no-tune"]):
        plain = [a for a in args if a not in ("--tune-params", "irn.beta=5,10")]
        result = cli(*plain, *extra)
        assert result.exit_code == 0, result.output
        untuned = list(csv.DictReader(open(tmp_path / "cmp" / "compare.csv")))
        assert list(untuned[0]) == [*COLUMNS, "pseudo_miou"]
        assert "the config's settings" in (tmp_path / "cmp" / "compare.md").read_text()
        assert not (tmp_path / "cmp" / "tuned.json").exists()
        if extra == ["--no-tune"]:
            assert [r["pseudo_miou"] for r in untuned] == [r["pseudo_miou"] for r in rows]


def test_an_artifact_rescored_without_the_tuning_split_is_rescored_with_it_again(tiny_synthetic):
    """pseudo (irn too) records `scored_with: {}` once re-scored without a tuning split: that
    record, not the config the artifact was computed with, says what its scores left out."""
    from pipeline.runner import Pipeline

    pipeline = Pipeline(load_config(DEMO_CONFIG, [f"data.root={tiny_synthetic}", "data.tune_split=tune"]))
    stage = pipeline.stage("pseudo")
    computed_with_tune = {"config": {"data": {"tune_split": "tune"}, "irn": {}}}
    assert pipeline.scoring_change(stage, computed_with_tune) is None
    rescored_without = {**computed_with_tune, "scored_with": {}}
    assert pipeline.scoring_change(stage, rescored_without) == ({"data.tune_split": "tune"}, {})
