"""The configs users start from: each loads, every method preset layers over each, each dataset
config passes the segmenter's checks on its dataset (folder.yaml on a binary and a multiclass
folder), and configs/siim.yaml runs its whole chain on the real SIIM samples as `wss prepare siim`
writes them (configs/folder.yaml runs every command in tests/test_folder_e2e.py).

Only what makes the run fit a test is overridden (no ImageNet download, small images, one or two
epochs); the rest is the shipped file: DropBlock classifier with BCE, IRN on positive images
only, a Unet with BCE + Dice, checkpoint chosen on held-out pseudo-labels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data.coco import prepare_coco
from data.folder import prepare_folder
from data.layout import PreparedDataset, read_index_png
from data.siim import prepare_siim
from data.voc import prepare_voc
from pipeline.config import load_config
from stages.seg.stage import SegStage
from tests.helpers import REPO, overrides

SAMPLES = REPO.parent / "shared" / "samples"
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
PRESETS = sorted((REPO / "configs" / "methods").glob("*.yaml"))

# What a test changes in configs/siim.yaml: offline, 128 px, minutes -> seconds.
SMALL_SIIM = {
    "cam.weights": "null",
    "cam.backbone": "resnet18",
    "cam.epochs": "1",
    "cam.batch_size": "4",
    "cam.crop_size": "128",
    "cam.resize_long": "[112,144]",
    "cam.scales": "[1.0]",
    "irn.epochs": "1",
    "irn.batch_size": "4",
    "irn.crop_size": "128",
    "irn.resize_long": "[112,144]",
    "seg.encoder": "resnet18",
    "seg.encoder_weights": "null",
    "seg.epochs": "2",
    "seg.batch_size": "4",
    "seg.crop_size": "128",
    "seg.resize_long": "[128,128]",
    "run.workers": "0",
    "run.device": "cpu",
}


def need(folder: Path) -> None:
    if not folder.is_dir():
        pytest.skip(f"shared samples not found: {folder}")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.source == str(path)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
@pytest.mark.parametrize("base", CONFIGS, ids=lambda p: p.stem)
def test_every_method_preset_layers_over_every_dataset_config(base, preset):
    cfg = load_config([base, preset])
    assert cfg.cam.method == preset.stem
    assert cfg.data.root == load_config(base).data.root


@pytest.fixture(scope="module")
def siim_samples(tmp_path_factory) -> Path:
    need(SAMPLES / "siim" / "dicom")
    out = tmp_path_factory.mktemp("siim") / "prepared"
    prepare_siim(
        SAMPLES / "siim" / "dicom",
        SAMPLES / "siim" / "train-rle-sample.csv",
        out,
        size=128,
        val_fraction=0.2,
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def voc_samples(tmp_path_factory) -> Path:
    need(SAMPLES / "voc" / "VOCdevkit")
    out = tmp_path_factory.mktemp("voc") / "prepared"
    prepare_voc(SAMPLES / "voc", out, progress=False)
    return out


@pytest.fixture(scope="module")
def coco_samples(tmp_path_factory) -> Path:
    coco = SAMPLES / "coco"
    need(coco / "train2014")
    out = tmp_path_factory.mktemp("coco") / "prepared"
    prepare_coco(
        coco / "annotations" / "instances_train2014.json",
        coco / "train2014",
        out,
        coco / "annotations" / "instances_val2014.json",
        coco / "val2014",
        progress=False,
    )
    return out


def prepared_folder(tmp_path_factory, variant: str) -> Path:
    from tests.test_folder import make_user_folder

    case = make_user_folder(tmp_path_factory.mktemp("user"), n=8, variant=variant, formats=False)
    out = tmp_path_factory.mktemp("folder") / "prepared"
    prepare_folder(
        case["images"], case["csv"], out, masks_dir=case["masks"], classes_file=case["classes_file"], progress=False
    )
    return out


@pytest.fixture(scope="module")
def folder_binary(tmp_path_factory) -> Path:
    return prepared_folder(tmp_path_factory, "binary")


@pytest.fixture(scope="module")
def folder_multiclass(tmp_path_factory) -> Path:
    return prepared_folder(tmp_path_factory, "multiclass")


@pytest.mark.parametrize(
    "name, dataset_fixture",
    [
        ("siim", "siim_samples"),
        ("voc", "voc_samples"),
        ("coco", "coco_samples"),
        ("folder", "folder_binary"),
        ("folder", "folder_multiclass"),
    ],
)
def test_the_segmenter_of_each_dataset_config_passes_its_checks_on_that_dataset(
    name, dataset_fixture, request, monkeypatch
):
    """What `wss run` checks before training (architecture, encoder, losses for the task, crop),
    up to the last check: getting the ImageNet encoder weights, which fails offline."""
    import segmentation_models_pytorch.encoders as encoders

    from stages.seg.model import SegModelError

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(encoders, "hf_hub_download", offline)
    root = request.getfixturevalue(dataset_fixture)
    cfg = load_config(REPO / "configs" / f"{name}.yaml", [f"data.root={root}"])
    assert cfg.seg.encoder_weights == "imagenet"
    with pytest.raises(SegModelError, match=f"could not download ImageNet weights for encoder {cfg.seg.encoder}"):
        SegStage().preflight(cfg, PreparedDataset(root))


@pytest.mark.parametrize(
    "name, dataset_fixture",
    [("voc", "voc_samples"), ("coco", "coco_samples"), ("folder", "folder_binary"), ("folder", "folder_multiclass")],
)
def test_dataset_config_status_on_its_prepared_dataset(cli, name, dataset_fixture, request, tmp_path):
    root = request.getfixturevalue(dataset_fixture)
    result = cli(
        "status", "-c", REPO / "configs" / f"{name}.yaml", "-o", f"data.root={root}", "-o", f"run.workdir={tmp_path}"
    )
    assert result.exit_code == 0, result.output
    for stage in ("cam", "irn", "pseudo", "seg"):
        assert stage in result.output
    assert "missing" in result.output


@pytest.mark.slow
def test_siim_config_runs_the_whole_chain_on_the_real_samples(cli, siim_samples, tmp_path):
    dataset = PreparedDataset(siim_samples)
    args = [
        "-c",
        REPO / "configs" / "siim.yaml",
        "-o",
        f"data.root={siim_samples}",
        "-o",
        f"run.workdir={tmp_path}",
        *overrides(SMALL_SIIM),
    ]
    result = cli("run", *args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "siim" / "report.json").read_text())
    stages = {row["stage"]: row for row in report["stages"]}
    assert [stages[s]["state"] for s in ("cam", "irn", "pseudo", "seg")] == ["ran"] * 4
    assert stages["seg"]["metric"] == "seg_val_kaggle_dice"

    train = dataset.split("train")
    positives = [i for i in train if dataset.label_vector(i).any()]
    assert 0 < len(positives) < len(train)
    assert f"training on {len(positives)}" in result.output  # irn.positive_only: the positives' seeds
    pseudo = Path(stages["pseudo"]["artifact"]) / "pseudo_labels"
    for image_id in train:
        label = read_index_png(pseudo / f"{image_id}.png")
        assert label.shape == (128, 128) and set(np.unique(label)) <= {0, 1}
        if image_id not in positives:
            assert not label.any(), f"negative image {image_id} got foreground pseudo-labels"

    again = cli("run", *args)
    assert again.exit_code == 0, again.output
    assert again.output.count("up to date") == 4
