import math

import pytest
import torch

from linewatch.detector.match import MatchResult, log_optimal_transport, match_objects


def direct_sinkhorn(scores: torch.Tensor, z: float, iters: int = 2000) -> torch.Tensor:
    """Plain (non-log) Sinkhorn in float64 with explicit SuperGlue marginals; returns log P*(m+n)."""
    m, n = scores.shape
    s = torch.full((m + 1, n + 1), z, dtype=torch.float64)
    s[:m, :n] = scores.double()
    k = s.exp()
    mu = torch.tensor([1.0] * m + [float(n)], dtype=torch.float64) / (m + n)
    nu = torch.tensor([1.0] * n + [float(m)], dtype=torch.float64) / (m + n)
    a = torch.ones(m + 1, dtype=torch.float64)
    b = torch.ones(n + 1, dtype=torch.float64)
    for _ in range(iters):
        a = mu / (k @ b)
        b = nu / (k.T @ a)
    p = a[:, None] * k * b[None, :]
    return torch.log(p * (m + n))


def test_sinkhorn_matches_direct_float64():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 4, generator=g, dtype=torch.float64)
    la = log_optimal_transport(scores[None], 0.7, iterations=500)
    assert la.shape == (1, 4, 5)
    torch.testing.assert_close(la[0], direct_sinkhorn(scores, 0.7), atol=1e-9, rtol=1e-9)


def test_sinkhorn_marginals():
    g = torch.Generator().manual_seed(1)
    m, n = 3, 5
    scores = 2 * torch.randn(2, m, n, generator=g, dtype=torch.float64)
    p = log_optimal_transport(scores, torch.tensor([0.0, 1.5], dtype=torch.float64), iterations=300).exp()
    rows, cols = p.sum(2), p.sum(1)
    torch.testing.assert_close(rows[:, :m], torch.ones(2, m, dtype=torch.float64))
    torch.testing.assert_close(rows[:, m], torch.full((2,), float(n), dtype=torch.float64))
    torch.testing.assert_close(cols[:, :n], torch.ones(2, n, dtype=torch.float64))
    torch.testing.assert_close(cols[:, n], torch.full((2,), float(m), dtype=torch.float64))
    # the M x N block is a partial assignment (eq. 9)
    assert (p[:, :m, :n].sum(2) <= 1 + 1e-9).all() and (p[:, :m, :n].sum(1) <= 1 + 1e-9).all()


def test_padded_batch_equals_unpadded_problems():
    g = torch.Generator().manual_seed(2)
    sizes = [(3, 4), (2, 2), (4, 1)]
    probs = [torch.randn(m, n, generator=g) for m, n in sizes]
    dust = torch.tensor([0.3, 1.0, -0.5])
    M, N = 5, 6
    batch = 100 * torch.randn(len(sizes), M, N, generator=g)  # garbage in the padding
    qv = torch.zeros(len(sizes), M, dtype=torch.bool)
    rv = torch.zeros(len(sizes), N, dtype=torch.bool)
    for i, (m, n) in enumerate(sizes):
        batch[i, :m, :n] = probs[i]
        qv[i, :m] = True
        rv[i, :n] = True
    la = log_optimal_transport(batch, dust, 50, qv, rv)
    assert not torch.isnan(la).any()
    for i, (m, n) in enumerate(sizes):
        ref = log_optimal_transport(probs[i][None], float(dust[i]), 50)[0]
        torch.testing.assert_close(la[i, :m, :n], ref[:m, :n])
        torch.testing.assert_close(la[i, :m, N], ref[:m, n])
        torch.testing.assert_close(la[i, M, :n], ref[m, :n])
        torch.testing.assert_close(la[i, M, N], ref[m, n])
        assert torch.isneginf(la[i, m:M, :]).all() and torch.isneginf(la[i, :, n:N]).all()


def test_padding_not_at_the_end():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(1, 3, 3, generator=g)
    qv = torch.tensor([[True, False, True]])
    la = log_optimal_transport(s, 0.5, 50, qv, None)
    ref = log_optimal_transport(s[:, [0, 2]], 0.5, 50)
    torch.testing.assert_close(la[:, [0, 2, 3]], ref)


