"""The mask decoder's dtype: under bf16 autocast every hot tensor of the decoder (the image-token
stream, the dense and positional encodings, the upscaled masks) is bf16; without autocast the
decoding is float32 and unchanged. Tiny random SAM of the tests (its decoder is SAM's, full size)."""

from __future__ import annotations

import pytest
import torch

from linewatch.detector.sam_masks import BatchedMaskGenerator, LowPrecisionDecoding, decode_masks
from linewatch.detector.segment import build_tiny_sam


@pytest.fixture(scope="module")
def sam():
    return build_tiny_sam(0, dim=256).eval()  # SAM's decoder width


def decoder_inputs(sam, n: int = 5):
    gen = BatchedMaskGenerator(sam)
    g = torch.Generator().manual_seed(1)
    embeddings = torch.randn(2, 256, 64, 64, generator=g)
    points = torch.rand(n, 2, dtype=torch.float64, generator=g) * 1024
    image_index = torch.tensor([0, 1, 1, 0, 1][:n])
    with torch.inference_mode():
        sparse, dense = gen.encode_points(points)
        image_pe = sam.prompt_encoder.get_dense_pe()
    return embeddings, image_pe, image_index, sparse, dense


def record_dtypes(sam) -> tuple[dict[str, list[torch.dtype]], list]:
    """Forward hooks on the decoder's transformer and upscaling: the dtypes of what goes in and out."""
    seen: dict[str, list[torch.dtype]] = {"transformer in": [], "transformer out": [], "upscaling out": []}

    def transformer(module, args, out):
        seen["transformer in"] += [a.dtype for a in args]  # image embedding (+ dense), positional encoding, tokens
        seen["transformer out"] += [t.dtype for t in out]  # the tokens and the image-token stream

    def upscaling(module, args, out):
        seen["upscaling out"].append(out.dtype)

    decoder = sam.mask_decoder
    return seen, [decoder.transformer.register_forward_hook(transformer),
                  decoder.output_upscaling.register_forward_hook(upscaling)]


def test_generator_decodes_in_bf16_under_bf16_autocast(sam) -> None:
    """Through BatchedMaskGenerator.padded, as the segment stage runs it under detector.precision bf16.
    Under autocast alone the stream came out float32 (LayerNorm's rule and LayerNorm2d's float32 weights)."""
    gen = BatchedMaskGenerator(sam, points_per_batch=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    g = torch.Generator().manual_seed(2)
    frames = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=g)
    points = torch.rand(2, 3, 2, generator=g) * 64
    seen, hooks = record_dtypes(sam)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            proposals = gen.padded(frames, points)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen["transformer in"] and seen["upscaling out"]  # the hooks saw the decoder run
    assert set(seen["transformer in"]) == set(seen["transformer out"]) == set(seen["upscaling out"]) == {torch.bfloat16}
    assert proposals.valid.any()
    assert {p.dtype for p in sam.mask_decoder.parameters()} == {torch.float32}  # the model itself is not cast


def test_without_autocast_decoding_is_float32_and_unchanged(sam) -> None:
    args = decoder_inputs(sam)
    seen, hooks = record_dtypes(sam)
    try:
        with torch.inference_mode():
            logits, iou = LowPrecisionDecoding(sam.mask_decoder, None)(*args)
            ref_logits, ref_iou = decode_masks(sam.mask_decoder, *args)
    finally:
        for hook in hooks:
            hook.remove()
    assert set(seen["transformer out"]) == set(seen["upscaling out"]) == {torch.float32}
    assert torch.equal(logits, ref_logits) and torch.equal(iou, ref_iou)


def test_bf16_decoding_is_close_to_float32(sam) -> None:
    """bf16 keeps 8 bits of mantissa: the logits within a few percent of their range, the same sign
    (mask pixel) almost everywhere."""
    args = decoder_inputs(sam)
    with torch.inference_mode():
        logits, iou = LowPrecisionDecoding(sam.mask_decoder, torch.bfloat16)(*args)
        ref_logits, ref_iou = decode_masks(sam.mask_decoder, *args)
    assert logits.dtype == iou.dtype == torch.bfloat16
    scale = ref_logits.abs().max()
    assert (logits.float() - ref_logits).abs().max() < 0.05 * scale
    assert ((logits.float() > 0) == (ref_logits > 0)).float().mean() > 0.99
    assert (iou.float() - ref_iou).abs().max() < 0.05 * ref_iou.abs().max()


def test_one_dense_embedding_for_all_prompts_equals_one_per_prompt(sam) -> None:
    """decode_masks adds an expanded dense embedding per image, before picking each prompt's image:
    the same numbers as adding it per prompt."""
    embeddings, image_pe, image_index, sparse, dense = decoder_inputs(sam)
    assert dense.stride(0) == 0
    with torch.inference_mode():
        expanded = decode_masks(sam.mask_decoder, embeddings, image_pe, image_index, sparse, dense)
        per_prompt = decode_masks(sam.mask_decoder, embeddings, image_pe, image_index, sparse, dense.contiguous())
    assert torch.equal(expanded[0], per_prompt[0]) and torch.equal(expanded[1], per_prompt[1])
