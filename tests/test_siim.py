"""SIIM preparation and DICOM reading: the Kaggle samples to the pixel, CSV quirks, bad inputs."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import data.siim as siim
from data.dicom import is_dicom, read_dicom, stretch_to_uint8, write_dicom
from data.errors import DataError
from data.layout import PreparedDataset
from data.prepare_report import PrepareReport
from data.rle import siim_rle_encode
from data.siim import prepare_siim, read_rle_csv, stratified_split

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "samples" / "siim"


def need_samples():
    if not (SAMPLES / "dicom").is_dir():
        pytest.skip(f"SIIM samples not found: {SAMPLES}")


# --------------------------------------------------------------------------------------------
# Synthetic inputs
# --------------------------------------------------------------------------------------------


def make_case(folder: Path, ids_and_masks: dict, size=(32, 24), nested=False, jpeg=False) -> tuple[Path, Path]:
    """DICOMs (one per id, a gradient image) and an RLE CSV with Kaggle's header."""
    dicoms = folder / "dicom"
    lines = ["ImageId, EncodedPixels"]
    for k, (image_id, mask) in enumerate(ids_and_masks.items()):
        target = dicoms / f"study{k}" / "series" if nested else dicoms
        target.mkdir(parents=True, exist_ok=True)
        image = ((np.arange(size[0] * size[1]).reshape(size) * 7 + k) % 256).astype(np.uint8)
        write_dicom(target / f"{image_id}.dcm", image, jpeg=jpeg)
        lines.append(f"{image_id},{siim_rle_encode(mask) if mask is not None else '-1'}")
    csv_path = folder / "train-rle.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    return dicoms, csv_path


def block_mask(size=(32, 24), top=4, left=3, height=6, width=5):
    mask = np.zeros(size, dtype=np.uint8)
    mask[top : top + height, left : left + width] = 1
    return mask


def report_json(out: Path) -> dict:
    return json.loads((out / "prepare_report.json").read_text())


# --------------------------------------------------------------------------------------------
# The Kaggle samples
# --------------------------------------------------------------------------------------------


