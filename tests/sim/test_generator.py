"""The synthetic line: layout on disk, determinism, and ground truth that means something."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from linewatch.sim import (
    ALL_ANOMALIES,
    ALL_PRODUCTS,
    ANOMALIES,
    IDENTITY_PRODUCTS,
    KNOWN_PRODUCTS,
    LOGICAL_ANOMALIES,
    PRODUCTS,
    SHAPE_ANOMALIES,
    SHAPE_PRODUCTS,
    STRUCTURAL_ANOMALIES,
    generate_dataset,
    product_anomalies,
    render,
)
from linewatch.sim.generator import DRAWERS, PRODUCT_SPECS, Part, _Clearance, defect_pixel_value

COUNTS = dict(n_train=3, n_val=2, n_test_good=2, n_test_logical=4, n_test_structural=3)
# every (product, anomaly) pair the generator knows, each product with its own list
PRODUCT_ANOMALIES = [(p, a) for p in KNOWN_PRODUCTS for a in product_anomalies(p)[0] + product_anomalies(p)[1]]
# the products whose logical anomalies change a part's shape only (char_tray's too)
IN_PLACE_PRODUCTS = SHAPE_PRODUCTS + IDENTITY_PRODUCTS


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sim")
    generate_dataset(root, "screw_tray", seed=5, size=96, **COUNTS)
    return root / "screw_tray"


def test_layout_and_counts(dataset: Path) -> None:
    def n(rel: str) -> int:
        return len(list((dataset / rel).glob("*.png")))

    assert n("train/good") == 3 and n("validation/good") == 2 and n("test/good") == 2
    assert n("test/logical_anomalies") == 4 and n("test/structural_anomalies") == 3
    assert sorted(p.name for p in (dataset / "train/good").iterdir()) == ["000.png", "001.png", "002.png"]
    for category, count in (("logical_anomalies", 4), ("structural_anomalies", 3)):
        dirs = sorted(p.name for p in (dataset / "ground_truth" / category).iterdir())
        assert dirs == [f"{i:03d}" for i in range(count)]
        for d in dirs:
            assert [p.name for p in (dataset / "ground_truth" / category / d).iterdir()] == ["000.png"]
    assert not (dataset / "ground_truth" / "good").exists()

    image = cv2.imread(str(dataset / "test/good/000.png"), cv2.IMREAD_UNCHANGED)
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8

    config = json.loads((dataset / "defects_config.json").read_text())
    assert {c["defect_name"] for c in config} == set(ANOMALIES)
    for c in config:
        assert set(c) == {"defect_name", "pixel_value", "saturation_threshold", "relative_saturation"}

    manifest = json.loads((dataset / "manifest.json").read_text())
    images = manifest["images"]
    assert len(images) == 2 + 4 + 3
    assert [images[f"test/logical_anomalies/{i:03d}.png"]["anomaly"] for i in range(4)] == list(LOGICAL_ANOMALIES)
    assert [images[f"test/structural_anomalies/{i:03d}.png"]["anomaly"] for i in range(3)] == list(STRUCTURAL_ANOMALIES)
    assert images["test/good/000.png"]["anomaly"] is None


def test_ground_truth_masks(dataset: Path) -> None:
    for category in ("logical_anomalies", "structural_anomalies"):
        for d in (dataset / "ground_truth" / category).iterdir():
            gt = cv2.imread(str(d / "000.png"), cv2.IMREAD_UNCHANGED)
            assert gt.shape == (96, 96) and gt.dtype == np.uint8
            anomaly = json.loads((dataset / "manifest.json").read_text())["images"][
                f"test/{category}/{d.name}.png"]["anomaly"]
            # non-empty and binary, marked with the defect type's own value
            assert set(np.unique(gt)) == {0, defect_pixel_value("screw_tray", anomaly)}


def test_deterministic_bytes(dataset: Path, tmp_path: Path) -> None:
    generate_dataset(tmp_path, "screw_tray", seed=5, size=96, **COUNTS)
    assert _files(tmp_path / "screw_tray") == _files(dataset)
    other = tmp_path / "other"
    generate_dataset(other, "screw_tray", seed=6, size=96, n_train=1, n_val=0, n_test_good=0,
                     n_test_logical=0, n_test_structural=0)
    assert (other / "screw_tray/train/good/000.png").read_bytes() != (dataset / "train/good/000.png").read_bytes()


@pytest.mark.parametrize("product", KNOWN_PRODUCTS)
def test_good_frames_vary_but_have_no_ground_truth(product: str) -> None:
    a, gt_a, info = render(product, np.random.default_rng(1))
    b, gt_b, _ = render(product, np.random.default_rng(2))
    assert a.shape == (256, 256, 3) and a.dtype == np.uint8
    assert not gt_a.any() and not gt_b.any()
    assert info["anomaly"] is None and info["category"] == "good"
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1.0  # jitter, lighting, noise
    # same state, same frame
    c, _, _ = render(product, np.random.default_rng(1))
    assert np.array_equal(a, c)


@pytest.mark.parametrize("product, anomaly", PRODUCT_ANOMALIES)
def test_anomaly_changes_pixels_inside_its_mask(product: str, anomaly: str) -> None:
    for seed in range(3):
        good, _, good_info = render(product, np.random.default_rng([4, seed]))
        bad, gt, info = render(product, np.random.default_rng([4, seed]), anomaly)
        assert gt.dtype == bool and gt.any()
        assert info["anomaly"] == anomaly and info["part"] is not None
        expected = "logical_anomalies" if anomaly in product_anomalies(product)[0] else "structural_anomalies"
        assert info["category"] == expected
        n_good = good_info["n_parts"]
        assert info["n_parts"] == n_good + {"missing": -1, "extra": 1}.get(anomaly, 0)

        diff = np.abs(bad.astype(np.int16) - good.astype(np.int16)).max(2)
        # inside: the anomaly is visible (mean change well above sensor noise, ~3 grey levels)
        assert diff[gt].mean() > 20, (anomaly, seed, diff[gt].mean())
        # outside: the same scene, except anti-aliased pixels at the mask's edge
        ring = cv2.dilate(gt.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        assert diff[~ring].max() == 0, (anomaly, seed)


def test_render_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="product"):
        render("teapot", np.random.default_rng(0))
    with pytest.raises(ValueError, match="anomaly"):
        render("screw_tray", np.random.default_rng(0), "dent")
    # each product takes only its own anomalies
    with pytest.raises(ValueError, match="anomaly"):
        render("screw_tray", np.random.default_rng(0), "mirrored")
    with pytest.raises(ValueError, match="anomaly"):
        render("glyph_tray", np.random.default_rng(0), "missing")
    with pytest.raises(ValueError, match="anomaly"):
        render("glyph_tray", np.random.default_rng(0), "wrong_texture")  # no granular part there


# ----------------------------------------------------------------------------- per-product lists


def test_product_and_anomaly_names() -> None:
    # the names older importers use keep their values: the demo cycles ANOMALIES on PRODUCTS
    assert PRODUCTS == ("screw_tray", "breakfast_box")
    assert ANOMALIES == LOGICAL_ANOMALIES + STRUCTURAL_ANOMALIES
    assert LOGICAL_ANOMALIES == ("missing", "extra", "wrong_place", "wrong_part")
    assert ALL_PRODUCTS == PRODUCTS + SHAPE_PRODUCTS
    assert set(SHAPE_PRODUCTS) >= {"glyph_tray", "bracket_kit"}
    assert KNOWN_PRODUCTS == ALL_PRODUCTS + IDENTITY_PRODUCTS == tuple(PRODUCT_SPECS)
    assert "char_tray" in IDENTITY_PRODUCTS and "char_tray" not in ALL_PRODUCTS
    assert ALL_ANOMALIES == ANOMALIES + SHAPE_ANOMALIES
    for product in PRODUCTS:
        assert product_anomalies(product) == (LOGICAL_ANOMALIES, STRUCTURAL_ANOMALIES)
    for product in IN_PLACE_PRODUCTS:
        logical, structural = product_anomalies(product)
        assert set(logical) <= set(SHAPE_ANOMALIES)
        assert {"wrong_shape", "mirrored", "swapped", "rotated"} <= set(logical)
        assert structural == STRUCTURAL_ANOMALIES
    assert "wrong_texture" in product_anomalies("bracket_kit")[0]
    with pytest.raises(ValueError, match="product"):
        product_anomalies("teapot")


@pytest.mark.parametrize("product", IN_PLACE_PRODUCTS)
def test_shape_product_dataset(product: str, tmp_path: Path) -> None:
    logical, structural = product_anomalies(product)
    counts = dict(n_train=1, n_val=1, n_test_good=1, n_test_logical=len(logical) + 1,
                  n_test_structural=len(structural))
    out = generate_dataset(tmp_path / "a", product, seed=3, size=96, **counts)
    config = json.loads((out / "defects_config.json").read_text())
    assert [c["defect_name"] for c in config] == list(logical + structural)
    assert {c["defect_name"]: c["saturation_threshold"] for c in config} == {
        **{a: 0.5 for a in logical}, **{a: 1.0 for a in structural}}
    # one pixel value per defect type (the official evaluator finds a region's entry by it)
    assert [c["pixel_value"] for c in config] == [255 - i for i in range(len(config))]
    images = json.loads((out / "manifest.json").read_text())["images"]
    assert [images[f"test/logical_anomalies/{i:03d}.png"]["anomaly"] for i in range(len(logical) + 1)] == [
        *logical, logical[0]]
    assert [images[f"test/structural_anomalies/{i:03d}.png"]["anomaly"] for i in range(len(structural))] == [
        *structural]
    for category, n in (("logical_anomalies", len(logical) + 1), ("structural_anomalies", len(structural))):
        for i in range(n):
            gt = cv2.imread(str(out / "ground_truth" / category / f"{i:03d}" / "000.png"), cv2.IMREAD_UNCHANGED)
            anomaly = images[f"test/{category}/{i:03d}.png"]["anomaly"]
            assert gt.shape == (96, 96) and set(np.unique(gt)) == {0, defect_pixel_value(product, anomaly)}
    generate_dataset(tmp_path / "b", product, seed=3, size=96, **counts)
    assert _files(tmp_path / "b" / product) == _files(out)


@pytest.mark.parametrize("product", KNOWN_PRODUCTS)
def test_every_anomaly_renders_for_many_seeds(product: str) -> None:
    logical, structural = product_anomalies(product)
    for seed in range(16):
        size = (96, 224)[seed % 2]
        n_good = render(product, np.random.default_rng([8, seed]), size=size)[2]["n_parts"]
        for anomaly in logical + structural:
            _, gt, info = render(product, np.random.default_rng([8, seed]), anomaly, size=size)
            assert gt.any(), (product, anomaly, seed)
            assert info["category"] == ("logical_anomalies" if anomaly in logical else "structural_anomalies")
            assert info["n_parts"] == n_good + {"missing": -1, "extra": 1}.get(anomaly, 0)


# ----------------------------------------------------------------------------- shape-only anomalies
# A shape anomaly keeps the colour and the amount of material of the part it changes: only
# its outline (or, for a granular heap, its grain) differs from the good part's.

COLOUR_TOL = 8.0  # grey levels (max over channels) between good and changed part's mean colour
AREA_TOL = 0.15
SHAPE_IOU = 0.8  # footprints aligned at their centroids overlap less than this


def _background(image: np.ndarray) -> np.ndarray:
    """Median colour of a 4-pixel frame: no part comes that near the border."""
    band = np.concatenate([image[:4].reshape(-1, 3), image[-4:].reshape(-1, 3),
                           image[:, :4].reshape(-1, 3), image[:, -4:].reshape(-1, 3)])
    return np.median(band, 0)


def _foreground(image: np.ndarray) -> np.ndarray:
    return np.abs(image.astype(np.int16) - _background(image)).max(2) > 50


def _centred(m: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(m)
    return np.roll(m, (m.shape[0] // 2 - int(round(ys.mean())), m.shape[1] // 2 - int(round(xs.mean()))), (0, 1))


def _centred_iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = _centred(a), _centred(b)
    return float((a & b).sum() / (a | b).sum())


def _erode(m: np.ndarray) -> np.ndarray:
    return cv2.erode(m.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)


def _mean_abs_laplacian(image: np.ndarray, where: np.ndarray) -> float:
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    return float(np.abs(cv2.Laplacian(grey, cv2.CV_32F))[where].mean())


SHAPE_CASES = [(p, a) for p in IN_PLACE_PRODUCTS for a in product_anomalies(p)[0]]


@pytest.mark.parametrize("product, anomaly", SHAPE_CASES)
def test_shape_anomalies_change_the_shape_only(product: str, anomaly: str) -> None:
    size = 256
    for seed in range(5):
        good, _, good_info = render(product, np.random.default_rng([9, seed]))
        bad, gt, info = render(product, np.random.default_rng([9, seed]), anomaly)
        changed = [k for k, (p, q) in enumerate(zip(good_info["parts"], info["parts"])) if p != q]
        assert len(changed) == (2 if anomaly == "swapped" else 1), (anomaly, seed, changed)
        if anomaly == "swapped":
            a, b = (good_info["parts"][k]["kind"] for k in changed)
            assert a != b and [info["parts"][k]["kind"] for k in changed] == [b, a]
        fg_good, fg_bad = _foreground(good), _foreground(bad)
        near_gt = cv2.dilate(gt.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        for k in changed:
            part = good_info["parts"][k]
            box = np.zeros_like(gt)
            h, y, x = int(0.16 * size), int(part["cy"] * size), int(part["cx"] * size)
            box[y - h:y + h, x - h:x + h] = True
            old, new = fg_good & near_gt & box, fg_bad & near_gt & box
            assert old.sum() > 300 and new.sum() > 300, (anomaly, seed)
            where = f"{product} {anomaly} seed {seed} part {part['kind']}"
            colour_change = np.abs(good[_erode(old)].mean(0) - bad[_erode(new)].mean(0)).max()
            assert colour_change <= COLOUR_TOL, (where, colour_change)
            assert abs(new.sum() / old.sum() - 1) <= AREA_TOL, (where, new.sum(), old.sum())
            overlap = _centred_iou(old, new)
            if anomaly == "wrong_texture":  # same heap, another grain
                assert overlap > 0.95, (where, overlap)
                inner = cv2.erode(gt.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
                grey_good = cv2.cvtColor(good, cv2.COLOR_RGB2GRAY)[inner].astype(float)
                grey_bad = cv2.cvtColor(bad, cv2.COLOR_RGB2GRAY)[inner].astype(float)
                assert abs(grey_bad.std() / grey_good.std() - 1) < 0.15, where  # same colour spread
                edges_good, edges_bad = _mean_abs_laplacian(good, inner), _mean_abs_laplacian(bad, inner)
                assert abs(edges_bad / edges_good - 1) > 0.1, (where, edges_good, edges_bad)  # other grain
            else:
                assert overlap < SHAPE_IOU, (where, overlap)


def _part_render(kind: str, S: int = 512, **change) -> tuple[np.ndarray, np.ndarray]:
    """Mean colour and footprint of one part drawn alone at the image centre."""
    canvas = np.zeros((S, S, 3), np.float32)
    part = dataclasses.replace(Part(kind, 0.5, 0.5, 0.0, 1.0, 0), **change)
    m = DRAWERS[kind](canvas, part, S, np.random.default_rng(0))
    return canvas[_erode(m)].mean(0), m


@pytest.mark.parametrize("product", IN_PLACE_PRODUCTS)
def test_every_shape_kind_is_asymmetric_and_matched(product: str) -> None:
    """Every kind, not only the ones seeds happen to pick: mirroring and a quarter turn change
    each part they apply to, and each replacement or swap partner has the part's colour and
    area but not its outline."""
    spec = PRODUCT_SPECS[product]
    kinds = {k for k, *_ in spec.parts}
    for kind in spec.mirrorable:
        _, m = _part_render(kind)
        assert _centred_iou(m, _part_render(kind, mirror=True)[1]) < SHAPE_IOU, kind
    for kind in spec.rotatable:
        _, m = _part_render(kind)
        assert _centred_iou(m, _part_render(kind, angle=90.0)[1]) < SHAPE_IOU, kind
    pairs = [(a, b) for a, b in spec.wrong_part.items() if a in kinds]
    pairs += [(a, b) for g in spec.swap_groups for a in g for b in g if a < b]
    assert pairs
    for a, b in pairs:
        (colour_a, m_a), (colour_b, m_b) = _part_render(a), _part_render(b)
        assert np.abs(colour_a - colour_b).max() * 255 <= COLOUR_TOL, (a, b, colour_a, colour_b)  # shading only
        assert abs(m_b.sum() / m_a.sum() - 1) < 0.05, (a, b, m_a.sum(), m_b.sum())
        if a not in spec.granular:
            assert _centred_iou(m_a, m_b) < SHAPE_IOU, (a, b)
    # every anomaly has something to act on
    assert all(k in spec.wrong_part for k in kinds)
    assert spec.mirrorable and spec.rotatable and spec.swap_groups


@pytest.mark.parametrize("product", IN_PLACE_PRODUCTS)
def test_shape_products_keep_parts_apart(product: str) -> None:
    """Like the free-spot clearance of the original products: whatever the in-place anomaly
    does (a quarter turn, a swap, another shape), parts stay >= 4.5 % of the side apart and
    >= 4 % from the border, so each part is its own connected component."""
    S = 512
    for seed in range(8):
        for anomaly in (None,) + product_anomalies(product)[0]:
            info = render(product, np.random.default_rng([10, seed]), anomaly, size=S // 2)[2]
            feet = [DRAWERS[q["kind"]](np.zeros((S, S, 3), np.float32),
                                       Part(q["kind"], q["cx"], q["cy"], q["angle"], 1.0, 0, q["mirrored"]),
                                       S, np.random.default_rng(0)) for q in info["parts"]]
            for i, foot in enumerate(feet):
                ys, xs = np.nonzero(foot)
                assert min(ys.min(), xs.min(), S - 1 - ys.max(), S - 1 - xs.max()) >= 0.04 * S, (anomaly, seed, i)
                others = np.logical_or.reduce([f for j, f in enumerate(feet) if j != i])
                distance = cv2.distanceTransform((~others).astype(np.uint8), cv2.DIST_L2, 5)
                assert distance[foot].min() >= 0.045 * S, (anomaly, seed, info["parts"][i]["kind"])


@pytest.mark.parametrize("product", ALL_PRODUCTS)
def test_any_product_renders_mono_as_the_luma_of_its_colour_scene(product: str) -> None:
    anomaly = product_anomalies(product)[0][0]
    colour, gt, info = render(product, np.random.default_rng([5, 1]), anomaly, size=64)
    mono, mono_gt, mono_info = render(product, np.random.default_rng([5, 1]), anomaly, size=64, mono=True)
    assert mono.shape == (64, 64) and mono.dtype == np.uint8
    weights = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luma, by hand
    assert np.abs(colour.astype(np.float64) @ weights - mono).max() <= 1.0  # OpenCV's rounding
    np.testing.assert_array_equal(gt, mono_gt)
    assert info == mono_info


def test_mono_dataset_files_are_grey(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path, "glyph_tray", seed=0, mono=True, size=64, **COUNTS)
    image = cv2.imread(str(root / "train" / "good" / "000.png"), cv2.IMREAD_UNCHANGED)
    assert image.shape == (64, 64)
    assert json.loads((root / "manifest.json").read_text())["mono"] is True


# ----------------------------------------------------------------------------- handwritten characters


def test_characters_vary_between_good_parts_but_not_within_a_seed() -> None:
    """char_tray: two good parts of one slot (other seeds) are drawn differently (writer, slant,
    width, stroke width, wobble), far more than glyph_tray's glyphs, which differ only by the
    placement jitter; the same seed draws the same part, and a wrong character in the slot is
    drawn by the same hand (same seed): about the same amount of ink."""
    S = 512

    def foot(kind: str, seed: int, angle: float = 0.0) -> np.ndarray:
        return DRAWERS[kind](np.zeros((S, S, 3), np.float32), Part(kind, 0.5, 0.5, angle, 1.0, seed), S,
                             np.random.default_rng(seed))

    for kind in ("char_F", "char_R", "char_4", "char_K"):
        feet = [foot(kind, seed) for seed in range(8)]
        assert np.array_equal(feet[0], foot(kind, 0))
        overlaps = [_centred_iou(feet[i], feet[j]) for i in range(8) for j in range(i + 1, 8)]
        assert np.mean(overlaps) < 0.75, (kind, np.mean(overlaps))
        glyph = kind.replace("char_", "glyph_")
        assert _centred_iou(foot(glyph, 0), foot(glyph, 1, angle=4.0)) > 0.8, kind
        areas = np.array([f.sum() for f in feet])
        assert areas.std() / areas.mean() > 0.05, kind  # stroke width and size vary
    for a, b in PRODUCT_SPECS["char_tray"].wrong_part.items():
        for seed in range(4):
            assert abs(foot(b, seed).sum() / foot(a, seed).sum() - 1) < 0.15, (a, b, seed)


def test_every_writer_builds_each_character_differently() -> None:
    from linewatch.sim.generator import CHAR_ALTERNATES, CHAR_WRITERS, GLYPHS, _written_strokes, Handwriting

    plain = dict(slant=0.0, stretch=1.0, waist=0.0, stroke=1.0, size=1.0, turn=0.0, wobble=np.zeros((64, 2)))
    for name in CHAR_ALTERNATES:
        assert name in GLYPHS
        drawn = [np.concatenate(_written_strokes(name, Handwriting(writer=w, **plain))) for w in range(CHAR_WRITERS)]
        for i in range(CHAR_WRITERS):
            for j in range(i + 1, CHAR_WRITERS):
                assert drawn[i].shape != drawn[j].shape or not np.allclose(drawn[i], drawn[j]), (name, i, j)
    # with every variation off, the printed writer draws GLYPHS' strokes (resampled: same ends)
    strokes = _written_strokes("L", Handwriting(writer=0, **plain))
    assert np.allclose(strokes[0][[0, -1]], np.asarray(GLYPHS["L"][0])[[0, -1]])


def test_clearance_answers_as_a_dilation_of_the_whole_frame() -> None:
    """The free-spot check (`_Clearance.blocks`) against what it stands for: the occupied pixels
    dilated by the elliptic kernel of radius `gap` over the whole frame, for random frames, gaps
    and query sets (a part's pixels: a blob anywhere, near the edges too)."""
    rng = np.random.default_rng(0)
    checked = blocked = 0
    for trial in range(40):
        S, gap = int(rng.integers(40, 160)), int(rng.integers(1, 12))
        occupied = np.zeros((S, S), np.uint8)
        for _ in range(int(rng.integers(0, 6))):
            centre = tuple(int(v) for v in rng.integers(0, S, 2))
            cv2.circle(occupied, centre, int(rng.integers(1, S // 6)), 1, -1)
        whole = cv2.dilate(occupied, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * gap + 1,) * 2))
        clearance = _Clearance(occupied, gap)
        for query in range(60):  # single pixels (the ring around the gap is where it is exact or not), and blobs
            blob = np.zeros((S, S), np.uint8)
            centre = tuple(int(v) for v in rng.integers(0, S, 2))
            cv2.circle(blob, centre, 0 if query % 2 else int(rng.integers(0, S // 8)), 1, -1)
            ys, xs = np.nonzero(blob)
            expected = bool(whole[ys, xs].any())
            assert clearance.blocks(ys, xs) == expected, (trial, S, gap, centre)
            checked += 1
            blocked += expected
    assert 0.2 * checked < blocked < 0.8 * checked  # both answers were asked for
