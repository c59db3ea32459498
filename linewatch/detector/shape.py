"""Shape descriptors of objects for the weights-free backend (beyond the paper).

The classic backend's object descriptors pool colour and gradient channels over the whole
object (global max pooling, as SAM-LAD does with DINOv2 features). Two parts of the same colour
and size then look alike whatever their shape, and a mirrored part looks like itself. DINOv2
features carry shape; classical pooled channels do not. So the classic backend adds, per
object, a HOG-style descriptor of the part's outline:

    the part's mask (its silhouette; the segmenter's mask, so no sensor noise inside it)
        --crop--> square around the mask's bounding box, side = MARGIN * the longer box side
        --resize (roi_align, averaging)--> CROP x CROP pixels         (scale-normalised)
        --gradients--> magnitude and soft orientation (`oriented_gradients`, the classic
                       backbone's own: 5 channels)
        --average over CELL x CELL cells--> 4 x 4 cells x 5 channels
        --L2--> descriptor (D = 80)

Cropping at the object's own box makes the descriptor invariant to where the part lies (a
small shift moves the box with it) and to its size; the cells keep where each edge orientation
is, so another outline, a mirror image or a quarter turn of an asymmetric part changes it.
Colour and texture are left to the pooled features and the AMM maps.

Why not scikit-image's or OpenCV's HOG: scikit-image bins orientations hard (20-degree bins
with a boundary at 0 degrees), so an axis-aligned part turned by a few degrees, the placement
jitter of a good part, jumps between bins; OpenCV 5's Python package no longer has
HOGDescriptor. The doubled-angle channels change smoothly with the angle:
tests/detector/test_shape.py holds a 4-degree turn, a shift, a 10 % size change and a noisy
segmentation under 0.25 (unit vectors) and another glyph, a mirror image and a quarter turn
above 0.5 and 2.5 times that. The grey image inside the mask is left out: sensor noise moves
a histogram of it in flat cells.

How far a good part's descriptor moves (small rotations, the segmenter's boundary jitter) is
learned from the good images: the Inspector's outline branch scores a part by its distance
to the nearest good part of the bank, in units of that distance's spread on good images
(`linewatch.detector.fusion`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from linewatch.detector.backbone import ClassicFeatures, oriented_gradients

CROP = 32  # side of the scale-normalised silhouette, pixels
CELL = 8  # cell side, pixels
MARGIN = 1.15  # crop side / longer side of the mask's bounding box
SHAPE_DIM = (CROP // CELL) ** 2 * 5


def part_crops(masks: list[Tensor], boxes: Tensor) -> Tensor:
    """Scale-normalised silhouettes of every object: (sum M_b, CROP, CROP) float in [0, 1].

    masks: per image (M_b, S, S) bool; boxes (B, M, 4) x, y, w, h in working pixels
    (`mask_boxes`), M >= every M_b. Each mask is cropped to a square of side MARGIN * max(w, h)
    around its box centre and averaged down (roi_align, 2x2 samples per output pixel) to
    CROP x CROP."""
    parts, rois = [], []
    for b, mask in enumerate(masks):
        n = int(mask.shape[0])
        if n == 0:
            continue
        parts.append(mask.float())
        box = boxes[b, :n].float()
        centre = box[:, :2] + box[:, 2:] / 2
        half = MARGIN * box[:, 2:].amax(1, keepdim=True).clamp_min(2.0) / 2
        rois.append(torch.cat([centre - half, centre + half], dim=1))
    if not parts:
        return boxes.new_zeros(0, CROP, CROP)
    stacked = torch.cat(parts)[:, None]  # (sum M_b, 1, S, S)
    corners = torch.cat(rois)
    index = torch.arange(stacked.shape[0], device=stacked.device, dtype=corners.dtype)[:, None]
    out = roi_align(stacked, torch.cat([index, corners], dim=1), output_size=CROP, spatial_scale=1.0,
                    sampling_ratio=2, aligned=True)
    return out[:, 0]


def outline_descriptors(crops: Tensor) -> Tensor:
    """(K, CROP, CROP) silhouettes -> (K, SHAPE_DIM) L2-normalised cell histograms of gradient
    magnitude and soft orientation (zeros for an empty crop)."""
    if crops.shape[0] == 0:
        return crops.new_zeros(0, SHAPE_DIM)
    _, gx, gy, _ = ClassicFeatures.blur_and_gradients(crops[:, None].float())
    cells = F.avg_pool2d(oriented_gradients(gx, gy), CELL)  # (K, 5, 4, 4)
    return F.normalize(cells.flatten(1), dim=1, eps=1e-12)


def shape_descriptors(masks: list[Tensor], boxes: Tensor) -> Tensor:
    """Shape descriptor of every object, padded like `pad_masks`: (B, M, SHAPE_DIM), zeros for
    padding rows (M = boxes.shape[1])."""
    b, m = boxes.shape[:2]
    out = torch.zeros(b, m, SHAPE_DIM, device=boxes.device)
    flat = outline_descriptors(part_crops(masks, boxes))
    start = 0
    for i, mask in enumerate(masks):
        n = int(mask.shape[0])
        out[i, :n] = flat[start:start + n]
        start += n
    return out


def shape_distances(query: Tensor, references: Tensor) -> Tensor:
    """Euclidean distance between unit shape descriptors: query (..., D), references (..., D)
    broadcastable -> (...). 0 for the same shape; entries are >= 0, so at most sqrt(2)."""
    return (query - references).norm(dim=-1)
