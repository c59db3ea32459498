"""Writing what `linewatch eval` found: report.json, report.md, PNG figures and TIFF maps.

Layout of the output folder:

    report.json                 every number (see runner.evaluate)
    report.md                   per-category tables and the mean, per method
    roc_<category>.png          image-level ROC curves (logical, structural; each method)
    examples_<category>.png     a grid of example images with ground truth and heatmaps
    anomaly_maps/<method>/<category>/test/<type>/<id>.tiff
                                float32 maps at original size, each map's maximum the image
                                score, equal values ordered (linewatch.eval.maps); the maps
                                linewatch's metrics are computed on. The official evaluator
                                accepts them (link <category> under a LOCO name; `python -m
                                linewatch.eval.official` does, and compares its numbers)

Figures are drawn with OpenCV (no plotting library needed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import cv2
import numpy as np

from linewatch.eval.dataset import Category
from linewatch.eval.metrics import image_auroc, roc_curve_points
from linewatch.eval.results import MethodRun
from linewatch.images import ImageError, read_image, write_image

__all__ = ["write_report", "render_markdown", "write_anomaly_maps", "write_tiff", "write_roc_png", "write_examples_png",
           "score_caption"]

# RGB colours: images are written through linewatch.images.write_image
_CURVE_COLOURS = {
    ("objects", "logical"): (31, 119, 180),
    ("objects", "structural"): (214, 39, 40),
    ("patchcore", "logical"): (44, 160, 44),
    ("patchcore", "structural"): (255, 127, 14),
}
_FONT = cv2.FONT_HERSHEY_SIMPLEX


# ---------------------------------------------------------------------------- text


def _fmt(x: float | None, percent: bool = True, digits: int = 1) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.{digits}f}" if percent else f"{x:.4g}"


def _false_reject_rows(report: Mapping, method: str) -> list[str]:
    """Target vs expected vs observed false-reject rate of `method`, per category (percent)."""
    rows = [
        "",
        f"False rejects of {method}, in percent: the target the threshold was calibrated for, the rate the "
        "calibration expected (its confidence interval), and the good test images that failed "
        "(exact binomial interval).",
        "",
        "| category | target | expected | expected CI | observed on test/good | observed CI | calibration |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, per_method in report["categories"].items():
        fr, cal = per_method[method]["false_reject"], per_method[method]["calibration"]
        scores = f"{cal['method']} of {cal['n']} good scores" + ("" if cal["enough"] else
                                                                  f" (**too few**: needs {cal['n_required']})")
        rows.append(
            f"| {name} | {_fmt(fr['target'], digits=2)} | {_fmt(fr['expected'], digits=2)} | "
            f"{_fmt(fr['expected_ci'][0], digits=2)}–{_fmt(fr['expected_ci'][1], digits=2)} | "
            f"{fr['failed_good']}/{fr['good']} = {_fmt(fr['observed'], digits=2)} | "
            f"{_fmt(fr['observed_ci'][0], digits=2)}–{_fmt(fr['observed_ci'][1], digits=2)} | {scores} |"
        )
    return rows


def render_markdown(report: Mapping) -> str:
    """The Markdown summary of a report dict (numbers in percent)."""
    lines = [
        "# linewatch evaluation",
        "",
        f"- backend: **{report['backend_label']}**",
        f"- dataset: `{report['dataset']}` (device {report['device']}, image size {report['image_size']}, "
        f"k = {report['k_references']}, config {report['config_hash']})",
        f"- methods: " + "; ".join(report["methods"].values()),
        f"- image AUROC: good vs each anomaly type, image score = max of the anomaly map; "
        f"AU-sPRO: area under the sPRO curve up to FPR {report['max_fpr']} divided by {report['max_fpr']} "
        "(MVTec LOCO definition with defects_config.json saturation thresholds; AU-PRO where a category has "
        "none); false-reject rate = good test images failed, escape rate = anomalous test images passed, "
        "both at the threshold calibrated on good images (objects: validation/good and train/good "
        "leave-one-out; patchcore: validation/good). All numbers in percent.",
        f"- linewatch {report['linewatch_version']}, {report['created']}",
    ]
    for note in report.get("notes", []):
        lines.append(f"- **note:** {note}")
    for method in report["methods"]:
        lines += [
            "",
            f"## {method}",
            "",
            "| category | AUROC logical | AUROC structural | AUROC mean | AU-sPRO logical | AU-sPRO structural "
            "| AU-sPRO mean | false rejects | escapes | img/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, per_method in report["categories"].items():
            m = per_method[method]
            metric = m["au_spro"]["metric"]
            lines.append(
                f"| {name}{' (PRO)' if metric == 'PRO' else ''} | {_fmt(m['image_auroc']['logical'])} | "
                f"{_fmt(m['image_auroc']['structural'])} | {_fmt(m['image_auroc']['mean'])} | "
                f"{_fmt(m['au_spro']['logical'])} | {_fmt(m['au_spro']['structural'])} | {_fmt(m['au_spro']['mean'])} | "
                f"{_fmt(m['false_reject_rate'])} | {_fmt(m['escape_rate']['overall'])} | "
                f"{_fmt(m['test_images_per_s'], percent=False)} |"
            )
        mean = report["mean"][method]
        lines.append(
            f"| **mean** | {_fmt(mean['image_auroc']['logical'])} | {_fmt(mean['image_auroc']['structural'])} | "
            f"**{_fmt(mean['image_auroc']['mean'])}** | {_fmt(mean['au_spro']['logical'])} | "
            f"{_fmt(mean['au_spro']['structural'])} | **{_fmt(mean['au_spro']['mean'])}** | "
            f"{_fmt(mean['false_reject_rate'])} | {_fmt(mean['escape_rate']['overall'])} | |"
        )
        lines += _false_reject_rows(report, method)
    lines += ["", "Figures: `roc_<category>.png`, `examples_<category>.png`. "
              "Anomaly maps: `anomaly_maps/<method>/<category>/test/<type>/<id>.tiff`.", ""]
    return "\n".join(lines)


def write_report(out_dir: str | Path, report: Mapping) -> None:
    """report.json and report.md into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    (out / "report.md").write_text(render_markdown(report))


