"""Fusing the branches of the image score into one (beyond the paper).

CSAD fuses its component branch with a patch branch after putting each in units of its own
spread on good images. linewatch does the same with its branches: the object map (SAM-LAD's
AMM, with missing and surplus parts), the patch branch (`patch_knn`) and, with the
weights-free backend, the part outline and grain branches (the Inspector's `_part_maps`):

    z_b = (score_b - mean_b) / std_b          mean_b, std_b: branch b's scores on the good
                                              images (leave-one-out and validation, bank build)
    score = sum over b of softplus(z_b)       how far each branch is above its good mean
    heatmap(x) = sum over b of softplus(Z_b(x)),  Z_b(x) = (map_b(x) - mean_b) / std_b

softplus(z) = log(1 + e^z): z above 1 or so counts as itself, z below the good mean counts as
almost nothing, so a branch that does not see an anomaly does not subtract from one that does.
Unlike max(z, 0) it has no flat part: good images do not pile up on one value (0), whose atom
the calibration's tail fits cannot describe. Where one branch sees the anomaly, the heatmap's
peak is about the score; where several see it in different places, each place shows its own
branch's part (the peak is then below the score).

Why this rule: `python benchmarks/score_branches.py /tmp/sim1 screw_tray,breakfast_box,glyph_tray,bracket_kit`
on `linewatch sim generate --out /tmp/sim1 --seed 1 --validation 30` (default config, 2026-11-26)
gave as the lowest image AUROC over the four products and both anomaly types: softplus 93.0,
sum of max(z_b, 0) 93.7, largest z_b 92.3, plain sum 93.0 (a branch below its good mean then
subtracts from one that sees the anomaly), softplus over objects and patch alone 83.8 (they miss
a granular texture swapped for another of the same colour, which the grain branch sees).
Softplus and max(z_b, 0) are within a seed's noise of each other; softplus is kept for the
continuous good-score distribution. The branches' raw scores travel with each result
(`InspectionResult.components`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
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
    return sum(F.softplus((maps[name] - stats["mean"]) / stats["std"]) for name, stats in normalisation.items())


def fuse_scores(components: dict[str, np.ndarray], normalisation: dict, source: str) -> np.ndarray:
    """Image scores of `source` from the branches' raw image scores ((N,) arrays): `fuse_maps`
    on the scores themselves (float64)."""
    scores = {name: torch.as_tensor(np.asarray(values, dtype=np.float64)) for name, values in components.items()}
    return fuse_maps(scores, normalisation, source).numpy()


def branch_z_scores(components: dict[str, float], normalisation: dict | None) -> dict[str, float]:
    """Each branch's raw image score in units of its spread on good images, z_b (empty without
    `normalisation`): which branch made a fused score, and by how much."""
    if normalisation is None:
        return {}
    return {name: (components[name] - stats["mean"]) / stats["std"] for name, stats in normalisation.items()}
