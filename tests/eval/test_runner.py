"""A tiny end-to-end evaluation on simulated data: report files exist and are well-formed."""

import argparse
import json

import cv2
import numpy as np
import pytest

from linewatch.config import config_from_dict
from linewatch.detector.models import BACKEND_LABELS
from linewatch.eval.cli import register
from linewatch.eval.metrics import image_auroc
from linewatch.eval.report import score_caption
from linewatch.eval.runner import evaluate, resolve_methods
from linewatch.sim import generate_dataset

SOURCE = 96


@pytest.fixture(scope="module")
def sim_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    generate_dataset(root, "screw_tray", seed=3, n_train=5, n_val=5, n_test_good=3, n_test_logical=3,
                     n_test_structural=3, size=SOURCE)
    return root


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_score_caption_names_the_threshold():
    assert score_caption(0.82, 1.3) == "pass 0.82 <= thr 1.3"
    assert score_caption(2.61, 1.3) == "FAIL 2.61 > thr 1.3"
    assert score_caption(1.3, 1.3) == "pass 1.3 <= thr 1.3"  # fail only when strictly above
    assert score_caption(1.30004, 1.3) == "FAIL 1.30004 > thr 1.3"  # never "FAIL 1.3 > thr 1.3"


def test_resolve_methods():
    assert resolve_methods("both") == ["objects", "patch", "fused", "patchcore"]
    assert resolve_methods("patchcore") == ["patchcore"]
    with pytest.raises(ValueError, match="unknown method"):
        resolve_methods("samlad")


def test_evaluate_both_methods_writes_a_well_formed_report(sim_root, tmp_path):
    config = config_from_dict({"detector": {"image_size": 64, "device": "cpu"}})
    out = tmp_path / "out"
    messages = []
    report = evaluate(config, sim_root, ["screw_tray"], out, method="both", progress=False, log=messages.append)

    saved = json.loads((out / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["backend_label"] == BACKEND_LABELS["classic"]
    assert saved["notes"] and "synthetic" in saved["notes"][0]
    for method in ("objects", "patch", "fused", "patchcore"):
        m = saved["categories"]["screw_tray"][method]
        for kind in ("logical", "structural", "mean"):
            assert 0.0 <= m["image_auroc"][kind] <= 1.0
            assert 0.0 <= m["au_spro"][kind] <= 1.0
        assert m["au_spro"]["metric"] == "sPRO" and m["au_spro"]["max_fpr"] == 0.05
        assert m["counts"] == {"good": 3, "logical": 3, "structural": 3}
        assert 0.0 <= m["false_reject_rate"] <= 1.0 and 0.0 <= m["escape_rate"]["overall"] <= 1.0
        assert np.isfinite(m["threshold"])
        assert saved["mean"][method]["image_auroc"]["mean"] == m["image_auroc"]["mean"]
        # target vs expected vs observed false-reject rate
        fr, cal = m["false_reject"], m["calibration"]
        assert fr["target"] == config.calibration.target_false_reject_rate
        assert fr["good"] == 3 and fr["observed"] == pytest.approx(fr["failed_good"] / 3, abs=1e-6)
        assert fr["observed"] == pytest.approx(m["false_reject_rate"], abs=1e-4)
        assert fr["observed_ci"][0] <= fr["observed"] <= fr["observed_ci"][1]
        assert fr["expected_ci"][0] <= fr["expected"] <= fr["expected_ci"][1]
        assert cal["n"] == (5 + 5 if method != "patchcore" else 5)  # detector: validation + train leave-one-out
        assert cal["enough"] is False and cal["n_required"] == 1000 and cal["warning"]
        assert f"screw_tray: {method}: false-reject rate target 0.50%, expected " in "\n".join(messages)
        assert f"screw_tray: {method}: WARNING: calibration: {cal['warning']}" in messages
        assert saved["mean"][method]["false_reject"]["target"] == fr["target"]

    md = (out / "report.md").read_text()
    assert BACKEND_LABELS["classic"] in md and "| screw_tray |" in md and "## patchcore" in md
    assert "False rejects of objects" in md and "False rejects of patchcore" in md
    fr = saved["categories"]["screw_tray"]["objects"]["false_reject"]
    assert f"| screw_tray | 0.50 | {100 * fr['expected']:.2f} |" in md and "(**too few**: needs 1000)" in md

    for png in ("roc_screw_tray.png", "examples_screw_tray.png"):
        image = cv2.imread(str(out / png))
        assert image is not None and image.shape[0] > 100
    for method in ("objects", "patch", "fused", "patchcore"):
        tiffs = sorted((out / "anomaly_maps" / method / "screw_tray" / "test").rglob("*.tiff"))
        assert len(tiffs) == 9
        assert {t.parent.name for t in tiffs} == {"good", "logical_anomalies", "structural_anomalies"}
        amap = cv2.imread(str(tiffs[0]), cv2.IMREAD_UNCHANGED)
        assert amap.dtype == np.float32 and amap.shape == (SOURCE, SOURCE)
        # the maps' maxima are the image scores: they give the reported AUROC (as the official script takes them)
        peaks = {t: float(cv2.imread(str(t), cv2.IMREAD_UNCHANGED).max()) for t in tiffs}
        for kind in ("logical", "structural"):
            chosen = [t for t in tiffs if t.parent.name in ("good", f"{kind}_anomalies")]
            auroc = image_auroc([t.parent.name != "good" for t in chosen], [peaks[t] for t in chosen])
            assert round(auroc, 4) == saved["categories"]["screw_tray"][method]["image_auroc"][kind]


def test_cli_eval_patchcore_and_dataset_error(sim_root, tmp_path, capsys):
    parser = _parser()
    config = tmp_path / "small.yaml"
    config.write_text("detector:\n  image_size: 64\n  device: cpu\n")
    args = parser.parse_args(["eval", "--dataset", str(sim_root), "--out", str(tmp_path / "o"), "--method",
                              "patchcore", "-c", str(config), "--quiet"])
    assert args.func(args) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert list(report["methods"]) == ["patchcore"]

    args = parser.parse_args(["eval", "--dataset", str(tmp_path / "missing"), "--out", str(tmp_path / "x"), "--quiet"])
    assert args.func(args) == 2
    assert "missing: dataset folder does not exist" in capsys.readouterr().err