def test_sample_dicoms_and_csv_prepare_to_the_reference_masks(tmp_path):
    """BOM, no header, CRLF, ' -1': the 10 samples give masks identical to samples/siim/masks."""
    need_samples()
    raw = (SAMPLES / "train-rle-sample.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and b"\r\n" in raw  # the quirks are really there
    report = prepare_siim(SAMPLES / "dicom", SAMPLES / "train-rle-sample.csv", tmp_path / "out", progress=False)
    assert report.ok and report.counts["prepared"] == 10 and report.counts["positive"] == 5
    assert not report.problems
    dataset = PreparedDataset(tmp_path / "out")
    assert dataset.task == "binary" and dataset.classes == ["pneumothorax"]
    for reference in sorted((SAMPLES / "masks").glob("*.png")):
        expected = np.array(Image.open(reference))
        assert set(np.unique(expected)) <= {0, 255}
        prepared = dataset.read_mask(reference.stem)
        assert set(np.unique(prepared)) <= {0, 1}
        assert np.array_equal(prepared, (expected == 255).astype(np.uint8)), reference.name
        assert dataset.label_vector(reference.stem)[0] == float(expected.any())
    image_id = reference.stem
    assert np.array_equal(
        np.array(Image.open(dataset.image_path(image_id))),
        pydicom.dcmread(SAMPLES / "dicom" / f"{image_id}.dcm").pixel_array,
    )
    assert sorted(dataset.split("train") + dataset.split("val")) == sorted(dataset.labels)


def test_full_label_file_with_its_header(tmp_path):
    """Header 'ImageId, EncodedPixels' (.gz): same masks; the other 12,037 ids are counted."""
    need_samples()
    report = prepare_siim(SAMPLES / "dicom", SAMPLES / "train-rle.csv.gz", tmp_path / "out", progress=False)
    assert report.counts["prepared"] == 10 and not report.problems
    assert report.id_counts["labels_without_images"] == 12037
    assert report.id_counts["images_without_labels"] == 0
    for reference in (SAMPLES / "masks").glob("*.png"):
        prepared = np.array(Image.open(tmp_path / "out" / "masks" / reference.name))
        assert np.array_equal(prepared * 255, np.array(Image.open(reference)))


def test_read_dicom_matches_pydicom_on_the_jpeg_samples():
    need_samples()
    path = next((SAMPLES / "dicom").glob("*.dcm"))
    assert is_dicom(path)
    image = read_dicom(path)
    assert image.dtype == np.uint8 and image.shape == (1024, 1024)
    assert np.array_equal(image, pydicom.dcmread(path).pixel_array)


# --------------------------------------------------------------------------------------------
# DICOM conversions
# --------------------------------------------------------------------------------------------


def test_monochrome1_is_inverted(tmp_path):
    image = (np.arange(20 * 30).reshape(20, 30) % 256).astype(np.uint8)
    write_dicom(tmp_path / "m1.dcm", image, photometric="MONOCHROME1")
    assert np.array_equal(read_dicom(tmp_path / "m1.dcm"), 255 - image)


def test_twelve_bit_without_window_is_stretched(tmp_path):
    image = np.linspace(100, 3100, 20 * 30).reshape(20, 30).astype(np.uint16)
    write_dicom(tmp_path / "b12.dcm", image, bits_stored=12)
    result = read_dicom(tmp_path / "b12.dcm")
    expected = np.round((image.astype(float) - 100) * 255 / 3000).astype(np.uint8)
    assert np.array_equal(result, expected)


def test_sixteen_bit_window_is_applied(tmp_path):
    image = np.linspace(0, 60000, 40 * 50).reshape(40, 50).astype(np.uint16)
    write_dicom(tmp_path / "b16.dcm", image, bits_stored=16, window=(30000, 20001))
    result = read_dicom(tmp_path / "b16.dcm")
    assert np.all(result[image <= 20000] == 0) and np.all(result[image >= 40000] == 255)
    middle = (image > 21000) & (image < 39000)
    assert np.all(np.diff(result[middle].astype(int)) >= 0) and 100 < result[image == image[20, 25]][0] < 160


def test_truncated_dicom_is_a_data_error(tmp_path):
    need_samples()
    source = next((SAMPLES / "dicom").glob("*.dcm")).read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(source[: len(source) // 2])
    with pytest.raises(DataError, match="truncated.dcm: the DICOM file is truncated") as error:
        read_dicom(truncated)
    assert "no pixel data" not in str(error.value)


@pytest.mark.parametrize("kind", ["raw", "jpeg", "b12"])
@pytest.mark.parametrize("where", ["pixels", "header value", "element header"])
def test_truncated_dicom_says_truncated_not_no_pixel_data(tmp_path, kind, where):
    """pydicom reads a cut-short file without an error, keeping the elements it found: the
    pixel data cut (encapsulated: it warns; native: a short value), a header element's value
    cut, or the next element's own header cut (dropped silently)."""
    image = (np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint8)
    whole = tmp_path / "whole.dcm"
    if kind == "b12":
        write_dicom(whole, image.astype(np.uint16) * 16, bits_stored=12)
    else:
        write_dicom(whole, image, jpeg=kind == "jpeg")
    raw = whole.read_bytes()
    dataset = pydicom.dcmread(whole)
    pixels_at = dataset.get_item("PixelData").value_tell
    uid = dataset.get_item("SOPInstanceUID")
    cut = {
        "pixels": (pixels_at + len(raw)) // 2,
        "header value": uid.value_tell + 3,
        "element header": uid.value_tell + uid.length + 3,
    }[where]
    path = tmp_path / "cut.dcm"
    path.write_bytes(raw[:cut])
    with pytest.raises(DataError, match="cut.dcm: the DICOM file is truncated") as error:
        read_dicom(path)
    assert "no pixel data" not in str(error.value)


def test_dicom_without_pixel_data_is_a_data_error(tmp_path):
    path = tmp_path / "nopixels.dcm"
    write_dicom(path, np.zeros((4, 4), np.uint8))
    dataset = pydicom.dcmread(path)
    del dataset.PixelData
    dataset.save_as(path)
    with pytest.raises(DataError, match="no pixel data"):
        read_dicom(path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=600), with_magic=st.booleans())
def test_random_bytes_as_dicom_give_a_data_error(tmp_path, body, with_magic):
    path = tmp_path / "random.dcm"
    path.write_bytes((b"\0" * 128 + b"DICM" if with_magic else b"") + body)
    with pytest.raises(DataError, match="random.dcm"):
        read_dicom(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cut=st.integers(0, 10_000),
    flips=st.lists(st.tuples(st.integers(128, 10_000), st.integers(0, 255)), max_size=6),
    kind=st.sampled_from(["raw", "jpeg", "window"]),
)
def test_damaged_dicoms_read_or_give_a_data_error(tmp_path, cut, flips, kind):
    """A valid file, truncated and with bytes overwritten: an image or a DataError, nothing else."""
    source = tmp_path / f"{kind}.dcm"
    if not source.exists():
        image = (np.arange(16 * 16).reshape(16, 16) % 256).astype(np.uint8)
        if kind == "window":
            write_dicom(source, image.astype(np.uint16) * 16, bits_stored=12, window=(2000, 1000))
        else:
            write_dicom(source, image, jpeg=kind == "jpeg")
    damaged = bytearray(source.read_bytes())
    for position, value in flips:
        damaged[position % len(damaged)] = value
    damaged = damaged[: max(132, len(damaged) - cut % len(damaged))]
    path = tmp_path / "damaged.dcm"
    path.write_bytes(bytes(damaged))
    try:
        image = read_dicom(path)
    except DataError as error:
        assert str(path) in str(error)
    else:
        assert image.dtype == np.uint8 and image.ndim == 2


# --------------------------------------------------------------------------------------------
# The label CSV
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"ImageId, EncodedPixels\na,1 2\nb,-1\na,5 1\n",
        b"ImageId,EncodedPixels\r\na,1 2\r\nb,-1\r\na,5 1\r\n",
        b"\xef\xbb\xbfa, 1 2\r\nb, -1\r\na, 5 1",
        b"EncodedPixels,ImageId\n1 2,a\n-1,b\n5 1,a\n",
        b'"ImageId","EncodedPixels"\n"a","1 2"\n"b","-1"\n\n"a","5 1"\n',
    ],
)
def test_csv_variants_read_alike(tmp_path, content):
    path = tmp_path / "labels.csv"
    path.write_bytes(content)
    report = PrepareReport("siim", tmp_path)
    rows = read_rle_csv(path, report)
    assert not report.problems
    assert sorted(rows) == ["a", "b"]
    assert [r.text.strip() for r in rows["a"]] == ["1 2", "5 1"]
    assert [r.text.strip() for r in rows["b"]] == ["-1"]


