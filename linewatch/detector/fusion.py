"""Fusing the branches of the image score into one (beyond the paper).

CSAD fuses its component branch with a patch branch after putting each in units of its own
spread on good images. linewatch does the same with its branches: the object map (SAM-LAD's
AMM, with missing and surplus parts), the patch branch (`patch_knn`) and, with the
weights-free backend, the part outline and grain branches (the Inspector's `_part_maps`):

    z_b = (score_b - mean_b) / std_b          mean_b, std_b: branch b's scores on the good
                                              images (leave-one-out and validation, bank build)
    score = sum over b of max(z_b, 0)         how far each branch is above its good mean
    heatmap(x) = sum over b of max(Z_b(x), 0),  Z_b(x) = (map_b(x) - mean_b) / std_b

Where one branch sees the anomaly, the heatmap's peak is the score; where several see it in
different places, each place shows its own branch's part (the peak is then below the score).

Why this rule: on `linewatch sim` data (seed 1, 4 products, default config) the lowest image
AUROC over products and anomaly types was 94.7 for it, 93.0 for the largest z_b, 93.0 for the
plain sum (a branch below its good mean then subtracts from one that sees the anomaly) and 84.0
for objects and patch alone (they miss a granular texture swapped for another of the same
colour, which the grain branch sees). The branches' raw scores travel with each result
(`InspectionResult.components`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

MIN_RELATIVE_STD = 1e-3  # a branch whose good scores barely vary: std taken as this fraction of their mean


def branch_normalisation(components: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation of each branch's raw scores on good images:
    {"objects": {"mean", "std", "n"}, "patch": {...}, ...}. components: branch -> (N,) scores,
    N >= 2, for the branches the Inspector computed."""
    out = {}
    for name in components:
        scores = np.asarray(components[name], dtype=np.float64)
        if scores.ndim != 1 or len(scores) < 2 or not np.isfinite(scores).all():
            raise ValueError(f"the {name} branch needs at least 2 finite good scores, got {scores.tolist()[:5]}")
        mean = float(scores.mean())
        std = max(float(scores.std(ddof=1)), MIN_RELATIVE_STD * abs(mean), 1e-12)
        out[name] = {"mean": mean, "std": std, "n": int(len(scores))}
    return out


def fuse_maps(maps: dict[str, Tensor], normalisation: dict | None, source: str) -> Tensor:
    """The score map of `source` ("objects", "patch" or "fused") from the branches' raw maps
    (B, H, W). Fusing needs `normalisation` (`branch_normalisation`); without it (a bank being
    built, before its good scores are known) the object map stands in."""
    if source != "fused":
        return maps[source]
    if normalisation is None:
        return maps["objects"]
    return sum(((maps[name] - stats["mean"]) / stats["std"]).clamp_min(0) for name, stats in normalisation.items())


def fuse_scores(components: dict[str, np.ndarray], normalisation: dict, source: str) -> np.ndarray:
    """Image scores of `source` from the branches' raw image scores ((N,) arrays), by the rule
    of the module docstring."""
    if source != "fused":
        return np.asarray(components[source], dtype=np.float64)
    z = [(np.asarray(components[name], dtype=np.float64) - stats["mean"]) / stats["std"]
         for name, stats in normalisation.items()]
    return np.maximum(np.asarray(z), 0.0).sum(axis=0)


def branch_z_scores(components: dict[str, float], normalisation: dict | None) -> dict[str, float]:
    """Each branch's raw image score in units of its spread on good images, z_b (empty without
    `normalisation`): which branch made a fused score, and by how much."""
    if normalisation is None:
        return {}
    return {name: (components[name] - stats["mean"]) / stats["std"] for name, stats in normalisation.items()}
