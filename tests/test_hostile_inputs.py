"""Bad weights files, interrupted stages and the JSON other tools read, through the CLI.

A weights file that is missing, garbled or another network's stops `wss run` before the first
stage computes, in one line naming the setting and the file, and leaves no folder behind. An
interrupted stage is named as such by `wss status`, a rerun without `--resume` says that it
discards it, and a resumed stage's time is that of all its runs. metrics.json, manifest.json and
metrics.jsonl are strict JSON: null where a class has no score.
"""

from __future__ import annotations

import json
import logging
import os
import pickle

import pytest
import torch

import stages.common.training as training
from pipeline.config import load_config
from tests.helpers import DEMO_CONFIG, FAST_CAM, overrides

FAST_CHAIN = {
    **FAST_CAM,
    "irn.epochs": "1",
    "irn.batch_size": "8",
    "irn.crop_size": "64",
    "irn.resize_long": "[56,72]",
    "irn.exp_times": "4",
    "seg.epochs": "1",
    "seg.batch_size": "8",
    "seg.crop_size": "64",
    "seg.resize_long": "[56,72]",
}


class RunsCode:
    """A pickle that runs a command when loaded unsafely."""

    def __reduce__(self):
        return (os.system, ("echo owned",))


def weights_files(folder) -> dict:
    """{what is wrong: (path, the words the error must say)}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "random.pth").write_bytes(os.urandom(4096).replace(b"\x80", b"\x00").replace(b"PK", b"pk"))
    (folder / "notes.pth").write_text("resnet18 weights: see the shared drive\n")
    (folder / "empty.pth").write_bytes(b"")
    with open(folder / "code.pth", "wb") as handle:
        pickle.dump(RunsCode(), handle, protocol=2)
    torch.save([1, 2, 3], folder / "list.pth")
    torch.save({"conv1.weight": torch.zeros(3)}, folder / "other.pth")
    return {
        "missing": (folder / "absent.pth", "weights file not found"),
        "random bytes": (folder / "random.pth", "not a PyTorch file: neither a zip archive nor a pickle"),
        "text": (folder / "notes.pth", "not a PyTorch file: neither a zip archive nor a pickle"),
        "empty": (folder / "empty.pth", "the file is empty"),
        "code": (folder / "code.pth", "torch's weights-only loader refused it"),
        "not a dict": (folder / "list.pth", "holds a list, not a state dict"),
        "another network": (folder / "other.pth", "do not fit resnet18"),
    }


def chain_args(root, workdir, **extra) -> list[str]:
    return ["-c", DEMO_CONFIG, *overrides({"data.root": root, "run.workdir": workdir, **FAST_CHAIN, **extra})]


def error_line(result) -> str:
    """The one `error:` line of a failed command, which must hold no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


CASES = ["missing", "random bytes", "text", "empty", "code", "not a dict", "another network"]


@pytest.mark.parametrize("case", CASES)
def test_a_bad_cam_weights_file_stops_the_run_before_any_stage_computes(cli, tiny_synthetic, tmp_path, case):
    path, words = weights_files(tmp_path / "weights")[case]
    workdir = tmp_path / "runs"
    result = cli("run", *chain_args(tiny_synthetic, workdir, **{"cam.weights": path}))
    line = error_line(result)
    assert line.startswith("error: cam.weights: ") and str(path) in line and words in line, line
    assert result.output.strip() == line  # nothing else: no torch text, no log of a stage
    assert "owned" not in result.output  # the pickle's command never ran
    assert "computing" not in result.output
    assert not list(workdir.glob("*/cam-*")) and not list(workdir.glob("*/.cam-*.partial"))


@pytest.mark.parametrize("case", ["random bytes", "missing"])
def test_run_stage_checks_the_weights_of_its_stage_before_computing(cli, tiny_synthetic, tmp_path, case):
    path, words = weights_files(tmp_path / "weights")[case]
    workdir = tmp_path / "runs"
    result = cli("run-stage", "cam", *chain_args(tiny_synthetic, workdir, **{"cam.weights": path}))
    line = error_line(result)
    assert line.startswith("error: cam.weights: ") and str(path) in line and words in line, line
    assert "computing" not in result.output and not list(workdir.glob("*/.cam-*.partial"))


@pytest.mark.parametrize("case", ["random bytes", "code", "another network"])
def test_a_bad_encoder_weights_file_stops_the_run_before_the_first_stage(cli, tiny_synthetic, tmp_path, case):
    path, _ = weights_files(tmp_path / "weights")[case]
    workdir = tmp_path / "runs"
    result = cli("run", *chain_args(tiny_synthetic, workdir, **{"seg.encoder_weights": path}))
    line = error_line(result)
    assert line.startswith("error: seg.encoder_weights: ") and str(path) in line, line
    assert "computing" not in result.output and not list(workdir.glob("*/.*.partial"))


