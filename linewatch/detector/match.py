"""Object Matching Module (paper 3.5.2): optimal transport with a dustbin, SuperGlue style.

Query objects (M per image) are matched to reference objects (N per image) by a partial
assignment (eq. 9) computed with log-domain Sinkhorn on the descriptor score matrix (eq. 10)
augmented with a dustbin row and column of score z. Batched over B with padding masks, so
one call handles many (frame, reference) pairs with different object counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def _all_valid(b: int, n: int, device: torch.device) -> Tensor:
    return torch.ones(b, n, dtype=torch.bool, device=device)


def log_optimal_transport(
    scores: Tensor,
    dustbin: float | Tensor,
    iterations: int,
    query_valid: Tensor | None = None,
    ref_valid: Tensor | None = None,
) -> Tensor:
    """Log-domain Sinkhorn with a dustbin row and column (SuperGlue's formulation).

    For each batch item with m valid queries and n valid references:
        norm = -log(m + n), log_mu = [norm]*m + [log n + norm], log_nu = [norm]*n + [log m + norm]
        u = log_mu - logsumexp_j(Z + v),  v = log_nu - logsumexp_i(Z + u)
        result = Z + u + v - norm
    so exp(result) has rows summing to 1 for each valid query and n for the dustbin row,
    columns summing to 1 for each valid reference and m for the dustbin column.
    Padded rows/columns (and a dustbin whose marginal is 0, i.e. m == 0 or n == 0) are -inf
    and take no part, so the valid block equals the unpadded problem exactly.

    Args:
        scores: (B, M, N) score matrix (eq. 10).
        dustbin: dustbin score z, a float, a scalar tensor or a (B,) tensor.
        iterations: number of Sinkhorn iterations.
        query_valid: (B, M) bool, None means all valid.
        ref_valid: (B, N) bool, None means all valid.
    Returns:
        (B, M+1, N+1) log assignment; the last row/column is the dustbin.
    """
    b, m, n = scores.shape
    dev, dt = scores.device, scores.dtype
    qv = _all_valid(b, m, dev) if query_valid is None else query_valid.to(dev, torch.bool)
    rv = _all_valid(b, n, dev) if ref_valid is None else ref_valid.to(dev, torch.bool)
    ms = qv.sum(1).to(dt)  # (B,) valid counts
    ns = rv.sum(1).to(dt)

    # a Python number is filled in on the device (torch.as_tensor of it would be a host-to-device copy)
    z = dustbin.to(dev, dt) if isinstance(dustbin, torch.Tensor) else scores.new_full((), float(dustbin))
    z = z.reshape(-1, 1, 1).expand(b, 1, 1) if z.numel() in (1, b) else z
    if z.shape != (b, 1, 1):
        raise ValueError(f"dustbin must be a scalar or have B={b} elements, got shape {tuple(z.shape)}")
    # Augmented score matrix, eq. 10 plus the dustbin ("trash bin") row/column.
    couplings = torch.cat(
        [torch.cat([scores, z.expand(b, m, 1)], 2), torch.cat([z.expand(b, 1, n), z], 2)], 1
    )
    # Rows/columns that carry mass: valid objects, and the dustbins when the other side is non-empty.
    row_on = torch.cat([qv, (ns > 0)[:, None]], 1)  # (B, M+1)
    col_on = torch.cat([rv, (ms > 0)[:, None]], 1)  # (B, N+1)
    on = row_on[:, :, None] & col_on[:, None, :]
    # -inf where inactive: masked_fill with a Python number (no tensor made from host data)
    couplings = couplings.masked_fill(~on, -math.inf)

    norm = -torch.log((ms + ns).clamp_min(1.0))  # (B,)
    log_mu = torch.cat([norm[:, None].expand(b, m), (torch.log(ns) + norm)[:, None]], 1)
    log_nu = torch.cat([norm[:, None].expand(b, n), (torch.log(ms) + norm)[:, None]], 1)

    # An inactive row's potential must stay finite (its couplings are all -inf: -inf - (-inf) would
    # be NaN). Rather than a `where` per half-iteration (two launches of about nine per
    # iteration), the row update reads the couplings with every inactive row set to 0 and
    # log_mu 0 there, the column update the same for inactive columns: an inactive row's (column's)
    # potential is then finite, and it still takes no part in the other update, whose couplings
    # keep -inf on it. Every active row and column sees exactly the operations it saw with the
    # `where`s (tests/detector/test_match.py holds the two bit for bit equal).
    rows_view = couplings.masked_fill(~row_on[:, :, None], 0.0)
    cols_view = couplings.masked_fill(~col_on[:, None, :], 0.0)
    log_mu = log_mu.masked_fill(~row_on, 0.0)
    log_nu = log_nu.masked_fill(~col_on, 0.0)
    u = torch.zeros(b, m + 1, dtype=dt, device=dev)
    v = torch.zeros(b, n + 1, dtype=dt, device=dev)
    for _ in range(iterations):
        u = log_mu - torch.logsumexp(rows_view + v[:, None, :], dim=2)
        v = log_nu - torch.logsumexp(cols_view + u[:, :, None], dim=1)
    return couplings + u[:, :, None] + v[:, None, :] - norm[:, None, None]


def matching_vectors(descriptors: Tensor, shapes: Tensor | None, descriptor_mean: Tensor | None,
                     shape_mean: Tensor | None, shape_weight: float) -> Tensor:
    """What OMM compares (the same for query and reference objects): descriptors (..., C), less
    the bank's mean good-object descriptor when given (every object pools the same kind of
    features; matching on what sets them apart works far better), then, when parts carry outline
    descriptors (shapes (..., D), less their bank mean when given), joined with them at weight w:
    for unit halves the cosine of the joined vectors is (cos_features + w^2 cos_outlines) / (1 + w^2).
    -> (..., C) or (..., C + D)."""
    vectors = descriptors
    if descriptor_mean is not None:
        vectors = F.normalize(vectors - descriptor_mean, dim=-1)
    if shapes is not None:
        if shape_mean is not None:
            shapes = shapes - shape_mean
        vectors = F.normalize(torch.cat([vectors, shape_weight * F.normalize(shapes, dim=-1)], dim=-1), dim=-1)
    return vectors


@dataclass
class MatchResult:
    """Output of `match_objects` for B (query, reference) pairs.

    matches: (B, M) long, matched reference index per query object, -1 if unmatched/padding.
    match_prob: (B, M) float, assignment probability of that match, 0 where none.
    closest: (B, M) long, argmax reference per valid query object (also for unmatched ones,
        paper 3.5.2), -1 for padding queries or when the reference set is empty.
    ref_matches: (B, N) long, matched query index per reference object, -1 if none.
    log_assignment: (B, M+1, N+1) Sinkhorn output including the dustbin row/column.
    """

    matches: Tensor
    match_prob: Tensor
    closest: Tensor
    ref_matches: Tensor
    log_assignment: Tensor


def match_objects(
    query_desc: Tensor,
    ref_desc: Tensor,
    query_valid: Tensor | None = None,
    ref_valid: Tensor | None = None,
    dustbin: float | Tensor = 1.0,
    threshold: float = 0.2,
    iterations: int = 100,
    score_scale: float = 1.0,
) -> MatchResult:
    """Match query objects to reference objects (paper 3.5.2).

    Scores are inner products of L2-normalised descriptors (eq. 10); the assignment comes
    from `log_optimal_transport`; a pair (i, j) is a match when i and j are each other's
    argmax over the M x N block and exp(log assignment) > threshold (SuperGlue's rule).

    Args:
        query_desc: (B, M, C) query object descriptors.
        ref_desc: (B, N, C) reference object descriptors.
        query_valid: (B, M) bool padding mask (None: all valid).
        ref_valid: (B, N) bool padding mask (None: all valid).
        dustbin: dustbin score z (float, scalar or (B,) tensor).
        threshold: minimum assignment probability for a match.
        iterations: Sinkhorn iterations.
        score_scale: multiplies the cosine scores before Sinkhorn (an inverse temperature;
            1.0 is the paper's eq. 10 literally). Cosines live in [-1, 1], so with
            dustbin=1.0 and scale 1 even a perfect, unambiguous match gets P ~ 0.2 (the dustbin
            is as attractive as cosine 1). Calibrate (score_scale, dustbin) on good images;
            e.g. score_scale=10, dustbin=5 puts the dustbin at cosine 0.5.
    Returns:
        MatchResult; see its docstring for shapes.
    """
    b, m, _ = query_desc.shape
    n = ref_desc.shape[1]
    dev = query_desc.device
    qv = _all_valid(b, m, dev) if query_valid is None else query_valid.to(dev, torch.bool)
    rv = _all_valid(b, n, dev) if ref_valid is None else ref_valid.to(dev, torch.bool)

    q = F.normalize(query_desc, dim=-1)
    r = F.normalize(ref_desc.to(query_desc.dtype), dim=-1)
    scores = score_scale * torch.einsum("bmc,bnc->bmn", q, r)  # eq. 10 (times an optional scale)
    la = log_optimal_transport(scores, dustbin, iterations, qv, rv)

    none_q = torch.full((b, m), -1, dtype=torch.long, device=dev)
    none_r = torch.full((b, n), -1, dtype=torch.long, device=dev)
    if m == 0 or n == 0:  # nothing to take an argmax over
        return MatchResult(none_q, torch.zeros(b, m, dtype=la.dtype, device=dev), none_q.clone(), none_r, la)

    block = la[:, :m, :n]
    max0 = block.max(dim=2)  # best reference per query
    max1 = block.max(dim=1)  # best query per reference
    idx0, idx1 = max0.indices, max1.indices
    ar_m = torch.arange(m, device=dev)[None]
    ar_n = torch.arange(n, device=dev)[None]
    mutual0 = ar_m == idx1.gather(1, idx0)
    mutual1 = ar_n == idx0.gather(1, idx1)
    prob0 = max0.values.exp()  # -inf rows (padding / empty refs) give 0
    ok0 = mutual0 & (prob0 > threshold) & qv
    ok1 = mutual1 & ok0.gather(1, idx1) & rv

    matches = torch.where(ok0, idx0, none_q)
    match_prob = torch.where(ok0, prob0, torch.zeros_like(prob0))
    has_ref = (rv.any(dim=1, keepdim=True) & qv)
    closest = torch.where(has_ref, idx0, none_q)
    ref_matches = torch.where(ok1, idx1, none_r)
    return MatchResult(matches, match_prob, closest, ref_matches, la)
