"""`wss prepare folder`: a user's folder of images + label CSV -> the prepared layout.

Known answers on generated folders (nested ids, PNG / JPEG / 16-bit TIFF / DICOM, long and wide
CSVs, CheXpert's -1 and blanks, masks in both conventions), every bad input listed and left out
while the rest is prepared, and reruns that redo exactly what changed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import data.folder as folder_module
from data.dicom import read_dicom, stretch_to_uint8, write_dicom
from data.errors import DataError
from data.folder import prepare_folder, split_names, stratified_split, target_size
from data.layout import PreparedDataset, decode_id, encode_id
from data.prepare_manifest import MANIFEST_NAME
from data.synthetic import SyntheticSpec, generate_image
from tests.test_prepare_inputs import assert_rerun_rewrites_nothing, assert_same_as_fresh, later, mtimes

MULTI = ["ring", "cross", "square"]


# --------------------------------------------------------------------------------------------
# A user's folder, generated
# --------------------------------------------------------------------------------------------


def user_path(k: int) -> str:
    """Nested relative paths (no suffix); ids 0 and 1 share their file name in two folders."""
    if k < 2:
        return f"site{k}/img"
    return f"site{k % 3}/patient{k % 4}/scan{k}"


def make_user_folder(
    root: Path,
    n: int = 12,
    size: int = 48,
    variant: str = "multiclass",
    masks: bool = True,
    layout: str = "long",
    formats: bool = True,
    seed: int = 0,
) -> dict:
    """A folder as users have them: images/<nested>/<name>.<png|tif|dcm>, a label CSV, masks/.
    Image 2 is a 16-bit TIFF, image 3 a DICOM, image 4 a DICOM named by a UID without suffix
    (with ``formats``). Returns {relative id: (8-bit pixels, mask, label)} and the paths."""
    spec = SyntheticSpec(n=n, size=size, seed=seed, variant=variant)
    classes = spec.classes
    images, mask_dir = root / "images", root / "masks"
    truth = {}
    for k in range(n):
        pixels, mask, label = generate_image(spec, k)
        rel = user_path(k)
        if formats and k == 4:
            rel = f"site1/1.2.840.{k}"
        target = images / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if formats and k == 2:
            deep = pixels.astype(np.uint16) * 257 + 3
            Image.fromarray(deep).save(target.with_suffix(".tif"))
            pixels = stretch_to_uint8(deep)
        elif formats and k == 3:
            write_dicom(target.with_suffix(".dcm"), pixels)
        elif formats and k == 4:
            write_dicom(target, pixels)
        else:
            Image.fromarray(pixels).save(target.with_suffix(".png"))
        if masks:
            (mask_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            stored = mask * 255 if variant == "binary" else mask
            Image.fromarray(stored.astype(np.uint8)).save(mask_dir / f"{rel}.png")
        truth[rel] = (pixels, mask, label.astype(int))
    csv_path = root / "labels.csv"
    if layout == "long":
        lines = ["image,labels"] + [
            f"{rel},{'|'.join(c for c, v in zip(classes, label) if v)}" for rel, (_, _, label) in truth.items()
        ]
    else:
        lines = ["Path,Sex," + ",".join(classes)] + [
            f"{rel},F," + ",".join(str(v) for v in label) for rel, (_, _, label) in truth.items()
        ]
    csv_path.write_text("\n".join(lines) + "\n")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")  # the masks' index order
    return {
        "truth": truth,
        "images": images,
        "masks": mask_dir if masks else None,
        "csv": csv_path,
        "classes": classes,
        "classes_file": root / "classes.txt",
    }


def prepare(case: dict, out: Path, **kw):
    """prepare_folder on a generated case, with its classes file (the long layout would sort the
    names, and the masks index them in the generator's order)."""
    kw.setdefault("masks_dir", case["masks"])
    kw.setdefault("classes_file", case["classes_file"])
    kw.setdefault("progress", False)
    return prepare_folder(case["images"], case["csv"], out, **kw)


def problems(report) -> list[str]:
    return [f"{p.where}: {p.message}" for p in report.problems]


# --------------------------------------------------------------------------------------------
# Ids
# --------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.text(alphabet=st.sampled_from("ab/%\\_2F5C."), min_size=1, max_size=8), min_size=2, max_size=6, unique=True
    )
)
def test_nested_ids_become_flat_reversible_names_without_collisions(paths):
    ids = [encode_id(p) for p in paths]
    assert len(set(ids)) == len(paths)  # no two paths share an id
    assert all("/" not in i and "\\" not in i for i in ids)  # every id is one file name
    assert [decode_id(i) for i in ids] == paths  # and says which path it came from


