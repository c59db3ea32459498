"""The end of the measure stage: the branches' maps on the device -> one `InspectionResult` per image.

    raw maps {"objects": (B, H', W'), "patch": (B, h, w), ...}
      --bilinear to the working size S, Gaussian blur--> branch maps (B, S, S)
      --fuse_maps (linewatch.detector.fusion)--> score map (B, S, S); the same rule on the peaks: score (B,)
      --ONE device -> host copy (to_host)--> heatmaps at each input's size, object records, verdicts

Object records are in input pixels: bbox [x, y, w, h], area, status (matched, unmatched,
surplus from the query's objects; missing from the reference parts no query object matches,
each reported once however many references show it), score.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from linewatch.detector.fusion import branch_z_scores, fuse_maps
from linewatch.detector.result import InspectionResult


def build_results(raw_maps: dict[str, Tensor], object_maps: Tensor, is_matched: Tensor, is_surplus: Tensor,
                  missing: dict[str, Tensor], soft_masks: Tensor, boxes: Tensor, valid: Tensor,
                  sizes: list[tuple[int, int]], *, image_size: int, smoothing_sigma: float,
                  normalisation: dict | None, source: str, threshold: float, backend: str,
                  keep_component_maps: bool) -> list[InspectionResult]:
    """Smoothed maps, scores and object lists, from ONE device -> host copy (`to_host`) of
    everything they need; the Python records are built on the host.

    raw_maps: the branches' maps; object_maps (B, M, H', W'); is_matched, is_surplus (B, M)
    bool; missing: `linewatch.detector.measure.missing_parts`'s report; soft_masks (B, M, H', W'),
    boxes (B, M, 4) in working pixels, valid (B, M) of the query objects; sizes: each input's
    (H, W). The score map is the branch maps' `fuse_maps` at the working size `image_size`;
    verdict "fail" when the score is above `threshold`. keep_component_maps: results carry each
    branch's map too (evaluation)."""
    size = image_size
    branch_maps = {name: smoothed(raw, size, smoothing_sigma) for name, raw in raw_maps.items()}
    components = {name: m.flatten(1).amax(1) for name, m in branch_maps.items()}
    maps = fuse_maps(branch_maps, normalisation, source)
    scores = fuse_maps(components, normalisation, source)  # the same rule on the peaks
    kept = branch_maps if keep_component_maps else {}
    cell_area = (size / soft_masks.shape[-1]) ** 2  # working pixels per feature cell
    host = to_host({
        "maps": maps,
        "scores": scores,
        **{f"component_{name}": value for name, value in components.items()},
        **{f"component_map_{name}": m for name, m in kept.items()},
        "object_scores": object_maps.flatten(2).amax(2),
        "areas": soft_masks.flatten(2).sum(2) * cell_area,  # (B, M), working pixels
        "boxes": boxes,
        "valid": valid,
        "matched": is_matched,
        "surplus": is_surplus,
        **{f"missing_{name}": value for name, value in missing.items()},
    })
    results = []
    for bi, (h, w) in enumerate(sizes):
        sx, sy = w / size, h / size
        objects = []
        for i in np.flatnonzero(host["valid"][bi]):
            status = "matched" if host["matched"][bi, i] else ("surplus" if host["surplus"][bi, i] else "unmatched")
            objects.append(object_record(host["boxes"][bi, i], float(host["areas"][bi, i]), sx, sy, status,
                                         host["object_scores"][bi, i]))
        for t in distinct_parts(host["missing_missing"] & (host["missing_image"] == bi), host["missing_overlap"]):
            area = float(host["missing_mass"][t]) * cell_area
            objects.append(object_record(host["missing_box"][t], area, sx, sy, "missing",
                                         float(host["missing_score"][t])))
        score = float(host["scores"][bi])

        def at_input_size(amap: np.ndarray) -> np.ndarray:
            resized = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR) if (h, w) != (size, size) else amap
            return resized.astype(np.float32)

        raw_scores = {name: float(host[f"component_{name}"][bi]) for name in branch_maps}
        results.append(
            InspectionResult(
                score=score,
                verdict="fail" if score > threshold else "pass",
                threshold=float(threshold),
                heatmap=at_input_size(host["maps"][bi]),
                objects=objects,
                backend=backend,
                components=raw_scores,
                branch_scores=branch_z_scores(raw_scores, normalisation if source == "fused" else None),
                component_maps={name: at_input_size(host[f"component_map_{name}"][bi]) for name in kept} or None,
            )
        )
    return results


