"""`linewatch eval`: accuracy of a method on MVTec LOCO AD-layout categories.

Per category and method: fit on train/good (the object pipeline builds its template bank,
PatchCore its patch memory), calibrate the verdict threshold on validation/good, score every
test image, then compute

- image AUROC of good vs logical, good vs structural, and their mean (the image score is the
  method's score, which is also the maximum of the map written for the image: `maps.official_maps`);
- AU-sPRO up to FPR `max_fpr` (AU-PRO without defects_config.json) for each anomaly type,
  each on that type's images plus the good test images, and their mean;
- the false-reject rate (good test images failed) and escape rates (anomalous images passed)
  at the calibrated threshold; next to the observed false-reject rate, the target it was
  calibrated for and the rate the calibration expected, with its confidence interval.

Methods: "objects" is the Inspector (the SAM-LAD pipeline on whatever backend the config
names); "patchcore" is the object-free kNN baseline on the same backbone.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from linewatch import __version__
from scipy import stats

from linewatch.bank_builder import build_bank
from linewatch.config import Config
from linewatch.detector.calibration import MIN_SCORES, Calibration, calibrate
from linewatch.detector.inspector import Inspector
from linewatch.detector.models import BACKEND_LABELS, Models, build_models, select_device
from linewatch.eval.dataset import ANOMALY_TYPES, Category, DatasetError, load_dataset
from linewatch.eval.maps import official_maps
from linewatch.eval.metrics import au_spro, image_auroc, rates_at_threshold
from linewatch.eval.patchcore import PatchCore
from linewatch.eval.results import MethodRun
from linewatch.images import list_images, read_image

__all__ = ["METHODS", "MethodRun", "resolve_methods", "run_detector", "run_patchcore", "category_metrics", "evaluate"]

DETECTOR_METHODS = ("objects", "patch", "fused")  # one detector run, its score branches and their fusion
METHODS = DETECTOR_METHODS + ("patchcore",)
METHOD_LABELS = {
    "objects": "objects (the detector's object branch: SAM-LAD object matching + per-object Gaussians)",
    "patch": "patch (the detector's patch branch: each patch against its place in the nearest good images)",
    "fused": "fused (the detector's score: every branch in units of its spread on good images; detector.score)",
    "patchcore": "patchcore (kNN over patch features of the same backbone, no objects)",
}
ANOMALY_LABELS = tuple(ANOMALY_TYPES.values())  # ("logical", "structural")


def resolve_methods(method: str | Sequence[str]) -> list[str]:
    """'objects' | 'patch' | 'fused' | 'patchcore' | 'both' (all of them) (or a list of names) -> list of
    method names."""
    given = [method] if isinstance(method, str) else list(method)
    names = list(METHODS) if "both" in given else [m for m in METHODS if m in given] + [m for m in given if m not in METHODS]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)} or 'both'")
    return names


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _score_test(category: Category, judge: Callable[[list[np.ndarray]], tuple[np.ndarray, list[np.ndarray]]],
                batch_size: int, progress: bool, desc: str) -> tuple[np.ndarray, list[np.ndarray], float]:
    """Run `judge` over the test images in batches; returns scores, maps and seconds spent."""
    scores: list[float] = []
    maps: list[np.ndarray] = []
    seconds = 0.0
    bar = tqdm(total=len(category.test_images), desc=desc, unit="img", disable=not progress)
    for chunk in _chunks(category.test_images, batch_size):
        images = [read_image(t.path) for t in chunk]
        start = time.perf_counter()
        s, m = judge(images)
        seconds += time.perf_counter() - start
        scores.extend(float(x) for x in s)
        maps.extend(np.asarray(x, dtype=np.float32) for x in m)
        bar.update(len(chunk))
    bar.close()
    return np.asarray(scores), maps, seconds


def run_detector(config: Config, category: Category, models: Models, device: torch.device, wanted: Sequence[str],
                 batch_size: int = 8, progress: bool = True) -> dict[str, MethodRun]:
    """The detector: bank from train/good, calibrated on the scores of validation/good and of
    train/good judged leave-one-out (build_bank), then every test image. One run gives every
    method of `wanted` among DETECTOR_METHODS: "fused" is the detector's score (with the bank's
    threshold), "objects" and "patch" its branches alone, each with its own threshold from the
    same good images by the same `calibrate`. The bank is built with detector.score.source =
    "fused" whatever the config says, so that every branch is computed."""
    config = config.model_copy(deep=True)
    config.detector.score.source = "fused"
    start = time.perf_counter()
    bank = build_bank(config, category.train_dir, category.validation_dir, models=models,
                      batch_size=batch_size, progress=progress)
    fit_seconds = time.perf_counter() - start
    inspector = Inspector(config.detector, models, bank, device)
    inspector.keep_component_maps = True

    good = bank.manifest.score_normalisation  # each branch's good scores, as build_bank calibrated with them

    results: list = []

    def judge(images: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        batch = inspector.inspect(images)
        results.extend(batch)
        return np.array([r.score for r in batch]), [r.heatmap for r in batch]

    fused_scores, fused_maps, test_seconds = _score_test(category, judge, batch_size, progress,
                                                         f"{category.name}: detector")
    seconds = {"fit_and_calibrate": round(fit_seconds, 3), "test": round(test_seconds, 3)}
    info = {"bank_images": bank.size, "k_references": config.detector.k_references}
    runs = {}
    for name in wanted:
        if name == "fused":
            runs[name] = MethodRun(name, fused_scores, fused_maps, bank.threshold, bank.calibration,
                                   seconds=seconds, info=dict(info, branches=sorted(results[0].components)))
            continue
        branch = calibrate(np.array(good[name]["scores"]), config.calibration.target_false_reject_rate,
                           confidence=config.calibration.confidence)
        runs[name] = MethodRun(name, np.array([r.components[name] for r in results]),
                               [r.component_maps[name] for r in results], branch.threshold,
                               replace(branch, source=bank.calibration.source),
                               seconds=seconds, info=info)
    return runs


def run_patchcore(config: Config, category: Category, models: Models, device: torch.device,
                  batch_size: int = 8, progress: bool = True) -> MethodRun:
    """The PatchCore baseline on the detector's backbone. Calibration (the same `calibrate` as
    the bank builder) uses validation/good, or the last fifth of train/good (at least
    MIN_SCORES images, held out of the memory bank) when there is none."""
    det = config.detector
    start = time.perf_counter()
    good = [read_image(p) for p in list_images(category.train_dir)]
    if category.validation_dir is not None:
        held_out = [read_image(p) for p in list_images(category.validation_dir)]
    else:
        n_hold = max(MIN_SCORES, len(good) // 5)
        if len(good) <= n_hold:
            raise DatasetError(f"{category.train_dir}: {len(good)} good images; patchcore without validation/good "
                               f"holds out {n_hold} of them for calibration and needs at least one more")
        good, held_out = good[:-n_hold], good[-n_hold:]
    model = PatchCore(models.backbone, det.image_size, device, smoothing_sigma=det.measure.smoothing_sigma)
    model.fit(good, batch_size=batch_size)
    del good
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    val_scores = np.concatenate([model.score(chunk)[0] for chunk in _chunks(held_out, batch_size)])
    try:
        calibrated = calibrate(val_scores, config.calibration.target_false_reject_rate,
                               confidence=config.calibration.confidence)
    except ValueError as e:
        raise DatasetError(f"{category.name}: patchcore cannot calibrate its threshold: {e}") from None
    source = "validation folder" if category.validation_dir is not None else "held-out fifth of train/good"
    calibration = replace(calibrated, source=f"{source} ({len(val_scores)})")
    calibrate_seconds = time.perf_counter() - start
    scores, maps, test_seconds = _score_test(category, model.score, batch_size, progress, f"{category.name}: patchcore")
    return MethodRun(
        "patchcore", scores, maps, calibration.threshold, calibration,
        seconds={"fit": round(fit_seconds, 3), "calibrate": round(calibrate_seconds, 3), "test": round(test_seconds, 3)},
        info={"memory_bank_patches": model.bank_size},
    )


def for_official_evaluator(run: MethodRun) -> MethodRun:
    """The run with the maps `linewatch eval` scores and writes (`linewatch.eval.maps.official_maps`):
    each map's maximum is the image score, and no mass of exactly equal values, so that the
    official MVTec LOCO AD script accepts the maps and computes the same image AUROC from them."""
    maps, scores = official_maps(run.maps, run.scores)
    return replace(run, maps=maps, scores=scores)


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), digits)


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def category_metrics(category: Category, run: MethodRun, max_fpr: float = 0.05) -> dict:
    """Metrics of one method on one category (see the module docstring); None where a
    category has no image of an anomaly type."""
    labels = np.array([t.label for t in category.test_images])
    good = labels == "good"
    good_maps = [m for m, g in zip(run.maps, good) if g]
    auroc: dict[str, float | None] = {}
    spro: dict[str, float | None] = {}
    escape: dict[str, float | None] = {}
    for kind in ANOMALY_LABELS:
        sel = labels == kind
        if not sel.any():
            auroc[kind] = spro[kind] = escape[kind] = None
            continue
        both = good | sel
        auroc[kind] = image_auroc(sel[both], run.scores[both])
        idx = np.nonzero(sel)[0]
        spro[kind] = au_spro(
            [run.maps[i] for i in idx],
            [[r.mask for r in category.test_images[i].regions] for i in idx],
            [[r.saturation for r in category.test_images[i].regions] for i in idx],
            good_maps,
            max_fpr=max_fpr,
        )
        escape[kind] = rates_at_threshold(sel[both], run.scores[both], run.threshold)["escape_rate"]
    overall = rates_at_threshold(~good, run.scores, run.threshold)
    failed_good = int(np.sum(run.scores[good] > run.threshold))
    n_test = len(run.scores)
    cal = run.calibration
    test_seconds = run.seconds.get("test", 0.0)
    return {
        "image_auroc": {**{k: _round(v) for k, v in auroc.items()}, "mean": _round(_mean(list(auroc.values())))},
        "au_spro": {**{k: _round(v) for k, v in spro.items()}, "mean": _round(_mean(list(spro.values()))),
                    "metric": category.metric_name, "max_fpr": max_fpr},
        "threshold": _round(run.threshold, 6),
        "false_reject_rate": _round(overall["false_reject_rate"]),
        "false_reject": false_reject_summary(cal, failed_good, int(good.sum())),
        "escape_rate": {**{k: _round(v) for k, v in escape.items()}, "overall": _round(overall["escape_rate"])},
        "counts": {"good": int(good.sum()), **{k: int((labels == k).sum()) for k in ANOMALY_LABELS}},
        "calibration": {k: getattr(cal, k) for k in ("method", "source", "n", "n_required", "enough", "warning",
                                                     "observed_false_reject_rate")},
        "seconds": run.seconds,
        "test_images_per_s": _round(n_test / test_seconds, 2) if test_seconds > 0 else None,
        **run.info,
    }


def false_reject_summary(calibration: Calibration, failed: int, good: int) -> dict:
    """Target vs observed false-reject rate of one method on one category: the target and the
    rate the calibration expected (with its interval) next to the good test images failed, with
    an exact (Clopper-Pearson) interval at the calibration's confidence: a handful of good test
    images measures a rate of 0.5 % only very roughly."""
    confidence = calibration.confidence if calibration.confidence is not None else 0.95
    alpha = 1.0 - confidence
    if good:
        low = stats.beta.ppf(alpha / 2, failed, good - failed + 1) if failed else 0.0
        high = stats.beta.ppf(1 - alpha / 2, failed + 1, good - failed) if failed < good else 1.0
    return {
        "target": calibration.target_false_reject_rate,
        "expected": _round(calibration.expected_false_reject_rate, 6),
        "expected_ci": [_round(calibration.ci_low, 6), _round(calibration.ci_high, 6)],
        "observed": _round(failed / good, 6) if good else None,
        "observed_ci": [_round(low, 6), _round(high, 6)] if good else [None, None],
        "failed_good": failed,
        "good": good,
        "confidence": confidence,
    }


def false_reject_line(category: str, method: str, metrics: dict) -> str:
    """The log line: target, expected and observed false-reject rate of one method on one category."""
    fr, cal = metrics["false_reject"], metrics["calibration"]
    expected = ("expected ?" if fr["expected"] is None else
                f"expected {fr['expected']:.2%} ({fr['confidence']:.0%} CI {fr['expected_ci'][0]:.2%} to "
                f"{fr['expected_ci'][1]:.2%})")
    observed = ("observed: no good test images" if not fr["good"] else
                f"observed {fr['failed_good']}/{fr['good']} = {fr['observed']:.2%} of the good test images "
                f"({fr['confidence']:.0%} CI {fr['observed_ci'][0]:.2%} to {fr['observed_ci'][1]:.2%})")
    return (f"{category}: {method}: false-reject rate target {fr['target']:.2%}, {expected} from "
            f"{cal['method']} of {cal['n']} good scores; {observed}")


def _data_note(category: Category) -> str | None:
    """Say so when the data are linewatch's synthetic products."""
    manifest = category.root / "manifest.json"
    if manifest.exists():
        try:
            data = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            return None
        if isinstance(data, dict) and {"product", "seed", "counts"} <= set(data):
            return (f"{category.name}: synthetic images from linewatch.sim (product {data['product']}, seed "
                    f"{data['seed']}); they show the pipeline is wired correctly, not real-world accuracy")
    return None


