"""Issue 3's end-to-end proof: on the synthetic benchmark, stage 2 makes the CAMs better.

`configs/demo.yaml` as it is, on the demo's own benchmark (400 images of 128 px, seed 0):
cam -> irn -> pseudo, about 5 minutes on a 2-core CPU. The pseudo-label mIoU must beat the CAM
mIoU of the same train split (at the demo's fixed threshold) by MARGIN, and the CAMs must beat
the trivial baselines. Measured with this setup (cam_miou -> pseudo_miou, train split):

    seed 0 (this test, = `make demo`): 0.572 -> 0.749
    seed 1 (the development set):      0.598 -> 0.746
    seed 2:                            0.571 -> 0.762
    after 2026-11-30's loader change (uint8 batches normalised on the device, another shuffle
    order: rounding-level changes, yet another training trajectory):
    seed 0: 0.555 -> 0.731; seed 1: 0.585 -> 0.756

Smaller benchmarks are not stable enough to test on: with 200 images the from-scratch
classifier found the marks for seeds 0 and 1 (0.505 -> 0.651, 0.513 -> 0.614) but not for
seed 2 (CAM 0.360), and stage 2 cannot refine CAMs that point at the wrong place (0.236).
"""

from __future__ import annotations

import json

import pytest

from data.layout import PreparedDataset
from tests.helpers import DEMO_CONFIG, invoke_cli
from tests.test_cam_stage import trivial_baselines

pytestmark = pytest.mark.slow

MARGIN = 0.08


@pytest.fixture(scope="module")
def chain(tmp_path_factory, synthetic_dataset):
    root = synthetic_dataset(n=400, size=128, seed=0)
    workdir = tmp_path_factory.mktemp("quality")
    result = invoke_cli(
        "run", "-c", DEMO_CONFIG, "-o", f"data.root={root}", "-o", f"run.workdir={workdir}", "--until", "pseudo"
    )
    assert result.exit_code == 0, result.output + str(result.exception)
    report = json.loads((workdir / "synthetic" / "report.json").read_text())
    return root, {row["metric"]: row["value"] for row in report["stages"]}


def test_pseudo_labels_beat_the_cams_by_a_clear_margin(chain):
    _, values = chain
    cam, pseudo = values["cam_miou"], values["pseudo_miou"]
    assert pseudo >= cam + MARGIN, f"pseudo-label mIoU {pseudo:.3f} vs CAM mIoU {cam:.3f}"


def test_cams_beat_the_trivial_baselines(chain):
    root, values = chain
    data = PreparedDataset(root)
    all_background, whole_image = trivial_baselines(data, data.split("train"))
    assert values["cam_miou"] > max(all_background, whole_image) + 0.1, (values["cam_miou"], all_background)
