"""Position-local patch nearest neighbours: exact small cases and the brute-force equivalent."""

import itertools

import torch

from linewatch.detector.patch_knn import PatchIndex, local_patch_features, nearest_patch_distances, nearest_patch_indices


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


def test_local_patch_features_are_the_3x3_average_pool_without_padding():
    x = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(6))
    want = torch.nn.functional.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    torch.testing.assert_close(local_patch_features(x), want, atol=1e-6, rtol=0)
    one_row = torch.tensor([[[[1.0, 2.0, 6.0]]]])  # 1 x 3: the cells that exist are in the row only
    assert local_patch_features(one_row).tolist() == [[[[1.5, 3.0, 4.0]]]]


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


def test_nearest_patch_indices_name_the_image_and_offset_of_the_nearest():
    # bank image 0 is [0, 10, 20], image 1 is [5, 5, 5], image 2 is [100, 100, 100]; query [1, 19, 13], window 1
    bank = torch.tensor([[[[0.0, 10.0, 20.0]]], [[[5.0, 5.0, 5.0]]], [[[100.0, 100.0, 100.0]]]])
    padded = torch.nn.functional.pad(bank, (1, 1, 1, 1), value=float("inf"))
    query = torch.tensor([[[[1.0, 19.0, 13.0]]]])
    slot, offset = nearest_patch_indices(query, padded, 1, torch.tensor([[2, 1, 0]]))
    # cell 0: image 0 at its own cell (dx 0); cell 1: image 0's cell 2 (dx +1); cell 2: image 0's cell 1 (dx -1)
    assert slot.tolist() == [[[2, 2, 2]]]  # image 0 is the third reference
    assert offset.tolist() == [[[4, 5, 3]]]  # (dy + 1) * 3 + dx + 1 with dy = 0
    # a tie (13 is 3 from 10 and from 16): the lowest candidate number, offset * R + reference, wins
    bank[1] = 16.0
    padded = torch.nn.functional.pad(bank, (1, 1, 1, 1), value=float("inf"))
    slot, offset = nearest_patch_indices(query[..., 2:], padded[..., 2:], 1, torch.tensor([[0, 1]]))
    assert (slot.item(), offset.item()) == (0, 3)  # image 0 at dx -1 (3 * 2 + 0) before image 1 at dx 0 (4 * 2 + 1)


def test_nearest_patch_indices_find_the_nearest_whatever_the_chunk(monkeypatch):
    import linewatch.detector.patch_knn as patch_knn

    g = torch.Generator().manual_seed(7)
    bank = torch.randn(9, 3, 5, 6, generator=g)
    query = torch.randn(2, 3, 5, 6, generator=g)
    references = torch.tensor([[0, 3, 5, 6, 8], [1, 2, 4, 7, 0]])
    padded = torch.nn.functional.pad(bank, (1, 1, 1, 1), value=float("inf"))
    exact = nearest_patch_distances(query, bank, 1, references)
    for chunk_bytes in (1, 2 * 3 * 7 * 8 * 4 * 2, 1 << 30):
        monkeypatch.setattr(patch_knn, "CHUNK_BYTES", chunk_bytes)
        slot, offset = nearest_patch_indices(query, padded, 1, references)
        image = references.gather(1, slot.flatten(1)).view(2, 5, 6)
        y = torch.arange(5)[None, :, None] + offset // 3 - 1
        x = torch.arange(6)[None, None, :] + offset % 3 - 1
        found = (query.permute(0, 2, 3, 1) - bank.permute(0, 2, 3, 1)[image, y, x]).norm(dim=-1)
        torch.testing.assert_close(found, exact, atol=1e-5, rtol=1e-3)  # the nearest, up to float32 ties


def brute_force_nearest(query, bank, references, window):
    """Exact nearest distance and the (image, y, x) of the nearest patch, by looping."""
    b, c, h, w = query.shape
    out = torch.full((b, h, w), float("inf"))
    for i, y, x in itertools.product(range(b), range(h), range(w)):
        for z, dy, dx in itertools.product(references[i].tolist(), range(-window, window + 1), range(-window, window + 1)):
            yy, xx = y + dy, x + dx
            if 0 <= yy < h and 0 <= xx < w:
                out[i, y, x] = min(out[i, y, x], float((query[i, :, y, x] - bank[z, :, yy, xx]).norm()))
    return out


def test_an_index_on_every_channel_is_the_exact_search():
    g = torch.Generator().manual_seed(3)
    bank = torch.randn(6, 5, 4, 5, generator=g)
    query = torch.randn(2, 5, 4, 5, generator=g)
    references = torch.tensor([[0, 2, 5], [4, 1, 3]])
    for dims in (0, 5, 9):  # 0 and anything above C: every channel, the exact search itself
        index = PatchIndex(bank, dims)
        assert index.dims == 5
        for window in (0, 1):
            assert torch.equal(index.distances(query, window, references), nearest_patch_distances(query, bank, window, references))
            assert torch.allclose(index.distances(query, window, references),
                                  brute_force_nearest(query, bank, references, window), atol=1e-5)


def test_fewer_axes_give_the_exact_distance_to_a_patch_in_the_window_never_less_than_the_nearest():
    g = torch.Generator().manual_seed(4)
    bank = torch.randn(6, 5, 4, 5, generator=g)
    query = torch.randn(2, 5, 4, 5, generator=g)
    references = torch.tensor([[0, 2, 5], [4, 1, 3]])
    exact = brute_force_nearest(query, bank, references, 1)
    got = PatchIndex(bank, 2).distances(query, 1, references)
    assert (got >= exact - 1e-5).all()
    assert (got > exact + 1e-3).any()  # two of five axes: on random data it misses some
    # each value is the distance to one patch of the references within the window
    for i, y, x in itertools.product(range(2), range(4), range(5)):
        candidates = [float((query[i, :, y, x] - bank[z, :, yy, xx]).norm())
                      for z in references[i].tolist() for yy in range(max(0, y - 1), min(4, y + 2))
                      for xx in range(max(0, x - 1), min(5, x + 2))]
        assert min(abs(c - float(got[i, y, x])) for c in candidates) < 1e-4


def test_patches_spread_along_few_axes_are_found_exactly_on_those_axes():
    """Bank and queries vary along 2 directions of 6 channels (plus a constant): 2 axes find the
    exact nearest patch; a query off those axes (a defect) keeps its full distance."""
    g = torch.Generator().manual_seed(5)
    directions = torch.randn(2, 6, generator=g)
    offset = torch.randn(6, generator=g)

    def patches(n):
        return (torch.einsum("nkhw,kc->nchw", torch.randn(n, 2, 3, 4, generator=g), directions)
                + offset[None, :, None, None])

    bank, query = patches(5), patches(2)
    defect = torch.zeros(6)
    defect[0] = 3.0
    query[1, :, 1, 2] += defect
    references = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]])
    got = PatchIndex(bank, 2).distances(query, 1, references)
    assert torch.allclose(got, brute_force_nearest(query, bank, references, 1), atol=1e-4)
