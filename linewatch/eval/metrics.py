"""Accuracy metrics of the MVTec LOCO AD protocol, computed exactly (no threshold sampling).

- Image level: ROC curve and AUROC of image scores (anomalous = positive class). Tied scores
  are handled as scikit-learn does (one ROC point per distinct score), which makes the AUROC
  equal to the Mann-Whitney statistic with mid-ranks.
- Pixel level: the saturated per-region overlap (sPRO) curve of MVTec LOCO AD (Bergmann et
  al., IJCV 2022, sec. 5.2): at an anomaly threshold t a pixel is positive when its map value
  is > t. For each ground-truth region r (one defect channel),

      sPRO_r(t) = min(1, |{p in r : map(p) > t}| / s_r),

  where s_r is the region's saturation area (from defects_config.json; s_r = |r| gives the
  plain PRO). The curve's y value is the mean of sPRO_r over every region of every defect
  image; its x value is the false positive rate over every defect-free pixel of every image
  in the set (good images entirely, defect images outside the union of their regions), as in
  the official evaluator. AU-sPRO integrates the curve over FPR in [0, max_fpr] (trapezoids,
  the end point linearly interpolated) and divides by max_fpr.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["image_auroc", "roc_curve_points", "spro_curve", "au_spro", "area_under_curve", "rates_at_threshold"]


def _labels_scores(labels: Sequence, scores: Sequence) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinity")
    if y.all() or not y.any():
        raise ValueError("AUROC needs at least one positive and one negative label")
    return y, s


def roc_curve_points(labels: Sequence, scores: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of image scores: an image is called anomalous when score >= threshold.

    Args:
        labels: (N,) truthy for anomalous images.
        scores: (N,) image anomaly scores, higher = more anomalous.

    Returns:
        fpr, tpr, thresholds, each (T + 1,): one point per distinct score, in decreasing
        threshold order, preceded by (0, 0) at threshold +inf (scikit-learn's `roc_curve`
        with drop_intermediate=False).
    """
    y, s = _labels_scores(labels, scores)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_group = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each distinct score
    tps = np.cumsum(y)[last_of_group]
    fps = (last_of_group + 1) - tps
    tpr = np.r_[0.0, tps / y.sum()]
    fpr = np.r_[0.0, fps / (~y).sum()]
    return fpr, tpr, np.r_[np.inf, s[last_of_group]]


def image_auroc(labels: Sequence, scores: Sequence) -> float:
    """Area under the image-level ROC curve (trapezoids between distinct scores, so a tie
    between a good and an anomalous image counts one half). Equals sklearn's roc_auc_score."""
    fpr, tpr, _ = roc_curve_points(labels, scores)
    return float(np.trapezoid(tpr, fpr)) if hasattr(np, "trapezoid") else float(np.trapz(tpr, fpr))


def rates_at_threshold(labels: Sequence, scores: Sequence, threshold: float) -> dict[str, float]:
    """Verdict rates at a calibrated threshold (an image fails when score > threshold, as the
    Inspector decides): false_reject_rate over good images, escape_rate over anomalous ones."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    fail = s > threshold
    return {
        "false_reject_rate": float(fail[~y].mean()) if (~y).any() else float("nan"),
        "escape_rate": float((~fail[y]).mean()) if y.any() else float("nan"),
    }


def _as_float(array: np.ndarray) -> np.ndarray:
    """Keep float32 maps as they are (full-size maps of a whole category are large)."""
    array = np.asarray(array)
    return array if np.issubdtype(array.dtype, np.floating) else array.astype(np.float64)


def _count_above(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many of `sorted_values` (ascending) are > each threshold."""
    return sorted_values.size - np.searchsorted(sorted_values, thresholds, side="right")


