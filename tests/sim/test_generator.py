"""The synthetic line: layout on disk, determinism, and ground truth that means something."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from linewatch.sim import ANOMALIES, LOGICAL_ANOMALIES, PRODUCTS, STRUCTURAL_ANOMALIES, generate_dataset, render

COUNTS = dict(n_train=3, n_val=2, n_test_good=2, n_test_logical=4, n_test_structural=3)


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
            assert set(np.unique(gt)) == {0, 255}  # non-empty and binary


def test_deterministic_bytes(dataset: Path, tmp_path: Path) -> None:
    generate_dataset(tmp_path, "screw_tray", seed=5, size=96, **COUNTS)
    assert _files(tmp_path / "screw_tray") == _files(dataset)
    other = tmp_path / "other"
    generate_dataset(other, "screw_tray", seed=6, size=96, n_train=1, n_val=0, n_test_good=0,
                     n_test_logical=0, n_test_structural=0)
    assert (other / "screw_tray/train/good/000.png").read_bytes() != (dataset / "train/good/000.png").read_bytes()


@pytest.mark.parametrize("product", PRODUCTS)
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


@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("anomaly", ANOMALIES)
def test_anomaly_changes_pixels_inside_its_mask(product: str, anomaly: str) -> None:
    for seed in range(3):
        good, _, good_info = render(product, np.random.default_rng([4, seed]))
        bad, gt, info = render(product, np.random.default_rng([4, seed]), anomaly)
        assert gt.dtype == bool and gt.any()
        assert info["anomaly"] == anomaly and info["part"] is not None
        expected = "logical_anomalies" if anomaly in LOGICAL_ANOMALIES else "structural_anomalies"
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
