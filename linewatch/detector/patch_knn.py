"""The patch branch of the image score: each patch of a frame against the same place in every
good image of the bank (beyond the paper; CSAD fuses such a patch branch with its component
branch).

Objects say WHAT is on the tray and WHERE; a patch-level nearest-neighbour distance says how
every small area LOOKS, object or not, and so catches what the object masks miss (a defect that
the segmentation merged into the background, a texture change inside a granular part). It runs
on the backbone's own features, already in the bank as its retrieval vectors:

    features (B, C, h, w) --3x3 mean (PatchCore's local aggregation)--> patches
    distance of each query patch to the nearest patch of the R good images nearest to the frame
    (the retrieval's, as SPADE does) at the same cell or a cell at most `window` cells away
    (products sit in fixed places; this keeps the search to R * (2 window + 1)^2 candidates per
    patch instead of every patch of every image)

The map is upsampled and smoothed like the object map by the Inspector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def local_patch_features(features: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, C, h, w): the mean over each cell's 3x3 neighbourhood (borders: over
    the cells that exist), PatchCore's local aggregation."""
    return F.avg_pool2d(features.float(), kernel_size=3, stride=1, padding=1, count_include_pad=False)


CHUNK_BYTES = 2 << 20  # memory images compared at a time: their padded features fit in a core's cache


def nearest_patch_distances(query: Tensor, memory: Tensor, window: int = 1, references: Tensor | None = None) -> Tensor:
    """Distance (B, h, w) from each query patch to its nearest memory patch within `window`
    cells (Chebyshev) of the same place.

    query (B, C, h, w) and memory (B, R, C, h, w), the patch features (`local_patch_features`)
    of the R good images each query is compared with (its nearest ones, SPADE's choice: the
    image-level retrieval picks them); or memory (Z, C, h, w), every good image's, with
    `references` (B, R) the indices of each query's R (gathered a chunk at a time, never all
    at once: at B 8, R 32, C 384 that copy alone is 100 MB). Element-wise, a few memory images at a time (about
    CHUNK_BYTES of them, padded), every offset on a chunk before the next chunk: the chunk
    stays in the cache for its (2 window + 1)^2 offsets instead of all R images streaming from
    memory once per offset (7x faster on a 2-core CPU at R 32, C 384, 16 x 16 cells, with
    bitwise the same result: the minimum does not depend on the order). With R of about 8 an
    element-wise search is also several times faster on a CPU than a matrix product over all
    bank images, whose (C x Z) blocks per cell are too small for a fast GEMM.
    """
    b, c, h, w = query.shape
    q = query[:, None].float()
    best = torch.full((b, h, w), float("inf"), device=query.device)
    per_image = b * c * (h + 2 * window) * (w + 2 * window) * 4
    chunk = max(1, CHUNK_BYTES // per_image)
    n_references = memory.shape[1] if references is None else references.shape[1]
    for start in range(0, n_references, chunk):
        part = memory[:, start:start + chunk] if references is None else memory[references[:, start:start + chunk]]
        # outside the image: never nearest
        padded = F.pad(part.float(), (window, window, window, window), value=float("inf"))
        for dy in range(2 * window + 1):
            for dx in range(2 * window + 1):
                shifted = padded[..., dy:dy + h, dx:dx + w]  # memory cell (y + dy - window, x + dx - window)
                squared = (shifted - q).square_().sum(2)  # (B, chunk, h, w)
                best = torch.minimum(best, squared.amin(1))
    return best.sqrt()
