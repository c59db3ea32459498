"""What the detector says about one image."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

OBJECT_STATUSES = ("matched", "unmatched", "missing", "surplus")


@dataclass
class InspectionResult:
    """Result for one image.

    score: the image anomaly score (detector.score: the object map's peak, the patch map's, or
    the branches fused, `linewatch.detector.fusion`); verdict "fail" when score > threshold. heatmap: float32 (H, W) at the input image's resolution. objects: one
    dict per object with keys bbox [x, y, w, h] (input pixels), area (pixels), status (one of
    OBJECT_STATUSES), score (max of its map). timings: seconds per stage for the batch this
    image was in. backend: which feature/segmenter backend produced it ("classic" or "samlad").
    components: the raw image score of each branch ("objects", and "patch", "outline",
    "texture" when the score uses them), before they are put in units of their spread on good images and fused
    (detector.score). branch_scores: with the fused score, each branch's z_b (its raw score in
    units of its spread on good images; the score is the sum of the positive ones): which
    branch saw what. component_maps: the branches' raw maps at the input resolution, only when
    the Inspector was asked to keep them (evaluation).
    """

    score: float
    verdict: str
    threshold: float
    heatmap: np.ndarray
    objects: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    backend: str = ""
    components: dict[str, float] = field(default_factory=dict)
    branch_scores: dict[str, float] = field(default_factory=dict)
    component_maps: dict[str, np.ndarray] | None = None
