"""Anomaly Measurement Module (paper 3.6, eqs. 11-15): per-position Gaussian + Mahalanobis.

For one query object, the k reference object feature maps it was matched (or is closest) to
define at every position p a Gaussian N(mu_p, Sigma_p) with Sigma_p = cov_p + eps*I (eq. 11);
the query feature is scored with the Mahalanobis distance (eq. 12). Per-object maps are then
summed into the image map (eqs. 13-15).

With k references the sample covariance has rank <= k-1, so we never form or invert the
C x C matrix: the Woodbury identity reduces every position to a k x k solve.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
