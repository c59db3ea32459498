"""A PatchCore-style baseline (Roth et al., CVPR 2022) on linewatch's own backbone.

Same backbone features as the object pipeline (classic or DINOv2), but no objects: every
patch feature of the good images goes into a memory bank (locally averaged over 3x3
neighbours, as PatchCore does), the bank is thinned by a greedy k-center coreset, and a query
patch's anomaly is its distance to the nearest bank patch. The map is upsampled to the working
size, blurred like the object pipeline's map, and resized to the input size; the image score is
its maximum. Running both in one evaluation measures what object matching adds on the same data.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linewatch.detector.inspector import to_images01
from linewatch.detector.patch_knn import local_patch_features
from linewatch.detector.report import gaussian_blur

__all__ = ["PatchCore", "greedy_coreset"]


def greedy_coreset(features: Tensor, size: int, projection_dim: int = 128, seed: int = 0) -> Tensor:
    """Indices (size,) of a greedy k-center coreset of `features` (N, C).

    Each step adds the point farthest from the points chosen so far (PatchCore sec. 3.2);
    distances are measured after a random linear projection to `projection_dim` dimensions
    (Johnson-Lindenstrauss) to keep the N x size distance updates cheap."""
    n = features.shape[0]
    if size >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    x = features.float()
    if x.shape[1] > projection_dim:
        proj = torch.randn(x.shape[1], projection_dim, generator=generator).to(x.device) / math.sqrt(projection_dim)
        x = x @ proj
    chosen = torch.empty(size, dtype=torch.long)
    first = int(torch.randint(n, (1,), generator=generator))
    chosen[0] = first
    nearest = torch.linalg.vector_norm(x - x[first], dim=1)
    for i in range(1, size):
        nxt = int(torch.argmax(nearest))
        chosen[i] = nxt
        nearest = torch.minimum(nearest, torch.linalg.vector_norm(x - x[nxt], dim=1))
    return chosen


class PatchCore:
    """kNN (k = 1) over patch features of good images.

    Args:
        backbone: the detector's feature extractor, images01 (B, 3, S, S) -> (B, C, h, w).
        image_size: working side S (the detector config's image_size).
        device: where features are computed and compared.
        coreset_ratio: fraction of the good patches kept in the memory bank.
        max_bank: upper bound on the memory bank size (patches).
        smoothing_sigma: Gaussian blur of the map at working size, pixels.
    """

    def __init__(self, backbone: nn.Module, image_size: int, device: torch.device, coreset_ratio: float = 0.1,
                 max_bank: int = 8000, smoothing_sigma: float = 4.0, seed: int = 0) -> None:
        self.backbone = backbone
        self.image_size = image_size
        self.device = device
        self.coreset_ratio = coreset_ratio
        self.max_bank = max_bank
        self.smoothing_sigma = smoothing_sigma
        self.seed = seed
        self.memory: Tensor | None = None

    @torch.inference_mode()
    def _patches(self, images: list[np.ndarray]) -> Tensor:
        """(B, C, h, w) locally aggregated patch features."""
        return local_patch_features(self.backbone(to_images01(images, self.image_size, self.device)))

    def fit(self, images: list[np.ndarray], batch_size: int = 8) -> "PatchCore":
        """Build the memory bank from good RGB uint8 (H, W, 3) images."""
        parts = []
        for start in range(0, len(images), batch_size):
            f = self._patches(images[start:start + batch_size])
            parts.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]))
        patches = torch.cat(parts)
        size = max(1, min(self.max_bank, int(round(self.coreset_ratio * patches.shape[0]))))
        self.memory = patches[greedy_coreset(patches, size, seed=self.seed).to(patches.device)]
        return self

    @property
    def bank_size(self) -> int:
        return 0 if self.memory is None else int(self.memory.shape[0])

    @torch.inference_mode()
    def score(self, images: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Image scores (B,) and anomaly maps, float32 (H, W) at each input's size."""
        if self.memory is None:
            raise RuntimeError("PatchCore.score needs fit() first")
        f = self._patches(images)
        b, c, h, w = f.shape
        queries = f.permute(0, 2, 3, 1).reshape(-1, c)
        nearest = torch.cat([torch.cdist(chunk, self.memory).amin(1) for chunk in queries.split(4096)])
        maps = nearest.view(b, 1, h, w)
        maps = F.interpolate(maps, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)[:, 0]
        maps = gaussian_blur(maps, self.smoothing_sigma).cpu().numpy()
        out = []
        for image, amap in zip(images, maps):
            ih, iw = image.shape[:2]
            if (ih, iw) != amap.shape:
                amap = cv2.resize(amap, (iw, ih), interpolation=cv2.INTER_LINEAR)
            out.append(amap.astype(np.float32))
        scores = maps.reshape(b, -1).max(1).astype(np.float64)  # at working size, as the Inspector does
        return scores, out
