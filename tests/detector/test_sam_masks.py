"""BatchedMaskGenerator against segment-anything's SamAutomaticMaskGenerator, with a tiny random SAM.

The model is build_tiny_sam(SEED) with the two ConvTranspose2d kernels of its mask decoder's
upscaling replaced by their spatial mean (`_smooth_tiny_sam`). With random 2x2 kernels the low-res
logits carry a texture that repeats every 4 cells (one embedding cell) and neighbouring cells differ
as much as any two: every mask's box is the whole frame, so NMS keeps one mask per image, and the
stability counted on the low-res grid is far from the one counted after bilinear upsampling (0.15
higher on average at offset 0.05). A trained SAM's logits are much smoother. With the averaged
kernels the logits follow the coloured objects of the crafted scenes and low-res and full-res
measurements agree closely.

build_tiny_sam's prompt encoder and decoder are 32 channels wide (SAM's: 256; decoding 36 prompts
of one image took 1.3 s of CPU instead of 6.5 s); the thresholds below were chosen for it. Its logits
lie within about +-0.1 on these scenes, hence the small stability offset. SEED and the thresholds
(THRESHOLDS) were chosen, by a search over seeds and thresholds, so that every filter rejects
something and no decision sits near a threshold: test_decision_margins measures how far every
candidate is from them, at low resolution (this module's filters) and at full resolution (SAM's):
at least 0.055 in stability and 0.47 in box IoU with these settings.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.amg import build_point_grid
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.ops import batched_nms, box_iou

from linewatch.detector import sam_masks
from linewatch.detector.sam_masks import (
    BatchedMaskGenerator,
    MaskProposals,
    decode_masks,
    grid_points,
    low_res_boxes,
    mask_boxes,
    stability_scores,
    upsample_logits,
)
from linewatch.detector.segment import build_tiny_sam

SEED = 8
THRESHOLDS = dict(pred_iou_thresh=0.07, stability_score_thresh=0.68, stability_score_offset=0.005, box_nms_thresh=0.51)
GRID = 6  # points per side in the comparison with SAM
MARGIN = 0.05  # every stability / box-IoU decision is at least this far from its threshold
SMALL_GRID = 3  # points per side in the tests of batching and options


def _smooth_tiny_sam(seed: int) -> torch.nn.Module:
    sam = build_tiny_sam(seed).eval()
    for layer in sam.mask_decoder.output_upscaling:
        if isinstance(layer, torch.nn.ConvTranspose2d):
            layer.weight.data[:] = layer.weight.data.mean(dim=(2, 3), keepdim=True)
    return sam


def _scene(h: int, w: int, kind: str) -> np.ndarray:
    """uint8 (h, w, 3): flat-coloured objects on a plain background."""
    yy, xx = np.mgrid[:h, :w]
    if kind == "bright_on_dark":
        img = np.full((h, w, 3), 10, np.uint8)
        img[int(0.1 * h) : int(0.5 * h), int(0.1 * w) : int(0.6 * w)] = (250, 250, 250)
        img[int(0.6 * h) : int(0.9 * h), int(0.2 * w) : int(0.45 * w)] = (250, 60, 0)
        img[(yy - 0.6 * h) ** 2 + (xx - 0.75 * w) ** 2 < (0.2 * min(h, w)) ** 2] = (0, 200, 255)
    elif kind == "dark_on_light":
        img = np.full((h, w, 3), 230, np.uint8)
        img[int(0.2 * h) : int(0.8 * h), int(0.15 * w) : int(0.55 * w)] = (20, 20, 120)
        img[int(0.1 * h) : int(0.3 * h), int(0.7 * w) : int(0.9 * w)] = (200, 20, 20)
        img[int(0.6 * h) : int(0.85 * h), int(0.65 * w) : int(0.9 * w)] = (20, 150, 20)
    else:
        raise ValueError(kind)
    return img


def _grid(n: int, h: int, w: int) -> torch.Tensor:
    """(n*n, 2) float32 points in pixels, as SamAutomaticMaskGenerator places them."""
    return (grid_points(n) * torch.tensor([w, h], dtype=torch.float64)).float()


def _run(gen: BatchedMaskGenerator, images: list[np.ndarray], n: int, **kwargs) -> MaskProposals:
    h, w = images[0].shape[:2]
    frames = torch.from_numpy(np.stack(images))
    points = _grid(n, h, w)[None].expand(len(images), -1, -1).contiguous()
    return gen(frames, points, **kwargs)


def _mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bool (M, H, W), (N, H, W) -> (M, N) IoU."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    inter = a @ b.T
    return inter / (a.sum(1)[:, None] + b.sum(1)[None, :] - inter).clamp(min=1)


def _measure_like_sam(logits: torch.Tensor, frame_size: tuple[int, int], offset: float) -> tuple[torch.Tensor, ...]:
    """Stability (M,) and boxes (M, 4) of low-res logits (M, 256, 256) upsampled to a frame whose longer
    side is 1024 (where upsample_logits is SAM's postprocess_masks), in chunks to bound memory."""
    stability, boxes = [], []
    for chunk in logits.split(16):
        full = upsample_logits(chunk, frame_size, frame_size, 1024)
        stability.append(stability_scores(full, 0.0, offset))
        boxes.append(mask_boxes(full > 0.0).float())
    return torch.cat(stability), torch.cat(boxes)


def _greedy_match(iou: torch.Tensor) -> list[tuple[int, int, float]]:
    """Pairs (i, j, IoU) taking the largest remaining IoU first; each row and column used once."""
    iou = iou.clone()
    pairs = []
    for _ in range(min(iou.shape)):
        i, j = divmod(int(iou.argmax()), iou.shape[1])
        pairs.append((i, j, float(iou[i, j])))
        iou[i, :] = -1
        iou[:, j] = -1
    return pairs


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sam() -> torch.nn.Module:
    return _smooth_tiny_sam(SEED)


@pytest.fixture(scope="module")
def images() -> dict[str, np.ndarray]:
    return {
        "square": _scene(1024, 1024, "dark_on_light"),
        "wide": _scene(768, 1024, "dark_on_light"),  # longest side 1024: padded, not resized
        "square2": _scene(1024, 1024, "bright_on_dark"),
    }


@pytest.fixture(scope="module")
def sam_reference(sam, images) -> dict[str, list[dict]]:
    """SamAutomaticMaskGenerator's records for the two comparison images."""
    amg = SamAutomaticMaskGenerator(sam, points_per_side=GRID, crop_n_layers=0, output_mode="binary_mask", **THRESHOLDS)
    return {name: amg.generate(images[name]) for name in ("square", "wide")}


@pytest.fixture(scope="module")
def ours(sam, images) -> dict[str, tuple[MaskProposals, torch.Tensor, torch.Tensor]]:
    """Per comparison image: the generator's proposals (low-res filters, the default), and the decoder's
    low-res logits (N * 3, 256, 256) and predicted IoU (N * 3,) for every prompt, recorded on the way."""
    original_decode = sam_masks.decode_masks
    out = {}
    for name in ("square", "wide"):
        recorded: list[tuple[torch.Tensor, torch.Tensor]] = []

        def recording_decode(*args):
            logits, iou = original_decode(*args)
            recorded.append((logits.flatten(0, 1), iou.flatten(0, 1)))
            return logits, iou

        gen = BatchedMaskGenerator(sam, points_per_batch=20, **THRESHOLDS)  # 36 prompts: two chunks
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sam_masks, "decode_masks", recording_decode)
            proposals = _run(gen, [images[name]], GRID)
        out[name] = (proposals, torch.cat([r[0] for r in recorded]), torch.cat([r[1] for r in recorded]))
    return out


