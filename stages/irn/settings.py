"""Which settings of the irn section make which artifact: the trained IRN (stage irn) or the
pseudo-labels (stage pseudo, the fields marked PSEUDO in stages/irn/config.py)."""

from __future__ import annotations

import torch

from stages.base import section_dict
from stages.common.crf import resolve_backend
from stages.common.training import unused_training_settings
from stages.irn.config import IrnConfig, pseudo_settings


def run_device_type(run_device: str) -> str:
    """ "cuda" or "cpu": where `run.device` (auto, cpu, cuda, cuda:1, ...) runs, without starting
    CUDA (a key is also computed by `wss status` on a machine that will not run the stage)."""
    if run_device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(run_device).type


def irn_fields(section: IrnConfig, pseudo: bool, run_device: str) -> dict:
    """The fields of the irn section that make the IRN (pseudo=False) or the pseudo-labels,
    without those nothing reads: the seed CRF's parameters when `use_crf` is off, the refining
    CRF's when `refine_crf` is off and its `gt_prob` always (the probability CRF takes no label
    confidence), `momentum` under AdamW. A CRF's `backend` is the one that runs on `run_device`
    (`run.device`): `auto` is torch on a GPU and pydensecrf on a CPU, whose results agree to
    float rounding only, so the same config makes different artifacts there."""
    names = {name for name in type(section).model_fields if (name in pseudo_settings()) == pseudo}
    names -= unused_training_settings(section)
    if not section.use_crf:
        names.discard("crf")
    if not section.refine_crf:
        names.discard("refine_crf_params")
    fields = section_dict(section, only=names)
    for name in ("crf", "refine_crf_params"):
        if name in fields:
            fields[name]["backend"] = resolve_backend(fields[name]["backend"], run_device_type(run_device))
    if "refine_crf_params" in fields:
        fields["refine_crf_params"] = {k: v for k, v in fields["refine_crf_params"].items() if k != "gt_prob"}
    return fields
