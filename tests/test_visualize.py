"""Overlay grids that read well for every dataset: long image ids (SIIM's DICOM UIDs, nested
folder ids) and long class lists are shortened so that each row's label stays inside its row."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.visualize import class_lines, fit_text, grid_captions, grid_figure, row_label, short_id

SIIM_ID = "1.2.276.0.7230010.3.1.4.8323329.5597.1517875188.959090"  # a SIIM-ACR image id (a DICOM UID)
LONG_IDS = [
    SIIM_ID + "1.2.276.0.72",  # 66 characters: longer than any DICOM UID (64)
    "1.2.276.0.7230010.3.1.4.8323329.5598.1517875188.959091",
    "patient00001%2Fstudy1%2Fview1_frontal_and_then_some_more",  # a nested folder id
    "short",
]
CLASSES = ["background", "Pleural_Thickening", "Pneumothorax", "Consolidation", "Infiltration", "Atelectasis"]


class FakeDataset:
    """What grid_figure reads of a prepared dataset: classes, palette, labels, masks (none)."""

    def __init__(self, labels: dict[str, list[int]]):
        self.classes = CLASSES
        self.info = SimpleNamespace(palette=[[0, 0, 0], *([[200, 30, 30]] * (len(CLASSES) - 1))])
        self.labels = labels

    def label_vector(self, image_id: str) -> np.ndarray:
        vector = np.zeros(len(CLASSES), np.float32)
        vector[self.labels[image_id]] = 1
        return vector

    def read_mask(self, image_id, size):
        return None

    def has_mask(self, image_id):
        return False


def test_short_id_keeps_both_ends_and_the_length():
    assert short_id("short") == "short"
    shortened = short_id(SIIM_ID)
    assert len(shortened) == 24 and "..." in shortened
    head, tail = shortened.split("...")
    assert SIIM_ID.startswith(head) and SIIM_ID.endswith(tail) and tail.endswith("959090")
    assert short_id(SIIM_ID, 12) == "1.2...959090" and len(short_id(SIIM_ID, 5)) == 5


def test_class_lines_wrap_at_commas_and_count_what_does_not_fit():
    assert class_lines([]) == ["no finding"]
    assert class_lines(["cat", "dog"]) == ["cat, dog"]
    lines = class_lines(CLASSES[1:])
    assert len(lines) == 2 and all(len(line) <= 24 for line in lines)
    assert lines[-1].endswith("more") and lines[0].startswith("Pleural_Thickening")
    assert row_label(SIIM_ID, ["Pneumothorax"]).split("\n") == [short_id(SIIM_ID), "Pneumothorax"]


def test_fit_text_fits_pil_cells():
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    assert draw.textbbox((0, 0), SIIM_ID)[2] > 152  # the full id runs over a compare grid's cell
    for width in (152, 80, 40):
        text = fit_text(draw, SIIM_ID, width)
        assert draw.textbbox((0, 0), text)[2] <= width and "..." in text
    assert fit_text(draw, "cat", 152) == "cat"


def label_boxes(figure):
    """(label box, its row's box) in figure pixels for each row of a drawn grid."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    axes = [axis for axis in figure.axes if axis.get_ylabel()]
    return [(axis.yaxis.label.get_window_extent(renderer), axis.get_window_extent(renderer)) for axis in axes]


def test_grid_row_labels_stay_inside_their_rows_and_the_picture(tmp_path):
    import matplotlib.pyplot as plt

    dataset = FakeDataset({image_id: [1 + i % 5, 2, 3, 4, 5] for i, image_id in enumerate(LONG_IDS)})
    images = [(image_id, np.full((40, 50, 3), 90 + 30 * i, np.uint8)) for i, image_id in enumerate(LONG_IDS)]
    figure = grid_figure(dataset, {"cam": tmp_path}, "cam", images, device=None)
    try:
        boxes = label_boxes(figure)
        assert len(boxes) == len(LONG_IDS)
        width = figure.bbox.width
        for label, row in boxes:
            assert label.y0 >= row.y0 - 1 and label.y1 <= row.y1 + 1, (label, row)  # within its row
            assert label.x0 >= 0 and label.x1 <= width  # within the picture
        for (upper, _), (lower, _) in zip(boxes, boxes[1:]):
            assert lower.y1 <= upper.y0  # no two labels overlap

        # the failure this guards against: the full labels run over their rows
        axis = [axis for axis in figure.axes if axis.get_ylabel()][0]
        axis.set_ylabel(f"{LONG_IDS[0]}\n{', '.join(CLASSES[1:])}", fontsize=7)
        label, row = label_boxes(figure)[0]
        assert label.y1 - label.y0 > row.y1 - row.y0
    finally:
        plt.close(figure)


def test_grid_captions_hold_the_full_ids():
    dataset = FakeDataset({LONG_IDS[0]: [2], "short": []})
    captions = grid_captions(dataset, [(LONG_IDS[0], None), ("short", None)])
    assert captions == [f"{LONG_IDS[0]}: Pneumothorax", "short: no finding"]


@pytest.mark.parametrize("image_id", LONG_IDS)
def test_short_id_is_at_most_the_label_width(image_id):
    assert len(short_id(image_id)) <= 24
