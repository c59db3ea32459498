"""SdpaAttention computes segment-anything's image-encoder attention (fp32, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention, get_rel_pos

from linewatch.detector.sam_attention import SdpaAttention, rel_pos_table, use_sdpa_attention
from linewatch.detector.segment import build_tiny_sam


@pytest.mark.parametrize("size, table", [(7, 13), (5, 13)])  # the table's own length, and one resized
def test_rel_pos_table_equals_get_rel_pos(size, table) -> None:
    rel_pos = torch.randn(table, 6, generator=torch.Generator().manual_seed(size))
    assert torch.equal(rel_pos_table(size, rel_pos), get_rel_pos(size, size, rel_pos))


@pytest.mark.parametrize("rel_pos, shape", [(True, (2, 6, 5, 32)), (True, (3, 7, 7, 32)), (False, (2, 4, 6, 32))])
def test_sdpa_attention_equals_sam_attention(rel_pos, shape) -> None:
    torch.manual_seed(0)
    B, H, W, dim = shape
    sam = Attention(dim, num_heads=4, use_rel_pos=rel_pos, rel_pos_zero_init=False, input_size=(H, W)).eval()
    if rel_pos:  # SAM initialises them to zero: random ones test the position term
        torch.nn.init.normal_(sam.rel_pos_h, std=0.5)
        torch.nn.init.normal_(sam.rel_pos_w, std=0.5)
    x = torch.randn(B, H, W, dim)
    with torch.inference_mode():
        torch.testing.assert_close(SdpaAttention(sam)(x), sam(x), atol=1e-5, rtol=1e-5)


def test_encoder_with_sdpa_attention_equals_sam_and_keeps_its_state_dict() -> None:
    sam = build_tiny_sam(0).eval()
    encoder = sam.image_encoder
    for block in encoder.blocks:
        torch.nn.init.normal_(block.attn.rel_pos_h, std=0.5)
        torch.nn.init.normal_(block.attn.rel_pos_w, std=0.5)
    fast = use_sdpa_attention(copy.deepcopy(encoder))
    assert all(isinstance(block.attn, SdpaAttention) for block in fast.blocks)
    assert list(fast.state_dict()) == list(encoder.state_dict())
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), encoder(x), atol=1e-4, rtol=1e-4)
