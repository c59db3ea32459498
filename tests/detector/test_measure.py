import math

import pytest
import torch

from linewatch.detector.measure import combine_object_maps, mahalanobis, mahalanobis_direct


@pytest.mark.parametrize("k", [1, 2, 3])
def test_woodbury_equals_direct_inverse(k):
    g = torch.Generator().manual_seed(k)
    c, p = 5, 7
    refs = torch.randn(2, k, c, p, generator=g, dtype=torch.float64)
    query = torch.randn(2, c, p, generator=g, dtype=torch.float64)
    for eps in (1e-2, 1.0):
        got = mahalanobis(query, refs, eps)
        assert got.shape == (2, p)
        torch.testing.assert_close(got, mahalanobis_direct(query, refs, eps), atol=1e-5, rtol=1e-5)
    # float32 inputs also agree with the float64 direct inverse
    got32 = mahalanobis(query.float(), refs.float(), 0.1)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), mahalanobis_direct(query, refs, 0.1), atol=1e-4, rtol=1e-5)


def test_hand_computed_k2():
    # refs (0,0) and (2,0): mean (1,0), cov diag(2, 0) + eps (eq. 11, /(k-1) = /1)
    refs = torch.tensor([[[0.0], [0.0]], [[2.0], [0.0]]], dtype=torch.float64)  # (K=2, C=2, P=1)
    eps = 0.5
    q_off = torch.tensor([[1.0], [1.0]], dtype=torch.float64)  # d = (0, 1)
    q_on = torch.tensor([[3.0], [0.0]], dtype=torch.float64)  # d = (2, 0)
    assert math.isclose(float(mahalanobis(q_off, refs, eps)), math.sqrt(1 / eps), rel_tol=1e-12)
    assert math.isclose(float(mahalanobis(q_on, refs, eps)), math.sqrt(4 / (2 + eps)), rel_tol=1e-12)


def test_k1_is_scaled_euclidean():
    g = torch.Generator().manual_seed(0)
    refs = torch.randn(3, 1, 4, 6, generator=g)
    query = torch.randn(3, 4, 6, generator=g)
    want = (query - refs[:, 0]).norm(dim=1) / math.sqrt(0.25)
    torch.testing.assert_close(mahalanobis(query, refs, 0.25), want)
    assert mahalanobis(refs[:, 0], refs, 0.25).abs().max() == 0


@pytest.mark.parametrize("k", [2, 3, 5])
def test_float32_stability_large_c(k):
    # C = 384 like ViT-S; queries close to the reference span is the cancellation-prone case.
    g = torch.Generator().manual_seed(10 + k)
    c, p, eps = 384, 6, 1e-3
    refs = 5 * torch.randn(k, c, p, generator=g, dtype=torch.float64)
    w = torch.rand(k, 1, p, generator=g, dtype=torch.float64)
    query = (w * refs).sum(0) / w.sum(0) + 1e-3 * torch.randn(c, p, generator=g, dtype=torch.float64)
    want = mahalanobis_direct(query, refs, eps)
    got = mahalanobis(query.float(), refs.float(), eps)
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-4)
    # a query exactly on a reference (d inside the span of the references)
    got_ref = mahalanobis(refs[0].float(), refs.float(), eps)
    assert torch.isfinite(got_ref).all()
    torch.testing.assert_close(got_ref.double(), mahalanobis_direct(refs[0], refs, eps), rtol=1e-3, atol=1e-4)


def test_large_p_runs_float32():
    g = torch.Generator().manual_seed(0)
    refs = torch.randn(1, 3, 384, 4096, generator=g)
    out = mahalanobis(refs[:, 0] + 0.1, refs, 0.01)
    assert out.shape == (1, 4096) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_combine_object_maps():
    maps = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    maps[1, 2] = float("nan")  # padding rows may hold garbage
    valid = torch.tensor([[True, False, True], [True, True, False]])
    matched = torch.tensor([[True, False, False], [False, True, False]])
    final = combine_object_maps(maps, valid)
    torch.testing.assert_close(final[0], maps[0, 0] + maps[0, 2])
    torch.testing.assert_close(final[1], maps[1, 0] + maps[1, 1])
    m13 = combine_object_maps(maps, valid & matched)  # eq. 13
    m14 = combine_object_maps(maps, valid & ~matched)  # eq. 14
    torch.testing.assert_close(m13 + m14, final)  # eq. 15
    assert combine_object_maps(maps[:, :0], valid[:, :0]).shape == (2, 2, 2)


# ---------------------------------------------------------------------------- the small solve


@pytest.mark.parametrize("k", [2, 3, 4, 6])  # (k-1) x (k-1) systems: a division, the 2 x 2 closed form, LU
def test_solve_small_equals_linalg_solve(k):
    from linewatch.detector.measure import solve_small

    g = torch.Generator().manual_seed(k)
    n, p = k - 1, 9
    v = torch.randn(2, n, 5, p, generator=g, dtype=torch.float64)  # (..., n, C, P)
    gram = torch.einsum("bicp,bjcp->bijp", v, v)  # (..., n, n, P), positive semi-definite
    rhs = torch.randn(2, n, p, generator=g, dtype=torch.float64)
    for eps in (1e-3, 1.0):
        system = gram.movedim(-1, 1) + eps * torch.eye(n, dtype=torch.float64)  # (2, P, n, n)
        want = torch.linalg.solve(system, rhs.movedim(-1, 1).unsqueeze(-1)).squeeze(-1).movedim(1, -1)
        got = solve_small(gram, rhs, eps)
        assert got.shape == (2, n, p)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_solve_small_hand_computed_2x2():
    from linewatch.detector.measure import solve_small

    # (G + I) a = r with G = [[3, 1], [1, 2]]: [[4, 1], [1, 3]] a = [5, 4] -> det 11, a = [(15 - 4), (16 - 5)] / 11
    gram = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)[..., None]
    rhs = torch.tensor([5.0, 4.0], dtype=torch.float64)[..., None]
    assert solve_small(gram, rhs, 1.0)[:, 0].tolist() == pytest.approx([1.0, 1.0], rel=1e-15)
    # 1 x 1: a division
    assert float(solve_small(torch.full((1, 1, 1), 3.0), torch.full((1, 1), 8.0), 1.0)) == 2.0


@pytest.mark.parametrize("k", [3, 4])
def test_nearly_collinear_references_keep_float64_accuracy(k):
    """References almost on one line in feature space (a smooth gradient across k images): the
    small system is ill-conditioned; its float64 solve keeps float32 inputs accurate (a float32
    2 x 2 closed form was off by ~30% here)."""
    g = torch.Generator().manual_seed(1)
    c, p, eps = 384, 64, 1e-2
    base = 5 * torch.randn(c, p, generator=g, dtype=torch.float64)
    step = 5 * torch.randn(c, p, generator=g, dtype=torch.float64)
    refs = torch.stack([base + i * step + 1e-3 * torch.randn(c, p, generator=g, dtype=torch.float64) for i in range(k)])
    query = base + 0.7 * step + 0.05 * torch.randn(c, p, generator=g, dtype=torch.float64)
    got = mahalanobis(query.float(), refs.float(), eps)
    torch.testing.assert_close(got.double(), mahalanobis_direct(query, refs, eps), rtol=1e-3, atol=1e-4)