@pytest.mark.parametrize("first", [b"img0", b"img0;-1", b"img0,1 2 x 4", b"\xef\xbb\xbfimg0\t-1"])
def test_malformed_first_row_without_header_is_reported(tmp_path, first):
    """Taken as a header (it names no column) but not dropped silently: reported as path:1."""
    path = tmp_path / "labels.csv"
    path.write_bytes(first + b"\r\nimg1,-1\r\nimg2, 5 3\r\n")
    report = PrepareReport("siim", tmp_path)
    rows = read_rle_csv(path, report)
    assert sorted(rows) == ["img1", "img2"]
    assert [p.where for p in report.problems] == [f"{path}:1"]
    assert "first row" in report.problems[0].message and report.counts["bad_rle_rows"] == 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(row=st.binary(max_size=80))
def test_random_bytes_as_csv_row_are_reported_never_a_crash(tmp_path, row):
    case = tmp_path / "case"
    if not case.exists():
        make_case(case, {"image-0001": block_mask()})
    bad = tmp_path / "bad.csv"
    one_line = row.replace(b"\n", b" ").replace(b"\r", b" ")
    bad.write_bytes((case / "train-rle.csv").read_bytes() + one_line + b"\n")
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    report = prepare_siim(case / "dicom", bad, out, size=None, progress=False)
    assert report.ok and report.counts["prepared"] == 1  # the good image survives anything
    assert np.array_equal(np.array(Image.open(out / "masks" / "image-0001.png")), block_mask())
    for problem in report.problems:
        assert problem.where == f"{bad}:3"


