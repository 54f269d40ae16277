"""The config models: bounds that belong to a field (never to a name), the CAM method registry
that the `cam` section is derived from, the pseudo marker of irn settings, and the strict types
of the shared Section base."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from pydantic import Field, ValidationError

from stages.cam.config import CamConfig, cam_config_model, method_of_setting, other_methods_settings
from stages.cam.methods import METHODS, CamMethod, build_cam_net
from stages.common.crf import CrfParams
from stages.common.settings import Float, Section, describe_error, field_type, literal_choices
from stages.irn.config import IrnConfig, pseudo_settings

REPO = Path(__file__).resolve().parents[1]


def refusal(model, raw: dict, prefix: str = "") -> str:
    with pytest.raises(ValidationError) as refused:
        model.model_validate(raw)
    return describe_error(refused.value, model, prefix)


# ------------------------------------------------------------------------------ bounds per field
class Probability(Section):
    threshold: Float = Field(0.5, ge=0, le=1)


class Count(Section):
    threshold: Float = Field(5.0, ge=0)


class TwoSections(Section):
    a: Probability = Field(default_factory=Probability)
    b: Count = Field(default_factory=Count)


def test_two_fields_of_one_name_keep_their_own_bounds():
    """A bound belongs to the field that declares it: `threshold` in [0, 1] in one section does
    not cap a `threshold` of another."""
    assert TwoSections.model_validate({"b": {"threshold": 30}}).b.threshold == 30.0
    assert refusal(TwoSections, {"a": {"threshold": 30}}) == "a.threshold must be in [0, 1], got 30.0"
    assert refusal(TwoSections, {"b": {"threshold": -1}}) == "b.threshold must be >= 0, got -1.0"


def test_the_real_sections_declare_their_bounds_per_field():
    """`radius` (the IRN's pairs) and `walk_radius` differ; `seg.threshold` is a probability."""
    assert refusal(IrnConfig, {"radius": 1}, "irn") == "irn.radius must be >= 2, got 1"
    assert IrnConfig(walk_radius=1).walk_radius == 1
    assert refusal(IrnConfig, {"walk_radius": 0}, "irn") == "irn.walk_radius must be >= 1, got 0"


def test_every_default_passes_its_own_bounds():
    """validate_default: a default outside its bounds fails at import; here, every section builds."""
    for model in (CamConfig, IrnConfig, CrfParams):
        assert model().model_dump() == model.model_validate(model().model_dump()).model_dump()


# ------------------------------------------------------------------------------ strict types
@pytest.mark.parametrize(
    "raw, problem",
    [
        ({"threshold": True}, "threshold must be a number, got True"),
        ({"threshold": "high"}, "threshold must be a number, got 'high'"),
        ({"threshold": float("inf")}, "threshold must be a finite number, got inf"),
        ({"thresholds": 0.3}, "unknown key 'thresholds' (did you mean 'threshold'?)"),
    ],
)
def test_a_section_is_strict(raw, problem):
    assert refusal(Probability, raw) == problem


def test_of_several_problems_the_first_as_a_reader_meets_them_is_told():
    """Sections and keys in their declared order; in a section, an unknown key before the values."""
    assert (
        refusal(TwoSections, {"b": {"threshold": -1, "zz": 1}, "a": {"threshold": 2}})
        == "a.threshold must be in [0, 1], got 2.0"
    )
    assert (
        refusal(TwoSections, {"a": {"threshold": 2, "treshold": 1}})
        == "unknown key 'a.treshold' (did you mean 'a.threshold'?)"
    )


def test_yaml_spellings_of_numbers_and_an_empty_section():
    assert Probability.model_validate({"threshold": "1e-1"}).threshold == 0.1  # PyYAML reads 1e-1 as text
    assert Probability.model_validate({"threshold": 1}).threshold == 1.0
    assert isinstance(Probability.model_validate({"threshold": 1}).threshold, float)
    assert TwoSections.model_validate({"a": None}).a == Probability()  # keys commented out: nothing set


def test_the_crf_parameters_are_one_frozen_value():
    params = CrfParams()
    assert params == CrfParams() and hash(params) == hash(CrfParams())
    with pytest.raises(ValidationError):
        params.iterations = 3
    assert refusal(CrfParams, {"gt_prob": 1}, "irn.crf") == "irn.crf.gt_prob must be in (0, 0.99], got 1.0"


def test_a_section_travels_to_worker_processes():
    cfg = CamConfig(method="pylon", scales=[1.0, 0.5])
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert pickle.loads(pickle.dumps(IrnConfig())).crf == CrfParams()


# ------------------------------------------------------------------------------ the pseudo marker
def test_the_pseudo_stage_settings_are_those_marked():
    assert pseudo_settings() == {
        "walk_radius",
        "beta",
        "exp_times",
        "sem_seg_bg_threshold",
        "refine_crf",
        "refine_crf_params",
    }


# ------------------------------------------------------------------------------ the CAM method registry
class ToySettings(Section):
    toy_width: int = Field(8, ge=2, description="The toy's width.")


def toy_net(cfg, num_classes, weights):
    return SimpleNamespace(width=cfg.toy_width, classes=num_classes, backbone=SimpleNamespace(freeze=lambda *a: None))


TOY = CamMethod(toy_net, ToySettings)


def test_a_registered_method_is_a_choice_of_cam_method_with_its_flat_settings():
    """One registry entry: `cam.method` takes its name, its settings are `cam.<name>` with their
    bounds and defaults, and they stay out of the key of every other method."""
    methods = {**METHODS, "toy": TOY}
    model = cam_config_model(methods)
    assert literal_choices(field_type(model.model_fields["method"])) == (*METHODS, "toy")
    cfg = model.model_validate({"method": "toy", "toy_width": 4})
    assert cfg.toy_width == 4 and model().toy_width == 8
    assert refusal(model, {"toy_width": 1}, "cam") == "cam.toy_width must be >= 2, got 1"
    assert "toy_width" not in other_methods_settings(cfg, methods)
    assert "toy_width" in other_methods_settings(model(method="gap"), methods)
    assert "pylon_channels" in other_methods_settings(cfg, methods)
    fields = list(model.model_fields)
    assert fields[0] == "method" and fields.index("freeze_bn") < fields.index("toy_width") < fields.index("extract")
    assert "toy" not in literal_choices(field_type(CamConfig.model_fields["method"]))  # the real registry lacks it


def test_the_entry_is_all_that_builds_the_net(monkeypatch):
    monkeypatch.setitem(METHODS, "toy", TOY)
    cfg = cam_config_model(METHODS)(method="toy", toy_width=3)
    net = build_cam_net(cfg, 5)
    assert (net.width, net.classes) == (3, 5)


@pytest.mark.parametrize("clash", ["lr", "pylon_channels"])
def test_a_method_setting_may_not_take_a_name_the_section_has(clash):
    settings = type("Clash", (Section,), {"__annotations__": {clash: int}, clash: Field(1)})
    with pytest.raises(ValueError, match=f"its setting '{clash}' is already a cam setting"):
        cam_config_model({**METHODS, "clash": CamMethod(toy_net, settings)})


def test_every_preset_sets_its_own_method_and_only_its_settings():
    """configs/methods/<method>.yaml: the method, maybe `loss`, and the settings of that method."""
    owners = method_of_setting()
    for preset in sorted((REPO / "configs" / "methods").glob("*.yaml")):
        cam = yaml.safe_load(preset.read_text())["cam"]
        assert cam["method"] == preset.stem in METHODS
        assert {owners[key] for key in cam if key not in ("method", "loss")} <= {preset.stem}, preset.name
