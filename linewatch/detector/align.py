"""Mask geometry and the alignment of reference parts onto query parts (beyond the paper).

Parts shift and turn a little on any real line; compared cell by cell, the edges of a good
part that moved would dominate its anomaly map. Before the measure stage compares a query
object with the k reference objects it matched, each reference object is moved onto it:
translation of the mask centroids, and rotation of the principal axes when both parts are
elongated, within `measure.align_max_shift` / `align_max_rotation_deg`. A larger displacement
is not undone, so a part in the wrong place still scores at both places.

    mask_boxes       bool masks (..., H, W) -> boxes (..., 4) x, y, w, h
    box_of_support   bool maps (..., H, W) -> True inside each map's bounding box
    mask_moments     soft masks (..., H, W) -> centroid (..., 2), axis angle (...,), elongation (...,)
    reference_grids  query (q, H, W) + reference (q, k, H, W) masks -> sampling grids (q, k, H, W, 2)
    warp             maps (n, C, H, W) sampled at grids (n, h, w, 2) -> (n, C, h, w)
    aligned_pairs    every (image, object) pair of a batch with its k reference objects moved onto it

Pure tensor code: no host synchronisation, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class AlignedPairs:
    """The (image, object) pairs of a batch, image-major (B*M rows), with their k reference objects.

    query_masks (B*M, H', W'); grids (B*M, k, H', W', 2) that move the reference objects onto the
    query object (F.grid_sample, align_corners=False); ref_masks (B*M, k, H', W') the moved
    reference masks; in_box (B*M, H', W') bool, the bounding box of the query and moved reference
    masks, where the pair's distance map can be non-zero (all False for padding pairs).
    """

    query_masks: Tensor
    grids: Tensor
    ref_masks: Tensor
    in_box: Tensor


def mask_boxes(masks: Tensor) -> Tensor:
    """Bounding boxes (..., 4) as x, y, w, h (float32) of bool masks (..., H, W); zeros for empty masks.

    Batched over all masks: the first and last occupied row and column come from argmax over
    the any() profiles (argmax returns the first maximum), no per-mask loop, no host sync."""
    rows = masks.any(dim=-1)  # (..., H)
    cols = masks.any(dim=-2)  # (..., W)
    y0, y1 = _first_last(rows)
    x0, x1 = _first_last(cols)
    box = torch.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], dim=-1).float()
    return torch.where(rows.any(dim=-1)[..., None], box, torch.zeros_like(box))


def _first_last(line: Tensor) -> tuple[Tensor, Tensor]:
    """Indices (...,) of the first and the last True along the last dim of `line` (..., L) bool
    (0 and L - 1 where there is none)."""
    as_int = line.to(torch.uint8)
    first = as_int.argmax(dim=-1)
    last = line.shape[-1] - 1 - as_int.flip(-1).argmax(dim=-1)
    return first, last


def box_of_support(support: Tensor) -> Tensor:
    """(..., H, W) bool -> (..., H, W) bool, True inside the bounding box of each map's True cells
    (all False for an empty map)."""
    rows = _span(support.any(dim=-1))  # (..., H)
    cols = _span(support.any(dim=-2))  # (..., W)
    return rows[..., :, None] & cols[..., None, :]


def _span(line: Tensor) -> Tensor:
    """(..., L) bool -> True from the first to the last True of each line."""
    return (line.cumsum(dim=-1) > 0) & (line.flip(-1).cumsum(dim=-1).flip(-1) > 0)


def mask_moments(masks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Centroid (..., 2) as (x, y) pixels, principal-axis angle (...,) in radians, and
    elongation (...,) = major / minor axis variance, of soft masks (..., H, W)."""
    h, w = masks.shape[-2:]
    ys = torch.arange(h, device=masks.device, dtype=masks.dtype).view(h, 1)
    xs = torch.arange(w, device=masks.device, dtype=masks.dtype).view(1, w)
    mass = masks.sum((-2, -1)).clamp_min(1e-6)
    cx = (masks * xs).sum((-2, -1)) / mass
    cy = (masks * ys).sum((-2, -1)) / mass
    dx = xs - cx[..., None, None]
    dy = ys - cy[..., None, None]
    mxx = (masks * dx * dx).sum((-2, -1)) / mass
    myy = (masks * dy * dy).sum((-2, -1)) / mass
    mxy = (masks * dx * dy).sum((-2, -1)) / mass
    angle = 0.5 * torch.atan2(2 * mxy, mxx - myy)
    spread = torch.sqrt((mxx - myy) ** 2 + 4 * mxy**2)
    elongation = (mxx + myy + spread) / (mxx + myy - spread).clamp_min(1e-6)
    return torch.stack([cx, cy], dim=-1), angle, elongation


