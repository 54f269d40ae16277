"""Pair geometry, affinities against a slow reference, pair labels and IRNet's loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stages.irn.affinity import (
    IGNORE,
    affinity_labels,
    affinity_loss,
    edge_to_affinity,
    neighbour_offsets,
    pair_valid_mask,
    path_offsets,
)


def test_neighbour_offsets_cover_the_disc_once():
    assert neighbour_offsets(2) == [(0, 1), (1, -1), (1, 0), (1, 1)]
    assert len(neighbour_offsets(5)) == 34 and len(neighbour_offsets(10)) == 152
    for radius in (1, 3, 5, 10):
        half = set(neighbour_offsets(radius))
        assert not half & {(-dy, -dx) for dy, dx in half}
        disc = {
            (dy, dx)
            for dy in range(-radius, radius + 1)
            for dx in range(-radius, radius + 1)
            if 0 < dy * dy + dx * dx < radius * radius
        }
        assert half | {(-dy, -dx) for dy, dx in half} == disc


def test_path_offsets_known_answers_and_invariants():
    assert path_offsets(0, 3) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert path_offsets(2, 0) == [(0, 0), (1, 0), (2, 0)]
    assert set(path_offsets(1, 1)) == {(0, 0), (0, 1), (1, 0), (1, 1)}  # thick: no diagonal gap
    # pixels at distance < 1 from the line: the whole box for |dx| = 1, a band of width 3 on a diagonal
    assert set(path_offsets(1, -2)) == {(y, x) for y in (0, 1) for x in (0, -1, -2)}
    assert set(path_offsets(3, 3)) == {(y, x) for y in range(4) for x in range(4) if abs(x - y) <= 1}
    for dy, dx in neighbour_offsets(10):
        path = path_offsets(dy, dx)
        assert path[0] == (0, 0) and path[-1] == (dy, dx)
        assert len(set(path)) == len(path)
        # the reversed segment covers the same pixels, seen from the other end
        assert {(dy - y, dx - x) for y, x in path} == set(path)
        # consecutive pixels touch (8-connected), so no boundary pixel on the line is skipped
        for (y0, x0), (y1, x1) in zip(path, path[1:]):
            assert max(abs(y1 - y0), abs(x1 - x0)) == 1


def test_pair_valid_mask_matches_brute_force():
    height, width, radius = 4, 6, 3
    mask = pair_valid_mask(height, width, radius)
    assert mask.shape == (len(neighbour_offsets(radius)), height, width) and mask.dtype == torch.bool
    for p, (dy, dx) in enumerate(neighbour_offsets(radius)):
        for y in range(height):
            for x in range(width):
                assert bool(mask[p, y, x]) == (0 <= y + dy < height and 0 <= x + dx < width)


def slow_affinity(edge: np.ndarray, radius: int) -> np.ndarray:
    """Pure-Python reference: 1 - max edge over the path pixels, 0 when the partner is outside."""
    batch, _, height, width = edge.shape
    offsets = neighbour_offsets(radius)
    out = np.zeros((batch, len(offsets), height, width))
    for b in range(batch):
        for p, (dy, dx) in enumerate(offsets):
            for y in range(height):
                for x in range(width):
                    if 0 <= y + dy < height and 0 <= x + dx < width:
                        out[b, p, y, x] = 1 - max(edge[b, 0, y + py, x + px] for py, px in path_offsets(dy, dx))
    return out


def test_edge_to_affinity_equals_the_slow_reference():
    generator = torch.Generator().manual_seed(0)
    edge = torch.rand(2, 1, 7, 9, generator=generator, dtype=torch.float64)
    aff = edge_to_affinity(edge, radius=4)
    np.testing.assert_allclose(aff.numpy(), slow_affinity(edge.numpy(), 4), rtol=0, atol=1e-12)
    assert (aff[:, ~pair_valid_mask(7, 9, 4)] == 0).all()


def test_edge_to_affinity_of_a_wall_separates_its_sides():
    edge = torch.zeros(1, 1, 5, 9)
    edge[..., 4] = 1.0  # a vertical wall in column 4
    aff = edge_to_affinity(edge, radius=3)
    (left_to_right,) = [p for p, o in enumerate(neighbour_offsets(3)) if o == (0, 2)]
    assert aff[0, left_to_right, 2, 3] == 0  # 3 -> 5 crosses the wall
    assert aff[0, left_to_right, 2, 0] == 1  # 0 -> 2 does not


def test_gradient_flows_through_edge_to_affinity():
    generator = torch.Generator().manual_seed(1)
    edge = torch.rand(1, 1, 5, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda e: edge_to_affinity(e, 3), (edge,))
    edge_to_affinity(edge, 3).sum().backward()
    assert edge.grad is not None and (edge.grad < 0).any()


def slow_labels(labels: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    batch, height, width = labels.shape
    offsets = neighbour_offsets(radius)
    masks = np.zeros((3, batch, len(offsets), height, width), dtype=bool)
    for b in range(batch):
        for p, (dy, dx) in enumerate(offsets):
            for y in range(height):
                for x in range(width):
                    if not (0 <= y + dy < height and 0 <= x + dx < width):
                        continue
                    a, c = labels[b, y, x], labels[b, y + dy, x + dx]
                    if a == IGNORE or c == IGNORE:
                        continue
                    masks[0 if a == c == 0 else 1 if a == c else 2, b, p, y, x] = True
    return masks[0], masks[1], masks[2]


def test_affinity_labels_known_pairs_and_reference():
    labels = torch.tensor(
        [
            [
                [0, 0, 0, 2, 2, 2],
                [0, 0, 0, 2, 2, 2],
                [0, 255, 0, 2, 2, 1],
                [0, 0, 0, 1, 1, 1],
            ]
        ]
    )
    radius = 3
    bg_pos, fg_pos, neg = affinity_labels(labels, radius)
    index = {o: p for p, o in enumerate(neighbour_offsets(radius))}
    assert bg_pos.dtype == torch.float32 and bg_pos.shape == (1, len(index), 4, 6)
    assert bg_pos[0, index[(0, 1)], 0, 0] == 1  # 0 - 0
    assert fg_pos[0, index[(0, 1)], 0, 3] == 1  # 2 - 2
    assert neg[0, index[(0, 1)], 0, 2] == 1  # 0 | 2, across the label change
    assert neg[0, index[(1, 0)], 2, 4] == 1  # 2 | 1
    touching_ignore = [(index[(0, 1)], 2, 0), (index[(1, 0)], 1, 1), (index[(1, 1)], 1, 0)]
    dropped_outside = [(index[(0, 1)], 0, 5), (index[(1, 0)], 3, 0)]
    for p, y, x in touching_ignore + dropped_outside:
        assert bg_pos[0, p, y, x] == fg_pos[0, p, y, x] == neg[0, p, y, x] == 0
    assert (bg_pos + fg_pos + neg).max() == 1  # a pair is in at most one set
    for got, want in zip((bg_pos, fg_pos, neg), slow_labels(labels.numpy(), radius)):
        np.testing.assert_array_equal(got.numpy().astype(bool), want)
    as_bool = affinity_labels(labels, radius, dtype=torch.bool)
    assert all(b.dtype == torch.bool and torch.equal(b.float(), f) for b, f in zip(as_bool, (bg_pos, fg_pos, neg)))


def test_affinity_labels_on_random_seeds_match_the_reference():
    generator = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 4, (2, 6, 7), generator=generator)
    labels[labels == 3] = IGNORE
    for got, want in zip(affinity_labels(labels, 4), slow_labels(labels.numpy(), 4)):
        np.testing.assert_array_equal(got.numpy().astype(bool), want)


def test_affinity_loss_known_values():
    aff = torch.tensor([[0.9, 0.5, 0.2, 0.7]], requires_grad=True)
    bg = torch.tensor([[1.0, 0, 0, 0]])
    fg = torch.tensor([[0, 1.0, 0, 0]])
    neg = torch.tensor([[0, 0, 1.0, 1.0]])
    loss = affinity_loss(aff, bg, fg, neg)
    bg_want = -math.log(0.9 + 1e-5) / (1 + 1e-5)
    fg_want = -math.log(0.5 + 1e-5) / (1 + 1e-5)
    neg_want = -(math.log(1 + 1e-5 - 0.2) + math.log(1 + 1e-5 - 0.7)) / (2 + 1e-5)
    assert loss.bg_pos.item() == pytest.approx(bg_want, rel=1e-5)
    assert loss.fg_pos.item() == pytest.approx(fg_want, rel=1e-5)
    assert loss.pos.item() == pytest.approx((bg_want + fg_want) / 2, rel=1e-5)
    assert loss.neg.item() == pytest.approx(neg_want, rel=1e-5)
    assert loss.total.item() == pytest.approx(((bg_want + fg_want) / 2 + neg_want) / 2, rel=1e-5)
    loss.total.backward()
    assert aff.grad[0, 0] < 0 and aff.grad[0, 2] > 0  # raise positive affinities, lower negative ones
    same = affinity_loss(aff, bg.bool(), fg.bool(), neg.bool())
    assert same.total.item() == pytest.approx(loss.total.item())


def test_affinity_loss_without_foreground_pairs_is_finite():
    aff = torch.full((1, 2, 3, 3), 0.5)
    none = torch.zeros_like(aff)
    loss = affinity_loss(aff, torch.ones_like(aff), none, none)
    assert loss.fg_pos.item() == 0 and loss.neg.item() == 0 and torch.isfinite(loss.total)


def test_loss_trains_an_edge_map_end_to_end():
    """Gradient descent on the edge map through affinities and the loss finds the label change."""
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[:, :, 4:] = 1
    targets = affinity_labels(labels, 3)
    logits = torch.zeros(1, 1, 8, 8, requires_grad=True)
    optimizer = torch.optim.SGD([logits], lr=50.0)
    for _ in range(60):
        optimizer.zero_grad()
        affinity_loss(edge_to_affinity(torch.sigmoid(logits), 3), *targets).total.backward()
        optimizer.step()
    edge = torch.sigmoid(logits)[0, 0]
    assert edge[:, 3:5].max(dim=1).values.min() > 0.5  # each row has its boundary in column 3 or 4
    assert edge[:, :2].max() < 0.2 and edge[:, 6:].max() < 0.2
