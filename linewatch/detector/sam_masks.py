"""Batched, device-resident automatic masks: segment-anything's SamAutomaticMaskGenerator
(crop_n_layers=0, min_mask_region_area=0) as pure torch over a batch of frames.

Per batch of B frames of one size (H, W), with P prompt points each:

1. Preprocess like SamPredictor.set_image + Sam.preprocess: resize so the longer side is
   `sam.image_encoder.img_size` (ResizeLongestSide.get_preprocess_shape) with bilinear +
   antialias on the device, rounded to integers because SAM feeds the encoder PIL's uint8
   result (skipped when the frame already has that size: then bit-identical to SAM; after a
   resize, PIL's fixed-point arithmetic and torch's float one can differ by a grey level);
   normalise with pixel_mean / pixel_std; pad to a square. One image encoder call for the
   batch (or chunks of `encoder_batch` frames).
2. Points go through ResizeLongestSide.apply_coords (in float64, as SAM's numpy path) and
   sam.prompt_encoder's arithmetic for every (image, point) pair (`embed_points`: its modules,
   with torch.where where it assigns through boolean masks). `decode_masks` is
   MaskDecoder.predict_masks + forward(multimask_output=True) with the decoder's own modules,
   except that each prompt names the image embedding it reads (MaskDecoder repeats one image's
   embedding over all its prompts). Prompts are decoded in chunks of (B, p) prompts, p =
   points_per_batch // B (at least 1): about `points_per_batch` per decoder call, counted over
   the whole batch; P is padded with invalid prompts to a multiple of p, so every call has the
   same shape. Invalid prompts (padding, `point_valid` False) are decoded too and never kept.
3. Filters, as SamAutomaticMaskGenerator._process_batch / _process_crop: predicted IoU
   > pred_iou_thresh (when > 0); stability score count(logit > t + offset) /
   count(logit > t - offset) >= stability_score_thresh (when > 0; NaN when nothing is above
   t - offset, which no threshold keeps), t = sam.mask_threshold; box of the mask above t.
   The filters are masks over the chunk, not a compaction: the masks that pass go, in prompt
   order, into `candidates_per_image` (K) slots per image (their logits too), by an index
   computed on the device (a running count per image). More than K passing masks in one image
   is an overflow (`PaddedProposals.overflow`): the masks past the K-th are dropped, so the
   decisions equal SAM's while at most K masks per image pass the filters.
   Box NMS per image on the device (`greedy_nms`: torchvision's greedy NMS on the K slots sorted
   by predicted IoU, ties in prompt order as torchvision's stable sort, iou_threshold =
   box_nms_thresh; one (B, K, K) overlap matrix and K small sequential steps).
   SAM also drops masks whose box is near a crop edge (`is_box_near_crop_edge`). With
   crop_n_layers=0 the only crop is [0, 0, W, H], which is also the image box, so
   `near_crop_edge & ~near_image_edge` is False for every box: it drops nothing, and this
   module has no such filter.
4. The K slots, NMS survivors first, are upsampled, straight to `output_size` (`upsample_logits`: one
   bilinear step that puts every output pixel where SAM's postprocess_masks does; identical
   to postprocess_masks when the frame's longer side is already the encoder side and
   output_size is the frame size), and thresholded at t. Results stay on the device.

Approximation (default, `filter_at_full_res=False`): SAM measures stability and boxes on the
logits upsampled to the frame size; here they are measured on the 256 x 256 low-res logits,
restricted to the valid region (the cells that hold the resized frame; the last row/column is
partly valid when the resized side is not a multiple of 4). One cell is 4 x 4 pixels of the
1024 input, so stability is counted on a 16x coarser grid, and a low-res box of inclusive cells
[i0, j0, i1, j1] becomes the inclusive pixel box [4 i0 sx, 4 j0 sy, 4 (i1 + 1) sx - 1,
4 (j1 + 1) sy - 1] (s = frame side / resized side, clamped to the frame), which knows each edge
to about one cell. A mask whose stability lies near stability_score_thresh, or a pair whose box
IoU lies near box_nms_thresh, can therefore be decided differently from SAM; masks far from
both thresholds are decided the same way, and their masks (upsampled from the same logits) are
SAM's.
`filter_at_full_res=True` is the cheap way to SAM's decisions: every decoded mask is upsampled
to the frame (chunks of about 2**25 pixels) and stability and boxes are measured there exactly
as SAM does (for frames whose longer side is the encoder side, where `upsample_logits` is
postprocess_masks). Without reading the IoU filter's result back, every mask of a chunk is
upsampled, not only the IoU survivors: one frame-sized float map per decoded mask (4 MiB at
1024 x 1024, 3 per prompt; not measured on a GPU here; on a CPU it dominates the time). It is
off by default: the task asked for low-res filtering, and the decisions it changes are
borderline ones.

Order: each image's masks are sorted by predicted IoU, descending (batched_nms's order, which
is also the order SamAutomaticMaskGenerator returns with one crop). Callers wanting area order
sort again.

Precision: under autocast to bf16 or fp16 (detector.precision), the mask decoder runs in that dtype
outright (`LowPrecisionDecoding`): its parameters cast once per batch, autocast off inside,
the image embeddings, dense and positional encodings and prompt tokens cast to it. Under autocast
alone the image-token stream (N, 4096, 256) and the (N, 32, 256, 256) upscaling stay float32:
LayerNorm and LayerNorm2d give float32 (autocast's rule, and LayerNorm2d's float32 weights
promote the sum), and every add with them then does too. Its outputs (logits, predicted IoU)
are in that dtype, as the last matrix product under autocast gave them; in fp32 nothing changes.

Host syncs: none in `BatchedMaskGenerator.padded`, whose results are padded to (B, K) with a
validity mask; every shape follows from B, P, K and the frame size, and every index is computed
on the device. `__call__` (per-image lists) reads the counts back once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# Masks x pixels of float logits upsampled at once: 2**25 floats = 128 MiB.
_UPSAMPLE_BUDGET = 2**25


@dataclass
class MaskProposals:
    """Per image, already filtered, sorted by predicted IoU descending; all on the model's device."""

    masks: list[Tensor]  # B bool (M_b, out_h, out_w)
    scores: list[Tensor]  # B float (M_b,) predicted IoU
    stability: list[Tensor]  # B float (M_b,)
    boxes: list[Tensor]  # B float (M_b, 4) xyxy, inclusive pixel indices of the input frame
    points: list[Tensor]  # B float (M_b, 2) the prompt point (x, y) in input pixels


