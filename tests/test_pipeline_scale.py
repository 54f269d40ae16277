"""The pieces of bench/pipeline_scale.py that its figures rest on: the two-run model and the
projection (known answers), the epoch records it reads from fit(), and the GPU-utilisation
sampler's nvidia-smi fallback (a stand-in nvidia-smi on PATH)."""

from __future__ import annotations

import logging
import os
import stat
import time

import pytest
import torch
from torch import nn

from bench.monitor import Sampler
from bench.pipeline_scale import TARGETS, EpochEnds, Run, stage_model, target_counts, two_point
from tests.helpers import REPO


def test_two_point_line_and_its_fallbacks():
    assert two_point(10, 12.0, 110, 62.0) == pytest.approx((7.0, 0.5))
    assert two_point(10, 20.0, 110, 10.0) == pytest.approx((0.0, 10.0 / 110))  # falling: all proportional
    assert two_point(10, 1.0, 110, 80.0) == pytest.approx((0.0, 80.0 / 110))  # would start below zero
    assert two_point(0, 0.0, 0, 3.0) == (3.0, 0.0)


def test_stage_model_projects_warm_up_epochs_and_the_rest():
    # whole slice: epoch 1 took 12 s for 200 images, epoch 2 8 s (25 img/s), 1 s between them;
    # rest 30 s for 250 images. Small run: 1 s between epochs, rest 10 s for 50 images.
    full = Run(wall=12 + 8 + 2 * 1.0 + 30, epoch_seconds=[12, 8], epoch_images=[200, 200], gaps=[1.0], images=250)
    small = Run(wall=3 + 1 + 2 * 1.0 + 10, epoch_seconds=[3, 1], epoch_images=[25, 25], gaps=[1.0], images=50)
    model = stage_model(full, small)
    assert model.rate == pytest.approx(25.0) and model.warmup == pytest.approx(4.0)
    assert (model.overhead_fixed, model.overhead_per_image) == pytest.approx((1.0, 0.0))
    assert (model.fixed, model.per_image) == pytest.approx((5.0, 0.1))
    # 5 epochs of 1000 images and 2000 images read: 4 + 5 x (40 + 1) + 5 + 200
    assert model.seconds(5, 1000, 2000) == pytest.approx(414.0)
    untrained = stage_model(Run(20.0, [], [], [], 100), Run(5.0, [], [], [], 10))
    assert untrained.rate is None and untrained.seconds(0, 0, 1000) == pytest.approx(5 - 15 / 90 * 10 + 1000 * 15 / 90)


def test_targets_follow_each_config():
    from pipeline.config import load_config

    voc, siim = load_config([REPO / "configs/voc.yaml"]), load_config([REPO / "configs/siim.yaml"])
    assert target_counts("cam", voc, TARGETS["voc"]) == (5, 10_582, 10_582 + 1_449)
    assert target_counts("irn", voc, TARGETS["voc"]) == (3, 10_582, 10_582)
    assert target_counts("seg", voc, TARGETS["voc"]) == (30, 10_582, 10_582 + 1_449)
    assert target_counts("pseudo", voc, TARGETS["voc"]) == (0, 0.0, 10_582)
    assert target_counts("cam", siim, TARGETS["siim"]) == (10, 10_800, 12_000)
    assert target_counts("irn", siim, TARGETS["siim"]) == pytest.approx((3, 10_800 * 0.22, 10_800))  # positive_only
    assert target_counts("seg", siim, TARGETS["siim"]) == pytest.approx((20, 10_800 * 0.9, 12_000))  # held out


def test_epoch_ends_are_read_from_fits_records(tmp_path):
    from stages.common.training import TrainSettings, fit

    logger = logging.getLogger("wss.train")
    ends, level = EpochEnds(), logging.getLogger("wss").level
    logger.addHandler(ends)
    logging.getLogger("wss").setLevel(logging.INFO)
    try:
        data = [{"image": torch.rand(3, 8, 8), "label": torch.tensor(float(i % 2))} for i in range(8)]
        model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 1))
        fit(
            model,
            data,
            [(list(model.parameters()), 1.0)],
            lambda net, b: (nn.functional.binary_cross_entropy_with_logits(net(b["image"])[:, 0], b["label"]), {}),
            TrainSettings(epochs=2, batch_size=4, lr=0.1),
            torch.device("cpu"),
            tmp_path,
            desc="probe",
        )
    finally:
        logger.removeHandler(ends)
        logging.getLogger("wss").setLevel(level)
    assert len(ends.times["probe"]) == 2 and ends.times["probe"][0] <= ends.times["probe"][1]


def test_gpu_utilisation_falls_back_to_nvidia_smi(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        '#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\n'
        "while true; do echo 40; echo '[N/A]'; echo 20; sleep 0.05; done\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setattr(torch.cuda, "utilization", lambda *a: (_ for _ in ()).throw(ModuleNotFoundError("pynvml")))
    start = time.perf_counter()
    sampler = Sampler(gpu_index=0, interval=0.05)
    time.sleep(0.6)
    sampler.stop()
    window = sampler.window(start, time.perf_counter())
    assert sampler.gpu_source == "nvidia-smi"
    assert window["gpu_busy"] == pytest.approx(0.3) and window["gpu_samples"] >= 4
    assert window["host_peak_bytes"] > 10 * 2**20
    assert "--id=3" in (tmp_path / "args").read_text()  # torch's device 0 is the third physical GPU
    idle = Sampler(gpu_index=None)
    idle.stop()
    assert idle.gpu_source == "none"
