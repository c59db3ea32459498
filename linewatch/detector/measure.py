"""Anomaly Measurement Module (paper 3.6, eqs. 11-15): per-position Gaussian + Mahalanobis.

For one query object, the k reference object feature maps it was matched (or is closest) to
define at every position p a Gaussian N(mu_p, Sigma_p) with Sigma_p = cov_p + eps*I (eq. 11);
the query feature is scored with the Mahalanobis distance (eq. 12). Per-object maps are then
summed into the image map (eqs. 13-15).

With k references the sample covariance has rank <= k-1, so we never form or invert the
C x C matrix: the Woodbury identity reduces every position to a k x k solve.

The measure stage's maps (the Inspector's `measure` orchestrates them, `linewatch.detector.
report` turns them into results), batched over padded (image, object) and (image, reference,
part) tensors, with no host synchronisation but `read_counts`:

    object_statuses            OMM matches (B*k pairs) -> assigned (B, k, M), matched / surplus (B, M)
    object_maps                aligned pairs (`linewatch.detector.align`) -> Mahalanobis maps (B, M, H', W')
    unmatched_reference_parts  reference parts no query object matches (B, k, N) and their cells
    missing_parts              those missing in most references -> maps (B, H', W') and a report
    part_maps                  the weights-free part branches: outline and grain distances (B, H', W')
    identity_map               each part against the good parts of its place (linewatch.detector.identity)
    object_branch              the above composed: the object branch's image map (eq. 15 + beyond)

Chunked work takes `chunk_floats`, about how many floats one chunk may hold.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from linewatch.detector.align import AlignedPairs, aligned_pairs, warp

if TYPE_CHECKING:
    from linewatch.config import MeasureConfig
    from linewatch.detector.bank import TemplateBank
    from linewatch.detector.match import MatchResult


def _helmert_factor(references: Tensor) -> Tensor:
    """H with H H^T = sum_i (f^i - mu)(f^i - mu)^T, using K-1 Helmert contrasts.

    h_j = (f^1 + ... + f^j - j f^{j+1}) / sqrt(j (j+1)), j = 1..K-1. Unlike the K centred
    vectors, these have no exact null combination (the centred ones sum to 0), so the k x k
    system below has no direction where float32 round-off is divided by eps.
    references (..., K, C, P) -> (..., K-1, C, P).
    """
    k = references.shape[-3]
    if k == 1:
        return references[..., :0, :, :]
    j = torch.arange(1, k, dtype=references.dtype, device=references.device)
    csum = references.cumsum(dim=-3)[..., :-1, :, :]  # f^1 + ... + f^j
    scale = (j * (j + 1)).rsqrt()[:, None, None]
    return (csum - j[:, None, None] * references[..., 1:, :, :]) * scale


def mahalanobis(query: Tensor, references: Tensor, eps: float = 0.01) -> Tensor:
    """Mahalanobis distance of query features to per-position Gaussians of k references.

    Sigma = V V^T + eps I with V V^T = sum_i (f^i - mu)(f^i - mu)^T / (k-1)  (eq. 11), V of
    k-1 Helmert contrast columns (none when k = 1, so Sigma = eps I).
    Woodbury: with d = f - mu, w = V^T d, G = V^T V and a = (eps I_{k-1} + G)^{-1} w,
        d^T Sigma^{-1} d = (|d|^2 - w^T a) / eps = |d - V a|^2 / eps + |a|^2      (eq. 12 squared)
    The right-hand form is a sum of non-negative terms, so there is no catastrophic
    cancellation in float32 even for small eps. Only the (k-1) x (k-1) systems are solved in
    float64 (`solve_small`: closed form for k <= 3, batched LU above): G is formed in float32
    and its entries are ~|features|^2, so a float32 determinant would lose the eps part.
    Memory O(k*C*P); no host synchronisation.

    Args:
        query: (..., C, P) query features (P = flattened positions).
        references: (..., K, C, P) the K reference features at the same positions.
        eps: covariance regulariser (eq. 11), > 0.
    Returns:
        (..., P) Mahalanobis distance, dtype of `query`.
    """
    if eps <= 0:
        raise ValueError("eps must be > 0")
    k = references.shape[-3]
    if k < 1:
        raise ValueError("need at least one reference")
    references = references.to(query.dtype)
    mu = references.mean(dim=-3)  # (..., C, P)
    d = query - mu
    v = _helmert_factor(references) / max(k - 1, 1) ** 0.5  # (..., K-1, C, P), empty for k = 1
    k = v.shape[-3]
    if k == 0:  # one reference: Sigma = eps I
        return (d.pow(2).sum(dim=-2) / eps).sqrt()
    # Reductions over C are written as multiply-sum (one row of V at a time for the Gram
    # matrix): torch.einsum lowers these to badly strided bmm calls, ~20x slower on CPU.
    w = (v * d.unsqueeze(-3)).sum(dim=-2)  # V^T d, (..., K-1, P)
    g = torch.stack([(v * v[..., i : i + 1, :, :]).sum(dim=-2) for i in range(k)], dim=-3)  # V^T V, (..., K-1, K-1, P)
    a = solve_small(g.double(), w.double(), eps).to(query.dtype)  # (..., K-1, P)
    resid = d - (v * a.unsqueeze(-2)).sum(dim=-3)  # d - V a
    sq = resid.pow(2).sum(dim=-2) / eps + a.pow(2).sum(dim=-2)
    return sq.clamp_min(0).sqrt()


def solve_small(gram: Tensor, rhs: Tensor, eps: float) -> Tensor:
    """Solve (gram + eps I) a = rhs at every position, batched, without a host synchronisation.

    gram (..., n, n, P) symmetric positive semi-definite, rhs (..., n, P) -> a (..., n, P).
    n = 1: a division; n = 2: the 2 x 2 inverse in closed form (Cramer's rule); larger n:
    torch.linalg.solve_ex (an LU solve that leaves its error flag on the device; the matrix is
    positive definite for eps > 0, so it cannot be singular).
    """
    n = gram.shape[-2]
    if n == 1:
        return rhs / (gram[..., 0, :, :] + eps)
    if n == 2:
        a, b, d = gram[..., 0, 0, :] + eps, gram[..., 0, 1, :], gram[..., 1, 1, :] + eps
        det = a * d - b * b
        r0, r1 = rhs[..., 0, :], rhs[..., 1, :]
        return torch.stack([(d * r0 - b * r1) / det, (a * r1 - b * r0) / det], dim=-2)
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    system = gram.movedim(-1, -3) + eps * eye  # (..., P, n, n)
    solution, _ = torch.linalg.solve_ex(system, rhs.movedim(-1, -2).unsqueeze(-1))  # (..., P, n, 1)
    return solution.squeeze(-1).movedim(-1, -2)


def mahalanobis_direct(query: Tensor, references: Tensor, eps: float = 0.01) -> Tensor:
    """REFERENCE ONLY (tests): eqs. 11-12 with an explicit C x C inverse per position, float64.

    O(C^2 * P) memory; do not use in the pipeline. Shapes as in `mahalanobis`.
    """
    q = query.double()
    r = references.double()
    k, c = r.shape[-3], r.shape[-2]
    mu = r.mean(dim=-3)
    cen = r - mu.unsqueeze(-3)
    cov = torch.einsum("...kcp,...kep->...pce", cen, cen) / max(k - 1, 1)  # eq. 11
    cov = cov + eps * torch.eye(c, dtype=torch.float64, device=q.device)
    d = (q - mu).transpose(-1, -2)  # (..., P, C)
    sq = torch.einsum("...pc,...pce,...pe->...p", d, torch.linalg.inv(cov), d)  # eq. 12 squared
    return sq.clamp_min(0).sqrt()


def combine_object_maps(object_maps: Tensor, valid: Tensor) -> Tensor:
    """Sum per-object anomaly maps into an image map (eqs. 13-15).

    eq. 13 (matching map)     = combine_object_maps(maps, valid & matched)
    eq. 14 (non-matching map) = combine_object_maps(maps, valid & ~matched)
    eq. 15 (final map)        = combine_object_maps(maps, valid), their sum.

    Args:
        object_maps: (B, M, H, W) per-object Mahalanobis maps in image coordinates.
        valid: (B, M) bool; rows with False are ignored (even if they hold NaN/inf).
    Returns:
        (B, H, W) summed map.
    """
    keep = valid.to(device=object_maps.device, dtype=torch.bool)[:, :, None, None]
    zero = torch.zeros((), dtype=object_maps.dtype, device=object_maps.device)
    return torch.where(keep, object_maps, zero).sum(dim=1)


# ---------------------------------------------------------------------------- the measure stage's maps


def rows_per_chunk(chunk_floats: int, floats_per_row: int) -> int:
    """Rows (pairs, images or cells) per chunk so that a chunk holds about `chunk_floats` floats."""
    return max(1, chunk_floats // max(1, floats_per_row))


def object_statuses(match: "MatchResult", valid: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The OMM result of B images against their k references each (B*k pairs) -> assigned
    (B, k, M) the reference object each query object matched, else the closest one; is_matched
    (B, M) matched in at least half of the references; is_surplus (B, M) unmatched, and its
    closest reference object is taken by another query object in at least half of them (a part
    too many); ref_matches (B, k, N) the query object matching each reference object, or -1.
    valid: (B, M) bool."""
    b, m = valid.shape
    matches = match.matches.view(b, k, m)
    closest = match.closest.view(b, k, m)
    ref_matches = match.ref_matches.view(b, k, match.ref_matches.shape[-1])
    assigned = torch.where(matches >= 0, matches, closest).clamp(min=0)  # (B, k, M)
    is_matched = (2 * (matches >= 0).sum(1) >= k) & valid
    taken_by = torch.gather(ref_matches, 2, closest.clamp(min=0))  # (B, k, M)
    own = torch.arange(m, device=valid.device).view(1, 1, m)
    taken = ((taken_by >= 0) & (taken_by != own)).sum(1)
    is_surplus = valid & ~is_matched & (2 * taken >= k)
    return assigned, is_matched, is_surplus, ref_matches


def object_maps(upsampled: Tensor, references: Tensor, bank_features: Tensor, pairs: AlignedPairs,
                most_cells: int, eps: float, chunk_floats: int) -> Tensor:
    """Mahalanobis map (B, M, H', W') of every valid query object against the k reference
    objects it matched or is closest to (eqs. 11-12), computed inside `pairs.in_box` and
    exactly 0 elsewhere (and for padding objects).

    upsampled (B, C, H', W') query features; references (B, k) bank images; bank_features
    (Z, C, H', W'); pairs: the (image, object) pairs with their reference objects moved onto
    them (`linewatch.detector.align.aligned_pairs`); most_cells: the largest number of in-box
    cells of one image (from `read_counts`).

    Batched per image over the in-box cells of all its objects (padded to `most_cells`):
    every object of an image has the same k reference images, so one grid_sample per
    (image, reference) moves the reference features of all its objects. In chunks of images
    and of cells that hold about `chunk_floats` floats (a fixed number for given shapes); no
    per-object loop, no host sync.
    """
    device = upsampled.device
    b, k = references.shape
    m = pairs.query_masks.shape[0] // b
    c, hf, wf = upsampled.shape[-3:]
    n_cells = hf * wf
    spare = m * n_cells  # the padding cell index of an image
    cells = true_indices(pairs.in_box.view(b, spare), most_cells)  # (B, L): object * H'W' + cell, or spare
    real = cells < spare
    cells = torch.where(real, cells, 0)  # padding computes cell 0 of object 0, and is dropped
    pair = torch.arange(b, device=device)[:, None] * m + cells // n_cells  # (B, L)
    cell = cells % n_cells
    query_masks = pairs.query_masks.view(b * m, n_cells)[pair, cell]  # (B, L)
    grids = pairs.grids.view(b * m, k, n_cells, 2)[pair, :, cell].transpose(1, 2)  # (B, k, L, 2)
    ref_masks = pairs.ref_masks.view(b * m, k, n_cells)[pair, :, cell].transpose(1, 2)  # (B, k, L)
    target = torch.where(real, cells, spare)  # where each distance goes; padding into a spare column
    maps = torch.zeros(b, spare + 1, device=device)
    # chunks: half the budget for the images' reference feature maps, half for the cells' terms
    images_per_chunk = rows_per_chunk(chunk_floats, 2 * k * c * n_cells)
    cells_per_chunk = rows_per_chunk(chunk_floats, 2 * (5 * k + 3) * c * min(images_per_chunk, b))  # query, k refs, Woodbury
    for start in range(0, b, images_per_chunk):
        rows = slice(start, start + images_per_chunk)
        q = references[rows].shape[0]
        reference_features = bank_features[references[rows].reshape(-1)].float()  # (q*k, C, H', W')
        query_features = upsampled[rows].flatten(2)  # (q, C, H'*W')
        for first in range(0, most_cells, cells_per_chunk):
            cols = slice(first, first + cells_per_chunk)
            query = query_features.gather(2, cell[rows, None, cols].expand(q, c, -1))  # (q, C, l)
            query = query * query_masks[rows, None, cols]
            moved = warp(reference_features, grids[rows, :, cols].reshape(q * k, 1, -1, 2))  # (q*k, C, 1, l)
            reference = moved.view(q, k, c, -1) * ref_masks[rows, :, None, cols]  # (q, k, C, l)
            maps[rows].scatter_(1, target[rows, cols], mahalanobis(query, reference, eps))
    return maps[:, :spare].reshape(b, m, hf, wf)


def unmatched_reference_parts(references: Tensor, bank: "TemplateBank", ref_matches: Tensor) -> tuple[Tensor, Tensor]:
    """Reference parts no query object matches: (B, k, N) bool, and the cells (B, k, H', W')
    bool where at least one of them has mask > 0 (where a missing part's map can be non-zero).
    references (B, k) bank images; ref_matches (B, k, N) from `object_statuses`."""
    unmatched = bank.object_valid[references] & (ref_matches < 0)  # (B, k, N)
    cells = ((bank.masks[references] > 0) & unmatched[..., None, None]).any(dim=2)  # (B, k, H', W')
    return unmatched, cells


def missing_parts(upsampled: Tensor, references: Tensor, bank: "TemplateBank", candidates: Tensor, cells: Tensor,
                  eps: float, noise_floor: float | None, chunk_floats: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Reference objects that no query object matches, in more than half of the k references.

    upsampled (B, C, H', W') query features; references (B, k) bank images; candidates (U,):
    flat indices into (B, k, N) of the unmatched reference parts, in (image, reference, part)
    order; cells (L,): flat indices into (B, k, H', W') where one of them has mask > 0. A
    candidate (r, j) gets one vote from its reference r and one from every other reference o
    holding an unmatched part whose dilated mask overlaps its dilated mask (soft IoU > 0.3); it
    is missing when 2 * votes > k. Its map compares the query's features inside the reference
    mask with the reference object's features (K = 1 Gaussian, eps*I covariance): mask *
    |query - reference| / sqrt(eps), divided by the part's noise level (at least `noise_floor`)
    unless noise_floor is None; the image map adds the missing parts' maps / k. The distance is
    computed once per (image, reference) cell, not per part.

    Returns maps (B, H', W') and, for the results to copy to the host (where the parts found in
    several references are reported once), on the device: image (U,), missing (U,) bool,
    overlap (U, U) soft IoU of the candidates' masks, box (U, 4) in working pixels, mass (U,)
    mask sum in feature cells, score (U,) peak of the part's map.
    """
    device = upsampled.device
    b, k = references.shape
    n = bank.object_valid.shape[1]
    c, hf, wf = upsampled.shape[-3:]
    image, ref, part = candidates // (k * n), (candidates // n) % k, candidates % n
    z = references[image, ref]  # (U,) bank image of each candidate
    masks = bank.masks[z, part].float()  # (U, H', W')
    u = masks.shape[0]

    # votes; dilated masks: a thin part jittered by a cell or two still overlaps itself
    same_image = image[:, None] == image[None, :]
    near = (soft_overlaps(dilate(masks).view(u, hf * wf)) > 0.3) & same_image  # (U, U)
    refs_of = (ref[:, None] == torch.arange(k, device=device)).float()  # (U, k) one-hot
    seen_in = (near.float() @ refs_of) > 0  # (U, k): reference o holds an overlapping unmatched part
    votes = 1 + (seen_in & ~refs_of.bool()).sum(1)
    missing = 2 * votes > k

    # |query - reference| / sqrt(eps) at the cells, as a dense (B, k, H'*W') map (0 elsewhere)
    distance = torch.zeros(b * k * hf * wf, device=device)
    pair, cell = cells // (hf * wf), cells % (hf * wf)
    y, x = cell // wf, cell % wf
    features_by_channel = upsampled.transpose(0, 1)  # (C, B, H', W') views
    bank_by_channel = bank.features.transpose(0, 1)  # (C, Z, H', W')
    chunk = rows_per_chunk(chunk_floats, 4 * c)
    for start in range(0, cells.shape[0], chunk):
        at = slice(start, start + chunk)
        query = features_by_channel[:, pair[at] // k, y[at], x[at]]  # (C, L)
        reference = bank_by_channel[:, references.reshape(-1)[pair[at]], y[at], x[at]].float()[None]  # (1, C, L)
        distance[cells[at]] = mahalanobis(query, reference, eps)
    part_maps = masks.view(u, hf * wf) * distance.view(b * k, hf * wf)[image * k + ref]  # (U, H'*W')
    if noise_floor is not None:
        part_maps = part_maps / bank.object_noise[z, part].clamp_min(noise_floor)[:, None]
    maps = torch.zeros(b, hf * wf, device=device)
    maps.index_add_(0, image, part_maps * missing[:, None] / k)
    report = {
        "image": image,
        "missing": missing,
        "overlap": soft_overlaps(masks.view(u, hf * wf)),
        "box": bank.boxes[z, part],
        "mass": masks.view(u, hf * wf).sum(1),
        "score": part_maps.amax(1),
    }
    return maps.view(b, hf, wf), report


def part_maps(shapes: Tensor, textures: Tensor, valid: Tensor, soft_masks: Tensor, bank: "TemplateBank",
              exclude: Tensor | None) -> dict[str, Tensor]:
    """The part branches (weights-free backend): each query part's distance to the nearest
    good part of the bank (any image but the query's own, any place) by its outline
    (`linewatch.detector.shape`) and by its grain statistics (`ClassicFeatures.
    texture_channels`), spread over the part's mask: {"outline", "texture"}: (B, H', W').
    A part that no good part resembles (another shape, mirrored, turned, another granular
    texture) stands out whatever the matching did; where a part is (a swap) is left to the
    object and patch branches.

    shapes (B, M, D), textures (B, M, T), valid (B, M), soft_masks (B, M, H', W') of the query
    parts; exclude (B,) the bank image each query is (leave-one-out), or None."""
    z, n = bank.object_valid.shape
    usable = bank.object_valid[None].expand(valid.shape[0], z, n).clone()  # (B, Z, N)
    if exclude is not None:
        own = exclude[:, None] == torch.arange(z, device=valid.device)[None]  # (B, Z)
        usable &= ~own[..., None]
    usable = usable.reshape(-1, z * n)[:, None]  # (B, 1, Z*N)
    maps = {}
    for name, query, good in (("outline", shapes, bank.shapes), ("texture", textures, bank.textures)):
        distances = torch.cdist(query.float(), good.reshape(1, z * n, -1).float().expand(query.shape[0], -1, -1))
        nearest = distances.masked_fill(~usable, float("inf")).amin(2)  # (B, M)
        nearest = torch.where(valid & torch.isfinite(nearest), nearest, torch.zeros_like(nearest))
        maps[name] = (soft_masks * nearest[..., None, None]).amax(1)
    return maps


def identity_map(identity: Tensor, soft_masks: Tensor, margin: float) -> Tensor:
    """Each part's identity z (`linewatch.detector.identity.identity_distances`, (B, M)) beyond
    `margin` (measure.identity_margin), spread over its mask: (B, H', W'). A good part (z about 1)
    adds nothing; a part that is not what its place holds adds how far it is beyond its place's
    good parts."""
    excess = (identity - margin).clamp_min(0.0)
    if soft_masks.shape[1] == 0:
        return soft_masks.new_zeros(soft_masks.shape[0], *soft_masks.shape[-2:])
    return (soft_masks * excess[..., None, None]).amax(1)


class ObjectBranch(NamedTuple):
    """The object branch of a batch: image_maps (B, H', W') the object score map; object_maps
    (B, M, H', W') each query part's map as scored (in units of its noise level when
    measure.normalize_objects), raw_maps the same before that (its Mahalanobis map); is_matched,
    is_surplus (B, M); missing: the missing parts' report (`missing_parts`)."""

    image_maps: Tensor
    object_maps: Tensor
    raw_maps: Tensor
    is_matched: Tensor
    is_surplus: Tensor
    missing: dict[str, Tensor]


def noise_floor(bank: "TemplateBank") -> float:
    """The least noise level a part's map is divided by (measure.normalize_objects): a quarter
    of the bank parts' median, so that a part whose good-image maps are nearly flat does not
    turn tiny differences into alarms (1.0 for a bank without parts)."""
    noise = bank.object_noise[bank.object_valid]
    return float(noise.median()) * 0.25 if noise.numel() else 1.0


def object_branch(upsampled: Tensor, soft_masks: Tensor, valid: Tensor, references: Tensor, match: "MatchResult",
                  bank: "TemplateBank", cfg: "MeasureConfig", floor: float, chunk_floats: int,
                  identity: Tensor | None = None) -> ObjectBranch:
    """AMM of a batch (eqs. 11-15) and beyond: each valid query part (soft_masks (B, M, H', W'),
    valid (B, M)) against the reference parts it matched or is closest to in its k references
    (references (B, k), `match` their OMM over the B*k pairs), after aligning them
    (measure.align_max_shift, align_max_rotation_deg); each part's map in units of its noise
    level (at least `floor`) when measure.normalize_objects; surplus parts weighted by
    surplus_weight; `identity` (B, M), each part's identity z
    (`linewatch.detector.identity.identity_distances`), weighted by identity_weight; the missing
    parts' maps weighted by missing_part_weight.

    The device is read back once (`read_counts`: the sizes of the cell lists to compute)."""
    b, k = references.shape
    assigned, is_matched, is_surplus, ref_matches = object_statuses(match, valid, k)
    hf, wf = upsampled.shape[-2:]
    pairs = aligned_pairs(soft_masks, valid, references, assigned, is_matched, bank.masks,
                          cfg.align_max_shift * max(hf, wf), math.radians(cfg.align_max_rotation_deg), chunk_floats)
    unmatched, unmatched_cells = unmatched_reference_parts(references, bank, ref_matches)
    counts = read_counts(torch.cat([pairs.in_box.reshape(b, -1).sum(1), unmatched.sum().view(1),
                                    unmatched_cells.sum().view(1)]))
    most_cells, n_unmatched, n_unmatched_cells = max(counts[:b], default=0), counts[b], counts[b + 1]

    raw = object_maps(upsampled, references, bank.features, pairs, most_cells, cfg.eps, chunk_floats)
    maps = raw
    if cfg.normalize_objects:  # each part's map in units of what that part's map reaches on good images
        noise = bank.object_noise[references[:, :, None], assigned].mean(1)  # (B, M)
        maps = raw / noise.clamp_min(floor)[..., None, None]
    weights = torch.where(is_surplus, cfg.surplus_weight, 1.0)
    image_maps = (maps * weights[..., None, None] * valid[..., None, None]).sum(1)  # eq. 15
    if identity is not None:  # each part against the good parts of its place (beyond the paper)
        image_maps = image_maps + cfg.identity_weight * identity_map(identity, soft_masks, cfg.identity_margin)
    missing_maps, missing = missing_parts(
        upsampled, references, bank, true_indices(unmatched.reshape(1, -1), n_unmatched)[0],
        true_indices(unmatched_cells.reshape(1, -1), n_unmatched_cells)[0], cfg.eps,
        floor if cfg.normalize_objects else None, chunk_floats)
    return ObjectBranch(image_maps + cfg.missing_part_weight * missing_maps, maps, raw, is_matched, is_surplus,
                        missing)


def read_counts(counts: Tensor) -> list[int]:
    """(n,) integer tensor -> list of n ints, in ONE small device -> host read: the sizes of the
    measure stage's data-dependent lists of cells (its only host sync before the results copy)."""
    return counts.tolist()


def true_indices(mask: Tensor, count: int) -> Tensor:
    """Column indices of the True entries of each row of a bool mask (R, n), in order, padded
    with n to `count` columns (count >= any row's number of True, from `read_counts`): (R, count).
    What torch.nonzero gives per row, without its host sync."""
    r, n = mask.shape
    slot = torch.where(mask, mask.cumsum(1) - 1, count)  # output column; `count` is a spare one for False
    out = torch.full((r, count + 1), n, dtype=torch.long, device=mask.device)
    out.scatter_(1, slot, torch.arange(n, device=mask.device).expand(r, n))
    return out[:, :count]


def soft_overlaps(masks: Tensor) -> Tensor:
    """Pairwise soft IoU sum(min) / sum(max) (0 where both are empty) of masks (..., T, P) -> (..., T, T).

    With L1 = sum |a - b| and S = sum a + sum b: sum min(a, b) = (S - L1) / 2 and
    sum max(a, b) = (S + L1) / 2, so one torch.cdist(p=1) gives both without a (T, T, P) tensor."""
    l1 = torch.cdist(masks, masks, p=1)
    mass = masks.sum(-1)
    total = mass[..., :, None] + mass[..., None, :]
    union = total + l1
    return torch.where(union > 0, (total - l1) / union.clamp_min(1e-12), torch.zeros_like(union))


def dilate(masks: Tensor, cells: int = 2) -> Tensor:
    """Grey dilation of masks (..., H, W) by `cells` pixels in every direction (a square max
    filter, done as a row then a column max filter)."""
    h, w = masks.shape[-2:]
    flat = masks.reshape(-1, 1, h, w)
    if flat.shape[0] == 0:
        return masks
    size = 2 * cells + 1
    rows = F.max_pool2d(flat, (1, size), stride=1, padding=(0, cells))
    return F.max_pool2d(rows, (size, 1), stride=1, padding=(cells, 0)).view(masks.shape)
