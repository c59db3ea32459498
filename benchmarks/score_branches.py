"""Image AUROC of each branch of the detector's score and of ways to fuse them, per product
and anomaly kind, on `linewatch sim` data (classic backend unless the overrides say otherwise).

    linewatch sim generate --out /tmp/sim1 --seed 1 --validation 30 --quiet
    python benchmarks/score_branches.py /tmp/sim1 screw_tray,breakfast_box,glyph_tray,bracket_kit [detector.key=value ...]

Fusions, from each branch's z_b = (score_b - mean_b) / std_b (the bank's score_normalisation):
softplus (the detector's rule, detector.score.source: fused), relu (sum of max(z_b, 0)), max
(largest z_b), sum (plain sum), objects+patch (softplus over those two only).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from linewatch.bank_builder import build_bank
from linewatch.good_images import read_folder
from linewatch.config import Config
from linewatch.detector.inspector import Inspector
from linewatch.detector.models import build_models

CATEGORIES = ("good", "logical_anomalies", "structural_anomalies")
FUSIONS = {
    "softplus": lambda z: float(np.logaddexp(0.0, list(z.values())).sum()),
    "relu": lambda z: float(sum(max(v, 0.0) for v in z.values())),
    "max": lambda z: float(max(z.values())),
    "sum": lambda z: float(sum(z.values())),
    "objects+patch": lambda z: float(np.logaddexp(0.0, [z["objects"], z["patch"]]).sum()),
}


def auroc(good: list[float], bad: list[float]) -> float:
    return 100 * roc_auc_score([0] * len(good) + [1] * len(bad), good + bad)


def main() -> None:
    root, products = sys.argv[1], sys.argv[2].split(",")
    config = Config()
    config.detector.device = "cpu"
    for override in sys.argv[3:]:
        key, value = override.split("=")
        section = config.detector
        *path, name = key.removeprefix("detector.").split(".")
        for part in path:
            section = getattr(section, part)
        setattr(section, name, type(getattr(section, name))(json.loads(value)))
    device = torch.device("cpu")
    for product in products:
        started = time.time()
        data = f"{root}/{product}"
        models = build_models(config.detector, device)
        bank = build_bank(config, f"{data}/train/good", f"{data}/validation/good", models=models, progress=False)
        inspector = Inspector(config.detector, models, bank, device)
        kinds = json.load(open(f"{data}/manifest.json"))["images"]
        rows = []  # (category, anomaly kind, {score name: value})
        for category in CATEGORIES:
            paths, images = read_folder(f"{data}/test/{category}")
            for start in range(0, len(images), 8):
                for path, result in zip(paths[start:start + 8], inspector.inspect(images[start:start + 8])):
                    scores = dict(result.components)
                    scores.update({name: fuse(result.branch_scores) for name, fuse in FUSIONS.items()})
                    rows.append((category, kinds.get(f"test/{category}/{path.name}", {}).get("anomaly"), scores))
        names = list(rows[0][2])
        good = {n: [s[n] for c, _, s in rows if c == "good"] for n in names}
        line = [f"{n} " + " / ".join(f"{auroc(good[n], [s[n] for c, _, s in rows if c == cat]):.1f}"
                                     for cat in CATEGORIES[1:]) for n in names]
        print(f"{product} (logical / structural): " + " | ".join(line) + f"  [{time.time() - started:.0f} s]")
        for kind in sorted({k for _, k, _ in rows if k}):
            bad = {n: [s[n] for _, k, s in rows if k == kind] for n in names}
            print(f"    {kind}: " + " ".join(f"{n} {auroc(good[n], bad[n]):.0f}" for n in names), flush=True)


if __name__ == "__main__":
    main()
