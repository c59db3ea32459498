"""Position-local patch nearest neighbours: exact small cases and the brute-force equivalent."""

import itertools

import torch

from linewatch.detector.patch_knn import local_patch_features, nearest_patch_distances


def brute_force(query, memory, window):
    b, c, h, w = query.shape
    out = torch.full((b, h, w), float("inf"))
    for i, y, x in itertools.product(range(b), range(h), range(w)):
        for j, dy, dx in itertools.product(range(memory.shape[1]), range(-window, window + 1), range(-window, window + 1)):
            yy, xx = y + dy, x + dx
            if 0 <= yy < h and 0 <= xx < w:
                out[i, y, x] = min(out[i, y, x], float((query[i, :, y, x] - memory[i, j, :, yy, xx]).norm()))
    return out


def test_hand_computed_case():
    # one channel, 1x3 images: memory image 0 is [0, 10, 20], image 1 is [5, 5, 5]
    memory = torch.tensor([[[[0.0, 10.0, 20.0]]], [[[5.0, 5.0, 5.0]]]])[None]  # (B=1, R=2, C=1, 1, 3)
    query = torch.tensor([[[[1.0, 19.0, 13.0]]]])
    # window 0: same cell only -> min(|1-0|, |1-5|) = 1, min(|19-10|, |19-5|) = 9, min(|13-20|, |13-5|) = 7
    assert torch.allclose(nearest_patch_distances(query, memory, window=0), torch.tensor([[[1.0, 9.0, 7.0]]]))
    # window 1: neighbours count -> cell 1 sees 20 (1), cell 2 sees 10 (3)
    assert torch.allclose(nearest_patch_distances(query, memory, window=1), torch.tensor([[[1.0, 1.0, 3.0]]]))
    # only the fives
    got = nearest_patch_distances(query, memory[:, 1:], window=1)
    assert torch.allclose(got, torch.tensor([[[4.0, 14.0, 8.0]]]))


def test_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    query = torch.randn(3, 4, 5, 6, generator=g)
    memory = torch.randn(3, 2, 4, 5, 6, generator=g)  # each query its own two memory images
    for window in (0, 1, 2):
        got = nearest_patch_distances(query, memory, window)
        assert torch.allclose(got, brute_force(query, memory, window), atol=1e-4)


def test_a_patch_of_the_memory_has_distance_zero():
    g = torch.Generator().manual_seed(1)
    memory = torch.randn(3, 2, 4, 4, generator=g)
    assert nearest_patch_distances(memory, memory[:, None], 1).abs().max() < 1e-3
    assert nearest_patch_distances(memory, memory.roll(1, 0)[:, None], 1).min() > 1e-3


def test_local_patch_features_average_the_neighbourhood():
    x = torch.arange(9.0).view(1, 1, 3, 3)
    out = local_patch_features(x)
    assert out[0, 0, 1, 1] == 4.0  # the mean of 0..8
    assert out[0, 0, 0, 0] == (0 + 1 + 3 + 4) / 4  # corner: the 4 cells that exist


def test_a_bank_and_references_give_what_the_gathered_memory_gives_whatever_the_chunk(monkeypatch):
    """The memory as the bank's (Z, C, h, w) with each query's references (B, R) gathered a
    chunk at a time: bitwise the distances of the memory gathered whole, for any chunk size."""
    import linewatch.detector.patch_knn as patch_knn

    g = torch.Generator().manual_seed(2)
    bank = torch.randn(7, 4, 5, 6, generator=g)
    query = torch.randn(3, 4, 5, 6, generator=g)
    references = torch.tensor([[0, 3, 5, 6], [1, 1, 2, 4], [6, 5, 4, 3]])
    whole = nearest_patch_distances(query, bank[references], 1)
    for chunk_bytes in (1, 3 * 4 * 7 * 8 * 4 * 2, 1 << 30):  # one image, two images, all at a time
        monkeypatch.setattr(patch_knn, "CHUNK_BYTES", chunk_bytes)
        assert torch.equal(nearest_patch_distances(query, bank, 1, references), whole)
        assert torch.equal(nearest_patch_distances(query, bank[references], 1), whole)
