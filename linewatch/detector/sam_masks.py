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
2. Points go through ResizeLongestSide.apply_coords (in float64, as SAM's numpy path) and one
   sam.prompt_encoder call for every (image, point) pair. `decode_masks` is
   MaskDecoder.predict_masks + forward(multimask_output=True) with the decoder's own modules,
   except that each prompt names the image embedding it reads (MaskDecoder repeats one image's
   embedding over all its prompts). Prompts are decoded in chunks of `points_per_batch`,
   counted over the whole batch, so a chunk may span images.
3. Filters, as SamAutomaticMaskGenerator._process_batch / _process_crop: predicted IoU
   > pred_iou_thresh (when > 0); stability score count(logit > t + offset) /
   count(logit > t - offset) >= stability_score_thresh (when > 0; NaN when nothing is above
   t - offset, which no threshold keeps), t = sam.mask_threshold; box of the mask above t;
   box NMS per image on the device (torchvision batched_nms, idxs = image index, scores =
   predicted IoU, iou_threshold = box_nms_thresh).
   SAM also drops masks whose box is near a crop edge (`is_box_near_crop_edge`). With
   crop_n_layers=0 the only crop is [0, 0, W, H], which is also the image box, so
   `near_crop_edge & ~near_image_edge` is False for every box: it drops nothing, and this
   module has no such filter.
4. Only the NMS survivors are upsampled, straight to `output_size` (`upsample_logits`: one
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
`filter_at_full_res=True` is the cheap way to SAM's decisions: the masks that pass the IoU
filter are upsampled to the frame (chunks of about 2**25 pixels) and stability and boxes are
measured there exactly as SAM does (for frames whose longer side is the encoder side, where
`upsample_logits` is postprocess_masks). It costs one frame-sized float map per IoU survivor
(4 MiB at 1024 x 1024: an estimate of milliseconds per frame on a GPU, not measured here; on a
CPU it is a large share of the time) and one more host sync per prompt chunk, and it is still
far cheaper than SAM, which also upsamples and RLE-encodes on the host. It is off by default:
the task asked for low-res filtering, and the decisions it changes are borderline ones.

Order: each image's masks are sorted by predicted IoU, descending (batched_nms's order, which
is also the order SamAutomaticMaskGenerator returns with one crop). Callers wanting area order
sort again.

Host syncs (everything else is queued on the device without waiting): `nonzero` for the valid
prompts and the prompt encoder's boolean-mask assignments, both before the image encoder is
queued; one `nonzero` per prompt chunk to compact the survivors (two with filter_at_full_res);
torchvision's NMS; one `bincount(...).tolist()` for the per-image split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms

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
    ) -> None:
        self.sam = sam
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.points_per_batch = points_per_batch
        self.encoder_batch = encoder_batch
        self.filter_at_full_res = filter_at_full_res

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
        sparse (N, 2, C) and dense (N, C, h, w) embeddings (the dense one an expanded view).
        The prompt encoder's boolean-mask assignments wait for the device: call it before queuing work."""
        labels = torch.ones(model_points.shape[0], 1, dtype=torch.int, device=model_points.device)
        return self.sam.prompt_encoder(points=(model_points[:, None, :], labels), boxes=None, masks=None)

    # ------------------------------------------------------------------ generator

    @torch.inference_mode()
    def __call__(
        self,
        frames: Tensor,
        points: Tensor,
        point_valid: Tensor | None = None,
        output_size: tuple[int, int] | None = None,
    ) -> MaskProposals:
        """frames: uint8 (B, H, W, 3) RGB on the model's device (all the same size);
        points: float (B, P, 2) prompt points (x, y) in input pixels; point_valid: bool (B, P),
        False marks padding (None: all valid); both best on that device too (they are moved there);
        output_size: (h, w) of the returned masks, default (H, W)."""
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

        # What waits for the host (valid prompts, the prompt encoder) runs before the
        # image encoder is queued. Prompts stay image-major, in the given order (SAM's order per image).
        P = points.shape[1]
        flat_points = points.to(device).reshape(B * P, 2)
        flat_image = torch.arange(B, device=device).repeat_interleave(P)
        if point_valid is not None:
            valid = point_valid.to(device).reshape(B * P).nonzero().squeeze(1)  # host sync (nothing queued yet)
            flat_points, flat_image = flat_points[valid], flat_image[valid]
        # ResizeLongestSide.apply_coords, in float64 like SAM's numpy path.
        xy = flat_points.double()
        model_points = torch.stack([xy[:, 0] * (new_w / W), xy[:, 1] * (new_h / H)], dim=1)
        sparse, dense = self.encode_points(model_points)
        image_pe = self.sam.prompt_encoder.get_dense_pe()
        valid_cells = (-(-new_h * low_side // side), -(-new_w * low_side // side))  # ceil: last cell partly valid
        box_geometry = (side / low_side * W / new_w, side / low_side * H / new_h, (H, W))

        embeddings = self.encode(frames)

        kept: dict[str, list[Tensor]] = {k: [] for k in ("logits", "scores", "stability", "boxes", "image", "point")}
        for start in range(0, flat_points.shape[0], self.points_per_batch):
            chunk = slice(start, start + self.points_per_batch)
            logits, iou = decode_masks(
                self.sam.mask_decoder, embeddings, image_pe, flat_image[chunk], sparse[chunk], dense[chunk]
            )
            logits, iou = logits.flatten(0, 1), iou.flatten(0, 1)  # (3n, L, L), (3n,): prompt-major, as SAM
            prompt = torch.arange(start, start + iou.shape[0] // 3, device=device).repeat_interleave(3)

            keep = torch.ones_like(iou, dtype=torch.bool)
            if self.pred_iou_thresh > 0.0:
                keep &= iou > self.pred_iou_thresh
            if self.filter_at_full_res:
                idx = keep.nonzero().squeeze(1)  # host sync
                logits, iou, prompt, keep = logits[idx], iou[idx], prompt[idx], keep[idx]
                stability, boxes = self._measure_full_res(logits, (new_h, new_w), (H, W), t)
            else:
                low = logits[:, : valid_cells[0], : valid_cells[1]]
                stability = stability_scores(low, t, self.stability_score_offset)
                boxes = low_res_boxes(low > t, *box_geometry)
            if self.stability_score_thresh > 0.0:
                keep &= stability >= self.stability_score_thresh
            idx = keep.nonzero().squeeze(1)  # host sync
            kept["logits"].append(logits[idx])
            kept["scores"].append(iou[idx])
            kept["stability"].append(stability[idx])
            kept["boxes"].append(boxes[idx])
            kept["image"].append(flat_image[prompt[idx]])
            kept["point"].append(flat_points[prompt[idx]])

        if not kept["scores"]:  # no valid prompt at all
            empty = {
                "logits": torch.zeros(0, low_side, low_side, device=device),
                "scores": torch.zeros(0, device=device),
                "stability": torch.zeros(0, device=device),
                "boxes": torch.zeros(0, 4, device=device),
                "image": torch.zeros(0, dtype=torch.long, device=device),
                "point": points.new_zeros(0, 2),
            }
            kept = {k: [v] for k, v in empty.items()}
        cat = {k: torch.cat(v) for k, v in kept.items()}
        survivors = batched_nms(cat["boxes"].float(), cat["scores"], cat["image"], self.box_nms_thresh)
        # batched_nms orders by score, descending; a stable sort by image keeps that order within each image.
        survivors = survivors[torch.sort(cat["image"][survivors], stable=True).indices]
        counts = torch.bincount(cat["image"][survivors], minlength=B).tolist()  # host sync

        masks = self._upsample(cat["logits"][survivors], (new_h, new_w), out_size, t)
        per_image = {k: list(torch.split(cat[k][survivors], counts)) for k in ("scores", "stability", "boxes", "point")}
        return MaskProposals(
            masks=list(torch.split(masks, counts)),
            scores=per_image["scores"],
            stability=per_image["stability"],
            boxes=per_image["boxes"],
            points=per_image["point"],
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
