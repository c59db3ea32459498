"""Part identity by slot (beyond the paper): is this the part that belongs in this place?

The object branch compares a part with the k reference parts it matched (SAM-LAD's AMM). When
good parts vary naturally (a handwritten or printed character: another writer, slant, stroke
width), k references are too few to know that variation, and a part that is another character
looks no stranger than a good one written by another hand. The bank, though, holds every good
image's part of each place (its *slot*). So each query part is compared by its identity
descriptor with all the good parts of its slot, and scored by the distance to the nearest one,
in units of how near the slot's good parts are to each other:

    identity descriptor      `part_identities` (measure.identity_descriptor), from the part's
                             mask at the working size: its outline descriptor (the mask cropped
                             at its box, 4 x 4 cells) and/or the same mask in its own moment
                             frame (centred on its centroid, its slant sheared away, each axis
                             scaled to the mask's spread along it), 8 x 8 cells of gradient
                             magnitude and soft orientation (`moment_descriptors`); by default
                             (outline_or_moment) per slot the one of the two that tells it from
                             the other slots clearly better (`SlotIdentity`)

    slot of a query part q   the bank parts whose box centre lies within SLOT_REACH times q's
                             longer box side of q's box centre (in any good image but the
                             query's own, when it is a bank image judged leave-one-out)
    spread s_j of a bank part j   its distance to the nearest part of its slot in the other
                             good images (`slot_spreads`, computed once per bank)
    identity z_q             min over the slot of |d_q - d_j|  /  mean over the slot of s_j

A good part is about as near to its slot's good parts as they are to each other (z about 1);
another character, a mirrored or a turned one is far from all of them. The object map adds
what lies beyond a margin (`linewatch.detector.measure.identity_map`). A part with no slot
(moved to a free place, a part too many) gets 0: the other branches judge it. Pure torch; per
frame no host synchronisation (`SlotIdentity.of_bank`, once per bank, reads its floors back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from linewatch.detector.backbone import ClassicFeatures, oriented_gradients

SLOT_REACH = 0.5  # a slot: box centres closer than this times the query part's longer box side
# How far a good part's own jitter may move its outline descriptor (unit vectors): a 4-degree
# turn, a shift, a 10 % size change, a noisy segmentation stay under it (tests/detector/
# test_shape.py), another shape lies above 0.5. The least spread a slot is given is this over
# measure.identity_margin (`slot_floor`), so that on rigid parts, whose good parts are
# near-identical, that jitter stays below the margin while another shape is far beyond it.
JITTER = 0.25

# The identity descriptor (`identity_descriptors`): a handwritten or printed character varies in
# slant, width and size from part to part; the moment frame takes those away before the outline
# is compared, as handwriting recognisers deskew and size-normalise a character (the moments
# do not undo a mirror image or a quarter turn).
CROP = 32  # side of the part in its moment frame, pixels
CELL = 4  # cell side, pixels: 8 x 8 cells
FRAME_REACH = 2.5  # the frame spans +- this many standard deviations of the mask along each axis
MIN_AXIS_SPREAD = 1.0  # mask pixels: the least standard deviation an axis is given (a thin line)
MOMENT_DIM = (CROP // CELL) ** 2 * 5
# outline_or_moment: a place is judged in the moment frame only where that separates it from the
# other places clearly better than the outline (`SlotIdentity.distances`: by 10 %). On the
# tuning seeds 100-102 (`linewatch sim generate`, 20 good images) the moment frame was better at
# few places of printed glyphs, screws and brackets and by at most 11 %, while on handwritten
# characters it was 7-31 % better at most places (benchmarks/identity_places.py, docs/detector.md).
MOMENT_GAIN = 0.9


def _moments_of(m: Tensor) -> tuple[Tensor, ...]:
    """(K, H, W) float masks -> centroid x, y, central second moments mu20, mu02, mu11 (divided
    by the mass) and mass, each (K,). One pass over the masks: each row's sums of m, m x and
    m x^2 in one matrix product (exact in float32 for 0/1 masks up to 256 pixels wide), then the
    sums over the rows, in float64 (the central moments are differences of large raw ones)."""
    h, w = m.shape[-2:]
    xs = torch.arange(w, device=m.device, dtype=m.dtype)
    rows = torch.matmul(m, torch.stack([torch.ones_like(xs), xs, xs * xs], dim=1)).double()  # (K, H, 3)
    ys = torch.arange(h, device=m.device, dtype=torch.float64)[None, :]
    mass = rows[..., 0].sum(1)
    total = mass.clamp_min(1e-6)
    cx, cy = rows[..., 1].sum(1) / total, (rows[..., 0] * ys).sum(1) / total
    mu20 = rows[..., 2].sum(1) / total - cx * cx
    mu02 = (rows[..., 0] * ys * ys).sum(1) / total - cy * cy
    mu11 = (rows[..., 1] * ys).sum(1) / total - cx * cy
    return tuple(v.to(m.dtype) for v in (cx, cy, mu20, mu02, mu11, mass))


def moment_frames(masks: Tensor) -> Tensor:
    """(K, H, W) masks in [0, 1] -> (K, CROP, CROP): each mask resampled (bilinear) in its own
    moment frame: centred on its centroid, sheared along x so that x and y are uncorrelated
    (a slant taken away), each axis spanning +- FRAME_REACH of the mask's standard deviation
    along it. An empty mask gives zeros."""
    k, h, w = masks.shape
    m = masks.float()
    cx, cy, mu20, mu02, mu11, mass = _moments_of(m)
    total = mass.clamp_min(1e-6)
    sy = mu02.clamp_min(MIN_AXIS_SPREAD ** 2).sqrt()
    shear = mu11 / sy ** 2  # x - shear * (y - cy) is uncorrelated with y
    sx = (mu20 - shear * mu11).clamp_min(MIN_AXIS_SPREAD ** 2).sqrt()
    # output (u, v) in [-1, 1] -> input pixel x = cx + R sx u + shear R sy v, y = cy + R sy v,
    # in grid_sample's normalised coordinates (align_corners=False: (2 x + 1) / w - 1)
    theta = torch.zeros(k, 2, 3, device=m.device, dtype=m.dtype)
    theta[:, 0, 0] = 2 * FRAME_REACH * sx / w
    theta[:, 0, 1] = 2 * FRAME_REACH * shear * sy / w
    theta[:, 0, 2] = (2 * cx + 1) / w - 1
    theta[:, 1, 1] = 2 * FRAME_REACH * sy / h
    theta[:, 1, 2] = (2 * cy + 1) / h - 1
    grid = F.affine_grid(theta, [k, 1, CROP, CROP], align_corners=False)
    frames = F.grid_sample(m[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]
    return frames * (mass > 0).to(m.dtype)[:, None, None]


def moment_descriptors(masks: Tensor) -> Tensor:
    """(B, M, H, W) part masks (soft or bool, empty for padding) -> (B, M, MOMENT_DIM) unit
    vectors (zeros for an empty mask): the mask in its moment frame (`moment_frames`), 8 x 8
    cells of gradient magnitude and soft orientation (the classic backbone's channels, as the
    outline descriptor of `linewatch.detector.shape`). Invariant to where the part lies, its
    size, width and slant; not to another shape, a mirror image or a quarter turn."""
    b, m = masks.shape[:2]
    if b * m == 0:
        return masks.new_zeros(b, m, MOMENT_DIM, dtype=torch.float32)
    frames = moment_frames(masks.reshape(b * m, *masks.shape[-2:]))
    _, gx, gy, _ = ClassicFeatures.blur_and_gradients(frames[:, None])
    cells = F.avg_pool2d(oriented_gradients(gx, gy), CELL)  # (B*M, 5, 8, 8)
    present = (masks.flatten(2).amax(2) > 0).reshape(b * m, 1).float()  # an empty mask: zeros, not its gradients' eps
    return (F.normalize(cells.flatten(1), dim=1, eps=1e-12) * present).reshape(b, m, MOMENT_DIM)


def part_identities(outlines: Tensor, masks: Tensor, descriptor: str) -> Tensor:
    """What identity compares, per `measure.identity_descriptor`: "outline", the outline
    descriptors themselves; "outline_and_moment", `identity_descriptors`; "outline_or_moment",
    the outline descriptors followed by `moment_descriptors` (two blocks: `identity_blocks`).
    outlines (B, M, D_o), masks (B, M, S, S) at the working size."""
    if descriptor == "outline_and_moment":
        return identity_descriptors(outlines, masks)
    if descriptor == "outline_or_moment":
        return torch.cat([outlines.float(), _moments(masks, outlines)], dim=-1)
    return outlines


def identity_blocks(descriptor: str, width: int) -> list[slice]:
    """The blocks of a `part_identities` descriptor of `width` values that are compared each on
    its own: the whole descriptor, or for "outline_or_moment" the outline descriptor and the
    moment frame (`SlotIdentity` takes, per place, the one that tells it from the others best)."""
    if descriptor == "outline_or_moment":
        return [slice(0, width - MOMENT_DIM), slice(width - MOMENT_DIM, width)]
    return [slice(0, width)]


def _moments(masks: Tensor, outlines: Tensor, images_per_chunk: int = 16) -> Tensor:
    """`moment_descriptors` a few images at a time: a bank's masks as floats all at once would be
    its masks times 2 or 4."""
    moments = [moment_descriptors(masks[i:i + images_per_chunk].float())
               for i in range(0, masks.shape[0], images_per_chunk)]
    return torch.cat(moments) if moments else outlines.new_zeros(0, masks.shape[1], MOMENT_DIM)


def identity_descriptors(outlines: Tensor, masks: Tensor, images_per_chunk: int = 16) -> Tensor:
    """The identity descriptor of every part: its outline descriptor (B, M, D_o) (unit vectors,
    `linewatch.detector.shape`) joined with `moment_descriptors` of its mask (B, M, H, W) (soft,
    bool or half), each weighted 1/sqrt(2) -> (B, M, D_o + MOMENT_DIM) unit vectors (zeros for
    padding). The box frame keeps a part's aspect (a long screw is not a short one); the moment
    frame takes away what a writer varies (slant, width). A few images at a time: a bank's
    masks as floats all at once would be its masks times 2 or 4."""
    return torch.cat([outlines.float(), _moments(masks, outlines, images_per_chunk)], dim=-1) / math.sqrt(2.0)


def box_centres(boxes: Tensor) -> Tensor:
    """(..., 4) x, y, w, h -> (..., 2) centres."""
    return boxes[..., :2] + boxes[..., 2:] / 2


def slot_members(query_boxes: Tensor, bank_boxes: Tensor, bank_valid: Tensor, reach: float = SLOT_REACH,
                 exclude: Tensor | None = None) -> Tensor:
    """Which bank parts lie in each query part's slot: query_boxes (B, M, 4), bank_boxes (Z, N, 4),
    bank_valid (Z, N) -> (B, M, Z*N) bool (the bank's parts flattened image by image); exclude
    (B,): the bank image each query is, whose parts are left out (leave-one-out), or None."""
    z, n = bank_valid.shape
    near = torch.cdist(box_centres(query_boxes.float()), box_centres(bank_boxes.float()).reshape(1, z * n, 2)
                       .expand(query_boxes.shape[0], -1, -1))
    reach_px = reach * query_boxes[..., 2:].float().amax(-1, keepdim=True)  # (B, M, 1)
    members = (near < reach_px) & bank_valid.reshape(1, 1, z * n)
    if exclude is not None:
        own = (exclude[:, None] == torch.arange(z, device=bank_valid.device)).repeat_interleave(n, dim=1)  # (B, Z*N)
        members = members & ~own[:, None, :]
    return members


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


def slot_floor(spreads: Tensor, valid: Tensor, margin: float) -> float:
    """The least spread a slot is given (`identity_distances`' floor): a quarter of the bank
    parts' median `slot_spreads` (those with a slot), and at least JITTER / margin (margin:
    measure.identity_margin, > 0)."""
    spread = spreads[valid & (spreads > 0)]
    return max(float(spread.median()) * 0.25 if spread.numel() else 1.0, JITTER / margin)


def identity_distances(shapes: Tensor, boxes: Tensor, valid: Tensor, bank_shapes: Tensor, bank_boxes: Tensor,
                       bank_valid: Tensor, spreads: Tensor, floor: float, exclude: Tensor | None = None,
                       reach: float = SLOT_REACH, members: Tensor | None = None) -> Tensor:
    """Identity z of every query part (see the module docstring): shapes (B, M, D), boxes (B, M, 4),
    valid (B, M) of the query parts; the bank's shapes (Z, N, D), boxes (Z, N, 4), valid (Z, N)
    and `slot_spreads` (Z, N); floor: the least spread a slot is given (a slot whose good parts
    happen to be near-identical must not turn a tiny difference into a large z: `slot_floor`); exclude (B,):
    the bank image each query is (leave-one-out), or None; members: `slot_members` of these
    arguments when the caller has them already. -> (B, M), 0 for padding and for a part with no
    slot."""
    z, n = bank_valid.shape
    if members is None:
        members = slot_members(boxes, bank_boxes, bank_valid, reach, exclude)  # (B, M, Z*N)
    good = bank_shapes.reshape(1, z * n, -1).float().expand(shapes.shape[0], -1, -1)
    nearest = torch.cdist(shapes.float(), good).masked_fill(~members, float("inf")).amin(2)  # (B, M)
    count = members.sum(2)
    spread = (members.float() * spreads.reshape(1, 1, z * n)).sum(2) / count.clamp_min(1)
    score = nearest / spread.clamp_min(floor)
    return torch.where(valid & (count > 0), score, torch.zeros_like(score))


def slot_separations(shapes: Tensor, boxes: Tensor, valid: Tensor, spreads: Tensor,
                     reach: float = SLOT_REACH) -> Tensor:
    """How well a descriptor tells each bank part's slot from the others: its `slot_spreads`
    divided by its distance to the nearest bank part outside its slot (another place, any good
    image): shapes (Z, N, D), boxes (Z, N, 4), valid (Z, N), spreads (Z, N) -> (Z, N); smaller
    is better, 0 where no part lies outside the slot (and for padding)."""
    z, n = valid.shape
    members = slot_members(boxes, boxes, valid, reach).reshape(z * n, z * n)
    flat = shapes.reshape(z * n, -1).float()
    outside = torch.cdist(flat, flat).masked_fill(members | ~valid.reshape(1, z * n), float("inf")).amin(1)
    separations = spreads.reshape(-1) / outside
    usable = valid.reshape(-1) & torch.isfinite(outside) & (outside > 0)
    return torch.where(usable, separations, torch.zeros_like(separations)).reshape(z, n)


@dataclass
class SlotIdentity:
    """What part identity knows of a bank (computed once, when the Inspector loads it), per block
    of the identity descriptor (`identity_blocks`, K of them): spreads (K, Z, N) `slot_spreads`,
    floors K `slot_floor`s, separations (K, Z, N) `slot_separations`. With two blocks (the
    outline and the moment frame: `measure.identity_descriptor: outline_or_moment`) each part is
    judged in the moment frame where its slot's good parts are clearly (MOMENT_GAIN) more alike
    in it, relative to the other places' parts, than in the outline, else by the outline: the
    moment frame for a handwritten character (it takes the writer's slant and width away), the
    outline for a rigid part (the moment frame scales a long screw to a short one)."""

    blocks: list[slice]
    spreads: Tensor
    floors: list[float]
    separations: Tensor

    @classmethod
    def of_bank(cls, identities: Tensor, boxes: Tensor, valid: Tensor, descriptor: str,
                margin: float) -> "SlotIdentity":
        """identities (Z, N, I) the bank's `part_identities`, boxes (Z, N, 4), valid (Z, N);
        descriptor and margin: measure.identity_descriptor and measure.identity_margin."""
        blocks = identity_blocks(descriptor, identities.shape[-1])
        spreads = torch.stack([slot_spreads(identities[..., block], boxes, valid) for block in blocks])
        separations = torch.stack([slot_separations(identities[..., block], boxes, valid, spread)
                                   for block, spread in zip(blocks, spreads)])
        return cls(blocks, spreads, [slot_floor(spread, valid, margin) for spread in spreads], separations)

    def of_images(self, images: Tensor, n: int) -> "SlotIdentity":
        """The same for the bank images `images` (R,) and their first n parts, in that order."""
        return SlotIdentity(self.blocks, self.spreads[:, images, :n], self.floors, self.separations[:, images, :n])

    def distances(self, identities: Tensor, boxes: Tensor, valid: Tensor, bank_identities: Tensor, bank_boxes: Tensor,
                  bank_valid: Tensor, exclude: Tensor | None = None) -> Tensor:
        """Identity z of every query part (`identity_distances` per block; with two blocks, per part
        the moment frame's where its slot's mean separation is below MOMENT_GAIN times the
        outline's, else the outline's): identities (B, M, I), boxes (B, M, 4), valid (B, M), the
        bank's identities (Z, N, I), boxes and valid -> (B, M)."""
        members = slot_members(boxes, bank_boxes, bank_valid, exclude=exclude)  # (B, M, Z*N), once for every block
        zs = torch.stack([
            identity_distances(identities[..., block], boxes, valid, bank_identities[..., block], bank_boxes,
                               bank_valid, spread, floor, exclude, members=members)
            for block, spread, floor in zip(self.blocks, self.spreads, self.floors)])  # (K, B, M)
        if len(self.blocks) == 1:
            return zs[0]
        weights = members.float()
        separation = (weights[None] * self.separations.reshape(2, 1, 1, -1)).sum(-1) / weights.sum(-1).clamp_min(1)
        return torch.where(separation[1] < MOMENT_GAIN * separation[0], zs[1], zs[0])
