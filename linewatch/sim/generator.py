"""A synthetic production line: top-down images of two products with logical and structural
anomalies and pixel ground truth, written in the MVTec LOCO AD layout.

Honest note: these images are drawn shapes (rings, hexagons, rounded rectangles, textured
patches) on a plain tray, with small random jitter in position, rotation, colour and
brightness plus sensor noise. They exist so the tests, the demo and the evaluation harness can
run end to end without a dataset download. Scores measured on them say that the pipeline is
wired correctly; they are NOT a benchmark of real-world accuracy.

Products (PRODUCTS) and their good content:
  screw_tray:    2 washers, 2 nuts, 1 long screw, 1 short screw (6 parts) on a dark tray.
  breakfast_box: 2 oranges, 1 peach, 1 cereal patch, 1 nut mix (5 parts) in a white box.

Anomalies (ANOMALIES), each with a ground-truth mask of the affected pixels:
  logical:    missing     a part is absent; mask = where it should be.
              extra       one more of a (small) part at a free spot; mask = the extra part.
              wrong_place a part moved to a free spot; mask = old and new location.
              wrong_part  a part replaced by another kind (washer -> nut, orange -> lime, ...);
                          mask = union of the old and the new part's footprint.
  structural: scratch       a thin line of a foreign colour across a part; mask = the line.
              chip          a bite out of a part's edge (background shows); mask = the bite.
              contamination a foreign-coloured blob on a part; mask = the blob.

All randomness comes from the numpy Generator given to `render`; `generate_dataset` seeds one
Generator per image from (seed, split, index), so files are bit-identical for a fixed seed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

SUPERSAMPLE = 2  # draw at 2x and area-downsample: smooth edges without cv2's uint8-only AA

LOGICAL_ANOMALIES = ("missing", "extra", "wrong_place", "wrong_part")
STRUCTURAL_ANOMALIES = ("scratch", "chip", "contamination")
ANOMALIES = LOGICAL_ANOMALIES + STRUCTURAL_ANOMALIES

Colour = tuple[float, float, float]


# --------------------------------------------------------------------------------------
# Part drawing. Every drawer paints into `canvas` (S, S, 3) float32 RGB in [0, 1] and returns
# the part's footprint, a bool (S, S) mask. Sizes are fractions of the image side.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One part instance: kind, centre (fractions of the image side), rotation (degrees),
    a per-part colour gain, and a seed for its texture."""

    kind: str
    cx: float
    cy: float
    angle: float
    gain: float
    seed: int


def _grid(S: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:S, 0:S].astype(np.float32)
    return xs, ys


