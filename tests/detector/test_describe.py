import pytest
import torch
import torch.nn.functional as F

from linewatch.detector import describe
from linewatch.detector.describe import (DCGA, masked_global_max_pool, object_feature_maps, pad_masks, padded_soft_masks,
                                         resize_masks)
from linewatch.detector.segment import ObjectMasks


def test_object_feature_maps_same_size_is_product():
    f = torch.randn(2, 3, 4, 5)
    m = torch.zeros(2, 2, 4, 5, dtype=torch.bool)
    m[0, 0, 1:3, 1:4] = True
    m[1, 1] = True
    out = object_feature_maps(f, m)
    assert out.shape == (2, 2, 3, 4, 5)
    torch.testing.assert_close(out, f[:, None] * m[:, :, None].float())


def test_masks_resized_bilinearly():
    f = torch.ones(1, 2, 8, 8)
    m = torch.zeros(1, 1, 4, 4)
    m[0, 0, :, :2] = 1.0  # left half
    out = object_feature_maps(f, m)
    want = F.interpolate(m, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out[:, :, 0], want)
    torch.testing.assert_close(out[:, :, 1], want)
    assert resize_masks(m, (4, 4)) is m


def test_gmp_matches_materialised_and_semantics():
    g = torch.Generator().manual_seed(0)
    f = -torch.rand(2, 6, 8, 8, generator=g) - 0.1  # strictly negative features
    m = torch.rand(2, 3, 16, 16, generator=g) > 0.7
    m[0, 1] = False  # empty mask
    m[1, 2] = True  # full mask
    got = masked_global_max_pool(f, m)
    assert got.shape == (2, 3, 6)
    want = object_feature_maps(f, m).flatten(3).amax(3)
    torch.testing.assert_close(got, want)
    assert (got[0, 1] == 0).all()  # empty mask -> zeros
    # a partial mask over negative features pools to 0 (positions outside the mask are 0)
    assert (got[0, 0] == 0).all()
    # a full mask is the plain global max, negatives included
    torch.testing.assert_close(got[1, 2], f[1].flatten(1).amax(1))


def test_gmp_hand_example():
    f = torch.tensor([[[[1.0, 5.0], [-2.0, 3.0]]]])  # (1, 1, 2, 2)
    m = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]], [[0.0, 0.5], [0.0, 0.0]]]])  # (1, 2, 2, 2)
    torch.testing.assert_close(masked_global_max_pool(f, m), torch.tensor([[[3.0], [2.5]]]))


def test_adjacency_hand_example():
    d = DCGA(kernel_size=3, context_weight=0.5)
    x = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]]])
    a2 = d.adjacency(x)
    # cos(0,1) = 1/sqrt2 > 0; every other pair is <= 0 and clamped; rows 2 and 3 have no neighbour
    want = torch.tensor([[[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0] * 4, [0.0] * 4]])
    torch.testing.assert_close(a2, want)


def test_adjacency_zero_diagonal_and_row_normalised():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 5, 16, generator=g)  # non-negative, like GMP outputs
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[1, 3:] = False
    a2 = DCGA(kernel_size=3, context_weight=0.5).adjacency(x, valid)
    assert a2.shape == (3, 5, 5)
    assert (torch.diagonal(a2, dim1=1, dim2=2) == 0).all()
    assert (a2 >= 0).all()
    sums = a2.sum(-1)
    torch.testing.assert_close(sums[valid], torch.ones(int(valid.sum())))
    assert (a2[1, 3:] == 0).all() and (a2[1, :, 3:] == 0).all()
    # eq. 7 by hand for row 0 of item 0
    v = F.normalize(x[0], dim=-1)
    s = v @ v.T
    s.fill_diagonal_(0)
    torch.testing.assert_close(a2[0, 0], s[0] / s[0].sum())


def test_dcga_shapes_norms_and_padding():
    g = torch.Generator().manual_seed(2)
    b, m, c = 2, 4, 32
    pooled = torch.rand(b, m, c, generator=g)
    valid = torch.tensor([[True, True, True, False], [True, False, False, False]])
    d = DCGA(kernel_size=5, context_weight=0.5)
    assert torch.allclose(d.weight, torch.full((1, 1, 5), 0.2))
    out, a2 = d(pooled, valid, return_adjacency=True)
    assert out.shape == (b, m, c) and a2.shape == (b, m, m)
    torch.testing.assert_close(out.norm(dim=-1)[valid], torch.ones(int(valid.sum())))
    assert (out[~valid] == 0).all()
    # padding rows hold garbage: valid rows must not change
    garbage = pooled.clone()
    garbage[~valid] = 1e3 * torch.randn(int((~valid).sum()), c, generator=g)
    torch.testing.assert_close(d(garbage, valid), out)
    # and the valid rows equal the unpadded problem
    torch.testing.assert_close(d(pooled[:1, :3])[0], out[0, :3])
    torch.testing.assert_close(d(pooled[1:, :1])[0], out[1, :1])


