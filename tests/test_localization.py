"""CAM localization metrics: point localization and IoBB on known answers."""

import math

import numpy as np
import pytest

from data.nih import Box
from stages.common.localization import (
    LocalizationCase,
    best_iobb,
    cases_for_image,
    iobb,
    localization_accuracy,
    peak_point,
    point_hit,
    predicted_box,
)

IMAGE = (1024, 1024)
BOX = (256.0, 512.0, 128.0, 64.0)  # x 256-384, y 512-576


def peaked_cam(row, col, shape=(32, 32)):
    cam = np.random.default_rng(0).random(shape) * 0.1
    cam[row, col] = 1.0
    return cam


def test_point_localization_inside_and_outside():
    # CAM cell = 32 image pixels; cell (row 16, col 9) has centre (x 304, y 528): inside the box.
    assert point_hit(peaked_cam(16, 9), [BOX], IMAGE) is True
    assert point_hit(peaked_cam(3, 9), [BOX], IMAGE) is False  # y = 112
    assert point_hit(peaked_cam(16, 20), [BOX], IMAGE) is False  # x = 656
    assert point_hit(peaked_cam(3, 9), [(0, 0, 10, 10), BOX, (300, 100, 50, 50)], IMAGE) is True  # any box


def test_point_localization_scales_non_square_cams_and_images():
    cam = np.zeros((8, 16))
    cam[2, 12] = 1  # centre at x = 12.5 * 40 = 500, y = 2.5 * 50 = 125 for a 400x640 image
    assert peak_point(cam, (400, 640)) == (500.0, 125.0)
    assert point_hit(cam, [(490, 120, 20, 10)], (400, 640))
    assert not point_hit(cam, [(501, 120, 20, 10)], (400, 640))


def test_iobb_is_intersection_over_the_predicted_box():
    assert iobb((0, 0, 10, 10), (0, 0, 100, 100)) == 1.0  # predicted inside: 1, not IoU
    assert iobb((0, 0, 10, 10), (5, 0, 100, 100)) == 0.5
    assert iobb((0, 0, 10, 10), (50, 50, 10, 10)) == 0.0


def test_predicted_box_is_the_largest_component_in_image_pixels():
    cam = np.zeros((16, 16))
    cam[2:6, 3:9] = 1.0  # 24 cells
    cam[12, 12] = 0.9  # a small blob above the threshold
    assert predicted_box(cam, (512, 512), cam_threshold=0.5) == (96.0, 64.0, 192.0, 128.0)
    assert predicted_box(np.zeros((4, 4)), (512, 512)) is None


def test_accuracy_per_finding_and_mean():
    inside = peaked_cam(16, 9)
    outside = peaked_cam(3, 20)
    cases = [
        LocalizationCase("Mass", inside, [BOX], IMAGE),
        LocalizationCase("Mass", outside, [BOX], IMAGE),
        LocalizationCase("Nodule", inside, [BOX], IMAGE),
    ]
    metrics = localization_accuracy(cases, iobb_thresholds=(0.5,))
    assert metrics["point/Mass"] == 0.5 and metrics["point/Nodule"] == 1.0
    assert metrics["point/mean"] == 0.75
    assert metrics["pairs/Mass"] == 2
    # the peak cell (x 288-320, y 512-544) is the thresholded CAM: wholly inside the box
    assert best_iobb(inside, [BOX], IMAGE) == 1.0 and best_iobb(outside, [BOX], IMAGE) == 0.0
    assert metrics["iobb@0.5/Mass"] == 0.5 and metrics["iobb@0.5/mean"] == 0.75
    assert math.isnan(localization_accuracy([])["point/mean"])


def test_cases_for_image_groups_boxes_by_finding():
    classes = ["Atelectasis", "Mass"]
    cams = np.stack([peaked_cam(0, 0), peaked_cam(16, 9)])
    boxes = [Box("i", "Mass", *BOX), Box("i", "Mass", 0, 0, 5, 5), Box("i", "Atelectasis", *BOX)]
    cases = cases_for_image(cams, classes, boxes, IMAGE)
    assert [(c.finding, len(c.boxes)) for c in cases] == [("Atelectasis", 1), ("Mass", 2)]
    metrics = localization_accuracy(cases)
    assert metrics["point/Mass"] == 1.0 and metrics["point/Atelectasis"] == 0.0


def test_a_non_2d_cam_is_refused():
    with pytest.raises(ValueError):
        peak_point(np.zeros((2, 3, 4)), IMAGE)
