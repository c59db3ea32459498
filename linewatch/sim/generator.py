"""A synthetic production line: top-down images of five products with logical and structural
anomalies and pixel ground truth, written in the MVTec LOCO AD layout.

Honest note: these images are drawn shapes (rings, hexagons, rounded rectangles, letter-like
strokes, flat polygons, heaps of drawn grains) on a plain tray, with small random jitter in
position, rotation, colour and brightness plus sensor noise. They exist so the tests, the demo
and the evaluation harness can run end to end without a dataset download. Scores measured on
them say that the pipeline is wired correctly and how it behaves on these drawn cases; they are
NOT a benchmark of real-world accuracy.

Products and their good content. PRODUCTS (the names older code iterates) are the first two;
SHAPE_PRODUCTS the next two; ALL_PRODUCTS those four, what `linewatch sim generate` writes by
default; IDENTITY_PRODUCTS (char_tray) only by name (`--product char_tray`); KNOWN_PRODUCTS all five.
  screw_tray:    2 washers, 2 nuts, 1 long screw, 1 short screw (6 parts) on a dark tray.
  breakfast_box: 2 oranges, 1 peach, 1 cereal patch, 1 nut mix (5 parts) in a white box.
  glyph_tray:    9 letter-like parts F R J / L P 4 / 7 2 K in a 3 x 3 grid, thick strokes all of
                 one blue, on a light grey tray. Each glyph is scaled to the same area.
  bracket_kit:   flat plates on a green board: an L-bracket, a T-piece and a step plate (steel),
                 an arrow and a right trapezoid (brass), all of one area, and a heap of rice
                 (long light grains on a darker base).
  char_tray:     9 handwritten characters F R J / L P 4 / 7 2 K in a 3 x 3 grid, dark blue ink
                 on a cream tray. Unlike glyph_tray, no two good parts are drawn alike: each is
                 written by one of four "writers" (the printed strokes or another construction of
                 the character, with sharp or rounded corners) with its own slant, width, stroke
                 width, size, height of the middle bars, a small turn and a wobble along the
                 strokes. The part's identity (which character sits in the slot) is what is good.

Anomalies, each with a ground-truth mask of the affected pixels. Each product has its own list
(ProductSpec.logical / .structural, product_anomalies(product)):
  screw_tray, breakfast_box (LOGICAL_ANOMALIES + STRUCTURAL_ANOMALIES = ANOMALIES):
    logical:  missing     a part is absent; mask = where it should be.
              extra       one more of a (small) part at a free spot; mask = the extra part.
              wrong_place a part moved to a free spot; mask = old and new location.
              wrong_part  a part replaced by another kind (washer -> nut, orange -> lime, ...);
                          mask = union of the old and the new part's footprint.
  glyph_tray, bracket_kit, char_tray: shape-only logical anomalies (SHAPE_ANOMALIES). The changed part keeps
  its place, colour and amount of material (area within a few per cent); only its outline, or
  for the heap its grain, differs. Mask = union of the old and the new footprints.
              wrong_shape   a part replaced by another shape of its colour and area (glyph F -> h,
                            L -> Z, ...; L-bracket -> U-channel, arrow -> chevron, ...; on
                            char_tray another character written with the same hand: F -> E, ...).
              mirrored      a part flipped left-right in place (kinds that are not symmetric).
              swapped       two different parts of one colour exchange places; mask = both places.
              rotated       a part turned by 90 degrees in place (kinds where orientation shows).
              wrong_texture (bracket_kit) the rice heap replaced by millet: same outline, base,
                            grain colours and grain cover, so nearly the same mean colour and
                            colour spread, but small round grains, about twice as many.
  every product (STRUCTURAL_ANOMALIES):
    structural: scratch       a thin line of a foreign colour across a part; mask = the line.
                chip          a bite out of a part's edge (background shows); mask = the bite.
                contamination a foreign-coloured blob on a part; mask = the blob.

For the docs: glyph_tray and bracket_kit test what colour statistics cannot see. Their logical
anomalies change a part's outline but not its colour or size: a glyph replaced by another glyph
of the same area, a part mirrored, turned by a quarter, or two parts of one colour trading
places; on bracket_kit also a rice heap replaced by millet of nearly the same mean colour (the
case of a cereal patch lying where the nut mix belongs on breakfast_box). A detector that
compares parts only by colour and size can hardly tell these frames from good ones; the
products are there to measure whether one that also looks at shape and texture can. They are
drawn strokes, polygons and ellipse grains, so a score on them checks that ability on clean
drawings; it is not a measure of accuracy on real parts.

All randomness comes from the numpy Generator given to `render`; `generate_dataset` seeds one
Generator per image from (seed, split, index), so files are bit-identical for a fixed seed.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

SUPERSAMPLE = 2  # draw at 2x and area-downsample: smooth edges without cv2's uint8-only AA

# The anomalies of the original products (PRODUCTS: screw_tray, breakfast_box), under the names
# every importer uses. Each product lists its own in ProductSpec.logical / .structural
# (product_anomalies); the shape products (SHAPE_PRODUCTS) use SHAPE_ANOMALIES instead.
LOGICAL_ANOMALIES = ("missing", "extra", "wrong_place", "wrong_part")
STRUCTURAL_ANOMALIES = ("scratch", "chip", "contamination")
ANOMALIES = LOGICAL_ANOMALIES + STRUCTURAL_ANOMALIES
SHAPE_ANOMALIES = ("wrong_shape", "mirrored", "swapped", "rotated", "wrong_texture")
ALL_ANOMALIES = ANOMALIES + SHAPE_ANOMALIES

Colour = tuple[float, float, float]


# --------------------------------------------------------------------------------------
# Part drawing. Every kind of part has a Drawer: its outline is the part's footprint, a bool
# (S, S) mask; its paint colours `canvas` (S, S, 3) float32 RGB in [0, 1] inside it. Sizes
# are fractions of the image side.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One part instance: kind, centre (fractions of the image side), rotation (degrees),
    a per-part colour gain, a seed for its texture, and whether it lies mirrored (flipped
    left-right in its own frame, before the rotation; only glyphs and polygons use it)."""

    kind: str
    cx: float
    cy: float
    angle: float
    gain: float
    seed: int
    mirror: bool = False


def _plain_canvas(S: int, colour: np.ndarray) -> np.ndarray:
    """A float32 (S, S, 3) canvas of one colour (float32 (3,)), filled a channel at a time
    (several times faster than numpy broadcasting the 3-vector over every pixel)."""
    canvas = np.empty((S, S, 3), np.float32)
    for c in range(3):
        canvas[:, :, c] = colour[c]
    return canvas


def _light_gain(S: int, gain: float, direction: float, amplitude: float) -> np.ndarray:
    """Float32 (S, S): the camera's gain times a linear lighting ramp, 1 -/+ `amplitude` at the
    frame's edges along `direction` (radians), 1 at its centre."""
    coord = np.arange(S, dtype=np.float32) - S / 2
    light = coord[None, :] * math.cos(direction) + coord[:, None] * math.sin(direction)
    light /= S / 2  # in place, in the order of gain * (1 + amplitude * ramp)
    light *= amplitude
    light += 1.0
    light *= gain
    return light


def _box(mask: np.ndarray) -> tuple[slice, slice]:
    """The (rows, columns) slices of the bounding box of a bool mask's True pixels (empty if none)."""
    x, y, w, h = cv2.boundingRect(mask.view(np.uint8))
    return slice(y, y + h), slice(x, x + w)


def _grown(box: tuple[slice, slice], margin: int, S: int) -> tuple[slice, slice]:
    """The box grown by `margin` pixels on every side, within the (S, S) frame."""
    rows, cols = box
    return (slice(max(0, rows.start - margin), min(S, rows.stop + margin)),
            slice(max(0, cols.start - margin), min(S, cols.stop + margin)))