# --------------------------------------------------------------------------------------------
# Bad inputs in a preparation
# --------------------------------------------------------------------------------------------


def test_bad_inputs_are_reported_and_skipped(tmp_path):
    masks = {"good": block_mask(), "odd": None, "overflow": None, "trunc": None, "nopix": None, "neg": None}
    dicoms, csv_path = make_case(tmp_path, masks, nested=True)
    lines = csv_path.read_text().splitlines()
    lines[2] = "odd,1 2 3"  # line 3
    lines[3] = "overflow,700 100"  # line 4: 32*24 = 768 pixels
    lines.append("good,-1")  # line 8: a second row for "good", a union
    lines.append("ghost,-1")  # line 9: a label without an image
    csv_path.write_text("\n".join(lines) + "\n")
    truncated = next(dicoms.rglob("trunc.dcm"))
    truncated.write_bytes(truncated.read_bytes()[:200])
    no_pixels = next(dicoms.rglob("nopix.dcm"))
    dataset = pydicom.dcmread(no_pixels)
    del dataset.PixelData
    dataset.save_as(no_pixels)
    duplicate = dicoms / "elsewhere" / "good.dcm"  # a second file with the same id
    duplicate.parent.mkdir()
    shutil.copy(next(dicoms.rglob("good.dcm")), duplicate)
    (dicoms / "unlabelled.dcm").write_bytes(duplicate.read_bytes())

    report = prepare_siim(dicoms, csv_path, tmp_path / "out", size=16, val_fraction=0.0, progress=False)
    saved = report_json(tmp_path / "out")
    wheres = {p["where"]: p["message"] for p in saved["problems"]}
    assert report.counts["prepared"] == 2  # good and neg
    assert "odd number" in wheres[f"{csv_path}:3"]
    assert "beyond" in wheres[f"{csv_path}:4"]
    assert "is truncated" in wheres[str(truncated)] and str(no_pixels) in wheres
    assert "no pixel data" in wheres[str(no_pixels)]
    duplicates = [w for w, m in wheres.items() if "duplicate image id 'good'" in m]
    assert len(duplicates) == 1 and Path(duplicates[0]).name == "good.dcm"
    assert saved["ids"]["labels_without_images"] == ["ghost"]
    assert saved["ids"]["images_without_labels"] == ["unlabelled"]
    prepared = PreparedDataset(tmp_path / "out")
    assert sorted(prepared.labels) == ["good", "neg"]
    assert prepared.label_vector("good")[0] == 1 and prepared.label_vector("neg")[0] == 0
    assert prepared.read_mask("good").shape == (16, 16)
    assert set(np.unique(prepared.read_mask("good"))) == {0, 1}  # nearest neighbour only


