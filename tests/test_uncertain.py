"""Uncertain labels (CheXpert's -1 under `wss prepare folder --uncertain ignore`): uncertain.csv in
the layout, the classifier's loss leaving those entries out, and the IRN and the segmenter not
training on such images; datasets without the file read and fingerprint as before."""

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.datasets import ClassificationDataset
from data.layout import UNCERTAIN_NAME, DatasetInfo, DatasetWriter, PreparedDataset
from stages.cam.nets import classification_loss
from stages.irn.stage import training_ids
from stages.seg.data import pseudo_label_items


def write(root, task="multiclass", classes=("a", "b"), uncertain=None):
    writer = DatasetWriter(root, DatasetInfo("u", task, list(classes)))
    labels = {"i0": [1] + [0] * (len(classes) - 1), "i1": [0] * len(classes), "i2": [0] * len(classes)}
    for image_id in labels:
        writer.write_image(image_id, np.full((8, 8), 40, np.uint8))
    writer.write_labels(labels)
    writer.write_uncertain(uncertain or {})
    writer.write_split("train", sorted(labels))
    writer.write_info()
    return PreparedDataset(root)


@pytest.mark.parametrize("kind", ["soft_margin", "bce"])
def test_the_loss_leaves_uncertain_entries_out(kind):
    torch.manual_seed(0)
    logits = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([[1, 0, -1], [0, 1, 0], [-1, -1, 1], [0, 0, 0]], dtype=torch.float32)
    loss = classification_loss(logits, labels, kind)
    known = labels >= 0
    expected = F.binary_cross_entropy_with_logits(logits[known], labels[known])
    assert torch.allclose(loss, expected)
    loss.backward()
    assert (logits.grad[~known] == 0).all() and (logits.grad[known] != 0).all()


@pytest.mark.parametrize("kind", ["soft_margin", "bce"])
def test_the_loss_without_uncertain_entries_is_the_library_loss(kind):
    torch.manual_seed(1)
    logits, labels = torch.randn(5, 4), (torch.rand(5, 4) > 0.5).float()
    library = F.binary_cross_entropy_with_logits if kind == "bce" else F.multilabel_soft_margin_loss
    assert torch.equal(classification_loss(logits, labels, kind), library(logits, labels))


def test_uncertain_csv_is_read_and_only_the_classifier_sees_minus_one(tmp_path):
    dataset = write(tmp_path, uncertain={"i0": [0, 1], "i1": [0, 0], "i2": [1, 1]})
    assert sorted(dataset.uncertain) == ["i0", "i2"]  # rows without an uncertain class are not kept
    assert dataset.label_vector("i0").tolist() == [1, 0]
    assert dataset.training_label_vector("i0").tolist() == [1, -1]
    assert dataset.training_label_vector("i1").tolist() == [0, 0] and not dataset.has_uncertain("i1")
    items = ClassificationDataset(dataset, ["i0", "i2"], (8, 8), 8)
    assert items[0]["label"].tolist() == [1, -1] and items[1]["label"].tolist() == [-1, -1]


def test_the_irn_and_the_segmenter_do_not_train_on_images_with_an_uncertain_class(tmp_path):
    dataset = write(tmp_path / "multi", uncertain={"i0": [0, 1]})
    assert training_ids(dataset, ["i0", "i1", "i2"], positive_only=False) == ["i1", "i2"]
    assert training_ids(dataset, ["i0", "i1", "i2"], positive_only=True) == []
    binary = write(tmp_path / "binary", task="binary", classes=("finding",), uncertain={"i1": [1]})
    items, failures = pseudo_label_items(binary, ["i0", "i1", "i2"], tmp_path / "no-labels")
    assert [image_id for image_id, _ in items] == ["i2"]  # i2: a negative (all background); i1 uncertain
    assert len(failures) == 1 and "i0" in failures[0]  # i0 positive without a pseudo-label: a failure


def test_a_dataset_without_uncertain_labels_keeps_its_fingerprint(tmp_path):
    dataset = write(tmp_path)
    assert not (tmp_path / UNCERTAIN_NAME).exists() and dataset.uncertain == {}
    digest = hashlib.sha256()  # the fingerprint as it was before uncertain.csv existed
    for meta in ["dataset.json", "labels.csv"]:
        digest.update((tmp_path / meta).read_bytes())
    for sub in ["splits", "images", "masks"]:
        for path in sorted(p for p in (tmp_path / sub).iterdir() if not p.name.startswith(".")):
            stat = path.stat()
            if sub == "splits":
                digest.update(f"{sub}/{path.name}:{stat.st_size}\n".encode() + path.read_bytes())
            else:
                digest.update(f"{sub}/{path.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    before = dataset.fingerprint()
    assert before == digest.hexdigest()
    assert write(tmp_path, uncertain={"i1": [0, 1]}).fingerprint() != before
    write(tmp_path, uncertain={})  # none any more: the file goes, and the fingerprint comes back
    assert PreparedDataset(tmp_path).fingerprint() == before
