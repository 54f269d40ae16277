"""NIH ChestX-ray14: the box list's header quirk, labels, grayscale conversion, patient splits."""

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data.errors import DataError
from data.layout import PreparedDataset
from data.nih import FINDINGS, Box, Entry, patient_splits, prepare_nih, read_boxes, write_boxes

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "samples" / "nih"


def need_samples():
    if not (SAMPLES / "images").is_dir():
        pytest.skip(f"NIH samples not found: {SAMPLES}")


def test_release_box_list_parses():
    need_samples()
    assert (SAMPLES / "BBox_List_2017.csv").read_text().splitlines()[0] == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    boxes = read_boxes(SAMPLES / "BBox_List_2017.csv")
    assert len(boxes) == 984 and len({b.image_id for b in boxes}) == 880
    assert {b.finding for b in boxes} <= set(FINDINGS) and "Infiltration" in {b.finding for b in boxes}
    first = boxes[0]
    assert first == Box(
        "00013118_008", "Atelectasis", 225.084745762712, 547.019216763771, 86.7796610169491, 79.1864406779661
    )


def test_47_boxes_for_the_40_sample_images():
    need_samples()
    present = {p.stem for p in (SAMPLES / "images").glob("*.png")}
    assert len(present) == 40
    boxes = [b for b in read_boxes(SAMPLES / "BBox_List_2017.csv") if b.image_id in present]
    assert len(boxes) == 47
    assert sorted(boxes, key=repr) == sorted(read_boxes(SAMPLES / "BBox_samples.csv"), key=repr)


def test_clean_box_file_round_trips(tmp_path):
    boxes = [Box("00000001_000", "Mass", 1.5, 2.25, 30.0, 40.125), Box("x", "Infiltration", 0.1, 0.2, 0.3, 0.4)]
    write_boxes(tmp_path / "boxes.csv", boxes)
    assert (tmp_path / "boxes.csv").read_text().splitlines()[0] == "image_id,finding,x,y,w,h"
    assert read_boxes(tmp_path / "boxes.csv") == boxes


@pytest.mark.parametrize(
    "row, message",
    [
        ("a.png,Mass,1,2,3", "expected image"),
        ("a.png,Mass,1,2,3,4,5", "expected image"),
        ("a.png,Unicorn,1,2,3,4", "unknown finding"),
        ("a.png,Mass,1,2,x,4", "numbers"),
        ("a.png,Mass,1,2,0,4", "positive"),
    ],
)
def test_bad_box_rows_name_the_line(tmp_path, row, message):
    path = tmp_path / "b.csv"
    path.write_text(f"Image Index,Finding Label,Bbox [x,y,w,h],,,\nok.png,Mass,1,2,3,4\n{row}\n")
    with pytest.raises(DataError, match=f"b.csv:3: .*{message}"):
        read_boxes(path)


def test_samples_prepare(tmp_path):
    need_samples()
    report = prepare_nih(
        SAMPLES / "images",
        SAMPLES / "Data_Entry_2017_v2020.csv.gz",
        SAMPLES / "BBox_List_2017.csv",
        tmp_path / "out",
        progress=False,
    )
    assert report.ok and report.counts["prepared"] == 40 and report.counts["boxes"] == 47
    assert report.id_counts["labels_without_images"] == 112120 - 40
    dataset = PreparedDataset(tmp_path / "out")
    assert dataset.classes == FINDINGS and dataset.task == "multiclass"
    assert len(read_boxes(tmp_path / "out" / "boxes.csv")) == 47
    assert sorted(dataset.split("test")) == sorted(dataset.labels)  # every sample image is boxed
    table = pd.read_csv(SAMPLES / "Data_Entry_2017_v2020.csv.gz", usecols=["Image Index", "Finding Labels"])
    findings = dict(zip(table["Image Index"].str[:-4], table["Finding Labels"]))
    for image_id in dataset.labels:
        expected = set(findings[image_id].split("|")) - {"No Finding"}
        assert {FINDINGS[i] for i in np.flatnonzero(dataset.label_vector(image_id))} == expected
        assert dataset.read_mask(image_id) is None
    image_id = next(iter(dataset.labels))
    assert np.array_equal(
        np.array(Image.open(dataset.image_path(image_id))), np.array(Image.open(SAMPLES / "images" / f"{image_id}.png"))
    )


