"""Defects painted onto any image (linewatch.sim.defects), the self-check's known-bad parts."""

from __future__ import annotations

import numpy as np
import pytest

from linewatch.sim.defects import BLOB_RADIUS, DEFECT_KINDS, paint_defect

CYAN = (0, 255, 255)


def part_on_tray() -> np.ndarray:
    """100 x 100 grey tray (100, 100, 100) with a red part (200, 40, 40) at rows/columns 30..69."""
    image = np.full((100, 100, 3), 100, np.uint8)
    image[30:70, 30:70] = (200, 40, 40)
    return image


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_a_defect_goes_on_the_part_in_a_foreign_colour_and_nowhere_else(kind: str) -> None:
    image = part_on_tray()
    for seed in range(5):
        out, mask = paint_defect(image, kind, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8
        assert np.array_equal(out[~mask], image[~mask])  # nothing changed outside its mask
        assert mask.any()
        # the farthest of the palette from red-on-grey is cyan: every defect pixel is cyan
        assert (out[mask] == CYAN).all()
        # centred on the part: the eroded part is rows/columns 32..67, the defect reaches at most
        # its radius (contamination: 1.2 x 6 px) or half its length (scratch: 15 px) beyond
        ys, xs = np.nonzero(mask)
        assert 32 <= ys.mean() <= 67 and 32 <= xs.mean() <= 67, (seed, ys.mean(), xs.mean())
    assert np.array_equal(image, part_on_tray())  # the input is not touched


def test_the_blob_has_the_size_it_should() -> None:
    # radius 0.06 x 100 = 6 px, each of its 12 corners at 0.7..1.2 of it: its area lies between
    # the polygons of all corners at 0.7 r and at 1.2 r (12-gon area = 3 r^2), plus rasterised edges
    _, mask = paint_defect(part_on_tray(), "contamination", np.random.default_rng(0))
    r = BLOB_RADIUS * 100
    assert 3 * (0.7 * r) ** 2 <= mask.sum() <= 3 * (1.2 * r) ** 2 + 2 * np.pi * 1.2 * r


def test_same_seed_same_pixels_other_seed_other_pixels() -> None:
    image = part_on_tray()
    a, _ = paint_defect(image, "scratch", np.random.default_rng([0, 1]))
    b, _ = paint_defect(image, "scratch", np.random.default_rng([0, 1]))
    c, _ = paint_defect(image, "scratch", np.random.default_rng([0, 2]))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_an_image_where_nothing_stands_out_gets_its_defect_in_the_middle() -> None:
    image = np.full((50, 80, 3), 90, np.uint8)
    _, mask = paint_defect(image, "contamination", np.random.default_rng(0))
    ys, xs = np.nonzero(mask)
    assert abs(ys.mean() - 24.5) < 1.5 and abs(xs.mean() - 39.5) < 1.5


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown defect kind 'dent'"):
        paint_defect(part_on_tray(), "dent", np.random.default_rng(0))
    with pytest.raises(ValueError, match="RGB uint8"):
        paint_defect(np.zeros((10, 10), np.uint8), "scratch", np.random.default_rng(0))
