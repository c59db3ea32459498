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

`PatchIndex` holds the bank's side, built once when the bank is loaded: the patches, and the
same patches on the first `dims` principal axes of their variation at each place, plus the
length of what lies off those axes. The search runs on these dims + 1 coordinates (its cost is
about proportional to their number), and the distance reported for each query patch is the
exact one, in every channel, to the patch that search found: never below the exact nearest
distance, and equal to it whenever the search finds the same patch (always when `dims` covers
the channels, or when the good patches vary only along the axes).

The map is upsampled and smoothed like the object map by the Inspector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def local_patch_features(features: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, C, h, w): the mean over each cell's 3x3 neighbourhood (borders: over
    the cells that exist), PatchCore's local aggregation. Written as sums of shifted slices
    (rows, then columns) divided by the number of cells that exist: what
    avg_pool2d(3, stride 1, padding 1, count_include_pad=False) gives, to float32 rounding, in
    about a sixth of its time on a CPU."""
    def box_sums(x: Tensor) -> Tensor:
        padded = F.pad(x, (1, 1, 1, 1))
        rows = padded[..., :, :-2] + padded[..., :, 1:-1] + padded[..., :, 2:]
        return rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]

    features = features.float()
    counts = box_sums(torch.ones((1, 1, *features.shape[-2:]), device=features.device))
    return box_sums(features).div_(counts)


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


def nearest_patch_indices(query: Tensor, padded_memory: Tensor, window: int,
                          references: Tensor) -> tuple[Tensor, Tensor]:
    """Which patch of the memory is nearest to each query patch within `window` cells of its
    place: (which of the R references (B, h, w) long, offset (B, h, w) long, row-major in the
    (2 window + 1)^2 square: (dy + window) * (2 window + 1) + dx + window).

    query (B, C, h, w); padded_memory (Z, C, h + 2 window, w + 2 window): the memory patches with
    `window` cells of +inf around them (outside the image: never nearest), padded once by the
    caller; references (B, R) each query's memory images. The same chunked element-wise search
    as `nearest_patch_distances`, except for how the nearest is picked: the candidate's number
    (offset * R + reference) replaces the lowest bits of its squared distance's float32 bit
    pattern (ordered as the value, for the non-negative floats these are), and the minimum of
    those integers names it: a plain minimum, 20x faster on a CPU than one with indices. The
    candidate found is thus the nearest up to a relative 2^(bits - 23) of the squared distance
    (bits = the candidate number's width, 10 for R 64 and window 1), ties going to the lowest
    number; the caller measures the distance to it exactly."""
    b, c, h, w = query.shape
    side = 2 * window + 1
    n_references = references.shape[1]
    low_bits = (side * side * n_references - 1).bit_length()
    low_mask = (1 << low_bits) - 1
    best = torch.full((b, h, w), torch.iinfo(torch.int32).max, dtype=torch.int32, device=query.device)
    q = query[:, None].float()
    per_image = b * c * (h + 2 * window) * (w + 2 * window) * 4
    chunk = max(1, CHUNK_BYTES // per_image)
    for start in range(0, n_references, chunk):
        part = padded_memory[references[:, start:start + chunk]]  # (B, n, C, h + 2 window, w + 2 window)
        n = part.shape[1]
        squared = torch.empty((b, side * side, n, h, w), device=query.device)
        for dy in range(side):
            for dx in range(side):
                shifted = part[..., dy:dy + h, dx:dx + w]  # memory cell (y + dy - window, x + dx - window)
                torch.sum((shifted - q).square_(), 2, out=squared[:, dy * side + dx])
        numbers = (torch.arange(side * side, device=query.device)[:, None] * n_references + start
                   + torch.arange(n, device=query.device)[None]).int()  # (offsets, n)
        packed = squared.view(torch.int32).bitwise_and_(~low_mask).bitwise_or_(numbers[:, :, None, None])
        best = torch.minimum(best, packed.view(b, -1, h, w).amin(1))
    found = (best & low_mask).long()
    return found % n_references, found // n_references


class PatchIndex:
    """The bank's patch features for the patch branch, prepared once when the bank is loaded.

    patches (Z, C, h, w): `local_patch_features` of every good image. The search compares a
    query patch only with good patches at (about) its own place, so what tells them apart is
    how the good patches vary AT a place, not from one place to another (which the coordinate
    channels and the product's layout make large): the axes are the principal axes of every
    good patch minus the mean good patch at its place (the within-place covariance, over all
    Z * h * w patches), the first `dims` of them (all C when dims >= C or 0: then the exact
    search, `nearest_patch_distances`). The search on them and on the length of what lies off
    them costs about (dims + 1) / C of one in every channel; each query patch then gets its exact
    distance, in every channel, to the patch found. A defect's patch, which may lie off the
    axes, is thus still measured in full once its nearest good patch is found."""

    def __init__(self, patches: Tensor, dims: int = 0):
        c = patches.shape[1]
        self.patches = patches.float()
        self.dims = c if dims <= 0 or dims >= c else dims
        self.channels_last = self.axes = self.projected = None  # every channel: the exact search needs none
        if self.dims < c:
            self.channels_last = self.patches.permute(0, 2, 3, 1).contiguous()  # (Z, h, w, C): one patch per row
            variation = (self.patches - self.patches.mean(0, keepdim=True)).permute(0, 2, 3, 1).reshape(-1, c).double()
            _, axes = torch.linalg.eigh(variation.T @ variation)  # ascending eigenvalues
            self.axes = axes[:, -self.dims:].flip(1).float().contiguous()  # (C, dims), largest spread first
            self.projected = self.project(self.patches)  # (Z, dims + 1, h, w)
        self.padded: dict[int, Tensor] = {}  # window -> projected patches padded with +inf (nearest_patch_indices)

    def project(self, patches: Tensor) -> Tensor:
        """(n, C, h, w) -> (n, dims + 1, h, w): the patches' coordinates on the axes, and the
        length of what lies off them (the residual) as one more coordinate. The squared distance
        of two projected patches is that along the axes plus the squared difference of the
        residuals' lengths: never above the exact squared distance (|a - b| >= ||a| - |b||), and
        it tells apart good patches that differ mostly off the axes."""
        patches = patches.float()
        along = torch.einsum("nchw,cd->ndhw", patches, self.axes)
        off = patches - torch.einsum("ndhw,cd->nchw", along, self.axes)
        return torch.cat([along, off.square().sum(1, keepdim=True).sqrt()], 1).contiguous()

    def distances(self, query: Tensor, window: int, references: Tensor) -> Tensor:
        """query (B, C, h, w) patch features, references (B, R) bank indices -> (B, h, w): the
        exact distance of each query patch to the good patch nearest along the axes, among the
        references' patches within `window` cells of its place. With every channel (dims = C)
        the exact nearest distance, `nearest_patch_distances`."""
        query = query.float()
        if self.dims == query.shape[1]:
            return nearest_patch_distances(query, self.patches, window, references)
        if window not in self.padded:
            self.padded[window] = F.pad(self.projected, (window,) * 4, value=float("inf"))
        slot, offset = nearest_patch_indices(self.project(query), self.padded[window], window, references)
        b, c, h, w = query.shape
        side = 2 * window + 1
        image = references.gather(1, slot.flatten(1)).view(b, h, w)
        y = torch.arange(h, device=query.device)[None, :, None] + offset // side - window
        x = torch.arange(w, device=query.device)[None, None, :] + offset % side - window
        found = self.channels_last[image, y, x]  # (B, h, w, C)
        return (query.permute(0, 2, 3, 1) - found).square_().sum(-1).sqrt_()