def _paint_shaded(
    canvas: np.ndarray, mask: np.ndarray, colour: Colour, cx: float, cy: float, r: float, strength: float
) -> None:
    """Fill `mask` with `colour` lit from the top-left: brighter near (cx - r/3, cy - r/3)."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return
    d = np.hypot(xs - (cx - 0.33 * r), ys - (cy - 0.33 * r)) / (1.4 * r)
    f = (1.0 + strength * 0.5) - strength * np.clip(d, 0.0, 1.0)
    canvas[ys, xs] = np.clip(np.asarray(colour, np.float32)[None, :] * f[:, None], 0.0, 1.0)


def _circle_mask(S: int, cx: float, cy: float, r: float) -> np.ndarray:
    m = np.zeros((S, S), np.uint8)
    cv2.circle(m, (int(round(cx)), int(round(cy))), max(1, int(round(r))), 1, -1)
    return m.astype(bool)


def _poly_mask(S: int, pts: np.ndarray) -> np.ndarray:
    m = np.zeros((S, S), np.uint8)
    cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1)
    return m.astype(bool)


def _rounded_rect(cx: float, cy: float, w: float, h: float, r: float, angle: float) -> np.ndarray:
    """Polygon (K, 2) of a rounded rectangle centred at (cx, cy), rotated by `angle` degrees."""
    pts = []
    for (sx, sy), a0 in (((1, 1), 0), ((-1, 1), 90), ((-1, -1), 180), ((1, -1), 270)):
        ccx, ccy = sx * (w / 2 - r), sy * (h / 2 - r)
        for t in np.linspace(a0, a0 + 90, 8):
            pts.append((ccx + r * math.cos(math.radians(t)), ccy + r * math.sin(math.radians(t))))
    p = np.asarray(pts, np.float64)
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return np.stack([cx + c * p[:, 0] - s * p[:, 1], cy + s * p[:, 0] + c * p[:, 1]], 1)


def _draw_washer(canvas: np.ndarray, p: Part, S: int, rng: np.random.Generator) -> np.ndarray:
    cx, cy, R = p.cx * S, p.cy * S, 0.072 * S
    m = _circle_mask(S, cx, cy, R) & ~_circle_mask(S, cx, cy, 0.034 * S)
    _paint_shaded(canvas, m, tuple(v * p.gain for v in (0.76, 0.77, 0.80)), cx, cy, R, 0.35)
    return m


def _hex_nut(canvas: np.ndarray, p: Part, S: int, colour: Colour) -> np.ndarray:
    cx, cy, R = p.cx * S, p.cy * S, 0.068 * S
    a = np.radians(p.angle + np.arange(6) * 60.0)
    m = _poly_mask(S, np.stack([cx + R * np.cos(a), cy + R * np.sin(a)], 1))
    m &= ~_circle_mask(S, cx, cy, 0.030 * S)
    _paint_shaded(canvas, m, tuple(v * p.gain for v in colour), cx, cy, R, 0.30)
    return m


def _draw_nut(canvas: np.ndarray, p: Part, S: int, rng: np.random.Generator) -> np.ndarray:
    return _hex_nut(canvas, p, S, (0.82, 0.66, 0.30))


def _screw(canvas: np.ndarray, p: Part, S: int, length: float) -> np.ndarray:
    """A screw lying flat: round head at one end, threaded shaft with a pointed tip."""
    cx, cy, L, w = p.cx * S, p.cy * S, length * S, 0.036 * S
    u = np.array([math.cos(math.radians(p.angle)), math.sin(math.radians(p.angle))])
    n = np.array([-u[1], u[0]])
    c = np.array([cx, cy])
    head, tip = c - u * L / 2, c + u * L / 2
    shaft_end = tip - u * w
    shaft = np.stack([head + n * w / 2, shaft_end + n * w / 2, tip, shaft_end - n * w / 2, head - n * w / 2])
    colour = tuple(v * p.gain for v in (0.62, 0.64, 0.69))
    m_shaft = _poly_mask(S, shaft)
    _paint_shaded(canvas, m_shaft, colour, cx, cy, L / 2, 0.25)
    # thread: darker bands across the shaft (never as dark as the tray, so the part stays whole)
    xs, ys = np.nonzero(m_shaft)[1], np.nonzero(m_shaft)[0]
    along = (xs - head[0]) * u[0] + (ys - head[1]) * u[1]
    band = (np.mod(along, 0.022 * S) < 0.008 * S) & (along > 0.06 * S)
    canvas[ys[band], xs[band]] *= 0.82
    r_head = 0.046 * S
    m_head = _circle_mask(S, head[0], head[1], r_head)
    _paint_shaded(canvas, m_head, tuple(v * 1.08 for v in colour), head[0], head[1], r_head, 0.35)
    slot = np.zeros((S, S), np.uint8)
    a, b = head - n * r_head * 0.7, head + n * r_head * 0.7
    cv2.line(slot, tuple(int(v) for v in np.round(a)), tuple(int(v) for v in np.round(b)), 1, max(1, int(0.008 * S)))
    slot_b = slot.astype(bool) & m_head
    canvas[slot_b] *= 0.72
    return m_shaft | m_head


def _draw_screw_long(canvas: np.ndarray, p: Part, S: int, rng: np.random.Generator) -> np.ndarray:
    return _screw(canvas, p, S, 0.40)


def _draw_screw_short(canvas: np.ndarray, p: Part, S: int, rng: np.random.Generator) -> np.ndarray:
    return _screw(canvas, p, S, 0.20)


def _fruit(canvas: np.ndarray, p: Part, S: int, rng: np.random.Generator, r: float, colour: Colour,
           dimples: int, blush: Colour | None) -> np.ndarray:
    cx, cy, R = p.cx * S, p.cy * S, r * S
    m = _circle_mask(S, cx, cy, R)
    _paint_shaded(canvas, m, tuple(v * p.gain for v in colour), cx, cy, R, 0.30)
    ys, xs = np.nonzero(m)
    if blush is not None:  # a reddish side, direction set by the part's rotation
        d = ((xs - cx) * math.cos(math.radians(p.angle)) + (ys - cy) * math.sin(math.radians(p.angle))) / R
        t = np.clip(d, 0.0, 1.0)[:, None] * 0.7
        canvas[ys, xs] = canvas[ys, xs] * (1 - t) + np.asarray(blush, np.float32) * t
    for _ in range(dimples):  # peel pores
        a, rr = rng.uniform(0, 2 * math.pi), R * math.sqrt(rng.uniform(0, 0.85))
        cv2.circle(canvas, (int(cx + rr * math.cos(a)), int(cy + rr * math.sin(a))), max(1, int(0.004 * S)),
                   tuple(float(v) * 0.88 for v in colour), -1)
    return m


def _draw_orange(canvas: np.ndarray, p: Part, S: int, rng: np.random.Generator) -> np.ndarray:
    return _fruit(canvas, p, S, rng, 0.085, (0.96, 0.55, 0.10), 60, None)


def _draw_peach(canvas: np.ndarray, p: Part, S: int, rng: np.random.Generator) -> np.ndarray:
    return _fruit(canvas, p, S, rng, 0.092, (0.95, 0.72, 0.50), 0, (0.86, 0.36, 0.30))


def _draw_lime(canvas: np.ndarray, p: Part, S: int, rng: np.random.Generator) -> np.ndarray:
    return _fruit(canvas, p, S, rng, 0.080, (0.55, 0.76, 0.20), 50, None)


def _textured_patch(canvas: np.ndarray, p: Part, S: int, rng: np.random.Generator, base: Colour,
                    pieces: list[tuple[Colour, float, float, int]]) -> np.ndarray:
    """A rounded-rectangle heap (base colour) with many small ellipses on top.
    pieces: (colour, long half-axis, short half-axis, count), half-axes as fractions of S."""
    cx, cy = p.cx * S, p.cy * S
    m = _poly_mask(S, _rounded_rect(cx, cy, 0.27 * S, 0.23 * S, 0.05 * S, p.angle))
    _paint_shaded(canvas, m, tuple(v * p.gain for v in base), cx, cy, 0.14 * S, 0.2)
    layer = canvas.copy()
    for colour, a, b, count in pieces:
        for _ in range(count):
            x, y = cx + rng.uniform(-0.14, 0.14) * S, cy + rng.uniform(-0.12, 0.12) * S
            g = rng.uniform(0.9, 1.1) * p.gain
            cv2.ellipse(layer, (int(x), int(y)), (max(1, int(a * S)), max(1, int(b * S))), float(rng.uniform(0, 180)),
                        0, 360, tuple(float(v) * g for v in colour), -1)
    canvas[m] = np.clip(layer[m], 0.0, 1.0)  # pieces are clipped to the heap's outline
    return m


def _draw_cereal(canvas: np.ndarray, p: Part, S: int, rng: np.random.Generator) -> np.ndarray:
    return _textured_patch(canvas, p, S, rng, (0.74, 0.52, 0.26),
                           [((0.88, 0.70, 0.40), 0.012, 0.008, 160), ((0.62, 0.42, 0.18), 0.010, 0.007, 90)])


def _draw_nut_mix(canvas: np.ndarray, p: Part, S: int, rng: np.random.Generator) -> np.ndarray:
    return _textured_patch(canvas, p, S, rng, (0.50, 0.34, 0.20),
                           [((0.62, 0.40, 0.22), 0.022, 0.012, 35), ((0.97, 0.90, 0.60), 0.016, 0.016, 25)])


DRAWERS: dict[str, Callable[[np.ndarray, Part, int, np.random.Generator], np.ndarray]] = {
    "washer": _draw_washer,
    "nut": _draw_nut,
    "screw_long": _draw_screw_long,
    "screw_short": _draw_screw_short,
    "orange": _draw_orange,
    "peach": _draw_peach,
    "lime": _draw_lime,
    "cereal": _draw_cereal,
    "nut_mix": _draw_nut_mix,
}


@dataclass(frozen=True)
class ProductSpec:
    """A product: background colour, nominal parts (kind, cx, cy, angle), which kinds may be
    added/moved (small ones), what each kind is swapped for in `wrong_part`, and the colours of
    scratches and contamination on it."""

    background: Colour
    parts: tuple[tuple[str, float, float, float], ...]
    movable: tuple[str, ...]
    wrong_part: dict[str, str]
    scratch_colour: Colour
    dirt_colour: Colour


PRODUCT_SPECS: dict[str, ProductSpec] = {
    "screw_tray": ProductSpec(
        background=(0.22, 0.26, 0.32),
        parts=(
            ("washer", 0.20, 0.20, 0.0), ("washer", 0.42, 0.20, 0.0),
            ("nut", 0.20, 0.46, 0.0), ("nut", 0.42, 0.46, 15.0),
            ("screw_long", 0.46, 0.78, 0.0), ("screw_short", 0.76, 0.34, 90.0),
        ),
        movable=("washer", "nut", "screw_short"),
        wrong_part={"washer": "nut", "nut": "washer", "screw_long": "screw_short", "screw_short": "screw_long"},
        scratch_colour=(0.98, 0.97, 0.92),
        dirt_colour=(0.08, 0.07, 0.05),
    ),
    "breakfast_box": ProductSpec(
        background=(0.90, 0.89, 0.85),
        parts=(
            ("orange", 0.17, 0.20, 0.0), ("orange", 0.17, 0.46, 0.0), ("peach", 0.19, 0.77, 0.0),
            ("cereal", 0.74, 0.25, 0.0), ("nut_mix", 0.74, 0.72, 0.0),
        ),
        movable=("orange", "peach"),
        wrong_part={"orange": "lime", "peach": "orange", "cereal": "nut_mix", "nut_mix": "cereal"},
        scratch_colour=(0.30, 0.16, 0.08),
        dirt_colour=(0.20, 0.45, 0.60),
    ),
}

PRODUCTS: tuple[str, ...] = tuple(PRODUCT_SPECS)


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


def _footprint(p: Part, S: int) -> np.ndarray:
    """The part's bool (S, S) footprint, drawn on a scratch canvas (texture rng unused)."""
    scratch = np.zeros((S, S, 3), np.float32)
    return DRAWERS[p.kind](scratch, p, S, np.random.default_rng(p.seed))