def _pixels(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.nonzero(mask), the same arrays in the same order, searched in the bounding box only."""
    rows, cols = _box(mask)
    ys, xs = np.nonzero(mask[rows, cols])
    return ys + rows.start, xs + cols.start


def _paint_shaded(
    canvas: np.ndarray, mask: np.ndarray, colour: Colour, cx: float, cy: float, r: float, strength: float
) -> None:
    """Fill `mask` with `colour` lit from the top-left: brighter near (cx - r/3, cy - r/3)."""
    ys, xs = _pixels(mask)
    if len(ys) == 0:
        return
    d = np.hypot(xs - (cx - 0.33 * r), ys - (cy - 0.33 * r)) / (1.4 * r)
    f = (1.0 + strength * 0.5) - strength * np.clip(d, 0.0, 1.0)
    canvas[ys, xs] = np.clip(np.asarray(colour, np.float32)[None, :] * f[:, None], 0.0, 1.0)


def _blank_box(S: int, x0: int, y0: int, x1: int, y1: int) -> tuple[tuple[slice, slice], np.ndarray]:
    """The frame's box x0 <= x < x1, y0 <= y < y1 (cut to the (S, S) frame) as (rows, columns),
    and a blank uint8 image of it to draw one shape in, at coordinates less the box's corner.

    cv2 rasterises a shape that lies whole in an image the same wherever it lies (one cut by
    the image's border, differently), so a shape drawn in a box that holds all of it, or is cut
    only where the frame cuts it, gets the pixels it would get in the whole frame, at the cost
    of the box."""
    rows = slice(min(max(y0, 0), S), min(max(y1, y0, 0), S))
    cols = slice(min(max(x0, 0), S), min(max(x1, x0, 0), S))
    return (rows, cols), np.zeros((rows.stop - rows.start, cols.stop - cols.start), np.uint8)


def _in_frame(S: int, box: tuple[slice, slice], pixels: np.ndarray) -> np.ndarray:
    """Bool (S, S): `pixels` at `box`, False elsewhere."""
    m = np.zeros((S, S), bool)
    m[box] = pixels
    return m


def _circle_mask(S: int, cx: float, cy: float, r: float) -> np.ndarray:
    x, y, radius = int(round(cx)), int(round(cy)), max(1, int(round(r)))
    (rows, cols), pixels = _blank_box(S, x - radius - 2, y - radius - 2, x + radius + 3, y + radius + 3)
    if pixels.size:
        cv2.circle(pixels, (x - cols.start, y - rows.start), radius, 1, -1)
    return _in_frame(S, (rows, cols), pixels.astype(bool))


def _poly_mask(S: int, pts: np.ndarray) -> np.ndarray:
    corners = np.round(pts).astype(np.int32)
    (x0, y0), (x1, y1) = (corners.min(0) - 2).tolist(), (corners.max(0) + 3).tolist()
    (rows, cols), pixels = _blank_box(S, x0, y0, x1, y1)
    if pixels.size:
        cv2.fillPoly(pixels, [corners - np.array([cols.start, rows.start], np.int32)], 1)
    return _in_frame(S, (rows, cols), pixels.astype(bool))


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


class Drawer:
    """How one kind of part is drawn: `outline` is its footprint, a bool (S, S) mask; `paint`
    colours the canvas inside it. Both take the part's own Generator, the outline's draws
    first. Calling a drawer does both and returns the footprint; the outline alone is the
    footprint without the cost of the paint (`_footprint`)."""

    def outline(self, p: Part, S: int, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def paint(self, canvas: np.ndarray, p: Part, S: int, rng: np.random.Generator, m: np.ndarray) -> None:
        raise NotImplementedError

    def __call__(self, canvas: np.ndarray, p: Part, S: int, rng: np.random.Generator) -> np.ndarray:
        m = self.outline(p, S, rng)
        self.paint(canvas, p, S, rng, m)
        return m


class Washer(Drawer):
    """A flat ring."""

    def outline(self, p: Part, S: int, rng: np.random.Generator) -> np.ndarray:
        cx, cy = p.cx * S, p.cy * S
        return _circle_mask(S, cx, cy, 0.072 * S) & ~_circle_mask(S, cx, cy, 0.034 * S)

    def paint(self, canvas: np.ndarray, p: Part, S: int, rng: np.random.Generator, m: np.ndarray) -> None:
        colour = tuple(v * p.gain for v in (0.76, 0.77, 0.80))
        _paint_shaded(canvas, m, colour, p.cx * S, p.cy * S, 0.072 * S, 0.35)


@dataclass(frozen=True)
class HexNut(Drawer):
    """A hexagon with a round hole."""

    colour: Colour

    def outline(self, p: Part, S: int, rng: np.random.Generator) -> np.ndarray:
        cx, cy, R = p.cx * S, p.cy * S, 0.068 * S
        a = np.radians(p.angle + np.arange(6) * 60.0)
        hexagon = _poly_mask(S, np.stack([cx + R * np.cos(a), cy + R * np.sin(a)], 1))
        return hexagon & ~_circle_mask(S, cx, cy, 0.030 * S)

    def paint(self, canvas: np.ndarray, p: Part, S: int, rng: np.random.Generator, m: np.ndarray) -> None:
        _paint_shaded(canvas, m, tuple(v * p.gain for v in self.colour), p.cx * S, p.cy * S, 0.068 * S, 0.30)


@dataclass(frozen=True)
class Screw(Drawer):
    """A screw lying flat: round head at one end, threaded shaft with a pointed tip."""

    length: float

    def _shape(self, p: Part, S: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
        """The head's centre, the unit vectors along and across the screw, the shaft's polygon
        (5, 2) and the head's radius, in pixels."""
        cx, cy, L, w = p.cx * S, p.cy * S, self.length * S, 0.036 * S
        u = np.array([math.cos(math.radians(p.angle)), math.sin(math.radians(p.angle))])
        n = np.array([-u[1], u[0]])
        c = np.array([cx, cy])
        head, tip = c - u * L / 2, c + u * L / 2
        shaft_end = tip - u * w
        shaft = np.stack([head + n * w / 2, shaft_end + n * w / 2, tip, shaft_end - n * w / 2, head - n * w / 2])
        return head, u, n, shaft, 0.046 * S

    def outline(self, p: Part, S: int, rng: np.random.Generator) -> np.ndarray:
        head, _, _, shaft, r_head = self._shape(p, S)
        return _poly_mask(S, shaft) | _circle_mask(S, head[0], head[1], r_head)

    def paint(self, canvas: np.ndarray, p: Part, S: int, rng: np.random.Generator, m: np.ndarray) -> None:
        head, u, n, shaft, r_head = self._shape(p, S)
        colour = tuple(v * p.gain for v in (0.62, 0.64, 0.69))
        m_shaft = _poly_mask(S, shaft)
        _paint_shaded(canvas, m_shaft, colour, p.cx * S, p.cy * S, self.length * S / 2, 0.25)
        # thread: darker bands across the shaft (never as dark as the tray, so the part stays whole)
        ys, xs = _pixels(m_shaft)
        along = (xs - head[0]) * u[0] + (ys - head[1]) * u[1]
        band = (np.mod(along, 0.022 * S) < 0.008 * S) & (along > 0.06 * S)
        canvas[ys[band], xs[band]] *= 0.82
        m_head = _circle_mask(S, head[0], head[1], r_head)
        _paint_shaded(canvas, m_head, tuple(v * 1.08 for v in colour), head[0], head[1], r_head, 0.35)
        ends = np.round([head - n * r_head * 0.7, head + n * r_head * 0.7]).astype(int)
        width = max(1, int(0.008 * S))
        (x0, y0), (x1, y1) = (ends.min(0) - width - 2).tolist(), (ends.max(0) + width + 3).tolist()
        box, slot = _blank_box(S, x0, y0, x1, y1)
        if slot.size:
            a, b = (ends - [box[1].start, box[0].start]).tolist()
            cv2.line(slot, tuple(a), tuple(b), 1, width)
            canvas[box][slot.astype(bool) & m_head[box]] *= 0.72


@dataclass(frozen=True)
class Fruit(Drawer):
    """A round fruit, shaded, with peel pores (`dimples` of them) or a blush on one side."""

    radius: float
    colour: Colour
    dimples: int
    blush: Colour | None

    def outline(self, p: Part, S: int, rng: np.random.Generator) -> np.ndarray:
        return _circle_mask(S, p.cx * S, p.cy * S, self.radius * S)

    def paint(self, canvas: np.ndarray, p: Part, S: int, rng: np.random.Generator, m: np.ndarray) -> None:
        cx, cy, R = p.cx * S, p.cy * S, self.radius * S
        _paint_shaded(canvas, m, tuple(v * p.gain for v in self.colour), cx, cy, R, 0.30)
        ys, xs = _pixels(m)
        if self.blush is not None:  # a reddish side, direction set by the part's rotation
            d = ((xs - cx) * math.cos(math.radians(p.angle)) + (ys - cy) * math.sin(math.radians(p.angle))) / R
            t = np.clip(d, 0.0, 1.0)[:, None] * 0.7
            canvas[ys, xs] = canvas[ys, xs] * (1 - t) + np.asarray(self.blush, np.float32) * t
        pore_colour = tuple(float(v) * 0.88 for v in self.colour)
        for a, u in rng.uniform((0.0, 0.0), (2 * math.pi, 0.85), (self.dimples, 2)).tolist():  # peel pores
            rr = R * math.sqrt(u)
            cv2.circle(canvas, (int(cx + rr * math.cos(a)), int(cy + rr * math.sin(a))), max(1, int(0.004 * S)),
                       pore_colour, -1)


@dataclass(frozen=True)
class TexturedPatch(Drawer):
    """A rounded-rectangle heap (base colour) with many small ellipses on top.
    pieces: (colour, long half-axis, short half-axis, count), half-axes as fractions of S."""

    base: Colour
    pieces: tuple[tuple[Colour, float, float, int], ...]

    def outline(self, p: Part, S: int, rng: np.random.Generator) -> np.ndarray:
        return _poly_mask(S, _rounded_rect(p.cx * S, p.cy * S, 0.27 * S, 0.23 * S, 0.05 * S, p.angle))

    def paint(self, canvas: np.ndarray, p: Part, S: int, rng: np.random.Generator, m: np.ndarray) -> None:
        cx, cy = p.cx * S, p.cy * S
        _paint_shaded(canvas, m, tuple(v * p.gain for v in self.base), cx, cy, 0.14 * S, 0.2)
        # Only the heap's pixels take the pieces: draw in its box grown by two pieces, so that every
        # piece reaching the heap lies whole in it (cv2 rasterises a piece cut by the border differently)
        reach = 2 * max(max(1, int(a * S)) for _, a, _, _ in self.pieces) + 2
        rows, cols = _grown(_box(m), reach, S)
        layer = canvas[rows, cols].copy()
        for colour, a, b, count in self.pieces:
            # per piece: x, y, gain, orientation (the draws in this order, piece after piece)
            draws = rng.uniform((-0.14, -0.12, 0.9, 0.0), (0.14, 0.12, 1.1, 180.0), (count, 4))
            xs = (cx + draws[:, 0] * S).astype(int) - cols.start
            ys = (cy + draws[:, 1] * S).astype(int) - rows.start
            tints = np.asarray(colour)[None, :] * (draws[:, 2:3] * p.gain)
            axes = (max(1, int(a * S)), max(1, int(b * S)))
            for x, y, orientation, tint in zip(xs.tolist(), ys.tolist(), draws[:, 3].tolist(), tints.tolist()):
                cv2.ellipse(layer, (x, y), axes, orientation, 0, 360, tint, -1)
        inside = m[rows, cols]
        canvas[rows, cols][inside] = np.clip(layer[inside], 0.0, 1.0)  # pieces are clipped to the heap's outline


# ---- glyphs (glyph_tray): letter-like shapes drawn as thick strokes -------------------------
# Strokes are polylines in a box 0.7 wide and 1 high centred at (0, 0), y down. Every glyph is
# scaled (_glyph_scale) so that its footprint has the same area, GLYPH_AREA of the image, at
# the same stroke width: a wrong shape differs in shape, not in colour or amount of material.


def _arc(cx: float, cy: float, rx: float, ry: float, a0: float, a1: float, n: int = 16) -> list[tuple[float, float]]:
    t = np.radians(np.linspace(a0, a1, n))
    return [(cx + rx * math.cos(v), cy + ry * math.sin(v)) for v in t]


Stroke = list[tuple[float, float]]
GLYPHS: dict[str, list[Stroke]] = {
    # on the tray: none of these is left-right symmetric or survives a quarter turn
    "F": [[(-0.3, 0.5), (-0.3, -0.5), (0.35, -0.5)], [(-0.3, -0.02), (0.2, -0.02)]],
    "R": [[(-0.3, 0.5), (-0.3, -0.5), (0.0, -0.5)] + _arc(0.0, -0.24, 0.26, 0.26, -90, 90) + [(-0.3, 0.02)],
          [(-0.02, 0.02), (0.35, 0.5)]],
    "J": [[(-0.15, -0.5), (0.35, -0.5)], [(0.2, -0.5)] + _arc(-0.075, 0.2, 0.275, 0.3, 0, 180)],
    "L": [[(-0.3, -0.5), (-0.3, 0.5), (0.35, 0.5), (0.35, 0.22)]],
    "P": [[(-0.3, 0.5), (-0.3, -0.5), (0.05, -0.5)] + _arc(0.05, -0.22, 0.28, 0.28, -90, 90) + [(-0.3, 0.06)]],
    "4": [[(0.15, 0.5), (0.15, -0.5), (-0.35, 0.2), (0.35, 0.2)]],
    "7": [[(-0.35, -0.5), (0.35, -0.5), (-0.12, 0.5)], [(-0.2, 0.0), (0.3, 0.0)]],
    "2": [_arc(0.0, -0.2, 0.32, 0.3, 200, 380) + [(-0.35, 0.5), (0.35, 0.5)]],
    "K": [[(-0.3, -0.5), (-0.3, 0.5)], [(0.33, -0.5), (-0.3, 0.08)], [(-0.08, -0.07), (0.35, 0.5)]],
    # spares, only as wrong shapes
    "E": [[(0.35, -0.5), (-0.3, -0.5), (-0.3, 0.5), (0.35, 0.5)], [(-0.3, 0.0), (0.2, 0.0)]],
    "S": [_arc(0.0, -0.25, 0.3, 0.25, -20, -270) + _arc(0.0, 0.25, 0.3, 0.25, -90, 150)],
    "Z": [[(-0.35, -0.5), (0.35, -0.5), (-0.35, 0.5), (0.35, 0.5)]],
    "C": [_arc(0.0, 0.0, 0.35, 0.5, -40, -320, 24)],
    "3": [_arc(0.0, -0.25, 0.3, 0.25, -160, 90) + _arc(0.0, 0.25, 0.3, 0.25, -90, 160)],
    "h": [[(-0.3, -0.5), (-0.3, 0.5)], [(-0.3, 0.0)] + _arc(0.0, 0.05, 0.3, 0.25, -180, 0, 12) + [(0.3, 0.5)]],
}
GLYPH_HEIGHT = 0.18  # nominal height (fraction of the side) before the area calibration
GLYPH_STROKE = 0.035  # stroke width, fraction of the side
GLYPH_AREA = 0.0145  # footprint area of every glyph, fraction of the image area
GLYPH_COLOUR: Colour = (0.16, 0.28, 0.60)

_SUBPIXEL = 4  # cv2 drawing `shift`: coordinates carry 4 fractional bits


def _fixed(pts: np.ndarray) -> np.ndarray:
    return np.round(pts * (1 << _SUBPIXEL)).astype(np.int32)


def _place(pts: np.ndarray, cx: float, cy: float, angle: float, mirror: bool) -> np.ndarray:
    """Points (K, 2) of a part's own frame -> image: mirror x, rotate by `angle` degrees, shift."""
    x = -pts[:, 0] if mirror else pts[:, 0]
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return np.stack([cx + c * x - s * pts[:, 1], cy + s * x + c * pts[:, 1]], 1)


def _stroke_box(lines: list[np.ndarray], S: int, width: int) -> tuple[tuple[slice, slice], np.ndarray]:
    """Polylines in fixed point (`_fixed`) drawn `width` wide in their own box of the (S, S)
    frame (`_blank_box`): the box (rows, columns) and its bool pixels."""
    corners = np.concatenate(lines) >> _SUBPIXEL
    (x0, y0), (x1, y1) = (corners.min(0) - width - 2).tolist(), (corners.max(0) + width + 3).tolist()
    (rows, cols), pixels = _blank_box(S, x0, y0, x1, y1)
    if pixels.size:
        origin = np.array([cols.start, rows.start], np.int32) << _SUBPIXEL
        cv2.polylines(pixels, [line - origin for line in lines], False, 1, width, cv2.LINE_8, _SUBPIXEL)
    return (rows, cols), pixels.astype(bool)


def _glyph_mask(name: str, S: int, cx: float, cy: float, scale: float, angle: float, mirror: bool) -> np.ndarray:
    h = GLYPH_HEIGHT * scale * S
    lines = [_fixed(_place(np.asarray(stroke, np.float64) * h, cx, cy, angle, mirror)) for stroke in GLYPHS[name]]
    return _in_frame(S, *_stroke_box(lines, S, max(1, int(round(GLYPH_STROKE * S)))))


@functools.cache
def _glyph_scale(name: str) -> float:
    """Scale of glyph `name` whose footprint covers GLYPH_AREA (fixed point on a 1024 grid)."""
    S, scale = 1024, 1.0
    for _ in range(4):
        scale *= GLYPH_AREA / (_glyph_mask(name, S, S / 2, S / 2, scale, 0.0, False).sum() / S**2)
    return scale


@dataclass(frozen=True)
class Glyph(Drawer):
    """Glyph `name` of GLYPHS, thick strokes of GLYPH_COLOUR covering GLYPH_AREA."""

    name: str

    def outline(self, p: Part, S: int, rng: np.random.Generator) -> np.ndarray:
        return _glyph_mask(self.name, S, p.cx * S, p.cy * S, _glyph_scale(self.name), p.angle, p.mirror)

    def paint(self, canvas: np.ndarray, p: Part, S: int, rng: np.random.Generator, m: np.ndarray) -> None:
        _paint_shaded(canvas, m, tuple(v * p.gain for v in GLYPH_COLOUR), p.cx * S, p.cy * S, 0.1 * S, 0.15)


# ---- flat polygons (bracket_kit): steel and brass plates of one area -----------------------
# Outlines in any unit; each is centred on its centroid and scaled to POLYGON_AREA.

POLYGON_COLOURS: dict[str, Colour] = {"steel": (0.70, 0.72, 0.76), "brass": (0.83, 0.66, 0.30)}
POLYGONS: dict[str, tuple[str, tuple[tuple[float, float], ...]]] = {
    # on the kit
    "l_bracket": ("steel", ((0, 0), (0.3, 0), (0.3, 0.7), (0.75, 0.7), (0.75, 1.0), (0, 1.0))),
    "t_piece": ("steel", ((0, 0), (1.0, 0), (1.0, 0.28), (0.64, 0.28), (0.64, 0.9), (0.36, 0.9), (0.36, 0.28),
                          (0, 0.28))),
    "step_plate": ("steel", ((0, 0), (0.55, 0), (0.55, 0.3), (1.0, 0.3), (1.0, 0.7), (0, 0.7))),
    "arrow": ("brass", ((0, 0.36), (0.6, 0.36), (0.6, 0.1), (1.0, 0.5), (0.6, 0.9), (0.6, 0.64), (0, 0.64))),
    "trapezoid": ("brass", ((0, 0), (0.45, 0), (1.0, 0.6), (0, 0.6))),
    # spares, only as wrong shapes
    "u_channel": ("steel", ((0, 0), (0.28, 0), (0.28, 0.62), (0.62, 0.62), (0.62, 0), (0.9, 0), (0.9, 0.9),
                            (0, 0.9))),
    "z_bracket": ("steel", ((0, 0), (0.6, 0), (0.6, 0.7), (0.9, 0.7), (0.9, 1.0), (0.3, 1.0), (0.3, 0.3),
                            (0, 0.3))),
    "chevron": ("brass", ((0, 0), (0.4, 0), (0.85, 0.45), (0.4, 0.9), (0, 0.9), (0.45, 0.45))),
    "cross": ("brass", ((0.33, 0), (0.67, 0), (0.67, 0.33), (1, 0.33), (1, 0.67), (0.67, 0.67), (0.67, 1),
                        (0.33, 1), (0.33, 0.67), (0, 0.67), (0, 0.33), (0.33, 0.33))),
}
POLYGON_AREA = 0.019  # fraction of the image area


@functools.cache
def _unit_polygon(name: str) -> np.ndarray:
    """Outline (K, 2) of polygon `name`, centroid at (0, 0), area POLYGON_AREA (side = 1)."""
    p = np.asarray(POLYGONS[name][1], np.float64)
    x, y, x1, y1 = p[:, 0], p[:, 1], np.roll(p[:, 0], -1), np.roll(p[:, 1], -1)
    cross = x * y1 - x1 * y
    area = cross.sum() / 2
    centroid = np.array([((x + x1) * cross).sum(), ((y + y1) * cross).sum()]) / (6 * area)
    return (p - centroid) * math.sqrt(POLYGON_AREA / abs(area))


@dataclass(frozen=True)
class Polygon(Drawer):
    """Flat plate `name` of POLYGONS in its metal's colour, POLYGON_AREA of the image."""

    name: str

    def outline(self, p: Part, S: int, rng: np.random.Generator) -> np.ndarray:
        corners = _fixed(_place(_unit_polygon(self.name) * S, p.cx * S, p.cy * S, p.angle, p.mirror))
        cells = corners >> _SUBPIXEL
        (rows, cols), pixels = _blank_box(S, *(cells.min(0) - 2).tolist(), *(cells.max(0) + 3).tolist())
        if pixels.size:
            origin = np.array([cols.start, rows.start], np.int32) << _SUBPIXEL
            cv2.fillPoly(pixels, [corners - origin], 1, cv2.LINE_8, _SUBPIXEL)
        return _in_frame(S, (rows, cols), pixels.astype(bool))

    def paint(self, canvas: np.ndarray, p: Part, S: int, rng: np.random.Generator, m: np.ndarray) -> None:
        colour = POLYGON_COLOURS[POLYGONS[self.name][0]]
        _paint_shaded(canvas, m, tuple(v * p.gain for v in colour), p.cx * S, p.cy * S, 0.12 * S, 0.2)


# ---- granular heaps (bracket_kit): many small grains of one colour family ------------------
# Both heaps share the outline, the base, the grain colours and the expected grain cover;
# only the grain differs (long thin rice, small round millet, about twice as many), so the
# heap's mean colour and colour spread hardly tell them apart.

GRANULAR_BASE: Colour = (0.60, 0.55, 0.42)
GRANULAR_TONES: tuple[Colour, Colour] = ((0.95, 0.93, 0.85), (0.86, 0.82, 0.68))
GRAIN_COVER = 0.6  # expected fraction of the heap under grains
HEAP_W, HEAP_H = 0.28, 0.24  # fractions of the side


@functools.cache
def _grain_area(a: float, b: float, S: int) -> float:
    """Mean drawn area (pixels) of one grain with half-axes a, b (fractions of S) on a side-S
    canvas, over orientations and sub-pixel offsets: small ellipses rasterise larger than
    pi*a*b, and not by the same factor for long and round grains."""
    axes = (int(round(a * S * (1 << _SUBPIXEL))), int(round(b * S * (1 << _SUBPIXEL))))
    side = int(2 * a * S) + 8
    offsets = np.random.default_rng(0).random((32, 2))
    total = 0
    for k, (ox, oy) in enumerate(offsets):
        m = np.zeros((side, side), np.uint8)
        cv2.ellipse(m, tuple(int(v) for v in _fixed(np.array([side / 2 + ox, side / 2 + oy]))), axes,
                    180.0 * k / len(offsets), 0, 360, 1, -1, cv2.LINE_8, _SUBPIXEL)
        total += int(m.sum())
    return total / len(offsets)


@dataclass(frozen=True)
class GranularHeap(Drawer):
    """A rounded-rectangle heap covered by ellipse grains with half-axes a >= b (fractions of S)."""

    a: float
    b: float

    def outline(self, p: Part, S: int, rng: np.random.Generator) -> np.ndarray:
        return _poly_mask(S, _rounded_rect(p.cx * S, p.cy * S, HEAP_W * S, HEAP_H * S, 0.06 * S, p.angle))

    def paint(self, canvas: np.ndarray, p: Part, S: int, rng: np.random.Generator, m: np.ndarray) -> None:
        a, b = self.a, self.b
        cx, cy = p.cx * S, p.cy * S
        _paint_shaded(canvas, m, tuple(v * p.gain for v in GRANULAR_BASE), cx, cy, 0.15 * S, 0.2)
        rows, cols = _box(m)
        y0, y1, x0, x1 = rows.start, rows.stop, cols.start, cols.stop
        # grain centres uniform on the heap's rectangle grown by a grain: cover is the same everywhere
        bw, bh = HEAP_W + 2 * a, HEAP_H + 2 * a
        count = int(round(-math.log(1 - GRAIN_COVER) * bw * bh * S * S / _grain_area(a, b, S)))
        u = (rng.random((count, 2)) - 0.5) * np.array([bw, bh]) * S
        centres = _place(u, cx - x0, cy - y0, p.angle, False)
        tone = rng.random(count) < 0.6
        gain = rng.uniform(0.88, 1.12, count) * p.gain
        orient = rng.uniform(0.0, 180.0, count)
        layer = canvas[y0:y1, x0:x1].copy()
        axes = (int(round(a * S * (1 << _SUBPIXEL))), int(round(b * S * (1 << _SUBPIXEL))))
        light, dark = (np.asarray(t, np.float32) for t in GRANULAR_TONES)
        colours = np.where(tone[:, None], light, dark) * gain[:, None]
        for (gx, gy), o, colour in zip(_fixed(centres).tolist(), orient.tolist(), colours.tolist()):
            cv2.ellipse(layer, (gx, gy), axes, o, 0, 360, colour, -1, cv2.LINE_8, _SUBPIXEL)
        sub = m[y0:y1, x0:x1]
        canvas[y0:y1, x0:x1][sub] = np.clip(layer[sub], 0.0, 1.0)  # grains are clipped to the heap


# ---- handwritten characters (char_tray): one character per slot, natural variation ----------
# Every part is drawn by one of CHAR_WRITERS ways of building its character (the printed
# strokes of GLYPHS, an alternative construction from CHAR_ALTERNATES, each with sharp or
# rounded corners), then varied as a hand or a worn printer varies it: slant, width, where the
# middle bars sit, stroke width, size, a small turn and a wobble along every stroke. All of it
# comes from the part's own seed, so a wrong character in a slot (same seed, another name) is
# drawn with the same variation, the same ink and about the same amount of material (the size
# is set so that, at the nominal stroke width, the footprint covers CHAR_AREA).

CHAR_ALTERNATES: dict[str, list[Stroke]] = {
    "F": [[(-0.3, 0.5), (-0.3, -0.5), (0.35, -0.5)], [(-0.3, 0.06), (0.12, 0.06)], [(-0.45, 0.5), (-0.12, 0.5)]],
    "R": [[(-0.3, 0.5), (-0.3, -0.5)], [(-0.3, -0.5), (0.02, -0.5)] + _arc(0.02, -0.25, 0.28, 0.25, -90, 90)
          + [(-0.3, 0.0)], [(0.05, 0.0), (0.38, 0.5)]],
    "J": [[(0.25, -0.5)] + _arc(-0.05, 0.2, 0.3, 0.3, 0, 180)],
    "L": [[(-0.3, -0.5), (-0.3, 0.5), (0.38, 0.5)]],
    "P": [[(-0.3, 0.5), (-0.3, -0.5)], [(-0.3, -0.5), (0.0, -0.5)] + _arc(0.0, -0.25, 0.3, 0.25, -90, 90) + [(-0.3, 0.0)]],
    "4": [[(-0.15, -0.5), (-0.35, 0.15), (0.35, 0.15)], [(0.15, -0.2), (0.15, 0.5)]],
    "7": [[(-0.35, -0.5), (0.35, -0.5), (0.1, -0.05), (-0.05, 0.5)]],
    "2": [[(-0.3, -0.3), (-0.1, -0.5), (0.2, -0.5), (0.32, -0.3), (0.25, -0.1), (-0.35, 0.5), (0.35, 0.5)]],
    "K": [[(-0.3, -0.5), (-0.3, 0.5)], [(0.33, -0.5), (-0.3, 0.05), (0.35, 0.5)]],
    "E": [[(0.35, -0.5), (-0.3, -0.5), (-0.3, 0.5), (0.35, 0.5)], [(-0.3, -0.04), (0.1, -0.04)]],
    "S": [[(0.3, -0.4), (0.1, -0.5), (-0.2, -0.5), (-0.32, -0.3), (-0.2, -0.08), (0.2, 0.08), (0.32, 0.3), (0.2, 0.5),
           (-0.1, 0.5), (-0.32, 0.4)]],
    "Z": [[(-0.35, -0.5), (0.35, -0.5), (-0.35, 0.5), (0.35, 0.5)], [(-0.2, 0.0), (0.2, 0.0)]],
    "C": [[(0.35, -0.4), (0.2, -0.5), (-0.2, -0.5), (-0.35, -0.3), (-0.35, 0.3), (-0.2, 0.5), (0.2, 0.5), (0.35, 0.4)]],
    "3": [[(-0.3, -0.5), (0.3, -0.5), (0.0, -0.08)] + _arc(0.0, 0.22, 0.3, 0.28, -90, 160)],
    "h": [[(-0.3, -0.5), (-0.3, 0.5)], [(-0.3, 0.0), (0.0, -0.1), (0.3, 0.0), (0.3, 0.5)]],
}
CHAR_WRITERS = 4  # printed / printed, rounded / alternative / alternative, rounded
CHAR_COLOUR: Colour = (0.12, 0.14, 0.30)  # dark blue ink
CHAR_AREA = 0.011  # footprint at the nominal stroke width, fraction of the image area (slots stay apart)


def _rounded(stroke: np.ndarray, passes: int = 3) -> np.ndarray:
    """Chaikin corner cutting of an open polyline (K, 2): the end points stay, corners become curves."""
    for _ in range(passes):
        if len(stroke) < 3:
            return stroke
        a, b = stroke[:-1], stroke[1:]
        cut = np.stack([0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b], 1).reshape(-1, 2)
        stroke = np.concatenate([stroke[:1], cut[1:-1], stroke[-1:]])
    return stroke


def _resampled(stroke: np.ndarray, step: float) -> np.ndarray:
    """The polyline (K, 2) with points every `step` (at least its two ends) along its length."""
    seg = np.hypot(*np.diff(stroke, axis=0).T)
    at = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.linspace(0.0, at[-1], max(2, int(math.ceil(at[-1] / step)) + 1))
    return np.stack([np.interp(t, at, stroke[:, 0]), np.interp(t, at, stroke[:, 1])], 1)


@dataclass(frozen=True)
class Handwriting:
    """How one part's character is written (drawn from the part's seed, `_handwriting`)."""

    writer: int  # 0..CHAR_WRITERS-1
    slant: float  # x += slant * (-y): leaning right for > 0
    stretch: float  # width factor
    waist: float  # middle bars move by this (fraction of the height) up (< 0) or down
    stroke: float  # stroke width factor
    size: float  # size factor
    turn: float  # degrees, on top of the part's angle
    wobble: np.ndarray  # (64, 2) normal draws for the wobble along the strokes


def _handwriting(rng: np.random.Generator) -> Handwriting:
    return Handwriting(writer=int(rng.integers(CHAR_WRITERS)), slant=float(rng.uniform(-0.22, 0.22)),
                       stretch=float(rng.uniform(0.85, 1.15)), waist=float(rng.uniform(-0.08, 0.08)),
                       stroke=float(rng.uniform(0.8, 1.25)), size=float(rng.uniform(0.92, 1.08)),
                       turn=float(rng.uniform(-5.0, 5.0)), wobble=rng.normal(0.0, 1.0, (64, 2)))


def _written_strokes(name: str, hand: Handwriting) -> list[np.ndarray]:
    """The strokes of character `name` as `hand` writes it, in the unit box (height 1, y down)."""
    strokes = GLYPHS[name] if hand.writer in (0, 1) else CHAR_ALTERNATES[name]
    out, k = [], 0
    for stroke in strokes:
        s = np.asarray(stroke, np.float64)
        if hand.writer in (1, 3):  # a rounder hand: corners cut, every stroke bowed a little
            s = _rounded(s)
        s = _resampled(s, 0.05)
        if hand.writer in (1, 3):
            chord = s[-1] - s[0]
            normal = np.array([-chord[1], chord[0]]) / max(float(np.hypot(*chord)), 1e-9)
            s = s + 0.04 * np.sin(np.linspace(0.0, math.pi, len(s)))[:, None] * normal
        y = s[:, 1] + hand.waist * (1.0 - 4.0 * s[:, 1] ** 2)  # ends stay, the middle moves
        x = s[:, 0] * hand.stretch - hand.slant * y
        # a smooth wobble: the part's normal draws, averaged over 3 neighbours, 0.012 of the height
        w = np.take(hand.wobble, np.arange(k, k + len(s)) % len(hand.wobble), axis=0)
        w = np.convolve(np.pad(w[:, 0], 1, mode="edge"), np.ones(3) / 3, "valid"), \
            np.convolve(np.pad(w[:, 1], 1, mode="edge"), np.ones(3) / 3, "valid")
        k += len(s)
        out.append(np.stack([x + 0.012 * w[0], y + 0.012 * w[1]], 1))
    return out


def _char_lines(strokes: list[np.ndarray], cx: float, cy: float, height: float, angle: float,
                mirror: bool) -> list[np.ndarray]:
    """The character's strokes placed in the image, in fixed point (all points at once: every
    step works point by point)."""
    ends = np.cumsum([len(s) for s in strokes])[:-1]
    return np.split(_fixed(_place(np.concatenate(strokes) * height, cx, cy, angle, mirror)), ends)


@dataclass(frozen=True)
class Handwritten(Drawer):
    """Character `name` (CHAR_ALTERNATES) as the part's own hand writes it (`_handwriting`,
    drawn from the part's Generator by the outline), sized to cover CHAR_AREA at the nominal
    stroke width, in CHAR_COLOUR."""

    name: str

    def outline(self, p: Part, S: int, rng: np.random.Generator) -> np.ndarray:
        hand = _handwriting(rng)
        strokes = _written_strokes(self.name, hand)
        nominal = max(1, int(round(GLYPH_STROKE * S)))
        height = GLYPH_HEIGHT * S
        for _ in range(3):  # the size whose footprint, at the nominal stroke width, covers CHAR_AREA
            _, pixels = _stroke_box(_char_lines(strokes, S / 2, S / 2, height, 0.0, False), S, nominal)
            height *= CHAR_AREA / (pixels.sum() / S**2)
        lines = _char_lines(strokes, p.cx * S, p.cy * S, height * hand.size, p.angle + hand.turn, p.mirror)
        return _in_frame(S, *_stroke_box(lines, S, max(1, int(round(GLYPH_STROKE * hand.stroke * S)))))

    def paint(self, canvas: np.ndarray, p: Part, S: int, rng: np.random.Generator, m: np.ndarray) -> None:
        _paint_shaded(canvas, m, tuple(v * p.gain for v in CHAR_COLOUR), p.cx * S, p.cy * S, 0.1 * S, 0.15)


DRAWERS: dict[str, Drawer] = {
    "washer": Washer(),
    "nut": HexNut((0.82, 0.66, 0.30)),
    "screw_long": Screw(0.40),
    "screw_short": Screw(0.20),
    "orange": Fruit(0.085, (0.96, 0.55, 0.10), 60, None),
    "peach": Fruit(0.092, (0.95, 0.72, 0.50), 0, (0.86, 0.36, 0.30)),
    "lime": Fruit(0.080, (0.55, 0.76, 0.20), 50, None),
    "cereal": TexturedPatch((0.74, 0.52, 0.26), (((0.88, 0.70, 0.40), 0.012, 0.008, 160),
                                                 ((0.62, 0.42, 0.18), 0.010, 0.007, 90))),
    "nut_mix": TexturedPatch((0.50, 0.34, 0.20), (((0.62, 0.40, 0.22), 0.022, 0.012, 35),
                                                  ((0.97, 0.90, 0.60), 0.016, 0.016, 25))),
    "rice": GranularHeap(0.013, 0.0038),
    "millet": GranularHeap(0.0048, 0.0048),
    **{f"glyph_{g}": Glyph(g) for g in GLYPHS},
    **{name: Polygon(name) for name in POLYGONS},
    **{f"char_{c}": Handwritten(c) for c in CHAR_ALTERNATES},
}


@dataclass(frozen=True)
class ProductSpec:
    """A product: background colour, nominal parts (kind, cx, cy, angle), which kinds may be
    added/moved (small ones), what each kind is replaced by in `wrong_part` / `wrong_shape` /
    `wrong_texture`, the colours of scratches and contamination on it, and its anomaly names.
    For the shape anomalies: kinds that change when mirrored (`mirrorable`) or turned by 90
    degrees (`rotatable`), groups of kinds of one colour and area that may trade places
    (`swap_groups`), and the granular kinds (`granular`: `wrong_texture`, not `wrong_shape`)."""

    background: Colour
    parts: tuple[tuple[str, float, float, float], ...]
    movable: tuple[str, ...]
    wrong_part: dict[str, str]
    scratch_colour: Colour
    dirt_colour: Colour
    logical: tuple[str, ...] = LOGICAL_ANOMALIES
    structural: tuple[str, ...] = STRUCTURAL_ANOMALIES
    mirrorable: tuple[str, ...] = ()
    rotatable: tuple[str, ...] = ()
    swap_groups: tuple[tuple[str, ...], ...] = ()
    granular: tuple[str, ...] = ()

    @property
    def anomalies(self) -> tuple[str, ...]:
        return self.logical + self.structural


_TRAY_GLYPHS = ("glyph_F", "glyph_R", "glyph_J", "glyph_L", "glyph_P", "glyph_4", "glyph_7", "glyph_2", "glyph_K")
_TRAY_CHARS = ("char_F", "char_R", "char_J", "char_L", "char_P", "char_4", "char_7", "char_2", "char_K")


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
    "glyph_tray": ProductSpec(
        background=(0.84, 0.85, 0.83),
        parts=tuple((g, 0.20 + 0.30 * (k % 3), 0.20 + 0.30 * (k // 3), 0.0) for k, g in enumerate(_TRAY_GLYPHS)),
        movable=(),
        wrong_part={"glyph_F": "glyph_h", "glyph_R": "glyph_C", "glyph_J": "glyph_E", "glyph_L": "glyph_Z",
                    "glyph_P": "glyph_S", "glyph_4": "glyph_3", "glyph_7": "glyph_C", "glyph_2": "glyph_h",
                    "glyph_K": "glyph_3"},
        scratch_colour=(0.97, 0.97, 0.95),
        dirt_colour=(0.42, 0.27, 0.10),
        logical=("wrong_shape", "mirrored", "swapped", "rotated"),
        mirrorable=_TRAY_GLYPHS,
        rotatable=_TRAY_GLYPHS,
        swap_groups=(_TRAY_GLYPHS,),
    ),
    "bracket_kit": ProductSpec(
        background=(0.17, 0.30, 0.24),
        parts=(
            ("l_bracket", 0.18, 0.21, 0.0), ("t_piece", 0.48, 0.20, 0.0), ("arrow", 0.79, 0.22, 0.0),
            ("step_plate", 0.19, 0.50, 0.0), ("trapezoid", 0.20, 0.80, 0.0), ("rice", 0.64, 0.66, 0.0),
        ),
        movable=(),
        wrong_part={"l_bracket": "u_channel", "t_piece": "z_bracket", "step_plate": "z_bracket",
                    "arrow": "chevron", "trapezoid": "cross", "rice": "millet"},
        scratch_colour=(0.12, 0.10, 0.10),
        dirt_colour=(0.50, 0.12, 0.40),
        logical=SHAPE_ANOMALIES,
        mirrorable=("l_bracket", "step_plate", "arrow", "trapezoid"),  # the T is left-right symmetric
        rotatable=("l_bracket", "t_piece", "step_plate", "arrow", "trapezoid"),
        swap_groups=(("l_bracket", "t_piece", "step_plate"), ("arrow", "trapezoid")),
        granular=("rice", "millet"),
    ),
    "char_tray": ProductSpec(
        background=(0.88, 0.86, 0.80),
        parts=tuple((c, 0.20 + 0.30 * (k % 3), 0.20 + 0.30 * (k // 3), 0.0) for k, c in enumerate(_TRAY_CHARS)),
        movable=(),
        wrong_part={"char_F": "char_E", "char_R": "char_h", "char_J": "char_S", "char_L": "char_C",
                    "char_P": "char_3", "char_4": "char_h", "char_7": "char_Z", "char_2": "char_3",
                    "char_K": "char_S"},
        scratch_colour=(0.97, 0.97, 0.95),
        dirt_colour=(0.55, 0.36, 0.12),
        logical=("wrong_shape", "mirrored", "swapped", "rotated"),
        mirrorable=_TRAY_CHARS,
        rotatable=_TRAY_CHARS,
        swap_groups=(_TRAY_CHARS,),
    ),
}

# PRODUCTS keeps its meaning for every importer: the products with the counting anomalies
# (missing / extra / wrong_place / wrong_part). The shape products have shape-only logical
# anomalies; ALL_PRODUCTS is both, and what `linewatch sim generate` writes by default.
PRODUCTS: tuple[str, ...] = ("screw_tray", "breakfast_box")
SHAPE_PRODUCTS: tuple[str, ...] = ("glyph_tray", "bracket_kit")
ALL_PRODUCTS: tuple[str, ...] = PRODUCTS + SHAPE_PRODUCTS
# Products written only when asked for by name (`linewatch sim generate --product char_tray`):
# char_tray's good parts vary naturally; its structural defects on thin strokes are below what
# the accuracy tests ask of every product of ALL_PRODUCTS (README, "Part identity").
IDENTITY_PRODUCTS: tuple[str, ...] = ("char_tray",)
KNOWN_PRODUCTS: tuple[str, ...] = ALL_PRODUCTS + IDENTITY_PRODUCTS


def product_anomalies(product: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(logical, structural) anomaly names of `product`."""
    if product not in PRODUCT_SPECS:
        raise ValueError(f"unknown product {product!r}; known: {KNOWN_PRODUCTS}")
    spec = PRODUCT_SPECS[product]
    return spec.logical, spec.structural


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


def _footprint(p: Part, S: int) -> np.ndarray:
    """The part's bool (S, S) footprint: its drawer's outline, nothing painted."""
    return DRAWERS[p.kind].outline(p, S, np.random.default_rng(p.seed))


def _find_free_spot(
    rng: np.random.Generator, p: Part, occupied: np.ndarray, S: int, free_angle: bool, tries: int = 300
) -> Part | None:
    """Move `p` to a random centre where its footprint keeps a clearance from `occupied`
    (bool (S, S)) and from the image border; None if no such spot is found."""
    clearance = _Clearance(occupied, int(0.045 * S))
    border = int(0.07 * S)
    in_border = np.zeros((S, S), bool)
    in_border[:border] = True
    in_border[-border:] = True
    in_border[:, :border] = True
    in_border[:, -border:] = True
    if not free_angle:
        fy, fx = _pixels(_footprint(p, S))  # translating these pixels is far cheaper than redrawing
    for _ in range(tries):
        q = replace(p, cx=float(rng.uniform(0.1, 0.9)), cy=float(rng.uniform(0.1, 0.9)),
                    angle=float(rng.uniform(0, 180)) if free_angle else p.angle)
        if free_angle:
            base = replace(q, cx=p.cx, cy=p.cy)
            fy, fx = _pixels(_footprint(base, S))
        ys = fy + int(round((q.cy - p.cy) * S))
        xs = fx + int(round((q.cx - p.cx) * S))
        if ys.min() < 0 or xs.min() < 0 or ys.max() >= S or xs.max() >= S:
            continue
        if not in_border[ys, xs].any() and not clearance.blocks(ys, xs):
            return q
    return None


class _Clearance:
    """The pixels within `gap` of an occupied one, as cv2.dilate with the MORPH_ELLIPSE kernel
    of radius `gap` marks them, asked for a few pixels at a time instead of dilating the frame.

    That kernel holds every offset of Euclidean length <= gap - 1 and none of length >= gap + 1
    (its row dy reaches round(sqrt(gap^2 - dy^2)) to each side), so the distance of each pixel to
    the nearest occupied one (cv2.distanceTransform, exact) decides all pixels but those between;
    for those the occupied pixels around them are dilated, as exactly as the whole frame."""

    def __init__(self, occupied: np.ndarray, gap: int) -> None:
        self.occupied = occupied.astype(np.uint8)
        self.gap = gap
        self.kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * gap + 1,) * 2)
        self.distance = cv2.distanceTransform(1 - self.occupied, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)

    def blocks(self, ys: np.ndarray, xs: np.ndarray) -> bool:
        """Whether any of the pixels (ys, xs) lies within the gap of an occupied pixel."""
        distance = self.distance[ys, xs]
        if distance.min() <= self.gap - 1:
            return True
        near = distance < self.gap + 1
        if not near.any():
            return False
        ys, xs = ys[near], xs[near]
        S, gap = len(self.occupied), self.gap
        y0, x0 = max(0, int(ys.min()) - gap), max(0, int(xs.min()) - gap)
        y1, x1 = min(S, int(ys.max()) + gap + 1), min(S, int(xs.max()) + gap + 1)
        dilated = cv2.dilate(self.occupied[y0:y1, x0:x1], self.kernel)
        return bool(dilated[ys - y0, xs - x0].any())


def _defect_region(anomaly: str, m: np.ndarray, S: int, rng: np.random.Generator) -> np.ndarray:
    """Bool (S, S): where structural `anomaly` goes on the part of footprint `m`: a scratch
    across it, a chip bitten from its edge, or a contamination blob on it."""
    ys, xs = _pixels(m)
    cx, cy = float(xs.mean()), float(ys.mean())
    extent = float(np.sqrt(m.sum() / math.pi))  # radius of a disc of the same area
    if anomaly == "scratch":
        a = rng.uniform(0, math.pi)
        half = extent * rng.uniform(0.7, 1.0)
        d = np.array([math.cos(a), math.sin(a)]) * half
        ends = np.round([[cx - d[0], cy - d[1]], [cx + d[0], cy + d[1]]]).astype(int)
        width = max(2, int(0.008 * S))
        (rows, cols), line = _blank_box(S, *(ends.min(0) - width - 2).tolist(), *(ends.max(0) + width + 3).tolist())
        if line.size:
            (x0, y0), (x1, y1) = (ends - [cols.start, rows.start]).tolist()
            cv2.line(line, (x0, y0), (x1, y1), 1, width)
        return _in_frame(S, (rows, cols), line.astype(bool)) & m
    if anomaly == "chip":
        # bite centred on a boundary pixel of the part: background shows through. The erosions
        # below reach 4 * SUPERSAMPLE pixels: the part's box grown by that holds all they see.
        box = _grown(_box(m), 4 * SUPERSAMPLE + 2, S)
        part = m[box]
        ey, ex = np.nonzero(part & ~cv2.erode(part.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool))
        ey, ex = ey + box[0].start, ex + box[1].start
        k = int(rng.integers(len(ey)))
        r = extent * rng.uniform(0.30, 0.40)
        region = _circle_mask(S, ex[k], ey[k], r) & m
        # a chip bites, it does not cut a thin part (screw shaft, ring) in two
        # (checked on the part eroded by ~2 output pixels: a hair-thin bridge does not count)
        k_erode = np.ones((4 * SUPERSAMPLE + 1,) * 2, np.uint8)
        while cv2.connectedComponents(cv2.erode((part & ~region[box]).astype(np.uint8), k_erode))[0] > 2 and r > 2:
            r *= 0.75
            region = _circle_mask(S, ex[k], ey[k], r) & m
        return region
    # contamination: an irregular blob inside the part
    k = int(rng.integers(len(ys)))
    r = extent * rng.uniform(0.18, 0.28)
    ang = np.linspace(0, 2 * math.pi, 12, endpoint=False)
    rad = r * rng.uniform(0.6, 1.2, len(ang))
    return _poly_mask(S, np.stack([xs[k] + rad * np.cos(ang), ys[k] + rad * np.sin(ang)], 1))


def _sensor_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Float32 Gaussian noise of sigma 0.012 from Generator(seed): the values of
    `normal(0, 0.012, shape)` (the same standard normal draws times the same scale; adding
    the zero mean changes no value), a fifth faster."""
    noise = np.random.default_rng(seed).standard_normal(shape)
    noise *= 0.012
    return noise.astype(np.float32)


def _to_output(img_ss: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(img_ss, (size, size), interpolation=cv2.INTER_AREA)


def _mask_to_output(m_ss: np.ndarray, size: int, min_cover: float = 0.5) -> np.ndarray:
    """Downsample a bool supersampled mask; a pixel is in when >= min_cover of it is."""
    return _to_output(m_ss.astype(np.float32), size) >= min_cover


def to_mono(image: np.ndarray) -> np.ndarray:
    """An RGB frame as a mono camera would see the scene: uint8 (H, W), the luma
    0.299 R + 0.587 G + 0.114 B (ITU-R BT.601, OpenCV's RGB2GRAY). A real mono sensor's
    response differs by sensor; this is one honest choice, the same for every product."""
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def render(
    product: str, rng: np.random.Generator, anomaly: str | None = None, size: int = 256, mono: bool = False
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Render one frame of `product` (`mono`: as a mono camera sees it, `to_mono`; the same
    random draws, so the same scene as in colour).

    The random draws for the good scene (jitter, lighting, textures, sensor noise) come first
    and do not depend on `anomaly`, so two Generators in the same state give the same scene
    with and without the anomaly: pixels outside the ground truth agree (up to anti-aliased
    edges), which the tests use.

    Returns:
      image:   uint8 (size, size, 3) RGB, or (size, size) grey when `mono`.
      gt_mask: bool (size, size); all False for a good frame.
      info:    {"product", "anomaly" (None for good), "category" ("good" | "logical_anomalies" |
               "structural_anomalies"), "part" (affected kind, "<kind>+<kind>" for `swapped`, or
               None), "n_parts" (parts present), "parts": [{"kind", "cx", "cy", "angle", "mirrored"}]
               (fractions of the image side)}.
    `anomaly` must be one of the product's own (product_anomalies).
    """
    if product not in PRODUCT_SPECS:
        raise ValueError(f"unknown product {product!r}; known: {KNOWN_PRODUCTS}")
    spec = PRODUCT_SPECS[product]
    if anomaly is not None and anomaly not in spec.anomalies:
        raise ValueError(f"unknown anomaly {anomaly!r} for {product}; known: {spec.anomalies}")
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
    if anomaly in SHAPE_ANOMALIES:  # in place: same colour, same area, another outline
        if anomaly == "swapped":
            pairs = [(i, j) for i in range(len(parts)) for j in range(i + 1, len(parts))
                     if parts[i].kind != parts[j].kind
                     and any(parts[i].kind in g and parts[j].kind in g for g in spec.swap_groups)]
            i, j = pairs[int(anomaly_rng.integers(len(pairs)))]
            affected = f"{parts[i].kind}+{parts[j].kind}"
            gt_ss |= _footprint(parts[i], S) | _footprint(parts[j], S)
            parts[i], parts[j] = replace(parts[i], kind=parts[j].kind), replace(parts[j], kind=parts[i].kind)
            gt_ss |= _footprint(parts[i], S) | _footprint(parts[j], S)
        else:
            eligible = {
                "wrong_shape": lambda k: k in spec.wrong_part and k not in spec.granular,
                "wrong_texture": lambda k: k in spec.wrong_part and k in spec.granular,
                "mirrored": lambda k: k in spec.mirrorable,
                "rotated": lambda k: k in spec.rotatable,
            }[anomaly]
            candidates = [i for i, p in enumerate(parts) if eligible(p.kind)]
            i = candidates[int(anomaly_rng.integers(len(candidates)))]
            affected = parts[i].kind
            gt_ss |= _footprint(parts[i], S)
            if anomaly == "mirrored":
                parts[i] = replace(parts[i], mirror=not parts[i].mirror)
            elif anomaly == "rotated":
                parts[i] = replace(parts[i], angle=parts[i].angle + (90.0 if anomaly_rng.random() < 0.5 else -90.0))
            else:
                parts[i] = replace(parts[i], kind=spec.wrong_part[parts[i].kind])
            gt_ss |= _footprint(parts[i], S)
    elif anomaly in spec.logical:
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
    canvas = _plain_canvas(S, bg)
    foot = []
    for p in parts:
        foot.append(DRAWERS[p.kind](canvas, p, S, np.random.default_rng(p.seed)))

    # ---- structural anomalies paint over one part ----
    if anomaly in spec.structural:
        i = int(anomaly_rng.integers(len(parts)))
        affected = parts[i].kind
        region = _defect_region(anomaly, foot[i], S, anomaly_rng)
        colour = {"scratch": spec.scratch_colour, "chip": bg, "contamination": spec.dirt_colour}[anomaly]
        rows, cols = _box(region)
        canvas[rows, cols][region[rows, cols]] = colour
        gt_ss |= region

    # ---- camera: lighting gradient, gain, downsample, sensor noise ----
    light = _light_gain(S, gain, grad_dir, grad_amp)
    for c in range(3):  # a channel at a time: numpy is several times slower broadcasting (S, S, 1)
        canvas[:, :, c] *= light
    img = _to_output(canvas, size)
    img += _sensor_noise(noise_seed, img.shape)
    image = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)

    # thin structural defects (scratches) keep any pixel they touch noticeably
    gt = _mask_to_output(gt_ss, size, 0.25 if anomaly in spec.structural else 0.5)
    category = ("good" if anomaly is None else
                "logical_anomalies" if anomaly in spec.logical else "structural_anomalies")
    info = {
        "product": product,
        "anomaly": anomaly,
        "category": category,
        "part": affected,
        "n_parts": len(parts),
        "parts": [{"kind": p.kind, "cx": p.cx, "cy": p.cy, "angle": p.angle, "mirrored": p.mirror} for p in parts],
    }
    return (to_mono(image) if mono else image), gt, info


# --------------------------------------------------------------------------------------
# Dataset on disk (MVTec LOCO AD layout)
# --------------------------------------------------------------------------------------

_SPLIT_IDS = {"train": 0, "validation": 1, "test_good": 2, "test_logical": 3, "test_structural": 4}


def defect_pixel_value(product: str, anomaly: str) -> int:
    """The ground-truth PNG value of `anomaly`: 255, 254, ... in the product's anomaly order
    (logical first), one value per defect type as in MVTec LOCO AD."""
    return 255 - PRODUCT_SPECS[product].anomalies.index(anomaly)


def defects_config(product: str) -> list[dict[str, Any]]:
    """LOCO-style defect list: each defect type with its own pixel value (`defect_pixel_value`),
    the value its ground-truth PNGs hold, so the official evaluator, which finds a region's
    entry by its pixel value, saturates each defect type as listed here. Saturation: logical
    defects saturate at half the marked region, structural at all of it."""
    spec = PRODUCT_SPECS[product]
    out = []
    for a in spec.anomalies:
        logical = a in spec.logical
        out.append({"defect_name": a, "pixel_value": defect_pixel_value(product, a),
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
    mono: bool = False,
) -> Path:
    """Write `<root>/<product>/` in the MVTec LOCO AD layout and return that directory:

      train/good/000.png, validation/good/000.png, test/good/000.png,
      test/logical_anomalies/000.png, test/structural_anomalies/000.png,
      ground_truth/{logical,structural}_anomalies/000/000.png (uint8, 0 or the defect type's
      pixel value, `defect_pixel_value`),
      defects_config.json, manifest.json.

    Anomaly kinds cycle through the product's logical / structural anomalies
    (product_anomalies) in index order, so every kind appears once there are enough images;
    defects_config.json lists the same names. `mono`: grey images (`render`'s mono; the same
    scenes and ground truth as in colour). manifest.json holds {"product", "seed", "size", "mono",
    "counts", "images": {"test/<category>/000.png": {"anomaly", "defect_name", "part",
    "n_parts"}}}. Image i of a split uses np.random.default_rng([seed, split, i]): output is
    bit-identical for a fixed seed and an image does not change when other counts change.
    """
    logical, structural = product_anomalies(product)
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
                     logical[i % len(logical)]))
    for i in range(n_test_structural):
        jobs.append(("test_structural", f"test/structural_anomalies/{i:03d}.png", i,
                     structural[i % len(structural)]))

    iterator: Any = jobs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(jobs, desc=f"sim {product}")
    manifest: dict[str, Any] = {}
    for split, rel, i, anomaly in iterator:
        rng = np.random.default_rng([seed, _SPLIT_IDS[split], i])
        image, gt, info = render(product, rng, anomaly, size=size, mono=mono)
        _write_png(out / rel, image)
        if anomaly is not None:
            category = info["category"]
            _write_png(out / "ground_truth" / category / f"{i:03d}" / "000.png",
                       gt.astype(np.uint8) * np.uint8(defect_pixel_value(product, anomaly)))
        if split.startswith("test"):
            manifest[rel] = {"anomaly": anomaly, "defect_name": anomaly, "part": info["part"],
                             "n_parts": info["n_parts"]}

    (out / "defects_config.json").write_text(json.dumps(defects_config(product), indent=2) + "\n")
    counts = {"train": n_train, "validation": n_val, "test_good": n_test_good,
              "test_logical": n_test_logical, "test_structural": n_test_structural}
    (out / "manifest.json").write_text(json.dumps(
        {"product": product, "seed": seed, "size": size, "mono": mono, "counts": counts, "images": manifest},
        indent=2, sort_keys=True) + "\n")
    return out
