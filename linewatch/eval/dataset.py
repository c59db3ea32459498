"""Reading one category of an MVTec LOCO AD-layout dataset.

    <category>/train/good/*.png                      good images for the bank
    <category>/validation/good/*.png                 held-out good images for calibration
    <category>/test/good/*.png                       good test images
    <category>/test/logical_anomalies/<id>.png       logical anomalies
    <category>/test/structural_anomalies/<id>.png    structural anomalies
    <category>/ground_truth/<type>/<id>/000.png ...  one PNG per defect region ("channel");
                                                     its non-zero pixel value names the defect type
    <category>/defects_config.json                   optional: per defect type its pixel value and
                                                     saturation threshold (sPRO); absent -> PRO

defects_config.json is a list of {"defect_name", "pixel_value", "saturation_threshold",
"relative_saturation"}; "pixel_type" is accepted for "pixel_value". A ground-truth PNG's pixel
value picks its entry, as in the official MVTec LOCO AD evaluation script: when several entries
share a pixel value, the last of them applies to every region with that value (the official
script keeps one entry per value, the last one listed), and `Category.warnings` says so when
their saturation settings differ. (Until 2026-12, `linewatch sim` marked every defect 255 with
a logical saturation of 0.5 and a structural one of 1.0: the official script then saturated
logical regions at 1.0, and linewatch, which picked the entry named in manifest.json, reported
a higher logical sPRO than it.)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from linewatch.images import IMAGE_SUFFIXES

__all__ = [
    "ANOMALY_TYPES",
    "DatasetError",
    "DefectType",
    "GroundTruthRegion",
    "TestImage",
    "Category",
    "load_category",
    "list_categories",
    "read_defects_config",
    "saturation_area",
    "defect_for_value",
    "shared_value_warnings",
]

ANOMALY_TYPES = {"logical_anomalies": "logical", "structural_anomalies": "structural"}
TEST_SUBDIRS = {"good": "good", **ANOMALY_TYPES}


class DatasetError(Exception):
    """A dataset folder or file that cannot be used; the message names the path and why."""


@dataclass(frozen=True)
class DefectType:
    """One entry of defects_config.json. saturation_threshold is in pixels when
    relative_saturation is false, else a fraction of the region's area in (0, 1]."""

    defect_name: str
    pixel_value: int
    saturation_threshold: float
    relative_saturation: bool


@dataclass
class GroundTruthRegion:
    """One ground-truth region (channel) of a defect image.

    mask: bool (H, W) at the image's original size. pixel_value: its value in the PNG.
    defect: its defects_config entry (None without a config: plain PRO). saturation: the
    saturation area s_r in pixels used by sPRO. source: the PNG it came from."""

    mask: np.ndarray
    pixel_value: int
    defect: DefectType | None
    saturation: float
    source: Path


@dataclass
class TestImage:
    """A test image: path, label ('good' | 'logical' | 'structural'), the test subfolder name
    ('good', 'logical_anomalies', 'structural_anomalies'), its id (file stem) and its regions."""

    path: Path
    label: str
    subdir: str
    image_id: str
    regions: list[GroundTruthRegion] = field(default_factory=list)

    @property
    def is_anomalous(self) -> bool:
        return self.label != "good"


@dataclass
class Category:
    """A loaded category. defects is None when there is no defects_config.json (PRO).
    warnings: what the evaluation should say about the data (see `defect_for_value`)."""

    name: str
    root: Path
    train_dir: Path
    validation_dir: Path | None
    test_images: list[TestImage]
    defects: list[DefectType] | None
    warnings: list[str] = field(default_factory=list)

    @property
    def metric_name(self) -> str:
        return "sPRO" if self.defects is not None else "PRO"

    def images(self, label: str) -> list[TestImage]:
        return [t for t in self.test_images if t.label == label]