def spro_curve(
    anomaly_maps: Sequence[np.ndarray],
    gt_regions: Sequence[Sequence[np.ndarray]],
    saturation_thresholds: Sequence[Sequence[float]] | None,
    good_maps: Sequence[np.ndarray],
    max_fpr: float = 0.05,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact sPRO-over-FPR curve, for thresholds whose FPR is at most `max_fpr` plus the
    first point beyond it (needed to interpolate the integration end point).

    Args:
        anomaly_maps: per defect image, its anomaly map (H, W) float.
        gt_regions: per defect image, its ground-truth regions, each a bool (H, W) mask of the
            same size as the image's map (a defect image must have at least one region).
        saturation_thresholds: per defect image, per region, its saturation area s_r in
            pixels (min(threshold, |r|) for absolute, threshold * |r| for relative configs,
            see `dataset.saturation_area`); None gives s_r = |r|, i.e. the plain PRO.
        good_maps: anomaly maps (H, W) of the good images (no defect pixel).
        max_fpr: integration limit of the FPR axis.

    Returns:
        fprs, spros, thresholds: (T,) each, in decreasing threshold order (so fprs and spros
        are non-decreasing). The first point is at threshold +inf (0, 0).
    """
    if len(anomaly_maps) != len(gt_regions):
        raise ValueError(f"{len(anomaly_maps)} anomaly maps but ground truth for {len(gt_regions)} images")
    if saturation_thresholds is not None and len(saturation_thresholds) != len(gt_regions):
        raise ValueError("saturation_thresholds needs one list per defect image")
    background: list[np.ndarray] = [_as_float(m).ravel() for m in good_maps]
    region_values: list[np.ndarray] = []
    saturation: list[float] = []
    for i, (amap, regions) in enumerate(zip(anomaly_maps, gt_regions)):
        amap = _as_float(amap)
        if not len(regions):
            raise ValueError(f"defect image {i} has no ground-truth region")
        union = np.zeros(amap.shape, dtype=bool)
        for j, region in enumerate(regions):
            region = np.asarray(region, dtype=bool)
            if region.shape != amap.shape:
                raise ValueError(f"defect image {i} region {j}: mask {region.shape} but map {amap.shape}")
            area = int(region.sum())
            if area == 0:
                raise ValueError(f"defect image {i} region {j} is empty")
            sat = float(area if saturation_thresholds is None else saturation_thresholds[i][j])
            if sat <= 0:
                raise ValueError(f"defect image {i} region {j}: saturation area {sat} must be positive")
            region_values.append(np.sort(amap[region]))
            saturation.append(sat)
            union |= region
        background.append(amap[~union])
    if not background or sum(b.size for b in background) == 0:
        raise ValueError("sPRO needs defect-free pixels (good images or defect images with background)")
    if not region_values:
        raise ValueError("sPRO needs at least one defect image")

    bg = np.sort(np.concatenate(background))
    n_bg = bg.size
    # Only thresholds at or above the value where FPR first exceeds max_fpr matter.
    allowed_fp = int(np.floor(max_fpr * n_bg))
    # t_low: the largest threshold with more than allowed_fp background pixels above it
    t_low = bg[n_bg - allowed_fp - 1] if allowed_fp < n_bg else -np.inf
    candidates = [bg[bg >= t_low]] + [v[v >= t_low] for v in region_values]
    thresholds = np.unique(np.concatenate(candidates))[::-1]  # decreasing
    # The first point beyond max_fpr: the largest pixel value below t_low (-inf when none,
    # i.e. every pixel positive).
    below = [v[np.searchsorted(v, t_low, side="left") - 1] for v in [bg, *region_values]
             if v.size and v[0] < t_low]
    t_next = max(below) if below else -np.inf
    thresholds = np.r_[np.inf, thresholds, t_next]

    fprs = _count_above(bg, thresholds) / n_bg
    spros = np.zeros(thresholds.size)
    for values, sat in zip(region_values, saturation):
        spros += np.minimum(_count_above(values, thresholds) / sat, 1.0)
    spros /= len(region_values)
    # Keep points up to and including the first with FPR > max_fpr.
    beyond = np.nonzero(fprs > max_fpr)[0]
    if beyond.size:
        keep = beyond[0] + 1
        fprs, spros, thresholds = fprs[:keep], spros[:keep], thresholds[:keep]
    return fprs, spros, thresholds


def area_under_curve(fprs: np.ndarray, ys: np.ndarray, max_fpr: float) -> float:
    """Area under a non-decreasing-in-x curve from x = 0 to x = max_fpr, divided by max_fpr.

    Points are joined linearly; the value at max_fpr is interpolated between the last point
    at or before it and the first point after it (as the official evaluator does). A curve
    that ends before max_fpr is extended flat."""
    fprs = np.asarray(fprs, dtype=np.float64)
    ys = np.asarray(ys, dtype=np.float64)
    inside = fprs <= max_fpr
    x, y = fprs[inside], ys[inside]
    after = np.nonzero(~inside)[0]
    if after.size:
        j = after[0]
        x0, y0 = fprs[j - 1], ys[j - 1]
        x1, y1 = fprs[j], ys[j]
        y_end = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
    else:
        y_end = y[-1]
    x, y = np.r_[x, max_fpr], np.r_[y, y_end]
    if x[0] > 0:
        x, y = np.r_[0.0, x], np.r_[y[0], y]
    area = np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0)
    return float(area / max_fpr)


def au_spro(
    anomaly_maps: Sequence[np.ndarray],
    gt_regions: Sequence[Sequence[np.ndarray]],
    saturation_thresholds: Sequence[Sequence[float]] | None,
    good_maps: Sequence[np.ndarray],
    max_fpr: float = 0.05,
) -> float:
    """Normalised area under the sPRO curve up to `max_fpr` (in [0, 1]); see `spro_curve`.
    With saturation_thresholds None it is the AU-PRO."""
    fprs, spros, _ = spro_curve(anomaly_maps, gt_regions, saturation_thresholds, good_maps, max_fpr)
    return area_under_curve(fprs, spros, max_fpr)