def test_dcga_permutation_equivariant():
    g = torch.Generator().manual_seed(3)
    pooled = torch.rand(1, 6, 24, generator=g)
    d = DCGA(kernel_size=3, context_weight=0.5)
    perm = torch.randperm(6, generator=g)
    out, a2 = d(pooled, return_adjacency=True)
    outp, a2p = d(pooled[:, perm], return_adjacency=True)
    torch.testing.assert_close(outp, out[:, perm])
    torch.testing.assert_close(a2p, a2[:, perm][:, :, perm])


def test_channel_attention_is_a_distribution():
    g = torch.Generator().manual_seed(4)
    pooled = torch.randn(2, 3, 10, generator=g)
    a = DCGA(kernel_size=3, context_weight=0.5).channel_attention(pooled)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 3))
    # a constant vector gives uniform attention (replicate padding: no edge bias)
    a = DCGA(kernel_size=3, context_weight=0.5).channel_attention(torch.full((1, 1, 10), 2.0))
    torch.testing.assert_close(a, torch.full((1, 1, 10), 0.1))


def test_dcga_keeps_identity_with_two_objects():
    # eq. 8 taken literally would swap two objects' descriptors; the residual form must not
    x = torch.tensor([[[1.0, 0.2, 0.0, 0.0], [0.0, 0.3, 1.0, 0.0]]])
    out = DCGA(kernel_size=3, context_weight=0.5)(x)
    sims = out[0] @ F.normalize(x[0], dim=-1).T
    assert sims[0, 0] > sims[0, 1] and sims[1, 1] > sims[1, 0]


def test_dcga_empty_and_float64():
    d = DCGA(kernel_size=3, context_weight=0.5)
    assert d(torch.zeros(2, 0, 8)).shape == (2, 0, 8)
    out = d(torch.rand(1, 3, 8, dtype=torch.float64))
    assert out.dtype == torch.float64
    out = d(torch.zeros(1, 2, 8))  # all-zero pooled vectors (empty masks) stay finite
    assert torch.isfinite(out).all()


def test_padded_soft_masks_equal_pad_masks_of_the_same_objects() -> None:
    g = torch.Generator().manual_seed(0)
    lists = [torch.rand(n, 20, 20, generator=g) > 0.7 for n in (3, 0, 1)]
    objects = ObjectMasks.from_list(lists, (20, 20))
    wide = ObjectMasks(torch.cat([objects.masks, torch.zeros(3, 2, 20, 20, dtype=torch.bool)], dim=1),
                       torch.cat([objects.valid, torch.zeros(3, 2, dtype=torch.bool)], dim=1))  # more padding
    soft, valid, boxes = pad_masks(lists, (8, 8), torch.device("cpu"))
    for padded in (objects, wide):
        p_soft, p_valid, p_boxes = padded_soft_masks(padded.masks, padded.valid, (8, 8))
        assert torch.equal(p_soft[:, :3], soft) and torch.equal(p_valid[:, :3], valid)
        assert torch.equal(p_boxes[:, :3], boxes)
        assert not p_valid[:, 3:].any() and not p_soft[:, 3:].any() and not p_boxes[:, 3:].any()
    assert [m.shape[0] for m in objects.per_image()] == [3, 0, 1]


def per_object_max_pool(features, masks):
    """The loop masked_global_max_pool replaced: one (B, C, H, W) product per object."""
    m = resize_masks(masks, tuple(features.shape[-2:])).to(features.dtype)
    out = features.new_zeros(features.shape[0], m.shape[1], features.shape[1])
    for i in range(m.shape[1]):
        out[:, i] = (features * m[:, i, None]).flatten(2).amax(dim=2)
    return out


@pytest.mark.parametrize("budget", [1, 2 * 6 * 8 * 8, 10**9])  # one object per group, two per group, all at once
def test_gmp_in_groups_equals_one_object_at_a_time(monkeypatch, budget):
    g = torch.Generator().manual_seed(4)
    f = torch.randn(2, 6, 8, 8, generator=g)
    m = torch.rand(2, 5, 16, 16, generator=g)  # soft masks, resized to 8 x 8
    m[1, 3] = 0.0
    monkeypatch.setattr(describe, "POOL_ELEMENTS", budget)
    got = masked_global_max_pool(f, m)
    assert torch.equal(got, per_object_max_pool(f, m))  # the same products and maxima, bit for bit
    assert masked_global_max_pool(f, m[:, :0]).shape == (2, 0, 6)