def test_plain_names_are_their_own_ids():
    assert encode_id("2007_000032") == "2007_000032" and encode_id("a/b c") == "a%2Fb c"


# --------------------------------------------------------------------------------------------
# Preparing
# --------------------------------------------------------------------------------------------


def test_a_nested_multiclass_folder_with_every_format_is_prepared_exactly(tmp_path):
    case = make_user_folder(tmp_path, n=12)
    report = prepare(case, tmp_path / "out", val_fraction=0.25, seed=3)
    assert report.ok and report.counts["prepared"] == 12 and not report.problems
    dataset = PreparedDataset(tmp_path / "out")
    assert dataset.task == "multiclass" and dataset.classes == MULTI and dataset.name == "out"
    expected_ids = {encode_id(rel) for rel in case["truth"]}
    assert set(dataset.labels) == expected_ids and "site0%2Fimg" in expected_ids and "site1%2Fimg" in expected_ids
    for rel, (pixels, mask, label) in case["truth"].items():
        image_id = encode_id(rel)
        assert np.array_equal(dataset.read_image(image_id)[:, :, 0], pixels), rel
        assert np.array_equal(dataset.read_mask(image_id), mask), rel
        assert dataset.label_vector(image_id).tolist() == label.tolist(), rel
    train, val = dataset.split("train"), dataset.split("val")
    assert sorted(train + val) == sorted(expected_ids) and len(val) == 3
    assert report.counts["with_mask"] == 12 and not report.id_counts.get("mask_disagrees_with_labels")
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["image_ext"] == ".png"


def test_the_grayscale_dicom_and_16_bit_tiff_keep_their_pixels(tmp_path):
    case = make_user_folder(tmp_path, n=5)
    prepare(case, tmp_path / "out")
    dataset = PreparedDataset(tmp_path / "out")
    with Image.open(tmp_path / "out" / "images" / f"{encode_id(user_path(3))}.png") as im:
        assert im.mode == "L"  # gray stays gray
    assert np.array_equal(
        dataset.read_image(encode_id(user_path(3)))[:, :, 0], read_dicom(case["images"] / f"{user_path(3)}.dcm")
    )
    assert np.array_equal(
        dataset.read_image("site1%2F1.2.840.4")[:, :, 0], read_dicom(case["images"] / "site1/1.2.840.4")
    )  # a DICOM named by a UID


def test_a_one_class_folder_is_the_binary_task_with_0_255_masks(tmp_path):
    case = make_user_folder(tmp_path, n=10, variant="binary", layout="wide")
    report = prepare(case, tmp_path / "out")
    dataset = PreparedDataset(tmp_path / "out")
    assert dataset.task == "binary" and dataset.classes == ["finding"]
    assert report.id_lists["ignored_columns"] == ["Sex"]
    for rel, (_, mask, label) in case["truth"].items():
        assert np.array_equal(dataset.read_mask(encode_id(rel)), mask)  # 255 read as the class
        assert dataset.label_vector(encode_id(rel))[0] == label[0]
    assert 0 < report.counts["positive/finding"] < 10


