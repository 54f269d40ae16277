"""Code versions follow the code a stage's results depend on: the import closure of its module,
hashed without comments and docstrings. Edits are made to a copy of the repository's packages."""

from __future__ import annotations

import shutil

import pytest

import stages.code_version
from stages.base import NOT_RESULT_BEARING
from stages.code_version import PACKAGES, code_version, import_closure
from stages.registry import all_stages
from tests.helpers import REPO
from tests.test_cache import make_pipeline

STAGES = all_stages()


@pytest.fixture
def copy(tmp_path):
    """A copy of pipeline/, stages/ and data/ to edit."""
    root = tmp_path / "repo"
    for package in PACKAGES:
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def versions(root) -> dict[str, str]:
    return {name: code_version(stage.code_modules(), root, skip=NOT_RESULT_BEARING) for name, stage in STAGES.items()}


def edit(root, module: str, old: str, new: str) -> None:
    path = root / (module.replace(".", "/") + ".py")
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} in {path}"
    path.write_text(text.replace(old, new))


def test_the_copy_has_the_versions_of_the_repository(copy):
    assert versions(copy) == {name: stage.code_version() for name, stage in STAGES.items()}


def test_comments_docstrings_and_line_breaks_keep_every_version(copy):
    before = versions(copy)
    edit(copy, "stages.cam.stage", "class CamStage(Stage):\n", "class CamStage(Stage):  # stage 1\n")
    edit(
        copy,
        "stages.cam.stage",
        '"""Stage `cam`: train the classifier',
        '"""Stage `cam` (edited): train the classifier',
    )
    edit(
        copy,
        "stages.common.scoring",
        "    def miou(self) -> float:\n",
        '    def miou(self) -> float:\n        """The mean IoU so far."""\n',
    )
    edit(copy, "stages.irn.stage", 'needs = ("cam",)', 'needs = (\n        "cam",\n    )')
    assert versions(copy) == before


def test_code_of_an_imported_module_changes_the_versions_that_import_it(copy):
    before = versions(copy)
    # imported by cam, irn and pseudo, and by seg through the classifier its empty-mask rule can score with
    edit(copy, "stages.cam.infer", "CAM_STRIDE = 4", "CAM_STRIDE = 8")
    after = versions(copy)
    assert {name for name in STAGES if after[name] != before[name]} == {"cam", "irn", "pseudo", "seg"}
    edit(copy, "stages.irn.random_walk", "def random_walk(", "def random_walk_one(")  # the walk: irn, pseudo only
    again = versions(copy)
    assert {name for name in STAGES if again[name] != after[name]} <= {"irn", "pseudo"}
    assert again["pseudo"] != after["pseudo"] and again["seg"] == after["seg"] and again["cam"] == after["cam"]


def test_a_stage_module_changes_only_its_own_version(copy):
    before = versions(copy)
    edit(copy, "stages.seg.stage", 'PREDICTIONS = "predictions"', 'PREDICTIONS = "predicted"')
    after = versions(copy)
    assert {name for name in STAGES if after[name] != before[name]} == {"seg"}


def test_the_nih_reader_is_not_in_any_stage_and_the_box_reader_is_in_cam(copy):
    """data/nih.py prepares NIH; the cam stage reads only the prepared boxes (data/boxes.py),
    which decide the images that get boxed CAMs."""
    before = versions(copy)
    edit(copy, "data.nih", 'NO_FINDING = "No Finding"', 'NO_FINDING = "No finding"')
    assert versions(copy) == before
    edit(copy, "data.boxes", 'BOXES_NAME = "boxes.csv"', 'BOXES_NAME = "boxes-v2.csv"')
    after = versions(copy)
    assert {name for name in STAGES if after[name] != before[name]} == {"cam"}


def test_tables_are_not_result_bearing(copy):
    before = versions(copy)
    edit(copy, "stages.common.tables", '"-" if math.isnan(value)', '"n/a" if math.isnan(value)')
    assert versions(copy) == before


def test_the_closures_hold_what_the_stages_run_and_nothing_of_the_cli(copy):
    closures = {name: import_closure(stage.code_modules(), copy, NOT_RESULT_BEARING) for name, stage in STAGES.items()}
    assert {"stages.cam.localization", "data.boxes", "stages.cam.pylon"} <= set(closures["cam"])
    assert {"stages.irn.random_walk", "stages.irn.walk_kernel", "stages.irn.net"} <= set(closures["pseudo"])
    # seg reads the cam trunk file (encoder_weights: cam) and the classifier (seg.image_score: cam)
    assert {"stages.cam.model_file", "stages.cam.classifier", "stages.seg.postprocess"} <= set(closures["seg"])
    assert "stages.irn.random_walk" not in closures["seg"]
    for name, closure in closures.items():
        assert not [m for m in closure if m.startswith("pipeline") or m in ("data.nih", "stages.common.tables")]
        assert not [m for m in closure if m.endswith(".stage") and m != STAGES[name].code_modules()[0]]


def test_a_voc_cam_key_follows_the_code_it_runs_not_the_nih_reader(tmp_path, copy, monkeypatch):
    """Through the key itself, on a prepared (tiny) VOC dataset."""
    from data.voc import prepare_voc
    from tests.test_voc import class_mask, make_tree

    make_tree(
        tmp_path / "voc", ["a", "b"], {"a": class_mask(1), "b": class_mask(5)}, {"train": ["a"], "val": ["b"]}, {}
    )
    prepare_voc(tmp_path / "voc", tmp_path / "prepared", progress=False)
    monkeypatch.setattr(stages.code_version, "SOURCE_ROOT", copy)

    def cam_key() -> str:
        return make_pipeline(tmp_path / "prepared", tmp_path / "runs").key("cam").digest

    before = cam_key()
    edit(
        copy,
        "data.nih",
        "    return [int(name in names) for name in FINDINGS]",
        "    return [int(name in names) for name in reversed(FINDINGS)]",
    )
    edit(copy, "stages.cam.stage", '    return "cam_miou"\n', '    return "cam_miou"  # the default\n')
    assert cam_key() == before
    edit(
        copy,
        "stages.cam.scoring",
        "THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))",
        "THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 19))",
    )
    assert cam_key() != before
