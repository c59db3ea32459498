"""Metrics against scikit-learn (AUROC) and hand-computed answers (sPRO / PRO)."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from linewatch.eval.metrics import area_under_curve, au_spro, image_auroc, rates_at_threshold, roc_curve_points, spro_curve


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_on_random_scores(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    labels[:2] = [0, 1]
    scores = rng.normal(size=200) + labels
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(100 + seed)
    labels = rng.integers(0, 2, 80)
    labels[:2] = [0, 1]
    scores = rng.integers(0, 4, 80).astype(float)  # many ties, across classes too
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auroc_hand_cases():
    assert image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert image_auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert image_auroc([0, 1], [0.5, 0.5]) == 0.5  # a tie counts one half
    # pairs (good, bad): (1,2) win, (1,2) win, (3,2) loss, (3,3) tie -> (1+1+0+0.5)/4
    assert image_auroc([0, 1, 0, 1], [1, 2, 3, 3]) == pytest.approx(0.625)


def test_roc_points_match_sklearn():
    labels = [0, 1, 1, 0, 1, 0, 0]
    scores = [0.1, 0.9, 0.5, 0.5, 0.3, 0.3, 0.0]
    fpr, tpr, thr = roc_curve_points(labels, scores)
    ref_fpr, ref_tpr, ref_thr = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    np.testing.assert_allclose(thr[1:], ref_thr[1:])
    assert thr[0] == np.inf


def test_auroc_needs_both_classes():
    with pytest.raises(ValueError, match="positive and one negative"):
        image_auroc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="labels but"):
        image_auroc([0, 1], [0.1])


def test_rates_at_threshold_fail_is_strictly_above():
    rates = rates_at_threshold([0, 0, 0, 0, 1, 1], [1, 2, 3, 5, 3, 6], threshold=3)
    assert rates["false_reject_rate"] == 0.25  # only 5 > 3
    assert rates["escape_rate"] == 0.5  # 3 is not > 3: passes


GOOD_20 = np.arange(20.0).reshape(4, 5)  # background values 0..19


def test_pro_single_region_by_hand():
    # region of 2 pixels scored 100 and 18.5; good background 0..19; max_fpr 0.1 (2 of 20 pixels)
    # t > 19: pro 1/2 at fpr 0; t in [18.5, 19): fpr 1/20, pro 1/2; t in [18, 18.5): fpr 1/20, pro 1;
    # t in [17, 18): fpr 2/20 -> area = 0.05 * 0.5 + 0.05 * 1 = 0.075, / 0.1 = 0.75
    amap = np.array([[100.0, 18.5]])
    region = np.ones((1, 2), bool)
    fprs, pros, thr = spro_curve([amap], [[region]], None, [GOOD_20], max_fpr=0.1)
    np.testing.assert_allclose(fprs, [0, 0, 0, 0.05, 0.05, 0.1, 0.15])
    np.testing.assert_allclose(pros, [0, 0, 0.5, 0.5, 1, 1, 1])
    np.testing.assert_allclose(thr, [np.inf, 100, 19, 18.5, 18, 17, 16])
    assert au_spro([amap], [[region]], None, [GOOD_20], max_fpr=0.1) == pytest.approx(0.75)
    f32 = [amap.astype(np.float32)], [GOOD_20.astype(np.float32)]
    assert au_spro(f32[0], [[region]], None, f32[1], max_fpr=0.1) == pytest.approx(0.75)


def test_spro_saturation_reaches_one_earlier():
    # saturation area 1 pixel: the first detected pixel already saturates -> sPRO 1 from fpr 0
    amap = np.array([[100.0, 18.5]])
    region = np.ones((1, 2), bool)
    assert au_spro([amap], [[region]], [[1.0]], [GOOD_20], max_fpr=0.1) == pytest.approx(1.0)
    # saturation 1.5 pixels: one pixel gives 1/1.5 = 2/3 up to fpr 0.05, then 1
    assert au_spro([amap], [[region]], [[1.5]], [GOOD_20], max_fpr=0.1) == pytest.approx((0.05 * 2 / 3 + 0.05) / 0.1)


def test_spro_mean_over_regions_and_defect_image_background_counts_in_fpr():
    # defect image 2x2: region A = (0,0) scored 10, region B = (1,1) scored 3, background 0, 0.
    # good image [[1, 2], [4, 5]]. Defect-free pixels: 0, 0, 1, 2, 4, 5 (6). max_fpr 0.5.
    # t >= 10: 0/0 | t in [5, 10): A found -> 0.5, fpr 0 | [4, 5): fpr 1/6 | [3, 4): fpr 2/6 |
    # [2, 3): B found -> 1, fpr 2/6 | [1, 2): fpr 3/6 | [0, 1): fpr 4/6
    # area to 0.5 = 0.5 * 2/6 + 1 * (0.5 - 2/6) = 1/3 -> / 0.5 = 2/3
    defect = np.array([[10.0, 0.0], [0.0, 3.0]])
    a = np.zeros((2, 2), bool)
    a[0, 0] = True
    b = np.zeros((2, 2), bool)
    b[1, 1] = True
    good = np.array([[1.0, 2.0], [4.0, 5.0]])
    fprs, spros, _ = spro_curve([defect], [[a, b]], None, [good], max_fpr=0.5)
    np.testing.assert_allclose(fprs, [0, 0, 0, 1 / 6, 2 / 6, 2 / 6, 3 / 6, 4 / 6])
    np.testing.assert_allclose(spros, [0, 0, 0.5, 0.5, 0.5, 1, 1, 1])
    assert au_spro([defect], [[a, b]], None, [good], max_fpr=0.5) == pytest.approx(2 / 3)


def test_perfect_and_useless_maps():
    good = np.zeros((4, 4))
    region = np.zeros((4, 4), bool)
    region[1:3, 1:3] = True
    perfect = region.astype(float)
    assert au_spro([perfect], [[region]], None, [good]) == pytest.approx(1.0)
    # every pixel tied: the curve jumps from (0, 0) to (1, 1); joined linearly that is the
    # chance diagonal, whose normalised area up to 0.05 is 0.05 / 2
    flat = np.zeros((4, 4))
    assert au_spro([flat], [[region]], None, [good]) == pytest.approx(0.025)


def test_area_under_curve_interpolates_end_point():
    # y rises from 0 at 0.1 to 1 at 0.3; at 0.2 it is 0.5 -> area 0.1 * 0.25 = 0.025, / 0.2
    assert area_under_curve(np.array([0, 0.1, 0.3]), np.array([0, 0, 1.0]), 0.2) == pytest.approx(0.125)
    # a curve that stops before max_fpr continues flat
    assert area_under_curve(np.array([0, 0.1]), np.array([1.0, 1.0]), 0.2) == pytest.approx(1.0)


def test_spro_errors():
    region = np.ones((2, 2), bool)
    with pytest.raises(ValueError, match="mask"):
        au_spro([np.zeros((3, 3))], [[region]], None, [np.zeros((3, 3))])
    with pytest.raises(ValueError, match="empty"):
        au_spro([np.zeros((2, 2))], [[np.zeros((2, 2), bool)]], None, [np.zeros((2, 2))])
    with pytest.raises(ValueError, match="no ground-truth region"):
        au_spro([np.zeros((2, 2))], [[]], None, [np.zeros((2, 2))])
