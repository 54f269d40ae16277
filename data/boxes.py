"""NIH ChestX-ray14's localization boxes: the release's BBox_List_2017.csv and the prepared
boxes.csv, and the names they use (the 14 findings, their aliases, image ids).

Its own module so that what reads the prepared boxes (the cam stage scores its CAMs against
them) does not depend on the rest of the NIH preparer (data.nih).
"""

from __future__ import annotations

import csv
import io
import os
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from data.errors import DataError

FINDINGS = [
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
]
FINDING_ALIASES = {"Infiltrate": "Infiltration", "Pleural Thickening": "Pleural_Thickening"}
BOX_COLUMNS = ["image_id", "finding", "x", "y", "w", "h"]
BOXES_NAME = "boxes.csv"


class ProblemLog(Protocol):
    """Where `read_boxes` reports a bad row and goes on (data.prepare_report.PrepareReport)."""

    def add_error(self, where: str | Path, error: Exception) -> None: ...

    def count(self, key: str, amount: int = 1) -> None: ...


@dataclass(frozen=True)
class Box:
    """A finding's box in image pixels (the release's image in BBox_List_2017.csv, the prepared
    one in boxes.csv): (x, y) top-left corner, w x h."""

    image_id: str
    finding: str
    x: float
    y: float
    w: float
    h: float


def image_id_of(name: str) -> str:
    """'00000032_037.png' -> '00000032_037' (the prepared id)."""
    name = name.strip()
    return name[:-4] if name.lower().endswith(".png") else name


def canonical_finding(name: str) -> str:
    name = name.strip()
    return FINDING_ALIASES.get(name, name)


def read_boxes(path: str | Path, report: ProblemLog | None = None) -> list[Box]:
    """Boxes of BBox_List_2017.csv or of a prepared boxes.csv (one header line either way).

    The release's header is ``Image Index,Finding Label,Bbox [x,y,w,h],,,``: the last name
    covers four columns, so columns are taken by position: id, finding, x, y, w, h (extra
    empty columns are allowed). A bad row is a DataError naming ``path:line``; with a
    ``report`` (``wss prepare``) it is reported and skipped instead, so one bad row of a
    downloaded file costs that box, not the preparation. A missing header is always an error.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"box file not found: {path}")
    boxes = []
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    header = next(reader, None)
    if header is None or len(header) < 3 or _is_box_row(header):
        raise DataError(
            f"{path}: expected a header such as 'Image Index,Finding Label,Bbox [x,y,w,h]' "
            f"on line 1, got {','.join(header or [])!r}"
        )
    for line_no, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue
        try:
            boxes.append(_box_of_row(row, f"{path}:{line_no}"))
        except DataError as error:
            if report is None:
                raise
            report.add_error(f"{path}:{line_no}", error)
            report.count("bad_box_rows")
    return boxes


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (a BOM is dropped); a stray byte is a DataError naming its line,
    not a UnicodeDecodeError traceback."""
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[error.start]:02x})") from None


def _is_box_row(row: list[str]) -> bool:
    """Whether a row reads as a box: a first line that does is data, and the file lacks its header."""
    try:
        _box_of_row(row, "")
    except DataError:
        return False
    return True


def _box_of_row(row: list[str], where: str) -> Box:
    cells = [cell.strip() for cell in row]
    if len(cells) < 6 or any(cells[6:]):
        raise DataError(f"{where}: expected image, finding, x, y, w, h; got {len(row)} fields")
    finding = canonical_finding(cells[1])
    if finding not in FINDINGS:
        raise DataError(f"{where}: unknown finding {cells[1]!r}")
    try:
        x, y, w, h = (float(v) for v in cells[2:6])
    except ValueError:
        raise DataError(f"{where}: box coordinates must be numbers, got {cells[2:6]}") from None
    if not all(np.isfinite([x, y, w, h])) or w <= 0 or h <= 0:
        raise DataError(f"{where}: box needs finite coordinates and positive width and height")
    return Box(image_id_of(cells[0]), finding, x, y, w, h)


def write_boxes(path: str | Path, boxes: list[Box]) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(BOX_COLUMNS)
        for box in boxes:
            writer.writerow([box.image_id, box.finding, repr(box.x), repr(box.y), repr(box.w), repr(box.h)])
    os.replace(tmp, path)


def scale_box(box: Box, original: tuple[int, int], size: int | None) -> Box:
    """``box`` in the pixels of an image of ``original`` (width, height) resized to ``size`` x ``size``."""
    if not size:
        return box
    sx, sy = size / original[0], size / original[1]
    return replace(box, x=box.x * sx, y=box.y * sy, w=box.w * sx, h=box.h * sy)


def boxes_by_image(boxes: list[Box]) -> dict[str, list[Box]]:
    grouped: dict[str, list[Box]] = defaultdict(list)
    for box in boxes:
        grouped[box.image_id].append(box)
    return dict(grouped)
