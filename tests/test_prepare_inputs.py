"""Re-preparing into the same --out after the inputs changed (issue 23 item 2), for every preparer:
exactly the items whose inputs changed are redone, the others keep their files (mtime included:
the dataset fingerprint reads it), removed inputs lose their outputs, added ones are prepared,
and the report lists each kind. The result must equal a fresh preparation of the new inputs."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import data.nih as nih
import data.siim as siim
import data.voc as voc_module
from data.dicom import write_dicom
from data.layout import PreparedDataset, default_palette
from data.nih import prepare_nih, read_boxes
from data.prepare_manifest import MANIFEST_NAME
from data.rle import siim_rle_encode
from data.siim import prepare_siim
from data.voc import CLASSES, prepare_voc
from tests.test_nih import SAMPLES as NIH_SAMPLES
from tests.test_siim import SAMPLES as SIIM_SAMPLES
from tests.test_siim import block_mask, make_case
from tests.test_voc import VOC, class_mask

ID = "1.2.276.0.7230010.3.1.4.8323329.{}"
POSITIVE = ID.format("4904.1517875185.355709")  # becomes -1
NEGATIVE = ID.format("10000.1517875220.938530")  # gets a mask
REPLACED = ID.format("1314.1517875167.222290")  # its DICOM replaced by another's
TOUCHED = ID.format("10001.1517875220.930580")  # its DICOM touched, content the same
REMOVED = ID.format("4440.1517875182.865105")  # its DICOM deleted
ADDED = "added-image"  # a new DICOM and row


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def mtimes(out: Path) -> dict[str, int]:
    """mtime_ns of every prepared image and mask, by path relative to ``out``."""
    return {
        f"{sub}/{p.name}": p.stat().st_mtime_ns
        for sub in ["images", "masks"]
        for p in sorted((out / sub).glob("*"))
        if not p.name.startswith(".")
    }


def later(path: Path, seconds: int = 5) -> None:
    """Move a file's mtime on, as a copy made a moment later would (coarse clocks)."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds * 10**9))


def assert_same_as_fresh(out: Path, fresh: Path) -> None:
    """``out`` holds exactly what a fresh preparation of the same inputs gives."""
    for sub in ["images", "masks"]:
        names = sorted(p.name for p in (out / sub).glob("*") if not p.name.startswith("."))
        assert names == sorted(p.name for p in (fresh / sub).glob("*") if not p.name.startswith(".")), sub
        for name in names:
            with Image.open(out / sub / name) as a, Image.open(fresh / sub / name) as b:
                assert np.array_equal(np.array(a), np.array(b)), f"{sub}/{name}"
    for meta in ["labels.csv", "boxes.csv"]:
        if (fresh / meta).is_file():
            assert (out / meta).read_text() == (fresh / meta).read_text(), meta
    assert sorted(os.listdir(out / "splits")) == sorted(os.listdir(fresh / "splits"))
    for name in os.listdir(fresh / "splits"):
        assert (out / "splits" / name).read_text() == (fresh / "splits" / name).read_text(), name


def report_ids(out: Path) -> dict[str, list[str]]:
    return json.loads((out / "prepare_report.json").read_text())["ids"]


