"""`wss prepare coco`: the real-format sample (../shared/samples/coco) prepared, every mask pixel
checked against pycocotools' own ``COCO.annToMask``; the overlap and crowd rules, every RLE form,
bad annotations and files listed and left out, reruns, and a first stage run on the sample."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.coco import AnnotationError, compressed_counts, instance_rle, prepare_coco
from data.errors import DataError
from data.layout import PreparedDataset, default_palette
from data.prepare_manifest import MANIFEST_NAME
from tests.helpers import FAST_CAM, REPO, overrides
from tests.test_prepare_inputs import assert_rerun_rewrites_nothing, assert_same_as_fresh, later, mtimes

SAMPLES = REPO.parent / "shared" / "samples" / "coco"
TRAIN_JSON = SAMPLES / "annotations" / "instances_train2014.json"
VAL_JSON = SAMPLES / "annotations" / "instances_val2014.json"
UNANNOTATED = "COCO_train2014_000000401012"


def need_samples() -> None:
    if not TRAIN_JSON.is_file():
        pytest.skip(f"COCO samples not found: {SAMPLES}")


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    need_samples()
    out = tmp_path_factory.mktemp("coco") / "prepared"
    prepare_coco(TRAIN_JSON, SAMPLES / "train2014", out, VAL_JSON, SAMPLES / "val2014", progress=False)
    return out


def expected_mask(coco, image: dict) -> np.ndarray:
    """The documented rule, with pycocotools' own reader: instances in file order, each painting
    its class (the later wins where they overlap), crowd regions 255 where no instance lies."""
    class_of = {c: k + 1 for k, c in enumerate(sorted(coco.getCatIds()))}
    mask = np.zeros((image["height"], image["width"]), np.uint8)
    crowd = np.zeros(mask.shape, bool)
    for annotation in [a for a in coco.dataset["annotations"] if a["image_id"] == image["id"]]:
        region = coco.annToMask(annotation).astype(bool)
        if annotation["iscrowd"]:
            crowd |= region
        else:
            mask[region] = class_of[annotation["category_id"]]
    mask[crowd & (mask == 0)] = 255
    return mask


# --------------------------------------------------------------------------------------------
# The real-format sample
# --------------------------------------------------------------------------------------------


def test_every_mask_pixel_matches_pycocotools_ann_to_mask(sample):
    from pycocotools.coco import COCO

    dataset = PreparedDataset(sample)
    overlapping = 0
    for path in [TRAIN_JSON, VAL_JSON]:
        coco = COCO(str(path))
        for image in coco.dataset["images"]:
            image_id = Path(image["file_name"]).stem
            if image_id == UNANNOTATED:
                continue
            assert np.array_equal(dataset.read_mask(image_id), expected_mask(coco, image)), image_id
            regions = [coco.annToMask(a) for a in coco.dataset["annotations"] if a["image_id"] == image["id"]]
            overlapping += int((np.sum(regions, axis=0) > 1).sum())
    assert overlapping > 0  # the sample has overlapping instances: the rule above was exercised


def test_labels_classes_palette_and_images_of_the_sample(sample):
    from pycocotools.coco import COCO

    dataset = PreparedDataset(sample)
    coco = COCO(str(TRAIN_JSON))
    cat_ids = sorted(coco.getCatIds())
    assert len(cat_ids) == 80 and cat_ids[-1] == 90  # COCO's ids with gaps -> classes 1..80
    assert dataset.classes == [coco.cats[c]["name"] for c in cat_ids]
    assert dataset.info.palette == default_palette(81) and dataset.info.image_ext == ".jpg"
    for image in coco.dataset["images"]:
        image_id = Path(image["file_name"]).stem
        if image_id == UNANNOTATED:
            continue
        present = {cat_ids.index(a["category_id"]) for a in coco.dataset["annotations"] if a["image_id"] == image["id"]}
        assert set(np.flatnonzero(dataset.label_vector(image_id))) == present
        assert dataset.image_path(image_id).read_bytes() == (SAMPLES / "train2014" / image["file_name"]).read_bytes()


def test_a_crowd_region_is_ignored_but_its_class_is_present(sample):
    dataset = PreparedDataset(sample)
    crowded = "COCO_val2014_000000001152"  # a person crowd and two cars
    mask = dataset.read_mask(crowded)
    assert (mask == 255).sum() > 1000
    person = dataset.classes.index("person")
    assert dataset.label_vector(crowded)[person] == 1 and not (mask == person + 1).any()


def test_the_unannotated_image_is_listed_and_kept_out(sample):
    report = json.loads((sample / "prepare_report.json").read_text())
    assert report["ids"]["images_without_annotations"] == [UNANNOTATED]
    dataset = PreparedDataset(sample)
    assert UNANNOTATED not in dataset.labels and not dataset.image_path(UNANNOTATED).exists()
    assert UNANNOTATED not in dataset.split("train")


def test_splits_follow_the_annotation_files(sample):
    dataset = PreparedDataset(sample)
    train = [p.name[:-4] for p in sorted((SAMPLES / "train2014").glob("*.jpg")) if p.name[:-4] != UNANNOTATED]
    val = [p.name[:-4] for p in sorted((SAMPLES / "val2014").glob("*.jpg"))]
    assert dataset.split("train") == train and dataset.split("val") == val


def test_cli_prepare_coco_and_a_first_stage_run(cli, tmp_path):
    need_samples()
    out = tmp_path / "coco"
    result = cli(
        "prepare",
        "coco",
        "--annotations",
        TRAIN_JSON,
        "--images",
        SAMPLES / "train2014",
        "--val-annotations",
        VAL_JSON,
        "--val-images",
        SAMPLES / "val2014",
        "--out",
        out,
        "--workers",
        "2",
    )
    assert result.exit_code == 0, result.output
    assert "coco: prepared 14 images" in result.output and "images without annotations: 1" in result.output
    assert not list(out.glob(".coco-index*"))
    small = {**FAST_CAM, "cam.epochs": "1", "cam.frozen_stages": "-1", "cam.freeze_bn": "false"}  # no ImageNet
    run = cli(
        "run",
        "-c",
        REPO / "configs" / "coco.yaml",
        "--until",
        "cam",
        "-o",
        f"data.root={out}",
        "-o",
        f"run.workdir={tmp_path / 'runs'}",
        *overrides(small),
    )
    assert run.exit_code == 0, run.output
    cams = sorted(p.stem for p in (tmp_path / "runs" / "coco").glob("cam-*/cams/*.npz"))
    assert cams == PreparedDataset(out).split("train")


@pytest.mark.slow
def test_the_sample_through_every_command_with_configs_coco_made_small(cli, sample, tmp_path):
    """`wss pseudo-labels` and the folder format's other commands: tests/test_folder_e2e.py (the
    random walk over these 500 px photos takes ~2 s an image on a CPU)."""
    from tests.test_folder_e2e import SMALL, stage_table

    small = {
        **SMALL,
        "cam.frozen_stages": "-1",
        "cam.freeze_bn": "false",
        "irn.backbone_init": "cam",
        "seg.epochs": "1",
    }  # no ImageNet weights offline
    args = [
        "-c",
        REPO / "configs" / "coco.yaml",
        "-o",
        f"data.root={sample}",
        "-o",
        f"run.workdir={tmp_path}",
        *overrides(small),
    ]
    run = cli("run", *args)
    assert run.exit_code == 0, run.output
    assert stage_table(run.output) == dict.fromkeys(["cam", "irn", "pseudo", "seg"], "ran")
    for command in (
        ["run-stage", "seg", "--limit", "6"],
        ["evaluate"],
        ["visualize", "--n", "3", "--out", tmp_path / "grid.png"],
        ["compare", "--methods", "gap", "--limit", "8", "--out", tmp_path / "compare"],
        ["predict", SAMPLES / "val2014", "--out", tmp_path / "pred"],
    ):
        result = cli(command[0], *args, *command[1:])
        assert result.exit_code == 0, (command, result.output)
    rows = json.loads((tmp_path / "coco" / "evaluation.json").read_text())
    assert {(r["stage"], r["split"]) for r in rows} >= {("cam", "train"), ("seg", "val")}
    assert len(list((tmp_path / "pred" / "masks").glob("*.png"))) == 5


# --------------------------------------------------------------------------------------------
# Generated files: overlaps, RLE forms, bad input, reruns
# --------------------------------------------------------------------------------------------

CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
]


def write_case(
    root: Path, annotations: list[dict], images: list[tuple[int, int, int]] | None = None, name: str = "instances.json"
) -> tuple[Path, Path]:
    """An instances file over JPEGs images/<id>.jpg of (id, width, height)."""
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    images = images or [(1, 40, 30), (2, 40, 30)]
    entries = []
    for coco_id, width, height in images:
        name_of = f"COCO_train2014_{coco_id:012d}.jpg"
        Image.fromarray(np.full((height, width, 3), 10 * coco_id, np.uint8)).save(folder / name_of, quality=95)
        entries.append({"id": coco_id, "file_name": name_of, "width": width, "height": height})
    for k, annotation in enumerate(annotations):
        if isinstance(annotation, dict):
            annotation.setdefault("id", 100 + k)
            annotation.setdefault("iscrowd", 0)
    path = root / name
    path.write_text(
        json.dumps(
            {"info": {}, "licenses": [], "images": entries, "annotations": annotations, "categories": CATEGORIES}
        )
    )
    return path, folder


def box(x0, y0, x1, y1) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def test_overlaps_take_the_later_instance_and_every_rle_form_decodes_as_pycocotools_does(tmp_path, monkeypatch):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    import data.coco as coco_module

    monkeypatch.setattr(coco_module, "_BATCH", 2)  # the file order must survive the index's insert batches

    region = np.zeros((30, 40), np.uint8, order="F")
    region[5:25, 20:35] = 1
    compressed = mask_utils.encode(region)
    uncompressed_counts, value, run = [], 0, 0
    for pixel in region.flatten(order="F"):  # column-major runs, starting with zeros
        if pixel != value:
            uncompressed_counts.append(run)
            value, run = pixel, 0
        run += 1
    uncompressed_counts.append(run)
    annotations = [
        {"image_id": 1, "category_id": 1, "segmentation": box(2, 2, 30, 20)},
        {"image_id": 1, "category_id": 18, "segmentation": box(10, 10, 38, 28)},  # later: wins the overlap
        {
            "image_id": 2,
            "category_id": 1,
            "iscrowd": 1,
            "segmentation": {"size": [30, 40], "counts": uncompressed_counts},
        },
        {"image_id": 2, "category_id": 18, "segmentation": box(0, 0, 25, 10)},
        {
            "image_id": 2,
            "category_id": 90,
            "segmentation": {
                "size": [30, 40],  # later: over the dog
                "counts": compressed["counts"].decode(),
            },
        },
    ]
    path, images = write_case(tmp_path, annotations)
    report = prepare_coco(path, images, tmp_path / "out", progress=False)
    assert report.counts["prepared"] == 2 and not report.problems
    dataset, coco = PreparedDataset(tmp_path / "out"), COCO(str(path))
    for image in coco.dataset["images"]:
        assert np.array_equal(dataset.read_mask(Path(image["file_name"]).stem), expected_mask(coco, image))
    first = dataset.read_mask("COCO_train2014_000000000001")
    assert first[15, 20] == 2 and first[5, 5] == 1  # dog (listed later) over person; person alone
    second = dataset.read_mask("COCO_train2014_000000000002")
    assert second[10, 30] == 3 and second[27, 5] == 0 and (second == 255).sum() == 0  # crowd under others
    assert second[7, 22] == 3  # the toothbrush, listed after the dog, wins their overlap
    assert dataset.label_vector("COCO_train2014_000000000002").tolist() == [1, 1, 1]

    annotations[0], annotations[1] = annotations[1], annotations[0]  # the other order: person wins
    path, images = write_case(tmp_path / "swapped", annotations)
    prepare_coco(path, images, tmp_path / "out2", progress=False)
    assert PreparedDataset(tmp_path / "out2").read_mask("COCO_train2014_000000000001")[15, 20] == 1


def test_compressed_counts_read_pycocotools_strings():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    for _ in range(50):
        height, width = rng.integers(1, 60, 2)
        region = np.asfortranarray(rng.random((height, width)) < rng.random())
        counts = compressed_counts(mask_utils.encode(region.astype(np.uint8))["counts"].decode())
        flat = region.flatten(order="F")
        assert sum(counts) == height * width
        rebuilt = np.repeat(np.arange(len(counts)) % 2, counts).astype(bool)
        assert np.array_equal(rebuilt, flat)


@pytest.mark.parametrize(
    "segmentation, message",
    [
        ({"size": [30, 40], "counts": [0, 10]}, "adding up to 1200"),  # pycocotools would decode unset memory
        ({"size": [30, 40], "counts": "0"}, "do not add up to 1200"),
        ({"size": [30, 40], "counts": "\x7f\x7f"}, "compressed RLE holds"),
        ({"size": [10, 10], "counts": [100]}, "not the image's"),
        ([[1, 2, 3]], "even number"),
        ([[1, 2, float("nan"), 4]], "even number"),
        ([], "empty polygon list"),
        ("polygon", "neither a polygon list nor an RLE"),
    ],
)
def test_bad_segmentations_are_refused_before_pycocotools_sees_them(segmentation, message):
    with pytest.raises(AnnotationError, match=message):
        instance_rle(segmentation, 30, 40)


def test_bad_annotations_and_files_leave_their_image_out_and_the_rest_is_prepared(tmp_path):
    images = [(k, 40, 30) for k in range(1, 8)]
    annotations = [
        {"image_id": 1, "category_id": 1, "segmentation": box(2, 2, 30, 20)},  # fine
        {"image_id": 2, "category_id": 1, "segmentation": {"size": [30, 40], "counts": [5]}},  # runs too short
        {"image_id": 3, "category_id": 55, "segmentation": box(2, 2, 30, 20)},  # unknown category
        {"image_id": 4, "category_id": 1},  # no segmentation
        {"image_id": 5, "category_id": 1, "segmentation": box(2, 2, 30, 20)},  # file missing
        {"image_id": 6, "category_id": 1, "segmentation": box(2, 2, 30, 20)},  # other size
        {"image_id": 7, "category_id": 18, "segmentation": box(2, 2, 30, 20)},  # fine
        {"image_id": 99, "category_id": 1, "segmentation": box(2, 2, 30, 20)},  # no such image
        "not an annotation",
    ]
    images.append((8, 40, 30))
    annotations.append({"image_id": 8, "category_id": 1, "segmentation": box(2, 2, 30, 20)})  # JPEG cut short
    path, folder = write_case(tmp_path, annotations, images)
    jpeg = folder / "COCO_train2014_000000000008.jpg"
    noise = (np.random.default_rng(0).random((30, 40, 3)) * 255).astype(np.uint8)
    Image.fromarray(noise).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[:1300])  # cut inside the scan: the header reads, the pixels do not
    (folder / "COCO_train2014_000000000005.jpg").unlink()
    Image.fromarray(np.zeros((31, 40, 3), np.uint8)).save(folder / "COCO_train2014_000000000006.jpg")
    report = prepare_coco(path, folder, tmp_path / "out", progress=False)
    assert sorted(PreparedDataset(tmp_path / "out").labels) == [
        "COCO_train2014_000000000001",
        "COCO_train2014_000000000007",
    ]
    lines = [f"{p.where}: {p.message}" for p in report.problems]
    assert any(f"{path}: image 2: annotation 101: RLE counts" in line for line in lines)
    assert any(f"{path}: category_id 55" in line for line in lines)
    assert any(f"{path}: annotation 103: no segmentation: its image left out" in line for line in lines)
    assert any("image is 40x31 but" in line for line in lines)
    assert any("annotation ?: no integer image_id" in line for line in lines)
    assert report.id_lists["listed_images_missing"] == ["COCO_train2014_000000000005"]
    assert any(line.startswith(str(jpeg)) and "truncated" in line for line in lines)
    assert report.counts["annotations_without_image"] == 1 and report.counts["failed"] == 3
    assert report.id_lists["images_with_bad_annotations"] == [
        "COCO_train2014_000000000003",
        "COCO_train2014_000000000004",
    ]


def test_files_that_are_not_coco_are_one_line_errors(tmp_path, cli):
    images = tmp_path / "images"
    images.mkdir()
    for text, message in [
        ('{"images": [], "annotations": [}', "not valid JSON at character"),
        ('{"images": [], "categories": []}', "no 'annotations' key"),
        ("[1, 2]", "expected a JSON object"),
    ]:
        (tmp_path / "a.json").write_text(text)
        result = cli(
            "prepare", "coco", "--annotations", tmp_path / "a.json", "--images", images, "--out", tmp_path / "out"
        )
        assert result.exit_code == 2 and message in result.output and result.output.count("\n") <= 2, result.output
    with pytest.raises(DataError, match="go together"):
        prepare_coco(tmp_path / "a.json", images, tmp_path / "out", val_annotations=tmp_path / "a.json")


def test_train_and_val_files_must_agree_on_the_categories(tmp_path):
    path, images = write_case(tmp_path, [{"image_id": 1, "category_id": 1, "segmentation": box(2, 2, 30, 20)}])
    other = json.loads(path.read_text())
    other["categories"] = other["categories"][:2]
    (tmp_path / "val.json").write_text(json.dumps(other))
    with pytest.raises(DataError, match="categories differ"):
        prepare_coco(path, images, tmp_path / "out", tmp_path / "val.json", images, progress=False)


def test_coco_rerun_redoes_exactly_what_changed(tmp_path, monkeypatch):
    import data.coco as coco_module

    images = [(k, 40, 30) for k in range(1, 6)]
    annotations = [{"image_id": k, "category_id": 1, "segmentation": box(2, 2, 10 + 3 * k, 20)} for k in range(1, 6)]
    path, folder = write_case(tmp_path, annotations, images)
    out = tmp_path / "out"
    run = lambda target=out, **kw: prepare_coco(path, folder, target, progress=False, **kw)
    run()
    before = mtimes(out)
    data = json.loads(path.read_text())
    data["annotations"][0]["category_id"] = 18  # image 1: relabelled
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 2]  # image 2: now unannotated
    path.write_text(json.dumps(data))
    Image.fromarray(np.full((30, 40, 3), 200, np.uint8)).save(folder / "COCO_train2014_000000000003.jpg")
    later(folder / "COCO_train2014_000000000003.jpg")  # image 3: another picture
    (folder / "COCO_train2014_000000000004.jpg").unlink()  # image 4: gone
    checked = []
    original = coco_module._check_jpeg
    monkeypatch.setattr(coco_module, "_check_jpeg", lambda task: checked.append(task.coco_id) or original(task))
    report = run()
    assert checked == [3]  # unchanged and relabelled JPEGs are not decoded again
    ids = report.id_lists
    name = "COCO_train2014_{:012d}".format
    assert ids["labels_changed"] == [name(1)] and ids["source_changed"] == [name(3)]
    assert ids["removed_unlabelled"] == [name(2)] and ids["images_without_annotations"] == [name(2)]
    assert report.id_counts["listed_images_missing"] == 1 and ids["removed_source_gone"] == [name(4)]
    assert PreparedDataset(out).read_mask(name(1)).max() == 2
    after = mtimes(out)
    redone = {f"masks/{name(1)}.png", f"images/{name(3)}.jpg"}
    gone = {f"{sub}/{name(k)}.{ext}" for k in (2, 4) for sub, ext in (("images", "jpg"), ("masks", "png"))}
    assert set(after) == (set(before) - gone) | redone
    for key in set(before) - gone:
        assert (after[key] == before[key]) == (key not in redone), key
    fresh = tmp_path / "fresh"
    run(fresh)
    assert_same_as_fresh(out, fresh)
    assert_rerun_rewrites_nothing(run, out)

    (out / MANIFEST_NAME).unlink()  # a folder without manifest: verified, nothing rewritten
    stable = mtimes(out)
    assert run().counts["resumed"] == 3 and mtimes(out) == stable


def test_pycocotools_is_imported_only_where_coco_is_read():
    sources = [p for package in ("pipeline", "stages", "data") for p in (REPO / package).glob("**/*.py")]
    importing = sorted(
        str(p.relative_to(REPO))
        for p in sources
        if "import pycocotools" in p.read_text() or "from pycocotools" in p.read_text()
    )
    assert importing == ["data/coco.py"]
    code = "import sys, pipeline.cli, data.folder, data.layout; assert 'pycocotools' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