def test_nothing_usable_raises_after_writing_the_report(tmp_path):
    dicoms, csv_path = make_case(tmp_path, {"a": block_mask()})
    csv_path.write_text("ImageId, EncodedPixels\na,1 2 3\n")
    with pytest.raises(
        DataError, match="every one of the 1 matched images failed, e.g. .*:2: a: .*prepare_report.json"
    ):
        prepare_siim(dicoms, csv_path, tmp_path / "out", progress=False)
    assert report_json(tmp_path / "out")["ok"] is False
    assert not (tmp_path / "out" / "dataset.json").exists()
    with pytest.raises(DataError, match="prepare_report.json"):
        prepare_siim(dicoms, csv_path, tmp_path / "out", size=16, progress=False)
    csv_path.write_text("ImageId, EncodedPixels\na,-1\n")  # mended: a run that prepared nothing binds no --size
    assert prepare_siim(dicoms, csv_path, tmp_path / "out", size=8, progress=False).ok


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", r".*/labels.csv holds no label rows"),
        (b"ImageId, EncodedPixels\n", r".*/labels.csv holds no label rows"),
        (b"\xef\xbb\xbfImageId, EncodedPixels\r\n\r\n", r".*/labels.csv holds no label rows"),
        (b"ImageId, EncodedPixels\n,-1\n", r".*/labels.csv holds no label rows \(1 unusable, see problems\)"),
        (
            b"ImageId, EncodedPixels\nx1,-1\nx2,-1\nx3,-1\nx4,-1\n",
            r"no ImageId of .*labels.csv matched a DICOM file name under .*dicom \(ImageIds: 'x1', 'x2', 'x3', "
            r"\.\.\. \(4 in all\); DICOM files: 'a', 'b'\)",
        ),
    ],
)
def test_nothing_prepared_says_why_in_its_line(tmp_path, content, reason):
    """No rows, or no id matching a DICOM, leave no problem to point at: the line says it."""
    dicoms, _ = make_case(tmp_path, {"a": None, "b": None})
    labels = tmp_path / "labels.csv"
    labels.write_bytes(content)
    with pytest.raises(DataError, match=f"^no SIIM image could be prepared: {reason}; see .*prepare_report.json$"):
        prepare_siim(dicoms, labels, tmp_path / "out", progress=False)
    assert re.fullmatch(reason, report_json(tmp_path / "out")["error"])


def test_no_dicom_at_all_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    _, csv_path = make_case(tmp_path, {"a": None})
    with pytest.raises(DataError, match=f"no DICOM file found under {tmp_path / 'empty'}; see"):
        prepare_siim(tmp_path / "empty", csv_path, tmp_path / "out", progress=False)


@pytest.mark.parametrize("row", [b",-1", b", 1 2", b",", b'" ",""', b" , ", b",,"])
def test_rows_with_an_empty_image_id_are_reported(tmp_path, row):
    path = tmp_path / "labels.csv"
    path.write_bytes(b"ImageId, EncodedPixels\na,-1\n" + row + b"\n\nb,-1\n")
    report = PrepareReport("siim", tmp_path)
    assert sorted(read_rle_csv(path, report)) == ["a", "b"]
    assert [(p.where, p.message) for p in report.problems] == [(f"{path}:3", "empty ImageId")]


def test_minus_one_next_to_a_mask_is_reported_and_the_mask_kept(tmp_path):
    dicoms, csv_path = make_case(tmp_path, {"a": block_mask(), "b": None})
    csv_path.write_text(csv_path.read_text() + "a,-1\n")  # line 4 contradicts line 2
    report = prepare_siim(dicoms, csv_path, tmp_path / "out", size=None, progress=False)
    assert [p.where for p in report.problems] == [f"{csv_path}:4"]
    assert "a is listed as -1" in report.problems[0].message and "line 2" in report.problems[0].message
    assert report.counts["conflicting_labels"] == 1 and report.counts["prepared"] == 2
    dataset = PreparedDataset(tmp_path / "out")
    assert dataset.label_vector("a")[0] == 1 and np.array_equal(dataset.read_mask("a"), block_mask())
    assert report_json(tmp_path / "out")["problems"][0]["where"] == f"{csv_path}:4"