def write_entries(path: Path, rows: list[tuple[str, str, str]]) -> None:
    lines = ["Image Index,Finding Labels,Follow-up #,Patient ID"]
    lines += [f"{name},{labels},0,{patient}" for name, labels, patient in rows]
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))


def test_conversion_bad_images_and_unknown_rows(tmp_path):
    images = tmp_path / "images_001" / "images"
    images.mkdir(parents=True)
    gray = (np.arange(20 * 30).reshape(20, 30) % 256).astype(np.uint8)
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
    Image.fromarray(rgba).save(images / "00000001_000.png")
    Image.fromarray(gray.astype(np.uint16) * 200).save(images / "00000001_001.png")
    (images / "00000002_000.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.fromarray(gray).save(images / "00000003_000.png")
    Image.fromarray(gray).save(images / "00000009_000.png")  # not in the data entry
    write_entries(
        tmp_path / "entry.csv.gz",
        [
            ("00000001_000.png", "Mass|Nodule", "1"),
            ("00000001_001.png", "No Finding", "1"),
            ("00000002_000.png", "Hernia", "2"),
            ("00000003_000.png", "Unicorn", "3"),
            ("00000004_000.png", "Edema", "4"),
        ],
    )
    (tmp_path / "boxes.csv").write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n00000001_000.png,Mass,1,2,3,4\n00000004_000.png,Edema,1,2,3,4\n"
    )
    report = prepare_nih(tmp_path, tmp_path / "entry.csv.gz", tmp_path / "boxes.csv", tmp_path / "out", progress=False)
    dataset = PreparedDataset(tmp_path / "out")
    assert sorted(dataset.labels) == ["00000001_000", "00000001_001"]
    converted = np.array(Image.open(dataset.image_path("00000001_000")))
    assert converted.dtype == np.uint8 and converted.ndim == 2 and np.array_equal(converted, gray)
    deep = np.array(Image.open(dataset.image_path("00000001_001")))
    assert deep.dtype == np.uint8 and np.array_equal(deep, gray)  # 16-bit min..max stretched back
    wheres = " ".join(p.where + " " + p.message for p in report.problems)
    assert "00000002_000.png" in wheres and "Unicorn" in wheres
    assert report.id_lists["images_without_labels"] == ["00000003_000", "00000009_000"]  # bad row, none
    assert report.counts["boxes"] == 1 and report.counts["boxes_without_image"] == 1
    assert report.id_counts["labels_without_images"] == 1  # 00000004_000
    assert dataset.split("test") == ["00000001_000", "00000001_001"]  # the boxed patient, whole


def test_patient_splits_keep_patients_whole():
    entries = {f"{p:08d}_{k:03d}": Entry([0] * 14, str(p)) for p in range(50) for k in range(3)}
    boxed = {"00000007_001", "00000011_000"}
    splits = patient_splits(set(entries), entries, boxed, val_fraction=0.2, seed=1)
    assert splits == patient_splits(set(entries), entries, boxed, val_fraction=0.2, seed=1)
    patients = {name: {entries[i].patient for i in ids} for name, ids in splits.items()}
    assert patients["test"] == {"7", "11"}
    assert len(patients["val"]) == 10 and len(patients["train"]) == 38
    assert not (patients["train"] & patients["val"]) and not (patients["val"] & patients["test"])
    assert sum(len(ids) for ids in splits.values()) == 150