def _sinkhorn_with_wheres(scores, dustbin, iterations, query_valid, ref_valid):
    """The loop as it was written before (a `where` per half-iteration keeps the potentials of
    inactive rows and columns at 0): the reference for the loop without them."""
    b, m, n = scores.shape
    ms, ns = query_valid.sum(1).to(scores.dtype), ref_valid.sum(1).to(scores.dtype)
    z = torch.full((b, 1, 1), dustbin, dtype=scores.dtype)
    couplings = torch.cat([torch.cat([scores, z.expand(b, m, 1)], 2), torch.cat([z.expand(b, 1, n), z], 2)], 1)
    row_on = torch.cat([query_valid, (ns > 0)[:, None]], 1)
    col_on = torch.cat([ref_valid, (ms > 0)[:, None]], 1)
    couplings = couplings.masked_fill(~(row_on[:, :, None] & col_on[:, None, :]), -math.inf)
    norm = -torch.log((ms + ns).clamp_min(1.0))
    log_mu = torch.cat([norm[:, None].expand(b, m), (torch.log(ns) + norm)[:, None]], 1).masked_fill(~row_on, -math.inf)
    log_nu = torch.cat([norm[:, None].expand(b, n), (torch.log(ms) + norm)[:, None]], 1).masked_fill(~col_on, -math.inf)
    u, v, zero = torch.zeros(b, m + 1), torch.zeros(b, n + 1), torch.zeros(())
    for _ in range(iterations):
        u = torch.where(row_on, log_mu - torch.logsumexp(couplings + v[:, None, :], dim=2), zero)
        v = torch.where(col_on, log_nu - torch.logsumexp(couplings + u[:, :, None], dim=1), zero)
    return couplings + u[:, :, None] + v[:, None, :] - norm[:, None, None]


def test_sinkhorn_without_wheres_equals_the_loop_with_them_bit_for_bit():
    g = torch.Generator().manual_seed(5)
    scores = 3 * torch.randn(12, 6, 7, generator=g)
    query_valid = torch.rand(12, 6, generator=g) > 0.3
    ref_valid = torch.rand(12, 7, generator=g) > 0.3
    query_valid[0], ref_valid[1] = False, False  # an empty side
    query_valid[2], ref_valid[2] = False, False  # both empty
    for iterations in (1, 7, 100):
        got = log_optimal_transport(scores, 0.4, iterations, query_valid, ref_valid)
        want = _sinkhorn_with_wheres(scores, 0.4, iterations, query_valid, ref_valid)
        assert torch.equal(got.isinf(), want.isinf()) and not got.isnan().any()
        assert torch.equal(got[got.isfinite()], want[want.isfinite()])


def test_empty_sides_do_not_nan():
    s = torch.randn(3, 2, 4)
    qv = torch.tensor([[False, False], [True, True], [False, False]])
    rv = torch.tensor([[True] * 4, [False] * 4, [False] * 4])
    la = log_optimal_transport(s, 1.0, 20, qv, rv)
    assert not torch.isnan(la).any()
    p = la.exp()
    # m = 0: each valid reference goes to the dustbin row with mass 1; n = 0: each query to its dustbin
    torch.testing.assert_close(p[0, 2, :4], torch.ones(4))
    torch.testing.assert_close(p[1, :2, 4], torch.ones(2))
    assert p[2].sum() == 0
    res = match_objects(torch.randn(3, 2, 8), torch.randn(3, 4, 8), qv, rv)
    for t in (res.matches, res.closest):
        assert (t == -1).all()
    assert (res.ref_matches == -1).all() and (res.match_prob == 0).all()


def test_zero_sized_dimensions():
    res = match_objects(torch.randn(2, 0, 8), torch.randn(2, 3, 8))
    assert res.matches.shape == (2, 0) and res.ref_matches.shape == (2, 3)
    assert (res.ref_matches == -1).all()
    res = match_objects(torch.randn(2, 3, 8), torch.randn(2, 0, 8))
    assert (res.matches == -1).all() and (res.closest == -1).all()
    assert not torch.isnan(res.log_assignment).any()


