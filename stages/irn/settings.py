"""Which settings of the irn section make which artifact: the trained IRN (stage irn) or the
pseudo-labels (stage pseudo, the fields marked PSEUDO in stages/irn/config.py)."""

from __future__ import annotations

from stages.base import section_dict
from stages.common.training import unused_training_settings
from stages.irn.config import IrnConfig, pseudo_settings


def irn_fields(section: IrnConfig, pseudo: bool) -> dict:
    """The fields of the irn section that make the IRN (pseudo=False) or the pseudo-labels,
    without those nothing reads: the seed CRF's parameters when `use_crf` is off, the refining
    CRF's when `refine_crf` is off and its `gt_prob` always (the probability CRF takes no label
    confidence), `momentum` under AdamW."""
    names = {name for name in type(section).model_fields if (name in pseudo_settings()) == pseudo}
    names -= unused_training_settings(section)
    if not section.use_crf:
        names.discard("crf")
    if not section.refine_crf:
        names.discard("refine_crf_params")
    fields = section_dict(section, only=names)
    if "refine_crf_params" in fields:
        fields["refine_crf_params"] = {k: v for k, v in fields["refine_crf_params"].items() if k != "gt_prob"}
    return fields
