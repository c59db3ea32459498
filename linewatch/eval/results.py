"""What one evaluated method produced on one category: the record the runner fills and the
reports read (its own module, so that neither imports the other)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from linewatch.detector.calibration import Calibration


@dataclass
class MethodRun:
    """What one method produced on one category's test images (in `category.test_images` order).

    scores: (N,) image scores; maps: N float32 (H, W) anomaly maps at original size;
    threshold: the calibrated verdict threshold (fail when score > threshold); calibration:
    how it was calibrated (with the source of the scores); seconds: fit / calibrate /
    test wall times; info: extras."""

    method: str
    scores: np.ndarray
    maps: list[np.ndarray]
    threshold: float
    calibration: Calibration
    seconds: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