def test_missing_inputs_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="DICOM directory"):
        prepare_siim(tmp_path / "nope", tmp_path / "x.csv", tmp_path / "out", progress=False)
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="label file"):
        prepare_siim(tmp_path / "d", tmp_path / "x.csv", tmp_path / "out", progress=False)


# --------------------------------------------------------------------------------------------
# Resizing, resuming, workers, splits
# --------------------------------------------------------------------------------------------


def test_resize_uses_nearest_for_masks_and_keeps_labels(tmp_path):
    tiny = np.zeros((32, 24), np.uint8)
    tiny[5, 5] = 1  # one pixel: may vanish at 8x8, the label must not
    dicoms, csv_path = make_case(tmp_path, {"big": block_mask(height=20, width=12), "tiny": tiny})
    prepare_siim(dicoms, csv_path, tmp_path / "out", size=8, progress=False)
    dataset = PreparedDataset(tmp_path / "out")
    big = dataset.read_mask("big")
    expected = np.array(Image.fromarray(block_mask(height=20, width=12)).resize((8, 8), Image.NEAREST))
    assert np.array_equal(big, expected)
    assert dataset.read_image("big").shape == (8, 8, 3)
    assert dataset.label_vector("tiny")[0] == 1


def test_rerun_resumes_and_redoes_wrong_size_outputs(tmp_path, monkeypatch):
    dicoms, csv_path = make_case(tmp_path, {"a": block_mask(), "b": None, "c": block_mask(top=10)})
    out = tmp_path / "out"
    first = prepare_siim(dicoms, csv_path, out, size=16, progress=False)
    assert first.counts["converted"] == 3
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(out / "masks" / "c.png")  # wrong size
    calls = []
    original = siim.read_dicom
    monkeypatch.setattr(siim, "read_dicom", lambda path: calls.append(path) or original(path))
    second = prepare_siim(dicoms, csv_path, out, size=16, progress=False)
    assert second.counts["resumed"] == 2 and second.counts["converted"] == 1
    assert [Path(p).stem for p in calls] == ["c"]
    assert Image.open(out / "masks" / "c.png").size == (16, 16)
    assert (out / "labels.csv").read_text() == "image_id,pneumothorax\na,1\nb,0\nc,1\n"


def test_workers_give_the_same_result(tmp_path):
    masks = {f"id{k:02d}": (block_mask(top=k % 20) if k % 3 else None) for k in range(12)}
    dicoms, csv_path = make_case(tmp_path, masks, jpeg=True)
    one = prepare_siim(dicoms, csv_path, tmp_path / "one", workers=1, progress=False)
    two = prepare_siim(dicoms, csv_path, tmp_path / "two", workers=2, progress=False)
    assert one.counts == two.counts
    for sub in ["labels.csv", "splits/train.txt", "splits/val.txt"]:
        assert (tmp_path / "one" / sub).read_text() == (tmp_path / "two" / sub).read_text()
    for image_id in masks:
        for sub in ["images", "masks"]:
            a = np.array(Image.open(tmp_path / "one" / sub / f"{image_id}.png"))
            b = np.array(Image.open(tmp_path / "two" / sub / f"{image_id}.png"))
            assert np.array_equal(a, b)


def test_stratified_split_is_deterministic_and_stratified():
    labels = {f"p{k:03d}": [1] for k in range(40)} | {f"n{k:03d}": [0] for k in range(160)}
    train, val = stratified_split(labels, 0.1, seed=3)
    assert (train, val) == stratified_split(labels, 0.1, seed=3)
    assert stratified_split(labels, 0.1, seed=4)[1] != val
    assert sum(i.startswith("p") for i in val) == 4 and sum(i.startswith("n") for i in val) == 16
    assert sorted(train + val) == sorted(labels) and not set(train) & set(val)


