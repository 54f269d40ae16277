"""The synthetic benchmark: deterministic, labels agree with masks, marks are small evidence
inside large bodies, and the binary variant has negatives."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from data.layout import PreparedDataset
from data.synthetic import SyntheticSpec, generate_image, generate_scene, write_synthetic


def tree_digest(root) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes(synthetic_dataset, tmp_path):
    first = synthetic_dataset(n=12, size=64, seed=3)
    second = write_synthetic(tmp_path / "again", SyntheticSpec(n=12, size=64, seed=3))
    assert tree_digest(first) == tree_digest(second)
    assert len(tree_digest(first)) == 12 * 2 + 4  # images, masks, labels, 2 splits, dataset.json


def test_worker_processes_write_the_same_bytes(synthetic_dataset, tmp_path):
    first = synthetic_dataset(n=12, size=64, seed=3)
    second = write_synthetic(tmp_path / "workers", SyntheticSpec(n=12, size=64, seed=3), workers=2)
    assert tree_digest(first) == tree_digest(second)


def test_image_depends_only_on_seed_and_index():
    # the 5th image is the same whether 5 or 50 images are generated
    small = generate_image(SyntheticSpec(n=5, size=64, seed=1), 4)
    large = generate_image(SyntheticSpec(n=50, size=64, seed=1), 4)
    for a, b in zip(small, large):
        np.testing.assert_array_equal(a, b)


def test_different_seed_differs():
    a = generate_image(SyntheticSpec(size=64, seed=0), 0)[0]
    b = generate_image(SyntheticSpec(size=64, seed=1), 0)[0]
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 5


def test_layout_labels_agree_with_masks(tiny_synthetic):
    data = PreparedDataset(tiny_synthetic)
    assert data.task == "multiclass" and data.classes == ["ring", "cross", "square"]
    train, val = data.split("train"), data.split("val")
    assert not set(train) & set(val) and len(train) + len(val) == 32
    assert len(val) == round(32 * 0.2)
    for image_id in train + val:
        image, mask = data.read_image(image_id), data.read_mask(image_id)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert mask is not None and mask.shape == (64, 64)
        present = sorted(int(v) for v in np.unique(mask) if v != 0)
        labelled = [int(i) + 1 for i in np.nonzero(data.label_vector(image_id))[0]]
        assert present == labelled, image_id
        assert labelled, f"{image_id}: every multiclass image has an object"


def test_all_classes_occur(synthetic_dataset):
    data = PreparedDataset(synthetic_dataset(n=40, size=64))
    counts = np.sum([data.label_vector(i) for i in data.split("train")], axis=0)
    assert (counts >= 3).all(), counts


def test_marks_are_small_evidence_inside_large_bodies():
    """The image is brighter where a mark is; the mark covers a small part of its body."""
    spec = SyntheticSpec(size=128, seed=0)
    for index in range(6):
        image, mask, _ = generate_image(spec, index)
        body = mask > 0
        # the object occupies a sizeable part of the image...
        assert body.mean() > 0.05
        # ... and its brightest pixels (the marks) are a small fraction of it
        bright = image > np.percentile(image[body], 97)
        assert (bright & body).sum() < 0.1 * body.sum()


def test_binary_variant_has_negatives_and_empty_masks(synthetic_dataset):
    data = PreparedDataset(synthetic_dataset(n=40, size=64, variant="binary"))
    assert data.task == "binary" and data.classes == ["finding"] and data.name == "synthetic-binary"
    ids = data.split("train") + data.split("val")
    positive = [i for i in ids if data.label_vector(i)[0] == 1]
    negative = [i for i in ids if data.label_vector(i)[0] == 0]
    assert 0.25 < len(positive) / len(ids) < 0.75
    for image_id in negative:
        assert data.read_mask(image_id).max() == 0
    for image_id in positive:
        assert set(np.unique(data.read_mask(image_id))) == {0, 1}


@pytest.mark.parametrize("variant", ["multiclass", "binary"])
def test_distractors_are_unmarked_bodies(variant):
    """Some bodies carry no mark and are not in the ground truth; marked bodies are."""
    spec = SyntheticSpec(size=64, seed=0, variant=variant)
    distractors = 0
    for index in range(20):
        scene = generate_scene(spec, index)
        for body in range(1, scene["bodies"].max() + 1):
            region = scene["bodies"] == body
            marked = (scene["marks"] & region).any()
            assert marked == (scene["mask"][region] > 0).all()
            distractors += not marked
    assert distractors >= 5


def test_binary_negatives_still_show_bodies():
    spec = SyntheticSpec(size=64, seed=0, variant="binary")
    for index in range(10):
        scene = generate_scene(spec, index)
        assert scene["bodies"].max() >= 1
        if scene["label"][0] == 0:
            assert not scene["marks"].any() and scene["mask"].max() == 0


def test_smallest_dataset_has_both_splits(tmp_path):
    dataset = PreparedDataset(write_synthetic(tmp_path / "two", SyntheticSpec(n=2, size=32)))
    assert len(dataset.split("train")) == 1 and len(dataset.split("val")) == 1


@pytest.mark.parametrize("option, value", [("--n", "0"), ("--size", "8"), ("--mark-scale", "0"), ("--seed", "-1")])
def test_prepare_synthetic_refuses_sizes_that_make_no_dataset(cli, tmp_path, option, value):
    result = cli("prepare", "synthetic", "--out", tmp_path / "out", option, value)
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output
    assert not (tmp_path / "out").exists()


def test_prepare_synthetic_into_a_path_below_a_file_is_one_line(cli, tmp_path):
    (tmp_path / "file").write_text("x")
    result = cli("prepare", "synthetic", "--out", tmp_path / "file" / "out", "--n", "4")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"cannot create the output folder {tmp_path / 'file' / 'out'}" in result.output


def test_a_killed_prepare_of_another_spec_is_not_taken_for_the_first(cli, tmp_path, monkeypatch):
    """seed 0 prepared, then seed 1 killed half way: seed 0 again must regenerate, not skip."""
    import data.synthetic

    out = tmp_path / "out"
    args = ["prepare", "synthetic", "--out", out, "--n", "6", "--size", "32"]
    assert cli(*args, "--seed", "0").exit_code == 0
    real = data.synthetic.write_synthetic

    def killed_half_way(root, spec, progress=None):
        real(root, spec, progress)
        raise KeyboardInterrupt  # after the images, before the spec stamp

    monkeypatch.setattr(data.synthetic, "write_synthetic", killed_half_way)
    assert cli(*args, "--seed", "1").exit_code != 0
    monkeypatch.setattr(data.synthetic, "write_synthetic", real)
    again = cli(*args, "--seed", "0")
    assert again.exit_code == 0 and "skipping" not in again.output


def test_prepare_synthetic_negatives_sets_the_share_of_images_without_a_finding(cli, tmp_path):
    out = tmp_path / "data"
    args = ("prepare", "synthetic", "--variant", "binary", "--n", "60", "--size", "32", "--out", out)
    result = cli(*args, "--negatives", "0.8")
    assert result.exit_code == 0, result.output
    data = PreparedDataset(out)
    ids = data.split("train") + data.split("val")
    negatives = sum(1 for i in ids if data.label_vector(i)[0] == 0)
    assert 0.65 < negatives / len(ids) < 0.95
    assert cli(*args, "--negatives", "1.5").exit_code != 0
