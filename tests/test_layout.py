"""The prepared layout: the fingerprint sees replaced images, empty splits leave no file, and an
output path that cannot be a folder is a one-line error."""

import os
import re

import numpy as np
import pytest
from PIL import Image

from data.errors import DataError
from data.layout import DatasetInfo, DatasetWriter, PreparedDataset


def write_dataset(root, n=3):
    writer = DatasetWriter(root, DatasetInfo("t", "binary", ["thing"]))
    for k in range(n):
        writer.write_image(f"i{k}", np.full((8, 8), 10 * k, np.uint8))
        writer.write_mask(f"i{k}", np.zeros((8, 8), np.uint8))
    writer.write_labels({f"i{k}": [k % 2] for k in range(n)})
    writer.write_split("train", [f"i{k}" for k in range(n)])
    writer.write_info()
    return writer


def test_fingerprint_changes_when_an_image_is_replaced_by_one_of_the_same_size(tmp_path):
    write_dataset(tmp_path)
    path = tmp_path / "images" / "i1.png"
    before = PreparedDataset(tmp_path).fingerprint()
    old_size, old_mtime = path.stat().st_size, path.stat().st_mtime_ns
    Image.fromarray(np.full((8, 8), 77, np.uint8)).save(path)
    assert path.stat().st_size == old_size  # same byte size: names and sizes alone miss it
    os.utime(path, ns=(old_mtime + 10**9, old_mtime + 10**9))  # replaced later (coarse clocks)
    assert PreparedDataset(tmp_path).fingerprint() != before


def test_fingerprint_is_stable_when_nothing_changes_and_splits_are_rewritten(tmp_path):
    writer = write_dataset(tmp_path)
    before = PreparedDataset(tmp_path).fingerprint()
    writer.write_split("train", ["i0", "i1", "i2"])  # a re-prepare rewrites the same split
    assert PreparedDataset(tmp_path).fingerprint() == before


def test_empty_split_removes_an_old_file(tmp_path):
    writer = write_dataset(tmp_path)
    writer.write_split("val", ["i2"])
    writer.write_split("val", [])
    assert not (tmp_path / "splits" / "val.txt").exists()
    writer.write_split("val", [])  # nothing to remove: fine


@pytest.mark.parametrize("below", [True, False])
def test_out_under_a_regular_file_is_a_data_error_naming_it(tmp_path, below):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out" if below else tmp_path / "file"
    with pytest.raises(DataError, match=re.escape(f"cannot create the output folder {out}")):
        DatasetWriter(out, DatasetInfo("t", "binary", ["thing"]))


def test_writing_the_same_dataset_again_keeps_the_fingerprint(tmp_path):
    """Re-preparing unchanged data rewrites nothing, so no stage becomes stale."""
    write_dataset(tmp_path)
    before = PreparedDataset(tmp_path).fingerprint()
    mtime = (tmp_path / "images" / "i1.png").stat().st_mtime_ns
    write_dataset(tmp_path)
    assert (tmp_path / "images" / "i1.png").stat().st_mtime_ns == mtime
    assert PreparedDataset(tmp_path).fingerprint() == before


def test_fingerprint_reads_the_boxes_the_cam_stage_scores_against(tmp_path):
    write_dataset(tmp_path)
    before = PreparedDataset(tmp_path).fingerprint()
    (tmp_path / "boxes.csv").write_text("image_id,finding,x,y,w,h\ni0,thing,1,1,4,4\n")
    with_boxes = PreparedDataset(tmp_path).fingerprint()
    (tmp_path / "boxes.csv").write_text("image_id,finding,x,y,w,h\ni0,thing,2,1,4,4\n")
    assert len({before, with_boxes, PreparedDataset(tmp_path).fingerprint()}) == 3


def test_a_folder_being_prepared_again_is_not_a_dataset_until_it_is_finished(tiny_synthetic, tmp_path):
    """Re-preparing into an existing --out: until write_info, no mix of new and old splits is usable."""
    import shutil

    root = shutil.copytree(tiny_synthetic, tmp_path / "data")
    info = PreparedDataset(root).info
    writer = DatasetWriter(root, info)
    assert not (root / "dataset.json").exists()
    writer.write_split("train", ["a", "b"])
    assert (root / "splits" / "train.txt").read_text() == "a\nb\n"
    assert not any(p.name.startswith(".") for p in (root / "splits").iterdir())  # no temp file left
    writer.write_info()
    assert (root / "dataset.json").is_file()


def test_a_mask_or_label_that_does_not_decode_or_fit_its_image_is_a_data_error_naming_it(tmp_path):
    from data.layout import read_index_png

    write_dataset(tmp_path / "d")
    dataset = PreparedDataset(tmp_path / "d")
    good = dataset.mask_path("i0").read_bytes()
    dataset.mask_path("i1").write_bytes(b"not a png at all")
    dataset.mask_path("i2").write_bytes(good[:60])  # truncated
    for image_id in ["i1", "i2"]:
        with pytest.raises(DataError, match=f"{re.escape(str(dataset.mask_path(image_id)))}: not a readable label PNG"):
            dataset.read_mask(image_id)
        with pytest.raises(DataError, match="not a readable label PNG"):
            read_index_png(dataset.mask_path(image_id))
        assert "not a readable label PNG" in dataset.label_problem("i0", dataset.mask_path(image_id))
    assert dataset.read_mask("i0", (8, 8)).shape == (8, 8)
    with pytest.raises(DataError, match=r"i0\.png: mask is 8x8 but its image is 6x8"):
        dataset.read_mask("i0", (8, 6))
    assert dataset.label_problem("i0", dataset.mask_path("i0")) is None
    Image.new("L", (5, 8)).save(tmp_path / "narrow.png")
    assert "label is 5x8 but its image is 8x8" in dataset.label_problem("i0", tmp_path / "narrow.png")
