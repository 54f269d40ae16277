"""Large images: `wss predict` works in memory that follows the model's input size, refuses an
image over its pixel bound in its own words (Pillow's decompression-bomb warning never reaches
the user), and gives the results of the whole-image computation."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tracemalloc
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageFile

import data.images
import stages.seg.model
import stages.seg.predict
from data.dicom import stretch_to_uint8, write_dicom
from data.errors import DataError
from data.layout import PreparedDataset, read_index_png, read_rgb
from data.transforms import resize_long
from pipeline.predict import predict_command
from stages.seg.model import build_segmenter, predict_mask, predict_probabilities, probabilities_to_mask, save_segmenter
from stages.seg.predict import ProbabilityFile, load_input, overlay, predict_inputs, read_input
from tests.helpers import REPO

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")
BINARY = {"task": "binary", "classes": ["finding"], "palette": [[0, 0, 0], [255, 0, 0]]}
MULTICLASS = {
    "task": "multiclass",
    "classes": ["ring", "cross", "square"],
    "palette": [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]],
}


def write_tiny_artifact(folder: Path, kind: dict = BINARY, long_side: int = 64, seed: int = 0) -> Path:
    """A seg artifact with an untrained Unet-ResNet18 (random weights give masks with both
    classes, which is all these tests need)."""
    torch.manual_seed(seed)
    channels = 1 if kind["task"] == "binary" else len(kind["classes"]) + 1
    section = SimpleNamespace(
        arch="Unet",
        encoder="resnet18",
        arch_options={"decoder_channels": [16] * 5},
        threshold=0.5,
        predict_size=long_side,
        resize_long=[long_side, long_side],
    )
    info = SimpleNamespace(
        task=kind["task"], classes=kind["classes"], num_classes=len(kind["classes"]), palette=kind["palette"]
    )
    model = build_segmenter("Unet", "resnet18", None, channels, section.arch_options)
    folder.mkdir(parents=True, exist_ok=True)
    save_segmenter(model, folder / "model.pt", section, info)
    return folder


def textured_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients with a few discs: structure for the model, and it compresses."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(seed)
    image = np.stack([255 * x / width, 255 * y / height, 128 + 60 * np.sin(x / 17 + y / 23)], axis=2)
    for _ in range(3):
        cy, cx, r = rng.integers(0, height), rng.integers(0, width), rng.integers(5, max(6, min(height, width) // 3))
        image[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.integers(0, 255, 3)
    return image.astype(np.uint8)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("big-models")
    return {
        "binary": write_tiny_artifact(root / "binary", BINARY),
        "multiclass": write_tiny_artifact(root / "multiclass", MULTICLASS),
    }


# ------------------------------------------------------------------------------ probabilities


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_mask_in_bands_of_rows_equals_the_whole_image_computation(models, monkeypatch, task):
    from stages.seg.model import load_segmenter

    model, meta = load_segmenter(models[task], CPU)
    image = textured_image(300, 210)
    resized = resize_long(image, 64)
    probs = predict_probabilities(model, image, task, 64, CPU)
    expected = probabilities_to_mask(probs, task, 0.5)

    bands = []
    mask = predict_mask(model, resized, (300, 210), task, 0.5, CPU, lambda top, p: bands.append((top, p.clone())))
    assert len(bands) == 1 and bands[0][0] == 0  # within WHOLE_IMAGE_VALUES: that very computation
    assert torch.equal(bands[0][1], probs) and np.array_equal(mask, expected)

    monkeypatch.setattr(stages.seg.model, "WHOLE_IMAGE_VALUES", 1000)
    monkeypatch.setattr(stages.seg.model, "BAND_VALUES", 4 * 210 * probs.shape[0] + 17)  # 4 rows a band
    bands = []
    mask = predict_mask(model, resized, (300, 210), task, 0.5, CPU, lambda top, p: bands.append((top, p.clone())))
    assert [top for top, _ in bands] == list(range(0, 300, 4))
    banded = torch.cat([p for _, p in bands], dim=1)
    assert banded.shape == probs.shape
    assert (banded - probs).abs().max() < 1e-5  # float rounding of the same interpolation
    if task == "binary":
        clear = (probs[0] - 0.5).abs() > 1e-4
    else:
        top2 = probs.topk(2, dim=0).values
        clear = (top2[0] - top2[1]) > 1e-4
    assert clear.float().mean() > 0.99 and 0 < expected.mean() < expected.max()  # a real test: mixed classes
    assert np.array_equal(mask[clear.numpy()], expected[clear.numpy()])


def test_probability_file_written_in_bands_loads_as_one_array(tmp_path):
    probs = torch.rand(3, 10, 7)
    saved = ProbabilityFile(tmp_path / "p.npy", (3, 10, 7))
    for top in range(0, 10, 4):
        saved.write_rows(top, probs[:, top : top + 4])
    assert not (tmp_path / "p.npy").exists()  # not under its name until complete
    saved.commit()
    loaded = np.load(tmp_path / "p.npy")
    assert loaded.dtype == np.float16 and np.array_equal(loaded, probs.numpy().astype(np.float16))
    assert [p.name for p in tmp_path.iterdir()] == ["p.npy"]


# ------------------------------------------------------------------------------ reading


def save_png(array: np.ndarray, path: Path) -> Path:
    Image.fromarray(array).save(path)
    return path


def test_an_image_above_the_overlay_size_is_never_a_full_array(models, monkeypatch, tmp_path):
    """Above OVERLAY_MAX_SIDE (here lowered to 100): the model's input is the one read_input's
    array gives, the overlay a reduced copy, the mask and probabilities full size and equal."""
    image = textured_image(150, 330)
    path = save_png(image, tmp_path / "wide.png")
    small = predict_inputs(models["binary"], [path], tmp_path / "as-is", device="cpu", probabilities=True)
    monkeypatch.setattr(stages.seg.predict, "OVERLAY_MAX_SIDE", 100)
    item = load_input(path, 64)
    assert item["size"] == (150, 330) and np.array_equal(item["resized"], resize_long(image, 64))
    assert item["view"].shape == (38, 83, 3)  # reduced 4x (box filter), rounded up
    large = predict_inputs(models["binary"], [path], tmp_path / "large", device="cpu", probabilities=True)
    assert small.written == large.written == ["wide"]
    mask = read_index_png(tmp_path / "large" / "masks" / "wide.png")
    assert mask.shape == (150, 330) and np.array_equal(mask, read_index_png(tmp_path / "as-is" / "masks" / "wide.png"))
    assert np.array_equal(
        np.load(tmp_path / "large" / "probabilities" / "wide.npy"),
        np.load(tmp_path / "as-is" / "probabilities" / "wide.npy"),
    )
    assert (tmp_path / "large" / "submission.csv").read_text() == (tmp_path / "as-is" / "submission.csv").read_text()
    with Image.open(tmp_path / "large" / "overlays" / "wide.png") as shown:
        assert shown.size == (83, 38)


@pytest.mark.parametrize("mode", ["L", "I;16", "RGBA", "P"])
def test_large_inputs_of_every_mode_match_read_input(monkeypatch, tmp_path, mode):
    image = textured_image(90, 260)
    picture = Image.fromarray(image).convert("RGBA" if mode == "RGBA" else "RGB")
    if mode == "L":
        picture = picture.convert("L")
    elif mode == "I;16":
        picture = Image.fromarray(image[:, :, 0].astype(np.uint16) * 200 + 7)
    elif mode == "P":
        picture = picture.quantize(16)
    path = tmp_path / f"x.{'tif' if mode == 'I;16' else 'png'}"
    picture.save(path)
    expected = read_input(path)
    monkeypatch.setattr(stages.seg.predict, "OVERLAY_MAX_SIDE", 100)
    item = load_input(path, 48)
    assert item["size"] == expected.shape[:2]
    assert np.array_equal(item["resized"], resize_long(expected, 48)), mode
    assert item["view"].shape == (30, 87, 3)  # reduced 3x


def test_a_large_turned_jpeg_is_decoded_reduced_and_shown_upright(monkeypatch, tmp_path):
    stored = textured_image(200, 600)  # stored 600 wide; EXIF orientation 6: displayed 200 x 600 upright
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    upright = read_input(tmp_path / "turned.jpg")
    assert upright.shape == (600, 200, 3)
    monkeypatch.setattr(stages.seg.predict, "OVERLAY_MAX_SIDE", 100)
    item = load_input(tmp_path / "turned.jpg", 64)
    assert item["size"] == (600, 200)
    expected = resize_long(upright, 64)
    assert item["resized"].shape == expected.shape == (64, 21, 3)
    # the overlay's 100 x 34 (600 x 200 reduced 6x) is covered by the JPEG decoder's own 1/4
    # scale (Pillow's draft): 150 x 50, reduced 2x, turned upright
    assert item["view"].shape == (75, 25, 3)
    # the model's input is resized from that draft: close to resizing the full decode, not equal
    assert np.abs(item["resized"].astype(int) - expected).mean() < 4


# ------------------------------------------------------------------------------ the bound


def test_pillows_bomb_guard_never_reaches_the_user(models, monkeypatch, tmp_path):
    """Pillow warns (raw) above its MAX_IMAGE_PIXELS and fails above twice that; wss applies
    its own bound instead, so both stay silent (here with Pillow's limit lowered to 1000)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = save_png(textured_image(64, 48), tmp_path / "scan.png")  # 3072 pixels: Pillow would refuse it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = predict_inputs(models["binary"], [path], tmp_path / "out", device="cpu")
        assert read_input(path).shape == (64, 48, 3)
        assert read_rgb(path).shape == (64, 48, 3)  # the prepared-data readers open images alike
    assert report.written == ["scan"] and not report.failures
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert Image.MAX_IMAGE_PIXELS == 1000  # Pillow's setting is back as it was


def test_an_image_over_max_pixels_is_refused_in_one_line_before_decoding(models, monkeypatch, tmp_path):
    png = save_png(textured_image(64, 48), tmp_path / "big.png")
    dicom = tmp_path / "scan.dcm"
    write_dicom(dicom, np.full((64, 48), 100, np.uint8))
    fine = save_png(textured_image(40, 40), tmp_path / "fine.png")

    def no_decoding(*args):
        raise AssertionError("pixel data decoded")

    monkeypatch.setattr("data.dicom._decode_pixels", no_decoding)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(
        DataError,
        match=r"big.png: image of 48x64 pixels \(0.0 megapixels\) is larger than the "
        r"3000 pixels accepted \(wss predict --max-pixels moves the bound\)",
    ):
        read_input(png, max_pixels=3000)
    with pytest.raises(DataError, match=r"scan.dcm: image of 48x64 pixels .* larger than the 3000 pixels"):
        read_input(dicom, max_pixels=3000)
    monkeypatch.undo()

    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  root: {tmp_path / 'none'}\nrun:\n  device: cpu\n  workers: 0\n")
    result = CliRunner().invoke(
        predict_command,
        [
            "-c",
            str(config),
            str(png),
            str(dicom),
            str(fine),
            "--out",
            str(tmp_path / "out"),
            "--artifact",
            str(models["binary"]),
            "--max-pixels",
            "3000",
        ],
    )
    assert result.exit_code == 1, result.output
    failed = [line for line in result.output.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 2 and all("larger than the 3000 pixels accepted" in line for line in failed)
    assert "Traceback" not in result.output and "DecompressionBomb" not in result.output
    assert (tmp_path / "out" / "masks" / "fine.png").is_file()
    assert "2 input(s) failed" in result.output


def test_prepare_and_prepared_datasets_refuse_an_image_over_the_bound(monkeypatch, tmp_path):
    """`wss prepare nih` skips (and reports) an image over data.images.MAX_IMAGE_PIXELS and
    prepares the others; a prepared dataset's reader refuses one in one line."""
    from data.nih import prepare_nih
    from tests.test_nih import write_entries

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((20, 30), 90, np.uint8)).save(images / "00000001_000.png")
    Image.fromarray(np.full((40, 60), 90, np.uint8)).save(images / "00000002_000.png")  # 2400 pixels
    write_entries(tmp_path / "entry.csv.gz", [("00000001_000.png", "Mass", "1"), ("00000002_000.png", "Mass", "2")])
    (tmp_path / "boxes.csv").write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n")
    monkeypatch.setattr(data.images, "MAX_IMAGE_PIXELS", 1000)
    report = prepare_nih(images, tmp_path / "entry.csv.gz", tmp_path / "boxes.csv", tmp_path / "out", progress=False)
    assert report.counts["prepared"] == 1
    [problem] = report.problems
    assert problem.where.endswith("00000002_000.png")
    assert problem.message == "image of 60x40 pixels (0.0 megapixels) is larger than the 1000 pixels accepted"
    dataset = PreparedDataset(tmp_path / "out")
    monkeypatch.setattr(data.images, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(DataError, match="00000001_000.png: image of 30x20 pixels .* larger than the 500 pixels"):
        dataset.read_image("00000001_000")


# ------------------------------------------------------------------------------ memory


def test_overlay_blends_in_uint8_as_in_float32():
    """The blend table gives the float32 blend of every pixel to the last digit, without a float
    copy of the image."""
    rng = np.random.default_rng(0)
    for alpha in (0.5, 0.3, 0.77):
        image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
        mask = rng.integers(0, 7, (50, 70)).astype(np.uint8)
        mask[0, :5] = 255
        palette = rng.integers(0, 256, (5, 3)).tolist()
        reference = image.astype(np.float32)
        shown = (mask > 0) & (mask < len(palette))
        colours = np.zeros((256, 3), np.float32)
        colours[: len(palette)] = palette
        reference[shown] = (1 - alpha) * reference[shown] + alpha * colours[mask[shown]]
        assert np.array_equal(overlay(image, mask, palette, alpha), np.round(reference).astype(np.uint8))
    image = rng.integers(0, 256, (2000, 2000, 3), dtype=np.uint8)
    mask = (rng.random((2000, 2000)) < 0.5).astype(np.uint8)
    tracemalloc.start()
    try:
        overlay(image, mask, [[0, 0, 0], [255, 0, 0]])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6 * 2000 * 2000, f"{peak / 2**20:.0f} MiB"  # a float32 copy alone is 12 bytes a pixel


def test_stretching_deep_grayscale_works_a_chunk_at_a_time():
    rng = np.random.default_rng(1)
    arrays = [
        rng.integers(0, 65535, (37, 23)).astype(np.uint16),
        rng.normal(0, 1, (5, 4, 3)).astype(np.float32),
        rng.integers(-5000, 5000, (1, 9)).astype(np.int32),
        np.full((4, 4), 7, np.uint16),
    ]
    for values in arrays:
        wide = values.astype(np.float64)
        low, high = wide.min(), wide.max()
        expected = (
            np.zeros(values.shape, np.uint8)
            if high <= low
            else np.round((wide - low) * (255.0 / (high - low))).astype(np.uint8)
        )
        assert np.array_equal(stretch_to_uint8(values), expected)
    values = rng.integers(0, 4096, (3000, 3000)).astype(np.uint16)
    tracemalloc.start()
    try:
        stretch_to_uint8(values)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 48 * 2**20, f"{peak / 2**20:.0f} MiB"  # float64 copies of the whole: 72 MB each


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {repo!r})
    import torch
    torch.set_num_threads(1)
    from stages.seg.predict import predict_inputs

    def peak_mib():
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("VmHWM")) / 1024

    def resident_mib():
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * 4096 / 2**20

    artifact, small, large, out = sys.argv[1:5]
    predict_inputs(artifact, [small], out + "/small", device="cpu", workers=0)  # libraries and model warm
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # the peak starts again from what is resident now
    before = resident_mib()
    report = predict_inputs(artifact, [large], out + "/large", device="cpu", workers=0)
    print(json.dumps({{"extra_mib": peak_mib() - before, "written": report.written}}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (peak RSS reset)")
def test_predicting_a_large_image_takes_memory_by_its_pixels_not_many_copies(models, tmp_path):
    """6000 x 6000 RGB: 36 megapixels, 144 MB as Pillow holds it decoded. The extra peak over
    the same process predicting a small image stays under 16 bytes a pixel (decoding takes 4,
    the mask 1, the reduced overlay little; measured 6-9, the allocator keeping some freed
    memory); with whole-image arrays (float32 probabilities and overlay, several uint8 copies
    of the image) it was 54 (1.9 GiB)."""
    side = 6000
    gradient = np.linspace(0, 255, side).astype(np.uint8)
    picture = Image.new("RGB", (side, side))
    for top in range(0, side, 500):  # bands of rows: the test itself needs no full-size array
        band = np.stack(np.broadcast_arrays(gradient[None, :], np.uint8(top * 255 // side), gradient[::-1][None, :]), 2)
        picture.paste(Image.fromarray(np.ascontiguousarray(np.broadcast_to(band, (500, side, 3)))), (0, top))
    picture.save(tmp_path / "large.png", compress_level=1)
    del picture
    save_png(textured_image(64, 64), tmp_path / "small.png")
    script = tmp_path / "measure.py"
    script.write_text(MEMORY_SCRIPT.format(repo=str(REPO)))
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            str(models["binary"]),
            str(tmp_path / "small.png"),
            str(tmp_path / "large.png"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["written"] == ["large"]
    assert read_index_png(tmp_path / "large" / "masks" / "large.png").shape == (side, side)
    assert result["extra_mib"] < 16 * side * side / 2**20, result


def test_the_folder_and_coco_readers_refuse_an_image_over_the_bound(monkeypatch, tmp_path):
    """The readers of `wss prepare folder` (images and masks) and `wss prepare coco` (its JPEG
    check) open files through data.images.open_image: one line naming the file, no decoding."""
    import data.images
    from data.errors import DataError
    from data.image_files import image_file_size, read_image_file

    path = tmp_path / "wide.png"
    Image.new("L", (50, 40)).save(path)
    monkeypatch.setattr(data.images, "MAX_IMAGE_PIXELS", 1000)
    for read in (read_image_file, image_file_size):
        with pytest.raises(DataError, match=r"wide\.png: image of 50x40 pixels .* larger than the 1000 pixels"):
            read(path)
