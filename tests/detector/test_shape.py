"""Shape descriptors: invariant to where a part lies, its size and the jitter of its outline;
sensitive to another outline, a mirror image and a quarter turn. Hand-made parts: masks of
letter-like glyphs drawn as filled polygons."""

import numpy as np
import pytest
import torch

from linewatch.detector.align import mask_boxes
from linewatch.detector.shape import SHAPE_DIM, part_crops, shape_descriptors, shape_distances

S = 128

# glyphs as polygons in a unit box (x right, y down)
GLYPH_F = [(0, 0), (1, 0), (1, 0.2), (0.3, 0.2), (0.3, 0.45), (0.8, 0.45), (0.8, 0.65), (0.3, 0.65), (0.3, 1), (0, 1)]
GLYPH_L = [(0, 0), (0.3, 0), (0.3, 0.8), (1, 0.8), (1, 1), (0, 1)]
GLYPH_T = [(0, 0), (1, 0), (1, 0.25), (0.65, 0.25), (0.65, 1), (0.35, 1), (0.35, 0.25), (0, 0.25)]


def draw(glyph, cx=64.0, cy=64.0, size=40.0, mirror=False, quarter_turn=False, angle=0.0, noise=0.0, seed=0):
    """(image01 (3, S, S), mask (S, S) bool) of one grey glyph centred at (cx, cy), turned by
    `angle` degrees. With `noise`, the mask is what a segmenter makes of the noisy image: the
    blurred image thresholded half-way between part and background (a jittered outline)."""
    import cv2

    pts = np.array(glyph, np.float64) - 0.5
    if mirror:
        pts[:, 0] = -pts[:, 0]
    if quarter_turn:
        pts = np.stack([-pts[:, 1], pts[:, 0]], 1)
    c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    pts = pts @ np.array([[c, s], [-s, c]])
    pts = pts * size + [cx, cy]
    mask = np.zeros((S, S), np.uint8)
    cv2.fillPoly(mask, [np.round(pts * 8).astype(np.int32)], 1, shift=3)
    image = np.full((S, S, 3), 0.15, np.float32)
    image[mask.astype(bool)] = 0.7
    if noise:
        image = image + np.random.default_rng(seed).normal(0, noise, image.shape).astype(np.float32)
        mask = cv2.GaussianBlur(image.mean(2), (3, 3), 0) > 0.425
    return torch.from_numpy(image.clip(0, 1)).permute(2, 0, 1), torch.from_numpy(mask.astype(bool))


def descriptor(image01, mask):
    masks = [mask[None]]
    return shape_descriptors(masks, mask_boxes(mask[None, None]))[0, 0]


def test_descriptor_is_a_unit_vector_of_the_stated_size():
    d = descriptor(*draw(GLYPH_F))
    assert d.shape == (SHAPE_DIM,)
    assert torch.linalg.vector_norm(d).item() == pytest.approx(1.0, abs=1e-5)
    assert (d >= 0).all()


def test_crop_follows_the_part_and_its_scale():
    mask = draw(GLYPH_F, 40, 40, 30)[1]
    small = part_crops([mask[None]], mask_boxes(mask[None, None]))
    mask = draw(GLYPH_F, 80, 70, 50)[1]
    large = part_crops([mask[None]], mask_boxes(mask[None, None]))
    assert small.shape == large.shape == (1, 32, 32)
    # the same glyph at another place and size fills the crop the same way (up to resampling)
    assert (small - large).abs().mean().item() < 0.03


@pytest.mark.parametrize("glyph", [GLYPH_F, GLYPH_L, GLYPH_T])
def test_invariant_to_shift_size_jitter_and_noise_but_not_to_shape_mirror_or_turn(glyph):
    base = descriptor(*draw(glyph))
    same = [
        descriptor(*draw(glyph, cx=50.3, cy=71.6)),  # shifted by a non-integer amount
        descriptor(*draw(glyph, size=44.0)),  # 10 % larger
        descriptor(*draw(glyph, noise=0.08, seed=3)),  # a noisy image's segmentation
        descriptor(*draw(glyph, angle=4.0)),  # the placement jitter of a good part
    ]
    worst_same = max(shape_distances(base, d).item() for d in same)
    others = [descriptor(*draw(g)) for g in (GLYPH_F, GLYPH_L, GLYPH_T) if g is not glyph]
    changed = others + [descriptor(*draw(glyph, quarter_turn=True))]
    if glyph is not GLYPH_T:  # T is its own mirror image (tested below)
        changed.append(descriptor(*draw(glyph, mirror=True)))
    best_changed = min(shape_distances(base, d).item() for d in changed)
    # measured: a 4-degree turn moves a glyph by 0.15-0.21, the changes move it by 0.66 or more
    assert worst_same < 0.25
    assert best_changed > 2.5 * worst_same
    assert best_changed > 0.5


def test_symmetric_glyph_is_its_own_mirror_image():
    # T is symmetric about its vertical axis: mirroring must not look like a change
    base = descriptor(*draw(GLYPH_T))
    assert shape_distances(base, descriptor(*draw(GLYPH_T, mirror=True))).item() < 0.05


def test_padding_rows_are_zero_and_objects_keep_their_order():
    f_image, f_mask = draw(GLYPH_F, 40, 40, 30)
    l_image, l_mask = draw(GLYPH_L, 90, 90, 30)
    image = torch.maximum(f_image, l_image)
    two = torch.stack([f_mask, l_mask])
    masks = [two, f_mask[None]]
    boxes = torch.zeros(2, 2, 4)
    boxes[0] = mask_boxes(two)
    boxes[1, :1] = mask_boxes(f_mask[None])
    out = shape_descriptors(masks, boxes)
    assert out.shape == (2, 2, SHAPE_DIM)
    assert torch.equal(out[1, 1], torch.zeros(SHAPE_DIM))
    assert shape_distances(out[0, 0], out[1, 0]).item() < 1e-6  # the same F, alone or with an L
    assert shape_distances(out[0, 0], out[0, 1]).item() > 0.3


def test_grain_coherence_tells_long_grains_from_round_ones():
    """ClassicFeatures.texture_channels: parallel strokes (long grains side by side) have coherent
    edge orientations, dots (round grains) do not."""
    import cv2

    from linewatch.detector.backbone import ClassicFeatures

    stripes = np.full((64, 64), 0.3, np.float32)
    for x in range(2, 64, 6):
        cv2.line(stripes, (x, 0), (x, 63), 0.8, 2)
    dots = np.full((64, 64), 0.3, np.float32)
    for y in range(3, 64, 6):
        for x in range(3, 64, 6):
            cv2.circle(dots, (x, y), 2, 0.8, -1)
    extractor = ClassicFeatures(stride=8, num_scales=3, position_gain=0.0)
    stats = {}
    for name, grey in (("stripes", stripes), ("dots", dots)):
        image = torch.from_numpy(grey)[None, None].expand(1, 3, 64, 64)
        channels = extractor.texture_channels(extractor(image))  # (1, 12, 8, 8)
        stats[name] = channels[0, :, 2:-2, 2:-2].mean((-2, -1))  # inner cells
    coherence_finest = 3  # per scale: magnitude, dog, grey std, coherence
    assert stats["stripes"][coherence_finest] > 2 * stats["dots"][coherence_finest]
