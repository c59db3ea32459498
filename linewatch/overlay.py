"""Pictures a person can look at: the anomaly heatmap over the image, object boxes, the verdict."""

from __future__ import annotations

import cv2
import numpy as np

from linewatch.detector.result import InspectionResult
from linewatch.wire import Verdict

# One JPEG quality for every overlay (the verdict stream's, the live page's and the archive's
# file are the same bytes, rendered once per verdict: linewatch.runtime.sinks.outcome).
OVERLAY_JPEG_QUALITY = 90
# BGR-free: colours are RGB because images are RGB throughout linewatch.
STATUS_COLOURS = {
    "matched": (40, 200, 40),
    "unmatched": (230, 30, 30),
    "surplus": (220, 0, 220),
    "missing": (255, 150, 0),
}


def render_overlay(image: np.ndarray, result: InspectionResult | Verdict, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 (H, W, 3) of an RGB or grey `image`: the heatmap (scaled so the threshold sits mid-colourmap) blended
    over `image`, object boxes coloured by status, a banner with verdict and score, and (fused
    score) a line with each branch's z-score. `result` is the detector's result or a judged
    (pass/fail) verdict carrying the same fields."""
    if image.ndim == 2:  # a grey frame (mono bank), shown grey under the coloured heatmap
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    h, w = image.shape[:2]
    heat = np.nan_to_num(result.heatmap) if result.heatmap is not None else np.zeros((h, w), np.float32)
    if heat.shape != (h, w):
        heat = cv2.resize(heat, (w, h), interpolation=cv2.INTER_LINEAR)
    scale = result.threshold if np.isfinite(result.threshold) and result.threshold > 0 else max(float(heat.max()), 1e-9)
    level = np.clip(heat / (2.0 * scale), 0.0, 1.0)
    coloured = cv2.applyColorMap((level * 255).astype(np.uint8), cv2.COLORMAP_JET)
    coloured = cv2.cvtColor(coloured, cv2.COLOR_BGR2RGB)
    out = cv2.addWeighted(image, 1.0 - alpha, coloured, alpha, 0.0)
    thickness = max(1, round(min(h, w) / 200))
    for obj in result.objects:
        x, y, bw, bh = (int(round(v)) for v in obj["bbox"])
        colour = STATUS_COLOURS.get(obj["status"], (255, 255, 255))
        cv2.rectangle(out, (x, y), (x + bw, y + bh), colour, thickness)
        if obj["status"] != "matched":
            cv2.putText(out, obj["status"], (x, max(10, y - 3)), cv2.FONT_HERSHEY_SIMPLEX, 0.35 * thickness, colour, 1,
                        cv2.LINE_AA)
    verdict = result.verdict
    banner = f"{verdict.upper()}  score {result.score:.3g} / thr {result.threshold:.3g}  [{result.backend}]"
    bar_h = max(14, round(h / 16))
    banner_colour = (200, 30, 30) if verdict == "fail" else (30, 140, 30)
    cv2.rectangle(out, (0, 0), (w, bar_h), banner_colour, -1)
    cv2.putText(out, banner, (4, bar_h - 4), cv2.FONT_HERSHEY_SIMPLEX, bar_h / 36, (255, 255, 255), 1, cv2.LINE_AA)
    if result.branch_scores:  # the fused score's parts: which branch saw what (z above its good mean)
        line = "  ".join(f"{name} {z:+.1f}" for name, z in result.branch_scores.items())
        cv2.rectangle(out, (0, bar_h), (w, 2 * bar_h), (40, 40, 40), -1)
        cv2.putText(out, line, (4, 2 * bar_h - 4), cv2.FONT_HERSHEY_SIMPLEX, bar_h / 40, (255, 255, 255), 1,
                    cv2.LINE_AA)
    return out


def overlay_jpeg(image: np.ndarray, result: InspectionResult | Verdict, quality: int = OVERLAY_JPEG_QUALITY) -> bytes:
    """The overlay encoded as JPEG bytes (the verdict stream, the live page, the archive)."""
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(render_overlay(image, result), cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("could not encode the overlay as JPEG")
    return data.tobytes()
