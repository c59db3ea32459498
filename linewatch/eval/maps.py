"""The anomaly maps `linewatch eval` scores and writes: the detector's maps, made so that the
official MVTec LOCO AD evaluation script computes from them what linewatch reports.

Two things separate a method's raw maps from what the official script needs:

1. **The image score.** The official script scores an image with its map's maximum. The
   detector's image score is not always that: `fused` fuses each branch's *peak* (the branches
   peak in different places, so the score is above every pixel of the fused map, by a lot where
   two branches see an anomaly), and every method's score is its map's peak at the working size,
   which the bilinear resize to the input's size can lower. `lift_peaks` writes the score into
   the pixel where the map peaks (one pixel per map; the score is never below the map, so that
   pixel only goes up). The map's maximum is then the image score, for every method.

2. **Exactly equal values.** The object branch's map is exactly 0 wherever there is no object
   (two thirds of the pixels of a synthetic tray); the official script picks its first
   thresholds at equally spaced ranks of all pixel values and refuses the maps when two of them
   coincide (`assert len(set(init_queries)) == len(init_queries)`). `break_ties` orders equal
   values without changing the order of any two different values: each pixel is moved down by
   a whole number of float32 steps (at most BAYER_LEVELS - 1 of them, and never as far as the
   next lower value present in the method's maps of the category), the number given by its
   place in an ordered-dither (Bayer) matrix. A mass of equal values is thereby split into
   BAYER_LEVELS parts that each cover the image evenly, so a threshold inside the mass selects
   about the same fraction of it in every region and in the background alike: no region is
   favoured, as it would be by a tie-breaker that carries information (another branch's map, the
   distance to an object). The image's peak pixel is not moved. Nothing random is added.

The maps stay float32, so what is written is what is scored. linewatch's metrics are then
computed on these maps, and agree with the official script on them (`linewatch.eval.official`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["BAYER_ORDER", "BAYER_LEVELS", "bayer_matrix", "lift_peaks", "break_ties", "official_maps"]

BAYER_ORDER = 6  # a 64 x 64 matrix
BAYER_LEVELS = 4**BAYER_ORDER  # 4096: a tied mass splits into parts of 1/4096 of it
_SIGN = np.int64(0x80000000)
_LOWEST = None  # ordinal of the most negative finite float32, set below


def bayer_matrix(order: int = BAYER_ORDER) -> np.ndarray:
    """The (2^order, 2^order) ordered-dither index matrix: each of 0 .. 4^order - 1 once, and
    every aligned 2^k x 2^k block holds an even share of each range of consecutive indices."""
    m = np.zeros((1, 1), dtype=np.int64)
    for _ in range(order):
        m = np.block([[4 * m, 4 * m + 2], [4 * m + 3, 4 * m + 1]])
    return m


def _ordinals(values: np.ndarray) -> np.ndarray:
    """float32 -> int64 keys in the same order, consecutive floats having consecutive keys
    (-0.0 and 0.0 alike 0)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.int32).astype(np.int64)
    return np.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))


def _from_ordinals(keys: np.ndarray) -> np.ndarray:
    bits = np.where(keys >= 0, keys, (-keys) | _SIGN)
    return bits.astype(np.uint32).view(np.float32)


_LOWEST = int(_ordinals(np.array([np.finfo(np.float32).min]))[0])


def lift_peaks(maps: Sequence[np.ndarray], scores: Sequence[float]) -> tuple[list[np.ndarray], np.ndarray, list[int]]:
    """Each map (copied, float32) with its image score written into its highest pixel (the
    first one in row-major order), and the scores as the maps now hold them: float32, and the
    map's own maximum where that was above the score. Returns (maps, scores, peak flat indices)."""
    if len(maps) != len(scores):
        raise ValueError(f"{len(maps)} maps but {len(scores)} scores")
    out, lifted, peaks = [], [], []
    for amap, score in zip(maps, scores):
        amap = np.array(amap, dtype=np.float32, copy=True)
        if amap.ndim != 2 or amap.size == 0:
            raise ValueError(f"an anomaly map must be 2-D and not empty, got shape {amap.shape}")
        if not np.isfinite(amap).all() or not np.isfinite(score):
            raise ValueError("anomaly maps and scores must be finite")
        peak = int(np.argmax(amap))
        top = max(np.float32(score), amap.flat[peak])
        amap.flat[peak] = top
        out.append(amap)
        lifted.append(float(top))
        peaks.append(peak)
    return out, np.asarray(lifted, dtype=np.float64), peaks


def break_ties(maps: Sequence[np.ndarray], keep: Sequence[int] | None = None) -> list[np.ndarray]:
    """The maps (float32, copied) with equal values ordered by an ordered-dither matrix and the
    order of different values kept (see the module docstring); the pixel at flat index keep[i]
    of map i is not moved (its peak: the map's maximum stays what it was)."""
    maps = [np.asarray(m, dtype=np.float32) + np.float32(0.0) for m in maps]  # a copy; -0.0 -> 0.0
    if not maps:
        return []
    if any(not np.isfinite(m).all() for m in maps):
        raise ValueError("anomaly maps must be finite")
    values = np.unique(np.concatenate([np.unique(m) for m in maps]))  # every value present, ascending
    keys = _ordinals(values)
    below = np.empty_like(keys)  # key of the next lower value present (the lowest: BAYER_LEVELS below)
    below[1:] = keys[:-1]
    below[0] = max(keys[0] - BAYER_LEVELS, _LOWEST - 1)
    room = np.minimum(keys - below, BAYER_LEVELS)  # moves of 0 .. room - 1 steps stay above it
    tile = bayer_matrix()
    out = []
    for i, amap in enumerate(maps):
        h, w = amap.shape
        reps = (-(-h // tile.shape[0]), -(-w // tile.shape[1]))
        level = np.tile(tile, reps)[:h, :w]
        where = np.searchsorted(values, amap)
        steps = level * room[where] // BAYER_LEVELS
        if keep is not None:
            steps.flat[keep[i]] = 0
        out.append(_from_ordinals(keys[where] - steps).reshape(h, w))
    return out


def official_maps(maps: Sequence[np.ndarray], scores: Sequence[float]) -> tuple[list[np.ndarray], np.ndarray]:
    """`lift_peaks` then `break_ties` on one method's maps of one category (all its test images
    together: ties across images count too). Returns (maps, scores): every map's maximum is its
    score."""
    lifted, new_scores, peaks = lift_peaks(maps, scores)
    return break_ties(lifted, keep=peaks), new_scores