@dataclass
class PaddedProposals:
    """The same, padded to K per image (fixed by the batch's shapes, not by its data): row b holds
    its valid entries first, sorted by predicted IoU descending, then padding (valid False, masks
    empty, other fields meaningless). All on the model's device."""

    masks: Tensor  # bool (B, K, out_h, out_w)
    scores: Tensor  # float (B, K) predicted IoU
    stability: Tensor  # float (B, K)
    boxes: Tensor  # float (B, K, 4) xyxy, inclusive pixel indices of the input frame
    points: Tensor  # float (B, K, 2) the prompt point (x, y) in input pixels
    valid: Tensor  # bool (B, K)
    overflow: Tensor  # bool (B,): more masks passed the filters than the K candidate slots hold (see the module)

    def unpad(self) -> MaskProposals:
        """Per-image lists of the valid entries (one host sync: the counts)."""
        counts = self.valid.sum(1).tolist()
        fields = {name: [getattr(self, name)[b, :n] for b, n in enumerate(counts)]
                  for name in ("masks", "scores", "stability", "boxes", "points")}
        return MaskProposals(**fields)


def grid_points(n_per_side: int) -> Tensor:
    """(n*n, 2) float64 points (x, y) in [0, 1], x varying fastest: the same numbers as
    segment_anything.utils.amg.build_point_grid (numpy.linspace's arithmetic, last point = stop)."""
    offset = 1.0 / (2 * n_per_side)
    if n_per_side == 1:
        one_side = torch.tensor([offset], dtype=torch.float64)
    else:
        step = (1.0 - 2 * offset) / (n_per_side - 1)
        one_side = torch.arange(n_per_side, dtype=torch.float64) * step + offset
        one_side[-1] = 1.0 - offset
    ys, xs = torch.meshgrid(one_side, one_side, indexing="ij")
    return torch.stack([xs, ys], dim=-1).reshape(-1, 2)


