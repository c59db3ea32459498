"""Accuracy regression on the synthetic line with the demo config (classic backend).

Not a speed test and not a real-world benchmark: it guards the detector's ability to tell
good from logically and structurally anomalous synthetic frames, so that a change to any
stage (features, segmenter, matching, alignment, scoring, calibration) that loses accuracy
fails here, on every product, the shape-only ones (glyph_tray, bracket_kit) included. Fixed
seed; what it measured is printed (`pytest tests/detector/test_accuracy.py -s`); the
3-seed figures of `linewatch eval` are in the README.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from linewatch.bank_builder import build_bank, inspect_images, read_folder
from linewatch.config import load_config
from linewatch.detector.inspector import Inspector
from linewatch.detector.models import build_models
from linewatch.sim import ALL_PRODUCTS, generate_dataset

REPO = Path(__file__).resolve().parents[2]
SEED = 0
MEAN_FLOOR = 0.90
PRODUCT_FLOOR = 0.80


@pytest.mark.slow
def test_image_auroc_on_synthetic_line(tmp_path_factory):
    config = load_config(REPO / "configs" / "demo.yaml")
    assert config.detector.backend == "classic"
    config.detector.device = "cpu"
    root = tmp_path_factory.mktemp("accuracy")
    device = torch.device("cpu")
    auroc: dict[str, dict[str, float]] = {}
    for product in ALL_PRODUCTS:
        data = generate_dataset(root, product, seed=SEED, n_train=20, n_val=10, n_test_good=20,
                                n_test_logical=20, n_test_structural=15, size=256)
        models = build_models(config.detector, device)
        bank = build_bank(config, data / "train" / "good", data / "validation" / "good", models=models,
                          progress=False)
        inspector = Inspector(config.detector, models, bank, device)
        scores = {
            category: np.array([r.score for r in inspect_images(inspector, read_folder(data / "test" / category)[1], 8, False)])
            for category in ("good", "logical_anomalies", "structural_anomalies")
        }
        assert len(scores["good"]) == 20 and len(scores["logical_anomalies"]) == 20
        assert len(scores["structural_anomalies"]) == 15
        for category, values in scores.items():
            assert np.isfinite(values).all(), (product, category)
        good = scores["good"]
        auroc[product] = {}
        for kind, category in (("logical", "logical_anomalies"), ("structural", "structural_anomalies")):
            bad = scores[category]
            labels = np.r_[np.zeros(len(good)), np.ones(len(bad))]
            auroc[product][kind] = float(roc_auc_score(labels, np.r_[good, bad]))

    lines = [f"{p:14s} logical {v['logical']:.3f}  structural {v['structural']:.3f}" for p, v in auroc.items()]
    means = {kind: float(np.mean([v[kind] for v in auroc.values()])) for kind in ("logical", "structural")}
    lines.append(f"{'mean':14s} logical {means['logical']:.3f}  structural {means['structural']:.3f}")
    report = "image AUROC, seed %d, configs/demo.yaml (classic):\n" % SEED + "\n".join(lines)
    print(report)
    for kind, mean in means.items():
        assert mean >= MEAN_FLOOR, f"mean {kind} AUROC {mean:.3f} < {MEAN_FLOOR}\n{report}"
    for product, values in auroc.items():
        for kind, value in values.items():
            assert value >= PRODUCT_FLOOR, f"{product} {kind} AUROC {value:.3f} < {PRODUCT_FLOOR}\n{report}"