def test_chexpert_wide_layout_uncertain_and_blank_policies(tmp_path):
    images = tmp_path / "images" / "patient1" / "study1"
    images.mkdir(parents=True)
    for view in ["view1_frontal", "view2_lateral"]:
        Image.fromarray(np.full((16, 20), 100, np.uint8)).save(images / f"{view}.jpg")
    (tmp_path / "images" / "patient2").mkdir()
    Image.fromarray(np.full((16, 20), 50, np.uint8)).save(tmp_path / "images" / "patient2" / "view1_frontal.jpg")
    csv_path = tmp_path / "train.csv"
    csv_path.write_text(
        "Path,Sex,Age,Frontal/Lateral,Edema,Pleural Effusion,Cardiomegaly\n"
        "patient1/study1/view1_frontal.jpg,Male,68,Frontal,1.0,-1.0,\n"
        "patient1/study1/view2_lateral.jpg,Male,68,Lateral,0.0,,1.0\n"
        "patient2/view1_frontal.jpg,Female,41,Frontal,-1.0,1.0,0.0\n"
    )
    run = lambda out, **kw: prepare_folder(tmp_path / "images", csv_path, tmp_path / out, progress=False, **kw)
    report = run("ignore")
    classes = ["Edema", "Pleural Effusion", "Cardiomegaly"]
    dataset = PreparedDataset(tmp_path / "ignore")
    assert dataset.classes == classes and report.id_lists["ignored_columns"] == ["Age", "Frontal/Lateral", "Sex"]
    a, b, c = "patient1%2Fstudy1%2Fview1_frontal", "patient1%2Fstudy1%2Fview2_lateral", "patient2%2Fview1_frontal"
    assert dataset.label_vector(a).tolist() == [1, 0, 0] and dataset.training_label_vector(a).tolist() == [1, -1, 0]
    assert dataset.label_vector(b).tolist() == [0, 0, 1] and not dataset.has_uncertain(b)  # blank: negative
    assert dataset.training_label_vector(c).tolist() == [-1, 1, 0]
    assert report.id_lists["images_with_uncertain_labels"] == [a, c]
    assert (tmp_path / "ignore" / "uncertain.csv").read_text().splitlines()[0] == "image_id," + ",".join(classes)

    run("positive", uncertain="positive")
    positive = PreparedDataset(tmp_path / "positive")
    assert positive.label_vector(a).tolist() == [1, 1, 0] and not positive.uncertain
    assert not (tmp_path / "positive" / "uncertain.csv").exists()
    run("negative", uncertain="negative")
    assert PreparedDataset(tmp_path / "negative").label_vector(c).tolist() == [0, 1, 0]
    run("blank", blank="uncertain")
    assert PreparedDataset(tmp_path / "blank").training_label_vector(b).tolist() == [0, -1, 1]


def test_classes_file_sets_the_order_and_picks_the_wide_columns(tmp_path):
    case = make_user_folder(tmp_path, n=6, layout="wide", formats=False, masks=False)
    (tmp_path / "classes.txt").write_text("# my order\nsquare\n\nring\n")
    report = prepare(case, tmp_path / "out", classes_file=tmp_path / "classes.txt")
    dataset = PreparedDataset(tmp_path / "out")
    assert dataset.classes == ["square", "ring"] and sorted(report.id_lists["ignored_columns"]) == ["Sex", "cross"]
    for rel, (_, _, label) in case["truth"].items():
        assert dataset.label_vector(encode_id(rel)).tolist() == [label[2], label[0]]
    (tmp_path / "classes.txt").write_text("ring\nstar\n")
    with pytest.raises(DataError, match="no column for class 'star'"):
        prepare(case, tmp_path / "out2", classes_file=tmp_path / "classes.txt")


def test_long_layout_classes_default_to_the_sorted_names(tmp_path):
    case = make_user_folder(tmp_path, n=6, formats=False, masks=False)
    prepare(case, tmp_path / "out", classes_file=None)
    dataset = PreparedDataset(tmp_path / "out")
    assert dataset.classes == sorted(MULTI)
    for rel, (_, _, label) in case["truth"].items():
        assert dataset.label_vector(encode_id(rel)).tolist() == [label[MULTI.index(c)] for c in sorted(MULTI)]


