"""Object descriptors: object feature maps, their global max pooling, and DCGA (paper 3.4.3, 3.5.1).

Pipeline for one image (batched over B everywhere):

    masks (B, M, Hm, Wm) --bilinear--> (B, M, H, W)
    features (B, C, H, W) x masks --GMP--> pooled object vectors (B, M, C)
    DCGA(pooled, valid) --> L2-normalised object descriptors (B, M, C)

M is padded to the largest object count in the batch; `valid (B, M) bool` marks real objects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linewatch.detector.align import mask_boxes

POOL_ELEMENTS = 2**27  # values of the masked products made at once by masked_global_max_pool (512 MiB of float32)


def resize_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly resize object masks to a feature map size (paper 3.4.3).

    Args:
        masks: (B, M, Hm, Wm), bool or float in [0, 1].
        size: target (H, W).
    Returns:
        (B, M, H, W) float masks (dtype float32 unless `masks` already was floating).
    """
    m = masks if masks.is_floating_point() else masks.float()
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    b, n = m.shape[:2]
    if n == 0:
        return m.new_zeros(b, 0, *size)
    # align_corners=False: pixel-centre convention, same as the feature upsampler.
    out = F.interpolate(m.reshape(b * n, 1, *m.shape[-2:]), size=size, mode="bilinear", align_corners=False)
    return out.reshape(b, n, *size)