def reference_grids(query_masks: Tensor, ref_masks: Tensor, allowed: Tensor, max_shift: float,
                    max_rotation: float, min_elongation: float = 1.5) -> Tensor:
    """Sampling grids (q, k, H, W, 2) that move each reference object onto its query object,
    for F.grid_sample with align_corners=False.

    query_masks (q, H, W); ref_masks (q, k, H, W); allowed (q,) bool. Translation takes the
    reference mask centroid to the query's; rotation turns the reference's principal axis onto
    the query's when both parts are elongated (major / minor variance above `min_elongation`).
    Pairs whose motion exceeds max_shift (pixels) or max_rotation (radians), or that are not
    allowed, get the identity grid.
    """
    q, k, h, w = ref_masks.shape
    cq, aq, eq = mask_moments(query_masks)
    cr, ar, er = mask_moments(ref_masks)
    turn = torch.remainder(aq[:, None] - ar + math.pi / 2, math.pi) - math.pi / 2  # axis angles are mod pi
    turn = torch.where((eq[:, None] > min_elongation) & (er > min_elongation), turn, torch.zeros_like(turn))
    shift = (cq[:, None] - cr).norm(dim=-1)
    ok = allowed[:, None] & (shift <= max_shift) & (turn.abs() <= max_rotation)
    turn = torch.where(ok, turn, torch.zeros_like(turn))
    # output pixel p takes the reference at R(-turn) (p - cq) + cr; in normalised coordinates
    # (align_corners=False, square maps assumed equal in x and y scale)
    def normalised(c: Tensor) -> Tensor:  # pixel centres (x, y) -> [-1, 1]
        return torch.stack([(2 * c[..., 0] + 1) / w - 1, (2 * c[..., 1] + 1) / h - 1], dim=-1)

    cqn = normalised(cq)[:, None].expand(q, k, 2)
    crn = normalised(cr)
    cos, sin = torch.cos(turn), torch.sin(turn)
    rot = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # R(-turn), (q, k, 2, 2)
    offset = crn - (rot @ cqn[..., None])[..., 0]
    theta = torch.cat([rot, offset[..., None]], dim=-1)  # (q, k, 2, 3)
    identity = torch.eye(2, 3, device=theta.device, dtype=theta.dtype)  # made on the device: no host copy
    theta = torch.where(ok[..., None, None], theta, identity)
    grid = F.affine_grid(theta.reshape(q * k, 2, 3), [q * k, 1, h, w], align_corners=False)
    return grid.view(q, k, h, w, 2)


def warp(maps: Tensor, grid: Tensor) -> Tensor:
    """Sample maps (n, C, H, W) at grid (n, h, w, 2) -> (n, C, h, w); zeros outside."""
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def aligned_pairs(soft_masks: Tensor, valid: Tensor, references: Tensor, assigned: Tensor, is_matched: Tensor,
                  bank_masks: Tensor, max_shift: float, max_rotation: float, chunk_floats: int) -> AlignedPairs:
    """Every (image, object) pair of a batch, padding included, with its k reference objects
    moved onto it where allowed and the box where its distance map can be non-zero.

    soft_masks (B, M, H', W') the query objects; valid (B, M) bool; references (B, k) bank
    images; assigned (B, k, M) the reference object each query object matched (or is closest
    to) in each reference; is_matched (B, M) bool: only matched objects are moved; bank_masks
    (Z, N, H', W') the bank's object masks; max_shift in feature cells (0: never move),
    max_rotation in radians. Masks and grids only (no features), on the full grid, in chunks
    of pairs that hold about `chunk_floats` floats.
    """
    b, m = valid.shape
    k = references.shape[1]
    hf, wf = soft_masks.shape[-2:]
    n_pairs = b * m
    device = soft_masks.device
    query_masks = soft_masks.reshape(n_pairs, hf, wf)  # image-major
    bank_index = references[:, None].expand(b, m, k).reshape(n_pairs, k)  # (B*M, k) bank image of each reference
    ref_objects = assigned.transpose(1, 2).reshape(n_pairs, k)  # (B*M, k)
    allowed = (is_matched & (max_shift > 0)).reshape(n_pairs)
    grids = torch.empty(n_pairs, k, hf, wf, 2, device=device)
    ref_masks = torch.empty(n_pairs, k, hf, wf, device=device)
    in_box = torch.empty(n_pairs, hf, wf, dtype=torch.bool, device=device)
    chunk = max(1, chunk_floats // (4 * k * hf * wf))  # masks and grids per pair
    for start in range(0, n_pairs, chunk):
        rows = slice(start, start + chunk)
        original = bank_masks[bank_index[rows], ref_objects[rows]].float()  # (q, k, H', W')
        q = original.shape[0]
        grids[rows] = reference_grids(query_masks[rows], original, allowed[rows], max_shift, max_rotation)
        moved = warp(original.reshape(q * k, 1, hf, wf), grids[rows].reshape(q * k, hf, wf, 2))
        ref_masks[rows] = moved.view(q, k, hf, wf)
        # outside the query mask and every reference mask both sides are zero and so is the distance
        in_box[rows] = box_of_support((query_masks[rows] + ref_masks[rows].sum(1)) > 1e-4)
    in_box &= valid.reshape(n_pairs, 1, 1)
    return AlignedPairs(query_masks, grids, ref_masks, in_box)