def _permutation_problem():
    g = torch.Generator().manual_seed(0)
    refs = torch.linalg.qr(torch.randn(8, 8, generator=g))[0][:4]  # 4 orthonormal references
    perm = torch.tensor([2, 0, 3, 1])
    out = torch.randn(8, generator=g)
    out = out - refs.T @ (refs @ out)  # orthogonal to every reference: an extra object
    noise = 0.05 * torch.randn(4, 8, generator=g)
    query = torch.cat([refs[perm] + noise, (out / out.norm())[None]], 0)
    return query, refs, perm


def test_recovers_permutation_and_outlier_goes_to_dustbin():
    query, refs, perm = _permutation_problem()
    res = match_objects(query[None], refs[None], dustbin=5.0, score_scale=10.0)
    assert isinstance(res, MatchResult)
    assert res.matches[0].tolist() == perm.tolist() + [-1]
    assert (res.match_prob[0, :4] > 0.5).all() and res.match_prob[0, 4] == 0
    # the outlier's mass sits in the dustbin column
    assert res.log_assignment[0, 4, 4].exp() > 0.9
    # closest reference is still reported for every valid query (paper 3.5.2)
    assert res.closest[0, :4].tolist() == perm.tolist()
    assert 0 <= res.closest[0, 4] < 4
    # reference side is the inverse permutation
    assert res.ref_matches[0].tolist() == torch.argsort(perm).tolist()


def test_literal_defaults_and_zero_dustbin():
    query, refs, perm = _permutation_problem()
    # dustbin 0 at scale 1: the permutation is still recovered
    res = match_objects(query[None], refs[None], dustbin=0.0)
    assert res.matches[0, :4].tolist() == perm.tolist()
    # paper-literal defaults (z = 1 on cosine scores): the dustbin wins, nothing passes 0.2
    res = match_objects(query[None], refs[None])
    assert (res.matches == -1).all()
    assert res.closest[0, :4].tolist() == perm.tolist()


def test_match_objects_padded_equals_unpadded():
    query, refs, perm = _permutation_problem()
    qpad = torch.cat([query, 7 * torch.ones(2, 8)], 0)[None]
    rpad = torch.cat([refs[:3], torch.randn(3, 8), refs[3:]], 0)[None]  # padding in the middle
    qv = torch.tensor([[True] * 5 + [False] * 2])
    rv = torch.tensor([[True] * 3 + [False] * 3 + [True]])
    res = match_objects(qpad, rpad, qv, rv, dustbin=5.0, score_scale=10.0)
    col = torch.tensor([0, 1, 2, 6])  # unpadded ref index -> padded ref index
    assert res.matches[0, :5].tolist() == col[perm].tolist() + [-1]
    assert res.matches[0, 5:].tolist() == [-1, -1] and res.closest[0, 5:].tolist() == [-1, -1]
    assert res.ref_matches[0, 3:6].tolist() == [-1, -1, -1]
    ref = match_objects(query[None], refs[None], dustbin=5.0, score_scale=10.0)
    torch.testing.assert_close(res.match_prob[0, :5], ref.match_prob[0])


def test_dustbin_shape_error():
    with pytest.raises(ValueError):
        log_optimal_transport(torch.zeros(2, 2, 2), torch.zeros(3), 5)


def test_norm_constant():
    # 1 x 1 problem with score s and dustbin z: check against the closed form of the 2x2 transport
    la = log_optimal_transport(torch.tensor([[[0.0]]], dtype=torch.float64), 0.0, 200)
    # all scores equal: uniform coupling satisfying row sums (1, 1) and col sums (1, 1) -> 0.5 each
    torch.testing.assert_close(la.exp(), torch.full((1, 2, 2), 0.5, dtype=torch.float64))
    assert math.isclose(float(la[0, 0, 0]), math.log(0.5), rel_tol=1e-9)
