"""The synthetic VOC 2012 release tree (data/synthetic_voc.py): what `wss prepare voc` reads, in
VOC's split proportions, with labels that agree between masks and XML, and 255 outline bands."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from data.layout import IGNORE_INDEX, PreparedDataset
from data.synthetic_voc import VocSpec, generate_voc_image, split_ids, write_voc_release
from data.voc import CLASSES, labels_from_mask, labels_from_xml, prepare_voc


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    folder = tmp_path_factory.mktemp("voc-release")
    return write_voc_release(folder, VocSpec(n=40, size=96, seed=0)), folder


def digests(root) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_splits_keep_voc_proportions():
    splits = split_ids(VocSpec(n=12_031))
    assert (len(splits["train_aug"]), len(splits["val"]), len(splits["train"])) == (10_582, 1_449, 1_464)
    small = split_ids(VocSpec(n=40))
    assert (len(small["train_aug"]), len(small["val"]), len(small["train"])) == (35, 5, 5)
    assert set(small["train"]) <= set(small["train_aug"]) and not set(small["val"]) & set(small["train_aug"])


def test_prepare_voc_reads_the_tree(release, tmp_path):
    _, folder = release
    report = prepare_voc(folder, tmp_path / "prepared", progress=False)
    assert report.ok and not report.problems
    assert report.counts["prepared"] == report.counts["with_mask"] == 40
    data = PreparedDataset(tmp_path / "prepared")
    assert data.classes == CLASSES and data.info.image_ext == ".jpg"
    expected = split_ids(VocSpec(n=40))
    for name in ("train_aug", "val", "train"):
        assert data.split(name) == expected[name]
    with Image.open(data.image_path(expected["val"][0])) as image:
        assert image.size == (96, 96) and image.mode == "RGB"


def test_masks_and_xml_name_the_same_classes_and_outlines_are_ignored(release):
    voc, _ = release
    bands = 0
    for xml in sorted((voc / "Annotations").glob("*.xml")):
        with Image.open(voc / "SegmentationClass" / f"{xml.stem}.png") as picture:
            assert picture.mode == "P"
            mask = np.array(picture)
        assert labels_from_mask(mask) == labels_from_xml(xml), xml.stem
        assert sum(labels_from_mask(mask)) >= 1
        assert set(np.unique(mask).tolist()) <= set(range(len(CLASSES) + 1)) | {IGNORE_INDEX}
        bands += int((mask == IGNORE_INDEX).any())
    assert bands == 40  # every image has objects, so outlines


def test_outline_band_surrounds_each_object_and_is_deterministic():
    image, mask, objects = generate_voc_image(VocSpec(size=128, seed=2, border=2), 3)
    again = generate_voc_image(VocSpec(n=1000, size=128, seed=2, border=2), 3)
    np.testing.assert_array_equal(image, again[0])
    np.testing.assert_array_equal(mask, again[1])
    ignored = mask == IGNORE_INDEX
    for y, x in zip(*np.nonzero(mask[1:-1, 1:-1] < IGNORE_INDEX)):
        window = mask[y : y + 3, x : x + 3]  # around (y + 1, x + 1): two classes never touch without a band
        assert len(set(window[window != IGNORE_INDEX].tolist())) == 1
    assert ignored.mean() < 0.2 and len(objects) >= 1


def test_worker_processes_write_the_same_tree(release, tmp_path):
    voc, _ = release
    again = write_voc_release(tmp_path, VocSpec(n=40, size=96, seed=0), workers=2)
    assert digests(again) == digests(voc)