def smoothed(raw: Tensor, size: int, sigma: float) -> Tensor:
    """Maps (B, h, w) -> (B, size, size): bilinearly resized (align_corners=False) to the
    working size, then `gaussian_blur`red. Both steps are linear and act on rows and columns
    separately, so they are applied as two small matrix products, A_h @ raw @ A_w^T
    (`smoothing_matrix`): the same operator as interpolate + blur (equal to float32 rounding),
    in a fraction of the time of a single-channel convolution on a CPU."""
    h, w = raw.shape[-2:]
    rows = smoothing_matrix(h, size, sigma, raw.device)
    columns = rows if w == h else smoothing_matrix(w, size, sigma, raw.device)
    return rows @ raw.float() @ columns.T


_SMOOTHING_MATRICES: dict[tuple[int, int, float, str], Tensor] = {}


def smoothing_matrix(n_in: int, n_out: int, sigma: float, device: torch.device) -> Tensor:
    """(n_out, n_in) float32 on `device`: one axis of `smoothed`, the 1-D bilinear resize from
    n_in to n_out samples followed by `gaussian_blur`'s kernel (reflect padding), computed in
    float64 by applying those two steps to each unit impulse; kept per (n_in, n_out, sigma, device)."""
    key = (n_in, n_out, float(sigma), str(device))
    if key not in _SMOOTHING_MATRICES:
        impulses = torch.eye(n_in, dtype=torch.float64)[:, None, :]  # (n_in, 1, n_in)
        resized = F.interpolate(impulses, size=n_out, mode="linear", align_corners=False)  # (n_in, 1, n_out)
        if sigma > 0:  # gaussian_blur's pass along one axis
            kernel = gaussian_kernel(sigma, resized.dtype, resized.device)
            radius = kernel.numel() // 2
            resized = F.conv1d(F.pad(resized, (radius, radius), mode="reflect"), kernel.view(1, 1, -1))
        blurred = resized[:, 0]
        _SMOOTHING_MATRICES[key] = blurred.T.float().contiguous().to(device)
    return _SMOOTHING_MATRICES[key]


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Blur (B, H, W) maps with a Gaussian of `sigma` pixels (separable, reflect padding)."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel(sigma, maps.dtype, maps.device)
    radius = kernel.numel() // 2
    out = maps[:, None]
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return out[:, 0]


def gaussian_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The normalised 1-D Gaussian of `gaussian_blur`: 2 ceil(3 sigma) + 1 taps (at least 3)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def to_host(tensors: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """Copy named tensors to the host in ONE transfer: packed into one float32 vector on their
    device, `.cpu()` once, split into arrays of the original shapes (bool tensors come back as
    bool arrays; float32 holds every other value here exactly)."""
    packed = torch.cat([t.reshape(-1).float() for t in tensors.values()])
    flat = packed.cpu().numpy()
    out, start = {}, 0
    for name, t in tensors.items():
        part = flat[start : start + t.numel()].reshape(t.shape)
        out[name] = part > 0.5 if t.dtype == torch.bool else part
        start += t.numel()
    return out


def distinct_parts(missing: np.ndarray, overlap: np.ndarray) -> list[int]:
    """Missing candidates to report, in candidate order: each one unless its mask overlaps
    (soft IoU > 0.3) one already reported (the same part seen in several references).
    missing (U,) bool, overlap (U, U) -> candidate indices."""
    kept: list[int] = []
    for t in np.flatnonzero(missing):
        if not any(overlap[t, s] > 0.3 for s in kept):
            kept.append(int(t))
    return kept


def object_record(box: np.ndarray, area: float, sx: float, sy: float, status: str, score: float) -> dict:
    """Object dict in input pixels from a box (x, y, w, h) and area in working pixels."""
    x, y, w, h = box.tolist()
    return {
        "bbox": [round(x * sx, 1), round(y * sy, 1), round(w * sx, 1), round(h * sy, 1)],
        "area": round(area * sx * sy, 1),
        "status": status,
        "score": round(float(score), 4),
    }
