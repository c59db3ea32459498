"""The maps `linewatch eval` scores and writes (linewatch.eval.maps): each map's maximum is the
image score, equal values are ordered evenly over the image, different values keep their order."""

import numpy as np
import pytest

from linewatch.eval.maps import BAYER_LEVELS, bayer_matrix, break_ties, lift_peaks, official_maps
from linewatch.eval.metrics import au_spro


def _order_kept(before: list[np.ndarray], after: list[np.ndarray]) -> bool:
    """Every value's pixels end up above every pixel of each lower value (over all maps)."""
    old = np.concatenate([m.ravel() for m in before])
    new = np.concatenate([m.ravel() for m in after])
    values, group = np.unique(old, return_inverse=True)
    lowest = np.full(values.size, np.inf)
    highest = np.full(values.size, -np.inf)
    np.minimum.at(lowest, group, new)
    np.maximum.at(highest, group, new)
    return bool(np.all(lowest[1:] > highest[:-1]))


def test_bayer_matrix_holds_each_level_once_and_spreads_them():
    m = bayer_matrix(3)
    assert m.shape == (8, 8) and sorted(m.ravel().tolist()) == list(range(64))
    # every 2x2 block holds one index of each quarter of the range
    for y in range(0, 8, 2):
        for x in range(0, 8, 2):
            assert sorted((m[y:y + 2, x:x + 2] // 16).ravel().tolist()) == [0, 1, 2, 3]
    assert bayer_matrix().shape == (64, 64) and BAYER_LEVELS == 4096


def test_lift_peaks_puts_the_score_at_the_maps_maximum():
    maps = [np.array([[0.0, 1.0], [3.0, 2.0]], np.float32), np.array([[5.0, 4.0], [0.0, 0.0]], np.float32)]
    lifted, scores, peaks = lift_peaks(maps, [7.5, 5.0])
    assert peaks == [2, 0]
    assert lifted[0].tolist() == [[0.0, 1.0], [7.5, 2.0]] and lifted[1].tolist() == maps[1].tolist()
    assert scores.tolist() == [7.5, 5.0]
    assert maps[0][1, 0] == 3.0  # the input is not changed
    # a map above its score (a rounding in a resize) keeps its maximum, which becomes the score
    _, scores, _ = lift_peaks([np.array([[1.0, 2.0]], np.float32)], [1.9999])
    assert scores.tolist() == [2.0]
    with pytest.raises(ValueError, match="finite"):
        lift_peaks([np.array([[np.nan]], np.float32)], [1.0])
    with pytest.raises(ValueError, match="2 maps but 1 scores"):
        lift_peaks(maps, [1.0])


def test_break_ties_orders_a_plateau_and_keeps_every_other_order():
    rng = np.random.default_rng(0)
    maps = [np.maximum(rng.normal(size=(90, 130)), 0).astype(np.float32) for _ in range(4)]  # half exactly 0
    maps[1][10:50, 20:60] = 0.75  # a plateau at another value
    maps[2][0, 0] = -0.0
    lifted, scores, peaks = lift_peaks(maps, [float(m.max()) + 1 for m in maps])
    out = break_ties(lifted, keep=peaks)
    assert all(o.dtype == np.float32 and o.shape == m.shape for o, m in zip(out, maps))
    assert _order_kept(lifted, out)
    assert [float(o.max()) for o in out] == scores.tolist()  # the peaks did not move
    was_zero = np.concatenate([m.ravel() == 0 for m in lifted])
    _, counts = np.unique(np.concatenate([o.ravel() for o in out])[was_zero], return_counts=True)
    # the zeros (half of 46,800 pixels): 4096 parts, not one mass; a part holds the pixels of one
    # level of the 64x64 tile, which covers a 90x130 map 2x3 times
    assert counts.size > 4000 and counts.max() <= 4 * 2 * 3 and was_zero.sum() > 20000
    assert np.unique(out[1][10:50, 20:60]).size > 50  # the 0.75 plateau too, as far as the values below allow
    # the moves are float32 steps: tiny, never past the next lower value
    assert max(float(np.abs(o - m).max()) for o, m in zip(out, lifted)) < 1e-3
    assert break_ties([]) == []


def test_a_threshold_inside_a_plateau_takes_the_same_share_everywhere():
    plateau = np.zeros((128, 128), np.float32)
    [out] = break_ties([plateau])
    region = np.zeros_like(plateau, dtype=bool)
    region[37:81, 50:101] = True  # not aligned with the 64x64 tile
    for q in (0.1, 0.25, 0.5, 0.9):
        t = np.quantile(out, q)
        below = out <= t
        assert below[region].mean() == pytest.approx(below.mean(), abs=0.01)


def test_official_maps_leave_the_metrics_as_they_were():
    # object-branch-like maps: positive blobs on exact zeros; the defect regions on the blobs
    rng = np.random.default_rng(1)
    size = 64
    yy, xx = np.mgrid[:size, :size]

    def blob(cy, cx, height):
        return height * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 30.0) * ((yy - cy) ** 2 + (xx - cx) ** 2 < 100)

    good = [blob(*rng.integers(12, 52, 2), 1.0).astype(np.float32) for _ in range(6)]
    bad, regions = [], []
    for _ in range(6):
        cy, cx = rng.integers(12, 52, 2)
        bad.append((blob(cy, cx, 3.0) + blob(*rng.integers(12, 52, 2), 1.0)).astype(np.float32))
        regions.append([((yy - cy) ** 2 + (xx - cx) ** 2) < 40])
    maps = good + bad
    scores = [float(m.max()) for m in maps]
    new, new_scores = official_maps(maps, scores)
    assert new_scores.tolist() == [float(np.float32(s)) for s in scores]
    for max_fpr in (0.05, 0.3):
        before = au_spro(bad, regions, None, good, max_fpr=max_fpr)
        after = au_spro(new[6:], regions, None, new[:6], max_fpr=max_fpr)
        assert after == pytest.approx(before, abs=1e-3), max_fpr