def _find_free_spot(
    rng: np.random.Generator, p: Part, occupied: np.ndarray, S: int, free_angle: bool, tries: int = 300
) -> Part | None:
    """Move `p` to a random centre where its footprint keeps a clearance from `occupied`
    (bool (S, S)) and from the image border; None if no such spot is found."""
    gap = int(0.045 * S)
    blocked = cv2.dilate(occupied.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * gap + 1,) * 2))
    border = int(0.07 * S)
    blocked[:border] = 1
    blocked[-border:] = 1
    blocked[:, :border] = 1
    blocked[:, -border:] = 1
    blocked_b = blocked.astype(bool)
    fy, fx = np.nonzero(_footprint(p, S))  # translating these pixels is far cheaper than redrawing
    for _ in range(tries):
        q = replace(p, cx=float(rng.uniform(0.1, 0.9)), cy=float(rng.uniform(0.1, 0.9)),
                    angle=float(rng.uniform(0, 180)) if free_angle else p.angle)
        if free_angle:
            base = replace(q, cx=p.cx, cy=p.cy)
            fy, fx = np.nonzero(_footprint(base, S))
        ys = fy + int(round((q.cy - p.cy) * S))
        xs = fx + int(round((q.cx - p.cx) * S))
        if ys.min() < 0 or xs.min() < 0 or ys.max() >= S or xs.max() >= S:
            continue
        if not blocked_b[ys, xs].any():
            return q
    return None