def small_release(tmp_path: Path, patients: int = 6) -> tuple[Path, Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    gray = (np.arange(20 * 30).reshape(20, 30) % 256).astype(np.uint8)
    rows = []
    for p in range(patients):
        Image.fromarray(gray).save(images / f"{p:08d}_000.png")
        rows.append((f"{p:08d}_000.png", "Mass" if p % 2 else "No Finding", str(p)))
    write_entries(tmp_path / "entry.csv.gz", rows)
    (tmp_path / "boxes.csv").write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n")
    return images, tmp_path / "entry.csv.gz", tmp_path / "boxes.csv"


def test_truncated_output_png_is_redone(tmp_path):
    images, entry, boxes = small_release(tmp_path, patients=2)
    out = tmp_path / "out"
    prepare_nih(images, entry, boxes, out, progress=False)
    target = out / "images" / "00000000_000.png"
    target.write_bytes(target.read_bytes()[:60])  # the header still opens, the pixels are cut
    with Image.open(target) as header_only:
        assert header_only.size == (30, 20)
    report = prepare_nih(images, entry, boxes, out, progress=False)
    assert report.counts["copied"] == 1 and report.counts["resumed"] == 1
    assert target.read_bytes() == (images / "00000000_000.png").read_bytes()


def test_a_rerun_that_prepares_nothing_leaves_the_dataset_usable(tmp_path):
    """A data-entry file that names none of the images changes no file: the dataset prepared
    before keeps its dataset.json."""
    from data.layout import PreparedDataset

    images, entry, boxes = small_release(tmp_path, patients=2)
    out = tmp_path / "out"
    prepare_nih(images, entry, boxes, out, progress=False)
    other = tmp_path / "other.csv.gz"
    write_entries(other, [("99999999_000.png", "Mass", "99")])
    with pytest.raises(
        DataError,
        match="no NIH image could be prepared from .*: no Image Index of .*other.csv.gz "
        "matched a PNG file name .*'99999999_000'.*'00000000_000', '00000001_000'",
    ):
        prepare_nih(images, other, boxes, out, progress=False)
    assert len(PreparedDataset(out).labels) == 2
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000000_000.png", "00000001_000.png"]


def test_val_fraction_zero_removes_an_old_val_split(tmp_path):
    images, entry, boxes = small_release(tmp_path)
    out = tmp_path / "out"
    prepare_nih(images, entry, boxes, out, val_fraction=0.5, progress=False)
    assert len(PreparedDataset(out).split("val")) == 3
    prepare_nih(images, entry, boxes, out, val_fraction=0.0, progress=False)
    assert not (out / "splits" / "val.txt").exists() and not (out / "splits" / "test.txt").exists()
    assert len(PreparedDataset(out).split("train")) == 6


def test_bad_box_rows_are_reported_and_skipped_by_prepare(tmp_path):
    images, entry, boxes = small_release(tmp_path, patients=2)
    boxes.write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        "00000001_000.png,Mass,1,2,3,4\n"
        "00000001_000.png,Mass,10,20,abc,5,,,\n"  # line 3: not a number
        "00000001_000.png,Unicorn,1,2,3,4\n"  # line 4: unknown finding
        "00000001_000.png,Mass,1\n"
    )  # line 5: too few fields
    report = prepare_nih(images, entry, boxes, tmp_path / "out", progress=False)
    saved = json.loads(report.path.read_text())
    wheres = {p["where"]: p["message"] for p in saved["problems"]}
    assert "numbers" in wheres[f"{boxes}:3"] and "Unicorn" in wheres[f"{boxes}:4"]
    assert "expected image" in wheres[f"{boxes}:5"]
    assert saved["counts"]["bad_box_rows"] == 3 and saved["counts"]["boxes"] == 1
    assert read_boxes(tmp_path / "out" / "boxes.csv") == [Box("00000001_000", "Mass", 1, 2, 3, 4)]


def test_box_file_without_header_stays_fatal(tmp_path):
    images, entry, boxes = small_release(tmp_path, patients=2)
    boxes.write_text("a.png,Mass\n")
    with pytest.raises(DataError, match="expected a header"):
        prepare_nih(images, entry, boxes, tmp_path / "out", progress=False)


def test_box_file_whose_header_was_cut_off_is_fatal_not_one_box_short(tmp_path):
    """Taking the first box for a header would lose it, and move its image from test to train."""
    images, entry, boxes = small_release(tmp_path, patients=2)
    boxes.write_text("00000001_000.png,Mass,1,2,3,4\n00000002_000.png,Mass,1,2,3,4\n")
    with pytest.raises(DataError, match="expected a header.*00000001_000.png,Mass,1,2,3,4"):
        prepare_nih(images, entry, boxes, tmp_path / "out", progress=False)


