"""The Inspector end to end on a small classic bank built from the synthetic line, plus the
alignment helpers (`align_references`, `mask_moments`) on hand-made masks."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from linewatch.bank_builder import build_bank
from linewatch.config import config_from_dict
from linewatch.detector.bank import BankError
from linewatch.detector.align import aligned_pairs, mask_moments, reference_grids, warp
from linewatch.detector.identity import JITTER
from linewatch.detector.inspector import Batch, Inspector, InputError
from linewatch.detector.measure import object_maps, object_statuses, rows_per_chunk
from linewatch.detector.models import build_models
from linewatch.detector.result import OBJECT_STATUSES, InspectionResult
from linewatch.detector.segment import ObjectMasks
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
    # fused score: the sum over branches of softplus(z_b), how far each is above its good mean;
    # the map adds the branches per pixel, so its peak is at most the score and at least the
    # largest z_b (resizing to the input keeps the peak close)
    assert set(result.components) == {"objects", "patch", "outline", "texture"}
    assert float(result.heatmap.max()) <= result.score * 1.0001 + 1e-6
    assert float(result.heatmap.max()) >= max(result.branch_scores.values()) * 0.8
    softplus = sum(math.log1p(math.exp(z)) for z in result.branch_scores.values())
    assert result.score == pytest.approx(softplus, rel=1e-5, abs=1e-6)
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


def test_part_identity_adds_to_the_object_score_of_a_part_foreign_to_its_place(inspector, bank, config):
    """measure.identity_weight (on by default): every bank part has its place's others in the
    other good images; a good frame's object score is what it is without identity (no good part
    is identity_margin times its place's spread from the nearest good one). A part of another
    kind in its place (wrong_part: washer and nut, long and short screw) adds to it once the
    slots' spread is given no floor; with the default floor (identity.JITTER / identity_margin)
    these outlines, cropped at their own box, are too alike to count, and AMM judges them."""
    slots = inspector.slots
    assert slots.spreads.shape == (2, *bank.object_valid.shape)  # outline_or_moment: two blocks
    assert (slots.spreads[:, bank.object_valid] > 0).all()
    assert min(slots.floors) >= JITTER / config.detector.measure.identity_margin

    def objects_score(image: np.ndarray, identity: bool, floor: float | None = None) -> float:
        floors = slots.floors if floor is None else [floor] * len(slots.floors)
        inspector.slots = dataclasses.replace(slots, floors=floors) if identity else None
        try:
            return inspector.inspect([image])[0].components["objects"]
        finally:
            inspector.slots = slots

    for seed in range(3):
        good = frame(seed)[0]
        assert objects_score(good, True) == pytest.approx(objects_score(good, False), rel=1e-6)
    wrong = [frame(seed, "wrong_part")[0] for seed in range(3)]
    assert all(objects_score(w, True) >= objects_score(w, False) - 1e-6 for w in wrong)
    assert sum(objects_score(w, True, floor=1e-3) > objects_score(w, False) + 1.0 for w in wrong) >= 2


# ---------------------------------------------------------------------------- input errors


@pytest.mark.parametrize("bad, what", [
    (np.zeros((SIM_SIZE, SIM_SIZE), np.uint8), "a grey image; the bank judges colour"),
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


def test_bank_without_part_identities_is_refused_at_construction(bank, config):
    stripped = dataclasses.replace(bank, identities=bank.identities[..., :0])
    with pytest.raises(BankError, match="no part identities; rebuild it"):
        Inspector(config.detector, build_models(config.detector, CPU), stripped, CPU)


def test_bank_calibrated_under_other_scoring_settings_is_refused_naming_them(bank):
    # Fault run: a bank built with k=2 and smoothing 4 served under k=3 and smoothing 2 (now: 2 and 1), with
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
    assert "detector.measure.smoothing_sigma: bank built with 2.0, this config has 1.0" in message
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
    from linewatch.detector.align import mask_boxes

    masks = torch.zeros(3, 20, 30, dtype=torch.bool)
    masks[0, 2:5, 7:19] = True  # x 7..18, y 2..4
    masks[1, 19, 29] = True  # one corner pixel
    boxes = mask_boxes(masks)  # masks[2] empty
    assert boxes.tolist() == [[7, 2, 12, 3], [29, 19, 1, 1], [0, 0, 0, 0]]


def test_pad_masks():
    from linewatch.detector.describe import pad_masks

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
    from linewatch.detector.report import gaussian_blur

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


@pytest.mark.parametrize("h, w, size, sigma", [(56, 56, 224, 2.0), (112, 112, 224, 2.0), (224, 224, 224, 2.0),
                                                (7, 9, 20, 1.0), (6, 6, 24, 0.0), (30, 30, 12, 1.0)])
def test_smoothing_as_matrix_products_is_resize_then_blur(h, w, size, sigma):
    """report.smoothed (two matrix products) is the operator of the bilinear resize followed by
    gaussian_blur: the same maps to float32 rounding, rows and columns, up and down."""
    from linewatch.detector.report import gaussian_blur, smoothed

    raw = torch.rand(3, h, w, generator=torch.Generator().manual_seed(h * w))
    resized = torch.nn.functional.interpolate(raw[:, None], size=(size, size), mode="bilinear", align_corners=False)
    torch.testing.assert_close(smoothed(raw, size, sigma), gaussian_blur(resized[:, 0], sigma), atol=2e-6, rtol=0)


def test_smoothing_keeps_a_constant_map_and_centres_a_spike():
    from linewatch.detector.report import smoothed

    torch.testing.assert_close(smoothed(torch.full((1, 8, 8), 2.5), 32, 2.0), torch.full((1, 32, 32), 2.5))
    spike = torch.zeros(1, 9, 9)
    spike[0, 4, 4] = 1.0
    out = smoothed(spike, 9, 1.0)[0]
    assert int(out.argmax()) == 4 * 9 + 4
    torch.testing.assert_close(out, out.T)


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


# ---------------------------------------------------------------------------- batched measure helpers


def test_mask_boxes_batched_with_empty_masks():
    from linewatch.detector.align import mask_boxes

    masks = torch.zeros(2, 3, 6, 8, dtype=torch.bool)
    masks[0, 0, 1:4, 2:5] = True  # x 2..4, y 1..3
    masks[0, 1] = True  # everything
    masks[1, 0, 5, 0] = True  # bottom-left corner
    masks[1, 1, 0, 7] = True  # top-right corner and a separate pixel: the box spans both
    masks[1, 1, 3, 1] = True
    boxes = mask_boxes(masks)  # masks[0, 2] and masks[1, 2] are empty
    assert boxes.dtype == torch.float32 and boxes.shape == (2, 3, 4)
    assert boxes.tolist() == [[[2, 1, 3, 3], [0, 0, 8, 6], [0, 0, 0, 0]],
                              [[0, 5, 1, 1], [1, 0, 7, 4], [0, 0, 0, 0]]]
    assert mask_boxes(torch.zeros(0, 6, 8, dtype=torch.bool)).shape == (0, 4)


def test_mask_boxes_equal_a_loop_over_random_masks():
    from linewatch.detector.align import mask_boxes

    g = torch.Generator().manual_seed(0)
    masks = torch.rand(40, 9, 13, generator=g) > torch.rand(40, 1, 1, generator=g) ** 0.05  # some empty
    masks[:5] = False
    for mask, box in zip(masks, mask_boxes(masks)):
        ys, xs = np.nonzero(mask.numpy())
        want = [0, 0, 0, 0] if len(ys) == 0 else [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert box.tolist() == want


def test_box_of_support():
    from linewatch.detector.align import box_of_support

    support = torch.zeros(2, 5, 6, dtype=torch.bool)
    support[0, 1, 4] = True
    support[0, 3, 2] = True
    box = box_of_support(support)
    want = torch.zeros(5, 6, dtype=torch.bool)
    want[1:4, 2:5] = True
    assert torch.equal(box[0], want)
    assert not box[1].any()  # an empty support has an empty box


def test_true_indices_equal_nonzero_per_row():
    from linewatch.detector.measure import true_indices

    g = torch.Generator().manual_seed(1)
    mask = torch.rand(4, 30, generator=g) > 0.6
    mask[2] = False
    most = int(mask.sum(1).max())
    got = true_indices(mask, most)
    assert got.shape == (4, most)
    for row, indices in zip(mask, got):
        found = torch.nonzero(row).flatten()
        assert torch.equal(indices[: len(found)], found)
        assert (indices[len(found):] == 30).all()  # padding
    flat = true_indices(mask.view(1, -1), int(mask.sum()))[0]
    assert flat.tolist() == torch.nonzero(mask.view(-1)).flatten().tolist()
    assert true_indices(torch.zeros(1, 5, dtype=torch.bool), 0).shape == (1, 0)


def test_soft_overlaps_equal_min_over_max():
    from linewatch.detector.measure import soft_overlaps

    g = torch.Generator().manual_seed(2)
    masks = torch.rand(5, 40, generator=g) * (torch.rand(5, 40, generator=g) > 0.5)
    masks[4] = 0  # empty
    got = soft_overlaps(masks)
    for i in range(5):
        for j in range(5):
            union = torch.maximum(masks[i], masks[j]).sum()
            want = float(torch.minimum(masks[i], masks[j]).sum() / union) if union > 0 else 0.0
            assert float(got[i, j]) == pytest.approx(want, abs=1e-6)
    assert torch.equal(got.diagonal()[:4], torch.ones(4))


def test_distinct_parts_are_chosen_greedily_in_candidate_order():
    from linewatch.detector.report import distinct_parts as _distinct_parts

    # 0 overlaps 1, 1 overlaps 2, 0 does not overlap 2: 1 goes (it repeats 0), 2 stays (it repeats
    # only 1, which was not reported); 3 is not missing; 4 repeats 2.
    overlap = np.eye(5, dtype=np.float32)
    for a, b in ((0, 1), (1, 2), (2, 4), (3, 4)):
        overlap[a, b] = overlap[b, a] = 0.5
    missing = np.array([True, True, True, False, True])
    assert _distinct_parts(missing, overlap) == [0, 2]
    assert _distinct_parts(np.zeros(5, bool), overlap) == []


def test_to_host_round_trip():
    from linewatch.detector.report import to_host

    tensors = {"maps": torch.rand(2, 3, 4), "flags": torch.tensor([[True, False], [False, True]]),
               "index": torch.tensor([0, 7, 3]), "empty": torch.zeros(0, 4)}
    host = to_host(tensors)
    np.testing.assert_array_equal(host["maps"], tensors["maps"].numpy())
    assert host["flags"].dtype == bool and host["flags"].tolist() == [[True, False], [False, True]]
    assert host["index"].tolist() == [0, 7, 3] and host["empty"].shape == (0, 4)


def _aligned_inputs(inspector, images):
    """A batch through match, and the alignment inputs measure derives from it."""
    batch = inspector.preprocess(Batch(images=images))
    for step in (inspector.backbone, inspector.upsample, inspector.segment, inspector.describe, inspector.match):
        batch = step(batch)
    b, k = batch.references.shape
    m = batch.encoded.valid.shape[1]
    matches = batch.match.matches.view(b, k, m)
    assigned = torch.where(matches >= 0, matches, batch.match.closest.view(b, k, m)).clamp(min=0)
    is_matched = (2 * (matches >= 0).sum(1) >= k) & batch.encoded.valid
    return batch, assigned, is_matched


def test_object_scores_are_each_parts_peak_in_units_of_its_noise(inspector):
    """measure.normalize_objects (on by default): a part's score in the results is the peak of
    its Mahalanobis map (`Batch.object_maps`, as the bank builder reads it) divided by the
    noise level of the reference parts it was compared with, at least the noise floor."""
    assert inspector.config.measure.normalize_objects
    batch = inspector.run(Batch(images=[frame(0)[0], frame(2, "missing")[0], frame(3, "extra")[0]]))
    enc, refs = batch.encoded, batch.references
    assigned = object_statuses(batch.match, enc.valid, refs.shape[1])[0]
    noise = inspector.bank.object_noise[refs[:, :, None], assigned].mean(1).clamp_min(inspector.noise_floor)
    peaks = batch.object_maps.flatten(2).amax(2)
    for bi, result in enumerate(batch.results):
        scored = [o["score"] for o in result.objects if o["status"] != "missing"]  # the valid parts, in order
        assert scored == pytest.approx((peaks[bi] / noise[bi])[enc.valid[bi]].tolist(), abs=1e-4)
        assert scored != pytest.approx(peaks[bi][enc.valid[bi]].tolist(), abs=1e-4)  # the noise is not 1


def test_object_maps_equal_the_full_grid_per_object_and_are_zero_outside_the_box(inspector):
    from linewatch.detector.measure import mahalanobis

    images = [frame(0)[0], frame(2, "missing")[0], frame(3, "extra")[0]]
    batch, assigned, is_matched = _aligned_inputs(inspector, images)
    enc, refs, bank = batch.encoded, batch.references, inspector.bank
    b, m = enc.valid.shape
    k = refs.shape[1]
    c, h, w = enc.upsampled.shape[-3:]
    cfg, chunk = inspector.config.measure, inspector._chunk_floats
    pairs = aligned_pairs(enc.soft_masks, enc.valid, refs, assigned, is_matched, bank.masks,
                          cfg.align_max_shift * max(h, w), math.radians(cfg.align_max_rotation_deg), chunk)
    maps = object_maps(enc.upsampled, refs, bank.features, pairs, int(pairs.in_box.view(b, -1).sum(1).max()), cfg.eps,
                       chunk)
    assert maps.shape == (b, m, h, w)
    for bi in range(b):
        for oi in range(m):
            j = bi * m + oi
            if not enc.valid[bi, oi]:
                assert not maps[bi, oi].any()
                continue
            references = warp(bank.features[refs[bi]].float(), pairs.grids[j]) * pairs.ref_masks[j][:, None]
            query = enc.upsampled[bi] * pairs.query_masks[j]
            full = mahalanobis(query.flatten(1), references.flatten(2), inspector.config.measure.eps).view(h, w)
            torch.testing.assert_close(maps[bi, oi], torch.where(pairs.in_box[j], full, 0.0), rtol=1e-5, atol=1e-6)
            # outside the box of the masks both sides are zero: the map is exactly 0 there
            support = (pairs.query_masks[j] + pairs.ref_masks[j].sum(0)) > 1e-4
            assert support.any() and not (support & ~pairs.in_box[j]).any()
            assert (maps[bi, oi][~pairs.in_box[j]] == 0).all()
            assert maps[bi, oi][pairs.in_box[j]].max() > 0


# ---------------------------------------------------------------------------- host syncs of the measure stage


class _HostReads(TorchFunctionMode):
    """Counts the calls that read tensor data back to the host (each a sync on a GPU): the
    conversions to Python values, the ops whose output size depends on the data, boolean-mask
    indexing, and `.cpu()`."""

    READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "argwhere", "cpu",
             "masked_select", "unique", "unique_consecutive"}

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("__getitem__", "__setitem__"):
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                name = "bool index"
        if name in self.READS or name == "bool index":
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _squares(count: int, size: int = 112) -> torch.Tensor:
    """`count` separate 10 x 10 squares on a 4 x 4 layout: bool masks (count, size, size)."""
    masks = torch.zeros(count, size, size, dtype=torch.bool)
    for i in range(count):
        y, x = 6 + (i // 4) * 27, 6 + (i % 4) * 27
        masks[i, y:y + 10, x:x + 10] = True
    return masks


@pytest.mark.parametrize("objects", [2, 12])
def test_measure_reads_the_host_twice_whatever_the_number_of_objects(inspector, objects):
    """match + measure of a batch read device data on the host exactly twice: the sizes of the
    lists of cells to compute (`read_counts`) and the results (`to_host`) -- not per object."""
    batch = inspector.preprocess(Batch(images=[frame(0)[0], frame(1, "missing")[0], frame(4)[0]]))
    for step in (inspector.backbone, inspector.upsample, inspector.segment):
        batch = step(batch)
    batch.encoded.masks = ObjectMasks.from_list([_squares(objects), _squares(objects), _squares(objects - 1)], (112, 112))
    batch = inspector.describe(batch)
    assert batch.encoded.valid.sum(1).tolist() == [objects, objects, objects - 1]
    with _HostReads() as reads:
        results = inspector.measure(inspector.match(batch)).results
    assert reads.calls == {"tolist": 1, "cpu": 1}, reads.calls
    assert [sum(o["status"] != "missing" for o in r.objects) for r in results] == [objects, objects, objects - 1]


@pytest.mark.cuda
def test_measure_on_cuda_syncs_only_for_its_two_host_reads(bank, config, inspector, monkeypatch):
    """On a GPU, measure runs under torch.cuda.set_sync_debug_mode("error") except inside
    `read_counts` and `to_host`, each called once; its results equal the CPU's on the same batch."""
    from dataclasses import fields

    from linewatch.detector import inspector as inspector_module
    from linewatch.detector import report as report_module

    cuda = torch.device("cuda")
    on_gpu = Inspector(config.detector, build_models(config.detector, cuda), bank, cuda)
    images = [frame(0)[0], frame(2, "missing")[0], frame(3, "extra")[0], frame(5, "scratch")[0]]
    batch = on_gpu.preprocess(Batch(images=images))
    for step in (on_gpu.backbone, on_gpu.upsample, on_gpu.segment, on_gpu.describe, on_gpu.match):
        batch = step(batch)
    calls = {"read_counts": 0, "to_host": 0}

    def allowed(name, fn):
        def run(*args, **kwargs):
            calls[name] += 1
            torch.cuda.set_sync_debug_mode(0)
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("error")
        return run

    monkeypatch.setattr(inspector_module, "read_counts", allowed("read_counts", inspector_module.read_counts))
    monkeypatch.setattr(report_module, "to_host", allowed("to_host", report_module.to_host))  # build_results' copy
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = on_gpu.measure(batch).results
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert calls == {"read_counts": 1, "to_host": 1}

    # the same inputs measured on the CPU
    def to_cpu(value):
        if isinstance(value, torch.Tensor):
            return value.cpu()
        if hasattr(value, "__dataclass_fields__"):
            for f in fields(value):
                setattr(value, f.name, to_cpu(getattr(value, f.name)))
        if isinstance(value, list):
            return [to_cpu(v) for v in value]
        return value

    cpu = inspector.measure(to_cpu(batch)).results
    for g, c in zip(gpu, cpu):
        assert g.score == pytest.approx(c.score, rel=1e-3, abs=1e-4)
        np.testing.assert_allclose(g.heatmap, c.heatmap, rtol=1e-3, atol=1e-3)
        assert [o["status"] for o in g.objects] == [o["status"] for o in c.objects]
        assert [o["bbox"] for o in g.objects] == [o["bbox"] for o in c.objects]


def test_measure_in_small_chunks_gives_the_same_results(inspector, monkeypatch):
    """A small OBJECT_CHUNK_ELEMENTS splits pairs, images and cells into many chunks: same results."""
    images = [frame(0)[0], frame(2, "missing")[0], frame(3, "extra")[0]]
    whole = inspector.inspect(images)
    monkeypatch.setattr(inspector, "OBJECT_CHUNK_ELEMENTS", 20_000)
    assert rows_per_chunk(inspector._chunk_floats, 4 * 2 * 56 * 56) == 1  # one pair at a time in align.aligned_pairs
    chunked = inspector.inspect(images)
    for a, b in zip(chunked, whole):
        assert a.score == pytest.approx(b.score, rel=1e-6, abs=1e-7)
        np.testing.assert_allclose(a.heatmap, b.heatmap, rtol=1e-6, atol=1e-6)
        assert a.objects == b.objects