def _to_output(img_ss: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(img_ss, (size, size), interpolation=cv2.INTER_AREA)


def _mask_to_output(m_ss: np.ndarray, size: int, min_cover: float = 0.5) -> np.ndarray:
    """Downsample a bool supersampled mask; a pixel is in when >= min_cover of it is."""
    return _to_output(m_ss.astype(np.float32), size) >= min_cover


def render(
    product: str, rng: np.random.Generator, anomaly: str | None = None, size: int = 256
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Render one frame of `product`.

    The random draws for the good scene (jitter, lighting, textures, sensor noise) come first
    and do not depend on `anomaly`, so two Generators in the same state give the same scene
    with and without the anomaly: pixels outside the ground truth agree (up to anti-aliased
    edges), which the tests use.

    Returns:
      image:   uint8 (size, size, 3) RGB.
      gt_mask: bool (size, size); all False for a good frame.
      info:    {"product", "anomaly" (None for good), "category" ("good" | "logical_anomalies" |
               "structural_anomalies"), "part" (affected kind or None), "n_parts" (parts present),
               "parts": [{"kind", "cx", "cy", "angle"}] (fractions of the image side)}.
    """
    if product not in PRODUCT_SPECS:
        raise ValueError(f"unknown product {product!r}; known: {PRODUCTS}")
    if anomaly is not None and anomaly not in ANOMALIES:
        raise ValueError(f"unknown anomaly {anomaly!r}; known: {ANOMALIES}")
    spec = PRODUCT_SPECS[product]
    S = size * SUPERSAMPLE

    # ---- the good scene: every draw here happens whatever `anomaly` is ----
    parts = [
        Part(kind, cx + float(rng.normal(0, 0.008)), cy + float(rng.normal(0, 0.008)),
             angle + float(rng.normal(0, 4.0)), float(rng.uniform(0.95, 1.05)), int(rng.integers(2**31)))
        for kind, cx, cy, angle in spec.parts
    ]
    gain = float(rng.uniform(0.95, 1.05))
    grad_dir = float(rng.uniform(0, 2 * math.pi))
    grad_amp = float(rng.uniform(0.0, 0.04))
    bg_jitter = rng.normal(0, 0.01, 3)
    noise_seed = int(rng.integers(2**31))
    anomaly_rng = np.random.default_rng(int(rng.integers(2**31)))

    gt_ss = np.zeros((S, S), bool)
    affected: str | None = None

    # ---- logical anomalies edit the part list before drawing ----
    if anomaly in LOGICAL_ANOMALIES:
        foot = [_footprint(p, S) for p in parts]
        if anomaly == "missing":
            i = int(anomaly_rng.integers(len(parts)))
            affected = parts[i].kind
            gt_ss |= foot[i]
            del parts[i]
        elif anomaly == "wrong_part":
            i = int(anomaly_rng.integers(len(parts)))
            affected = parts[i].kind
            parts[i] = replace(parts[i], kind=spec.wrong_part[parts[i].kind])
            gt_ss |= foot[i] | _footprint(parts[i], S)
        else:  # extra / wrong_place: a movable part goes to a free spot
            occupied = np.logical_or.reduce(foot)
            candidates = [i for i, p in enumerate(parts) if p.kind in spec.movable]
            order = anomaly_rng.permutation(len(candidates))
            for j in order:
                i = candidates[int(j)]
                src = parts[i]
                if anomaly == "extra":
                    src = replace(src, seed=int(anomaly_rng.integers(2**31)))
                q = _find_free_spot(anomaly_rng, src, occupied, S, free_angle=src.kind.startswith("screw"))
                if q is not None:
                    break
            else:  # the layouts leave room, so this means a layout was edited badly
                raise RuntimeError(f"no free spot for {anomaly} in {product}")
            affected = q.kind
            gt_ss |= _footprint(q, S)
            if anomaly == "extra":
                parts.append(q)
            else:
                gt_ss |= foot[i]
                parts[i] = q

    # ---- draw ----
    bg = np.clip(np.asarray(spec.background) + bg_jitter, 0, 1).astype(np.float32)
    canvas = np.empty((S, S, 3), np.float32)
    canvas[:] = bg
    foot = []
    for p in parts:
        foot.append(DRAWERS[p.kind](canvas, p, S, np.random.default_rng(p.seed)))

    # ---- structural anomalies paint over one part ----
    if anomaly in STRUCTURAL_ANOMALIES:
        i = int(anomaly_rng.integers(len(parts)))
        p, m = parts[i], foot[i]
        affected = p.kind
        ys, xs = np.nonzero(m)
        cx, cy = float(xs.mean()), float(ys.mean())
        extent = float(np.sqrt(m.sum() / math.pi))  # radius of a disc of the same area
        if anomaly == "scratch":
            a = anomaly_rng.uniform(0, math.pi)
            half = extent * anomaly_rng.uniform(0.7, 1.0)
            d = np.array([math.cos(a), math.sin(a)]) * half
            line = np.zeros((S, S), np.uint8)
            p0, p1 = np.round([cx - d[0], cy - d[1]]).astype(int), np.round([cx + d[0], cy + d[1]]).astype(int)
            cv2.line(line, tuple(int(v) for v in p0), tuple(int(v) for v in p1), 1, max(2, int(0.008 * S)))
            region = line.astype(bool) & m
            canvas[region] = spec.scratch_colour
        elif anomaly == "chip":
            # bite centred on a boundary pixel of the part: background shows through
            edge = m & ~cv2.erode(m.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            ey, ex = np.nonzero(edge)
            k = int(anomaly_rng.integers(len(ey)))
            r = extent * anomaly_rng.uniform(0.30, 0.40)
            region = _circle_mask(S, ex[k], ey[k], r) & m
            # a chip bites, it does not cut a thin part (screw shaft, ring) in two
            # (checked on the part eroded by ~2 output pixels: a hair-thin bridge does not count)
            k_erode = np.ones((4 * SUPERSAMPLE + 1,) * 2, np.uint8)
            while cv2.connectedComponents(cv2.erode((m & ~region).astype(np.uint8), k_erode))[0] > 2 and r > 2:
                r *= 0.75
                region = _circle_mask(S, ex[k], ey[k], r) & m
            canvas[region] = bg
        else:  # contamination: an irregular blob inside the part
            k = int(anomaly_rng.integers(len(ys)))
            r = extent * anomaly_rng.uniform(0.18, 0.28)
            ang = np.linspace(0, 2 * math.pi, 12, endpoint=False)
            rad = r * anomaly_rng.uniform(0.6, 1.2, len(ang))
            blob = _poly_mask(S, np.stack([xs[k] + rad * np.cos(ang), ys[k] + rad * np.sin(ang)], 1))
            region = blob
            canvas[region] = spec.dirt_colour
        gt_ss |= region

    # ---- camera: lighting gradient, gain, downsample, sensor noise ----
    xs_g, ys_g = _grid(S)
    ramp = ((xs_g - S / 2) * math.cos(grad_dir) + (ys_g - S / 2) * math.sin(grad_dir)) / (S / 2)
    canvas *= (gain * (1.0 + grad_amp * ramp))[:, :, None]
    img = _to_output(canvas, size)
    img += np.random.default_rng(noise_seed).normal(0, 0.012, img.shape).astype(np.float32)
    image = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)

    # thin structural defects (scratches) keep any pixel they touch noticeably
    gt = _mask_to_output(gt_ss, size, 0.25 if anomaly in STRUCTURAL_ANOMALIES else 0.5)
    category = ("good" if anomaly is None else
                "logical_anomalies" if anomaly in LOGICAL_ANOMALIES else "structural_anomalies")
    info = {
        "product": product,
        "anomaly": anomaly,
        "category": category,
        "part": affected,
        "n_parts": len(parts),
        "parts": [{"kind": p.kind, "cx": p.cx, "cy": p.cy, "angle": p.angle} for p in parts],
    }
    return image, gt, info


# --------------------------------------------------------------------------------------
# Dataset on disk (MVTec LOCO AD layout)
# --------------------------------------------------------------------------------------

_SPLIT_IDS = {"train": 0, "validation": 1, "test_good": 2, "test_logical": 3, "test_structural": 4}


def defects_config(product: str) -> list[dict[str, Any]]:
    """LOCO-style defect list. Every ground-truth PNG here uses pixel value 255, so
    `pixel_value` does not tell defects apart; manifest.json names each test image's defect
    (`defect_name` = "<anomaly>"), which an evaluator uses to pick the entry.
    Saturation: logical defects saturate at half the marked region, structural at all of it."""
    out = []
    for a in ANOMALIES:
        logical = a in LOGICAL_ANOMALIES
        out.append({"defect_name": a, "pixel_value": 255,
                    "saturation_threshold": 0.5 if logical else 1.0, "relative_saturation": True})
    return out


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), array, [cv2.IMWRITE_PNG_COMPRESSION, 3]):
        raise OSError(f"could not write {path}")


def generate_dataset(
    root: Path,
    product: str,
    seed: int,
    n_train: int = 60,
    n_val: int = 10,
    n_test_good: int = 20,
    n_test_logical: int = 20,
    n_test_structural: int = 15,
    size: int = 256,
    progress: bool = False,
) -> Path:
    """Write `<root>/<product>/` in the MVTec LOCO AD layout and return that directory:

      train/good/000.png, validation/good/000.png, test/good/000.png,
      test/logical_anomalies/000.png, test/structural_anomalies/000.png,
      ground_truth/{logical,structural}_anomalies/000/000.png (uint8, 0 or 255),
      defects_config.json, manifest.json.

    Anomaly kinds cycle through LOGICAL_ANOMALIES / STRUCTURAL_ANOMALIES in index order, so
    every kind appears once there are enough images. manifest.json holds {"product", "seed",
    "size", "counts", "images": {"test/<category>/000.png": {"anomaly", "defect_name", "part",
    "n_parts"}}}. Image i of a split uses np.random.default_rng([seed, split, i]): output is
    bit-identical for a fixed seed and an image does not change when other counts change.
    """
    root = Path(root)
    out = root / product
    jobs: list[tuple[str, str, int, str | None]] = []  # (split key, relative path, index, anomaly)
    for i in range(n_train):
        jobs.append(("train", f"train/good/{i:03d}.png", i, None))
    for i in range(n_val):
        jobs.append(("validation", f"validation/good/{i:03d}.png", i, None))
    for i in range(n_test_good):
        jobs.append(("test_good", f"test/good/{i:03d}.png", i, None))
    for i in range(n_test_logical):
        jobs.append(("test_logical", f"test/logical_anomalies/{i:03d}.png", i,
                     LOGICAL_ANOMALIES[i % len(LOGICAL_ANOMALIES)]))
    for i in range(n_test_structural):
        jobs.append(("test_structural", f"test/structural_anomalies/{i:03d}.png", i,
                     STRUCTURAL_ANOMALIES[i % len(STRUCTURAL_ANOMALIES)]))

    iterator: Any = jobs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(jobs, desc=f"sim {product}")
    manifest: dict[str, Any] = {}
    for split, rel, i, anomaly in iterator:
        rng = np.random.default_rng([seed, _SPLIT_IDS[split], i])
        image, gt, info = render(product, rng, anomaly, size=size)
        _write_png(out / rel, image)
        if anomaly is not None:
            category = info["category"]
            _write_png(out / "ground_truth" / category / f"{i:03d}" / "000.png", gt.astype(np.uint8) * 255)
        if split.startswith("test"):
            manifest[rel] = {"anomaly": anomaly, "defect_name": anomaly, "part": info["part"],
                             "n_parts": info["n_parts"]}

    (out / "defects_config.json").write_text(json.dumps(defects_config(product), indent=2) + "\n")
    counts = {"train": n_train, "validation": n_val, "test_good": n_test_good,
              "test_logical": n_test_logical, "test_structural": n_test_structural}
    (out / "manifest.json").write_text(json.dumps(
        {"product": product, "seed": seed, "size": size, "counts": counts, "images": manifest},
        indent=2, sort_keys=True) + "\n")
    return out
