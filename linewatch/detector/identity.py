"""Part identity by slot (beyond the paper): is this the part that belongs in this place?

The object branch compares a part with the k reference parts it matched (SAM-LAD's AMM). When
good parts vary naturally (a handwritten or printed character: another writer, slant, stroke
width), k references are too few to know that variation, and a part that is another character
looks no stranger than a good one written by another hand. The bank, though, holds every good
image's part of each place (its *slot*). So each query part is compared by its outline
descriptor (`linewatch.detector.shape`) with all the good parts of its slot, and scored by the
distance to the nearest one, in units of how near the slot's good parts are to each other:

    slot of a query part q   the bank parts whose box centre lies within SLOT_REACH times q's
                             longer box side of q's box centre (in any good image but the
                             query's own, when it is a bank image judged leave-one-out)
    spread s_j of a bank part j   its distance to the nearest part of its slot in the other
                             good images (`slot_spreads`, computed once per bank)
    identity z_q             min over the slot of |d_q - d_j|  /  mean over the slot of s_j

A good part is about as near to its slot's good parts as they are to each other (z about 1);
another character, a mirrored or a turned one is far from all of them. The object map adds
what lies beyond a margin (`linewatch.detector.measure.identity_map`). A part with no slot
(moved to a free place, a part too many) gets 0: the other branches judge it. Pure torch, no
host synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

SLOT_REACH = 0.5  # a slot: box centres closer than this times the query part's longer box side
# The least spread a slot is given, in outline-descriptor distance (unit vectors): half of what a
# good part's own jitter may move it (a 4-degree turn, a shift, a 10 % size change, a noisy
# segmentation stay under 0.25: tests/detector/test_shape.py), so that on rigid parts, whose good
# parts are near-identical, that jitter stays below twice the spread (`measure.IDENTITY_MARGIN`),
# while another shape (above 0.5 there) is far beyond it.
MIN_SPREAD = 0.125


def box_centres(boxes: Tensor) -> Tensor:
    """(..., 4) x, y, w, h -> (..., 2) centres."""
    return boxes[..., :2] + boxes[..., 2:] / 2


def slot_members(query_boxes: Tensor, bank_boxes: Tensor, bank_valid: Tensor, reach: float = SLOT_REACH) -> Tensor:
    """Which bank parts lie in each query part's slot: query_boxes (B, M, 4), bank_boxes (Z, N, 4),
    bank_valid (Z, N) -> (B, M, Z*N) bool (the bank's parts flattened image by image)."""
    z, n = bank_valid.shape
    near = torch.cdist(box_centres(query_boxes.float()), box_centres(bank_boxes.float()).reshape(1, z * n, 2)
                       .expand(query_boxes.shape[0], -1, -1))
    reach_px = reach * query_boxes[..., 2:].float().amax(-1, keepdim=True)  # (B, M, 1)
    return (near < reach_px) & bank_valid.reshape(1, 1, z * n)


def slot_spreads(shapes: Tensor, boxes: Tensor, valid: Tensor, reach: float = SLOT_REACH) -> Tensor:
    """Each bank part's outline distance to the nearest part of its slot in the other good
    images: shapes (Z, N, D), boxes (Z, N, 4), valid (Z, N) -> (Z, N), 0 where it has none
    (and for padding)."""
    z, n = valid.shape
    members = slot_members(boxes, boxes, valid, reach).reshape(z * n, z, n)  # bank parts as queries
    own = torch.arange(z, device=valid.device).repeat_interleave(n)[:, None] == torch.arange(z, device=valid.device)
    members = (members & ~own[..., None]).reshape(z * n, z * n)
    flat = shapes.reshape(z * n, -1).float()
    distances = torch.cdist(flat, flat).masked_fill(~members, float("inf")).amin(1)
    usable = valid.reshape(-1) & torch.isfinite(distances)
    return torch.where(usable, distances, torch.zeros_like(distances)).reshape(z, n)


def slot_floor(spreads: Tensor, valid: Tensor) -> float:
    """The least spread a slot is given (`identity_distances`' floor): a quarter of the bank
    parts' median `slot_spreads` (those with a slot), and at least MIN_SPREAD."""
    spread = spreads[valid & (spreads > 0)]
    return max(float(spread.median()) * 0.25 if spread.numel() else 1.0, MIN_SPREAD)


def identity_distances(shapes: Tensor, boxes: Tensor, valid: Tensor, bank_shapes: Tensor, bank_boxes: Tensor,
                       bank_valid: Tensor, spreads: Tensor, floor: float, exclude: Tensor | None = None,
                       reach: float = SLOT_REACH) -> Tensor:
    """Identity z of every query part (see the module docstring): shapes (B, M, D), boxes (B, M, 4),
    valid (B, M) of the query parts; the bank's shapes (Z, N, D), boxes (Z, N, 4), valid (Z, N)
    and `slot_spreads` (Z, N); floor: the least spread a slot is given (a slot whose good parts
    happen to be near-identical must not turn a tiny difference into a large z: `slot_floor`); exclude (B,):
    the bank image each query is (leave-one-out), or None. -> (B, M), 0 for padding and for a
    part with no slot."""
    z, n = bank_valid.shape
    members = slot_members(boxes, bank_boxes, bank_valid, reach)  # (B, M, Z*N)
    if exclude is not None:
        own = (exclude[:, None] == torch.arange(z, device=valid.device)).repeat_interleave(n, dim=1)  # (B, Z*N)
        members = members & ~own[:, None, :]
    good = bank_shapes.reshape(1, z * n, -1).float().expand(shapes.shape[0], -1, -1)
    nearest = torch.cdist(shapes.float(), good).masked_fill(~members, float("inf")).amin(2)  # (B, M)
    count = members.sum(2)
    spread = (members.float() * spreads.reshape(1, 1, z * n)).sum(2) / count.clamp_min(1)
    score = nearest / spread.clamp_min(floor)
    return torch.where(valid & (count > 0), score, torch.zeros_like(score))