def test_non_utf8_box_file_is_a_data_error_naming_the_line(tmp_path):
    path = tmp_path / "b.csv"
    path.write_bytes(
        b"Image Index,Finding Label,Bbox [x,y,w,h],,,\r\nok.png,Mass,1,2,3,4\r\ncaf\xe9.png,Mass,1,2,3,4\r\n"
    )
    with pytest.raises(DataError, match=r"b.csv:3: not UTF-8"):
        read_boxes(path)


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_damaged_data_entry_gz_is_a_data_error(tmp_path, damage):
    images, entry, boxes = small_release(tmp_path, patients=2)
    raw = bytearray(entry.read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    else:
        raw[10] ^= 0x04  # the first deflate block gets an invalid type: zlib.error
    entry.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="entry.csv.gz: not a readable CSV"):
        prepare_nih(images, entry, boxes, tmp_path / "out", progress=False)


# ------------------------------------------------------------------------------ --size


def test_samples_resized_with_their_boxes_and_resumed(tmp_path):
    need_samples()
    inputs = (SAMPLES / "images", SAMPLES / "Data_Entry_2017_v2020.csv.gz", SAMPLES / "BBox_List_2017.csv")
    out = tmp_path / "out"
    report = prepare_nih(*inputs, out, progress=False, size=256)
    assert report.counts["prepared"] == 40 and report.counts["converted"] == 40
    dataset = PreparedDataset(out)
    assert {Image.open(dataset.image_path(i)).size for i in dataset.labels} == {(256, 256)}
    boxes = read_boxes(out / "boxes.csv")
    # BBox_samples.csv line 2: 00000468_033 Atelectasis 204.474576271186,502.544640492585,
    # 116.067796610169,53.1525423728814 on a 1024 x 1024 image, so a quarter of each at 256
    first = next(b for b in boxes if b.image_id == "00000468_033" and b.finding == "Atelectasis")
    assert (first.x, first.y, first.w, first.h) == pytest.approx(
        (51.118644067797, 125.636160123146, 29.016949152542, 13.288135593220)
    )
    released = sorted(read_boxes(SAMPLES / "BBox_samples.csv"), key=repr)
    assert sorted(boxes, key=repr) == [Box(b.image_id, b.finding, b.x / 4, b.y / 4, b.w / 4, b.h / 4) for b in released]
    written = (out / "boxes.csv").read_bytes()

    again = prepare_nih(*inputs, out, progress=False, size=256)
    assert again.counts["resumed"] == 40 and "converted" not in again.counts
    assert (out / "boxes.csv").read_bytes() == written  # resumed images' boxes are scaled too
    for other, shown in [(512, 512), (None, 0)]:
        with pytest.raises(DataError, match=f"--size 256, this run asks for --size {shown} .*fresh --out"):
            prepare_nih(*inputs, out, progress=False, size=other)
    assert sorted(PreparedDataset(out).labels) == sorted(dataset.labels)  # a refused run leaves it readable


def block_image(path: Path, width: int, height: int, box: tuple[int, int, int, int]) -> None:
    """A black 8-bit image with a white block exactly filling ``box`` (x, y, w, h)."""
    pixels = np.zeros((height, width), np.uint8)
    x, y, w, h = box
    pixels[y : y + h, x : x + w] = 255
    Image.fromarray(pixels).save(path)


def centroid(pixels: np.ndarray) -> tuple[float, float]:
    """Intensity-weighted centre (x, y) in continuous pixel coordinates (pixel i spans [i, i+1))."""
    weights = pixels.astype(np.float64)
    ys, xs = np.indices(pixels.shape) + 0.5
    return float((xs * weights).sum() / weights.sum()), float((ys * weights).sum() / weights.sum())


# id: (source width, height), its box, the box hand-scaled to 64 x 64
SIZED_CASES = {
    "00000001_000": ((1024, 1024), (256, 512, 128, 64), (16.0, 32.0, 8.0, 4.0)),
    "00000002_000": ((300, 200), (30, 40, 60, 50), (6.4, 12.8, 12.8, 16.0)),  # 64/300 wide, 64/200 high
    "00000003_000": ((40, 32), (12, 8, 10, 12), (19.2, 16.0, 16.0, 24.0)),  # enlarged: bilinear
}