def saturation_area(region_area: int, defect: DefectType | None) -> float:
    """s_r of the official evaluator: the area itself without a config; floor(threshold * area)
    for relative saturation; min(threshold, area) for absolute. One difference: a relative s_r is
    at least 1 pixel here, where the official script divides by 0 (a region of one pixel at 0.5)."""
    if defect is None:
        return float(region_area)
    if defect.relative_saturation:
        return float(max(1, int(defect.saturation_threshold * region_area)))
    return float(min(defect.saturation_threshold, region_area))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def list_categories(root: str | Path) -> list[str]:
    """Sub-folders of `root` that look like categories (have a test/ folder), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist")
    names = sorted(p.name for p in root.iterdir() if (p / "test").is_dir())
    if not names:
        raise DatasetError(f"{root}: no category folders (a category has train/good, validation/good and test/)")
    return names


def read_defects_config(path: str | Path) -> list[DefectType]:
    """Parse defects_config.json; errors name the file and the bad entry."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise DatasetError(f"{path}: cannot read: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, list) or not data:
        raise DatasetError(f"{path}: expected a non-empty list of defect entries")
    out = []
    for i, entry in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: expected an object, got {type(entry).__name__}")
        value = entry.get("pixel_value", entry.get("pixel_type"))
        missing = [k for k in ("defect_name", "saturation_threshold", "relative_saturation") if k not in entry]
        if value is None:
            missing.insert(0, "pixel_value")
        if missing:
            raise DatasetError(f"{where}: missing key(s) {', '.join(missing)}")
        try:
            pixel_value = int(value)
            threshold = float(entry["saturation_threshold"])
        except (TypeError, ValueError):
            raise DatasetError(f"{where}: pixel_value and saturation_threshold must be numbers") from None
        relative = entry["relative_saturation"]
        if not isinstance(relative, bool):
            raise DatasetError(f"{where}: relative_saturation must be true or false")
        if not 1 <= pixel_value <= 255:
            raise DatasetError(f"{where}: pixel_value {pixel_value} is not in 1..255")
        if relative and not 0 < threshold <= 1:
            raise DatasetError(f"{where}: a relative saturation_threshold must be in (0, 1], got {threshold}")
        if not relative and threshold <= 0:
            raise DatasetError(f"{where}: an absolute saturation_threshold must be a positive pixel count")
        out.append(DefectType(str(entry["defect_name"]), pixel_value, threshold, relative))
    return out


def _read_mask(path: Path) -> np.ndarray:
    """A ground-truth PNG as a 2-D integer array (colour PNGs: the first channel)."""
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise DatasetError(f"{path}: not a readable PNG")
    if array.ndim == 3:
        array = array[..., 0]
    return array


def defect_for_value(defects: list[DefectType], pixel_value: int) -> DefectType | None:
    """The entry that applies to regions of `pixel_value`: the last one listed with that value,
    as the official evaluator's `DefectsConfig` (a dict from pixel value to entry) keeps it.
    None when no entry has the value."""
    matching = [d for d in defects if d.pixel_value == pixel_value]
    return matching[-1] if matching else None


def shared_value_warnings(defects: list[DefectType], where: Path) -> list[str]:
    """A warning per pixel value that several entries share with different saturation settings:
    the official evaluator (and linewatch, to agree with it) applies the last one to all."""
    out = []
    for value in sorted({d.pixel_value for d in defects}):
        matching = [d for d in defects if d.pixel_value == value]
        if len({(d.saturation_threshold, d.relative_saturation) for d in matching}) > 1:
            last = matching[-1]
            out.append(f"{where}: pixel value {value} is shared by {', '.join(d.defect_name for d in matching)} "
                       f"with different saturation thresholds; every region of that value is saturated as "
                       f"{last.defect_name} ({last.saturation_threshold:g}"
                       f"{' of its area' if last.relative_saturation else ' pixels'}), as the official MVTec "
                       f"LOCO AD evaluator does (it keeps the last entry per pixel value): give each defect "
                       f"type its own pixel value")
    return out


