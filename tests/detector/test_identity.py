"""Part identity by slot: exact small cases, and the property it exists for (another writer's
character is near its slot's good parts, another character is far)."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import torch

from linewatch.config import ConfigError, config_from_dict
from linewatch.detector.identity import (CROP, FRAME_REACH, JITTER, MOMENT_DIM, MOMENT_GAIN, SlotIdentity,
                                         identity_blocks, identity_descriptors, identity_distances, moment_descriptors,
                                         moment_frames, part_identities, slot_floor, slot_members, slot_separations,
                                         slot_spreads, _moments_of)
from linewatch.detector.measure import identity_map
from linewatch.detector.shape import outline_descriptors, part_crops
from linewatch.sim.generator import DRAWERS, Part


def test_slot_members_by_box_centre_within_half_the_longer_side():
    query = torch.tensor([[[10.0, 10.0, 20.0, 8.0]]])  # centre (20, 14), reach 0.5 * 20 = 10
    bank = torch.tensor([[[12.0, 5.0, 20.0, 8.0],  # centre (22, 9): 5.4 away, in
                          [30.0, 10.0, 20.0, 8.0]],  # centre (40, 14): 20 away, out
                         [[1.0, 1.0, 30.0, 30.0],  # centre (16, 16): 4.5 away, in
                          [11.0, 11.0, 18.0, 6.0]]])  # centre (20, 14), but padding
    valid = torch.tensor([[True, True], [True, False]])
    assert slot_members(query, bank, valid).tolist() == [[[True, False, True, False]]]


def _unit(*angles_deg: float) -> torch.Tensor:
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles_deg])


def test_slot_spreads_nearest_part_of_the_slot_in_another_image():
    # three good images, each with a part in slot A (boxes centred at (10, 10)) and one image with
    # a part in slot B (far away): B has no other member, its spread is 0
    shapes = torch.zeros(3, 2, 2)
    shapes[:, 0] = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    shapes[0, 1] = torch.tensor([1.0, 0.0])
    boxes = torch.tensor([[5.0, 5.0, 10.0, 10.0]]).repeat(3, 2, 1)
    boxes[:, 1] = torch.tensor([100.0, 100.0, 10.0, 10.0])
    valid = torch.tensor([[True, True], [True, False], [True, False]])
    spreads = slot_spreads(shapes, boxes, valid)
    d01, d02, d12 = math.sqrt(0.4**2 + 0.8**2), math.sqrt(2.0), math.sqrt(0.6**2 + 0.2**2)
    expected = [[min(d01, d02), 0.0], [min(d01, d12), 0.0], [min(d02, d12), 0.0]]
    assert torch.allclose(spreads, torch.tensor(expected), atol=1e-6)


def test_slot_separations_are_the_spread_over_the_nearest_part_of_another_place():
    shapes = torch.zeros(3, 2, 2)
    shapes[:, 0] = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])  # place A, as above
    shapes[0, 1] = torch.tensor([-1.0, 0.0])  # place B, one part
    boxes = torch.tensor([[5.0, 5.0, 10.0, 10.0]]).repeat(3, 2, 1)
    boxes[:, 1] = torch.tensor([100.0, 100.0, 10.0, 10.0])
    valid = torch.tensor([[True, True], [True, False], [True, False]])
    spreads = slot_spreads(shapes, boxes, valid)
    separations = slot_separations(shapes, boxes, valid, spreads)
    # A's parts: nearest outside A is B's part (-1, 0), at 2, sqrt(1.6^2 + 0.8^2), sqrt(2);
    # B's part: spread 0 (no other member of its place)
    outside = [2.0, math.sqrt(1.6**2 + 0.8**2), math.sqrt(2.0)]
    expected = [[float(spreads[0, 0]) / outside[0], 0.0], [float(spreads[1, 0]) / outside[1], 0.0],
                [float(spreads[2, 0]) / outside[2], 0.0]]
    assert torch.allclose(separations, torch.tensor(expected), atol=1e-6)


def test_slot_floor_is_a_quarter_of_the_median_spread_and_at_least_the_jitter_over_the_margin():
    valid = torch.ones(1, 4, dtype=torch.bool)
    assert slot_floor(torch.tensor([[0.0, 2.0, 4.0, 6.0]]), valid, margin=1.5) == 1.0  # median of 2, 4, 6
    assert slot_floor(torch.tensor([[0.1, 0.2, 0.3, 0.4]]), valid, margin=1.5) == pytest.approx(JITTER / 1.5)
    assert slot_floor(torch.tensor([[0.1, 0.2, 0.3, 0.4]]), valid, margin=2.0) == pytest.approx(JITTER / 2.0)


def test_each_place_is_judged_by_the_block_that_separates_it_from_the_others():
    """Two blocks (as the outline and the moment frame of outline_or_moment), two places: place
    A's good parts are alike in block 0 and differ in block 1, place B's the other way round.
    A part of A that is good in block 0 but far in block 1 scores 0 (A uses block 0), and the
    same for B with the blocks swapped; one block alone would score each far beyond the margin."""
    tight = torch.tensor([[1.0, 0.0], [0.99, 0.141], [0.98, 0.199]])
    wide = torch.tensor([[0.0, 1.0], [0.6, 0.8], [-0.6, 0.8]])
    identities = torch.zeros(3, 2, 4)
    identities[:, 0] = torch.cat([tight, wide], dim=1)  # place A
    identities[:, 1] = torch.cat([wide, tight], dim=1)  # place B
    boxes = torch.tensor([[5.0, 5.0, 10.0, 10.0], [95.0, 95.0, 10.0, 10.0]]).repeat(3, 1, 1)
    valid = torch.ones(3, 2, dtype=torch.bool)
    blocks = [slice(0, 2), slice(2, 4)]
    spreads = torch.stack([slot_spreads(identities[..., b], boxes, valid) for b in blocks])
    separations = torch.stack([slot_separations(identities[..., b], boxes, valid, s) for b, s in zip(blocks, spreads)])
    slots = SlotIdentity(blocks, spreads, [0.01, 0.01], separations)
    assert (separations[0, :, 0] < separations[1, :, 0]).all() and (separations[1, :, 1] < separations[0, :, 1]).all()
    query = torch.tensor([[[1.0, 0.0, 0.0, -1.0], [0.0, -1.0, 1.0, 0.0]]])  # A: far in block 1; B: far in block 0
    qvalid = torch.ones(1, 2, dtype=torch.bool)
    z = slots.distances(query, boxes[:1], qvalid, identities, boxes, valid)
    assert torch.allclose(z, torch.zeros(1, 2), atol=1e-5)
    one_block = SlotIdentity([slice(0, 4)], torch.stack([slot_spreads(identities, boxes, valid)]), [0.01],
                             torch.zeros(1, 3, 2)).distances(query, boxes[:1], qvalid, identities, boxes, valid)
    assert (one_block > 2.0).all()
    # the moment frame only where it separates clearly better than the outline (MOMENT_GAIN)
    per_block = [identity_distances(query[..., b], boxes[:1], qvalid, identities[..., b], boxes, valid, s, 0.01)
                 for b, s in zip(blocks, spreads)]
    for moment_separation, expected in ((0.95, per_block[0]), (MOMENT_GAIN - 0.05, per_block[1])):
        flat = torch.stack([torch.ones(3, 2), torch.full((3, 2), moment_separation)])
        z = dataclasses.replace(slots, separations=flat).distances(query, boxes[:1], qvalid, identities, boxes, valid)
        assert torch.allclose(z, expected), moment_separation


def test_identity_blocks_and_part_identities_per_descriptor():
    outlines = torch.nn.functional.normalize(torch.rand(2, 3, 80), dim=-1)
    masks = torch.zeros(2, 3, 40, 40, dtype=torch.bool)
    masks[:, :, 10:30, 15:25] = True
    assert torch.equal(part_identities(outlines, masks, "outline"), outlines)
    both = part_identities(outlines, masks, "outline_or_moment")
    assert both.shape == (2, 3, 80 + MOMENT_DIM)
    blocks = identity_blocks("outline_or_moment", both.shape[-1])
    assert blocks == [slice(0, 80), slice(80, 80 + MOMENT_DIM)]
    assert torch.equal(both[..., blocks[0]], outlines)
    assert torch.allclose(both[..., blocks[1]], moment_descriptors(masks))
    assert identity_blocks("outline", 80) == [slice(0, 80)]
    assert identity_blocks("outline_and_moment", 400) == [slice(0, 400)]


def _bank():
    shapes = torch.zeros(3, 1, 2)
    shapes[:, 0] = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    boxes = torch.tensor([[[5.0, 5.0, 10.0, 10.0]]]).repeat(3, 1, 1)
    valid = torch.ones(3, 1, dtype=torch.bool)
    return shapes, boxes, valid, slot_spreads(shapes, boxes, valid)


def test_identity_is_the_nearest_good_distance_over_the_slots_mean_spread():
    shapes, boxes, valid, spreads = _bank()
    mean_spread = float(spreads.mean())
    query = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, -1.0], [5.0, 5.0]]])
    qboxes = torch.tensor([[[5.0, 5.0, 10.0, 10.0], [6.0, 4.0, 10.0, 10.0], [200.0, 200.0, 10.0, 10.0],
                            [5.0, 5.0, 10.0, 10.0]]])
    qvalid = torch.tensor([[True, True, True, False]])
    z = identity_distances(query, qboxes, qvalid, shapes, boxes, valid, spreads, floor=0.01)
    # a good part itself: 0; (-1, 0): nearest is (0, 1) at sqrt(2); no slot: 0; padding: 0
    assert torch.allclose(z, torch.tensor([[0.0, math.sqrt(2.0) / mean_spread, 0.0, 0.0]]), atol=1e-5)
    # leave-one-out: the query is bank image 0, its own part does not count
    z_loo = identity_distances(query[:, :1], qboxes[:, :1], qvalid[:, :1], shapes, boxes, valid, spreads, 0.01,
                               exclude=torch.tensor([0]))
    mean_others = float(spreads[1:].mean())
    assert torch.allclose(z_loo, torch.tensor([[math.sqrt(0.4**2 + 0.8**2) / mean_others]]), atol=1e-5)
    # a slot whose good parts are nearly identical gets the floor as its spread
    z_floor = identity_distances(query[:, 1:2], qboxes[:, 1:2], qvalid[:, 1:2], shapes, boxes, valid,
                                 torch.full_like(spreads, 1e-6), floor=0.5)
    assert torch.allclose(z_floor, torch.tensor([[math.sqrt(2.0) / 0.5]]), atol=1e-5)


def test_identity_map_spreads_the_excess_over_the_margin_on_each_part():
    masks = torch.zeros(1, 3, 2, 3)
    masks[0, 0, 0, 0] = 1.0
    masks[0, 1, 1, 1:] = torch.tensor([0.5, 1.0])
    masks[0, 2, 0, 2] = 1.0
    z = torch.tensor([[1.5, 4.0, 2.5]])  # a good part below the margin adds nothing
    assert identity_map(z, masks, margin=2.0).tolist() == [[[0.0, 0.0, 0.5], [0.0, 1.0, 2.0]]]
    assert identity_map(z, masks, margin=1.5).tolist() == [[[0.0, 0.0, 1.0], [0.0, 1.25, 2.5]]]
    assert identity_map(torch.zeros(2, 0), torch.zeros(2, 0, 2, 3), margin=2.0).shape == (2, 2, 3)


def _character(kind: str, seed: int, size: int = 224) -> tuple[torch.Tensor, torch.Tensor]:
    """One handwritten character of the synthetic line at the image centre: mask (1, S, S), box (1, 4)."""
    S = size
    part = Part(kind, 0.5, 0.5, 0.0, 1.0, seed)
    m = torch.from_numpy(DRAWERS[kind](np.zeros((S, S, 3), np.float32), part, S, np.random.default_rng(seed)))
    ys, xs = torch.nonzero(m, as_tuple=True)
    box = torch.tensor([[xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]]).float()
    return m[None], box


@pytest.mark.parametrize("good, wrong", [("char_F", "char_E"), ("char_7", "char_Z"), ("char_P", "char_3")])
def test_another_writer_is_near_the_slot_another_character_is_far(good, wrong):
    """The outline descriptor with 16 good parts of one slot (each its own writer, slant, stroke
    width...): good parts of other seeds score about 1, the wrong character written by those
    very hands scores well above every one of them."""
    bank = [_character(good, seed) for seed in range(16)]
    masks = [m for m, _ in bank]
    boxes = torch.stack([b for _, b in bank])  # (16, 1, 4)
    shapes = outline_descriptors(part_crops(masks, boxes))[:, None]  # (16, 1, D)
    valid = torch.ones(16, 1, dtype=torch.bool)
    spreads = slot_spreads(shapes, boxes, valid)
    floor = float(spreads.median()) * 0.25

    def z(kind: str, seed: int) -> float:
        m, b = _character(kind, seed)
        d = outline_descriptors(part_crops([m], b[None]))[None]
        return float(identity_distances(d, b[None], torch.ones(1, 1, dtype=torch.bool), shapes, boxes, valid,
                                        spreads, floor)[0, 0])

    goods = [z(good, seed) for seed in range(100, 112)]
    wrongs = [z(wrong, seed) for seed in range(100, 112)]
    assert np.median(goods) < 1.6, goods
    assert min(wrongs) > np.median(goods), (goods, wrongs)
    assert np.median(wrongs) > 1.5 * np.median(goods), (goods, wrongs)


# ---------------------------------------------------------------------------- the moment frame

def _polygon_mask(points, size: int = 96) -> torch.Tensor:
    import cv2

    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [np.round(np.asarray(points) * 8).astype(np.int32)], 1, shift=3)
    return torch.from_numpy(mask.astype(bool))


# an F in a unit box (x right, y down)
_F = [(0, 0), (1, 0), (1, 0.2), (0.3, 0.2), (0.3, 0.45), (0.8, 0.45), (0.8, 0.65), (0.3, 0.65), (0.3, 1), (0, 1)]


def _written(points, cx=48.0, cy=48.0, height=40.0, width=1.0, slant=0.0, mirror=False):
    """The glyph as a hand writes it: `width` times as wide, x += slant * (cy - y) (leaning right)."""
    out = []
    for x, y in points:
        x, y = (x - 0.5) * (-1.0 if mirror else 1.0) * width * height * 0.6, (y - 0.5) * height
        out.append((cx + x - slant * y, cy + y))
    return out


def test_moments_in_one_pass_equal_the_definitions_on_random_soft_masks():
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(5, 37, 53, generator=g) * (torch.rand(5, 37, 53, generator=g) > 0.6)
    masks[0] = 0.0
    masks[1, 10:20, 30:33] = 1.0  # a thin bar among the noise
    cx, cy, mu20, mu02, mu11, mass = _moments_of(masks)
    m = masks.double()
    ys, xs = torch.meshgrid(torch.arange(37.0, dtype=torch.float64), torch.arange(53.0, dtype=torch.float64),
                            indexing="ij")
    total = m.sum((1, 2)).clamp_min(1e-6)
    ex, ey = (m * xs).sum((1, 2)) / total, (m * ys).sum((1, 2)) / total
    dx, dy = xs - ex[:, None, None], ys - ey[:, None, None]
    expected = [ex, ey, (m * dx * dx).sum((1, 2)) / total, (m * dy * dy).sum((1, 2)) / total,
                (m * dx * dy).sum((1, 2)) / total, m.sum((1, 2))]
    for got, want in zip((cx, cy, mu20, mu02, mu11, mass), expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_moment_frame_of_a_centred_square_is_the_square_at_its_spread():
    # a 21 x 21 square: x and y each uniform over 21 pixels, standard deviation sqrt((21^2 - 1) / 12)
    mask = torch.zeros(1, 64, 64)
    mask[0, 22:43, 22:43] = 1.0
    frame = moment_frames(mask)[0]
    sd = math.sqrt((21**2 - 1) / 12)
    half = 10.5 / (FRAME_REACH * sd) * CROP / 2  # the square's half side in frame pixels
    inside = frame[CROP // 2 - int(half) + 1: CROP // 2 + int(half) - 1, CROP // 2 - int(half) + 1: CROP // 2 + int(half) - 1]
    assert torch.all(inside > 0.99)
    assert frame.sum().item() == pytest.approx((2 * half) ** 2, rel=0.08)
    assert torch.equal(moment_frames(torch.zeros(2, 64, 64)), torch.zeros(2, CROP, CROP))  # empty: zeros


def test_moment_descriptor_takes_away_slant_width_and_place_but_not_a_mirror_image():
    base = moment_descriptors(_polygon_mask(_written(_F))[None, None].float())[0, 0]
    varied = [_written(_F, slant=0.2), _written(_F, width=1.2), _written(_F, cx=40.3, cy=52.6, height=36.0),
              _written(_F, slant=-0.2, width=0.85)]
    worst_same = max(float((moment_descriptors(_polygon_mask(v)[None, None].float())[0, 0] - base).norm())
                     for v in varied)
    mirrored = moment_descriptors(_polygon_mask(_written(_F, mirror=True))[None, None].float())[0, 0]
    base_outline = outline_descriptors(part_crops([_polygon_mask(_written(_F))[None]], _box(_written(_F))))[0]
    outline_worst = max(float((outline_descriptors(part_crops([_polygon_mask(v)[None]], _box(v)))[0]
                               - base_outline).norm()) for v in varied)
    # measured: the varied F within 0.09 of the upright one, its mirror image 0.88 away; the box
    # frame's outline descriptor moves by up to 0.51 for the same variations
    assert worst_same < 0.12
    assert float((mirrored - base).norm()) > 5 * worst_same
    assert outline_worst > 3 * worst_same


def _box(points) -> torch.Tensor:
    ys, xs = torch.nonzero(_polygon_mask(points), as_tuple=True)
    return torch.tensor([[[xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]]]).float()


def test_identity_descriptors_join_the_outline_and_the_moment_frame_as_unit_vectors():
    masks = torch.zeros(2, 2, 96, 96)
    masks[0, 0] = _polygon_mask(_written(_F)).float()
    masks[1, 0] = _polygon_mask(_written(_F, mirror=True)).float()
    outlines = torch.zeros(2, 2, 80)
    outlines[:, 0, 0] = 1.0  # any unit vectors
    joined = identity_descriptors(outlines, masks.half(), images_per_chunk=1)
    assert joined.shape == (2, 2, 80 + MOMENT_DIM)
    assert torch.allclose(joined[:, 0].norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.equal(joined[:, 1], torch.zeros(2, 80 + MOMENT_DIM))  # padding
    assert torch.allclose(joined[:, 0, :80], outlines[:, 0] / math.sqrt(2.0))


@pytest.mark.parametrize("measure, message", [
    ({"identity_margin": 0}, "detector.measure.identity_margin: Input should be greater than 0"),
    ({"identity_descriptor": "moment"},
     "detector.measure.identity_descriptor: Input should be 'outline', 'outline_and_moment' or 'outline_or_moment'"),
])
def test_identity_settings_out_of_range_are_one_clear_config_error(measure, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict({"detector": {"measure": measure}})
