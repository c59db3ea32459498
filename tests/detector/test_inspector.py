"""The Inspector end to end on a small classic bank built from the synthetic line, plus the
alignment helpers (`align_references`, `mask_moments`) on hand-made masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from linewatch.bank_builder import build_bank
from linewatch.config import config_from_dict
from linewatch.detector.bank import BankError
from linewatch.detector.inspector import Inspector, InputError, mask_moments, reference_grids, warp
from linewatch.detector.models import build_models
from linewatch.detector.result import OBJECT_STATUSES, InspectionResult
from linewatch.sim import generate_dataset, render

SIM_SIZE = 128
PRODUCT = "screw_tray"
CPU = torch.device("cpu")


def small_config(**classic):
    return config_from_dict({
        "detector": {"image_size": 112, "device": "cpu", "k_references": 2, "classic": classic},
        "calibration": {"min_validation_images": 3},
    })


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    return generate_dataset(root, PRODUCT, seed=0, n_train=8, n_val=4, n_test_good=0, n_test_logical=0,
                            n_test_structural=0, size=SIM_SIZE)


@pytest.fixture(scope="module")
def config():
    return small_config()


@pytest.fixture(scope="module")
def bank(dataset, config):
    return build_bank(config, dataset / "train" / "good", dataset / "validation" / "good", progress=False)


@pytest.fixture(scope="module")
def inspector(bank, config):
    return Inspector(config.detector, build_models(config.detector, CPU), bank, CPU)


def frame(seed: int, anomaly: str | None = None, size: int = SIM_SIZE):
    """Same rng seed with and without the anomaly: the same scene, only the anomaly differs."""
    return render(PRODUCT, np.random.default_rng(1000 + seed), anomaly=anomaly, size=size)


def _bbox_hits_mask(bbox, mask: np.ndarray, margin: int = 3) -> bool:
    """Whether the box [x, y, w, h] overlaps the True pixels of `mask` (with a small margin)."""
    x, y, w, h = bbox
    x0, y0 = max(0, int(math.floor(x)) - margin), max(0, int(math.floor(y)) - margin)
    x1, y1 = int(math.ceil(x + w)) + margin, int(math.ceil(y + h)) + margin
    return bool(mask[y0:y1, x0:x1].any())


# ---------------------------------------------------------------------------- results


def check_result(result: InspectionResult, shape: tuple[int, int], threshold: float) -> None:
    assert isinstance(result, InspectionResult)
    assert result.heatmap.shape == shape
    assert result.heatmap.dtype == np.float32
    assert np.isfinite(result.heatmap).all()
    assert math.isfinite(result.score)
    assert result.threshold == pytest.approx(threshold)
    assert result.verdict == ("fail" if result.score > result.threshold else "pass")
    assert result.backend == "classic"
    assert set(result.timings) >= {"preprocess", "backbone", "upsample", "segment", "describe", "match", "measure"}
    # the score is the peak of the smoothed map (resizing to the input keeps the peak close)
    assert float(result.heatmap.max()) <= result.score * 1.0001 + 1e-6
    assert float(result.heatmap.max()) >= result.score * 0.8
    h, w = shape
    for obj in result.objects:
        assert obj["status"] in OBJECT_STATUSES
        x, y, bw, bh = obj["bbox"]
        assert bw > 0 and bh > 0, obj
        assert x >= 0 and y >= 0 and x + bw <= w + 0.11 and y + bh <= h + 0.11, (obj, shape)
        assert obj["area"] > 0 and obj["area"] <= bw * bh + 1, obj
        assert math.isfinite(obj["score"])


def test_inspect_batch_results(inspector, bank):
    images = [frame(0)[0], frame(1, "missing")[0], frame(2, "scratch")[0]]
    results = inspector.inspect(images)
    assert len(results) == 3
    for result in results:
        check_result(result, (SIM_SIZE, SIM_SIZE), bank.threshold)
    good = results[0]
    assert good.verdict == "pass"
    assert [o["status"] for o in good.objects] == ["matched"] * 6  # screw_tray has 6 parts


def test_inspect_is_independent_of_batching(inspector):
    images = [frame(0)[0], frame(3, "extra")[0]]
    together = inspector.inspect(images)
    alone = [inspector.inspect([img])[0] for img in images]
    for a, b in zip(together, alone):
        assert a.score == pytest.approx(b.score, rel=1e-4, abs=1e-5)
        np.testing.assert_allclose(a.heatmap, b.heatmap, rtol=1e-4, atol=1e-5)
        assert [o["status"] for o in a.objects] == [o["status"] for o in b.objects]


@pytest.mark.parametrize("seed", [0, 2, 5])  # washer, long screw, short screw missing
def test_missing_part_is_reported(inspector, seed):
    good_img, _, _ = frame(seed)
    bad_img, gt, info = frame(seed, "missing")
    assert info["n_parts"] == 5
    good, bad = inspector.inspect([good_img, bad_img])
    assert bad.score > good.score
    assert bad.verdict == "fail"
    missing = [o for o in bad.objects if o["status"] == "missing"]
    assert missing, bad.objects
    # the missing part is reported where the ground truth says the part should be
    assert any(_bbox_hits_mask(o["bbox"], gt) for o in missing), (missing, np.argwhere(gt).mean(0))
    # the anomaly map peaks near the missing part, not elsewhere
    peak = np.unravel_index(np.argmax(bad.heatmap), bad.heatmap.shape)
    ys, xs = np.nonzero(gt)
    assert ys.min() - 12 <= peak[0] <= ys.max() + 12 and xs.min() - 12 <= peak[1] <= xs.max() + 12


@pytest.mark.parametrize("seed", [0, 2, 3])  # extra washer, nut, short screw
def test_extra_part_is_reported(inspector, seed):
    good_img, _, _ = frame(seed)
    bad_img, gt, info = frame(seed, "extra")
    assert info["n_parts"] == 7
    good, bad = inspector.inspect([good_img, bad_img])
    assert bad.score > good.score
    assert len(bad.objects) == len(good.objects) + 1
    extra = [o for o in bad.objects if o["status"] in ("surplus", "unmatched")]
    assert extra, bad.objects
    assert any(_bbox_hits_mask(o["bbox"], gt) for o in extra), (extra, np.argwhere(gt).mean(0))


def test_missing_thin_part_with_jittered_references(inspector):
    good_img, _, _ = frame(1)
    bad_img, gt, info = frame(1, "missing")
    assert info["part"] == "screw_long"
    good, bad = inspector.inspect([good_img, bad_img])
    assert any(o["status"] == "missing" for o in bad.objects)
    assert bad.score > good.score


def test_stages_by_hand_equal_inspect(inspector):
    images = [frame(0)[0], frame(1, "missing")[0], frame(2, "extra")[0]]
    expected = inspector.inspect(images)
    names = [name for name, _ in inspector.stages]
    assert names == ["preprocess", "backbone", "upsample", "segment", "describe", "match_measure"]
    value = images
    for _, fn in inspector.stages:
        value = fn(value)
    assert isinstance(value, list) and len(value) == len(images)
    for got, want in zip(value, expected):
        assert got.score == pytest.approx(want.score, rel=1e-5, abs=1e-6)
        assert got.verdict == want.verdict
        np.testing.assert_allclose(got.heatmap, want.heatmap, rtol=1e-5, atol=1e-6)
        assert got.objects == want.objects


def test_exclude_changes_references(inspector, bank, dataset):
    """Judging a bank image against the bank including itself gives a near-zero map;
    excluding itself (leave-one-out) gives the normal good-image level."""
    from linewatch.images import read_image

    img = read_image(dataset / "train" / "good" / "000.png")
    own = inspector.inspect([img])[0]
    loo = inspector.inspect([img], exclude=torch.tensor([0]))[0]
    assert own.score < loo.score
    assert own.score < 0.5 * bank.threshold


# ---------------------------------------------------------------------------- input errors


@pytest.mark.parametrize("bad, what", [
    (np.zeros((SIM_SIZE, SIM_SIZE), np.uint8), "shape"),
    (np.zeros((SIM_SIZE, SIM_SIZE, 1), np.uint8), "shape"),
    (np.zeros((SIM_SIZE, SIM_SIZE, 4), np.uint8), "shape"),
    (np.zeros((SIM_SIZE, SIM_SIZE, 3), np.float32), "float32"),
    (np.zeros((SIM_SIZE, SIM_SIZE, 3), np.uint16), "uint16"),
    (np.zeros((SIM_SIZE // 2, SIM_SIZE, 3), np.uint8), f"{SIM_SIZE}x{SIM_SIZE // 2}"),
    (np.zeros((SIM_SIZE * 2, SIM_SIZE * 2, 3), np.uint8), f"{SIM_SIZE * 2}x{SIM_SIZE * 2}"),
    ([[0, 0, 0]], "list"),
], ids=["grey2d", "grey3d", "rgba", "float", "uint16", "half-height", "double-size", "not-array"])
def test_bad_input_raises_input_error_naming_the_image(inspector, bad, what):
    good = frame(0)[0]
    with pytest.raises(InputError) as info:
        inspector.inspect([good, bad])
    message = str(info.value)
    assert message.startswith("image 1:"), message
    assert what in message, message


def test_check_image_names_the_image(inspector):
    with pytest.raises(InputError, match=r"^cam3/frame\.png: "):
        inspector.check_image(np.zeros((10, 10), np.uint8), "cam3/frame.png")
    inspector.check_image(frame(0)[0], "fine.png")


# ---------------------------------------------------------------------------- bank identity


def test_bank_from_another_config_is_refused(bank):
    other = small_config(feature_stride=8)
    models = build_models(other.detector, CPU)
    with pytest.raises(BankError) as info:
        Inspector(other.detector, models, bank, CPU)
    message = str(info.value)
    assert bank.bank_id in message
    assert "config_hash" in message
    assert other.detector.identity_hash() in message


def test_bank_from_another_segmenter_threshold_is_refused(bank):
    other = small_config(background_threshold=9.0)
    with pytest.raises(BankError, match="config_hash"):
        Inspector(other.detector, build_models(other.detector, CPU), bank, CPU)


def test_bank_smaller_than_k_is_refused_at_construction(bank):
    data = small_config().model_dump()
    data["detector"]["k_references"] = bank.size + 1
    other = config_from_dict(data)
    with pytest.raises(BankError, match="k_references"):
        Inspector(other.detector, build_models(other.detector, CPU), bank, CPU)


def test_bank_calibrated_under_other_scoring_settings_is_refused_naming_them(bank):
    # Fault run: a bank built with k=2 and smoothing 4 served under k=3 and smoothing 2, with
    # the old threshold, and false rejects went from 1/20 to 5/20 without a word.
    data = small_config().model_dump()
    data["detector"]["k_references"] = 3
    data["detector"]["measure"]["smoothing_sigma"] = 1.0
    data["detector"]["matching"]["match_threshold"] = 0.3
    other = config_from_dict(data)
    with pytest.raises(BankError) as info:
        Inspector(other.detector, build_models(other.detector, CPU), bank, CPU)
    message = str(info.value)
    assert "detector.k_references: bank built with 2, this config has 3" in message
    assert "detector.measure.smoothing_sigma: bank built with 4.0, this config has 1.0" in message
    assert "detector.matching.match_threshold: bank built with 0.2, this config has 0.3" in message


def test_settings_outside_the_fingerprint_accept_the_bank(bank):
    data = small_config().model_dump()
    data["detector"]["device"] = "auto"  # small_config says "cpu"
    data["detector"]["samlad"]["weights_dir"] = "/elsewhere"
    data["runtime"]["pipeline"]["deadline_ms"] = 50.0
    other = config_from_dict(data)
    inspector = Inspector(other.detector, build_models(other.detector, CPU), bank, CPU)
    result = inspector.inspect([frame(0)[0]])[0]
    check_result(result, (SIM_SIZE, SIM_SIZE), bank.threshold)


# ---------------------------------------------------------------------------- mask_moments


def _rect(h=64, w=64, rows=(10, 20), cols=(5, 45)) -> torch.Tensor:
    m = torch.zeros(h, w)
    m[rows[0]:rows[1], cols[0]:cols[1]] = 1.0
    return m


def test_mask_moments_horizontal_rectangle():
    centroid, angle, elongation = mask_moments(_rect())
    assert centroid.tolist() == pytest.approx([24.5, 14.5], abs=1e-4)
    assert float(angle) == pytest.approx(0.0, abs=1e-5)
    # variance of n consecutive pixels is (n^2 - 1) / 12: 40 wide, 10 high
    assert float(elongation) == pytest.approx((40**2 - 1) / (10**2 - 1), rel=1e-4)


def test_mask_moments_vertical_rectangle():
    centroid, angle, elongation = mask_moments(_rect().T.contiguous())
    assert centroid.tolist() == pytest.approx([14.5, 24.5], abs=1e-4)
    assert abs(float(angle)) == pytest.approx(math.pi / 2, abs=1e-5)
    assert float(elongation) == pytest.approx((40**2 - 1) / (10**2 - 1), rel=1e-4)


def test_mask_moments_diagonal_and_square_and_batch():
    diag = torch.zeros(64, 64)
    for i in range(10, 50):
        diag[i, i - 1:i + 2] = 1.0  # image y grows downwards: this runs at +45 degrees in (x, y)
    square = _rect(rows=(20, 30), cols=(30, 40))
    batch = torch.stack([torch.stack([diag, square]), torch.stack([_rect(), _rect().T.contiguous()])])
    centroid, angle, elongation = mask_moments(batch)
    assert centroid.shape == (2, 2, 2) and angle.shape == (2, 2) and elongation.shape == (2, 2)
    assert float(angle[0, 0]) == pytest.approx(math.pi / 4, abs=5e-3)  # band rows are 3 px wide in x only
    assert float(elongation[0, 0]) > 20
    assert centroid[0, 1].tolist() == pytest.approx([34.5, 24.5], abs=1e-4)
    assert float(elongation[0, 1]) == pytest.approx(1.0, abs=1e-4)
    assert float(angle[1, 0]) == pytest.approx(0.0, abs=1e-5)


def test_mask_moments_soft_weights():
    m = torch.zeros(8, 8)
    m[2, 2] = 1.0
    m[2, 6] = 3.0
    centroid, _, _ = mask_moments(m)
    assert centroid.tolist() == pytest.approx([5.0, 2.0], abs=1e-5)


# ---------------------------------------------------------------------------- align_references

def align_references(query_masks, ref_masks, ref_features, allowed, max_shift, max_rotation, min_elongation=1.5):
    """Whole maps moved onto the query objects with the inspector's grids (it warps only boxes)."""
    q, k, c, h, w = ref_features.shape
    grid = reference_grids(query_masks, ref_masks, allowed, max_shift, max_rotation, min_elongation).view(q * k, h, w, 2)
    stacked = torch.cat([ref_features, ref_masks[:, :, None]], dim=2).view(q * k, c + 1, h, w)
    warped = warp(stacked, grid).view(q, k, c + 1, h, w)
    return warped[:, :, :c], warped[:, :, c]



