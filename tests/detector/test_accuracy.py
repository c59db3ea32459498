"""Accuracy regression on the synthetic line with the demo config (classic backend).

Not a speed test and not a real-world benchmark: it guards the detector's ability to tell
good from logically and structurally anomalous synthetic frames, so that a change to any
stage (features, segmenter, matching, alignment, scoring, calibration) that loses accuracy
fails here, on every product, the shape-only ones (glyph_tray, bracket_kit) included. Fixed
seed; what it measured is printed (`pytest tests/detector/test_accuracy.py -s`); the
3-seed figures of `linewatch eval` are in the README. Each product is measured once per run, by
its own test (in parallel under pytest-xdist); the mean test reads their figures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from linewatch.bank_builder import build_bank, inspect_images
from linewatch.good_images import read_folder
from linewatch.config import load_config
from linewatch.detector.inspector import Inspector
from linewatch.detector.models import build_models
from linewatch.sim import ALL_PRODUCTS, generate_dataset

REPO = Path(__file__).resolve().parents[2]
SEED = 0
MEAN_FLOOR = 0.90
PRODUCT_FLOOR = 0.80


def product_auroc(product: str, root: Path) -> dict[str, float]:
    """Image AUROC of logical and structural anomalies against good frames for one product:
    a bank from 20 good frames (calibrated on 10), then 20 good, 20 logical and 15 structural
    test frames, all from seed SEED at 256 px, judged with configs/demo.yaml on the CPU."""
    config = load_config(REPO / "configs" / "demo.yaml")
    assert config.detector.backend == "classic"
    config.detector.device = "cpu"
    device = torch.device("cpu")
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
    auroc = {}
    for kind, category in (("logical", "logical_anomalies"), ("structural", "structural_anomalies")):
        bad = scores[category]
        labels = np.r_[np.zeros(len(good)), np.ones(len(bad))]
        auroc[kind] = float(roc_auc_score(labels, np.r_[good, bad]))
    return auroc


@pytest.fixture(scope="session")
def auroc_of(made_once):
    """`auroc_of(product, wait=True)`: product_auroc, measured once per run (tests/conftest.py
    `made_once`): the per-product tests can run in parallel (pytest-xdist) and the mean test reads
    their figures. wait=False: None while another worker is measuring it."""
    config = (REPO / "configs" / "demo.yaml").read_text()
    return lambda product, wait=True: made_once("auroc", {"product": product, "seed": SEED, "config": config},
                                                lambda folder: product_auroc(product, folder), wait=wait)


@pytest.mark.slow
@pytest.mark.parametrize("product", ALL_PRODUCTS)
def test_image_auroc_of_each_product(auroc_of, product):
    values = auroc_of(product)
    for kind, value in values.items():
        assert value >= PRODUCT_FLOOR, f"{product} {kind} AUROC {value:.3f} < {PRODUCT_FLOOR}"


@pytest.mark.slow
def test_image_auroc_on_synthetic_line(auroc_of):
    # measure (or read) every product no other worker is measuring now; wait only when each one
    # left is being measured elsewhere
    found, pending = {}, list(ALL_PRODUCTS)
    while pending:
        for product in list(pending):
            value = auroc_of(product, wait=False)
            if value is not None:
                found[product] = value
                pending.remove(product)
        if pending:
            product = pending.pop(0)
            found[product] = auroc_of(product)
    auroc = {product: found[product] for product in ALL_PRODUCTS}
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