def pad_masks(masks: list[Tensor], size: tuple[int, int], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image bool masks (M_b, S, S) -> soft masks (B, M, H', W'), valid (B, M), boxes (B, M, 4).

    One copy and one resize per image (not per mask); the boxes come from one `mask_boxes` call
    over the padded (B, M, S, S) bool masks (padding masks are empty: zero boxes)."""
    b = len(masks)
    m = max([int(x.shape[0]) for x in masks] + [1])
    soft = torch.zeros(b, m, *size, device=device)
    valid = torch.zeros(b, m, dtype=torch.bool, device=device)
    if b == 0:
        return soft, valid, torch.zeros(b, m, 4, device=device)
    padded = torch.zeros(b, m, *masks[0].shape[-2:], dtype=torch.bool, device=device)
    for i, mask in enumerate(masks):
        n = int(mask.shape[0])
        if n == 0:
            continue
        padded[i, :n] = mask
        soft[i, :n] = resize_masks(padded[i : i + 1, :n].float(), size)[0]
        valid[i, :n] = True
    return soft, valid, mask_boxes(padded)


def padded_soft_masks(masks: Tensor, valid: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Padded bool masks (B, M, S, S) with validity (B, M), padding masks empty -> soft masks
    (B, M, H', W'), valid (B, M), boxes (B, M, 4): `pad_masks` of the same objects, in one resize and
    nothing read back from the device."""
    return resize_masks(masks, size), valid, mask_boxes(masks)


def part_textures(channels: Tensor, soft_masks: Tensor) -> Tensor:
    """Mean grain statistics over the interior of each part's mask: channels (B, T, h, w)
    (`ClassicFeatures.texture_channels` of the backbone map), soft_masks (B, M, H', W') -> (B, M, T)."""
    masks = F.interpolate(soft_masks, size=channels.shape[-2:], mode="area") if soft_masks.shape[1] else \
        soft_masks.new_zeros(*soft_masks.shape[:2], *channels.shape[-2:])
    if masks.shape[1]:
        # the part's interior (mask eroded by one cell): the grains, not the part's outline
        # against the tray, whose strong coherent edges would drown them
        inner = -F.max_pool2d(-masks, 3, stride=1, padding=1)
        masks = torch.where(inner.sum((-2, -1), keepdim=True) > 0, inner, masks)  # a thin part keeps its mask
    return torch.einsum("bthw,bmhw->bmt", channels, masks) / masks.sum((-2, -1)).clamp_min(1e-6)[..., None]


def object_feature_maps(features: Tensor, masks: Tensor) -> Tensor:
    """Per-object feature maps: bilinearly resized mask times the feature map (paper 3.4.3).

    Materialises (B, M, C, H, W); for descriptors prefer `masked_global_max_pool`.

    Args:
        features: (B, C, H, W) upsampled feature map.
        masks: (B, M, Hm, Wm) bool or float object masks (any resolution).
    Returns:
        (B, M, C, H, W) in the dtype of `features`.
    """
    m = resize_masks(masks, tuple(features.shape[-2:])).to(features.dtype)
    return m[:, :, None] * features[:, None]


def masked_global_max_pool(features: Tensor, masks: Tensor) -> Tensor:
    """Global max pooling of each object feature map, without materialising (B, M, C, H, W).

    Semantics follow the paper literally: the object feature map is mask * features (zero
    outside the object), then max-pooled over all H*W positions. So the result is
    max(max over the mask's support of m*f, 0) whenever the mask leaves any position
    uncovered, i.e. pooled values are >= 0 for any object smaller than the image, and an
    empty mask gives an all-zero vector. A soft (bilinear) mask scales features at the
    object border, exactly as the product does. The products of as many objects as fit in
    POOL_ELEMENTS values are made and pooled at once (two ops per group of objects; at most a
    (B, G, C, H, W) product in memory, G >= 1, never all M of them when they do not fit).

    Args:
        features: (B, C, H, W).
        masks: (B, M, Hm, Wm) bool or float; resized bilinearly to (H, W) if needed.
    Returns:
        (B, M, C) pooled object vectors, dtype of `features`.
    """
    b, c = features.shape[:2]
    m = resize_masks(masks, tuple(features.shape[-2:])).to(features.dtype)
    n = m.shape[1]
    if n == 0:
        return features.new_zeros(b, 0, c)
    flat_features = features.flatten(2)[:, None]  # (B, 1, C, HW)
    flat_masks = m.flatten(2)[:, :, None]  # (B, M, 1, HW)
    group = max(1, POOL_ELEMENTS // flat_features.numel())
    pooled = [(flat_features * flat_masks[:, i:i + group]).amax(dim=3) for i in range(0, n, group)]
    return pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1)


class DCGA(nn.Module):
    """Dynamic Channel Graph Attention (paper 3.5.1, eqs. 4-8), zero-shot initialised.

    The paper's W (eq. 4) is "pre-trained" but no weights were published, so W is a 1-D
    convolution across channels (ECA style, kernel `kernel_size`, odd) with uniform weights
    1/k: a local channel-smoothing whose softmax gives a mild, deterministic channel
    attention. Edges are replicate-padded so border channels are not biased downwards.
    W is a registered parameter, so trained weights could be loaded later.

    Our reading of eqs. 4-8, per object vector f (one row of f_in, shape C):
        a   = softmax_c(W * f)                 eq. 4, the diagonal of A1
        A   = A0 A1 = diag(a), A0 = I          eq. 5
        G   = f A = a ⊙ f                      graph step over the channel graph
        X   = f ⊙ sigmoid(C · G)               eq. 8's Sigmoid(f_in · G(f_in, A)) read as an
                                               ECA gate on f; the factor C makes a uniform
                                               attention (a = 1/C) a gate sigmoid(f) for any C
        A2  = row-normalised cosine similarity of the X's, zero diagonal      eqs. 6-7
        Y   = X + context_weight · A2 X        (see below), then L2-normalised (eq. 10 needs it)

    Why the residual: eq. 8 literally gives Y = A2 · (...), which drops each object's own
    vector (the diagonal of A2 is zero); with two objects each descriptor would become the
    *other* object's features and matching would swap them. Adding X back keeps identity and
    uses A2 as context, as graph attention layers normally do.

    A2 details (eq. 7): negative similarities are clamped to 0 before normalising (a
    row-normalisation of signed weights can blow up when the row sum is near 0), padded
    objects get zero rows and columns, and a row whose sum is ~0 (an object with no
    positively similar neighbour, or a lone object) stays all-zero: no context.
    """

    def __init__(self, kernel_size: int, context_weight: float, eps: float = 1e-8) -> None:
        """kernel_size, context_weight: detector.matching.dcga_kernel_size / context_weight."""
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        self.kernel_size = kernel_size
        self.context_weight = float(context_weight)
        self.eps = float(eps)
        # W of eq. 4: (out=1, in=1, k), uniform averaging weights 1/k.
        self.weight = nn.Parameter(torch.full((1, 1, kernel_size), 1.0 / kernel_size))

    def channel_attention(self, pooled: Tensor) -> Tensor:
        """Diagonal of A = A0 A1 (eqs. 4-5). pooled (B, M, C) -> a (B, M, C), sums to 1 over C."""
        b, m, c = pooled.shape
        x = pooled.reshape(b * m, 1, c)
        pad = self.kernel_size // 2
        if pad:
            x = F.pad(x, (pad, pad), mode="replicate")
        w = self.weight.to(device=pooled.device, dtype=pooled.dtype)
        return torch.softmax(F.conv1d(x, w).reshape(b, m, c), dim=-1)

    def channel_attended(self, pooled: Tensor) -> Tensor:
        """X = f ⊙ sigmoid(C · a ⊙ f) (eqs. 4-5, 8). pooled (B, M, C) -> (B, M, C)."""
        a = self.channel_attention(pooled)
        return pooled * torch.sigmoid(pooled.shape[-1] * a * pooled)

    def adjacency(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        """Object adjacency A2 (eqs. 6-7).

        Args:
            x: (B, M, C) object vectors (the channel-attended X in forward).
            valid: (B, M) bool, False for padding objects; None means all valid.
        Returns:
            (B, M, M): zero diagonal, zero rows/columns for padding, similarities clamped at
            0, each row summing to 1 or (no positive neighbour) to 0.
        """
        b, m, _ = x.shape
        if valid is None:
            valid = torch.ones(b, m, dtype=torch.bool, device=x.device)
        v = F.normalize(x, dim=-1, eps=self.eps)
        s = torch.einsum("bic,bjc->bij", v, v).clamp_min(0.0)  # S'_ij, eq. 7
        keep = valid[:, :, None] & valid[:, None, :]
        keep = keep & ~torch.eye(m, dtype=torch.bool, device=x.device)  # zero diagonal, eq. 6
        s = torch.where(keep, s, torch.zeros((), dtype=s.dtype, device=s.device))
        row = s.sum(dim=-1, keepdim=True)
        safe = torch.where(row > self.eps, row, torch.ones_like(row))
        return torch.where(row > self.eps, s / safe, torch.zeros_like(s))  # S_ij, eq. 7

    def forward(
        self, pooled: Tensor, valid: Tensor | None = None, return_adjacency: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Object descriptors from pooled object vectors.

        Args:
            pooled: (B, M, C) GMP object vectors (see `masked_global_max_pool`).
            valid: (B, M) bool padding mask; None means all valid.
            return_adjacency: also return A2 (B, M, M).
        Returns:
            descriptors (B, M, C), unit L2 norm for valid rows (zero if the vector was zero),
            exactly zero for padding rows; and A2 if requested.
        """
        b, m, _ = pooled.shape
        if valid is None:
            valid = torch.ones(b, m, dtype=torch.bool, device=pooled.device)
        # Zero padding rows first so garbage there cannot reach the valid rows.
        pooled = torch.where(valid[..., None], pooled, torch.zeros((), dtype=pooled.dtype, device=pooled.device))
        x = self.channel_attended(pooled)
        a2 = self.adjacency(x, valid)
        y = x + self.context_weight * torch.bmm(a2, x)  # residual form of eq. 8
        y = F.normalize(y, dim=-1, eps=self.eps)
        y = torch.where(valid[..., None], y, torch.zeros((), dtype=y.dtype, device=y.device))
        return (y, a2) if return_adjacency else y