def test_corrupt_gzip_label_file_is_a_data_error(tmp_path):
    path = tmp_path / "labels.csv.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    with pytest.raises(DataError, match="labels.csv.gz"):
        read_rle_csv(path, PrepareReport("siim", tmp_path))


def test_rerun_with_another_size_is_refused_naming_both(tmp_path):
    dicoms, csv_path = make_case(tmp_path, {"a": block_mask(), "b": None})
    out = tmp_path / "out"
    prepare_siim(dicoms, csv_path, out, size=16, progress=False)
    for other, shown in [(None, 0), (8, 8)]:
        with pytest.raises(DataError, match=f"--size 16, this run asks for --size {shown} .*fresh --out"):
            prepare_siim(dicoms, csv_path, out, size=other, progress=False)
    assert Image.open(out / "images" / "a.png").size == (16, 16)
    assert prepare_siim(dicoms, csv_path, out, size=16, progress=False).counts["resumed"] == 2


def test_native_size_outputs_are_not_resumed_at_a_fixed_size(tmp_path):
    dicoms, csv_path = make_case(tmp_path, {"a": block_mask()}, size=(16, 16))
    out = tmp_path / "out"
    prepare_siim(dicoms, csv_path, out, size=None, progress=False)  # native 16x16
    with pytest.raises(DataError, match="--size 0, this run asks for --size 16"):
        prepare_siim(dicoms, csv_path, out, size=16, progress=False)


def test_truncated_output_png_is_redone(tmp_path):
    dicoms, csv_path = make_case(tmp_path, {"a": block_mask(), "b": None})
    out = tmp_path / "out"
    prepare_siim(dicoms, csv_path, out, size=16, progress=False)
    image = out / "images" / "a.png"
    expected = np.array(Image.open(image))
    image.write_bytes(image.read_bytes()[:60])  # the header still opens, the pixels are cut
    with Image.open(image) as header_only:
        assert header_only.size == (16, 16)
    second = prepare_siim(dicoms, csv_path, out, size=16, progress=False)
    assert second.counts["converted"] == 1 and second.counts["resumed"] == 1
    assert np.array_equal(np.array(Image.open(image)), expected)


def test_val_fraction_zero_removes_an_old_val_split(tmp_path):
    dicoms, csv_path = make_case(tmp_path, {f"i{k}": (block_mask() if k % 2 else None) for k in range(6)})
    out = tmp_path / "out"
    prepare_siim(dicoms, csv_path, out, size=16, val_fraction=0.4, progress=False)
    assert (out / "splits" / "val.txt").is_file()
    prepare_siim(dicoms, csv_path, out, size=16, val_fraction=0.0, progress=False)
    assert not (out / "splits" / "val.txt").exists()
    assert len(PreparedDataset(out).split("train")) == 6


def test_out_below_a_regular_file_is_a_one_line_cli_error(cli, tmp_path):
    dicoms, csv_path = make_case(tmp_path, {"a": block_mask()})
    (tmp_path / "file").write_text("x")
    result = cli("prepare", "siim", "--dicom-dir", dicoms, "--rle-csv", csv_path, "--out", tmp_path / "file" / "out")
    assert result.exit_code == 2, result.exception  # a user error, not an uncaught exception
    assert f"error: cannot create the output folder {tmp_path / 'file' / 'out'}" in result.output


def test_eight_bit_with_identity_rescale_keeps_its_values(tmp_path):
    image = np.linspace(50, 200, 20 * 30).reshape(20, 30).astype(np.uint8)
    write_dicom(tmp_path / "plain.dcm", image)
    dataset = pydicom.dcmread(tmp_path / "plain.dcm")
    dataset.RescaleSlope, dataset.RescaleIntercept = 1, 0
    dataset.save_as(tmp_path / "rescale.dcm")
    assert np.array_equal(read_dicom(tmp_path / "rescale.dcm"), image)