def sized_release(tmp_path: Path) -> tuple[Path, Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    rows, lines = [], ["Image Index,Finding Label,Bbox [x,y,w,h],,,"]
    for image_id, ((width, height), box, _) in SIZED_CASES.items():
        block_image(images / f"{image_id}.png", width, height, box)
        rows.append((f"{image_id}.png", "Mass", image_id[:8]))
        lines.append(f"{image_id}.png,Mass,{','.join(map(str, box))}")
    write_entries(tmp_path / "entry.csv.gz", rows)
    (tmp_path / "boxes.csv").write_text("\n".join(lines) + "\n")
    return images, tmp_path / "entry.csv.gz", tmp_path / "boxes.csv"


def test_size_scales_each_box_by_its_own_image_and_keeps_the_block_inside(tmp_path):
    out = tmp_path / "out"
    report = prepare_nih(*sized_release(tmp_path), out, progress=False, size=64)
    assert report.counts["converted"] == 3
    boxes = {b.image_id: b for b in read_boxes(out / "boxes.csv")}
    for image_id, ((width, height), (x, y, w, h), expected) in SIZED_CASES.items():
        pixels = np.array(Image.open(out / "images" / f"{image_id}.png"))
        assert pixels.shape == (64, 64) and pixels.dtype == np.uint8
        box = boxes[image_id]
        assert (box.x, box.y, box.w, box.h) == pytest.approx(expected)
        centre = (box.x + box.w / 2, box.y + box.h / 2)
        assert (centre[0] / 64, centre[1] / 64) == pytest.approx(((x + w / 2) / width, (y + h / 2) / height))
        # the block's centre lands on the box's centre; Pillow's BOX weighs whole source pixels,
        # not covered areas, which may shift it by up to half a source pixel
        assert centroid(pixels) == pytest.approx(centre, abs=0.25)


def test_resume_redoes_images_of_another_size_only(tmp_path):
    inputs = sized_release(tmp_path)
    out = tmp_path / "out"
    prepare_nih(*inputs, out, progress=False, size=64)
    written = (out / "boxes.csv").read_bytes()
    stale = out / "images" / "00000002_000.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(stale)  # decodes, but is not 64 x 64
    report = prepare_nih(*inputs, out, progress=False, size=64)
    assert report.counts["resumed"] == 2 and report.counts["converted"] == 1
    assert Image.open(stale).size == (64, 64) and (out / "boxes.csv").read_bytes() == written
    with pytest.raises(DataError, match="--size 64, this run asks for --size 32"):
        prepare_nih(*inputs, out, progress=False, size=32)


def test_native_size_copies_and_keeps_boxes(tmp_path):
    inputs = sized_release(tmp_path)
    out = tmp_path / "out"
    report = prepare_nih(*inputs, out, progress=False)
    assert report.counts["copied"] == 3 and json.loads((out / "nih.json").read_text()) == {"size": 0}
    boxes = {b.image_id: b for b in read_boxes(out / "boxes.csv")}
    for image_id, ((width, height), box, _) in SIZED_CASES.items():
        assert Image.open(out / "images" / f"{image_id}.png").size == (width, height)
        assert (boxes[image_id].x, boxes[image_id].y, boxes[image_id].w, boxes[image_id].h) == box
    resized = prepare_nih(*inputs, tmp_path / "out1024", progress=False, size=1024)
    assert resized.counts["copied"] == 1 and resized.counts["converted"] == 2  # one is 1024 x 1024


def test_cli_size_option(cli, tmp_path):
    images, entry, boxes = sized_release(tmp_path)
    result = cli(
        "prepare",
        "nih",
        "--images",
        images,
        "--data-entry",
        entry,
        "--boxes",
        boxes,
        "--out",
        tmp_path / "out",
        "--size",
        "32",
    )
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "out" / "images" / "00000002_000.png").size == (32, 32)
    (box,) = [b for b in read_boxes(tmp_path / "out" / "boxes.csv") if b.image_id == "00000002_000"]
    assert (box.x, box.y, box.w, box.h) == pytest.approx((3.2, 6.4, 6.4, 8.0))
    result = cli(
        "prepare", "nih", "--images", images, "--data-entry", entry, "--boxes", boxes, "--out", tmp_path / "out"
    )
    assert result.exit_code != 0 and "--size 32, this run asks for --size 0" in result.output