@pytest.fixture(scope="module")
def small_batch(sam, images) -> dict[str, MaskProposals]:
    """3x3 prompts: "pair" = square and square2 in one batch (encoded one frame at a time, decoded in
    chunks of 3 prompts per frame, 6 per decoder call); "square" / "square2" = each alone (chunks of 6, the
    last one padded)."""
    gen = BatchedMaskGenerator(sam, points_per_batch=6, **THRESHOLDS)
    pair_gen = BatchedMaskGenerator(sam, points_per_batch=6, encoder_batch=1, **THRESHOLDS)
    return {
        "pair": _run(pair_gen, [images["square"], images["square2"]], SMALL_GRID),
        "square": _run(gen, [images["square"]], SMALL_GRID),
        "square2": _run(gen, [images["square2"]], SMALL_GRID),
    }


# ----------------------------------------------------------------------------- pieces


def test_grid_points_equal_build_point_grid() -> None:
    for n in (1, 2, 8, 32):
        assert torch.equal(grid_points(n), torch.from_numpy(build_point_grid(n)))


def test_decode_masks_equals_mask_decoder() -> None:
    sam = build_tiny_sam(0).eval()  # the unmodified random model
    gen = BatchedMaskGenerator(sam)
    torch.manual_seed(1)
    embeddings = torch.randn(2, sam.prompt_encoder.embed_dim, *sam.prompt_encoder.image_embedding_size)
    points = torch.rand(7, 2, dtype=torch.float64) * 1024
    image_index = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    with torch.inference_mode():
        sparse, dense = gen.encode_points(points)
        image_pe = sam.prompt_encoder.get_dense_pe()
        logits, iou = decode_masks(sam.mask_decoder, embeddings, image_pe, image_index, sparse, dense)
        assert logits.shape == (7, 3, 256, 256) and iou.shape == (7, 3)
        for b in (0, 1):
            mine = image_index == b
            ref_logits, ref_iou = sam.mask_decoder(
                image_embeddings=embeddings[b : b + 1],
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse[mine],
                dense_prompt_embeddings=dense[mine],
                multimask_output=True,
            )
            torch.testing.assert_close(logits[mine], ref_logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(iou[mine], ref_iou, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "input_size, output_size",
    [((1024, 1024), (1024, 1024)), ((768, 1024), (768, 1024)), ((1024, 683), (1024, 683))],
)
def test_upsample_logits_equals_postprocess_masks_at_input_size(input_size, output_size) -> None:
    sam = build_tiny_sam(0)
    torch.manual_seed(2)
    logits = torch.randn(3, 256, 256)  # white noise: the hardest case for interpolation
    ref = sam.postprocess_masks(logits[:, None], input_size, output_size)[:, 0]
    torch.testing.assert_close(upsample_logits(logits, input_size, output_size, 1024), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "input_size, output_size", [((768, 1024), (600, 800)), ((1024, 1024), (512, 512)), ((1024, 768), (1300, 975))]
)
def test_upsample_logits_close_to_postprocess_masks_when_resizing(input_size, output_size) -> None:
    """One bilinear step instead of SAM's two: same pixel centres, values differ by a fraction of a
    logit step near the low-res samples. Smooth logits (upsampled from 32 x 32) as a trained SAM gives."""
    sam = build_tiny_sam(0)
    torch.manual_seed(3)
    logits = F.interpolate(torch.randn(4, 1, 32, 32), size=(256, 256), mode="bicubic", align_corners=False)[:, 0]
    ref = sam.postprocess_masks(logits[:, None], input_size, output_size)[:, 0]
    mine = upsample_logits(logits, input_size, output_size, 1024)
    assert mine.shape == ref.shape
    assert (mine - ref).abs().max() < 0.02 * logits.abs().max()
    iou = _mask_iou(mine > 0, ref > 0).diagonal()
    assert (iou > 0.995).all(), iou


def test_low_res_boxes_scale_cells_to_frame_pixels() -> None:
    above = torch.zeros(3, 192, 256, dtype=torch.bool)
    above[0, 10:20, 30:41] = True  # cells x 30..40, y 10..19
    above[1, 190:, 250:] = True  # up to the last (partly valid) cells
    # frame 600 x 800 resized to 768 x 1024: 4 * 800 / 1024 = 3.125 frame pixels per cell
    boxes = low_res_boxes(above, 3.125, 3.125, (600, 800))
    assert boxes[0].tolist() == [30 * 3.125, 10 * 3.125, 41 * 3.125 - 1, 20 * 3.125 - 1]
    assert boxes[1].tolist() == [250 * 3.125, 190 * 3.125, 799, 599]  # clamped to the frame
    assert boxes[2].tolist() == [0, 0, 0, 0]  # empty, as amg.batched_mask_to_box


def test_preprocess_matches_sam(sam) -> None:
    gen = BatchedMaskGenerator(sam)
    rng = np.random.default_rng(0)
    for h, w in ((1024, 1024), (768, 1024), (600, 800)):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image[: h // 2] = (40, 90, 200)  # half flat, half noise
        resized = torch.as_tensor(ResizeLongestSide(1024).apply_image(image)).permute(2, 0, 1)
        ref = sam.preprocess(resized[None])
        mine = gen.preprocess(torch.from_numpy(image)[None])
        grey_levels = ((mine - ref) * sam.pixel_std).abs().max().item()
        if (h, w) == resized.shape[1:]:
            assert grey_levels < 1e-3  # no resize: identical
        else:
            assert grey_levels <= 1.0 + 1e-3  # PIL's fixed-point resize vs torch's float one


# ----------------------------------------------------------------------------- against SAM


@pytest.mark.parametrize("name", ["square", "wide"])
def test_matches_sam_automatic_mask_generator(name, images, sam_reference, ours) -> None:
    records = sam_reference[name]
    proposals, _, _ = ours[name]
    h, w = images[name].shape[:2]
    masks = proposals.masks[0]
    assert len(proposals.masks) == 1 and masks.dtype == torch.bool and masks.shape[1:] == (h, w)
    assert 2 <= len(records) == len(masks)

    theirs = torch.from_numpy(np.stack([r["segmentation"] for r in records]))
    pairs = _greedy_match(_mask_iou(masks, theirs))
    their_boxes = torch.tensor([[x, y, x + bw, y + bh] for x, y, bw, bh in (r["bbox"] for r in records)])
    for i, j, iou in pairs:
        assert iou >= 0.99, (i, j, iou)
        assert abs(proposals.scores[0][i].item() - records[j]["predicted_iou"]) < 1e-4
        assert proposals.points[0][i].tolist() == pytest.approx(records[j]["point_coords"][0])
        # low-res boxes know each edge to about one cell (4 pixels here)
        assert (proposals.boxes[0][i] - their_boxes[j]).abs().max() <= 4
    # stability is measured at low resolution: it can differ from SAM's (test_decision_margins), but it passed the filter
    assert (proposals.stability[0] >= THRESHOLDS["stability_score_thresh"]).all()
    # same order as SAM: predicted IoU, descending
    assert [j for i, j, _ in sorted(pairs)] == list(range(len(records)))
    assert (proposals.scores[0].diff() <= 0).all()


@pytest.mark.parametrize("name", ["square", "wide"])
def test_decision_margins(name, images, ours) -> None:
    """Why the counts above agree: for every candidate (prompt x mask) the stability score measured on
    the low-res logits (this module) and on the logits upsampled to the frame (SAM) lie on the same side
    of stability_score_thresh, at least MARGIN away; so do the box IoUs of every pair of stability
    survivors, for low-res and full-res boxes, with respect to box_nms_thresh. Both filters reject some."""
    proposals, logits, iou = ours[name]
    h, w = images[name].shape[:2]
    t, offset = 0.0, THRESHOLDS["stability_score_offset"]
    candidates = (iou > THRESHOLDS["pred_iou_thresh"]).nonzero().squeeze(1)
    assert 0 < len(candidates) < len(iou)
    low = logits[candidates][:, : -(-h // 4), : -(-w // 4)]
    stability_low = stability_scores(low, t, offset)
    stability_full, boxes_full = _measure_like_sam(logits[candidates], (h, w), offset)
    for stability in (stability_low, stability_full):
        assert (stability - THRESHOLDS["stability_score_thresh"]).abs().min() >= MARGIN
    stable_low = stability_low >= THRESHOLDS["stability_score_thresh"]
    assert torch.equal(stable_low, stability_full >= THRESHOLDS["stability_score_thresh"])
    stable = stable_low.nonzero().squeeze(1)
    assert 1 < len(stable) < len(candidates)

    boxes_low = low_res_boxes(low[stable] > t, 4.0, 4.0, (h, w))
    boxes_full = boxes_full[stable]
    off_diagonal = ~torch.eye(len(stable), dtype=torch.bool)
    for boxes in (boxes_low, boxes_full):
        pair_iou = box_iou(boxes, boxes)[off_diagonal]
        assert (pair_iou - THRESHOLDS["box_nms_thresh"]).abs().min() >= MARGIN
    scores = iou[candidates][stable]
    kept = [
        batched_nms(boxes, scores, torch.zeros_like(scores, dtype=torch.long), THRESHOLDS["box_nms_thresh"])
        for boxes in (boxes_low, boxes_full)
    ]
    assert torch.equal(kept[0], kept[1]) and 1 < len(kept[0]) < len(stable)
    assert len(kept[0]) == len(proposals.masks[0])


def test_full_res_filters_match_sam_where_low_res_ones_do_not(sam, images) -> None:
    """filter_at_full_res measures stability and boxes as SAM does, so it decides as SAM does even at
    a stability threshold that cuts through a cluster of candidates (0.059, 0.063 and 0.066 at full
    resolution; 0.066 to 0.070 at low resolution), where the default filter keeps one more mask."""
    image = images["wide"]
    thresholds = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0645, stability_score_offset=0.005, box_nms_thresh=0.9)
    amg = SamAutomaticMaskGenerator(
        sam, points_per_side=SMALL_GRID, crop_n_layers=0, output_mode="binary_mask", **thresholds
    )
    records = amg.generate(image)
    proposals = _run(BatchedMaskGenerator(sam, filter_at_full_res=True, **thresholds), [image], SMALL_GRID)
    masks = proposals.masks[0]
    assert 2 <= len(records) == len(masks)
    theirs = torch.from_numpy(np.stack([r["segmentation"] for r in records]))
    for k, record in enumerate(records):  # same order, same everything
        assert _mask_iou(masks[k : k + 1], theirs[k : k + 1]).item() >= 0.999
        assert abs(proposals.scores[0][k].item() - record["predicted_iou"]) < 1e-4
        assert abs(proposals.stability[0][k].item() - record["stability_score"]) < 1e-4
        x, y, bw, bh = record["bbox"]
        assert proposals.boxes[0][k].tolist() == [x, y, x + bw, y + bh]
    # the premise: here the low-res filter does decide differently
    low_res = _run(BatchedMaskGenerator(sam, **thresholds), [image], SMALL_GRID)
    assert len(low_res.masks[0]) == len(records) + 1


# ----------------------------------------------------------------------------- batching and options


def test_batch_of_two_equals_each_alone(small_batch) -> None:
    pair = small_batch["pair"]
    assert len(pair.masks) == 2
    for b, name in enumerate(("square", "square2")):
        alone = small_batch[name]
        assert len(alone.masks[0]) >= 1 and pair.masks[b].shape == alone.masks[0].shape
        assert _mask_iou(pair.masks[b], alone.masks[0]).diagonal().min() > 0.999
        for field in ("scores", "stability", "boxes", "points"):
            torch.testing.assert_close(getattr(pair, field)[b], getattr(alone, field)[0], atol=1e-4, rtol=1e-4)


def test_smaller_output_size_equals_full_masks_resized(sam, images, small_batch) -> None:
    full = small_batch["square"].masks[0]
    small = _run(BatchedMaskGenerator(sam, **THRESHOLDS), [images["square"]], SMALL_GRID, output_size=(256, 320))
    assert small.masks[0].shape == (len(full), 256, 320) and small.masks[0].dtype == torch.bool
    resized = F.interpolate(full[:, None].float(), size=(256, 320), mode="area")[:, 0] > 0.5
    assert _mask_iou(small.masks[0], resized).diagonal().min() >= 0.98
    torch.testing.assert_close(small.scores[0], small_batch["square"].scores[0])
    torch.testing.assert_close(small.boxes[0], small_batch["square"].boxes[0])  # input pixels, whatever the output


def test_invalid_points_are_ignored(sam, images, small_batch) -> None:
    """Padding points (anywhere, even outside the frame) marked invalid change nothing."""
    grid = _grid(SMALL_GRID, 1024, 1024)  # 9 points
    junk = torch.tensor([[5.0, 5.0], [512.0, 512.0], [-50.0, 2000.0]])
    points = torch.stack([torch.cat([junk[:2], grid, junk[2:]]), torch.cat([grid, junk])])  # (2, 12, 2)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[0, [0, 1, 11]] = False
    valid[1, 9:] = False
    frames = torch.from_numpy(np.stack([images["square"], images["square2"]]))
    padded = BatchedMaskGenerator(sam, points_per_batch=6, **THRESHOLDS)(frames, points, valid)
    pair = small_batch["pair"]
    for b in (0, 1):
        assert torch.equal(padded.points[b], pair.points[b])
        torch.testing.assert_close(padded.scores[b], pair.scores[b])
        assert _mask_iou(padded.masks[b], pair.masks[b]).diagonal().min() > 0.999


def test_empty_results_keep_their_shapes(sam, images) -> None:
    frames = torch.from_numpy(np.stack([images["square"], images["square2"]]))
    points = _grid(2, 1024, 1024)[None].expand(2, -1, -1)
    rejecting = BatchedMaskGenerator(sam, **dict(THRESHOLDS, pred_iou_thresh=0.99))
    none_valid = torch.zeros(2, 4, dtype=torch.bool)
    for result in (
        rejecting(frames, points, output_size=(100, 120)),
        BatchedMaskGenerator(sam, **THRESHOLDS)(frames, points, none_valid, output_size=(100, 120)),
    ):
        assert len(result.masks) == 2
        for b in (0, 1):
            assert result.masks[b].shape == (0, 100, 120) and result.masks[b].dtype == torch.bool
            assert result.scores[b].shape == (0,) and result.stability[b].shape == (0,)
            assert result.boxes[b].shape == (0, 4) and result.points[b].shape == (0, 2)


def test_rejects_bad_inputs(sam) -> None:
    gen = BatchedMaskGenerator(sam)
    frames = torch.zeros(1, 64, 64, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="frames"):
        gen(frames.float(), torch.zeros(1, 1, 2))
    with pytest.raises(ValueError, match="points"):
        gen(frames, torch.zeros(2, 1, 2))
    with pytest.raises(ValueError, match="point_valid"):
        gen(frames, torch.zeros(1, 3, 2), torch.ones(1, 2, dtype=torch.bool))


# ----------------------------------------------------------------------------- on-device pieces


def test_embed_points_equals_the_prompt_encoder() -> None:
    """The torch.where rewrite gives the prompt encoder's numbers exactly, for every label kind."""
    sam = build_tiny_sam(0).eval()
    torch.manual_seed(4)
    points = torch.rand(5, 3, 2, dtype=torch.float64) * 1024
    labels = torch.tensor([[1, 0, -1], [1, 1, 1], [0, 0, 1], [-1, 1, 0], [1, -1, -1]], dtype=torch.int)
    with torch.inference_mode():
        ref_sparse, ref_dense = sam.prompt_encoder(points=(points, labels), boxes=None, masks=None)
        assert torch.equal(sam_masks.embed_points(sam.prompt_encoder, points, labels), ref_sparse)
        sparse, dense = BatchedMaskGenerator(sam).encode_points(points[:, 0])
        ones = torch.ones(5, 1, dtype=torch.int)
        assert torch.equal(sparse, sam.prompt_encoder(points=(points[:, :1], ones), boxes=None, masks=None)[0])
        assert torch.equal(dense, ref_dense)


def test_greedy_nms_by_hand() -> None:
    """A chain: 0 overlaps 1, 1 overlaps 2, 0 and 2 overlap less. IoU(0, 1) = IoU(1, 2) = 80 / 120,
    IoU(0, 2) = 60 / 140; box 3 overlaps none; box 4 (0's twin) is padding."""
    boxes = torch.tensor([[[0.0, 0, 10, 10], [2, 0, 12, 10], [4, 0, 14, 10], [20, 20, 30, 30], [0, 0, 10, 10]]])
    valid = torch.tensor([[True, True, True, True, False]])
    assert sam_masks.greedy_nms(boxes, valid, 0.7)[0].tolist() == [True, True, True, True, False]
    # 1 goes (0.667 > 0.5); 2 stays: only the suppressed 1 overlapped it that much (greedy, not pairwise)
    assert sam_masks.greedy_nms(boxes, valid, 0.5)[0].tolist() == [True, False, True, True, False]
    assert sam_masks.greedy_nms(boxes, valid, 0.4)[0].tolist() == [True, False, False, True, False]
    assert torch.allclose(sam_masks.box_overlaps(boxes[0, :3]), torch.tensor(
        [[1.0, 2 / 3, 3 / 7], [2 / 3, 1.0, 2 / 3], [3 / 7, 2 / 3, 1.0]]))


@pytest.mark.parametrize("seed", range(6))
def test_greedy_nms_decides_as_torchvision_batched_nms(seed) -> None:
    """Random integer boxes (SAM's are pixel indices) with many score ties, identical and empty
    boxes, padding: the same survivors in the same order as batched_nms over the whole batch."""
    g = torch.Generator().manual_seed(seed)
    B, K = 4, 60
    xy = torch.randint(0, 40, (B, K, 2), generator=g).float()
    boxes = torch.cat([xy, xy + torch.randint(0, 20, (B, K, 2), generator=g).float()], dim=-1)
    boxes[:, 7] = boxes[:, 3]  # identical boxes, and (below) equal scores
    scores = torch.randint(0, 6, (B, K), generator=g).float() / 5
    scores[:, 7] = scores[:, 3]
    valid = torch.rand(B, K, generator=g) > 0.15
    rows = torch.arange(B)[:, None]
    image = rows.expand(B, K)
    for threshold in (0.0, 0.3, 0.5, 0.7, 0.9):
        ref = batched_nms(boxes[valid], scores[valid], image[valid], threshold)
        ref_index = torch.arange(B * K).view(B, K)[valid][ref]  # into the flattened (B, K)
        order = torch.sort(torch.where(valid, scores, -torch.inf), dim=1, descending=True, stable=True).indices
        keep = sam_masks.greedy_nms(boxes[rows, order], valid.gather(1, order), threshold)
        mine = (rows * K + order)[keep]  # image-major, each image in its score order
        for b in range(B):
            theirs = ref_index[ref_index // K == b]
            assert torch.equal(mine[mine // K == b], theirs), (threshold, b)
        assert 0 < keep.sum() < valid.sum() or threshold == 0.9


# ----------------------------------------------------------------------------- a larger comparison


def _small_side_sam(seed: int, depth: int = 3, side: int = 128, dim: int = 64) -> torch.nn.Module:
    """A random SAM whose encoder takes side x side (8 x 8 tokens at 128; windowed blocks then a global
    one), 64-channel prompt and decoder, the decoder's upscaling kernels averaged as in _smooth_tiny_sam
    and its hypernetwork outputs scaled up 30x, so that logits span about +-1.2 and masks, boxes and
    stability scores vary over the grid."""
    torch.manual_seed(seed)
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=depth, embed_dim=32, img_size=side, mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=2, patch_size=16, qkv_bias=True, use_rel_pos=True, global_attn_indexes=[depth - 1],
            window_size=4, out_chans=dim),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(side // 16, side // 16),
                                     input_image_size=(side, side), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=64,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=128, num_heads=4)),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    ).eval()
    for layer in sam.mask_decoder.output_upscaling:
        if isinstance(layer, torch.nn.ConvTranspose2d):
            layer.weight.data[:] = layer.weight.data.mean(dim=(2, 3), keepdim=True)
    for mlp in sam.mask_decoder.output_hypernetworks_mlps:
        mlp.layers[-1].weight.data *= 30
    return sam


def _random_scene(side: int, seed: int) -> np.ndarray:
    """uint8 (side, side, 3): five rectangles and discs of random colours on a random background."""
    rng = np.random.default_rng(seed)
    image = np.full((side, side, 3), rng.integers(0, 256, 3), np.uint8)
    yy, xx = np.mgrid[:side, :side]
    for _ in range(5):
        colour = rng.integers(0, 256, 3)
        if rng.random() < 0.5:
            y0, x0 = rng.integers(0, side - 20, 2)
            image[y0 : y0 + rng.integers(10, 60), x0 : x0 + rng.integers(10, 60)] = colour
        else:
            cy, cx, r = rng.integers(0, side), rng.integers(0, side), rng.integers(8, 30)
            image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = colour
    return image


@pytest.mark.slow
def test_decisions_equal_sam_on_a_16x16_grid_over_a_batch_of_4() -> None:
    """A 3-block encoder (two windowed, one global), 16 x 16 prompts on each of 4 random scenes decoded
    as one batch (chunks of 16 prompts per image), filter_at_full_res; thresholds in the thick of the
    scores: at least 1 % of the 3072 candidates lie within 0.02 of the IoU threshold, and of the stability one.
    fp32 decisions: at least 99 % of the masks on either side are the same mask (same prompt, same
    predicted IoU, mask IoU >= 0.99), and the order within each image is SAM's."""
    side, grid = 128, 16
    thresholds = dict(pred_iou_thresh=0.1, stability_score_thresh=0.6, stability_score_offset=0.05,
                      box_nms_thresh=0.9)
    sam = _small_side_sam(0)
    images = [_random_scene(side, seed) for seed in range(4)]
    recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
    original_decode = sam_masks.decode_masks

    def recording_decode(*args):
        logits, iou = original_decode(*args)
        recorded.append((logits.flatten(0, 1), iou.flatten(0, 1)))
        return logits, iou

    gen = BatchedMaskGenerator(sam, points_per_batch=64, filter_at_full_res=True, **thresholds)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sam_masks, "decode_masks", recording_decode)
        ours = _run(gen, images, grid)

    logits, iou = torch.cat([r[0] for r in recorded]), torch.cat([r[1] for r in recorded])
    stability = stability_scores(upsample_logits(logits, (side, side), (side, side), side), 0.0,
                                 thresholds["stability_score_offset"])
    near_iou = ((iou - thresholds["pred_iou_thresh"]).abs() < 0.02).float().mean()
    near_stability = ((stability - thresholds["stability_score_thresh"]).abs() < 0.02).float().mean()
    assert near_iou >= 0.01 and near_stability >= 0.01, (near_iou, near_stability)

    amg = SamAutomaticMaskGenerator(sam, points_per_side=grid, points_per_batch=64, crop_n_layers=0,
                                    output_mode="binary_mask", **thresholds)
    matched = total = 0
    for b, image in enumerate(images):
        records = amg.generate(image)
        theirs = torch.from_numpy(np.stack([r["segmentation"] for r in records])) if records else \
            torch.zeros(0, side, side, dtype=torch.bool)
        pairs = []
        for i in range(len(ours.masks[b])):
            for j, record in enumerate(records):
                same_prompt = ours.points[b][i].tolist() == pytest.approx(record["point_coords"][0])
                if same_prompt and abs(ours.scores[b][i].item() - record["predicted_iou"]) < 1e-5:
                    if _mask_iou(ours.masks[b][i : i + 1], theirs[j : j + 1]).item() >= 0.99:
                        pairs.append((i, j))
                        break
        matched += len(pairs)
        total += max(len(records), len(ours.masks[b]))
        assert [j for _, j in pairs] == sorted(j for _, j in pairs)  # SAM's order
    assert total >= 10, (matched, total)
    assert matched >= 0.99 * total, (matched, total)
