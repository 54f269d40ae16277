"""`wss predict`: masks, overlays, probabilities and the Kaggle CSV for files, folders and DICOMs."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from data.dicom import stretch_to_uint8, write_dicom
from data.layout import IGNORE_INDEX, PreparedDataset, read_index_png, write_index_png
from data.rle import siim_rle_decode
from pipeline.config import load_config
from pipeline.predict import predict_command
from stages.common.model_files import read_model_file, write_model_file
from stages.seg.model import MODEL_FILE, SegModelError
from stages.seg.predict import collect_inputs, overlay, predict_inputs, read_input
from stages.seg.stage import SegStage

REPO = Path(__file__).resolve().parents[1]
SIIM_DICOMS = REPO.parent / "shared" / "samples" / "siim" / "dicom"
TRAIN = [
    "seg.encoder=resnet18",
    "seg.encoder_weights=null",
    "seg.epochs=1",
    "seg.batch_size=4",
    "seg.arch_options={decoder_channels: [64, 32, 16, 16, 16]}",
    "seg.crop_size=32",
    "seg.resize_long=[32,48]",
    "run.device=cpu",
    "run.workers=0",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train_tiny(root: Path, base: Path) -> Path:
    """One epoch on 8 images: a model to predict with, not a good one."""
    dataset = PreparedDataset(root)
    labels = base / "pseudo" / "pseudo_labels"
    labels.mkdir(parents=True)
    for image_id in dataset.split("train"):
        write_index_png(labels / f"{image_id}.png", dataset.read_mask(image_id), dataset.info.palette)
    cfg = load_config(None, [f"data.root={root}", *TRAIN])
    out = base / "seg"
    out.mkdir()
    SegStage().run(cfg, dataset, {"pseudo": base / "pseudo"}, out, limit=8)
    return out


@pytest.fixture(scope="module")
def binary_model(synthetic_dataset, tmp_path_factory):
    root = synthetic_dataset(n=24, size=64, variant="binary")
    return root, train_tiny(root, tmp_path_factory.mktemp("pred-bin"))


@pytest.fixture(scope="module")
def multiclass_model(synthetic_dataset, tmp_path_factory):
    root = synthetic_dataset(n=24, size=64)
    return root, train_tiny(root, tmp_path_factory.mktemp("pred-mc"))


def read_submission(path: Path) -> dict[str, str]:
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["ImageId", "EncodedPixels"]
    return {image_id: rle for image_id, rle in rows[1:]}


@pytest.mark.skipif(not SIIM_DICOMS.is_dir(), reason=f"SIIM samples not found at {SIIM_DICOMS}")
def test_predict_siim_dicoms_writes_masks_and_a_csv_that_decodes_back(binary_model, tmp_path):
    root, artifact = binary_model
    dicoms = sorted(SIIM_DICOMS.glob("*.dcm"))
    first = predict_inputs(artifact, [dicoms[0]], tmp_path / "first", probabilities=True, device="cpu")
    assert not first.failures and first.written == [dicoms[0].stem]
    probs = np.load(tmp_path / "first" / "probabilities" / f"{dicoms[0].stem}.npy")
    assert probs.dtype == np.float16 and probs.shape == (1, 1024, 1024)
    # an untrained model's masks may all be empty: cut at a quantile so that the RLE has work to do
    threshold = float(np.quantile(probs.astype(np.float32), 0.7))
    report = predict_inputs(artifact, [SIIM_DICOMS], tmp_path / "out", device="cpu", threshold=threshold)
    assert not report.failures and sorted(report.written) == sorted(p.stem for p in dicoms)
    rows = read_submission(report.submission)
    assert sorted(rows) == sorted(p.stem for p in dicoms)  # ImageId = DICOM file stem
    non_empty = 0
    for image_id, rle in rows.items():
        mask = read_index_png(tmp_path / "out" / "masks" / f"{image_id}.png")
        assert mask.shape == (1024, 1024) and set(np.unique(mask)) <= {0, 1}
        np.testing.assert_array_equal(siim_rle_decode(rle, 1024, 1024), mask)
        assert (rle == "-1") == (not mask.any())
        non_empty += bool(mask.any())
        with Image.open(tmp_path / "out" / "overlays" / f"{image_id}.png") as shown:
            assert shown.size == (1024, 1024) and shown.mode == "RGB"
    assert non_empty >= 1


def test_predict_files_and_nested_folders(multiclass_model, tmp_path):
    root, artifact = multiclass_model
    dataset = PreparedDataset(root)
    ids = dataset.split("val")[:3]
    nested = tmp_path / "in" / "a" / "b"
    nested.mkdir(parents=True)
    image = dataset.read_image(ids[0])
    Image.fromarray(image).save(nested / "deep.jpg")
    Image.fromarray(dataset.read_image(ids[1])[:, :, 0]).save(tmp_path / "in" / "gray.png")  # grayscale
    (tmp_path / "in" / "notes.txt").write_text("not an image, not picked from a folder")
    wide = np.concatenate([dataset.read_image(ids[2])] * 2, axis=1)  # 64x128: not square
    Image.fromarray(wide).save(tmp_path / "wide.png")
    report = predict_inputs(
        artifact, [tmp_path / "in", tmp_path / "wide.png"], tmp_path / "out", probabilities=True, device="cpu"
    )
    assert not report.failures and sorted(report.written) == ["deep", "gray", "wide"]
    assert report.submission is None and not (tmp_path / "out" / "submission.csv").exists()
    mask = read_index_png(tmp_path / "out" / "masks" / "wide.png")
    probs = np.load(tmp_path / "out" / "probabilities" / "wide.npy").astype(np.float32)
    assert mask.shape == (64, 128) and probs.shape == (4, 64, 128)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=5e-3)
    agree = (probs.argmax(axis=0) == mask).mean()  # float16 ties aside, the mask is the arg-max
    assert agree > 0.99
    with Image.open(tmp_path / "out" / "overlays" / "deep.png") as shown:
        assert shown.size == (64, 64)


def test_predict_bad_inputs_are_reported_and_the_rest_processed(multiclass_model, tmp_path):
    root, artifact = multiclass_model
    dataset = PreparedDataset(root)
    good = tmp_path / "good.png"
    Image.fromarray(dataset.read_image(dataset.split("val")[0])).save(good)
    fake = tmp_path / "fake.png"
    fake.write_text("this is not a PNG")
    dicom = tmp_path / "full.dcm"
    write_dicom(dicom, np.full((32, 32), 100, np.uint8))
    truncated = tmp_path / "broken.dcm"
    truncated.write_bytes(dicom.read_bytes()[:200])
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "dup").mkdir()
    shutil.copy(good, tmp_path / "dup" / "good.png")
    inputs = [good, fake, truncated, empty, tmp_path / "missing.png", tmp_path / "dup", dicom]
    report = predict_inputs(artifact, inputs, tmp_path / "out", device="cpu", workers=2)  # errors cross processes
    assert sorted(report.written) == ["full", "good"]
    assert len(report.failures) == 5
    for needle in ["fake.png", "broken.dcm", "empty", "missing.png", "dup/good.png"]:
        assert sum(needle in line for line in report.failures) == 1, (needle, report.failures)
    assert (tmp_path / "out" / "masks" / "good.png").is_file()
    assert (tmp_path / "out" / "masks" / "full.png").is_file()


def test_model_of_another_config_is_refused(multiclass_model, binary_model, tmp_path):
    _, artifact = multiclass_model
    with pytest.raises(SegModelError, match="trained for classes"):
        predict_inputs(artifact, [tmp_path], tmp_path / "out", device="cpu", classes=["finding"])
    with pytest.raises(SegModelError, match="is multiclass but the config's dataset is binary"):
        predict_inputs(artifact, [tmp_path], tmp_path / "out", device="cpu", task="binary")
    broken = tmp_path / "model.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(SegModelError, match="unreadable segmenter model"):
        predict_inputs(broken, [tmp_path], tmp_path / "out", device="cpu")
    state = read_model_file(artifact / MODEL_FILE, "seg", "model", "seg")
    state.meta["channels"] = 7  # claims another class count than its weights have
    write_model_file(tmp_path / "odd.safetensors", "seg", state.tensors, state.meta)
    with pytest.raises(SegModelError, match="do not fit the Unet/resnet18 segmenter with 7 outputs"):
        predict_inputs(tmp_path / "odd.safetensors", [tmp_path], tmp_path / "out", device="cpu")


def test_overlay_known_answer():
    image = np.full((1, 3, 3), 100, np.uint8)
    mask = np.array([[0, 1, IGNORE_INDEX]], np.uint8)
    palette = [[0, 0, 0], [200, 0, 50]]
    shown = overlay(image, mask, palette, alpha=0.5)
    assert shown[0, 0].tolist() == [100, 100, 100]  # background untouched
    assert shown[0, 1].tolist() == [150, 50, 75]
    assert shown[0, 2].tolist() == [100, 100, 100]  # ignore / out-of-palette untouched


def test_collect_inputs(tmp_path):
    (tmp_path / "x" / "y").mkdir(parents=True)
    for name in ["x/a.PNG", "x/y/b.dcm", "x/.hidden.png", "x/readme.md"]:
        (tmp_path / name).write_bytes(b"")
    files, failures = collect_inputs([tmp_path / "x", tmp_path / "nope"])
    assert [p.name for p in files] == ["a.PNG", "b.dcm"]
    assert len(failures) == 1 and "nope" in failures[0]


def test_collect_inputs_skips_the_output_folder_and_finds_dicoms_without_suffix(tmp_path):
    """A second run into scans/pred must not predict last run's masks; a DICOM named by its UID
    is found in a folder; a file named and also inside a named folder is predicted once."""
    scans = tmp_path / "scans"
    (scans / "pred" / "masks").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(scans / "x.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(scans / "pred" / "masks" / "x.png")
    write_dicom(scans / "1.2.840.10008.44", np.full((8, 8), 7, np.uint8))
    (scans / "notes.44").write_text("not a DICOM")
    files, failures = collect_inputs([scans / "x.png", scans], out_dir=scans / "pred")
    assert [p.relative_to(scans).as_posix() for p in files] == ["x.png", "1.2.840.10008.44"]
    assert not failures


def test_collect_inputs_into_the_input_folder_and_past_earlier_outputs(tmp_path):
    """`--out .` still finds the images; the masks and overlays of an earlier run into another
    folder inside the inputs are not inputs, even where their names sort first."""
    scans = tmp_path / "scans"
    for folder in ["pred1/masks", "pred1/overlays", "deep/er", "masks", "b"]:
        (scans / folder).mkdir(parents=True)
    for name in [
        "zebra.png",
        "pred1/masks/zebra.png",
        "pred1/overlays/zebra.png",
        "masks/own.png",
        "deep/er/a.png",
        "b/a.png",
    ]:
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(scans / name)
    files, failures = collect_inputs([scans], out_dir=scans)
    assert [p.relative_to(scans).as_posix() for p in files] == ["zebra.png", "b/a.png", "deep/er/a.png"]
    files, _ = collect_inputs([scans], out_dir=scans / "pred2")
    assert [p.relative_to(scans).as_posix() for p in files] == [
        "zebra.png",
        "b/a.png",
        "masks/own.png",
        "deep/er/a.png",
    ]


def write_config(path: Path, root: Path) -> Path:
    path.write_text(f"data:\n  root: {root}\nrun:\n  device: cpu\n  workers: 0\n")
    return path


def test_predict_command_exit_codes(binary_model, multiclass_model, tmp_path):
    root, artifact = binary_model
    config = write_config(tmp_path / "run.yaml", root)
    dataset = PreparedDataset(root)
    good = tmp_path / "scan.png"
    Image.fromarray(dataset.read_image(dataset.split("val")[0])).save(good)
    runner = CliRunner()

    result = runner.invoke(
        predict_command, ["-c", str(config), str(good), "--out", str(tmp_path / "ok"), "--artifact", str(artifact)]
    )
    assert result.exit_code == 0, result.output
    assert read_submission(tmp_path / "ok" / "submission.csv").keys() == {"scan"}

    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    result = runner.invoke(
        predict_command,
        [
            "-c",
            str(config),
            str(good),
            str(bad),
            "--out",
            str(tmp_path / "mixed"),
            "--artifact",
            str(artifact),
            "--probabilities",
        ],
    )
    assert result.exit_code == 1
    assert "bad.png" in result.output and (tmp_path / "mixed" / "probabilities" / "scan.npy").is_file()
    assert read_submission(tmp_path / "mixed" / "submission.csv") == {"scan": mock.ANY, "bad": "-1"}

    mc_root, mc_artifact = multiclass_model  # the binary config's dataset does not fit this model
    result = runner.invoke(
        predict_command, ["-c", str(config), str(good), "--out", str(tmp_path / "x"), "--artifact", str(mc_artifact)]
    )
    assert result.exit_code == 2 and "error:" in result.output and "trained for classes" in result.output
    assert "Traceback" not in result.output

    result = runner.invoke(
        predict_command,
        ["-c", str(config), str(good), "--out", str(tmp_path / "t"), "--artifact", str(artifact), "--threshold", "7"],
    )
    assert result.exit_code == 2 and "--threshold" in result.output  # as seg.threshold: in [0, 1]
    result = runner.invoke(
        predict_command, ["-c", str(config), str(good), "--out", str(good / "sub"), "--artifact", str(artifact)]
    )
    assert result.exit_code == 2 and "cannot create the output folder" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(
        predict_command, ["-c", str(config), str(good), "--out", str(tmp_path / "y"), "--artifact", str(bad)]
    )
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output


def test_read_input_stretches_deep_grayscale_and_drops_alpha(tmp_path):
    ramp = np.arange(12 * 16).reshape(12, 16)
    deep = {
        "i16.png": Image.fromarray((ramp * 300).astype(np.uint16)),  # mode I;16, up to 57000
        "i16b.tif": Image.fromarray((ramp * 300).astype(">u2")),  # mode I;16B
        "i32.tif": Image.fromarray((ramp * 1000 - 5000).astype(np.int32)),  # mode I
        "float.tif": Image.fromarray((ramp / ramp.max()).astype(np.float32)),
    }  # mode F in [0, 1]
    for name, image in deep.items():
        image.save(tmp_path / name)
        got = read_input(tmp_path / name)
        assert got.shape == (12, 16, 3) and got.dtype == np.uint8, name
        np.testing.assert_array_equal(got[:, :, 0], stretch_to_uint8(ramp), err_msg=name)
        assert (got == got[:, :, :1]).all(), name
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 3] = 200, 50, 0  # fully transparent: alpha is dropped
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert read_input(tmp_path / "rgba.png")[0, 0].tolist() == [200, 50, 0]


def test_exif_orientation_is_applied(multiclass_model, tmp_path):
    _, artifact = multiclass_model
    stored = np.zeros((20, 40, 3), np.uint8)  # stored 40 wide, 20 high
    stored[:, :10] = 255  # a bright left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(stored).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    shown = read_input(tmp_path / "turned.jpg")
    assert shown.shape == (40, 20, 3)
    assert shown[:5].mean() > 200 and shown[-5:].mean() < 50  # the left edge is now the top
    report = predict_inputs(artifact, [tmp_path / "turned.jpg"], tmp_path / "out", device="cpu")
    assert report.written == ["turned"]
    assert read_index_png(tmp_path / "out" / "masks" / "turned.png").shape == (40, 20)


def test_submission_has_placeholder_rows_and_full_dicom_uids(binary_model, tmp_path, caplog):
    _, artifact = binary_model
    uid = "1.2.276.0.7230010.3.1.4.8323329.5597.1517875190.762693"
    write_dicom(tmp_path / uid, np.full((32, 32), 100, np.uint8))  # no suffix: found by its DICM magic
    write_dicom(tmp_path / "scan.dcm", np.full((32, 32), 90, np.uint8))
    bad = tmp_path / "1.2.276.0.7230010.3.1.4.8323329.9999.1517875190.111.dcm"
    bad.write_bytes(b"not a dicom")
    with caplog.at_level(logging.WARNING, logger="wss.predict"):
        report = predict_inputs(artifact, [tmp_path / uid, bad, tmp_path / "scan.dcm"], tmp_path / "out", device="cpu")
    assert report.written == [uid, "scan"] and len(report.failures) == 1
    assert (tmp_path / "out" / "masks" / f"{uid}.png").is_file()
    assert (tmp_path / "out" / "overlays" / f"{uid}.png").is_file()
    rows = read_submission(report.submission)
    assert list(rows) == [uid, bad.stem, "scan"]  # one row per input, in input order
    assert rows[bad.stem] == "-1"
    warning = [r.getMessage() for r in caplog.records if "placeholder" in r.getMessage()]
    assert len(warning) == 1 and bad.stem in warning[0]
