"""Parsing the MVTec LOCO layout on tiny hand-written categories."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from linewatch.eval.dataset import (
    DatasetError,
    DefectType,
    list_categories,
    load_category,
    read_defects_config,
    saturation_area,
)

SIZE = (8, 10)  # H, W


def _rgb(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((*SIZE, 3), 128, np.uint8))


def _mask(path: Path, value: int, rows: slice, cols: slice) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros(SIZE, np.uint8)
    m[rows, cols] = value
    cv2.imwrite(str(path), m)


def make_category(root: Path, config: list | None = None) -> Path:
    cat = root / "widget"
    for rel in ("train/good/000.png", "train/good/001.png", "validation/good/000.png", "test/good/000.png",
                "test/good/001.png", "test/logical_anomalies/000.png", "test/structural_anomalies/000.png"):
        _rgb(cat / rel)
    gt = cat / "ground_truth"
    _mask(gt / "logical_anomalies/000/000.png", 10, slice(0, 2), slice(0, 2))  # 4 px, value 10
    _mask(gt / "logical_anomalies/000/001.png", 20, slice(4, 6), slice(0, 3))  # 6 px, value 20
    _mask(gt / "structural_anomalies/000/000.png", 30, slice(2, 3), slice(5, 10))  # 5 px, value 30
    if config is not None:
        (cat / "defects_config.json").write_text(json.dumps(config))
    return cat


CONFIG = [
    {"defect_name": "missing_part", "pixel_value": 10, "saturation_threshold": 0.5, "relative_saturation": True},
    {"defect_name": "extra_part", "pixel_value": 20, "saturation_threshold": 3, "relative_saturation": False},
    {"defect_name": "scratch", "pixel_value": 30, "saturation_threshold": 100, "relative_saturation": False},
]


def test_layout_labels_and_saturation(tmp_path):
    cat = load_category(make_category(tmp_path, CONFIG))
    assert cat.name == "widget" and cat.metric_name == "sPRO"
    assert cat.validation_dir == cat.root / "validation" / "good"
    assert [(t.subdir, t.label, t.image_id) for t in cat.test_images] == [
        ("good", "good", "000"), ("good", "good", "001"),
        ("logical_anomalies", "logical", "000"), ("structural_anomalies", "structural", "000")]
    logical = cat.images("logical")[0]
    assert [r.pixel_value for r in logical.regions] == [10, 20]
    assert [r.defect.defect_name for r in logical.regions] == ["missing_part", "extra_part"]
    assert [int(r.mask.sum()) for r in logical.regions] == [4, 6]
    # relative 0.5 of 4 px -> 2; absolute 3 of 6 px -> 3; absolute 100 of 5 px -> 5 (capped at the area)
    assert [r.saturation for r in logical.regions] == [2.0, 3.0]
    assert cat.images("structural")[0].regions[0].saturation == 5.0
    assert cat.images("good")[0].regions == []


def test_without_config_regions_are_connected_components(tmp_path):
    root = make_category(tmp_path, None)
    # one PNG with two separate blobs -> two PRO regions
    m = np.zeros(SIZE, np.uint8)
    m[0:2, 0:2] = 255
    m[5:8, 6:9] = 255
    cv2.imwrite(str(root / "ground_truth/structural_anomalies/000/000.png"), m)
    cat = load_category(root)
    assert cat.defects is None and cat.metric_name == "PRO"
    regions = cat.images("structural")[0].regions
    assert sorted(r.saturation for r in regions) == [4.0, 9.0]
    assert all(r.defect is None for r in regions)


def test_a_shared_pixel_value_takes_the_last_entry_as_the_official_evaluator(tmp_path):
    # the official script's DefectsConfig maps pixel value -> entry, so the last entry of a value
    # applies to every region of it; a manifest naming each image's defect changes nothing
    config = [
        {"defect_name": "missing", "pixel_type": 255, "saturation_threshold": 0.5, "relative_saturation": True},
        {"defect_name": "scratch", "pixel_type": 255, "saturation_threshold": 1.0, "relative_saturation": True},
    ]
    root = make_category(tmp_path, config)
    for rel in ("logical_anomalies/000/000.png", "logical_anomalies/000/001.png", "structural_anomalies/000/000.png"):
        m = cv2.imread(str(root / "ground_truth" / rel), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(root / "ground_truth" / rel), (m > 0).astype(np.uint8) * 255)
    manifest = {"images": {"test/logical_anomalies/000.png": {"defect_name": "missing"},
                           "test/structural_anomalies/000.png": {"defect_name": "scratch"}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    cat = load_category(root)
    assert [r.saturation for r in cat.images("logical")[0].regions] == [4.0, 6.0]  # 1.0 * 4, 1.0 * 6
    assert [r.defect.defect_name for r in cat.images("logical")[0].regions] == ["scratch", "scratch"]
    assert cat.images("structural")[0].regions[0].saturation == 5.0
    [warning] = cat.warnings
    assert "pixel value 255 is shared by missing, scratch" in warning and "saturated as scratch (1 of its area)" in warning
    # the same settings under one value: nothing to warn about
    config[0]["saturation_threshold"] = 1.0
    (root / "defects_config.json").write_text(json.dumps(config))
    assert load_category(root).warnings == []


def test_distinct_pixel_values_warn_about_nothing(tmp_path):
    assert load_category(make_category(tmp_path, CONFIG)).warnings == []


def test_saturation_area_rules():
    assert saturation_area(10, None) == 10
    assert saturation_area(7, DefectType("a", 1, 0.5, True)) == 3  # floor(3.5), as the official evaluator
    assert saturation_area(1, DefectType("a", 1, 0.1, True)) == 1  # never 0
    assert saturation_area(50, DefectType("a", 1, 20, False)) == 20
    assert saturation_area(5, DefectType("a", 1, 20, False)) == 5


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("[]", "non-empty list"),
    ('[{"defect_name": "a", "saturation_threshold": 1, "relative_saturation": false}]', "missing key.*pixel_value"),
    ('[{"defect_name": "a", "pixel_value": 300, "saturation_threshold": 1, "relative_saturation": false}]', "1..255"),
    ('[{"defect_name": "a", "pixel_value": 3, "saturation_threshold": 2.0, "relative_saturation": true}]', r"\(0, 1\]"),
    ('[{"defect_name": "a", "pixel_value": 3, "saturation_threshold": 1, "relative_saturation": "yes"}]', "true or false"),
])
def test_bad_defects_config_names_file(tmp_path, text, message):
    path = tmp_path / "defects_config.json"
    path.write_text(text)
    with pytest.raises(DatasetError, match=message) as info:
        read_defects_config(path)
    assert str(path) in str(info.value)


def test_errors_name_the_path(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_category(tmp_path / "nothing")
    root = make_category(tmp_path, CONFIG)

    gt_dir = root / "ground_truth/structural_anomalies/000"
    png = gt_dir / "000.png"
    png.rename(tmp_path / "moved.png")
    gt_dir.rmdir()
    with pytest.raises(DatasetError, match="missing ground-truth folder") as info:
        load_category(root)
    assert str(gt_dir) in str(info.value)
    _mask(png, 99, slice(0, 1), slice(0, 1))
    with pytest.raises(DatasetError, match="pixel value 99 is not in defects_config"):
        load_category(root)
    cv2.imwrite(str(png), np.full((3, 3), 30, np.uint8))
    with pytest.raises(DatasetError, match="mask is 3x3 but its test image is 10x8"):
        load_category(root)
    _mask(png, 30, slice(0, 1), slice(0, 1))
    (root / "test" / "weird").mkdir()
    with pytest.raises(DatasetError, match="unexpected sub-folder"):
        load_category(root)
    (root / "test" / "weird").rmdir()
    for p in (root / "train" / "good").iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match="train/good: missing or has no images"):
        load_category(root)


def test_list_categories(tmp_path):
    make_category(tmp_path, CONFIG)
    (tmp_path / "notes").mkdir()
    assert list_categories(tmp_path) == ["widget"]
    with pytest.raises(DatasetError, match="no category folders"):
        list_categories(tmp_path / "notes")