def test_an_image_label_csv_of_zeros_and_ones_is_one_class(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ["a", "b", "c"]:
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(images / f"{name}.png")
    (tmp_path / "l.csv").write_text("filename,label\na.png,1\nb.png,0\nc.png,\n")
    prepare_folder(images, tmp_path / "l.csv", tmp_path / "out", progress=False)
    dataset = PreparedDataset(tmp_path / "out")
    assert dataset.task == "binary" and dataset.classes == ["label"]
    assert [dataset.label_vector(i)[0] for i in "abc"] == [1, 0, 0]
    (tmp_path / "l.csv").write_text("filename,label\na.png,cat\nb.png,1\nc.png,\n")  # names: the long layout
    prepare_folder(images, tmp_path / "l.csv", tmp_path / "out2", progress=False)
    assert PreparedDataset(tmp_path / "out2").classes == ["1", "cat"]


def test_long_layout_separators():
    assert split_names("cat|dog") == ["cat", "dog"] and split_names("cat; dog ;") == ["cat", "dog"]
    assert split_names("cat dog") == ["cat", "dog"] and split_names("Pleural Effusion|Edema") == [
        "Pleural Effusion",
        "Edema",
    ]
    assert split_names("") == [] and split_names("  ") == []


def test_bad_rows_and_files_are_listed_and_left_out_and_the_rest_prepared(tmp_path):
    case = make_user_folder(tmp_path, n=10, formats=False, masks=False)
    images = case["images"]
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(images / "site2" / "twin.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(images / "site2" / "twin.jpg")  # same id: both out
    (images / "site2" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (images / "notes.txt").write_text("not an image")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(images / "unlisted.png")
    rows = case["csv"].read_text().splitlines()
    rows += [
        "site2/broken.png,ring",  # a file that does not decode: failed
        "site2/twin,ring",  # names the ambiguous id: matches nothing
        "nowhere/image.png,ring",  # no such image
        f"{user_path(5)},ring|circle",  # unknown class: this row out (the other kept)
        f"{user_path(6)}.png,{rows[7].split(',')[1]}",  # duplicate, same labels: fine
        f"{user_path(7)},",  # duplicate with other labels: image out
        ",ring",  # no image named
        f"{user_path(8)},ring,extra",
    ]  # too many fields: this row out
    case["csv"].write_text("\n".join(rows) + "\n")
    (tmp_path / "classes.txt").write_text("ring\ncross\nsquare\n")
    report = prepare(case, tmp_path / "out", classes_file=tmp_path / "classes.txt")
    lines = problems(report)
    csv_name = str(case["csv"])
    assert any(line.startswith(f"{csv_name}:{len(rows) - 4}:") and "unknown class 'circle'" in line for line in lines)
    assert any(
        line.startswith(f"{csv_name}:{len(rows) - 2}:") and "also on line 9 with other labels" in line for line in lines
    )
    assert any(line.startswith(f"{csv_name}:{len(rows) - 1}:") and "no image named" in line for line in lines)
    assert any(line.startswith(f"{csv_name}:{len(rows)}:") and "expected 2 fields" in line for line in lines)
    assert sum("give the id 'site2/twin'" in line for line in lines) == 2
    assert any(line.startswith(str(images / "site2" / "broken.png")) for line in lines)
    assert report.id_lists["labels_without_images"] == ["nowhere/image.png", "site2/twin"]
    assert report.id_lists["conflicting_rows"] == [encode_id(user_path(7))]
    assert report.id_lists["images_without_labels"] == ["unlisted"]
    assert report.counts["duplicate_rows"] == 1 and report.counts["image_other_files"] == 1
    dataset = PreparedDataset(tmp_path / "out")
    expected = {encode_id(user_path(k)) for k in range(10) if k != 7}
    assert set(dataset.labels) == expected and report.counts["prepared"] == 9 and report.counts["failed"] == 1
    assert report.counts["bad_label_rows"] == 3


def test_masks_are_checked_and_a_bad_one_costs_only_itself(tmp_path):
    case = make_user_folder(tmp_path, n=6, formats=False)
    masks = case["masks"]
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks / f"{user_path(2)}.png")  # another size
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(masks / f"{user_path(3)}.png")  # RGB
    Image.fromarray(np.full((48, 48), 9, np.uint8)).save(masks / f"{user_path(4)}.png")  # index 9
    wrong = np.zeros((48, 48), np.uint8)
    wrong[:10, :10] = 3
    Image.fromarray(wrong).save(masks / f"{user_path(5)}.png")  # shows a square
    rows = [
        f"{user_path(5)},ring" if r.startswith(f"{user_path(5)},") else r for r in case["csv"].read_text().splitlines()
    ]  # labelled ring
    case["csv"].write_text("\n".join(rows) + "\n")
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(masks / "orphan.png")
    report = prepare(case, tmp_path / "out")
    lines = problems(report)
    assert any("mask is 10x10 but its image is 48x48: mask left out, image kept" in line for line in lines)
    assert any("a RGB image, not class indices" in line for line in lines)
    assert any("class index 9 is not 0-3 or 255" in line for line in lines)
    dataset = PreparedDataset(tmp_path / "out")
    assert report.counts["prepared"] == 6 and report.counts["with_mask"] == 3
    assert not any(dataset.has_mask(encode_id(user_path(k))) for k in (2, 3, 4))
    assert report.id_lists["masks_without_images"] == ["orphan"]
    assert report.id_lists["mask_disagrees_with_labels"] == [encode_id(user_path(5))]


def test_splits_folder_names_images_as_the_csv_does(tmp_path):
    case = make_user_folder(tmp_path, n=6, formats=False, masks=False)
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "train.txt").write_text(f"{user_path(2)}\n{user_path(3)}.png\n\n{user_path(4)}\n")
    (splits / "test.txt").write_text(f"{encode_id(user_path(5))}\nghost\n")
    out = tmp_path / "out"
    prepare(case, out)  # first the default train / val
    report = prepare(case, out, splits_dir=splits)
    dataset = PreparedDataset(out)
    assert dataset.split("train") == [encode_id(user_path(k)) for k in (2, 3, 4)]
    assert dataset.split("test") == [encode_id(user_path(5))]
    assert sorted(p.name for p in (out / "splits").iterdir()) == ["test.txt", "train.txt"]  # val.txt removed
    assert report.id_lists["test_ids_not_prepared"] == ["ghost"]


@pytest.mark.parametrize("n, fraction", [(10, 0.1), (37, 0.2), (101, 0.33), (8, 0.0)])
def test_stratified_split_gives_every_label_pattern_its_share(n, fraction):
    rng = np.random.default_rng(n)
    labels = {f"i{k}": [int(v) for v in rng.random(3) < [0.5, 0.2, 0.05]] for k in range(n)}
    train, val = stratified_split(labels, fraction, seed=1)
    assert sorted(train + val) == sorted(labels) and not set(train) & set(val)
    assert len(val) == int(n * fraction + 0.5)
    patterns = {tuple(v) for v in labels.values()}
    for pattern in patterns:
        members = [i for i in labels if tuple(labels[i]) == pattern]
        in_val = sum(i in val for i in members)
        assert abs(in_val - len(members) * fraction) <= 1, pattern
    assert stratified_split(labels, fraction, seed=1) == (train, val)


def test_size_resizes_the_longer_side_and_a_rerun_with_another_size_needs_force(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((30, 60), np.uint8)).save(images / "wide.png")
    Image.fromarray(np.zeros((90, 45), np.uint8)).save(images / "tall.png")
    mask = np.zeros((30, 60), np.uint8)
    mask[:, 30:] = 1
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask).save(tmp_path / "masks" / "wide.png")
    (tmp_path / "l.csv").write_text("image,labels\nwide,a\ntall,\n")
    run = lambda size, **kw: prepare_folder(
        images, tmp_path / "l.csv", tmp_path / "out", masks_dir=tmp_path / "masks", size=size, progress=False, **kw
    )
    run(30)
    assert Image.open(tmp_path / "out" / "images" / "wide.png").size == (30, 15)
    assert Image.open(tmp_path / "out" / "images" / "tall.png").size == (15, 30)
    small = np.array(Image.open(tmp_path / "out" / "masks" / "wide.png"))
    assert set(np.unique(small)) == {0, 1} and small[:, :15].max() == 0 and small[:, 15:].min() == 1
    with pytest.raises(DataError, match="--force"):
        run(40)
    run(40, force=True)
    assert Image.open(tmp_path / "out" / "images" / "tall.png").size == (20, 40)
    assert target_size((1000, 10), 100) == (100, 1)


