"""The shared training loop: an interrupted and resumed run ends where the uninterrupted one
does, randomness of the model (dropout, DropBlock) included, and logs every epoch once; the
batches do not depend on the number of (persistent) loader workers."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import stages.common.training as training
from data.datasets import ClassificationDataset
from data.layout import PreparedDataset
from data.transforms import normalize_batch
from stages.common.training import TrainSettings, fit, make_loader
from tests.distributed_fit import NoisySquares

EPOCHS = 3


def train(out, resume=False):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Dropout2d(0.5), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1)
    )
    settings = TrainSettings(epochs=EPOCHS, batch_size=4, lr=0.2, momentum=0.9, weight_decay=1e-4)

    def step(net, batch):
        logits = net(batch["image"])[:, 0]
        return nn.functional.binary_cross_entropy_with_logits(logits, batch["label"]), {}

    out.mkdir(parents=True, exist_ok=True)
    fit(
        model,
        NoisySquares(),
        [(list(model.parameters()), 1.0)],
        step,
        settings,
        torch.device("cpu"),
        out,
        resume=resume,
        desc="resume-check",
    )
    return model.state_dict()


def test_resume_after_an_interrupt_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    straight = train(tmp_path / "straight")
    real_save = training.write_checkpoint
    saved = []

    def interrupt_after_two(path, *args):
        real_save(path, *args)
        saved.append(path)
        if len(saved) == 2:  # killed after epoch 2's checkpoint, before its log line
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "write_checkpoint", interrupt_after_two)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "resumed")
    monkeypatch.setattr(training, "write_checkpoint", real_save)
    resumed = train(tmp_path / "resumed", resume=True)
    for name, weights in straight.items():
        torch.testing.assert_close(resumed[name], weights, rtol=0, atol=0, msg=name)
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_resume_without_a_checkpoint_logs_each_epoch_once(tmp_path):
    """A stage killed after the runner dropped its finished checkpoint, before the commit:
    `--resume` trains again from the start, and the epoch log is not doubled."""
    train(tmp_path / "out")
    (tmp_path / "out" / training.CHECKPOINT).unlink()
    train(tmp_path / "out", resume=True)
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_each_checkpoint_counts_the_time_so_far_for_a_resumed_stage(tmp_path, monkeypatch):
    """The runner records a run's start in the partial folder; each checkpoint moves its end, so
    that a stage killed without cleanup still counts its epochs when resumed."""
    import time

    from stages.common.elapsed import seconds_spent, start_clock

    out = tmp_path / "out"
    out.mkdir()
    start_clock(out, time.time() - 100)  # the run started 100 s ago
    assert seconds_spent(out) == 0.0
    marks = []
    real_save = training.write_checkpoint

    def save_and_look(path, *args):
        real_save(path, *args)
        marks.append(seconds_spent(out))  # before this epoch's mark

    monkeypatch.setattr(training, "write_checkpoint", save_and_look)
    train(out)
    assert len(marks) == EPOCHS and marks[0] == 0.0 and all(m >= 100 for m in marks[1:])
    assert seconds_spent(out) >= 100


class CountingEpochs(ClassificationDataset):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.set_epochs = []

    def set_epoch(self, epoch):
        self.set_epochs.append(epoch)
        super().set_epoch(epoch)


def training_batches(dataset, workers, out):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    settings = TrainSettings(epochs=2, batch_size=4, lr=0.01, workers=workers)
    batches = []

    def step(net, batch):
        batches.append({key: value.clone() for key, value in batch.items()})
        logits = net(normalize_batch(batch["image"]))
        return nn.functional.binary_cross_entropy_with_logits(logits, batch["label"].float()), {}

    out.mkdir(parents=True)
    fit(
        model,
        dataset,
        [(list(model.parameters()), 1.0)],
        step,
        settings,
        torch.device("cpu"),
        out,
        desc="workers-check",
    )
    return batches


def test_batches_do_not_depend_on_persistent_workers_and_change_per_epoch(synthetic_dataset, tmp_path):
    data = PreparedDataset(synthetic_dataset())
    ids = data.split("train")[:12]
    runs = {}
    for workers in (0, 2):
        dataset = CountingEpochs(data, ids, (48, 80), 64, seed=3)
        runs[workers] = training_batches(dataset, workers, tmp_path / str(workers))
        assert dataset.set_epochs == [0, 1]  # once per epoch, in the main process
    assert make_loader(
        dataset, TrainSettings(epochs=2, batch_size=4, lr=0.01, workers=2), torch.device("cpu")
    ).persistent_workers
    assert len(runs[0]) == len(runs[2]) == 6  # 3 batches of 4 per epoch
    for zero, two in zip(runs[0], runs[2]):
        assert zero.keys() == two.keys()
        for key in zero:
            assert zero[key].dtype == two[key].dtype and torch.equal(zero[key], two[key]), key
    assert runs[0][0]["image"].dtype == torch.uint8 and runs[0][0]["image"].shape == (4, 64, 64, 3)

    # each epoch's images are exactly the items augmented for that epoch, and they differ
    def image_set(batches):
        return {bytes(image.numpy()) for batch in batches for image in batch["image"]}

    epoch1, epoch2 = image_set(runs[2][:3]), image_set(runs[2][3:])
    assert epoch1 == {bytes(dataset.item(i, 0)["image"].numpy()) for i in range(len(ids))}
    assert epoch2 == {bytes(dataset.item(i, 1)["image"].numpy()) for i in range(len(ids))}
    assert epoch1 != epoch2


def test_reuse_trained_loads_the_weights_and_the_epoch_log_or_names_a_broken_file(tmp_path):
    from data.errors import WssError
    from stages.cam.model_file import MODEL_FILE
    from stages.common.model_files import write_model_file
    from stages.common.training import reuse_trained

    torch.manual_seed(0)
    trained, fresh = nn.Linear(3, 2), nn.Linear(3, 2)
    twin, out = tmp_path / "twin", tmp_path / "out"
    twin.mkdir()
    out.mkdir()
    write_model_file(twin / MODEL_FILE, "cam", trained, {})
    (twin / "metrics.jsonl").write_text('{"epoch": 1, "images_per_s": 5.0}\n{"epoch": 2, "images_per_s": 7.0}\n')
    history = reuse_trained(fresh, twin, MODEL_FILE, out, "cam")
    assert [h["epoch"] for h in history] == [1, 2]
    assert (out / "metrics.jsonl").read_text() == (twin / "metrics.jsonl").read_text()
    for name, weights in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], weights)
    (twin / MODEL_FILE).write_bytes(b"cut short")
    with pytest.raises(
        WssError,
        match=r"model\.safetensors: unreadable model \(not a complete safetensors file: "
        r".*; recompute it with wss run --force cam$",
    ):
        reuse_trained(fresh, twin, MODEL_FILE, out, "cam")
    (twin / MODEL_FILE).unlink()
    with pytest.raises(WssError, match="FileNotFoundError"):
        reuse_trained(fresh, twin, MODEL_FILE, out, "cam")


def test_resume_from_an_unreadable_checkpoint_warns_and_trains_from_the_start(tmp_path, caplog):
    """A checkpoint garbled in the .partial folder costs the epochs trained, not the run."""
    straight = train(tmp_path / "straight")
    out = tmp_path / "out"
    train(out)
    (out / training.CHECKPOINT).write_bytes(b"garbled")
    resumed = train(out, resume=True)
    assert f"{training.CHECKPOINT}: unreadable checkpoint (not a complete safetensors file" in caplog.text
    assert "training from the start" in caplog.text
    for name, weights in straight.items():
        torch.testing.assert_close(resumed[name], weights, rtol=0, atol=0, msg=name)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def garbled_model(folder, content: bytes):
    from stages.cam.model_file import MODEL_FILE

    folder.mkdir(exist_ok=True)
    (folder / MODEL_FILE).write_bytes(content)
    return folder


@pytest.mark.parametrize(
    "content, reason",
    [(b"garbled bytes", "not a complete safetensors file"), (b"PK\x03\x04 cut short", "PytorchStreamReader")],
)
@pytest.mark.parametrize(
    "loader, what, stage",
    [
        ("cam", "cam model", "cam"),
        ("irn_backbone", "cam model", "cam"),
        ("seg_encoder", "cam model", "cam"),
        ("irn", "IRN model", "irn"),
    ],
)
def test_an_unreadable_model_file_is_one_line_naming_it_and_the_stage_to_recompute(
    tmp_path, content, reason, loader, what, stage
):
    from stages.base import StageInputError
    from stages.cam.classifier import load_cam_net
    from stages.cam.model_file import MODEL_FILE
    from stages.irn.net import build_backbone, load_boundary_net
    from stages.seg.model import build_segmenter, load_cam_encoder

    artifact = garbled_model(tmp_path / "artifact", content)
    load = {
        "cam": lambda: load_cam_net(artifact, torch.device("cpu")),
        "irn_backbone": lambda: build_backbone("resnet18", "cam", artifact, None),
        "seg_encoder": lambda: load_cam_encoder(build_segmenter("Unet", "resnet18", None, 2), artifact, "resnet18"),
        "irn": lambda: load_boundary_net(artifact, torch.device("cpu")),
    }[loader]
    with pytest.raises(StageInputError) as raised:
        load()
    message = str(raised.value)
    assert message.startswith(f"{artifact / MODEL_FILE}: unreadable {what} (") and reason in message
    assert message.endswith(f"; recompute it with wss run --force {stage}") and "\n" not in message
