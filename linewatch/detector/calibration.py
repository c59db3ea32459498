"""The fail threshold from good-image scores, and what it can promise.

`calibrate(scores, target)` returns the score t above which a fraction `target` of good parts
is expected to fall (fail when score > t), the method that found it, the false-reject rate to
expect at t with a confidence interval, and whether there were enough scores for that target.
Pure computation (numpy, scipy), no I/O.

Methods, picked by `choose_method`:

- ``gpd-tail`` (peaks over threshold) when the top TAIL_FRACTION (10 %) of the scores are at
  least MIN_TAIL_SCORES (20), i.e. from 200 scores on, and the target is below 10 %: u is the
  score just below that top 10 %, the top scores minus u are fitted with a generalized Pareto
  distribution (scipy.stats.genpareto), and P(score > t) = zeta * GPD.sf(t - u) for t > u,
  zeta = the fraction of scores in the tail (about 0.1); t solves that = target. The GPD is
  fitted with Zhang & Stephens's estimator (Technometrics 51(3), 2009) rather than maximum
  likelihood: it exists for every sample (the GPD likelihood is unbounded for shapes below
  -1), it leans less to light tails than maximum likelihood with a few dozen exceedances, and
  it needs no iterative optimizer, so the bootstrap below refits it hundreds of times in
  milliseconds (scipy.stats.genpareto.fit took 12-38 ms per fit on the development machine).
- ``empirical`` when there are that many scores but the target is not in the top 10 % (or the
  top 10 % are all equal): the smallest score with at most `target` of the scores above it.
- ``normal-fit`` / ``lognormal-fit`` / ``gamma-fit`` with fewer scores: each family is fitted
  to all scores by maximum likelihood and the one with the highest log-likelihood gives t as
  its (1 - target) quantile (two free parameters each, so this is also the AIC choice;
  lognormal and gamma, location 0, compete only when every score is positive). t then rests
  on the family's tail shape more than on data.

Expected false-reject rate and confidence interval: percentile bootstrap. The scores are
resampled with replacement BOOTSTRAP_RESAMPLES times (seeded: the same scores always give the
same numbers), each resample is fitted again by the same method (a whole-sample family is
chosen again per resample, so the doubt about the family widens the interval), and each refit's
P(score > t) is read off at the chosen t. For the tail fit, a resample's scores above u are
drawn from the GPD fitted to the scores rather than resampled: a resample of the scores holds
nothing beyond their largest, so its tail is never heavier than the sample's, and at low targets
(t beyond nearly every score) the interval then missed the true rate on the high side far more
often than its level allows (tests/detector/test_calibration.py). `rejects_interval` turns the
same refits into the number of further good images expected above t, with their binomial noise.
The expected rate is their mean (it differs from the target when the fit is uncertain), the
interval their central `confidence` range. The interval is too narrow on the high side: in
tests/detector/test_calibration.py (100 draws per case) the true rate lay above a 95 %
interval in 4-11 % of the draws with enough scores and in up to 23 % with too few, below it
in at most 4 % (docs/detector.md#calibration has the numbers).

Required number of good scores, `required_good_images(p)`: a threshold for a false-reject rate
p is backed by data when the sample is expected to hold at least MIN_EXPECTED_EXCEEDANCES (5)
scores above it, n >= 5 / p (0.5 % -> 1000, 2 % -> 250). When 5 scores lie above a threshold,
the exact (Garwood) 95 % interval for the rate there is 0.32 to 2.3 times what they show (with
1 score: 0.025 to 5.6 times); with fewer than 5 expected, t extrapolates the fitted shape more
than it reads the data, and `Calibration.warning` says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np

# scipy (special, stats) is imported where a fit needs it: the `Calibration` record is also what
# a bank's manifest holds, and commands that only read one (linewatch.detector.manifest) would
# otherwise pay scipy.stats's import, about a second on a small CPU.

__all__ = [
    "Calibration", "calibrate", "rejects_interval", "choose_method", "required_good_images", "fit_gpd",
    "TAIL_FRACTION", "MIN_TAIL_SCORES", "MIN_EXPECTED_EXCEEDANCES", "BOOTSTRAP_RESAMPLES", "MIN_SCORES",
]

TAIL_FRACTION = 0.10  # the tail fit uses the top 10 % of the scores
MIN_TAIL_SCORES = 20  # ... and needs at least this many of them
MIN_EXPECTED_EXCEEDANCES = 5  # good scores expected above the threshold for it to be backed by data
BOOTSTRAP_RESAMPLES = 200
BOOTSTRAP_SEED = 0
MIN_SCORES = 3  # fewer cannot be fitted at all


def required_good_images(target_false_reject_rate: float,
                         min_expected_exceedances: float = MIN_EXPECTED_EXCEEDANCES) -> int:
    """Good-image scores needed before a threshold for `target_false_reject_rate` is backed by
    data: enough that `min_expected_exceedances` of them are expected above it,
    n >= min_expected_exceedances / target (5 / 0.005 = 1000, 5 / 0.02 = 250)."""
    if not 0.0 < target_false_reject_rate < 1.0:
        raise ValueError(f"target false-reject rate must be in (0, 1), got {target_false_reject_rate}")
    # round first: 5 / 0.07 = 71.42..., but 3 / 0.03 = 100.00000000000001 must stay 100
    return max(MIN_SCORES, math.ceil(round(min_expected_exceedances / target_false_reject_rate, 9)))


# ---------------------------------------------------------------------------- fitted models
# Every fit works on the rows of a (B, n) array at once: B = 1 for the scores themselves,
# B = the bootstrap resamples otherwise. Distributions are scipy.stats ones with (B,) parameters.


class Fitted:
    """A scipy.stats distribution with its (B,) parameters: what `rv(*args, **kwds)` freezes, with
    the same `args`, `kwds`, `sf`, `isf` and `logpdf` (the same scipy calls, so the same numbers),
    but without freezing: scipy builds a new distribution object, docstrings included, per frozen
    one, which `python -m cProfile` over `calibrate` showed as a large share of its time."""

    def __init__(self, rv, *args, **kwds):
        self.rv, self.args, self.kwds = rv, args, kwds

    def sf(self, x):
        return self.rv.sf(x, *self.args, **self.kwds)

    def isf(self, q):
        return self.rv.isf(q, *self.args, **self.kwds)

    def logpdf(self, x):
        return self.rv.logpdf(x, *self.args, **self.kwds)


def _gamma_fit(x: np.ndarray):
    """Gamma maximum likelihood with location 0, per row: the shape solves
    log(a) - digamma(a) = log(mean) - mean(log) (Minka's start, then Newton; what
    scipy.stats.gamma.fit(x, floc=0) solves)."""
    from scipy import special, stats

    mean = x.mean(1)
    d = np.log(mean) - np.log(x).mean(1)
    a = (3.0 - d + np.sqrt((d - 3.0) ** 2 + 24.0 * d)) / (12.0 * d)
    for _ in range(6):
        a = a - (np.log(a) - special.digamma(a) - d) / (1.0 / a - special.polygamma(1, a))
    return Fitted(stats.gamma, a, scale=mean / a)


def _normal_fit(x: np.ndarray):
    from scipy import stats

    return Fitted(stats.norm, x.mean(1), x.std(1))


def _lognormal_fit(x: np.ndarray):
    from scipy import stats

    return Fitted(stats.lognorm, np.log(x).std(1), scale=np.exp(np.log(x).mean(1)))


FAMILIES = {
    "normal-fit": _normal_fit,
    "lognormal-fit": _lognormal_fit,
    "gamma-fit": _gamma_fit,
}
FAMILY_NAMES = tuple(FAMILIES)
POSITIVE_ONLY = ("lognormal-fit", "gamma-fit")


def _tail_size(n: int) -> int:
    """How many top scores the tail fit uses."""
    return int(TAIL_FRACTION * n)


def fit_gpd(exceedances: np.ndarray):
    """Generalized Pareto fit (location 0) of non-negative exceedances, one sample per row, by
    Zhang & Stephens's estimator (Technometrics 51(3), 2009): the posterior mean of
    theta = -shape / scale over a grid of m = 20 + sqrt(k) values, weighted by the profile
    likelihood. Returns scipy.stats.genpareto with (B,) shape and scale (`Fitted`)."""
    from scipy import stats

    y = np.sort(np.atleast_2d(np.asarray(exceedances, dtype=np.float64)), axis=1)
    k = y.shape[1]
    m = 20 + int(math.sqrt(k))
    top = y[:, -1:]
    q = max(1, int(k / 4 + 0.5))  # the first quartile, 1-based
    quartile = np.maximum(y[:, q - 1: q], top * 1e-3)  # > 0 with ties at 0
    theta = 1.0 / top + (1.0 - np.sqrt(m / (np.arange(1, m + 1) - 0.5)))[None, :] / (3.0 * quartile)  # (B, m)
    with np.errstate(all="ignore"):
        kz = -np.mean(np.log1p(-theta[:, :, None] * y[:, None, :]), axis=2)  # Zhang & Stephens's k = -shape
        profile = k * (np.log(theta / kz) + kz - 1.0)  # profile log-likelihood of each theta
    profile = np.where(np.isfinite(profile), profile, -np.inf)
    weights = np.exp(profile - profile.max(1, keepdims=True))
    theta_hat = np.sum(theta * weights, 1) / np.sum(weights, 1)
    k_hat = -np.mean(np.log1p(-theta_hat[:, None] * y), axis=1)
    exponential = np.abs(theta_hat) * top[:, 0] < 1e-9  # k / theta -> the mean
    scale = np.where(exponential, y.mean(1), k_hat / np.where(exponential, 1.0, theta_hat))
    return Fitted(stats.genpareto, np.where(exponential, 0.0, -k_hat), scale=scale)


def _rows_sorted(x: np.ndarray) -> bool:
    """Every row of x (B, n) in ascending order (a check is cheaper than sorting again)."""
    return bool(np.all(x[:, 1:] >= x[:, :-1]))


class _Fits:
    """The fitted score distributions of the rows of `x` (B, n) by one method."""

    def __init__(self, method: str, x: np.ndarray):
        self.method = method
        self.x = x if _rows_sorted(x) else np.sort(x, axis=1)  # the bootstrap's rows come sorted
        n = self.x.shape[1]
        if method == "gpd-tail":
            k = _tail_size(n)
            self.u = self.x[:, n - k - 1]
            self.zeta = k / n
            self.dist = fit_gpd(self.x[:, n - k:] - self.u[:, None])
        elif method != "empirical":
            self.dist = FAMILIES[method](self.x)

    def sf(self, t: float) -> np.ndarray:
        """Fitted P(score > t), per row."""
        empirical = np.mean(self.x > t, axis=1)
        if self.method == "empirical":
            return empirical
        if self.method == "gpd-tail":
            return np.where(t > self.u, self.zeta * self.dist.sf(np.maximum(t - self.u, 0.0)), empirical)
        return self.dist.sf(t)

    def isf(self, p: float) -> np.ndarray:
        """The score t with fitted P(score > t) = p, per row."""
        if self.method == "empirical":  # the smallest score with at most a fraction p above it
            n = self.x.shape[1]
            return self.x[:, n - 1 - math.floor(round(p * n, 9))]
        if self.method == "gpd-tail":
            return self.u + self.dist.isf(p / self.zeta)
        return self.dist.isf(p)

    def loglik(self) -> np.ndarray:
        return np.sum(self.dist.logpdf(self.x.T), axis=0)


def choose_method(scores: np.ndarray, target_false_reject_rate: float) -> str:
    """gpd-tail when the top TAIL_FRACTION of the scores (the scores above u) are at least
    MIN_TAIL_SCORES (200 scores and more), not all equal, and the target is below the fraction
    they make up; empirical when they are that many but the target is not in the tail (or the
    tail is flat); otherwise the whole-sample family with the highest log-likelihood
    (`best_family`)."""
    x = np.sort(np.asarray(scores, dtype=np.float64))
    k = _tail_size(len(x))
    if k >= MIN_TAIL_SCORES:
        flat = x[-1] == x[len(x) - k]  # the top scores all equal: no tail shape to fit
        return "gpd-tail" if target_false_reject_rate < k / len(x) and not flat else "empirical"
    return FAMILY_NAMES[int(best_family(x[None, :])[0])]


def best_family(x: np.ndarray) -> np.ndarray:
    """Per row of x (B, n), the index into FAMILY_NAMES of the family with the highest
    log-likelihood; lognormal and gamma (location 0) compete only when every score is positive
    (each has two free parameters, so this is also the AIC choice)."""
    names = FAMILY_NAMES if np.all(x > 0) else tuple(n for n in FAMILY_NAMES if n not in POSITIVE_ONLY)
    with np.errstate(all="ignore"):
        loglik = np.stack([_Fits(name, x).loglik() for name in names])
    loglik = np.where(np.isfinite(loglik), loglik, -np.inf)
    return np.array([FAMILY_NAMES.index(names[i]) for i in np.argmax(loglik, axis=0)])


# ---------------------------------------------------------------------------- calibrate


@dataclass
class Calibration:
    """A calibrated threshold and what it promises. Fail when score > threshold.

    It is also the bank manifest's "calibration" record, one key per field (`to_manifest`,
    `from_manifest`; `linewatch.detector.bank` checks each key's type against the fields). A
    bank being built holds threshold None until it is calibrated. Banks built before this
    record had its present form hold only threshold, method, target_false_reject_rate,
    observed_false_reject_rate, n, mean, std, max and scores: the other fields are None there.
    """

    threshold: float | None
    method: str | None = None  # "gpd-tail" | "empirical" | "normal-fit" | "lognormal-fit" | "gamma-fit"
    target_false_reject_rate: float | None = None  # the false-reject rate asked for
    expected_false_reject_rate: float | None = None  # bootstrap mean of the fitted rate at the threshold
    ci_low: float | None = None
    ci_high: float | None = None
    confidence: float | None = None
    observed_false_reject_rate: float | None = None  # fraction of the calibration scores above the threshold
    n: int | None = None
    n_required: int | None = None  # required_good_images(target)
    enough: bool | None = None  # n >= n_required
    warning: str | None = None
    mean: float | None = None
    std: float | None = None
    max: float | None = None
    scores: tuple[float, ...] = field(default=(), repr=False)  # the good scores it was fitted on
    source: str | None = None  # where the scores came from (a bank's validation folder, leave-one-out)

    def to_manifest(self) -> dict:
        """The bank manifest's "calibration" record (JSON-serialisable): every field, the
        scores rounded to 6 decimals (what a bank keeps of them)."""
        record = {f.name: getattr(self, f.name) for f in fields(self)}
        record["scores"] = [round(float(s), 6) for s in self.scores]
        return record

    @classmethod
    def from_manifest(cls, record: dict) -> "Calibration":
        """The record `to_manifest` wrote (a key a bank built before lacks: None). The keys and
        their types are the caller's to check (TemplateBank.load does, naming the bank)."""
        return cls(**dict(record, scores=tuple(record.get("scores", ()))))