def count_calls(monkeypatch, module, name: str) -> list[str]:
    """Record the first argument (a path) of every call to ``module.name`` (workers=1 runs in-process)."""
    calls, original = [], getattr(module, name)

    def recorded(path, *args, **kwargs):
        calls.append(Path(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(module, name, recorded)
    return calls


def assert_rerun_rewrites_nothing(prepare, out: Path) -> None:
    """The same inputs again: no file is rewritten, the manifest neither, the fingerprint stays."""
    before, fingerprint = mtimes(out), PreparedDataset(out).fingerprint()
    manifest = (out / MANIFEST_NAME).stat().st_mtime_ns
    prepare()
    assert mtimes(out) == before
    assert (out / MANIFEST_NAME).stat().st_mtime_ns == manifest
    assert PreparedDataset(out).fingerprint() == fingerprint


# --------------------------------------------------------------------------------------------
# SIIM
# --------------------------------------------------------------------------------------------


def siim_rows() -> dict[str, str]:
    raw = (SIIM_SAMPLES / "train-rle-sample.csv").read_bytes().decode("utf-8-sig")
    return dict(line.split(",", 1) for line in raw.splitlines() if line.strip())


def write_siim_csv(path: Path, rows: dict[str, str]) -> None:
    path.write_text("ImageId, EncodedPixels\n" + "".join(f"{i},{r}\n" for i, r in rows.items()))


@pytest.fixture
def siim_inputs(tmp_path):
    if not (SIIM_SAMPLES / "dicom").is_dir():
        pytest.skip(f"SIIM samples not found: {SIIM_SAMPLES}")
    dicoms = tmp_path / "dicom"
    dicoms.mkdir()
    for path in (SIIM_SAMPLES / "dicom").glob("*.dcm"):
        shutil.copyfile(path, dicoms / path.name)
    rows = siim_rows()
    write_siim_csv(tmp_path / "labels.csv", rows)
    return dicoms, tmp_path / "labels.csv", rows


def big_block_rle() -> str:
    mask = np.zeros((1024, 1024), np.uint8)
    mask[300:500, 200:400] = 1  # survives any resize
    return " " + siim_rle_encode(mask)


def test_siim_rerun_redoes_exactly_what_changed(tmp_path, siim_inputs, monkeypatch):
    dicoms, csv_path, rows = siim_inputs
    out = tmp_path / "out"
    prepare = lambda target=out, **kw: prepare_siim(dicoms, csv_path, target, size=128, progress=False, **kw)
    prepare()
    before = mtimes(out)
    assert np.count_nonzero(np.array(Image.open(out / "masks" / f"{POSITIVE}.png"))) > 0

    rows[POSITIVE] = "-1"  # positive -> negative
    rows[NEGATIVE] = big_block_rle()  # negative -> positive
    shutil.copyfile(dicoms / f"{ID.format('12743.1517875241.599591')}.dcm", dicoms / f"{REPLACED}.dcm")
    later(dicoms / f"{REPLACED}.dcm")  # another radiograph under its name
    later(dicoms / f"{TOUCHED}.dcm")  # same bytes, a later mtime
    (dicoms / f"{REMOVED}.dcm").unlink()
    write_dicom(dicoms / f"{ADDED}.dcm", (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8))
    rows[ADDED] = " " + siim_rle_encode(block_mask((64, 64), 10, 10, 20, 20))
    write_siim_csv(csv_path, rows)
    read = count_calls(monkeypatch, siim, "read_dicom")
    report = prepare()

    assert sorted(p.stem for p in read) == sorted([REPLACED, TOUCHED, ADDED])  # unchanged DICOMs are not read
    ids = report_ids(out)
    assert ids["labels_changed"] == sorted([POSITIVE, NEGATIVE])
    assert ids["source_changed"] == sorted([REPLACED, TOUCHED])
    assert ids["removed_source_gone"] == [REMOVED] and ids["added"] == [ADDED]
    assert (report.counts["relabelled"], report.counts["converted"], report.counts["resumed"]) == (2, 3, 5)
    after = mtimes(out)
    redone = {
        f"masks/{POSITIVE}.png",
        f"masks/{NEGATIVE}.png",
        f"images/{REPLACED}.png",
        f"images/{ADDED}.png",
        f"masks/{ADDED}.png",
    }
    gone = {f"images/{REMOVED}.png", f"masks/{REMOVED}.png"}
    assert set(after) == (set(before) - gone) | redone
    for name in set(before) - gone:  # the touched DICOM gave the same bytes: its files are kept
        assert (after[name] == before[name]) == (name not in redone), name
    dataset = PreparedDataset(out)
    assert dataset.label_vector(POSITIVE)[0] == 0 and not dataset.read_mask(POSITIVE).any()
    assert dataset.label_vector(NEGATIVE)[0] == 1 and dataset.read_mask(NEGATIVE).any()

    fresh = tmp_path / "fresh"
    prepare(fresh)
    assert_same_as_fresh(out, fresh)
    assert_rerun_rewrites_nothing(prepare, out)


def test_siim_folder_without_manifest_is_verified_not_trusted(tmp_path, siim_inputs, monkeypatch):
    """A folder prepared before manifests existed: masks recomputed from the rows (the issue's
    stale mask is found and redone), images kept unless their DICOM is newer, nothing else
    rewritten; from then on it has a manifest."""
    dicoms, csv_path, rows = siim_inputs
    out = tmp_path / "out"
    prepare = lambda **kw: prepare_siim(dicoms, csv_path, out, size=64, progress=False, **kw)
    prepare()
    (out / MANIFEST_NAME).unlink()
    before = mtimes(out)
    read = count_calls(monkeypatch, siim, "read_dicom")
    report = prepare()
    assert read == [] and report.counts["verified"] == 10 and mtimes(out) == before  # an unchanged folder stays valid
    assert (out / MANIFEST_NAME).is_file()

    (out / MANIFEST_NAME).unlink()
    rows[POSITIVE] = "-1"
    write_siim_csv(csv_path, rows)
    shutil.copyfile(dicoms / f"{NEGATIVE}.dcm", dicoms / f"{REPLACED}.dcm")
    later(dicoms / f"{REPLACED}.dcm")  # newer than its prepared image
    report = prepare()
    assert [p.stem for p in read] == [REPLACED]
    assert report_ids(out)["labels_changed"] == [POSITIVE] and report_ids(out)["source_changed"] == [REPLACED]
    assert report.counts["verified"] == 8 and "added" not in report.id_counts
    assert not PreparedDataset(out).read_mask(POSITIVE).any()
    after = mtimes(out)  # REPLACED's new picture has the same mask: the mask file is kept
    assert {n for n in before if after[n] != before[n]} == {f"masks/{POSITIVE}.png", f"images/{REPLACED}.png"}


def test_siim_force_reads_everything_rewrites_nothing_and_accepts_another_size(tmp_path, monkeypatch):
    dicoms, csv_path = make_case(tmp_path, {"a": block_mask(), "b": None})
    out = tmp_path / "out"
    prepare_siim(dicoms, csv_path, out, size=16, progress=False)
    before = mtimes(out)
    read = count_calls(monkeypatch, siim, "read_dicom")
    report = prepare_siim(dicoms, csv_path, out, size=16, progress=False, force=True)
    assert sorted(p.stem for p in read) == ["a", "b"] and report.counts["converted"] == 2 and mtimes(out) == before
    prepare_siim(dicoms, csv_path, out, size=8, progress=False, force=True)
    assert Image.open(out / "images" / "a.png").size == (8, 8)
    assert prepare_siim(dicoms, csv_path, out, size=8, progress=False).counts["resumed"] == 2


def test_siim_label_row_removed_removes_the_image(tmp_path):
    dicoms, csv_path = make_case(tmp_path, {"a": block_mask(), "b": None, "c": None})
    out = tmp_path / "out"
    prepare_siim(dicoms, csv_path, out, size=16, progress=False)
    csv_path.write_text("ImageId, EncodedPixels\na,-1\nc,1 2 3\n")  # b unlisted, c's row now bad
    report = prepare_siim(dicoms, csv_path, out, size=16, progress=False)
    assert report.id_lists["removed_unlabelled"] == ["b"] and report.id_lists["removed_failed"] == ["c"]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["a.png"]
    assert sorted(PreparedDataset(out).labels) == ["a"]


def test_siim_damaged_or_foreign_manifest_is_reported_and_everything_verified(tmp_path):
    dicoms, csv_path = make_case(tmp_path, {"a": block_mask(), "b": None})
    out = tmp_path / "out"
    prepare_siim(dicoms, csv_path, out, size=16, progress=False)
    before = mtimes(out)
    for text in [
        '{"items": [1, 2]',
        '{"dataset": "voc", "version": 1, "items": {}}',
        '{"dataset": "siim", "version": 1, "items": {"../../x": {"source": "1"}}}',
    ]:
        (out / MANIFEST_NAME).write_text(text)
        report = prepare_siim(dicoms, csv_path, out, size=16, progress=False)
        assert report.counts["verified"] == 2 and mtimes(out) == before
        if "../../x" not in text:
            assert any(p.where == str(out / MANIFEST_NAME) for p in report.problems)
    assert json.loads((out / MANIFEST_NAME).read_text())["dataset"] == "siim"


def test_files_never_listed_are_never_removed(tmp_path):
    """An --out whose images/ holds files wss did not prepare loses none of them."""
    dicoms, csv_path = make_case(tmp_path, {"a": block_mask(), "b": None})
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(out / "images" / "mine.png")
    prepare_siim(dicoms, csv_path, out, size=16, progress=False)
    (dicoms / "b.dcm").unlink()
    report = prepare_siim(dicoms, csv_path, out, size=16, progress=False)
    assert report.id_lists["removed_source_gone"] == ["b"]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["a.png", "mine.png"]


def test_cli_force_option(cli, tmp_path):
    dicoms, csv_path = make_case(tmp_path, {"a": block_mask()})
    args = ["prepare", "siim", "--dicom-dir", dicoms, "--rle-csv", csv_path, "--out", tmp_path / "out"]
    assert cli(*args, "--size", "16").exit_code == 0
    refused = cli(*args, "--size", "8")
    assert refused.exit_code == 2 and "--force" in refused.output
    forced = cli(*args, "--size", "8", "--force")
    assert forced.exit_code == 0, forced.output
    assert Image.open(tmp_path / "out" / "images" / "a.png").size == (8, 8)


# --------------------------------------------------------------------------------------------
# VOC
# --------------------------------------------------------------------------------------------


def write_voc_image(voc: Path, image_id: str, value: int, mask: np.ndarray | None) -> None:
    pixels = np.zeros((12, 16, 3), np.uint8)
    pixels[:, :, 0] = value
    pixels[2:8, 3:9] = 255 - value
    Image.fromarray(pixels).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=95)
    if mask is not None:
        picture = Image.fromarray(mask.astype(np.uint8), mode="P")
        picture.putpalette(sum(default_palette(256), []))
        picture.save(voc / "SegmentationClass" / f"{image_id}.png")


def test_voc_rerun_redoes_exactly_what_changed(tmp_path, monkeypatch):
    if not (VOC / "JPEGImages").is_dir():
        pytest.skip(f"VOC samples not found: {VOC}")
    root = tmp_path / "VOCdevkit"
    shutil.copytree(VOC.parent, root, copy_function=shutil.copyfile)
    voc = root / "VOC2012"
    for k, image_id in enumerate(["g1", "g2", "g3"]):
        write_voc_image(voc, image_id, 40 * k, class_mask(k + 1))
    out = tmp_path / "out"
    prepare = lambda target=out, **kw: prepare_voc(tmp_path, target, progress=False, **kw)
    prepare()
    before = mtimes(out)

    picture = Image.fromarray(class_mask(7), mode="P")  # g1: a changed mask (class 7, not 1)
    picture.putpalette(sum(default_palette(256), []))
    picture.save(voc / "SegmentationClass" / "g1.png")
    later(voc / "SegmentationClass" / "g1.png")
    xml = voc / "Annotations" / "2011_003353.xml"  # XML-only image: person -> dog
    xml.write_text(xml.read_text().replace("<name>person</name>", "<name>dog</name>"))
    later(xml)
    write_voc_image(voc, "g2", 200, None)  # g2: another picture, same mask
    later(voc / "JPEGImages" / "g2.jpg")
    (voc / "JPEGImages" / "g3.jpg").unlink()  # g3: removed
    write_voc_image(voc, "g4", 90, class_mask(4))  # g4: added
    decoded = count_calls(monkeypatch, voc_module, "_jpeg_size")
    report = prepare()

    assert sorted(p.stem for p in decoded) == ["g2", "g4"]  # a changed mask or XML does not read the JPEG again
    assert (report.counts["relabelled"], report.counts["converted"], report.counts["resumed"]) == (2, 2, 1)
    ids = report_ids(out)
    assert ids["labels_changed"] == ["2011_003353", "g1"] and ids["source_changed"] == ["g2"]
    assert ids["removed_source_gone"] == ["g3"] and ids["added"] == ["g4"]
    dataset = PreparedDataset(out)
    assert [CLASSES[i] for i in np.flatnonzero(dataset.label_vector("2011_003353"))] == ["dog"]
    assert np.flatnonzero(dataset.label_vector("g1")).tolist() == [6]
    assert np.array_equal(dataset.read_mask("g1"), class_mask(7))
    assert dataset.image_path("g2").read_bytes() == (voc / "JPEGImages" / "g2.jpg").read_bytes()
    after = mtimes(out)
    redone = {"masks/g1.png", "images/g2.jpg", "images/g4.jpg", "masks/g4.png"}
    assert set(after) == (set(before) - {"images/g3.jpg", "masks/g3.png"}) | redone
    for name in set(before) & set(after):
        assert (after[name] == before[name]) == (name not in redone), name

    fresh = tmp_path / "fresh"
    prepare(fresh)
    assert_same_as_fresh(out, fresh)
    assert_rerun_rewrites_nothing(prepare, out)


def test_voc_dropping_sbd_is_a_label_change(tmp_path):
    voc = tmp_path / "voc" / "VOCdevkit" / "VOC2012"
    for sub in ["JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"]:
        (voc / sub).mkdir(parents=True)
    write_voc_image(voc, "a", 10, class_mask(1))
    write_voc_image(voc, "b", 50, None)
    (voc / "Annotations" / "b.xml").write_text("<annotation><object><name>cat</name></object></annotation>")
    sbd = tmp_path / "sbd" / "SegmentationClassAug"
    sbd.mkdir(parents=True)
    Image.fromarray(class_mask(12)).save(sbd / "b.png")
    out = tmp_path / "out"
    prepare_voc(voc, out, sbd_root=sbd.parent, progress=False)
    assert PreparedDataset(out).has_mask("b")
    report = prepare_voc(voc, out, progress=False)
    assert report.id_lists["labels_changed"] == ["b"] and not PreparedDataset(out).has_mask("b")
    assert [CLASSES[i] for i in np.flatnonzero(PreparedDataset(out).label_vector("b"))] == ["cat"]


# --------------------------------------------------------------------------------------------
# NIH
# --------------------------------------------------------------------------------------------

NIH_IDS = ["00000032_037", "00000147_001", "00000150_002", "00000193_019", "00000211_016"]
NIH_NEW = "00000211_041"


def nih_tables() -> tuple[pd.DataFrame, list[str]]:
    table = pd.read_csv(NIH_SAMPLES / "Data_Entry_2017_v2020.csv.gz", dtype=str, keep_default_na=False)
    table = table[table["Image Index"].str[:-4].isin(NIH_IDS + [NIH_NEW])]
    lines = (NIH_SAMPLES / "BBox_samples.csv").read_text().splitlines()
    return table, lines


def write_nih_inputs(folder: Path, table: pd.DataFrame, box_lines: list[str], ids: list[str]) -> tuple[Path, Path]:
    table[table["Image Index"].str[:-4].isin(ids)].to_csv(folder / "entry.csv", index=False)
    kept = [box_lines[0]] + [line for line in box_lines[1:] if line.split(",")[0][:-4] in ids]
    (folder / "boxes.csv").write_text("\n".join(kept) + "\n")
    return folder / "entry.csv", folder / "boxes.csv"


def test_nih_rerun_redoes_exactly_what_changed(tmp_path, monkeypatch):
    if not (NIH_SAMPLES / "images").is_dir():
        pytest.skip(f"NIH samples not found: {NIH_SAMPLES}")
    images = tmp_path / "images"
    images.mkdir()
    for image_id in NIH_IDS:
        shutil.copyfile(NIH_SAMPLES / "images" / f"{image_id}.png", images / f"{image_id}.png")
    table, box_lines = nih_tables()
    entry, boxes = write_nih_inputs(tmp_path, table, box_lines, NIH_IDS)
    out = tmp_path / "out"
    prepare = lambda target=out, **kw: prepare_nih(images, entry, boxes, target, progress=False, size=64, **kw)
    prepare()
    before = mtimes(out)

    relabelled, reboxed, replaced, removed = NIH_IDS[:4]
    row = table["Image Index"] == f"{relabelled}.png"
    table.loc[row, "Finding Labels"] = table.loc[row, "Finding Labels"].iloc[0] + "|Hernia"
    k = next(k for k, line in enumerate(box_lines) if line.startswith(f"{reboxed}.png,"))
    cells = box_lines[k].split(",")
    cells[2] = str(float(cells[2]) + 64.0)  # the box moves 64 px right: 4 px at 64
    box_lines[k] = ",".join(cells)
    shutil.copyfile(NIH_SAMPLES / "images" / f"{NIH_IDS[4]}.png", images / f"{replaced}.png")
    later(images / f"{replaced}.png")
    (images / f"{removed}.png").unlink()
    shutil.copyfile(NIH_SAMPLES / "images" / f"{NIH_NEW}.png", images / f"{NIH_NEW}.png")
    entry, boxes = write_nih_inputs(tmp_path, table, box_lines, NIH_IDS + [NIH_NEW])
    opened = count_calls(monkeypatch, nih.Image, "open")
    report = prepare()

    assert sorted(p.stem for p in opened if p.parent == images) == sorted([replaced, NIH_NEW])
    assert (report.counts["converted"], report.counts["resumed"]) == (2, 3)
    ids = report_ids(out)
    assert ids["labels_changed"] == sorted([relabelled, reboxed]) and ids["source_changed"] == [replaced]
    assert ids["removed_source_gone"] == [removed] and ids["added"] == [NIH_NEW]
    dataset = PreparedDataset(out)
    assert dataset.label_vector(relabelled)[nih.FINDINGS.index("Hernia")] == 1
    moved = [b for b in read_boxes(out / "boxes.csv") if b.image_id == reboxed]
    old = [b for b in read_boxes(tmp_path / "boxes.csv") if b.image_id == reboxed]
    assert sorted(b.x for b in moved) == pytest.approx(sorted(b.x / 16 for b in old))
    assert removed not in dataset.labels and not (out / "images" / f"{removed}.png").exists()
    after = mtimes(out)
    redone = {f"images/{replaced}.png", f"images/{NIH_NEW}.png"}
    assert set(after) == (set(before) - {f"images/{removed}.png"}) | redone
    for name in set(before) & set(after):
        assert (after[name] == before[name]) == (name not in redone), name

    fresh = tmp_path / "fresh"
    prepare(fresh)
    assert_same_as_fresh(out, fresh)
    assert_rerun_rewrites_nothing(prepare, out)


def test_nih_folder_without_manifest_keeps_its_images(tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    gray = (np.arange(20 * 30).reshape(20, 30) % 256).astype(np.uint8)
    for k in range(3):
        Image.fromarray(gray + k).save(images / f"0000000{k}_000.png")
    rows = "".join(f"0000000{k}_000.png,Mass,0,{k}\n" for k in range(3))
    (tmp_path / "entry.csv").write_text("Image Index,Finding Labels,Follow-up #,Patient ID\n" + rows)
    (tmp_path / "boxes.csv").write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n")
    out = tmp_path / "out"
    prepare = lambda: prepare_nih(images, tmp_path / "entry.csv", tmp_path / "boxes.csv", out, progress=False, size=16)
    prepare()
    (out / MANIFEST_NAME).unlink()
    before, fingerprint = mtimes(out), PreparedDataset(out).fingerprint()
    report = prepare()
    assert report.counts["verified"] == 3 and mtimes(out) == before
    assert PreparedDataset(out).fingerprint() == fingerprint
