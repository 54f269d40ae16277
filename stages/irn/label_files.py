"""The per-image label maps of the irn and pseudo stages (seeds, pseudo-labels), as a resumed
run finds them in its partial folder."""

from __future__ import annotations

import logging
from pathlib import Path

from data.layout import PreparedDataset

log = logging.getLogger("wss.irn")


def usable_label(dataset: PreparedDataset, image_id: str, label_dir: Path, stage: str) -> bool:
    """Whether a resumed run can keep the label map it finds for `image_id`; a garbled one (a
    bad disk, a file edited by hand) is logged and removed, to be made again rather than
    trained on (or left there, should making it fail)."""
    path = label_dir / f"{image_id}.png"
    if not path.is_file():
        return False
    problem = dataset.label_problem(image_id, path)
    if problem is None:
        return True
    log.warning("%s: %s; making it again", stage, problem)
    path.unlink()
    return False