@pytest.mark.parametrize("empty", [None, ""])
def test_empty_window_tags_count_as_no_window(tmp_path, empty):
    image = np.linspace(50, 200, 20 * 30).reshape(20, 30).astype(np.uint8)
    write_dicom(tmp_path / "plain.dcm", image)
    dataset = pydicom.dcmread(tmp_path / "plain.dcm")
    dataset.WindowCenter, dataset.WindowWidth = empty, empty
    dataset.save_as(tmp_path / "window.dcm")
    assert np.array_equal(read_dicom(tmp_path / "window.dcm"), image)


@pytest.mark.parametrize("slope, intercept", [("", -1024), (2, ""), ("", "")])
def test_empty_rescale_tags_count_as_defaults(tmp_path, slope, intercept):
    image = np.linspace(50, 200, 20 * 30).reshape(20, 30).astype(np.uint8)
    write_dicom(tmp_path / "plain.dcm", image)
    dataset = pydicom.dcmread(tmp_path / "plain.dcm")
    dataset.RescaleSlope, dataset.RescaleIntercept = slope, intercept
    dataset.save_as(tmp_path / "rescale.dcm")
    written = pydicom.dcmread(tmp_path / "rescale.dcm")
    assert "RescaleSlope" in written and "RescaleIntercept" in written  # present, maybe empty (None)
    identity = slope == "" and intercept == ""
    expected = image if identity else stretch_to_uint8(image)  # a real rescale is stretched
    assert np.array_equal(read_dicom(tmp_path / "rescale.dcm"), expected)


def test_gray_rgb_dicom_keeps_its_values(tmp_path):
    """Luminance of (v, v, v) is v: rounded, not truncated to v - 1 by float error."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import SecondaryCaptureImageStorage

    levels = np.tile(np.arange(256, dtype=np.uint8), (2, 1))
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.set_pixel_data(np.stack([levels] * 3, axis=-1), "RGB", 8, generate_instance_uid=True)
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.save_as(tmp_path / "rgb.dcm", enforce_file_format=True)
    assert np.array_equal(read_dicom(tmp_path / "rgb.dcm"), levels)


def test_cli_exit_code_says_whether_anything_usable_was_prepared(cli, tmp_path):
    """Some bad rows: reported, exit 0; nothing usable: non-zero, the report still written."""
    dicoms, csv_path = make_case(tmp_path, {"good": block_mask(), "odd": None})
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join([line if not line.startswith("odd,") else "odd,1 2 3" for line in lines]) + "\n")
    partly = cli(
        "prepare", "siim", "--dicom-dir", dicoms, "--rle-csv", csv_path, "--out", tmp_path / "out", "--size", "32"
    )
    assert partly.exit_code == 0, partly.output
    report = report_json(tmp_path / "out")
    assert report["ok"] is True and f"{csv_path.name}:" in json.dumps(report["problems"])
    csv_path.write_text("ImageId, EncodedPixels\ngood,1 2 3\nodd,1 2 3\n")
    nothing = cli(
        "prepare", "siim", "--dicom-dir", dicoms, "--rle-csv", csv_path, "--out", tmp_path / "none", "--size", "32"
    )
    assert nothing.exit_code == 2 and "error: no SIIM image could be prepared" in nothing.output
    assert report_json(tmp_path / "none")["ok"] is False


def test_a_header_element_that_fails_to_convert_is_left_to_the_pixel_decoder(tmp_path):
    """pydicom converts elements lazily and raises any type for a damaged one (NotImplementedError
    for an unknown value representation, found by hypothesis): the size check before decoding
    must not let it escape as a traceback."""
    from data.dicom import _check_size

    class Damaged:
        def get(self, name, default=None):
            raise NotImplementedError("Unknown Value Representation 'xx' in tag (0028,0008)")

    assert _check_size(Damaged(), tmp_path / "x.dcm", None, "") is None