# ---------------------------------------------------------------------------- TIFF


def write_tiff(path: str | Path, array: np.ndarray) -> None:
    """A 2-D float32 TIFF (what the official evaluator reads with tifffile)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{path}: an anomaly map must be 2-D, got shape {array.shape}")
    if not cv2.imwrite(str(path), array):
        raise ImageError(f"{path}: could not write TIFF")


def write_anomaly_maps(out_dir: str | Path, method: str, category: Category, maps: list[np.ndarray]) -> Path:
    """Maps in the official evaluator's layout; returns the --anomaly_maps_dir to give it."""
    base = Path(out_dir) / "anomaly_maps" / method
    for item, amap in zip(category.test_images, maps):
        write_tiff(base / category.name / "test" / item.subdir / f"{item.image_id}.tiff", amap)
    return base


# ---------------------------------------------------------------------------- figures


def _text(canvas: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.45,
          colour: tuple[int, int, int] = (0, 0, 0), thickness: int = 1) -> None:
    cv2.putText(canvas, text, org, _FONT, scale, colour, thickness, cv2.LINE_AA)


def write_roc_png(path: str | Path, category: Category, runs: Mapping[str, MethodRun], size: int = 420) -> None:
    """Image-level ROC curves of every method, logical and structural, on one plot."""
    margin_l, margin_b, margin_t, margin_r = 50, 45, 30, 15
    width, height = size + margin_l + margin_r, size + margin_t + margin_b
    canvas = np.full((height, width, 3), 255, np.uint8)

    def xy(fpr: float, tpr: float) -> tuple[int, int]:
        return int(round(margin_l + fpr * size)), int(round(margin_t + (1 - tpr) * size))

    for v in np.linspace(0, 1, 6):
        cv2.line(canvas, xy(v, 0), xy(v, 1), (225, 225, 225), 1)
        cv2.line(canvas, xy(0, v), xy(1, v), (225, 225, 225), 1)
        _text(canvas, f"{v:.1f}", (xy(v, 0)[0] - 10, height - margin_b + 16), 0.38)
        _text(canvas, f"{v:.1f}", (8, xy(0, v)[1] + 4), 0.38)
    cv2.line(canvas, xy(0, 0), xy(1, 1), (170, 170, 170), 1, cv2.LINE_AA)
    cv2.rectangle(canvas, xy(0, 1), xy(1, 0), (0, 0, 0), 1)
    _text(canvas, "false positive rate (good images)", (margin_l + size // 2 - 120, height - 10), 0.42)
    _text(canvas, f"{category.name}: image ROC", (margin_l, 20), 0.5)
    labels = np.array([t.label for t in category.test_images])
    legend_y = margin_t + size - 10
    for method, run in runs.items():
        for kind in ("logical", "structural"):
            sel = labels == kind
            if not sel.any():
                continue
            both = (labels == "good") | sel
            fpr, tpr, _ = roc_curve_points(sel[both], run.scores[both])
            auc = image_auroc(sel[both], run.scores[both])
            colour = _CURVE_COLOURS.get((method, kind), (0, 0, 0))
            pts = np.array([xy(f, t) for f, t in zip(fpr, tpr)], np.int32)
            cv2.polylines(canvas, [pts], False, colour, 2, cv2.LINE_AA)
            _text(canvas, f"{method} {kind}: AUROC {100 * auc:.1f}", (xy(0.42, 0)[0], legend_y), 0.42, colour)
            legend_y -= 18
    write_image(path, canvas)


def _colourize(amap: np.ndarray, scale: float) -> np.ndarray:
    """Map values / scale (clipped to [0, 2]; 1 = the calibrated threshold) -> RGB jet."""
    norm = np.clip(amap / max(scale, 1e-12) / 2.0, 0, 1)
    bgr = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _fit(image: np.ndarray, tile: int) -> np.ndarray:
    h, w = image.shape[:2]
    s = tile / max(h, w)
    resized = cv2.resize(image, (max(1, int(w * s)), max(1, int(h * s))), interpolation=cv2.INTER_AREA)
    out = np.full((tile, tile, 3), 255, np.uint8)
    out[: resized.shape[0], : resized.shape[1]] = resized
    return out


def score_caption(score: float, threshold: float) -> str:
    """'pass 0.82 <= thr 1.3' / 'FAIL 2.61 > thr 1.3': the verdict, the score and the threshold it
    was compared with (fail when score > threshold). Four significant digits, more where those
    would print a failing score equal to its threshold."""
    fail = score > threshold
    digits = 4
    while fail and f"{score:.{digits}g}" == f"{threshold:.{digits}g}" and digits < 12:
        digits += 1
    return f"{'FAIL' if fail else 'pass'} {score:.{digits}g} {'>' if fail else '<='} thr {threshold:.{digits}g}"


def write_examples_png(path: str | Path, category: Category, runs: Mapping[str, MethodRun],
                       per_type: int = 2, tile: int = 200) -> None:
    """Rows: the first `per_type` test images of each type (good, logical, structural);
    columns: the image with its ground truth outlined in green, then each method's heatmap
    over the image (colour scale: the map divided by the method's calibrated threshold, red =
    twice it), captioned with the verdict and the image score against that threshold
    ("FAIL 2.61 > thr 1.3": fail when score > threshold)."""
    rows = []
    for label in ("good", "logical", "structural"):
        rows += [i for i, t in enumerate(category.test_images) if t.label == label][:per_type]
    header = 24
    cols = 1 + len(runs)
    canvas = np.full((header + len(rows) * (tile + 18), cols * tile, 3), 255, np.uint8)
    _text(canvas, "image + ground truth", (6, 16))
    for c, method in enumerate(runs, start=1):
        _text(canvas, f"{method} (colour = map/thr)", (c * tile + 6, 16))
    for r, i in enumerate(rows):
        item = category.test_images[i]
        image = read_image(item.path)
        if image.ndim == 2:  # a mono dataset: shown grey under the coloured outlines and maps
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
        shown = image.copy()
        for region in item.regions:
            contours, _ = cv2.findContours(region.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(shown, contours, -1, (0, 255, 0), max(1, image.shape[0] // 200))
        y = header + r * (tile + 18)
        canvas[y: y + tile, :tile] = _fit(shown, tile)
        _text(canvas, f"{item.subdir}/{item.image_id}", (4, y + tile + 13), 0.38)
        for c, (method, run) in enumerate(runs.items(), start=1):
            heat = _colourize(run.maps[i], run.threshold)
            blend = cv2.addWeighted(image, 0.45, heat, 0.55, 0)
            canvas[y: y + tile, c * tile:(c + 1) * tile] = _fit(blend, tile)
            _text(canvas, score_caption(run.scores[i], run.threshold), (c * tile + 4, y + tile + 13), 0.38,
                  (200, 0, 0) if run.scores[i] > run.threshold else (0, 120, 0))
    write_image(path, canvas)
