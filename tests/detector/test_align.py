"""linewatch.detector.align on small masks whose moments, boxes and motions are known by hand."""

from __future__ import annotations

import math

import pytest
import torch

from linewatch.detector.align import (aligned_pairs, box_of_support, mask_boxes, mask_moments, reference_grids,
                                      warp)


def rectangle(h: int, w: int, rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
    """(h, w) float mask, 1 on rows[0]..rows[1]-1 x cols[0]..cols[1]-1."""
    mask = torch.zeros(h, w)
    mask[rows[0]:rows[1], cols[0]:cols[1]] = 1.0
    return mask


def test_moments_of_a_rectangle():
    # 2 rows (y = 2, 3) by 6 columns (x = 1..6): centroid (3.5, 2.5); variances
    # x: (6^2 - 1) / 12 = 35/12, y: (2^2 - 1) / 12 = 1/4, no covariance
    centre, angle, elongation = mask_moments(rectangle(10, 10, (2, 4), (1, 7)))
    assert centre.tolist() == pytest.approx([3.5, 2.5])
    assert float(angle) == pytest.approx(0.0)  # the long axis is x
    assert float(elongation) == pytest.approx((35 / 12) / (1 / 4))


def test_moments_of_a_standing_rectangle_and_a_square():
    centre, angle, elongation = mask_moments(rectangle(10, 10, (1, 7), (2, 4)))  # x = 2, 3; y = 1..6
    assert centre.tolist() == pytest.approx([2.5, 3.5])
    assert float(angle) == pytest.approx(math.pi / 2)  # the long axis is y
    assert float(elongation) == pytest.approx((35 / 12) / (1 / 4))
    _, _, square = mask_moments(rectangle(10, 10, (3, 6), (3, 6)))
    assert float(square) == pytest.approx(1.0)  # no principal axis


def test_moments_are_batched_over_leading_dims():
    masks = torch.stack([rectangle(10, 10, (2, 4), (1, 7)), rectangle(10, 10, (1, 7), (2, 4))]).view(1, 2, 10, 10)
    centre, angle, elongation = mask_moments(masks)
    assert centre.shape == (1, 2, 2) and angle.shape == (1, 2) and elongation.shape == (1, 2)
    assert centre[0, 1].tolist() == pytest.approx([2.5, 3.5])


def test_boxes_of_masks_and_of_support():
    masks = torch.stack([rectangle(10, 10, (2, 4), (1, 7)), torch.zeros(10, 10)]).bool()
    assert mask_boxes(masks).tolist() == [[1.0, 2.0, 6.0, 2.0], [0.0, 0.0, 0.0, 0.0]]  # x, y, w, h; empty: zeros
    support = torch.zeros(6, 6, dtype=torch.bool)
    support[1, 1] = support[4, 3] = True  # (y, x)
    box = box_of_support(support)
    assert box.sum() == 4 * 3 and box[1:5, 1:4].all()  # rows 1..4, columns 1..3
    assert not box_of_support(torch.zeros(6, 6, dtype=torch.bool)).any()


def test_a_shift_is_undone_exactly():
    """Reference part at (x 1..4, y 2..3), query part 2 right and 1 down: the grid samples the
    reference 2 left and 1 up, so the moved reference is the query (integer shift: bilinear is exact)."""
    reference = rectangle(12, 12, (2, 4), (1, 5))
    query = rectangle(12, 12, (3, 5), (3, 7))
    grid = reference_grids(query[None], reference[None, None], torch.tensor([True]), max_shift=3.0,
                           max_rotation=0.0)
    assert grid.shape == (1, 1, 12, 12, 2)
    # in normalised coordinates (align_corners=False) one pixel is 2 / 12: the offset is (-2, -1) pixels
    identity = reference_grids(query[None], reference[None, None], torch.tensor([False]), 3.0, 0.0)
    offset = (grid - identity)[0, 0]
    torch.testing.assert_close(offset[..., 0], torch.full((12, 12), -2 * 2 / 12))
    torch.testing.assert_close(offset[..., 1], torch.full((12, 12), -1 * 2 / 12))
    moved = warp(reference[None, None], grid[0])  # (1, 1, 12, 12)
    torch.testing.assert_close(moved[0, 0], query, atol=1e-5, rtol=0)


def test_the_identity_grid_when_the_motion_is_too_large_or_not_allowed():
    reference = rectangle(12, 12, (2, 4), (1, 5))
    query = rectangle(12, 12, (3, 5), (3, 7))  # shift sqrt(5) pixels
    for allowed, max_shift in ((True, 2.0), (False, 3.0)):
        grid = reference_grids(query[None], reference[None, None], torch.tensor([allowed]), max_shift, 0.0)
        moved = warp(reference[None, None], grid[0])
        torch.testing.assert_close(moved[0, 0], reference, atol=1e-5, rtol=0)  # sampled where it was


def test_a_quarter_turn_of_an_elongated_part_is_undone():
    """A lying bar turned upright about the same centre: turned back within max_rotation, not beyond."""
    reference = rectangle(9, 9, (4, 5), (1, 8))  # y = 4, x = 1..7: centre (4, 4)
    query = rectangle(9, 9, (1, 8), (4, 5))  # x = 4, y = 1..7: centre (4, 4)
    grid = reference_grids(query[None], reference[None, None], torch.tensor([True]), max_shift=1.0,
                           max_rotation=math.pi / 2 + 0.01)
    torch.testing.assert_close(warp(reference[None, None], grid[0])[0, 0], query, atol=1e-4, rtol=0)
    kept = reference_grids(query[None], reference[None, None], torch.tensor([True]), 1.0, math.radians(20))
    torch.testing.assert_close(warp(reference[None, None], kept[0])[0, 0], reference, atol=1e-5, rtol=0)


def test_aligned_pairs_move_matched_parts_and_skip_padding():
    """One image, two object slots (the second padding), k = 2 references from a bank of 3
    images with one part each; the object is matched: each reference part is moved onto it."""
    h = w = 12
    query = rectangle(h, w, (3, 5), (3, 7))
    soft_masks = torch.stack([query, torch.zeros(h, w)])[None]  # (1, 2, H, W)
    valid = torch.tensor([[True, False]])
    bank_masks = torch.stack([rectangle(h, w, (2, 4), (1, 5)), rectangle(h, w, (3, 5), (3, 7)),
                              rectangle(h, w, (4, 6), (4, 8))])[:, None]  # (Z=3, N=1, H, W)
    references = torch.tensor([[0, 2]])  # (B, k)
    assigned = torch.zeros(1, 2, 2, dtype=torch.long)  # part 0 of each reference
    is_matched = torch.tensor([[True, False]])
    pairs = aligned_pairs(soft_masks, valid, references, assigned, is_matched, bank_masks, max_shift=3.0,
                          max_rotation=0.0, chunk_floats=1 << 20)
    assert pairs.grids.shape == (2, 2, h, w, 2) and pairs.ref_masks.shape == (2, 2, h, w)
    for j in range(2):
        torch.testing.assert_close(pairs.ref_masks[0, j], query, atol=1e-5, rtol=0)
    assert pairs.in_box[0].sum() == 2 * 4 and pairs.in_box[0, 3:5, 3:7].all()  # the box of the query part
    assert not pairs.in_box[1].any()  # padding: nothing to compute
    # one pair per chunk: the same
    chunked = aligned_pairs(soft_masks, valid, references, assigned, is_matched, bank_masks, 3.0, 0.0,
                            chunk_floats=1)
    for a, b in ((pairs.grids, chunked.grids), (pairs.ref_masks, chunked.ref_masks)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert torch.equal(pairs.in_box, chunked.in_box)