def resized_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    """ResizeLongestSide.get_preprocess_shape: (h, w) scaled so that the longer side is long_side."""
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def decode_masks(
    decoder: torch.nn.Module,
    image_embeddings: Tensor,
    image_pe: Tensor,
    image_index: Tensor,
    sparse_prompt_embeddings: Tensor,
    dense_prompt_embeddings: Tensor,
) -> tuple[Tensor, Tensor]:
    """MaskDecoder.predict_masks + forward(multimask_output=True), with one image embedding per prompt.

    decoder: a segment_anything MaskDecoder (its modules and weights are used as they are).
    image_embeddings: (B, C, h, w); image_pe: (1, C, h, w); image_index: long (N,) into B;
    sparse_prompt_embeddings: (N, K, C); dense_prompt_embeddings: (N, C, h, w) (an expanded view is fine).
    Returns low-res mask logits (N, 3, 4h, 4w) and predicted IoU (N, 3).
    """
    n = sparse_prompt_embeddings.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse_prompt_embeddings], dim=1)

    if dense_prompt_embeddings.stride(0) == 0:  # the same for every prompt (no mask prompt): added per image
        src = (image_embeddings + dense_prompt_embeddings[:1])[image_index]
    else:
        src = image_embeddings[image_index] + dense_prompt_embeddings
    pos_src = image_pe.expand(n, -1, -1, -1)
    b, c, h, w = src.shape

    hs, src = decoder.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : 1 + decoder.num_mask_tokens, :]

    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper_in = torch.stack(
        [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
    )
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    iou_pred = decoder.iou_prediction_head(iou_token_out)
    return masks[:, 1:], iou_pred[:, 1:]


class _Decoding(torch.nn.Module):
    """decode_masks as a module whose child is the decoder, so that torch.func.functional_call can
    run it on other (cast) parameters without copying or changing the decoder."""

    def __init__(self, decoder: torch.nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, *args: Tensor) -> tuple[Tensor, Tensor]:
        return decode_masks(self.decoder, *args)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast runs matrix products in on `device`: None when autocast is off there (or float32)."""
    if not torch.is_autocast_enabled(device.type):
        return None
    dtype = torch.get_autocast_dtype(device.type)
    return None if dtype == torch.float32 else dtype


class LowPrecisionDecoding:
    """Calls decode_masks with the decoder's parameters cast to `dtype` once (at construction, one
    cast per parameter), the tensor arguments cast to it, and autocast off: every tensor of the
    decoder in `dtype`. dtype None: decode_masks as it is (the caller's autocast applies).
    functional_call puts the cast parameters in the decoder's place for the length of a call: no
    other thread may run the same decoder meanwhile (the segment stage is one thread; a fresh
    recipe's warm-up runs on models of its own)."""

    def __init__(self, decoder: torch.nn.Module, dtype: torch.dtype | None) -> None:
        self.dtype = dtype
        self.decoding = _Decoding(decoder)
        self.parameters = None if dtype is None else {
            name: p.to(dtype) if p.is_floating_point() else p for name, p in self.decoding.named_parameters()}

    def __call__(self, *args: Tensor) -> tuple[Tensor, Tensor]:
        if self.dtype is None:
            return self.decoding(*args)
        device_type = args[0].device.type
        args = tuple(a.to(self.dtype) if a.is_floating_point() else a for a in args)
        with torch.autocast(device_type=device_type, enabled=False):
            return torch.func.functional_call(self.decoding, self.parameters, args)


def upsample_logits(logits: Tensor, input_size: tuple[int, int], output_size: tuple[int, int], side: int) -> Tensor:
    """Sam.postprocess_masks in one bilinear step.

    logits (M, L, L): low-res logits of a padded side x side input whose top-left input_size
    (h, w) holds the resized frame -> (M, out_h, out_w).
    SAM resizes L -> side, crops input_size, then resizes to output_size. Here the low-res cells
    that this reads (the valid ones plus one: SAM's first step reads one past the valid region for
    the last pixels) are resized once with scale factor (side / L) * out / in per axis, so each
    output pixel centre lands where SAM's composed mapping puts it. When output_size == input_size
    SAM's second step is the identity and this is exactly postprocess_masks. Otherwise it is one
    linear interpolation where SAM does two in a row; they differ only where an output pixel falls
    between the two 1024-grid pixels that straddle a low-res sample (SAM interpolates linearly
    across the kink there) and, when enlarging, in the last output row/column (SAM clamps at the
    crop), by a fraction of the local logit step.
    """
    L = logits.shape[-1]
    cell = side // L  # pixels of the padded input per low-res cell: 4 for SAM
    (in_h, in_w), (out_h, out_w) = input_size, output_size
    rows, cols = min(L, -(-in_h // cell) + 1), min(L, -(-in_w // cell) + 1)
    up = F.interpolate(
        logits[:, None, :rows, :cols],
        scale_factor=(cell * out_h / in_h, cell * out_w / in_w),
        mode="bilinear",
        align_corners=False,
        recompute_scale_factor=False,
    )
    if up.shape[-2] < out_h or up.shape[-1] < out_w:  # rows * scale >= out_h by construction
        raise AssertionError(f"upsample_logits produced {tuple(up.shape[-2:])}, wanted at least {output_size}")
    return up[:, 0, :out_h, :out_w]


def mask_boxes(masks: Tensor) -> Tensor:
    """amg.batched_mask_to_box: bool (M, h, w) -> long (M, 4) inclusive [min col, min row, max col, max row];
    [0, 0, 0, 0] for an empty mask."""
    _, h, w = masks.shape
    rows = masks.any(dim=2)  # (M, h)
    cols = masks.any(dim=1)  # (M, w)
    y0 = rows.to(torch.uint8).argmax(dim=1)
    y1 = h - 1 - rows.flip(1).to(torch.uint8).argmax(dim=1)
    x0 = cols.to(torch.uint8).argmax(dim=1)
    x1 = w - 1 - cols.flip(1).to(torch.uint8).argmax(dim=1)
    return torch.stack([x0, y0, x1, y1], dim=1) * rows.any(dim=1, keepdim=True)


def low_res_boxes(above: Tensor, cell_w: float, cell_h: float, frame_size: tuple[int, int]) -> Tensor:
    """Boxes of low-res masks, in frame pixels: bool (M, h, w) -> float (M, 4) inclusive xyxy like SAM's.

    Inclusive cells [i0, j0, i1, j1] cover frame pixels [i0 cw, (i1 + 1) cw) x [j0 ch, (j1 + 1) ch), where
    cw / ch are frame pixels per cell; the end is clamped to the frame (H, W). Empty mask: [0, 0, 0, 0], as SAM.
    """
    H, W = frame_size
    x0, y0, x1, y1 = mask_boxes(above).float().unbind(dim=1)
    boxes = torch.stack(
        [x0 * cell_w, y0 * cell_h, ((x1 + 1) * cell_w).clamp(max=W) - 1, ((y1 + 1) * cell_h).clamp(max=H) - 1], dim=1
    )
    return boxes * above.flatten(1).any(dim=1, keepdim=True)


def stability_scores(logits: Tensor, mask_threshold: float, offset: float) -> Tensor:
    """amg.calculate_stability_score: logits (M, h, w) -> float (M,); NaN where nothing is above t - offset."""
    inner = (logits > mask_threshold + offset).sum(dim=(-2, -1), dtype=torch.int32)
    outer = (logits > mask_threshold - offset).sum(dim=(-2, -1), dtype=torch.int32)
    return inner / outer


def embed_points(prompt_encoder: torch.nn.Module, points: Tensor, labels: Tensor) -> Tensor:
    """PromptEncoder._embed_points(points, labels, pad=True) with torch.where instead of its
    boolean-mask assignments (`emb[labels == -1] = 0.0` and the `+=`s), which wait for the device:
    the same numbers, nothing read back. points (N, n, 2) in the resized frame, labels (N, n) int
    (1 positive, 0 negative, -1 not a point) -> (N, n + 1, C), the padding point last."""
    points = torch.cat([points + 0.5, points.new_zeros(points.shape[0], 1, 2)], dim=1)
    labels = torch.cat([labels, torch.full_like(labels[:, :1], -1)], dim=1)[..., None]
    embedding = prompt_encoder.pe_layer.forward_with_coords(points, prompt_encoder.input_image_size)
    negative, positive = (e.weight for e in prompt_encoder.point_embeddings[:2])
    embedding = embedding + torch.where(labels == 0, negative, 0.0) + torch.where(labels == 1, positive, 0.0)
    return torch.where(labels == -1, prompt_encoder.not_a_point_embed.weight, embedding)


def box_overlaps(boxes: Tensor) -> Tensor:
    """Pairwise IoU of xyxy boxes (..., K, 4) -> (..., K, K), with the arithmetic of torchvision's
    nms kernels (areas (x2 - x1) (y2 - y1), inter / (area_i + area_j - inter)), so that a pair sits
    on the same side of a threshold as there. 0 / 0 (two empty boxes) is NaN: above no threshold."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    area = (x2 - x1) * (y2 - y1)
    w = (torch.minimum(x2[..., :, None], x2[..., None, :]) - torch.maximum(x1[..., :, None], x1[..., None, :])).clamp(min=0)
    h = (torch.minimum(y2[..., :, None], y2[..., None, :]) - torch.maximum(y1[..., :, None], y1[..., None, :])).clamp(min=0)
    inter = w * h
    return inter / (area[..., :, None] + area[..., None, :] - inter)


def greedy_nms(boxes: Tensor, valid: Tensor, iou_threshold: float) -> Tensor:
    """torchvision's greedy NMS on each row, on the device and without a host sync.

    boxes (B, K, 4) xyxy, each row already sorted by score, descending (ties in the order the
    candidates came: torchvision's sort is stable); valid (B, K) marks real candidates.
    -> keep (B, K): valid and not overlapping (IoU > iou_threshold) a kept candidate before it.
    One (B, K, K) overlap matrix, then K steps of two small ops each (greedy NMS is sequential)."""
    k = boxes.shape[1]
    later = torch.ones(k, k, dtype=torch.bool, device=boxes.device).triu(diagonal=1)
    # float32 IoU against the float64 threshold, as torchvision's kernels compare (an IoU of exactly
    # 3 / 10 is above a threshold of 0.3 there, and not above float32(0.3))
    overlaps = box_overlaps(boxes.float()).double() > iou_threshold
    spares = ~(overlaps & later)  # spares[b, i, j]: i does not suppress j
    keep = valid
    for i in range(k):
        keep = torch.where(keep[:, i : i + 1], keep & spares[:, i], keep)
    return keep


class BatchedMaskGenerator:
    """SamAutomaticMaskGenerator (one crop layer, no small-region cleanup) over a batch of frames,
    without RLE and without leaving the device. The module docstring lists the differences."""

    def __init__(
        self,
        sam: torch.nn.Module,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        points_per_batch: int = 256,
        encoder_batch: int | None = None,
        filter_at_full_res: bool = False,
        candidates_per_image: int = 256,
    ) -> None:
        self.sam = sam
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.points_per_batch = points_per_batch
        self.encoder_batch = encoder_batch
        self.filter_at_full_res = filter_at_full_res
        self.candidates_per_image = candidates_per_image

    # ------------------------------------------------------------------ model steps

    def preprocess(self, frames: Tensor) -> Tensor:
        """uint8 (B, H, W, 3) RGB -> float (B, 3, S, S) resized, normalised and padded; S = encoder input side."""
        side = self.sam.image_encoder.img_size
        _, H, W, _ = frames.shape
        new_h, new_w = resized_shape(H, W, side)
        x = frames.permute(0, 3, 1, 2).float()
        if (new_h, new_w) != (H, W):
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
            x = x.round().clamp(0, 255)  # SAM's encoder sees PIL's uint8 output
        x = (x - self.sam.pixel_mean) / self.sam.pixel_std
        return F.pad(x, (0, side - new_w, 0, side - new_h))

    def encode(self, frames: Tensor) -> Tensor:
        """uint8 (B, H, W, 3) -> image embeddings (B, C, h, w), in chunks of encoder_batch frames."""
        x = self.preprocess(frames)
        step = self.encoder_batch or x.shape[0]
        return torch.cat([self.sam.image_encoder(x[i : i + step]) for i in range(0, x.shape[0], step)])

    def encode_points(self, model_points: Tensor) -> tuple[Tensor, Tensor]:
        """model_points (N, 2) in the resized frame, one positive point per prompt -> sam.prompt_encoder's
        sparse (N, 2, C) and dense (N, C, h, w) embeddings (the dense one an expanded view), as
        sam.prompt_encoder(points=..., boxes=None, masks=None) gives them, without a host sync."""
        encoder = self.sam.prompt_encoder
        n = model_points.shape[0]
        labels = torch.ones(n, 1, dtype=torch.int, device=model_points.device)
        sparse = embed_points(encoder, model_points[:, None, :], labels)
        dense = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, *encoder.image_embedding_size)
        return sparse, dense

    # ------------------------------------------------------------------ generator

    def __call__(
        self,
        frames: Tensor,
        points: Tensor,
        point_valid: Tensor | None = None,
        output_size: tuple[int, int] | None = None,
    ) -> MaskProposals:
        """`padded`, as per-image lists (one more host sync, for the counts)."""
        return self.padded(frames, points, point_valid, output_size).unpad()

    @torch.inference_mode()
    def padded(
        self,
        frames: Tensor,
        points: Tensor,
        point_valid: Tensor | None = None,
        output_size: tuple[int, int] | None = None,
    ) -> PaddedProposals:
        """frames: uint8 (B, H, W, 3) RGB on the model's device (all the same size);
        points: float (B, P, 2) prompt points (x, y) in input pixels; point_valid: bool (B, P),
        False marks padding (None: all valid); both best on that device too (they are moved there);
        output_size: (h, w) of the returned masks, default (H, W). No host sync."""
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8 (B, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
        B, H, W, _ = frames.shape
        if points.ndim != 3 or points.shape[0] != B or points.shape[-1] != 2:
            raise ValueError(f"points must be (B={B}, P, 2), got {tuple(points.shape)}")
        if point_valid is not None and tuple(point_valid.shape) != tuple(points.shape[:2]):
            raise ValueError(f"point_valid must be {tuple(points.shape[:2])}, got {tuple(point_valid.shape)}")
        out_size = tuple(output_size or (H, W))
        device = frames.device
        side = self.sam.image_encoder.img_size  # 1024 for SAM
        low_side = 4 * self.sam.prompt_encoder.image_embedding_size[0]  # 256 for SAM
        new_h, new_w = resized_shape(H, W, side)
        t = float(self.sam.mask_threshold)

        # Prompts (B, P) in chunks of (B, p) along P; P padded with invalid prompts to a multiple of p,
        # so that every decoder call has the same shape.
        P = points.shape[1]
        p = max(1, min(P, self.points_per_batch // B))
        chunks = -(-P // p)
        points = points.to(device)
        valid = torch.ones(B, P, dtype=torch.bool, device=device) if point_valid is None else point_valid.to(device)
        if chunks * p > P:
            points = torch.cat([points, points.new_zeros(B, chunks * p - P, 2)], dim=1)
            valid = torch.cat([valid, valid.new_zeros(B, chunks * p - P)], dim=1)
        # ResizeLongestSide.apply_coords, in float64 like SAM's numpy path.
        xy = points.double()
        model_points = torch.stack([xy[..., 0] * (new_w / W), xy[..., 1] * (new_h / H)], dim=-1)
        sparse, dense = self.encode_points(model_points.reshape(-1, 2))
        sparse = sparse.view(B, chunks * p, *sparse.shape[1:])
        image_pe = self.sam.prompt_encoder.get_dense_pe()
        image_index = torch.arange(B, device=device).repeat_interleave(p)
        valid_cells = (-(-new_h * low_side // side), -(-new_w * low_side // side))  # ceil: last cell partly valid
        box_geometry = (side / low_side * W / new_w, side / low_side * H / new_h, (H, W))

        embeddings = self.encode(frames)
        decode = LowPrecisionDecoding(self.sam.mask_decoder, autocast_dtype(device))
        if decode.dtype is not None:  # cast once per batch, not per chunk; `dense` before it is expanded
            embeddings, image_pe, sparse = (x.to(decode.dtype) for x in (embeddings, image_pe, sparse))
            dense = dense[:1, :, :1, :1].to(decode.dtype).expand_as(dense)

        # The masks that pass the filters go, in prompt order, into K candidate slots per image
        # (slot K: a sink for the rest); `filled` counts them, past K too.
        K = max(1, min(self.candidates_per_image, 3 * P))
        rows = torch.arange(B, device=device)[:, None]
        slots: dict[str, Tensor] = {}
        filled = torch.zeros(B, dtype=torch.long, device=device)
        for c in range(chunks):
            chunk = slice(c * p, (c + 1) * p)
            logits, iou = decode(embeddings, image_pe, image_index, sparse[:, chunk].flatten(0, 1), dense[: B * p])
            logits, iou = logits.flatten(0, 1), iou.flatten(0, 1)  # (3Bp, L, L), (3Bp,): prompt-major, as SAM
            keep = valid[:, chunk].repeat_interleave(3, dim=1)  # (B, 3p)
            if self.pred_iou_thresh > 0.0:
                keep = keep & (iou.view(B, -1) > self.pred_iou_thresh)
            if self.filter_at_full_res:
                stability, boxes = self._measure_full_res(logits, (new_h, new_w), (H, W), t)
            else:
                low = logits[:, : valid_cells[0], : valid_cells[1]]
                stability = stability_scores(low, t, self.stability_score_offset)
                boxes = low_res_boxes(low > t, *box_geometry)
            if self.stability_score_thresh > 0.0:
                keep = keep & (stability.view(B, -1) >= self.stability_score_thresh)
            slot = filled[:, None] + keep.cumsum(dim=1) - 1
            slot = torch.where(keep & (slot < K), slot, K)
            filled = filled + keep.sum(dim=1)
            candidates = {"logits": logits, "scores": iou, "stability": stability, "boxes": boxes.float(),
                          "points": points[:, chunk].repeat_interleave(3, dim=1)}
            for name, value in candidates.items():
                value = value.reshape(B, 3 * p, *value.shape[1 if name != "points" else 2 :])
                if name not in slots:
                    slots[name] = value.new_zeros(B, K + 1, *value.shape[2:])
                slots[name][rows, slot] = value
        if not slots:  # no prompt at all
            slots = {"logits": torch.zeros(B, K + 1, low_side, low_side, device=device),
                     "scores": torch.zeros(B, K + 1, device=device), "stability": torch.zeros(B, K + 1, device=device),
                     "boxes": torch.zeros(B, K + 1, 4, device=device), "points": points.new_zeros(B, K + 1, 2)}

        # Box NMS per image, in order of predicted IoU (stable: ties in prompt order, as torchvision);
        # then the survivors first, still in that order.
        candidate = torch.arange(K, device=device)[None] < filled[:, None]
        scores = torch.where(candidate, slots["scores"][:, :K].float(), -torch.inf)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        kept = greedy_nms(slots["boxes"][rows, order], candidate.gather(1, order), self.box_nms_thresh)
        order = order.gather(1, torch.sort(kept.to(torch.uint8), dim=1, descending=True, stable=True).indices)
        kept = kept.sum(dim=1, keepdim=True) > torch.arange(K, device=device)[None]
        logits = slots["logits"][rows, order].flatten(0, 1)
        masks = self._upsample(logits, (new_h, new_w), out_size, t).view(B, K, *out_size) & kept[..., None, None]
        return PaddedProposals(
            masks=masks,
            scores=slots["scores"][rows, order],
            stability=slots["stability"][rows, order],
            boxes=slots["boxes"][rows, order],
            points=slots["points"][rows, order],
            valid=kept,
            overflow=filled > K,
        )

    def _measure_full_res(
        self, logits: Tensor, input_size: tuple[int, int], frame_size: tuple[int, int], t: float
    ) -> tuple[Tensor, Tensor]:
        """Stability (M,) and inclusive pixel boxes (M, 4) measured as SAM does, on the logits (M, L, L)
        upsampled to the frame (H, W), in chunks of about _UPSAMPLE_BUDGET pixels."""
        side = self.sam.image_encoder.img_size
        step = max(1, _UPSAMPLE_BUDGET // (frame_size[0] * frame_size[1]))
        stability, boxes = [logits.new_zeros(0)], [logits.new_zeros(0, 4)]
        for i in range(0, logits.shape[0], step):
            full = upsample_logits(logits[i : i + step], input_size, frame_size, side)
            stability.append(stability_scores(full, t, self.stability_score_offset))
            boxes.append(mask_boxes(full > t).float())
        return torch.cat(stability), torch.cat(boxes)

    def _upsample(
        self, logits: Tensor, input_size: tuple[int, int], output_size: tuple[int, int], t: float
    ) -> Tensor:
        """Low-res logits (M, L, L) -> bool masks (M, out_h, out_w), in chunks of about _UPSAMPLE_BUDGET pixels."""
        side = self.sam.image_encoder.img_size
        step = max(1, _UPSAMPLE_BUDGET // (output_size[0] * output_size[1]))
        masks = torch.empty(logits.shape[0], *output_size, dtype=torch.bool, device=logits.device)
        for i in range(0, logits.shape[0], step):
            masks[i : i + step] = upsample_logits(logits[i : i + step], input_size, output_size, side) > t
        return masks
