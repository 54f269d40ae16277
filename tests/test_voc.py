"""VOC 2012 (+ SBD) preparation: labels as IRNet's, palette and 255 kept, splits, bad masks, mIoU."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.errors import DataError
from data.layout import PreparedDataset, default_palette
from data.voc import CLASSES, labels_from_xml, prepare_voc, read_id_list
from stages.common.metrics import ConfusionMatrix

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "samples" / "voc"
VOC = SAMPLES / "VOCdevkit" / "VOC2012"


def need_samples():
    if not (VOC / "JPEGImages").is_dir():
        pytest.skip(f"VOC samples not found: {VOC}")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    need_samples()
    out = tmp_path_factory.mktemp("voc") / "out"
    report = prepare_voc(SAMPLES, out, progress=False)  # the folder holding VOCdevkit is accepted
    return report, PreparedDataset(out)


# --------------------------------------------------------------------------------------------
# The shared tree
# --------------------------------------------------------------------------------------------


def test_shared_tree_prepares(prepared):
    report, dataset = prepared
    assert report.ok and report.counts["prepared"] == 2 and not report.problems
    assert dataset.task == "multiclass" and dataset.classes == CLASSES
    assert dataset.info.image_ext == ".jpg"
    assert dataset.info.palette == default_palette(21)
    assert dataset.info.palette[:3] == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]  # VOC colours


def test_labels_agree_with_irnet_cls_labels(prepared):
    _, dataset = prepared
    cls_labels = np.load(SAMPLES / "cls_labels.npy", allow_pickle=True).item()
    compared = 0
    for image_id in dataset.labels:
        key = int(image_id.replace("_", ""))
        if key in cls_labels:
            assert np.array_equal(dataset.label_vector(image_id), cls_labels[key]), image_id
            compared += 1
    assert compared >= 1
    assert [CLASSES[i] for i in np.flatnonzero(dataset.label_vector("2007_000063"))] == ["chair", "dog"]


def test_image_without_mask_is_labelled_from_its_xml(prepared):
    _, dataset = prepared
    assert not dataset.has_mask("2011_003353")
    assert [CLASSES[i] for i in np.flatnonzero(dataset.label_vector("2011_003353"))] == ["person"]


def test_mask_indices_255_and_palette_are_preserved(prepared):
    _, dataset = prepared
    with Image.open(VOC / "SegmentationClass" / "2007_000063.png") as original:
        original_indices = np.array(original)
        original_palette = original.getpalette()
    with Image.open(dataset.mask_path("2007_000063")) as prepared_mask:
        assert prepared_mask.mode == "P"
        prepared_palette = prepared_mask.getpalette()
    assert np.array_equal(dataset.read_mask("2007_000063"), original_indices)
    assert 255 in original_indices
    assert prepared_palette[: 21 * 3] == original_palette[: 21 * 3]
    assert prepared_palette[255 * 3 : 256 * 3] == original_palette[255 * 3 : 256 * 3]


def test_jpegs_are_copied_byte_for_byte(prepared):
    _, dataset = prepared
    for image_id in dataset.labels:
        assert dataset.image_path(image_id).read_bytes() == (VOC / "JPEGImages" / f"{image_id}.jpg").read_bytes()


def test_splits_and_missing_ids_are_reported(prepared):
    report, dataset = prepared
    assert dataset.split("train") == ["2007_000063"]
    assert dataset.split("train_aug") == ["2007_000063"]
    assert not (dataset.root / "splits" / "val.txt").exists()  # none of the val ids is present
    saved = json.loads((dataset.root / "prepare_report.json").read_text())
    assert saved["id_counts"]["train_ids_not_prepared"] == 1463
    assert saved["id_counts"]["val_ids_not_prepared"] == 1449
    assert saved["id_counts"]["train_aug_ids_not_prepared"] == 10581
    assert "2007_000032" in saved["ids"]["train_ids_not_prepared"]


# --------------------------------------------------------------------------------------------
# mIoU on the prepared masks
# --------------------------------------------------------------------------------------------


def reference_miou(pred: np.ndarray, target: np.ndarray, num_classes: int = 21) -> float:
    """IoU per class straight from pixel sets (target 255 left out), mean over present classes."""
    scored = target != 255
    ious = []
    for c in range(num_classes):
        p, t = (pred == c) & scored, (target == c) & scored
        union = np.count_nonzero(p | t)
        if union:
            ious.append(np.count_nonzero(p & t) / union)
    return float(np.mean(ious))


def test_miou_of_a_mask_against_itself_and_a_shifted_copy(prepared):
    _, dataset = prepared
    target = dataset.read_mask("2007_000063")
    itself = ConfusionMatrix(21)
    itself.update(np.where(target == 255, 0, target), target)
    assert itself.miou() == 1.0
    shifted = np.zeros_like(target)
    shifted[:, 20:] = target[:, :-20]  # 20 pixels to the right
    shifted[shifted == 255] = 0
    matrix = ConfusionMatrix(21)
    matrix.update(shifted, target)
    assert matrix.miou() == pytest.approx(reference_miou(shifted, target), abs=1e-12)
    assert 0.3 < matrix.miou() < 1.0


def test_miou_hand_computed_example():
    target = np.array([[0, 0, 1], [0, 255, 1]])
    pred = np.array([[0, 1, 1], [0, 0, 0]])
    # class 0: TP 2, FP 1 (bottom right), FN 1 (top middle) -> 2/4; class 1: TP 1, FP 1, FN 1 -> 1/3
    matrix = ConfusionMatrix(2)
    matrix.update(pred, target)
    assert matrix.miou() == pytest.approx((2 / 4 + 1 / 3) / 2)


# --------------------------------------------------------------------------------------------
# Synthetic trees: SBD, computed train_aug, bad masks, XML details
# --------------------------------------------------------------------------------------------


def make_tree(root: Path, ids: list[str], masks: dict, lists: dict, xml_names: dict) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ["JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"]:
        (voc / sub).mkdir(parents=True, exist_ok=True)
    for image_id in ids:
        Image.fromarray(np.full((12, 16, 3), 90, np.uint8)).save(voc / "JPEGImages" / f"{image_id}.jpg")
    for image_id, mask in masks.items():
        picture = Image.fromarray(mask.astype(np.uint8), mode="P")
        picture.putpalette(sum(default_palette(256), []))
        picture.save(voc / "SegmentationClass" / f"{image_id}.png")
    for name, listed in lists.items():
        (voc / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("\n".join(listed) + "\n")
    for image_id, objects in xml_names.items():
        body = "".join(f"<object><name>{n}</name><difficult>{d}</difficult></object>" for n, d in objects)
        (voc / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{body}</annotation>")
    return voc


def class_mask(*classes: int, shape=(12, 16)) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    for k, c in enumerate(classes):
        mask[k, :] = c
    mask[-1, :] = 255
    return mask


def test_sbd_masks_and_computed_train_aug(tmp_path):
    ids = ["a", "b", "c", "d"]
    voc = make_tree(
        tmp_path / "voc",
        ids,
        {"a": class_mask(1), "d": class_mask(5)},
        {"train": ["a"], "val": ["d"]},
        {"b": [("dog", 0)], "c": [("cat", 0)]},
    )
    sbd = tmp_path / "sbd"
    (sbd / "dataset").mkdir(parents=True)
    (sbd / "SegmentationClassAug").mkdir()
    Image.fromarray(class_mask(3, 15)).save(sbd / "SegmentationClassAug" / "b.png")  # grayscale
    (sbd / "dataset" / "train.txt").write_text("b\nd\n")
    (sbd / "dataset" / "val.txt").write_text("c\n")
    report = prepare_voc(voc, tmp_path / "out", sbd_root=sbd, progress=False)
    dataset = PreparedDataset(tmp_path / "out")
    assert report.ok and report.counts["with_mask"] == 3
    assert dataset.split("train_aug") == ["a", "b", "c"]  # SBD train + val + VOC train - VOC val
    assert [CLASSES[i] for i in np.flatnonzero(dataset.label_vector("b"))] == ["bird", "person"]  # mask, not XML
    assert np.array_equal(dataset.read_mask("b"), class_mask(3, 15))
    assert [CLASSES[i] for i in np.flatnonzero(dataset.label_vector("c"))] == ["cat"]
    assert not dataset.has_mask("c")
    prepare_voc(voc, tmp_path / "out", progress=False)  # again, without SBD: b's SBD mask must go
    assert np.flatnonzero(PreparedDataset(tmp_path / "out").label_vector("b")).tolist() == [CLASSES.index("dog")]
    assert not PreparedDataset(tmp_path / "out").has_mask("b")


def test_wrong_size_and_bad_index_masks_are_reported_and_skipped(tmp_path):
    voc = make_tree(
        tmp_path / "voc",
        ["good", "small", "index"],
        {"good": class_mask(2), "small": class_mask(2, shape=(5, 5)), "index": class_mask(42)},
        {"train": ["good", "small", "index", "gone"]},
        {},
    )
    report = prepare_voc(voc, tmp_path / "out", progress=False)
    problems = {Path(p.where).name: p.message for p in report.problems}
    assert "mask is 5x5 but its image is 16x12" in problems["small.png"]
    assert "class index 42" in problems["index.png"]
    assert PreparedDataset(tmp_path / "out").split("train") == ["good"]
    assert report.id_counts["train_ids_not_prepared"] == 3  # small, index and the missing "gone"


def test_nothing_usable_is_a_data_error(tmp_path):
    voc = make_tree(tmp_path / "voc", ["x"], {}, {"train": ["x"]}, {})  # no mask, no XML
    with pytest.raises(DataError, match="prepare_report.json"):
        prepare_voc(voc, tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="JPEGImages"):
        prepare_voc(tmp_path / "nowhere", tmp_path / "out2", progress=False)


def test_xml_labels_include_difficult_objects_and_ignore_unknown_names(tmp_path):
    path = tmp_path / "x.xml"
    path.write_text(
        "<annotation><object><name>dog</name><difficult>1</difficult></object>"
        "<object><name> sheep </name><difficult>0</difficult>"
        "<part><name>head</name></part></object>"
        "<object><name>unicorn</name></object></annotation>"
    )
    assert [CLASSES[i] for i in np.flatnonzero(labels_from_xml(path))] == ["dog", "sheep"]
    path.write_text("<annotation><object>")
    with pytest.raises(DataError, match="x.xml"):
        labels_from_xml(path)


def test_rerun_gives_the_same_dataset(tmp_path):
    need_samples()
    shutil.copytree(SAMPLES / "VOCdevkit", tmp_path / "VOCdevkit")
    first = prepare_voc(tmp_path, tmp_path / "out", progress=False)
    labels = (tmp_path / "out" / "labels.csv").read_text()
    fingerprint = PreparedDataset(tmp_path / "out").fingerprint()
    second = prepare_voc(tmp_path, tmp_path / "out", workers=2, progress=False)
    assert first.counts.pop("converted") == second.counts.pop("resumed") == 2  # kept, not read again
    assert first.counts == second.counts and (tmp_path / "out" / "labels.csv").read_text() == labels
    assert PreparedDataset(tmp_path / "out").fingerprint() == fingerprint  # nothing rewritten: stages stay current


def test_rerun_without_a_split_removes_its_old_file(tmp_path):
    ids = ["a", "b", "c"]
    voc = make_tree(
        tmp_path / "voc",
        ids,
        {"a": class_mask(1), "b": class_mask(2), "c": class_mask(3)},
        {"train": ["a", "b"], "val": ["c"], "train_aug": ["a", "b"]},
        {},
    )
    out = tmp_path / "out"
    prepare_voc(voc, out, progress=False)
    assert PreparedDataset(out).split("train_aug") == ["a", "b"]
    (voc / "ImageSets" / "Segmentation" / "train_aug.txt").unlink()
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("gone\n")  # lists no prepared image
    report = prepare_voc(voc, out, progress=False)
    assert sorted(p.name for p in (out / "splits").iterdir()) == ["train.txt"]
    assert report.counts["split_val"] == 0 and "split_train_aug" not in report.counts


def test_truncated_jpeg_is_reported_and_skipped(tmp_path):
    voc = make_tree(
        tmp_path / "voc", ["good", "bad"], {"good": class_mask(1)}, {"train": ["good", "bad"]}, {"bad": [("dog", 0)]}
    )
    noise = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(voc / "JPEGImages" / "bad.jpg", quality=95)
    raw = (voc / "JPEGImages" / "bad.jpg").read_bytes()
    (voc / "JPEGImages" / "bad.jpg").write_bytes(raw[: len(raw) // 2])  # only decoding finds the cut
    with Image.open(voc / "JPEGImages" / "bad.jpg") as header_only:
        assert header_only.size == (64, 48)
    report = prepare_voc(voc, tmp_path / "out", progress=False)
    problems = {Path(p.where).name: p.message for p in report.problems}
    assert "not a readable image" in problems["bad.jpg"]
    dataset = PreparedDataset(tmp_path / "out")
    assert sorted(dataset.labels) == ["good"] and dataset.split("train") == ["good"]
    assert not (tmp_path / "out" / "images" / "bad.jpg").exists()
    assert dataset.image_path("good").read_bytes() == (voc / "JPEGImages" / "good.jpg").read_bytes()


def test_deeplab_train_aug_lines_give_ids(tmp_path):
    ids = ["2007_000032", "2007_000039"]
    voc = make_tree(tmp_path / "voc", ids, {i: class_mask(1) for i in ids}, {"train": ids[:1]}, {})
    (voc / "ImageSets" / "Segmentation" / "train_aug.txt").write_text(
        "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in ids)
    )
    prepare_voc(voc, tmp_path / "out", progress=False)
    assert PreparedDataset(tmp_path / "out").split("train_aug") == ids
    plain = tmp_path / "plain.txt"
    plain.write_text("2007_000032\n\n2007_000039 1\n")
    assert read_id_list(plain) == ids  # bare ids (and "id flag" lines) are unchanged
