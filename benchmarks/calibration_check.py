"""Does the calibrated threshold keep its promise at low targets? (issue 19, item 4)

Per product of the synthetic line: a bank from --train good images with a config (default
configs/demo.yaml: the weights-free classic backend), its good-image scores on --validation
held-out good images; per target false-reject rate, the threshold `calibrate` fits to those
scores and its bootstrap CI of the false-reject rate; then the rate observed on --test-good
further good images the calibration never saw, with that observation's own 95 % Clopper-Pearson
interval (a few thousand images cannot pin down 0.1 % closely: 2000 images expect 2 rejects).

    python benchmarks/calibration_check.py --out /tmp/calcheck --validation 250 --test-good 2000

Prints a table (and writes OUT/calibration_check.json, with every score): target, method, the
bootstrap CI of the false-reject rate, observed rejects / images, the observed rate's
Clopper-Pearson interval, whether the observed rate lies in the CI ("in CI", which ignores the
test set's own binomial noise), and the decision: the central 95 % range of the reject count
the calibration predicts for that many images (`calibration.rejects_interval`: each bootstrap
refit's rate drawn binomially over the test images) and whether the observed count lies in it
("agrees"). The images are generated into OUT once (seeded) and reused by later runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from linewatch.bank_builder import build_bank, inspect_images
from linewatch.good_images import read_folder
from linewatch.config import load_config
from linewatch.detector.calibration import calibrate, rejects_interval
from linewatch.detector.inspector import Inspector
from linewatch.detector.models import build_models
from linewatch.sim import ALL_PRODUCTS, generate_dataset

REPO = Path(__file__).resolve().parents[1]


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval of a rate observed as k of n."""
    alpha = 1.0 - confidence
    low = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def dataset(out: Path, product: str, seed: int, n_train: int, n_val: int, n_test: int, size: int) -> Path:
    folder = out / f"seed{seed}" / product
    manifest = folder / "manifest.json"
    counts = {"train": n_train, "validation": n_val, "test_good": n_test, "test_logical": 0, "test_structural": 0}
    if manifest.exists() and json.loads(manifest.read_text()).get("counts") == counts:
        return folder
    shutil.rmtree(folder, ignore_errors=True)  # images of other counts must not stay behind
    return generate_dataset(out / f"seed{seed}", product, seed=seed, n_train=n_train, n_val=n_val,
                            n_test_good=n_test, n_test_logical=0, n_test_structural=0, size=size)


def check_product(config_path: Path, folder: Path, targets: list[float], batch: int) -> dict:
    config = load_config(config_path)
    config.detector.device = "cpu"
    device = torch.device("cpu")
    models = build_models(config.detector, device)
    bank = build_bank(config, folder / "train" / "good", folder / "validation" / "good", models=models,
                      batch_size=batch, progress=False)
    validation = np.asarray(bank.calibration.scores, dtype=np.float64)
    inspector = Inspector(config.detector, models, bank, device)
    test = np.array([r.score for r in inspect_images(inspector, read_folder(folder / "test" / "good")[1], batch, False)])
    # the bank keeps its calibration scores rounded to 6 decimals; the inspector's scores of the
    # same images must be those (else the threshold and the test scores are on different scales)
    again = np.array([r.score for r in inspect_images(inspector, read_folder(folder / "validation" / "good")[1][:batch],
                                                      batch, False)])
    scale_error = float(np.max(np.abs(again - validation[:len(again)])))
    return {"validation": len(validation), "scale_error": scale_error, "rows": judge(validation, test, targets, config.calibration.confidence),
            "validation_scores": validation.round(6).tolist(), "test_scores": test.round(6).tolist()}


def judge(validation: np.ndarray, test: np.ndarray, targets: list[float], confidence: float) -> list[dict]:
    """Per target: the threshold calibrated on the validation scores, its CI, and the rate
    observed on the test scores with the observation's own interval."""
    rows = []
    for target in targets:
        cal = calibrate(validation, target, confidence=confidence)
        rejects = int(np.sum(test > cal.threshold))
        low, high = clopper_pearson(rejects, len(test))
        observed = rejects / len(test)
        expected_low, expected_high = rejects_interval(cal, len(test))
        rows.append({"target": target, "method": cal.method, "threshold": cal.threshold, "enough": cal.enough,
                     "expected": cal.expected_false_reject_rate, "ci_low": cal.ci_low, "ci_high": cal.ci_high,
                     "rejects": rejects, "images": len(test), "observed": observed,
                     "observed_low": low, "observed_high": high,
                     "in_ci": bool(cal.ci_low <= observed <= cal.ci_high),
                     "expected_rejects_low": expected_low, "expected_rejects_high": expected_high,
                     "agrees": bool(expected_low <= rejects <= expected_high),
                     "intervals_overlap": bool(low <= cal.ci_high and cal.ci_low <= high)})
    return rows


def print_rows(product: str, rows: list[dict]) -> None:
    for r in rows:
        print(f"{product:13s} {r['target']:6.2%} {r['method']:13s} {r['ci_low']:7.2%} .. {r['ci_high']:6.2%} "
              f"{r['rejects']:4d}/{r['images']:<5d} {r['observed']:5.2%} {r['observed_low']:7.2%} .. "
              f"{r['observed_high']:6.2%} {'yes' if r['in_ci'] else 'NO':3s} {r['expected_rejects_low']:4d} .. "
              f"{r['expected_rejects_high']:<4d} {'yes' if r['agrees'] else 'NO'}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/calcheck"))
    p.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    p.add_argument("--products", nargs="+", default=list(ALL_PRODUCTS))
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--train", type=int, default=20)
    p.add_argument("--validation", type=int, default=250)
    p.add_argument("--test-good", type=int, default=2000)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--targets", type=float, nargs="+", default=[0.02, 0.005, 0.001])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rescore", action="store_true",
                   help="judge again the scores OUT/calibration_check.json holds (no detector run): "
                        "what a change of the calibration method does to the same scores")
    args = p.parse_args()
    torch.set_num_threads(2)
    saved = args.out / "calibration_check.json"
    if args.rescore:
        report = json.loads(saved.read_text())
    else:
        report = {"config": str(args.config), "seed": args.seed, "train": args.train, "validation": args.validation,
                  "test_good": args.test_good, "products": {}}
    print(f"config {report['config']}, seed {report['seed']}, {report['train']} train / "
          f"{report.get('validation', args.validation)} validation / {report.get('test_good', args.test_good)} test "
          f"good images per product, {args.size} px")
    print(f"{'product':13s} {'target':>6s} {'method':13s} {'bootstrap CI':>17s} {'observed':>14s} "
          f"{'its 95% interval':>17s} in CI {'predicted':>10s} agrees")
    for product in args.products:
        if args.rescore:
            result = report["products"][product]
            result["rows"] = judge(np.array(result["validation_scores"]), np.array(result["test_scores"]),
                                   args.targets, load_config(Path(report["config"])).calibration.confidence)
        else:
            started = time.perf_counter()
            folder = dataset(args.out, product, args.seed, args.train, args.validation, args.test_good, args.size)
            result = check_product(args.config, folder, args.targets, args.batch)
            result["seconds"] = round(time.perf_counter() - started, 1)
            report["products"][product] = result
            if result["scale_error"] > 1e-5:
                print(f"{product}: the inspector's scores differ from the bank's calibration scores by "
                      f"{result['scale_error']:.2g}: the check is not valid")
        print_rows(product, result["rows"])
        args.out.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(report) + "\n")  # after every product: a stopped run keeps what it measured


if __name__ == "__main__":
    main()