def _shift(t: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift the last two dims by (dy, dx) pixels, filling with zeros (no wrap-around)."""
    out = torch.zeros_like(t)
    h, w = t.shape[-2:]
    ys_dst = slice(max(dy, 0), h + min(dy, 0))
    ys_src = slice(max(-dy, 0), h + min(-dy, 0))
    xs_dst = slice(max(dx, 0), w + min(dx, 0))
    xs_src = slice(max(-dx, 0), w + min(-dx, 0))
    out[..., ys_dst, xs_dst] = t[..., ys_src, xs_src]
    return out


def _query(h=48, w=48, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(h, w)
    mask[18:30, 14:34] = 1.0
    features = torch.zeros(c, h, w)
    features[:, 12:36, 10:38] = torch.rand(c, 24, 28, generator=g) + 0.5  # nothing near the border
    return mask, features


@pytest.mark.parametrize("dy, dx", [(3, -2), (-4, 5), (0, 6), (2, 0), (-1, -1)])
def test_align_undoes_integer_shift(dy, dx):
    q_mask, q_feat = _query()
    r_mask, r_feat = _shift(q_mask, dy, dx), _shift(q_feat, dy, dx)
    feats, masks = align_references(
        q_mask[None], r_mask[None, None], r_feat[None, None], torch.tensor([True]),
        max_shift=10.0, max_rotation=math.radians(20),
    )
    assert feats.shape == (1, 1, 4, 48, 48) and masks.shape == (1, 1, 48, 48)
    torch.testing.assert_close(masks[0, 0], q_mask, atol=1e-4, rtol=0)
    torch.testing.assert_close(feats[0, 0], q_feat, atol=1e-4, rtol=0)


def _bar(angle_deg: float, size: int = 64, length: float = 36, width: float = 6) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    a = math.radians(angle_deg)
    cx = cy = (size - 1) / 2
    u = (xs - cx) * math.cos(a) + (ys - cy) * math.sin(a)
    v = -(xs - cx) * math.sin(a) + (ys - cy) * math.cos(a)
    return ((u.abs() <= length / 2) & (v.abs() <= width / 2)).float()


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.minimum(a, b).sum() / torch.maximum(a, b).sum())


@pytest.mark.parametrize("query_deg, ref_deg", [(10, 25), (30, 15), (85, 100), (0, -12)])
def test_align_turns_rotated_bar_back(query_deg, ref_deg):
    q = _bar(query_deg)
    r = _bar(ref_deg)
    r_feat = torch.stack([r, 2 * r])
    before = _iou(q, r)
    feats, masks = align_references(
        q[None], r[None, None], r_feat[None, None], torch.tensor([True]),
        max_shift=10.0, max_rotation=math.radians(20),
    )
    after = _iou(q, masks[0, 0])
    assert after > 0.85 and after > before + 0.2, (before, after)
    _, angle, _ = mask_moments(masks[0, 0])
    _, q_angle, _ = mask_moments(q)
    diff = (float(angle - q_angle) + math.pi / 2) % math.pi - math.pi / 2
    assert abs(diff) < math.radians(2)
    # features move with the mask
    torch.testing.assert_close(feats[0, 0, 1], 2 * feats[0, 0, 0])
    torch.testing.assert_close(feats[0, 0, 0], masks[0, 0])


def test_align_leaves_pairs_beyond_limits_untouched():
    q_mask, q_feat = _query()
    near = (_shift(q_mask, 2, 1), _shift(q_feat, 2, 1))
    far = (_shift(q_mask, 0, 12), _shift(q_feat, 0, 12))  # 12 px > max_shift 8
    ref_masks = torch.stack([near[0], far[0]])[None]
    ref_feats = torch.stack([near[1], far[1]])[None]
    feats, masks = align_references(q_mask[None], ref_masks, ref_feats, torch.tensor([True]),
                                    max_shift=8.0, max_rotation=math.radians(20))
    torch.testing.assert_close(masks[0, 0], q_mask, atol=1e-4, rtol=0)  # near: aligned
    torch.testing.assert_close(masks[0, 1], far[0], atol=1e-5, rtol=0)  # far: as it was
    torch.testing.assert_close(feats[0, 1], far[1], atol=1e-5, rtol=0)


def test_align_leaves_rotation_beyond_limit_untouched():
    q = _bar(0)
    r = _bar(40)
    feats, masks = align_references(q[None], r[None, None], r[None, None, None], torch.tensor([True]),
                                    max_shift=10.0, max_rotation=math.radians(20))
    torch.testing.assert_close(masks[0, 0], r, atol=1e-5, rtol=0)


def test_align_respects_allowed_flag():
    q_mask, q_feat = _query()
    r_mask, r_feat = _shift(q_mask, 3, 3), _shift(q_feat, 3, 3)
    feats, masks = align_references(
        torch.stack([q_mask, q_mask]), torch.stack([r_mask, r_mask])[:, None], torch.stack([r_feat, r_feat])[:, None],
        torch.tensor([False, True]), max_shift=10.0, max_rotation=math.radians(20),
    )
    torch.testing.assert_close(masks[0, 0], r_mask, atol=1e-5, rtol=0)
    torch.testing.assert_close(feats[0, 0], r_feat, atol=1e-5, rtol=0)
    torch.testing.assert_close(masks[1, 0], q_mask, atol=1e-4, rtol=0)
    torch.testing.assert_close(feats[1, 0], q_feat, atol=1e-4, rtol=0)


def test_align_round_part_is_only_translated():
    """A round part has no principal axis: it is shifted, never turned."""
    ys, xs = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    q = (((xs - 24) ** 2 + (ys - 24) ** 2) <= 64).float()
    r = _shift(q, 2, -3)
    texture = torch.zeros(48, 48)
    texture[20:28, 20:28] = torch.arange(64.0).view(8, 8) / 64 + 0.1  # would show any rotation
    r_feat = _shift(texture, 2, -3)[None]
    feats, masks = align_references(q[None], r[None, None], r_feat[None, None], torch.tensor([True]),
                                    max_shift=10.0, max_rotation=math.radians(20))
    torch.testing.assert_close(masks[0, 0], q, atol=1e-4, rtol=0)
    torch.testing.assert_close(feats[0, 0, 0], texture, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------- small helpers


def test_bank_with_bad_segmenter_state_is_refused(bank, config):
    from dataclasses import replace

    from linewatch.detector.segment import SegmenterError

    broken = replace(bank, segmenter_state={"mean": torch.zeros(4), "cov": torch.eye(3)})
    with pytest.raises(SegmenterError, match="mean"):
        Inspector(config.detector, build_models(config.detector, CPU), broken, CPU)
    with pytest.raises(SegmenterError, match="cov"):
        Inspector(config.detector, build_models(config.detector, CPU), replace(bank, segmenter_state={"mean": torch.zeros(3)}), CPU)


def test_mask_boxes_exact():
    from linewatch.detector.inspector import mask_boxes

    masks = torch.zeros(3, 20, 30, dtype=torch.bool)
    masks[0, 2:5, 7:19] = True  # x 7..18, y 2..4
    masks[1, 19, 29] = True  # one corner pixel
    boxes = mask_boxes(masks)  # masks[2] empty
    assert boxes.tolist() == [[7, 2, 12, 3], [29, 19, 1, 1], [0, 0, 0, 0]]


def test_pad_masks():
    from linewatch.detector.inspector import pad_masks

    a = torch.zeros(2, 16, 16, dtype=torch.bool)
    a[0, :8, :8] = True
    a[1, 8:, 4:12] = True
    b = torch.zeros(0, 16, 16, dtype=torch.bool)
    c = torch.zeros(1, 16, 16, dtype=torch.bool)
    c[0, 4:12, 4:12] = True
    soft, valid, boxes = pad_masks([a, b, c], (8, 8), CPU)
    assert soft.shape == (3, 2, 8, 8) and valid.shape == (3, 2) and boxes.shape == (3, 2, 4)
    assert valid.tolist() == [[True, True], [False, False], [True, False]]
    assert not soft[1].any() and not soft[2, 1].any() and not boxes[1].any()
    # boxes stay in the masks' own (working) pixels, not feature pixels
    assert boxes[0].tolist() == [[0, 0, 8, 8], [4, 8, 8, 8]]
    assert boxes[2, 0].tolist() == [4, 4, 8, 8]
    assert soft[0, 0, :4, :4].min() > 0.99 and soft[0, 0, 4:, :].max() < 0.01
    assert soft[2, 0].sum() == pytest.approx(16, abs=1e-3)  # 8 x 8 of 16 x 16 -> 4 x 4 of 8 x 8


def test_gaussian_blur():
    from linewatch.detector.inspector import gaussian_blur

    maps = torch.rand(2, 20, 24)
    assert torch.equal(gaussian_blur(maps, 0.0), maps)
    flat = torch.full((1, 20, 24), 3.0)
    torch.testing.assert_close(gaussian_blur(flat, 2.0), flat)  # reflect padding: no dark border
    spike = torch.zeros(1, 21, 21)
    spike[0, 10, 10] = 1.0
    out = gaussian_blur(spike, 1.5)[0]
    assert out.shape == (21, 21)
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-5)
    assert int(out.argmax()) == 10 * 21 + 10
    torch.testing.assert_close(out, out.T)
    torch.testing.assert_close(out, out.flip(0))
    assert float(out.max()) < 1.0 and float(out.max()) <= float(gaussian_blur(spike, 1.0).max())


def test_to_images01():
    from linewatch.detector.inspector import to_images01

    img = np.zeros((30, 40, 3), np.uint8)
    img[..., 0] = 255  # red
    img[..., 2] = 51
    out = to_images01([img, img], 20, CPU)
    assert out.shape == (2, 3, 20, 20) and out.dtype == torch.float32
    torch.testing.assert_close(out[:, 0], torch.ones(2, 20, 20))
    torch.testing.assert_close(out[:, 1], torch.zeros(2, 20, 20))
    torch.testing.assert_close(out[:, 2], torch.full((2, 20, 20), 0.2))