def _read_regions(gt_dir: Path, image_shape: tuple[int, int], defects: list[DefectType] | None) -> list[GroundTruthRegion]:
    """Regions of one defect image: one per PNG with a config (LOCO), else one per connected
    component (plain PRO)."""
    if not gt_dir.is_dir():
        raise DatasetError(f"{gt_dir}: missing ground-truth folder for this test image")
    pngs = sorted(p for p in gt_dir.iterdir() if p.suffix.lower() == ".png")
    if not pngs:
        raise DatasetError(f"{gt_dir}: ground-truth folder has no PNG files")
    regions = []
    for png in pngs:
        array = _read_mask(png)
        if array.shape != image_shape:
            raise DatasetError(f"{png}: mask is {array.shape[1]}x{array.shape[0]} but its test image is "
                               f"{image_shape[1]}x{image_shape[0]}")
        values = [int(v) for v in np.unique(array) if v != 0]
        if not values:
            continue  # an empty channel marks nothing (the official evaluator would refuse it)
        if len(values) > 1:
            raise DatasetError(f"{png}: a ground-truth PNG must hold one defect value, found {values}")
        value = values[0]
        mask = array != 0
        if defects is None:
            count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
            for c in range(1, count):
                part = labels == c
                regions.append(GroundTruthRegion(part, value, None, float(part.sum()), png))
            continue
        defect = defect_for_value(defects, value)
        if defect is None:
            raise DatasetError(f"{png}: pixel value {value} is not in defects_config.json "
                               f"(known: {sorted({d.pixel_value for d in defects})})")
        regions.append(GroundTruthRegion(mask, value, defect, saturation_area(int(mask.sum()), defect), png))
    if not regions:
        raise DatasetError(f"{gt_dir}: every ground-truth PNG is empty (all zero)")
    return regions


def _image_shape(path: Path) -> tuple[int, int]:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DatasetError(f"{path}: not a readable image")
    return tuple(image.shape[:2])


def load_dataset(root: str | Path, categories: Sequence[str] | None = None) -> list[Category]:
    """The layouts of `categories` under `root` (default: every category folder there), read
    before any model runs (`linewatch eval` reads them before it imports torch): DatasetError
    names the missing or malformed path."""
    names = list(categories) if categories else list_categories(root)
    return [load_category(Path(root) / name) for name in names]


def load_category(root: str | Path, with_ground_truth: bool = True) -> Category:
    """Load the layout of one category folder (images are not read, masks are).

    Raises DatasetError naming the missing or malformed path."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: category folder does not exist")
    train = root / "train" / "good"
    if not train.is_dir() or not _image_files(train):
        raise DatasetError(f"{train}: missing or has no images (the bank's good images go here)")
    validation: Path | None = root / "validation" / "good"
    if not validation.is_dir() or not _image_files(validation):
        validation = None
    test = root / "test"
    if not test.is_dir():
        raise DatasetError(f"{test}: missing test folder")
    unknown = sorted(p.name for p in test.iterdir() if p.is_dir() and p.name not in TEST_SUBDIRS)
    if unknown:
        raise DatasetError(f"{test}: unexpected sub-folder(s) {unknown}; expected {sorted(TEST_SUBDIRS)}")
    if not (test / "good").is_dir() or not _image_files(test / "good"):
        raise DatasetError(f"{test / 'good'}: missing or has no images (AUROC needs good test images)")

    config_path = root / "defects_config.json"
    defects = read_defects_config(config_path) if config_path.exists() else None

    images: list[TestImage] = []
    for subdir, label in TEST_SUBDIRS.items():
        folder = test / subdir
        if not folder.is_dir():
            continue
        for path in _image_files(folder):
            item = TestImage(path=path, label=label, subdir=subdir, image_id=path.stem)
            if label != "good" and with_ground_truth:
                item.regions = _read_regions(root / "ground_truth" / subdir / path.stem, _image_shape(path), defects)
            images.append(item)
    if not any(t.is_anomalous for t in images):
        raise DatasetError(f"{test}: no anomalous test images (logical_anomalies/ or structural_anomalies/)")
    return Category(name=root.name, root=root, train_dir=train, validation_dir=validation,
                    test_images=images, defects=defects,
                    warnings=shared_value_warnings(defects, config_path) if defects else [])