def test_exif_orientation_is_applied_and_masks_follow_the_displayed_image(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    Image.fromarray(pixels).save(images / "photo.jpg", exif=exif, quality=100)
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.ones((40, 20), np.uint8)).save(tmp_path / "masks" / "photo.png")  # as displayed
    (tmp_path / "l.csv").write_text("image,labels\nphoto.jpg,a\n")
    report = prepare_folder(images, tmp_path / "l.csv", tmp_path / "out", masks_dir=tmp_path / "masks", progress=False)
    dataset = PreparedDataset(tmp_path / "out")
    shown = dataset.read_image("photo")
    assert shown.shape == (40, 20, 3) and shown[:10].mean() > 200 and shown[-10:].mean() < 50
    assert dataset.has_mask("photo") and not report.problems


def test_nothing_prepared_is_one_error_saying_why(tmp_path, cli):
    case = make_user_folder(tmp_path, n=3, formats=False, masks=False)
    case["csv"].write_text("image,labels\nelsewhere/a,ring\n")
    result = cli("prepare", "folder", "--images", case["images"], "--labels", case["csv"], "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert result.output.count("error:") == 1 and "matched a readable image file name" in result.output
    assert "'elsewhere/a'" in result.output


def test_dataset_name_comes_from_out_or_name(tmp_path):
    case = make_user_folder(tmp_path, n=3, formats=False, masks=False)
    prepare(case, tmp_path / "my-xrays")
    assert PreparedDataset(tmp_path / "my-xrays").name == "my-xrays"
    prepare(case, tmp_path / "x", name="chest_v2")
    assert PreparedDataset(tmp_path / "x").name == "chest_v2"
    with pytest.raises(DataError, match="--name"):
        prepare(case, tmp_path / "y", name="../up")
    with pytest.raises(DataError, match="give --name"):
        prepare(case, tmp_path / "has space")


def test_out_inside_the_images_folder_is_not_read_as_input(tmp_path):
    case = make_user_folder(tmp_path, n=4, formats=False, masks=False)
    out = case["images"] / "prepared"
    prepare(case, out)
    report = prepare(case, out)
    assert not report.id_counts.get("images_without_labels") and report.counts["image_files"] == 4


def test_cli_prepare_folder(cli, tmp_path):
    case = make_user_folder(tmp_path, n=6, variant="binary", layout="wide", formats=False)
    result = cli(
        "prepare",
        "folder",
        "--images",
        case["images"],
        "--labels",
        case["csv"],
        "--out",
        tmp_path / "out",
        "--masks",
        case["masks"],
        "--size",
        "32",
        "--val-fraction",
        "0.5",
        "--seed",
        "1",
        "--name",
        "mine",
        "--uncertain",
        "positive",
        "--blank",
        "negative",
        "--workers",
        "2",
    )
    assert result.exit_code == 0, result.output
    assert "folder: prepared 6 images" in result.output
    dataset = PreparedDataset(tmp_path / "out")
    assert dataset.name == "mine" and len(dataset.split("val")) == 3
    assert Image.open(dataset.image_path(dataset.split("train")[0])).size == (32, 32)


# --------------------------------------------------------------------------------------------
# Reruns (data.prepare_manifest)
# --------------------------------------------------------------------------------------------


def test_folder_rerun_redoes_exactly_what_changed(tmp_path, monkeypatch):
    case = make_user_folder(tmp_path, n=8)
    out = tmp_path / "out"
    run = lambda target=out, **kw: prepare(case, target, **kw)
    run()
    before = mtimes(out)
    relabel, remask, replaced, removed, unlisted = (user_path(k) for k in (5, 6, 7, 1, 0))
    rows = case["csv"].read_text().splitlines()
    rows = [r for r in rows if not r.startswith(f"{unlisted},")]
    rows = [f"{relabel},ring|cross|square" if r.startswith(f"{relabel},") else r for r in rows]
    new_mask = np.zeros((48, 48), np.uint8)
    new_mask[5:20, 5:20] = 2
    Image.fromarray(new_mask).save(case["masks"] / f"{remask}.png")
    later(case["masks"] / f"{remask}.png")
    Image.fromarray(np.full((48, 48), 90, np.uint8)).save(case["images"] / f"{replaced}.png")
    later(case["images"] / f"{replaced}.png")
    (case["images"] / f"{removed}.png").unlink()
    Image.fromarray(np.full((48, 48), 30, np.uint8)).save(case["images"] / "added.png")
    rows.append("added,square")
    case["csv"].write_text("\n".join(rows) + "\n")
    calls = []
    original = folder_module.read_image_file
    monkeypatch.setattr(folder_module, "read_image_file", lambda path: calls.append(Path(path).name) or original(path))
    report = run()

    assert sorted(calls) == ["added.png", f"{Path(replaced).name}.png"]  # unchanged images are not read
    ids = report.id_lists
    assert ids["labels_changed"] == sorted([encode_id(relabel), encode_id(remask)])
    assert ids["source_changed"] == [encode_id(replaced)] and ids["added"] == ["added"]
    assert ids["removed_source_gone"] == [encode_id(removed)] and ids["removed_unlabelled"] == [encode_id(unlisted)]
    dataset = PreparedDataset(out)
    assert dataset.label_vector(encode_id(relabel)).tolist() == [1, 1, 1]
    assert np.array_equal(dataset.read_mask(encode_id(remask)), new_mask)
    after = mtimes(out)
    redone = {f"masks/{encode_id(remask)}.png", f"images/{encode_id(replaced)}.png", "images/added.png"}
    gone = {f"{sub}/{encode_id(r)}.png" for r in (removed, unlisted) for sub in ("images", "masks")}
    assert set(after) == (set(before) - gone) | redone
    for name in set(before) - gone:
        assert (after[name] == before[name]) == (name not in redone), name

    fresh = tmp_path / "fresh"
    run(fresh)
    assert_same_as_fresh(out, fresh)
    assert_rerun_rewrites_nothing(run, out)


def test_folder_without_manifest_is_verified_and_force_reads_everything(tmp_path, monkeypatch):
    case = make_user_folder(tmp_path, n=5)
    out = tmp_path / "out"
    prepare(case, out)
    (out / MANIFEST_NAME).unlink()
    before = mtimes(out)
    calls = []
    original = folder_module.read_image_file
    monkeypatch.setattr(folder_module, "read_image_file", lambda path: calls.append(path) or original(path))
    report = prepare(case, out)
    assert calls == [] and report.counts["verified"] == 5 and mtimes(out) == before
    report = prepare(case, out, force=True)
    assert len(calls) == 5 and report.counts["converted"] == 5 and mtimes(out) == before  # same bytes: kept
