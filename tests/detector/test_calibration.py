"""linewatch.detector.calibration: the threshold for a false-reject target, the rate to expect
there with its confidence interval, and the number of good images a target needs.

The statistical tests draw scores from known distributions and judge each calibration by the
distribution's TRUE exceedance probability at the returned threshold (scipy's sf), over many
seeded repetitions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from linewatch.detector.calibration import (
    FAMILIES, MIN_EXPECTED_EXCEEDANCES, Calibration, calibrate, choose_method, fit_gpd, rejects_interval,
    required_good_images,
)

# ---------------------------------------------------------------------------- required count


@pytest.mark.parametrize("target, needed", [(0.005, 1000), (0.02, 250), (0.01, 500), (0.1, 50), (0.03, 167),
                                            (0.3, 17), (0.001, 5000)])
def test_required_good_images(target, needed):
    assert MIN_EXPECTED_EXCEEDANCES == 5
    assert required_good_images(target) == needed


def test_required_good_images_other_count_and_bad_target():
    assert required_good_images(0.01, min_expected_exceedances=10) == 1000
    assert required_good_images(0.03, min_expected_exceedances=3) == 100  # 3 / 0.03 is 100.00000000000001
    for bad in (0.0, 1.0, -0.1, 2.0):
        with pytest.raises(ValueError, match="target false-reject rate"):
            required_good_images(bad)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("scores, message", [
    ([], "0 good-image score"),
    ([1.0, 2.0], "2 good-image score"),
    ([1.0, np.nan, 2.0, 3.0], "1 of 4 good-image scores are NaN or infinite"),
    ([1.0, 2.0, np.inf, 3.0, -np.inf], "2 of 5 good-image scores are NaN or infinite"),
    ([0.25] * 20, "all 20 good-image scores are equal"),
])
def test_degenerate_scores_are_refused(scores, message):
    with pytest.raises(ValueError, match=message):
        calibrate(scores, 0.01)


def test_bad_target_or_confidence():
    scores = np.arange(10.0)
    with pytest.raises(ValueError, match="target"):
        calibrate(scores, 0.0)
    with pytest.raises(ValueError, match="confidence"):
        calibrate(scores, 0.01, confidence=1.0)


# ---------------------------------------------------------------------------- fits


def test_gpd_fit_recovers_a_known_tail():
    y = stats.genpareto.rvs(0.25, scale=2.0, size=20000, random_state=np.random.default_rng(0))
    fitted = fit_gpd(y)
    shape, scale = float(fitted.args[0][0]), float(fitted.kwds["scale"][0])
    assert shape == pytest.approx(0.25, abs=0.03) and scale == pytest.approx(2.0, rel=0.04)
    mle_shape, _, mle_scale = stats.genpareto.fit(y, floc=0)  # maximum likelihood agrees on a big sample
    assert shape == pytest.approx(mle_shape, abs=0.02) and scale == pytest.approx(mle_scale, rel=0.03)
    # a bounded tail (negative shape) and an exponential one
    for true_shape in (-0.3, 0.0):
        y = stats.genpareto.rvs(true_shape, size=20000, random_state=np.random.default_rng(1))
        assert float(fit_gpd(y).args[0][0]) == pytest.approx(true_shape, abs=0.03)


def test_whole_sample_fits_are_maximum_likelihood():
    x = np.random.default_rng(2).gamma(2.0, 0.3, size=(3, 40))
    gamma = FAMILIES["gamma-fit"](x)
    for row, a, scale in zip(x, gamma.args[0], gamma.kwds["scale"]):
        ref_a, _, ref_scale = stats.gamma.fit(row, floc=0)
        assert a == pytest.approx(ref_a, rel=1e-6) and scale == pytest.approx(ref_scale, rel=1e-6)
    lognormal = FAMILIES["lognormal-fit"](x)
    ref_s, _, ref_scale = stats.lognorm.fit(x[0], floc=0)
    assert lognormal.args[0][0] == pytest.approx(ref_s, rel=1e-4)
    assert lognormal.kwds["scale"][0] == pytest.approx(ref_scale, rel=1e-4)


def test_method_choice():
    rng = np.random.default_rng(3)
    assert choose_method(rng.normal(size=199), 0.005) == "normal-fit"  # 19 top scores: too few for a tail
    assert choose_method(rng.normal(size=200), 0.005) == "gpd-tail"  # 20
    assert choose_method(rng.normal(size=200), 0.1) == "empirical"  # the target is not in the top 10 %
    assert choose_method(rng.gamma(2.0, size=1000), 0.3) == "empirical"
    assert choose_method(np.r_[np.arange(900.0), np.full(100, 950.0)], 0.005) == "empirical"  # a flat top
    # whole-sample families: negative scores rule out lognormal and gamma
    assert choose_method(rng.normal(0.0, 1.0, size=150), 0.01) == "normal-fit"
    assert choose_method(rng.lognormal(0.0, 0.8, size=150), 0.01) == "lognormal-fit"
    assert choose_method(rng.gamma(1.5, size=150), 0.01) == "gamma-fit"


def test_empirical_threshold_is_the_quantile():
    scores = np.random.default_rng(4).permutation(np.arange(1.0, 1001.0))
    cal = calibrate(scores, 0.2)
    assert cal.method == "empirical"
    assert cal.threshold == 800.0  # 200 of 1000 above it
    assert cal.observed_false_reject_rate == 0.2
    assert cal.ci_low < 0.2 < cal.ci_high and cal.expected_false_reject_rate == pytest.approx(0.2, abs=0.01)


def test_a_large_sample_finds_the_true_quantile():
    dist = stats.lomax(4.0)  # Pareto tail
    cal = calibrate(dist.rvs(size=20000, random_state=np.random.default_rng(5)), 0.005)
    assert cal.method == "gpd-tail" and cal.enough and cal.warning is None
    assert 0.8 * 0.005 < dist.sf(cal.threshold) < 1.25 * 0.005
    assert cal.ci_low < dist.sf(cal.threshold) < cal.ci_high
    assert cal.ci_high / cal.ci_low < 1.6  # 20000 scores pin the rate down


# ---------------------------------------------------------------------------- record


def test_record_and_manifest():
    scores = np.array([0.3, 0.1, 0.9, 0.5, 0.7, 0.2, 0.4, 0.8, 0.6, 1.0])
    cal = calibrate(scores, 0.005)
    assert isinstance(cal, Calibration)
    assert cal.n == 10 and cal.n_required == 1000 and not cal.enough
    assert cal.threshold > 1.0  # a fitted tail goes beyond the largest of 10 scores
    assert cal.ci_low <= cal.expected_false_reject_rate <= cal.ci_high
    assert "10 good-image scores" in cal.warning and "0.50%" in cal.warning and "1000 good images" in cal.warning
    m = cal.to_manifest()
    assert json.loads(json.dumps(m)) == m
    assert m["threshold"] == cal.threshold and m["method"] == cal.method
    assert m["target_false_reject_rate"] == 0.005
    assert m["observed_false_reject_rate"] == 0.0
    assert m["n"] == 10 and m["n_required"] == 1000 and m["enough"] is False and m["warning"] == cal.warning
    assert m["expected_false_reject_rate"] == cal.expected_false_reject_rate
    assert (m["ci_low"], m["ci_high"], m["confidence"]) == (cal.ci_low, cal.ci_high, 0.95)
    assert m["max"] == 1.0 and m["mean"] == pytest.approx(0.55) and m["std"] == pytest.approx(np.std(scores))
    assert m["scores"] == pytest.approx(scores.tolist())  # in input order


def test_observed_rate_counts_the_scores_above():
    scores = np.random.default_rng(6).normal(size=500)
    cal = calibrate(scores, 0.05)
    assert cal.observed_false_reject_rate == np.mean(scores > cal.threshold)
    assert cal.to_manifest()["observed_false_reject_rate"] == cal.observed_false_reject_rate
    assert cal.enough and cal.warning is None  # 500 >= 5 / 0.05


def test_deterministic_and_confidence_widens():
    scores = np.random.default_rng(7).gamma(2.0, 0.3, size=300)
    a, b = calibrate(scores, 0.01), calibrate(scores.copy(), 0.01)
    assert a.to_manifest() == b.to_manifest()
    other_seed = calibrate(scores, 0.01, seed=1)
    assert other_seed.threshold == a.threshold and (other_seed.ci_low, other_seed.ci_high) != (a.ci_low, a.ci_high)
    narrow = calibrate(scores, 0.01, confidence=0.5)
    assert narrow.threshold == a.threshold
    assert a.ci_low <= narrow.ci_low < narrow.ci_high <= a.ci_high


def test_tail_interval_reaches_beyond_what_a_resample_of_the_scores_can_hold():
    """At a low target the threshold lies beyond almost every score, where a resample of the
    scores holds nothing heavier than the sample itself: the interval drew the resamples' tails
    from the fitted GPD instead. 270 scores (250 validation + 20 leave-one-out, as the
    calibration check), target 0.5 %, 100 seeded draws from each of three hand-made
    distributions: the true rate lay above the 95 % interval in 51 of 300 draws with resampled
    tails (gamma 13, lognormal 20, Pareto index 4 18), 27 of 300 with drawn ones (6, 13, 8)."""
    above = 0
    for name in ("gamma", "lognormal", "pareto-tail"):
        dist, rng = DISTRIBUTIONS[name], np.random.default_rng(270 + 500)
        for _ in range(100):
            cal = calibrate(dist.rvs(size=270, random_state=rng), 0.005)
            assert cal.method == "gpd-tail"
            above += float(dist.sf(cal.threshold)) > cal.ci_high
    assert above <= 35, above


def test_rejects_interval_adds_the_test_sets_binomial_noise_to_the_rate_interval():
    cal = calibrate(np.random.default_rng(3).gamma(2.0, 0.3, size=300), 0.02)
    low, high = rejects_interval(cal, 1000)
    assert low <= math.floor(cal.ci_low * 1000) and high >= math.ceil(cal.ci_high * 1000)
    assert low <= cal.expected_false_reject_rate * 1000 <= high
    assert rejects_interval(cal, 1000) == (low, high)  # seeded
    # the same calibration over 10x the images: the count's interval, as a rate, is narrower
    low10, high10 = rejects_interval(cal, 10000)
    assert (high10 - low10) / 10000 < (high - low) / 1000
    narrow = rejects_interval(cal, 1000, confidence=0.5)
    assert low <= narrow[0] <= narrow[1] <= high


# ---------------------------------------------------------------------------- against the truth

DISTRIBUTIONS = {
    "normal": stats.norm(1.0, 0.2),
    "gamma": stats.gamma(2.0, scale=0.3),
    "lognormal": stats.lognorm(0.5, scale=1.0),
    "pareto-tail": stats.lomax(4.0),  # Pareto II, tail index 4 (GPD shape 0.25)
}
REPETITIONS = 100


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
def test_true_false_reject_rate_and_interval_coverage(name):
    """For n = 30 .. 1000 scores and targets 2 % and 0.5 %, over REPETITIONS seeded draws:

    - the mean TRUE false-reject rate at the threshold is within 2x of the target wherever
      the sample is expected to hold a score above the threshold (n * target >= 1). Below, the
      threshold extrapolates a fitted family beyond the sample, and the calibration says so:
      a Pareto tail fitted by a lognormal from 100 scores for 0.5 % fails more than 2x the
      target (2.35x measured here);
    - the 95 % interval holds the true rate in >= 85 % of the draws where the scores are enough
      for the target (n >= 5 / target), and in >= 65 % where they are not (the misses are
      mostly on the high side; the module docstring and docs/detector.md say so);
    - every calibration with too few scores carries the warning."""
    dist = DISTRIBUTIONS[name]
    failures, lines = [], []
    for n in (30, 100, 300, 1000):
        for target in (0.02, 0.005):
            rng = np.random.default_rng(1000 * n + int(1000 * target))
            true, above, below, warned = [], 0, 0, 0
            for _ in range(REPETITIONS):
                cal = calibrate(dist.rvs(size=n, random_state=rng), target)
                rate = float(dist.sf(cal.threshold))
                true.append(rate)
                above += rate > cal.ci_high
                below += rate < cal.ci_low
                warned += cal.warning is not None
            ratio, coverage = float(np.mean(true)) / target, 1 - (above + below) / REPETITIONS
            enough = n >= required_good_images(target)
            lines.append(f"{name} n={n} target={target}: mean true rate / target {ratio:.2f}, coverage "
                         f"{coverage:.2f} (true rate above the CI {above}, below {below}), enough {enough}, "
                         f"last method {cal.method}")
            if n * target >= 1 and not 0.5 <= ratio <= 2.0:
                failures.append(lines[-1])
            if coverage < (0.85 if enough else 0.65):
                failures.append(lines[-1])
            if warned != (0 if enough else REPETITIONS):
                failures.append(f"{lines[-1]}: {warned} warnings")
    print("\n".join(lines))
    assert not failures, "\n".join(failures)
