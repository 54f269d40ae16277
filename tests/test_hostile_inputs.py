"""Bad weights files through the CLI.

A weights file that is missing, garbled or another network's stops `wss run` before the first
stage computes, in one line naming the setting and the file, and leaves no folder behind.
"""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from pipeline.config import load_config
from tests.conftest import DEMO_CONFIG, FAST_CAM, overrides

FAST_CHAIN = {**FAST_CAM, "irn.epochs": "1", "irn.batch_size": "8", "irn.crop_size": "64",
              "irn.resize_long": "[56,72]", "irn.exp_times": "4", "seg.epochs": "1", "seg.batch_size": "8",
              "seg.crop_size": "64", "seg.resize_long": "[56,72]"}


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
    return {"missing": (folder / "absent.pth", "weights file not found"),
            "random bytes": (folder / "random.pth", "not a PyTorch file: neither a zip archive nor a pickle"),
            "text": (folder / "notes.pth", "not a PyTorch file: neither a zip archive nor a pickle"),
            "empty": (folder / "empty.pth", "the file is empty"),
            "code": (folder / "code.pth", "torch's weights-only loader refused it"),
            "not a dict": (folder / "list.pth", "holds a list, not a state dict"),
            "another network": (folder / "other.pth", "do not fit resnet18")}


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