def evaluate(
    config: Config,
    dataset_root: str | Path,
    categories: Sequence[str] | None = None,
    out_dir: str | Path = "eval_out",
    method: str | Sequence[str] = "objects",
    progress: bool = True,
    batch_size: int = 8,
    max_fpr: float = 0.05,
    examples_per_type: int = 2,
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
    loaded: Sequence[Category] | None = None,
) -> dict:
    """Evaluate `method` ('objects', 'patchcore', 'both') on `categories` (default: every
    category folder under `dataset_root`); write report.json, report.md, ROC and example PNGs
    and TIFF anomaly maps into `out_dir`; return the report dict (the content of report.json).
    `loaded`: their layouts when already read (`load_dataset(dataset_root, categories)`)."""
    from linewatch.eval import report as report_io

    methods = resolve_methods(method)
    root = Path(dataset_root)
    loaded = list(loaded) if loaded is not None else load_dataset(root, categories)  # layout errors before any model
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = select_device(config.detector.device)
    det = config.detector
    report: dict = {
        "linewatch_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "backend": det.backend,
        "backend_label": BACKEND_LABELS[det.backend],
        "device": str(device),
        "config_hash": det.identity_hash(),
        "image_size": det.image_size,
        "k_references": det.k_references,
        "dataset": str(root.resolve()),
        "methods": {m: METHOD_LABELS[m] for m in methods},
        "max_fpr": max_fpr,
        "notes": [n for n in (_data_note(c) for c in loaded) if n],
        "categories": {},
        "mean": {},
    }
    # one set of models for every category: what a backend fits on a category's good images
    # lives in that category's bank, and each Inspector applies its own bank's to a copy
    models = build_models(det, device)
    for category in loaded:
        log(f"{category.name}: {len(category.test_images)} test images, {category.metric_name} "
            f"({'defects_config.json' if category.defects else 'no defects_config.json'})")
        for warning in category.warnings:
            log(f"{category.name}: WARNING: {warning}")
        runs: dict[str, MethodRun] = {}
        detector_methods = [m for m in methods if m in DETECTOR_METHODS]
        if detector_methods:
            runs.update(run_detector(config, category, models, device, detector_methods, batch_size, progress))
        if "patchcore" in methods:
            runs["patchcore"] = run_patchcore(config, category, models, device, batch_size=batch_size, progress=progress)
        for name in methods:
            runs[name] = for_official_evaluator(runs[name])
            metrics = category_metrics(category, runs[name], max_fpr)
            report["categories"].setdefault(category.name, {})[name] = metrics
            log(false_reject_line(category.name, name, metrics))
            if metrics["calibration"]["warning"]:
                log(f"{category.name}: {name}: WARNING: calibration: {metrics['calibration']['warning']}")
            report_io.write_anomaly_maps(out, name, category, runs[name].maps)
        report_io.write_roc_png(out / f"roc_{category.name}.png", category, runs)
        report_io.write_examples_png(out / f"examples_{category.name}.png", category, runs, examples_per_type)
        del runs
    for name in methods:
        per_cat = [report["categories"][c.name][name] for c in loaded]
        report["mean"][name] = {
            "image_auroc": {k: _round(_mean([m["image_auroc"][k] for m in per_cat])) for k in (*ANOMALY_LABELS, "mean")},
            "au_spro": {k: _round(_mean([m["au_spro"][k] for m in per_cat])) for k in (*ANOMALY_LABELS, "mean")},
            "false_reject_rate": _round(_mean([m["false_reject_rate"] for m in per_cat])),
            "false_reject": {
                "target": config.calibration.target_false_reject_rate,
                "expected": _round(_mean([m["false_reject"]["expected"] for m in per_cat]), 6),
                "observed": _round(_mean([m["false_reject"]["observed"] for m in per_cat]), 6),
                # pooled over the categories: the good test images failed / all good test images
                "failed_good": sum(m["false_reject"]["failed_good"] for m in per_cat),
                "good": sum(m["false_reject"]["good"] for m in per_cat),
            },
            "escape_rate": {k: _round(_mean([m["escape_rate"][k] for m in per_cat])) for k in (*ANOMALY_LABELS, "overall")},
        }
    report_io.write_report(out, report)
    log(f"wrote {out / 'report.json'} and {out / 'report.md'}")
    return report
