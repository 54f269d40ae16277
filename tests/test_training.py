"""The shared training loop: an interrupted and resumed run ends where the uninterrupted one
does, randomness of the model (dropout, DropBlock) included, and logs every epoch once."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import stages.common.training as training
from stages.common.training import TrainSettings, fit
from tests.distributed_fit import NoisySquares

EPOCHS = 3


def train(out, resume=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Dropout2d(0.5), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 1))
    settings = TrainSettings(epochs=EPOCHS, batch_size=4, lr=0.2, momentum=0.9, weight_decay=1e-4)

    def step(net, batch):
        logits = net(batch["image"])[:, 0]
        return nn.functional.binary_cross_entropy_with_logits(logits, batch["label"]), {}

    out.mkdir(parents=True, exist_ok=True)
    fit(model, NoisySquares(), [(list(model.parameters()), 1.0)], step, settings, torch.device("cpu"), out,
        resume=resume, desc="resume-check")
    return model.state_dict()


def test_resume_after_an_interrupt_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    straight = train(tmp_path / "straight")
    real_save = training.save_atomic
    saved = []

    def interrupt_after_two(obj, path):
        real_save(obj, path)
        saved.append(path)
        if len(saved) == 2:  # killed after epoch 2's checkpoint, before its log line
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_atomic", interrupt_after_two)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "resumed")
    monkeypatch.setattr(training, "save_atomic", real_save)
    resumed = train(tmp_path / "resumed", resume=True)
    for name, weights in straight.items():
        torch.testing.assert_close(resumed[name], weights, rtol=0, atol=0, msg=name)
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
