"""Segmenters: the area filter, the weights-free ClassicSegmenter on the synthetic line, and
the SAM wrapper's plumbing with a tiny random SAM (its masks mean nothing, only shapes do)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from linewatch.config import SamConfig
from linewatch.detector.segment import (
    AreaFilter,
    ClassicSegmenter,
    SamSegmenter,
    SegmenterError,
    build_sam_segmenter,
    build_tiny_sam,
    interior_points,
    load_sam_weights,
)
from linewatch.detector.weights import WeightsError
from linewatch.sim import PRODUCTS, render

# What AreaFilter() and ClassicSegmenter(area_filter) were before the constructors lost their
# defaults (they live in linewatch.config only): these tests keep their numbers.
WIDE = dict(min_area=0.001, max_area=0.5, max_objects=32)
THRESHOLD = 4.0


def _to01(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [0, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255.0


def _boxes(areas: list[int], H: int = 10, W: int = 10) -> torch.Tensor:
    """(M, H, W) masks whose m-th mask has exactly areas[m] pixels (first pixels row-major)."""
    m = torch.zeros(len(areas), H * W, dtype=torch.bool)
    for i, a in enumerate(areas):
        m[i, :a] = True
    return m.view(len(areas), H, W)


# ----------------------------------------------------------------------------- interior_points


def test_interior_point_of_a_rectangle_is_its_centre_cell() -> None:
    masks = torch.zeros(1, 8, 10)
    masks[0, 2:5, 3:8] = 1  # rows 2..4, columns 3..7: the centre cell is (row 3, column 5)
    assert interior_points(masks)[0].tolist() == pytest.approx([5.5 / 10, 3.5 / 8])


def test_interior_point_of_a_ring_lies_on_the_ring_not_in_its_hole() -> None:
    ring = torch.zeros(8, 10)
    ring[1:7, 1:9] = 1
    ring[3:5, 3:7] = 0  # the hole holds the centroid (row 3.5, column 4.5)
    x, y = interior_points(ring[None])[0].tolist()
    row, col = int(y * 8), int(x * 10)
    assert ring[row, col] == 1
    assert (row, col) == (2, 4)  # one of the ring cells nearest the centroid, the first of them


def test_interior_point_prefers_the_thick_part_of_an_l_shape() -> None:
    shape = torch.zeros(12, 12)
    shape[1:11, 1:3] = 1  # a thin bar, 2 cells wide
    shape[6:11, 1:8] = 1  # a thick foot, 5 cells high
    x, y = interior_points(shape[None])[0].tolist()
    row, col = int(y * 12), int(x * 12)
    assert 7 <= row <= 9 and 3 <= col <= 5  # deep in the foot, 2 erosions from every edge


def test_interior_points_keep_leading_shape_and_empty_masks_give_the_centre() -> None:
    masks = torch.zeros(2, 3, 6, 6)
    masks[1, 2, 0:2, 0:2] = 0.9  # soft mask above the 0.5 threshold
    points = interior_points(masks)
    assert points.shape == (2, 3, 2)
    assert points[0, 0].tolist() == [0.5, 0.5]
    # the four cells tie in depth and in distance to the centroid: the first, row-major, wins
    assert points[1, 2].tolist() == pytest.approx([0.5 / 6, 0.5 / 6])


def test_interior_point_of_a_part_cut_by_the_border_stays_off_the_border() -> None:
    masks = torch.zeros(1, 10, 10)
    masks[0, 0:5, 2:7] = 1  # cut by the top edge: the edge is not inside the part
    x, y = interior_points(masks)[0].tolist()
    assert int(y * 10) == 2 and int(x * 10) == 4


# ----------------------------------------------------------------------------- AreaFilter


def test_area_filter_keeps_range_sorted_desc() -> None:
    # 100-pixel image: areas 0.05, 0.30, 0.01, 0.60, 0.20 -> in [0.02, 0.5]: 0.30, 0.20, 0.05
    masks = _boxes([5, 30, 1, 60, 20])
    out = AreaFilter(min_area=0.02, max_area=0.5, max_objects=32).apply(masks)
    assert out.dtype == torch.bool
    assert out.flatten(1).sum(1).tolist() == [30, 20, 5]


def test_area_filter_bounds_inclusive_and_cap_keeps_largest() -> None:
    masks = _boxes([2, 50, 10, 51, 3])
    f = AreaFilter(min_area=0.02, max_area=0.5, max_objects=2)
    assert f.apply(masks).flatten(1).sum(1).tolist() == [50, 10]  # 0.02 and 0.5 in, 0.51 out; cap 2
    assert f.select(np.array([2, 50, 10, 51, 3]), 100) == [1, 2]


def test_area_filter_ties_keep_input_order_and_empty() -> None:
    masks = _boxes([10, 20, 10])
    masks[2] = torch.roll(masks[2], 50)  # same area, different pixels
    out = AreaFilter(0.0, 1.0, 32).apply(masks)
    assert torch.equal(out, masks[[1, 0, 2]])
    empty = AreaFilter(**WIDE).apply(torch.zeros(0, 10, 10, dtype=torch.bool))
    assert empty.shape == (0, 10, 10)


# ----------------------------------------------------------------------------- Classic


@pytest.fixture(scope="module")
def fitted() -> dict[str, ClassicSegmenter]:
    segs = {}
    for product in PRODUCTS:
        good = torch.stack([_to01(render(product, np.random.default_rng([1, i]))[0]) for i in range(6)])
        segs[product] = ClassicSegmenter(AreaFilter(**WIDE), THRESHOLD).fit(good)
    return segs


# The sim keeps parts apart by a clearance (4.5% of the side) and chips never cut a part in
# two, so each part is exactly one connected component: the counts must match exactly
# (checked offline on 60 seeds x 8 cases per product, threshold 3..6, sizes 224 and 256).
@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("anomaly, delta", [(None, 0), ("missing", -1), ("extra", +1), ("wrong_place", 0)])
def test_classic_counts_parts(fitted: dict[str, ClassicSegmenter], product: str, anomaly: str | None,
                              delta: int) -> None:
    n_good = len(render(product, np.random.default_rng(0))[2]["parts"])
    images, infos = [], []
    for seed in range(4):
        image, _, info = render(product, np.random.default_rng([7, seed]), anomaly)
        images.append(_to01(image))
        infos.append(info)
    masks = fitted[product](torch.stack(images))
    assert len(masks) == 4
    for m, info in zip(masks, infos):
        assert m.dtype == torch.bool and m.shape[1:] == (256, 256)
        assert len(m) == n_good + delta == info["n_parts"]
        areas = m.flatten(1).sum(1)
        assert torch.all(areas[:-1] >= areas[1:])  # sorted by area, descending
        assert not (m.sum(0) > 1).any()  # components never overlap


def test_classic_masks_cover_the_parts(fitted: dict[str, ClassicSegmenter]) -> None:
    # the "missing" ground truth is the absent part's footprint: no mask may lie there,
    # while in the good twin of the same frame one mask covers most of it
    rng_a, rng_b = np.random.default_rng(11), np.random.default_rng(11)
    good, _, _ = render("screw_tray", rng_a)
    bad, gt, _ = render("screw_tray", rng_b, "missing")
    seg = fitted["screw_tray"]
    m_good, m_bad = seg(torch.stack([_to01(good), _to01(bad)]))
    gt_t = torch.from_numpy(gt)
    assert (m_bad & gt_t).sum() == 0
    assert (m_good & gt_t).flatten(1).sum(1).max() > 0.8 * gt_t.sum()


def test_classic_state_dict_round_trip(fitted: dict[str, ClassicSegmenter]) -> None:
    seg = fitted["breakfast_box"]
    state = seg.state_dict()
    assert set(state) == {"mean", "cov"} and all(isinstance(v, torch.Tensor) for v in state.values())
    fresh = ClassicSegmenter(AreaFilter(**WIDE), THRESHOLD)
    with pytest.raises(SegmenterError, match="not fitted"):
        fresh(torch.zeros(1, 3, 32, 32))
    fresh.load_state_dict(state)
    x = torch.stack([_to01(render("breakfast_box", np.random.default_rng([3, i]), "extra")[0]) for i in range(2)])
    for a, b in zip(seg(x), fresh(x)):
        assert torch.equal(a, b)
    assert fresh.identity == seg.identity
    with pytest.raises(SegmenterError, match="cov"):
        fresh.load_state_dict({"mean": state["mean"]})



def test_classic_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        ClassicSegmenter(AreaFilter(**WIDE), THRESHOLD).fit(torch.zeros(3, 8, 8))


# ----------------------------------------------------------------------------- SAM


@pytest.fixture(scope="module")
def tiny_sam() -> torch.nn.Module:
    return build_tiny_sam(seed=0)


@pytest.mark.parametrize("generator", ["batched", "segment_anything"])
def test_sam_segmenter_runs_with_tiny_model(tiny_sam: torch.nn.Module, generator: str) -> None:
    area_filter = AreaFilter(min_area=0.0, max_area=1.0, max_objects=3)
    # random weights: with thresholds at 0 something survives; 2x2 points keeps it ~2 s an image
    seg = SamSegmenter(tiny_sam, area_filter, SamConfig(points_per_side=2, points_per_batch=4, pred_iou_thresh=0.0,
                                                       stability_score_thresh=0.0, generator=generator),
                       model_name="tiny")
    images = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    out = seg(images)
    assert len(out) == 2
    for masks in out:
        assert masks.dtype == torch.bool and masks.ndim == 3 and masks.shape[1:] == (48, 64)
        assert 1 <= len(masks) <= 3
        frac = masks.flatten(1).sum(1).float() / (48 * 64)
        assert torch.all((frac >= 0.0) & (frac <= 1.0))
        assert torch.all(frac[:-1] >= frac[1:])
    assert "tiny" in seg.identity and "points_per_side=2" in seg.identity and f"generator={generator}" in seg.identity


def test_sam_segmenter_segments_the_frame_and_returns_working_size_masks(tiny_sam: torch.nn.Module) -> None:
    """The frame (here 256 x 192) is what SAM sees; masks come back at the working size (64 x 64)."""
    seen = {}

    class Recorder:
        def padded(self, frames, points, valid, output_size):
            seen.update(frames=frames, points=points, valid=valid, output_size=output_size)
            masks = torch.zeros(1, 4, *output_size, dtype=torch.bool)
            masks[0, 0, :10], masks[0, 1, :40], masks[0, 2, :20] = True, True, True
            valid = torch.tensor([[True, True, True, False]])  # the fourth: padding
            return type("P", (), {"masks": masks, "valid": valid})()

    seg = SamSegmenter(tiny_sam, AreaFilter(0.0, 1.0, 2), SamConfig(points_per_side=2))
    seg.generator = Recorder()
    frames = torch.randint(0, 256, (1, 192, 256, 3), dtype=torch.uint8)
    (masks,) = seg(torch.rand(1, 3, 64, 64), frames=frames)
    assert seen["frames"] is frames and seen["output_size"] == (64, 64)
    # the 2 x 2 grid at 1/4 and 3/4 of each side, in frame pixels (x, y)
    assert seen["points"][0].tolist() == [[64.0, 48.0], [192.0, 48.0], [64.0, 144.0], [192.0, 144.0]]
    assert masks.shape == (2, 64, 64) and masks.flatten(1).sum(1).tolist() == [40 * 64, 20 * 64]  # largest two


def test_reference_seeded_prompts_are_the_seeds_then_the_coarse_grid(tiny_sam: torch.nn.Module) -> None:
    seen = {}

    class Recorder:
        def padded(self, frames, points, valid, output_size):
            seen.update(points=points, valid=valid)
            b = frames.shape[0]
            return type("P", (), {"masks": torch.zeros(b, 1, *output_size, dtype=torch.bool),
                                  "valid": torch.zeros(b, 1, dtype=torch.bool)})()

    seg = SamSegmenter(tiny_sam, AreaFilter(0.0, 1.0, 2),
                       SamConfig(prompts="reference_seeded", coarse_points_per_side=1, points_per_side=2))
    assert seg.wants_seeds and seg.wants_frames
    seg.generator = Recorder()
    frames = torch.zeros((2, 100, 200, 3), dtype=torch.uint8)
    seeds = torch.tensor([[[0.1, 0.2], [0.5, 0.5]], [[0.9, 0.8], [0.0, 0.0]]])
    seed_valid = torch.tensor([[True, True], [True, False]])
    out = seg(torch.rand(2, 3, 32, 32), frames=frames, seeds=(seeds, seed_valid))
    assert [m.shape for m in out] == [(0, 32, 32), (0, 32, 32)]
    assert seen["points"].tolist() == [[[20.0, 20.0], [100.0, 50.0], [100.0, 50.0]],
                                       [[180.0, 80.0], [0.0, 0.0], [100.0, 50.0]]]
    assert seen["valid"].tolist() == [[True, True, True], [True, False, True]]
    # without seeds (the bank's own good images, segmented before there are references): the full grid
    seg(torch.rand(2, 3, 32, 32), frames=frames)
    assert seen["points"][0].tolist() == [[50.0, 25.0], [150.0, 25.0], [50.0, 75.0], [150.0, 75.0]]
    assert seen["valid"].all()


def test_sam_segmenter_refuses_unknown_or_unsupported_settings(tiny_sam: torch.nn.Module) -> None:
    with pytest.raises(SegmenterError, match="unknown SAM generator"):
        SamSegmenter(tiny_sam, AreaFilter(**WIDE), SamConfig.model_construct(generator="fast"))
    with pytest.raises(SegmenterError, match="unknown SAM prompt strategy"):
        SamSegmenter(tiny_sam, AreaFilter(**WIDE), SamConfig.model_construct(prompts="boxes"))
    with pytest.raises(SegmenterError, match="grid prompts only"):
        SamSegmenter(tiny_sam, AreaFilter(**WIDE), SamConfig(generator="segment_anything", prompts="reference_seeded"))


class _StubGenerator:
    """Stands in for SamAutomaticMaskGenerator: fixed records with known areas."""

    def __init__(self, areas: list[int], H: int, W: int) -> None:
        self.records = []
        for a in areas:
            seg = np.zeros(H * W, bool)
            seg[:a] = True
            self.records.append({"segmentation": seg.reshape(H, W), "area": a})

    def generate(self, image: np.ndarray) -> list[dict]:
        assert image.dtype == np.uint8 and image.shape[2] == 3
        return self.records


def test_sam_segmenter_filters_by_record_area(tiny_sam: torch.nn.Module) -> None:
    seg = SamSegmenter(tiny_sam, AreaFilter(min_area=0.05, max_area=0.5, max_objects=32),
                       SamConfig(generator="segment_anything"))
    seg.generator = _StubGenerator([4, 60, 10, 30, 50], 10, 10)  # fractions .04 .6 .1 .3 .5
    (masks,) = seg(torch.rand(1, 3, 10, 10))
    assert masks.flatten(1).sum(1).tolist() == [50, 30, 10]
    seg.generator = _StubGenerator([1], 10, 10)
    (masks,) = seg(torch.rand(1, 3, 10, 10))
    assert masks.shape == (0, 10, 10) and masks.dtype == torch.bool


def test_sam_weights_missing_key_names_file_and_key(tiny_sam: torch.nn.Module, tmp_path: Path) -> None:
    state = tiny_sam.state_dict()
    dropped = "mask_decoder.iou_prediction_head.layers.2.bias"
    assert dropped in state
    del state[dropped]
    path = tmp_path / "tiny_sam_broken.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as info:
        load_sam_weights(build_tiny_sam(seed=1), path)
    assert str(path) in str(info.value) and dropped in str(info.value)

    # a good file loads, strictly, and reproduces the weights
    good = tmp_path / "tiny_sam.pth"
    torch.save(tiny_sam.state_dict(), good)
    other = build_tiny_sam(seed=1)
    load_sam_weights(other, good)
    for k, v in tiny_sam.state_dict().items():
        assert torch.equal(v, other.state_dict()[k])


def test_build_sam_segmenter_errors(tmp_path: Path) -> None:
    with pytest.raises(SegmenterError, match="vit_x"):
        build_sam_segmenter(SamConfig.model_construct(kind="vit_x"), None, AreaFilter(**WIDE))
    with pytest.raises(WeightsError, match="nowhere.pth"):
        build_sam_segmenter(SamConfig(kind="vit_b"), tmp_path / "nowhere.pth", AreaFilter(**WIDE))
    partial = tmp_path / "sam_vit_b_partial.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1)}, partial)
    with pytest.raises(WeightsError) as info:
        build_sam_segmenter(SamConfig(kind="vit_b"), partial, AreaFilter(**WIDE))
    assert str(partial) in str(info.value) and "missing keys" in str(info.value)
    assert "image_encoder.blocks.0.attn.proj.bias" in str(info.value)  # first missing key, sorted


# ----------------------------------------------------------------------------- the Segmenter protocol


def test_every_segmenter_declares_its_capabilities(tiny_sam: torch.nn.Module) -> None:
    """The detector reads wants_frames / wants_seeds / compile_encoder as declared, never probes for them."""
    from linewatch.detector.segment import Segmenter

    classic = ClassicSegmenter(AreaFilter(**WIDE), THRESHOLD)
    grid = SamSegmenter(tiny_sam, AreaFilter(**WIDE), SamConfig())
    seeded = SamSegmenter(tiny_sam, AreaFilter(**WIDE), SamConfig(prompts="reference_seeded"))
    for seg in (classic, grid, seeded):
        assert isinstance(seg, Segmenter)
    assert (classic.wants_frames, classic.wants_seeds) == (False, False)
    assert (grid.wants_frames, grid.wants_seeds) == (True, False)
    assert (seeded.wants_frames, seeded.wants_seeds) == (True, True)
    classic.compile_encoder()  # nothing to compile, and no error


def test_models_refuse_a_segmenter_that_does_not_declare_its_capabilities() -> None:
    from linewatch.config import DetectorConfig
    from linewatch.detector.backends.base import Models, build_dcga
    from linewatch.detector.backbone import ClassicFeatures
    from linewatch.detector.upsample import ClassicJointBilateralUpsampler

    class Bare:  # callable with an identity, but says nothing about frames, seeds or compiling
        identity = "bare"

        def __call__(self, images01, frames=None, seeds=None):
            return [torch.zeros(0, *images01.shape[-2:], dtype=torch.bool)] * images01.shape[0]

    with pytest.raises(TypeError, match="wants_frames.*wants_seeds.*compile_encoder"):
        Models(backbone=ClassicFeatures(stride=4, position_gain=2.0),
               upsampler=ClassicJointBilateralUpsampler(num_stages=1), segmenter=Bare(),
               dcga=build_dcga(DetectorConfig()))


def test_area_filter_from_config_is_detector_objects() -> None:
    from linewatch.config import ObjectFilterConfig

    objects = ObjectFilterConfig(min_area=0.01, max_area=0.4, max_objects=5)
    assert AreaFilter.from_config(objects) == AreaFilter(min_area=0.01, max_area=0.4, max_objects=5)


def test_area_filter_select_padded_equals_select_row_by_row() -> None:
    g = torch.Generator().manual_seed(0)
    areas = torch.randint(0, 60, (5, 12), generator=g)
    areas[:, 3] = areas[:, 4]  # ties keep input order
    valid = torch.rand(5, 12, generator=g) > 0.2
    f = AreaFilter(min_area=0.1, max_area=0.5, max_objects=4)
    order, kept = f.select_padded(areas, valid, 100)
    assert order.shape == kept.shape == (5, 4)
    for b in range(5):
        real = valid[b].nonzero().squeeze(1)
        expected = [int(real[i]) for i in f.select(areas[b][real], 100)]
        assert order[b][kept[b]].tolist() == expected
        assert kept[b].tolist() == [True] * len(expected) + [False] * (4 - len(expected))
