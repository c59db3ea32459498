"""segment-anything's image-encoder attention through torch's scaled_dot_product_attention.

SAM's `Attention` materialises the (B * heads, L, L) score matrix, adds the decomposed relative
positions to it (`add_decomposed_rel_pos`) and takes a softmax: at 1024 x 1024 a global block
holds 12 x 4096 x 4096 floats per image. `get_rel_pos` also indexes the (device) table with a
CPU `arange`, a host-to-device copy per call.

`SdpaAttention` computes the same function with one fused attention call. The relative-position
term rel_h[i, y_j] + rel_w[i, x_j] (query i, key j at (y_j, x_j)) is a dot product of
[rel_h[i], rel_w[i]] with the one-hot vector [e_{y_j}, e_{x_j}], so it rides along in the
queries and keys: q' = [q * scale, rel_h, rel_w], k' = [k, e_y, e_x], scale 1; v is padded with
zeros to the same width (fused kernels want one head size) and the padding sliced off the output.
The tables and one-hot vectors are built on the parameters' device. Parameters keep their names
(qkv, proj, rel_pos_h, rel_pos_w), so SAM checkpoints load as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rel_pos_table(size: int, rel_pos: Tensor) -> Tensor:
    """segment_anything's get_rel_pos(size, size, rel_pos) with its indices made on rel_pos's device:
    (2 size - 1, C) (resized linearly if it has another length) -> (size, size, C)."""
    length = 2 * size - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=length,
                                mode="linear").reshape(-1, length).permute(1, 0)
    coords = torch.arange(size, device=rel_pos.device)
    return rel_pos[coords[:, None] - coords[None, :] + (size - 1)]


class SdpaAttention(nn.Module):
    """Drop-in for segment_anything.modeling.image_encoder.Attention (shares its parameters)."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.num_heads = attention.num_heads
        self.scale = attention.scale
        self.qkv = attention.qkv
        self.proj = attention.proj
        self.use_rel_pos = attention.use_rel_pos
        if self.use_rel_pos:
            self.rel_pos_h = attention.rel_pos_h
            self.rel_pos_w = attention.rel_pos_w

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, L, C)
        c = q.shape[-1]
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            rows = q.reshape(B, self.num_heads, H, W, c)
            rel_h = torch.einsum("bnhwc,hkc->bnhwk", rows, rel_pos_table(H, self.rel_pos_h).to(q.dtype))
            rel_w = torch.einsum("bnhwc,wkc->bnhwk", rows, rel_pos_table(W, self.rel_pos_w).to(q.dtype))
            one_hot_y = torch.eye(H, dtype=q.dtype, device=q.device).repeat_interleave(W, dim=0)  # key (y, x) -> e_y
            one_hot_x = torch.eye(W, dtype=q.dtype, device=q.device).repeat(H, 1)  # -> e_x
            lead = (B, self.num_heads, H * W)
            q = torch.cat([q * self.scale, rel_h.reshape(*lead, H), rel_w.reshape(*lead, W)], dim=-1)
            k = torch.cat([k, one_hot_y.expand(*lead, H), one_hot_x.expand(*lead, W)], dim=-1)
            out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, H + W)), scale=1.0)[..., :c]
        x = out.reshape(B, self.num_heads, H, W, c).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
        return self.proj(x)


def use_sdpa_attention(image_encoder: nn.Module) -> nn.Module:
    """Replace the attention of every block of a segment_anything ImageEncoderViT by SdpaAttention,
    in place (idempotent); returns the encoder."""
    for block in image_encoder.blocks:
        if not isinstance(block.attn, SdpaAttention):
            block.attn = SdpaAttention(block.attn)
    return image_encoder
