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


def nearest_patch_distances(query: Tensor, memory: Tensor, window: int = 1) -> Tensor:
    """Distance (B, h, w) from each query patch to its nearest memory patch within `window`
    cells (Chebyshev) of the same place.

    query (B, C, h, w) and memory (B, R, C, h, w), the patch features (`local_patch_features`)
    of the R good images each query is compared with (its nearest ones, SPADE's choice: the
    image-level retrieval picks them). Element-wise over (B, R, C, h, w) once per offset: with
    R of about 8 this is several times faster on a CPU than a matrix product over all bank
    images, whose (C x Z) blocks per cell are too small for a fast GEMM.
    """
    b, c, h, w = query.shape
    padded = F.pad(memory.float(), (window, window, window, window), value=float("inf"))  # outside: never nearest
    best = torch.full((b, h, w), float("inf"), device=query.device)
    for dy in range(2 * window + 1):
        for dx in range(2 * window + 1):
            shifted = padded[..., dy:dy + h, dx:dx + w]  # memory cell (y + dy - window, x + dx - window)
            squared = (shifted - query[:, None].float()).square_().sum(2)  # (B, R, h, w)
            best = torch.minimum(best, squared.amin(1))
    return best.sqrt()