def _check(scores, target: float, confidence: float) -> np.ndarray:
    x = np.asarray(scores, dtype=np.float64).ravel()
    if not 0.0 < target < 1.0:
        raise ValueError(f"target false-reject rate must be in (0, 1), got {target}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if len(x) < MIN_SCORES:
        raise ValueError(f"{len(x)} good-image score(s); a threshold needs at least {MIN_SCORES}")
    bad = int(np.sum(~np.isfinite(x)))
    if bad:
        raise ValueError(f"{bad} of {len(x)} good-image scores are NaN or infinite; a threshold cannot be fitted")
    if np.ptp(x) == 0:
        raise ValueError(f"all {len(x)} good-image scores are equal ({x[0]:.6g}); their spread, and so a "
                         "threshold for a false-reject rate, cannot be estimated")
    return x


def _bootstrap_rates(method: str, x: np.ndarray, threshold: float, resamples: int, seed: int) -> np.ndarray:
    """P(score > threshold) fitted to each of `resamples` resamples of x by `method` (a
    whole-sample family is chosen again per resample)."""
    from scipy import stats

    rng = np.random.default_rng(seed)
    n = len(x)
    xb = np.sort(x[rng.integers(0, n, (resamples, n))], axis=1)
    if method == "gpd-tail":
        # a resample of the scores cannot hold a score beyond the largest one, so its tail is
        # never heavier than the sample's: the resampled scores above u are drawn from the GPD
        # fitted to the scores instead (the body, u and the count above it stay resampled)
        fit = _Fits(method, x[None, :])
        u = float(fit.u[0])
        tail = u + stats.genpareto.rvs(float(fit.dist.args[0][0]), scale=float(fit.dist.kwds["scale"][0]),
                                       size=xb.shape, random_state=rng)
        xb = np.sort(np.where(xb > u, tail, xb), axis=1)
    rates = np.mean(xb > threshold, axis=1)  # a resample with nothing to fit: what it shows
    # something to fit: scores not all equal (for the tail fit: the top scores not all equal)
    rows = np.nonzero(xb[:, -1] > xb[:, n - _tail_size(n) if method == "gpd-tail" else 0])[0]
    if method == "gpd-tail":
        rates[rows] = _Fits(method, xb[rows]).sf(threshold)
    elif method in FAMILIES:
        choice = best_family(xb[rows])
        for i in np.unique(choice):
            chosen = rows[choice == i]
            rates[chosen] = _Fits(FAMILY_NAMES[i], xb[chosen]).sf(threshold)
    return rates


def rejects_interval(calibration: Calibration, images: int, confidence: float | None = None,
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[int, int]:
    """How many of `images` further good images may score above the calibration's threshold:
    the central `confidence` range (default the calibration's) of the count, each bootstrap
    refit's rate (as `calibrate`'s interval) drawn binomially over `images` (their mixture).
    An observed count outside it disagrees with the calibration beyond both the fit's doubt and
    the test set's own binomial noise; the interval of the rate alone ignores the latter."""
    from scipy import stats

    confidence = calibration.confidence if confidence is None else confidence
    x = np.asarray(calibration.scores, dtype=np.float64)
    rates = _bootstrap_rates(calibration.method, x, calibration.threshold, resamples, seed)
    cdf = stats.binom.cdf(np.arange(images + 1)[None, :], images, np.clip(rates, 0.0, 1.0)[:, None]).mean(0)
    alpha = 1.0 - confidence
    low = int(np.searchsorted(cdf, alpha / 2))  # the smallest count with P(count <= it) >= alpha / 2
    high = int(np.searchsorted(cdf, 1.0 - alpha / 2 - 1e-12))
    return low, min(high, images)


def calibrate(scores, target: float, confidence: float = 0.95,
              resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> Calibration:
    """Threshold for false-reject rate `target` from good-image scores (see the module docstring).

    Raises ValueError for fewer than MIN_SCORES scores, NaN/inf scores or all scores equal."""
    x = _check(scores, target, confidence)
    method = choose_method(x, target)
    threshold = float(_Fits(method, x[None, :]).isf(target)[0])
    rates = _bootstrap_rates(method, x, threshold, resamples, seed)
    expected = float(np.mean(rates))
    alpha = 1.0 - confidence
    low, high = (float(v) for v in np.quantile(rates, [alpha / 2, 1 - alpha / 2]))
    n_required = required_good_images(target)
    warning = None
    if len(x) < n_required:
        warning = (f"{len(x)} good-image scores are too few for a false-reject rate of {target:.2%}: it needs "
                   f"at least {n_required} good images ({MIN_EXPECTED_EXCEEDANCES} expected above the threshold). "
                   f"The threshold ({method}) extrapolates beyond the scores; expect {expected:.2%} of good parts to fail "
                   f"({confidence:.0%} CI {low:.2%} to {high:.2%}, likely wider on the high side)")
    return Calibration(
        threshold=threshold, method=method, target_false_reject_rate=target, expected_false_reject_rate=expected,
        ci_low=low, ci_high=high, confidence=confidence, observed_false_reject_rate=float(np.mean(x > threshold)),
        n=len(x), n_required=n_required, enough=len(x) >= n_required, warning=warning,
        mean=float(np.mean(x)), std=float(np.std(x)), max=float(np.max(x)), scores=tuple(x.tolist()),
    )
