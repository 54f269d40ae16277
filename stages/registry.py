"""The stages by name, in run order: a plain dict, nothing more."""

from __future__ import annotations

from stages.base import Stage

STAGE_ORDER = ["cam", "irn", "pseudo", "seg"]


def all_stages() -> dict[str, Stage]:
    from stages.cam.stage import CamStage
    from stages.irn.pseudo import PseudoLabelStage
    from stages.irn.stage import IrnStage
    from stages.seg.stage import SegStage

    stages = [CamStage(), IrnStage(), PseudoLabelStage(), SegStage()]
    return {stage.name: stage for stage in stages}