def test_the_irn_checks_the_imagenet_file_its_trunk_starts_from(tiny_synthetic, tmp_path):
    """`irn.backbone_init: imagenet` starts the IRN's trunk from the file of cam.weights."""
    from data.layout import PreparedDataset
    from stages.common.backbones import WeightsError
    from stages.irn.stage import IrnStage

    path, words = weights_files(tmp_path / "weights")["text"]
    cfg = load_config(DEMO_CONFIG, ["irn.backbone_init=imagenet", f"cam.weights={path}", "cam.backbone=resnet18"])
    with pytest.raises(WeightsError) as info:
        IrnStage().preflight(cfg, PreparedDataset(tiny_synthetic))
    message = str(info.value)
    assert message.startswith("irn.backbone_init: imagenet: ") and str(path) in message and words in message
    assert "\n" not in message


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity, as JSON.parse and jq do."""

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_metrics_of_a_class_absent_from_the_split_are_null(cli, tiny_synthetic, tmp_path):
    """The first two train images hold no ring: its IoU is undefined, NaN in Python, null on disk."""
    workdir = tmp_path / "runs"
    result = cli(
        "run-stage",
        "cam",
        *chain_args(tiny_synthetic, workdir, **{"cam.epochs": 1, "cam.batch_size": 2}),
        "--limit",
        "2",
    )
    assert result.exit_code == 0, result.output
    (artifact,) = (workdir / "synthetic").glob("cam-*")
    metrics = strict_json((artifact / "metrics.json").read_text())
    assert metrics["cam_iou/ring"] is None and isinstance(metrics["cam_iou/cross"], float)
    assert strict_json((artifact / "manifest.json").read_text())["metrics"]["cam_iou/ring"] is None
    for line in (artifact / "metrics.jsonl").read_text().splitlines():
        strict_json(line)
    status = cli("status", *chain_args(tiny_synthetic, workdir))
    assert status.exit_code == 0, status.output


def test_an_interrupted_stage_is_named_discarded_aloud_and_timed_whole(
    cli, tiny_synthetic, tmp_path, monkeypatch, caplog
):
    """Interrupted after epoch 2: `wss status` says so; a rerun without --resume says it discards
    that run (interrupted in turn after epoch 1); the resumed run's seconds add both runs' time."""
    from stages.common.elapsed import seconds_spent

    workdir = tmp_path / "runs"
    args = ["run-stage", "cam", *chain_args(tiny_synthetic, workdir)]
    epochs = int(FAST_CAM["cam.epochs"])
    real_save = training.write_checkpoint

    def interrupt_after(count: int):
        saved = []

        def save(path, *args):
            real_save(path, *args)
            saved.append(path)
            if len(saved) == count:
                raise KeyboardInterrupt

        return save

    monkeypatch.setattr(training, "write_checkpoint", interrupt_after(2))
    assert cli(*args).exit_code == 130
    (partial,) = (workdir / "synthetic").glob(".cam-*.partial")
    status = cli("status", *args[2:])
    line = next(x for x in status.output.splitlines() if x.startswith("cam"))
    assert line == f"cam      interrupted after epoch 2 of {epochs} (resume with --resume)  {partial}"

    monkeypatch.setattr(training, "write_checkpoint", interrupt_after(1))
    with caplog.at_level(logging.INFO):
        rerun = cli(*args)
    assert rerun.exit_code == 130
    assert (
        f"cam: starting again: discarding {partial}, an interrupted run (after epoch 2 of {epochs}) "
        f"that `--resume` would continue" in caplog.text
    )
    assert f"interrupted after epoch 1 of {epochs}" in cli("status", *args[2:]).output
    spent = seconds_spent(partial)
    assert spent > 0

    monkeypatch.setattr(training, "write_checkpoint", real_save)
    done = cli(*args, "--resume")
    assert done.exit_code == 0, done.output
    (artifact,) = (workdir / "synthetic").glob("cam-*")
    manifest = json.loads((artifact / "manifest.json").read_text())
    this_run = manifest["finished"] - manifest["started"]
    assert manifest["seconds"] == pytest.approx(spent + this_run, abs=0.5)
    assert not (artifact / "elapsed.json").exists() and not partial.exists()
    assert "up to date" in cli("status", *args[2:]).output
