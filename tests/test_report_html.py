"""The run report's pictures and report.html: training curves in report.md, wss compare's bar
chart, and one self-contained page (images as data: URIs, no address) that a real browser
(headless Chromium) renders with its tables and decoded images."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from pipeline.report import write_run_report
from pipeline.runner import Outcome
from pipeline.settings_diff import Difference
from tests.helpers import DEMO_CONFIG, FAST_CAM, overrides

LONG_ID = "1.2.276.0.7230010.3.1.4.8323329.5597.1517875188.959090"
SPLITS = {"train": "train", "val": "val"}


def decodes(data: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.size


def trained_artifact(folder, epochs=3):
    """An artifact folder as a trained stage leaves it: manifest.json and metrics.jsonl."""
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"started": 1_800_000_000.0, "seconds": 12.5}))
    records = [
        {"stage_step": "cam", "epoch": e, "loss": 1.0 / e, "cls": 0.5 / e, "images_per_s": 40.0 + e, "seconds": 2.0}
        for e in range(1, epochs + 1)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def a_report(tmp_path):
    cam = trained_artifact(tmp_path / "cam-0123456789ab")
    pseudo = tmp_path / "pseudo-0123456789ab"
    pseudo.mkdir()
    outcomes = [
        Outcome(
            "cam", "ran", cam, 12.5, {"cam_miou": 0.42, "cam_iou/background": 0.9, "cam_iou/ring": 0.1}, "cam_miou"
        ),
        Outcome("pseudo", "cached", pseudo, 3.0, {"pseudo_miou": 0.5}, "pseudo_miou", ["a.png: unreadable <b>"]),
    ]
    grid = tmp_path / "overlays-irn.png"
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(grid)
    settings = {
        "cam": ("configs/demo.yaml", [Difference("cam.lr", 0.003, 0.001)]),
        "pseudo": ("configs/demo.yaml", []),
    }
    captions = {"irn": [f"{LONG_ID}: ring, cross", "short: no finding"]}
    write_run_report(tmp_path, "configs/demo.yaml", outcomes, SPLITS, {"irn": grid}, settings, captions)
    return tmp_path


def test_report_md_links_a_curves_png_per_trained_stage(tmp_path):
    root = a_report(tmp_path)
    text = (root / "report.md").read_text()
    assert "![cam: loss and images/s per epoch](curves-cam.png)" in text
    assert not (root / "curves-pseudo.png").exists()  # pseudo trains nothing
    width, height = decodes((root / "curves-cam.png").read_bytes())
    assert width > 300 and height > 100
    assert "| cam.lr | 0.003 | 0.001 |" in text and "pseudo: the settings of configs/demo.yaml" in text
    report = json.loads((root / "report.json").read_text())
    assert report["timings"][0]["epochs"] == 3 and report["timings"][0]["training_seconds"] == 6.0
    assert report["settings"]["cam"]["differences"] == [
        {"setting": "cam.lr", "this run": "0.003", "reference": "0.001"}
    ]


def test_a_broken_metrics_log_costs_only_its_curves(tmp_path):
    cam = tmp_path / "cam-x"
    cam.mkdir()
    (cam / "metrics.jsonl").write_text('{"epoch": 1, "loss": 0.5}\nnot json\n{"epoch": "two"}\n')
    outcomes = [Outcome("cam", "ran", cam, 1.0, {"cam_miou": 0.4}, "cam_miou")]
    write_run_report(tmp_path, "demo.yaml", outcomes, SPLITS, {})
    assert decodes((tmp_path / "curves-cam.png").read_bytes())
    assert (tmp_path / "report.html").is_file()


def test_compare_bar_chart_has_a_panel_per_numeric_column(tmp_path):
    from pipeline.compare import comparison_chart

    rows = [
        {"method": "gap", "state": "ran", "cam_miou": 0.31, "cls_mean_auc": 0.8, "parameters": 11_000_000},
        {"method": "pcam", "state": "cached", "cam_miou": 0.42, "cls_mean_auc": float("nan"), "parameters": 11_000_001},
    ]
    path = comparison_chart(rows, ["method", "state", "cam_miou", "cls_mean_auc", "parameters"], tmp_path / "c.png")
    assert path == tmp_path / "c.png" and decodes(path.read_bytes())[0] > 300
    assert comparison_chart([{"method": "gap", "state": "ran"}], ["method", "state"], tmp_path / "d.png") is None


DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def test_report_html_is_self_contained(tmp_path):
    root = a_report(tmp_path)
    page = (root / "report.html").read_text()
    text = DATA_URI.sub("", page)
    assert not re.search(r"(https?:|file:|ftp:|//[a-z0-9])", text, re.I) and "url(" not in text  # no address
    assert "<script" not in page and "<link" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    images = DATA_URI.findall(page)
    assert len(sources) == len(images) == 2  # the cam curves and the grid, nothing else
    assert all(decodes(base64.b64decode(data)) for data in images)
    assert LONG_ID in page  # the grid's caption holds the full id the picture shortens
    assert "a.png: unreadable &lt;b&gt;" in page  # text is escaped
    for heading in ("Stages", "Metrics", "Per-class IoU", "Timings", "Overlay grids", "Failures"):
        assert f">{heading}</h" in page
    assert "<td>cam.lr</td>" in page and "2027-01-15" in page  # the settings, when the stage started


def chromium():
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    pytest.skip("no chromium or chromium-browser binary (Debian: apt-get install chromium; .ci/run installs it)")


def browse(page, tmp_path, *args) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    return subprocess.run(
        [chromium(), *flags, *args, page.as_uri()], capture_output=True, text=True, timeout=120, check=True
    )


def test_chromium_renders_the_tables_and_decodes_every_image(tmp_path):
    root = a_report(tmp_path / "report")
    # a copy with a probe that writes what the browser made of each image into the DOM
    probe = (
        "<script>addEventListener('load', () => { for (const img of document.images) "
        "img.setAttribute('data-natural', img.naturalWidth + 'x' + img.naturalHeight); "
        "document.body.setAttribute('data-loaded', document.images.length); });</script></body>"
    )
    probed = tmp_path / "probed.html"
    probed.write_text((root / "report.html").read_text().replace("</body>", probe))
    dom = browse(probed, tmp_path, "--virtual-time-budget=5000", "--dump-dom").stdout
    assert 'data-loaded="2"' in dom, dom[:2000]
    sizes = re.findall(r'data-natural="(\d+)x(\d+)"', dom)
    assert len(sizes) == 2 and all(int(w) > 0 and int(h) > 0 for w, h in sizes)
    assert (60, 40) in [(int(w), int(h)) for w, h in sizes]  # the grid, at its own size
    assert dom.count("<table") >= 5 and "cam.lr" in dom and LONG_ID in dom

    shot = tmp_path / "shot.png"
    browse(root / "report.html", tmp_path, "--window-size=1200,2000", f"--screenshot={shot}")
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (2000, 1200)
    assert pixels.min() < 100 and pixels.max() > 200 and len(np.unique(pixels)) > 20  # text and pictures drawn


# ------------------------------------------------------------------------------ `wss run`


def test_wss_run_writes_report_html_with_curves_settings_and_the_grid(cli, tiny_synthetic, tmp_path):
    values = {"data.root": tiny_synthetic, "run.workdir": tmp_path, **FAST_CAM, "cam.epochs": "2"}
    result = cli("run", "-c", DEMO_CONFIG, *overrides(values), "--until", "cam", "-o", "run.tensorboard=false")
    assert result.exit_code == 0, result.output
    root = tmp_path / "synthetic"
    assert "![cam: loss and images/s per epoch](curves-cam.png)" in (root / "report.md").read_text()
    page = (root / "report.html").read_text()
    images = DATA_URI.findall(page)
    assert len(images) == 2 and all(decodes(base64.b64decode(data)) for data in images)
    assert "<td>cam.epochs</td><td>2</td><td>14</td>" in page  # demo.yaml trains 14
    assert "<td>run.tensorboard</td>" not in page  # not a setting of the artifact
    assert not (root / "tensorboard").exists()


def test_wss_compare_writes_and_links_its_bar_chart(tiny_synthetic, tmp_path):
    from click.testing import CliRunner

    from pipeline.compare import compare_command

    values = {"data.root": tiny_synthetic, "run.workdir": tmp_path, **FAST_CAM, "cam.epochs": "1"}
    args = ["-c", str(DEMO_CONFIG), *[str(a) for a in overrides(values)], "--methods", "gap", "--limit", "16"]
    result = CliRunner().invoke(compare_command, [*args, "--out", str(tmp_path / "cmp")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (
        "![The table's scores as bars, one panel per column](compare.png)"
        in (tmp_path / "cmp" / "compare.md").read_text()
    )
    assert decodes((tmp_path / "cmp" / "compare.png").read_bytes())[0] > 300
    assert str(tmp_path / "cmp" / "compare.png") in result.output
