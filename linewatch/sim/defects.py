"""Structural defects painted onto any image (not only a rendered sim scene): how the self-check
makes its known-bad references from known-good images (linewatch.selfcheck_references).

`render` draws its defects on a part it knows; here nothing is known of the image but its
pixels, so the part is guessed: the background is the colour of the image's border, the
foreground every pixel clearly away from it, and the defect goes on a foreground pixel chosen
by the seeded generator (the middle of the image when nothing stands out). The defect is the
kind `render` draws, larger: a master part with an obvious flaw, which a working line must fail.

  contamination  an irregular blob (12 corners), radius BLOB_RADIUS of the image side
  scratch        a straight line, SCRATCH_LENGTH of the side long, SCRATCH_WIDTH wide

Its colour is the one of FOREIGN_COLOURS farthest from the mean colour of the pixels it
covers. The same image, kind and generator state give the same pixels.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

DEFECT_KINDS = ("contamination", "scratch")
BLOB_RADIUS = 0.06  # of the image's shorter side
SCRATCH_LENGTH = 0.3
SCRATCH_WIDTH = 0.015
BORDER = 0.04  # the border the background colour is read from, of the shorter side
FOREGROUND_DISTANCE = 40.0  # RGB distance from the background colour that makes a pixel foreground
FOREIGN_COLOURS = np.array([(255, 0, 255), (0, 255, 255), (255, 255, 0), (255, 0, 0), (0, 0, 255), (0, 255, 0),
                            (0, 0, 0), (255, 255, 255)], np.float32)


def foreground(image: np.ndarray) -> np.ndarray:
    """Bool (H, W): pixels farther than FOREGROUND_DISTANCE from the median colour of the
    image's border, eroded by 2 pixels (a defect centred there lies on the part)."""
    h, w = image.shape[:2]
    b = max(1, int(round(BORDER * min(h, w))))
    rgb = image.astype(np.float32)
    border = np.concatenate([rgb[:b].reshape(-1, 3), rgb[-b:].reshape(-1, 3),
                             rgb[:, :b].reshape(-1, 3), rgb[:, -b:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    mask = np.linalg.norm(rgb - background, axis=2) > FOREGROUND_DISTANCE
    return cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)


def paint_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A copy of `image` (RGB uint8 (H, W, 3)) with one defect of `kind` painted on, and its
    mask (bool (H, W)). ValueError for another kind or image."""
    if kind not in DEFECT_KINDS:
        raise ValueError(f"unknown defect kind {kind!r}; known: {', '.join(DEFECT_KINDS)}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"paint_defect needs an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    side = min(h, w)
    ys, xs = np.nonzero(foreground(image))
    if len(ys):
        k = int(rng.integers(len(ys)))
        cy, cx = float(ys[k]), float(xs[k])
    else:  # nothing stands out from the border: the middle
        cy, cx = (h - 1) / 2, (w - 1) / 2
    mask = np.zeros((h, w), np.uint8)
    if kind == "contamination":
        radius = BLOB_RADIUS * side
        angles = np.linspace(0, 2 * math.pi, 12, endpoint=False)
        radii = radius * rng.uniform(0.7, 1.2, len(angles))
        corners = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
        cv2.fillPoly(mask, [np.round(corners).astype(np.int32)], 1)
    else:
        angle = rng.uniform(0, math.pi)
        half = SCRATCH_LENGTH * side / 2
        dx, dy = half * math.cos(angle), half * math.sin(angle)
        p0 = (int(round(cx - dx)), int(round(cy - dy)))
        p1 = (int(round(cx + dx)), int(round(cy + dy)))
        cv2.line(mask, p0, p1, 1, max(2, int(round(SCRATCH_WIDTH * side))))
    region = mask.astype(bool)
    around = image[region].astype(np.float32).mean(axis=0)
    colour = FOREIGN_COLOURS[int(np.argmax(np.linalg.norm(FOREIGN_COLOURS - around, axis=1)))]
    out = image.copy()
    out[region] = colour.astype(np.uint8)
    return out, region
