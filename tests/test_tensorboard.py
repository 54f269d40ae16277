"""TensorBoard event files: what the training loop and the runner write is read back with
TensorBoard's own reader and equals metrics.jsonl / metrics.json; only rank 0 writes; a resumed
stage drops what the interrupted run logged past its checkpoint; without the package a warning
once and no files."""

from __future__ import annotations

import json
import logging
import sys
from contextlib import closing

import pytest
import torch
from torch import nn

import pipeline.tensorboard_log as tensorboard_log
import stages.common.training as training
from pipeline.tensorboard_log import TensorBoardRun, open_run
from stages.common import distributed, run_log
from stages.common.training import TrainSettings, fit
from tests.distributed_fit import NoisySquares
from tests.helpers import DEMO_CONFIG, overrides

pytest.importorskip("tensorboard", reason="the tensorboard package (requirements.txt) is not installed")
EPOCHS = 3


def read_events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def scalars(events, tag):
    return [(e.step, e.value) for e in events.Scalars(tag)]


def train(out, board_folder, resume=False, log_every=2):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))
    settings = TrainSettings(epochs=EPOCHS, batch_size=4, lr=0.1, momentum=0.9, weight_decay=1e-4, log_every=log_every)

    def step(net, batch):
        logits = net(batch["image"])[:, 0]
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch["label"])
        return loss, {"mean_logit": logits.detach().mean()}

    out.mkdir(parents=True, exist_ok=True)
    dataset = NoisySquares()
    with closing(open_run(True, board_folder, resume)) as board, run_log.recording(board):
        fit(model, dataset, [(list(model.parameters()), 1.0)], step, settings, torch.device("cpu"), out, resume, "tb")
    return training.steps_per_epoch(dataset, settings)


def epoch_log(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_fit_writes_step_and_epoch_scalars_equal_to_metrics_jsonl(tmp_path):
    steps = train(tmp_path / "out", tmp_path / "tb")
    events = read_events(tmp_path / "tb")
    records = epoch_log(tmp_path / "out")
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for tag in ("loss", "mean_logit", "images_per_s", "seconds"):
        points = scalars(events, f"epoch/{tag}")
        assert [s for s, _ in points] == [steps * e for e in (1, 2, 3)]
        assert [v for _, v in points] == pytest.approx([r[tag] for r in records], rel=1e-6)
    loss = scalars(events, "train/loss")
    expected_steps = sorted(
        {s for e in range(EPOCHS) for s in (*range(e * steps + 2, (e + 1) * steps + 1, 2), (e + 1) * steps)}
    )
    assert [s for s, _ in loss] == expected_steps  # every log_every steps and each epoch's end
    # the points of one epoch average to the epoch's loss (weighted by the steps each covers)
    for epoch, record in enumerate(records):
        inside = [(s, v) for s, v in loss if epoch * steps < s <= (epoch + 1) * steps]
        edges = [epoch * steps] + [s for s, _ in inside]
        mean = sum(v * (s - before) for (s, v), before in zip(inside, edges)) / steps
        assert mean == pytest.approx(record["loss"], rel=1e-5)
    lr = scalars(events, "train/lr")
    assert [s for s, _ in lr] == expected_steps and lr[0][1] > lr[-1][1] > 0  # the poly schedule


def test_a_resumed_run_drops_what_the_interrupted_one_logged_past_its_checkpoint(tmp_path, monkeypatch):
    real_save = training.write_checkpoint
    saved = []

    def killed_in_epoch_three(path, *args):
        saved.append(path)
        if len(saved) == 3:  # after epoch 3's events were written, before its checkpoint
            raise KeyboardInterrupt
        real_save(path, *args)

    monkeypatch.setattr(training, "write_checkpoint", killed_in_epoch_three)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "out", tmp_path / "tb")
    stale = read_events(tmp_path / "tb")
    assert len(scalars(stale, "epoch/loss")) == 3  # the interrupted run's epoch 3 is on disk
    monkeypatch.setattr(training, "write_checkpoint", real_save)
    steps = train(tmp_path / "out", tmp_path / "tb", resume=True)

    events = read_events(tmp_path / "tb")
    records = epoch_log(tmp_path / "out")
    points = scalars(events, "epoch/loss")
    assert [s for s, _ in points] == [steps, 2 * steps, 3 * steps]  # epoch 3 once: the resumed run's
    assert [v for _, v in points] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    loss_steps = [s for s, _ in scalars(events, "train/loss")]
    assert loss_steps == sorted(set(loss_steps))  # increasing, none twice


