"""CAM inference in batches of one image size: the batching rule, the collation, and the maps of
each image equal to its one-image computation (float rounding) on the CPU."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import stages.cam.infer as infer
from data.datasets import same_size_batches, stack_scaled
from data.layout import PreparedDataset
from stages.cam.config import CamConfig
from stages.cam.infer import (
    cam_batch_images,
    cam_batches,
    load_cam,
    scaled_cam,
    scaled_cam_batch,
    write_cam_files,
)
from stages.cam.nets import GapNet

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def gap_net():
    torch.manual_seed(0)
    return GapNet(5, "resnet18", None).eval()


def test_same_size_batches_known_answer():
    """Full batches as they fill, leftovers of each size last, an unknown size alone."""
    sizes = [(4, 4), (4, 6), (4, 4), None, (4, 4), (4, 6), (4, 4), (4, 4)]
    assert same_size_batches(sizes, lambda size: 2 if size == (4, 4) else 5) == [
        [0, 2],
        [3],
        [4, 6],
        [1, 5],
        [7],
    ]
    assert same_size_batches([], lambda size: 3) == []
    assert same_size_batches([(2, 2)] * 3, lambda size: 0) == [[0], [1], [2]]  # at least one image


def test_cam_batch_rule_bounds_the_pixels_of_a_pass():
    cuda = torch.device("cuda")
    assert cam_batch_images((512, 512), [1.0, 0.5, 1.5, 2.0], True, cuda) == 16
    assert cam_batch_images((512, 512), [1.0, 0.5, 1.5], True, cuda) == 28
    assert cam_batch_images((4000, 6000), [2.0], True, cuda) == 1  # a huge image still runs, alone
    assert cam_batch_images((512, 512), [1.0], False, CPU) == 1
    for size in [(375, 500), (512, 512), (1024, 768)]:
        images = cam_batch_images(size, [1.0, 2.0], True, cuda)
        assert images * 2 * 4 * size[0] * size[1] <= infer.CAM_BATCH_PIXELS


def test_stack_scaled_groups_by_size_and_passes_errors_on():
    def item(image_id, height, width):
        image = torch.full((height, width, 3), len(image_id), dtype=torch.uint8)
        return {"id": image_id, "size": (height, width), "scaled": [image, image[::2, ::2]]}

    batch = stack_scaled([item("a", 4, 6), {"id": "b", "error": "b: bad"}, item("cc", 4, 6), item("d", 6, 4)])
    assert batch["errors"] == [{"id": "b", "error": "b: bad"}]
    [same, other] = batch["groups"]
    assert same["ids"] == ["a", "cc"] and same["size"] == (4, 6) and other["ids"] == ["d"]
    assert [tuple(s.shape) for s in same["scaled"]] == [(2, 4, 6, 3), (2, 2, 3, 3)]
    assert same["scaled"][0][1].eq(2).all() and same["scaled"][0][0].eq(1).all()


@pytest.mark.parametrize("extract", ["cam", "gradcam++"])
def test_a_batch_of_images_gives_each_image_its_own_maps(gap_net, extract):
    """Three images of one size, with different classes (one with none): each image's maps are
    those scaled_cam gives it alone, to float rounding."""
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (3, 45, 61, 3), dtype=np.uint8))
    scaled = [images, torch.nn.functional.interpolate(images.permute(0, 3, 1, 2).float(), size=(23, 31)).round()]
    scaled[1] = scaled[1].permute(0, 2, 3, 1).to(torch.uint8).contiguous()
    keys = [[1, 3], [], [4, 1, 0]]
    batched = scaled_cam_batch(gap_net, scaled, (45, 61), keys, True, CPU, extract)
    for index, image_keys in enumerate(keys):
        alone = scaled_cam(gap_net, [copy[index] for copy in scaled], (45, 61), image_keys, True, CPU, extract)
        assert batched[index].shape == alone.shape == (len(image_keys), 12, 16)
        np.testing.assert_allclose(batched[index], alone, rtol=1e-4, atol=1e-5)


def test_batched_inference_writes_the_files_of_one_image_at_a_time(gap_net, tiny_synthetic, tmp_path):
    """write_cam_files in batches of 3 (as on a CUDA device, here on the CPU) writes the files
    that one image at a time writes; an unreadable image is listed and the others written."""
    root = shutil.copytree(tiny_synthetic, tmp_path / "data")
    dataset = PreparedDataset(root)
    ids = dataset.split("train")[:7]
    dataset.image_path(ids[4]).write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    section = CamConfig(scales=[1.0, 0.5], flip=True)
    one_by_one = write_cam_files(gap_net, section, dataset, ids, tmp_path / "one", CPU, workers=0)

    assert cam_batches(dataset, ids, section, CPU, 3) == [[0, 1, 2], [4], [3, 5, 6]]  # ids[4]: no header
    batched = write_cam_files(gap_net, section, dataset, ids, tmp_path / "batched", CPU, 2, images_per_batch=3)
    assert len(batched) == 1 and ids[4] in batched[0] and batched == one_by_one
    for image_id in ids[:4] + ids[5:]:
        cam, keys, size = load_cam(tmp_path / "batched" / f"{image_id}.npz")
        expected, expected_keys, expected_size = load_cam(tmp_path / "one" / f"{image_id}.npz")
        assert list(keys) == list(expected_keys) and size == expected_size
        np.testing.assert_allclose(cam, expected, atol=2e-3)  # float16 files: one step at most
    assert not (tmp_path / "batched" / f"{ids[4]}.npz").exists()