def test_a_fresh_run_replaces_the_folder_and_a_resumed_one_without_events_logs_the_checkpoint(tmp_path):
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "events.out.tfevents.0.old").write_bytes(b"")
    train(tmp_path / "out", tmp_path / "tb")
    assert not (tmp_path / "tb" / "events.out.tfevents.0.old").exists()

    board = open_run(True, tmp_path / "empty", resume=True)
    assert isinstance(board, TensorBoardRun) and not board.continued
    board.resumed(8, 4, [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}])
    board.close()
    assert scalars(read_events(tmp_path / "empty"), "epoch/loss") == [(4, 0.5), (8, 0.25)]


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    board = open_run(True, tmp_path / "tb", resume=False)
    assert type(board) is run_log.RunLog and not (tmp_path / "tb").exists()

    calls = []

    class Spy(run_log.RunLog):
        def step(self, *args):
            calls.append(args)

        def epoch(self, *args):
            calls.append(args)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))
    settings = TrainSettings(epochs=1, batch_size=4, lr=0.1, momentum=0.9, weight_decay=0, log_every=1)

    def step(net, batch):
        return nn.functional.binary_cross_entropy_with_logits(net(batch["image"])[:, 0], batch["label"]), {}

    with run_log.recording(Spy()):  # installed, but this process is not rank 0
        fit(model, NoisySquares(), [(list(model.parameters()), 1.0)], step, settings, torch.device("cpu"), tmp_path)
    assert calls == []


def test_run_tensorboard_false_writes_nothing(tmp_path):
    assert type(open_run(False, tmp_path / "tb", resume=False)) is run_log.RunLog
    assert not (tmp_path / "tb").exists()


def test_without_the_package_a_warning_once_and_no_files(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` raises ImportError
    monkeypatch.setattr(tensorboard_log, "_warned_missing", False)
    with caplog.at_level(logging.WARNING, logger="wss.tensorboard"):
        first = open_run(True, tmp_path / "a", resume=False)
        second = open_run(True, tmp_path / "b", resume=False)
    assert type(first) is run_log.RunLog and type(second) is run_log.RunLog
    warnings = [r for r in caplog.records if "tensorboard package" in r.getMessage()]
    assert len(warnings) == 1 and "run.tensorboard=false" in warnings[0].getMessage()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_failing_write_warns_once_and_never_costs_the_stage(tmp_path, caplog):
    class Broken:
        def add_scalar(self, *args, **kwargs):
            raise OSError(28, "No space left on device")

    board = TensorBoardRun(Broken(), tmp_path)
    with caplog.at_level(logging.WARNING, logger="wss.tensorboard"):
        board.step(1, {"loss": 1.0}, 0.1)
        board.step(2, {"loss": 1.0}, 0.1)
        board.epoch(2, {"epoch": 1, "loss": 1.0})
    assert board.broken and len([r for r in caplog.records if "No space" in r.getMessage()]) == 1


# ------------------------------------------------------------------------------ a whole stage


def run_cam(cli, root, workdir, *extra):
    from tests.helpers import FAST_CAM

    values = {"data.root": root, "run.workdir": workdir, **FAST_CAM, "cam.epochs": "2"}
    return cli("run-stage", "cam", "-c", DEMO_CONFIG, *overrides(values), *extra)


def test_a_stage_run_writes_its_scores_settings_and_overlays(cli, tiny_synthetic, tmp_path):
    result = run_cam(cli, tiny_synthetic, tmp_path, "-o", "cam.lr=0.003")
    assert result.exit_code == 0, result.output
    (artifact,) = (tmp_path / "synthetic").glob("cam-*")
    folder = tmp_path / "synthetic" / "tensorboard" / artifact.name
    events = read_events(folder)
    metrics = json.loads((artifact / "metrics.json").read_text())
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numbers
    for name, value in numbers.items():
        assert scalars(events, f"score/{name}") == [(0, pytest.approx(value, rel=1e-6, nan_ok=True))]
    records = epoch_log(artifact)
    assert [v for _, v in scalars(events, "epoch/loss")] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    text = events.Tensors("settings/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "cam.lr" in text and "0.003" in text and "configs/demo.yaml" in text
    images = events.Images("overlay/0")
    assert images and images[0].width == 3 * 192  # image | CAM | ground truth


def test_a_stage_run_without_the_package_warns_once_and_writes_no_event_file(
    cli, tiny_synthetic, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setattr(tensorboard_log, "_warned_missing", False)
    result = run_cam(cli, tiny_synthetic, tmp_path)
    assert result.exit_code == 0, result.output
    assert result.output.count("tensorboard package cannot be imported") == 1
    assert not (tmp_path / "synthetic" / "tensorboard").exists()
