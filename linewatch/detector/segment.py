"""Object masks (paper section 3.4.2): a segmenter turns images into per-image object masks,
then a per-product area filter keeps the key objects.

Every segmenter is a `Segmenter` (the Protocol below):
  segmenter.segment(images01 (B, 3, S, S) float RGB, or (B, 1, S, S) grey, in [0, 1], frames=None,
  seeds=None) -> ObjectMasks:
  bool masks (B, M, S, S) at the working size and their validity (B, M), each image's objects
  first, sorted by area descending, after the AreaFilter (the Inspector's form: M is fixed by
  the settings, not by the data, so nothing is read back from the device);
  segmenter(images01, frames=None, seeds=None) -> the same as a list of B bool tensors (M_b, S, S);
and declares what it needs and offers, which the Inspector and `build_models` read as they are:
  `wants_frames`: the segmenter reads the camera frames, uint8 (B, H, W, 3) on the device;
  `wants_seeds`: it takes prompt points inside the reference parts, (B, Q, 2) in [0, 1] + validity;
  `compile_encoder()`: torch.compile what is worth compiling (detector.compile; may do nothing);
  `identity`: every setting that changes the masks, recorded in the bank.
Their settings come from the config (`linewatch.config`), the only place their defaults live.

- SamSegmenter: SAM automatic masks on the camera frame (the paper's choice), by our batched
  generator (linewatch.detector.sam_masks) or segment-anything's own.
- ClassicSegmenter: weights-free; a colour model of the background fitted on good images
  (of the grey level, for a mono bank), foreground = colour far from it, then connected
  components. It suits plain trays and
  backlit stages (and the synthetic line in linewatch.sim); it cannot separate touching parts
  of one colour, which SAM can.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from linewatch.detector.backbone import three_channels
from linewatch.detector.weights import WeightsError, read_state_dict

if TYPE_CHECKING:
    from linewatch.config import ObjectFilterConfig, SamConfig


@dataclass
class ObjectMasks:
    """Each image's object masks, padded to M: masks bool (B, M, S, S), valid bool (B, M); the valid
    entries of a row come first, padding masks are empty."""

    masks: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def from_list(cls, masks: list[torch.Tensor], size: tuple[int, int]) -> "ObjectMasks":
        """Per-image bool masks (M_b, S, S) -> padded to M = max(M_b, 1), on the first one's device."""
        device = masks[0].device if masks else torch.device("cpu")
        m = max([int(x.shape[0]) for x in masks] + [1])
        padded = torch.zeros(len(masks), m, *size, dtype=torch.bool, device=device)
        valid = torch.zeros(len(masks), m, dtype=torch.bool, device=device)
        for i, mask in enumerate(masks):
            padded[i, : mask.shape[0]] = mask
            valid[i, : mask.shape[0]] = True
        return cls(padded, valid)

    def per_image(self) -> list[torch.Tensor]:
        """B bool tensors (M_b, S, S): the valid masks of each image (one host sync: the counts)."""
        return [masks[:n] for masks, n in zip(self.masks, self.valid.sum(1).tolist())]

    def to(self, device: torch.device) -> "ObjectMasks":
        return ObjectMasks(self.masks.to(device), self.valid.to(device))


class SegmenterError(Exception):
    """A segmenter could not be built (unknown kind, bad state) or used (not fitted).
    Checkpoint problems raise linewatch.detector.weights.WeightsError instead."""


@runtime_checkable
class Segmenter(Protocol):
    """What the detector needs of a segmenter (the module docstring has the contract)."""

    wants_frames: bool  # reads the camera frames, uint8 (B, H, W, 3) on the device
    wants_seeds: bool  # takes prompt points inside the reference parts

    @property
    def identity(self) -> str: ...

    def __call__(self, images01: torch.Tensor, frames: torch.Tensor | None = None,
                 seeds: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[torch.Tensor]: ...

    def segment(self, images01: torch.Tensor, frames: torch.Tensor | None = None,
                seeds: tuple[torch.Tensor, torch.Tensor] | None = None) -> ObjectMasks: ...

    def compile_encoder(self) -> None: ...


@dataclass
class AreaFilter:
    """Keeps objects whose area, as a fraction of the image area, lies in [min_area, max_area];
    at most `max_objects` of them, the largest first. Fractions keep one config valid at any
    input resolution."""

    min_area: float
    max_area: float
    max_objects: int

    @classmethod
    def from_config(cls, objects: "ObjectFilterConfig") -> "AreaFilter":
        """The filter of `detector.objects`."""
        return cls(min_area=objects.min_area, max_area=objects.max_area, max_objects=objects.max_objects)

    def select(self, areas: np.ndarray | torch.Tensor, image_area: int) -> list[int]:
        """Indices of the kept objects, largest first (ties keep input order).

        areas: (M,) pixel counts; image_area: H * W.
        """
        a = np.asarray(torch.as_tensor(areas).cpu(), dtype=np.float64).reshape(-1) / float(image_area)
        keep = np.nonzero((a >= self.min_area) & (a <= self.max_area))[0]
        order = keep[np.argsort(-a[keep], kind="stable")]
        return [int(i) for i in order[: self.max_objects]]

    def select_padded(self, areas: torch.Tensor, valid: torch.Tensor, image_area: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`select` on every row at once, on the device, without a host sync.

        areas: (B, K) pixel counts; valid: bool (B, K) the real objects. -> indices (B, N) into K
        and their validity (B, N), N = min(K, max_objects): row b's kept objects first, largest first
        (ties keep input order), as `select` orders them, then padding."""
        fraction = areas.double() / float(image_area)
        keep = valid & (fraction >= self.min_area) & (fraction <= self.max_area)
        order = torch.sort(torch.where(keep, fraction, -1.0), dim=1, descending=True, stable=True).indices
        order = order[:, : self.max_objects]
        return order, keep.gather(1, order)

    def apply(self, masks: torch.Tensor) -> torch.Tensor:
        """masks: bool (M, H, W) -> bool (M', H, W), filtered and sorted by area descending."""
        if masks.ndim != 3:
            raise ValueError(f"masks must be (M, H, W), got {tuple(masks.shape)}")
        areas = masks.flatten(1).sum(1)
        idx = self.select(areas, masks.shape[1] * masks.shape[2])
        return masks[idx].bool()

    @property
    def identity(self) -> str:
        return f"area[{self.min_area:g},{self.max_area:g}]x{self.max_objects}"


def interior_points(masks: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """The most interior cell of each mask, as (x, y) in [0, 1] image coordinates (cell centres).

    masks: (..., H, W) soft or bool masks -> (..., 2). "Most interior" is the cell that survives
    the most 3x3 erosions (a chessboard distance transform), ties to the one nearest the mask's
    centroid, so a ring or a C-shaped part gets a point on the part, not at its centroid. An empty
    mask gives (0.5, 0.5); callers mark those points invalid themselves.
    """
    h, w = masks.shape[-2:]
    lead = masks.shape[:-2]
    inside = (masks.reshape(-1, 1, h, w).float() > threshold).float()
    depth = torch.zeros_like(inside)
    eroded = inside
    for _ in range((min(h, w) + 1) // 2):
        depth = depth + eroded
        eroded = -F.max_pool2d(-F.pad(eroded, (1, 1, 1, 1)), 3, stride=1)  # erosion; outside the map is outside
        eroded = eroded * inside
    ys = torch.arange(h, dtype=torch.float32, device=masks.device).view(1, 1, h, 1)
    xs = torch.arange(w, dtype=torch.float32, device=masks.device).view(1, 1, 1, w)
    mass = inside.sum((2, 3), keepdim=True).clamp_min(1)
    cy, cx = (inside * ys).sum((2, 3), keepdim=True) / mass, (inside * xs).sum((2, 3), keepdim=True) / mass
    distance = ((ys - cy) ** 2 + (xs - cx) ** 2).sqrt() / (h + w)  # < 0.5: never outweighs one erosion
    best = torch.where(inside > 0, depth - distance, torch.full_like(depth, -1.0)).flatten(1).argmax(1)
    xy = torch.stack([(best % w).float() + 0.5, (best // w).float() + 0.5], dim=-1) / torch.tensor(
        [w, h], dtype=torch.float32, device=masks.device)
    empty = inside.flatten(1).amax(1) == 0
    xy = torch.where(empty[:, None], torch.full_like(xy, 0.5), xy)
    return xy.view(*lead, 2)


def _check_batch(images01: torch.Tensor) -> None:
    if images01.ndim != 4 or images01.shape[1] not in (1, 3):
        raise ValueError(f"images01 must be (B, 3, H, W) RGB or (B, 1, H, W) grey, got {tuple(images01.shape)}")


# --------------------------------------------------------------------------------------
# SAM
# --------------------------------------------------------------------------------------


PROMPT_STRATEGIES = ("full_grid", "coarse_grid", "reference_seeded")


class SamSegmenter:
    """SAM automatic masks on the camera frame, followed by the AreaFilter.

    generator "batched" (default): linewatch.detector.sam_masks.BatchedMaskGenerator, one image
    encoder call per batch of frames and the prompts of every frame decoded together, on the
    device; masks come straight out at the working size. "segment_anything": the package's own
    SamAutomaticMaskGenerator, one frame at a time (for comparison; slow).
    prompts: "full_grid" (points_per_side^2, the paper's), "coarse_grid"
    (coarse_points_per_side^2), "reference_seeded" (one point inside each part of the k
    reference images, from the bank, plus the coarse grid so parts the references lack are still
    found; without seeds, as when the bank's own good images are segmented, the full grid; the
    segment_anything generator supports only the grids).
    Areas for the filter are fractions of the image, measured on the working-size masks.
    """

    wants_frames = True  # segments the camera frame itself (longest side 1024 inside SAM)

    def __init__(self, sam_model: torch.nn.Module, area_filter: AreaFilter, settings: "SamConfig",
                 model_name: str = "sam") -> None:
        """settings: `detector.samlad.sam` (its kind and checkpoint are the model's business)."""
        generator, prompts = settings.generator, settings.prompts
        points_per_side, coarse_points_per_side = settings.points_per_side, settings.coarse_points_per_side
        points_per_batch = settings.points_per_batch
        pred_iou_thresh, stability_score_thresh = settings.pred_iou_thresh, settings.stability_score_thresh
        box_nms_thresh = settings.box_nms_thresh
        if generator not in ("batched", "segment_anything"):
            raise SegmenterError(f"unknown SAM generator {generator!r}; known: batched, segment_anything")
        if prompts not in PROMPT_STRATEGIES:
            raise SegmenterError(f"unknown SAM prompt strategy {prompts!r}; known: {PROMPT_STRATEGIES}")
        if generator == "segment_anything" and prompts == "reference_seeded":
            raise SegmenterError("the segment_anything generator takes grid prompts only; use generator: batched")
        self.sam = sam_model
        self.area_filter = area_filter
        self.model_name = model_name
        self.generator_kind = generator
        self.prompts = prompts
        self.points_per_side = points_per_side if prompts == "full_grid" else coarse_points_per_side
        self.params = dict(
            points_per_side=points_per_side,
            points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            box_nms_thresh=box_nms_thresh,
            generator=generator,
            prompts=prompts,
            coarse_points_per_side=coarse_points_per_side,
        )
        thresholds = dict(pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh,
                          box_nms_thresh=box_nms_thresh)
        if generator == "batched":
            from linewatch.detector.sam_masks import BatchedMaskGenerator, grid_points

            self.generator = BatchedMaskGenerator(sam_model, points_per_batch=points_per_batch, **thresholds)
            self.full_grid = grid_points(points_per_side).float()  # (G, 2) in [0, 1]
            self.grid = grid_points(self.points_per_side).float()
        else:
            from segment_anything import SamAutomaticMaskGenerator

            self.generator = SamAutomaticMaskGenerator(sam_model, points_per_side=self.points_per_side,
                                                       points_per_batch=points_per_batch, output_mode="binary_mask",
                                                       **thresholds)

    @property
    def wants_seeds(self) -> bool:
        return self.prompts == "reference_seeded"

    @property
    def identity(self) -> str:
        """Model kind plus every parameter that changes the masks."""
        p = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"sam:{self.model_name}:{p}:{self.area_filter.identity}"

    def compile_encoder(self) -> None:
        """torch.compile SAM's image encoder (detector.compile); the first batches pay for it."""
        self.sam.image_encoder = torch.compile(self.sam.image_encoder)

    def __call__(self, images01: torch.Tensor, frames: torch.Tensor | None = None,
                 seeds: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """`segment` as B bool tensors (M_b, S, S) on the frames' device (one host sync for the counts)."""
        return self.segment(images01, frames, seeds).per_image()

    @torch.inference_mode()
    def segment(self, images01: torch.Tensor, frames: torch.Tensor | None = None,
                seeds: tuple[torch.Tensor, torch.Tensor] | None = None) -> ObjectMasks:
        """images01: float (B, 3, S, S) working images; frames: uint8 (B, H, W, 3) the camera
        frames (None: the working images are segmented instead); seeds: points (B, Q, 2) in
        [0, 1] and their validity (B, Q), for reference-seeded prompts.
        -> masks (B, M, S, S) on the frames' device, sorted by area descending after the area
        filter, M = min(max_objects, the generator's candidate slots). The batched generator reads
        nothing back from the device; the segment_anything one works on the host."""
        _check_batch(images01)
        _, _, S, S2 = images01.shape
        if frames is None:  # SAM was trained on RGB: a grey image as three equal channels
            frames = (three_channels(images01).detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)
            frames = frames.permute(0, 2, 3, 1)
        if self.generator_kind == "segment_anything":
            masks = [self._keep(self._segment_anything(frame, (S, S2))) for frame in frames]
            return ObjectMasks.from_list(masks, (S, S2))
        proposals = self._batched(frames, (S, S2), seeds)
        rows = torch.arange(frames.shape[0], device=frames.device)[:, None]
        order, valid = self.area_filter.select_padded(proposals.masks.flatten(2).sum(2), proposals.valid, S * S2)
        return ObjectMasks(proposals.masks[rows, order] & valid[..., None, None], valid)

    def _grids(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(the prompt grid, the full grid) on `device`, copied there once."""
        if self.grid.device != device:
            self.grid, self.full_grid = self.grid.to(device), self.full_grid.to(device)
        return self.grid, self.full_grid

    def _batched(self, frames: torch.Tensor, size: tuple[int, int], seeds):
        B, H, W, _ = frames.shape
        seeded = self.wants_seeds and seeds is not None
        grid, full_grid = self._grids(frames.device)
        grid = grid if seeded or not self.wants_seeds else full_grid  # no references yet: the full grid
        points = grid[None].expand(B, -1, -1)
        valid = torch.ones(points.shape[:2], dtype=torch.bool, device=frames.device)
        if seeded:
            seed_points, seed_valid = seeds
            points = torch.cat([seed_points.to(frames.device).float(), points], dim=1)
            valid = torch.cat([seed_valid.to(frames.device), valid], dim=1)
        pixels = torch.stack([points[..., 0] * W, points[..., 1] * H], dim=-1)  # no host-made [W, H] tensor
        return self.generator.padded(frames, pixels, valid, output_size=size)

    def _segment_anything(self, frame: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        with torch.autocast(device_type=frame.device.type, enabled=False):  # it hands its tensors to numpy: fp32 only
            records = self.generator.generate(np.ascontiguousarray(frame.cpu().numpy()))
        if not records:
            return torch.zeros((0, *size), dtype=torch.bool, device=frame.device)
        masks = torch.from_numpy(np.stack([r["segmentation"] for r in records])).to(frame.device)
        return F.interpolate(masks[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0] > 0.5

    def _keep(self, masks: torch.Tensor) -> torch.Tensor:
        """The area filter on masks at the working size (one host sync for the kept indices)."""
        if masks.shape[0] == 0:
            return masks
        idx = self.area_filter.select(masks.flatten(1).sum(1), masks.shape[1] * masks.shape[2])
        return masks[idx]


SAM_KINDS = ("vit_b", "vit_l", "vit_h")


def load_sam_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Load a SAM state dict into `model`, strictly: every model key present, no extra key,
    matching shapes. The file is read with torch.load(weights_only=True) (segment-anything's own
    loader unpickles arbitrary objects).

    Raises:
        WeightsError: the file is absent or unreadable, or does not fit the model; the message
        names the file and the missing / unexpected keys.
    """
    checkpoint = Path(checkpoint)
    state = read_state_dict(checkpoint)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise WeightsError(
            f"SAM checkpoint {checkpoint} does not fit the model: "
            f"{len(missing)} missing keys {missing[:10]}, {len(unexpected)} unexpected keys {unexpected[:10]}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # shape mismatch, e.g. a vit_l file for a vit_b model
        raise WeightsError(f"SAM checkpoint {checkpoint} does not fit the model: {e}") from e


def build_sam_segmenter(
    settings: "SamConfig",
    checkpoint: Path | None,
    area_filter: AreaFilter,
    device: str | torch.device = "cpu",
) -> SamSegmenter:
    """Build SAM `settings.kind` ('vit_b' | 'vit_l' | 'vit_h') from the segment-anything registry,
    load `checkpoint` (the resolved file of `settings.checkpoint`) safely (None: random weights,
    for tests only), give its image encoder linewatch.detector.sam_attention's SdpaAttention, move
    it to `device`, and wrap it with the rest of `settings`.

    Raises:
        SegmenterError: unknown kind.  WeightsError: checkpoint absent, unreadable or unfit.
    """
    kind = settings.kind
    if kind not in SAM_KINDS:
        raise SegmenterError(f"unknown SAM kind {kind!r}; known: {SAM_KINDS}")
    from segment_anything import sam_model_registry

    if checkpoint is not None and not Path(checkpoint).is_file():  # fail before building the model
        raise WeightsError(f"SAM checkpoint {checkpoint} does not exist")
    model = sam_model_registry[kind](checkpoint=None)
    name = kind
    if checkpoint is not None:
        load_sam_weights(model, Path(checkpoint))
        name = f"{kind}@{Path(checkpoint).name}"
    from linewatch.detector.sam_attention import use_sdpa_attention

    use_sdpa_attention(model.image_encoder)  # the same function, one fused attention call per block
    model.to(device).eval()
    return SamSegmenter(model, area_filter, settings, model_name=name)


def build_tiny_sam(seed: int = 0, dim: int = 32) -> torch.nn.Module:
    """A randomly initialised SAM with a 1-block, 32-channel encoder (input still 1024) and a
    `dim`-channel prompt encoder and mask decoder (SAM's: 256; its decoder's MLP and heads scaled
    down with it). For CPU tests of the plumbing only: its masks mean nothing."""
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    side, patch = 1024, 16
    torch.manual_seed(seed)
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=1, embed_dim=32, img_size=side, mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=1, patch_size=patch, qkv_bias=True, use_rel_pos=True, global_attn_indexes=[0],
            window_size=14, out_chans=dim),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(side // patch, side // patch),
                                     input_image_size=(side, side), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3, transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=dim,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=8 * dim, num_heads=max(1, dim // 32))),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


# --------------------------------------------------------------------------------------
# Classic (weights-free)
# --------------------------------------------------------------------------------------


CHI2_975 = {1: 5.024, 3: 9.348}  # chi-square 97.5 % quantiles, 1 and 3 degrees of freedom


class ClassicSegmenter:
    """Background colour model + connected components.

    fit: collect the pixels of a border band (`border_frac` of the side) of every good image
    (parts sit inside the frame on trays, conveyors and backlit stages), fit one Gaussian to
    their RGB colour (grey images: to their grey level, a Gaussian in one dimension), and refit
    `trim_iters` times on the pixels within the 97.5% chi-square ellipsoid (an interval, in one
    dimension) so that a part touching the border does not skew it. A floor `min_std` on the
    covariance keeps an almost noise-free background from making every shade a "part".

    call: Mahalanobis distance of each pixel's colour to the model; foreground above
    `threshold`; opening (drops noise specks) then closing (bridges thin threads, slots and
    scratches so one part stays one component); 8-connected components; AreaFilter.
    Kernel sizes are given for a 256-pixel image and scale with min(H, W). `threshold` is
    `detector.classic.background_threshold`; the other settings are not configurable.
    """

    wants_frames = False  # works on the working images
    wants_seeds = False

    def __init__(
        self,
        area_filter: AreaFilter,
        threshold: float,
        min_std: float = 0.02,
        border_frac: float = 0.06,
        open_px: int = 3,
        close_px: int = 5,
        trim_iters: int = 3,
        max_fit_pixels: int = 200_000,
    ) -> None:
        self.area_filter = area_filter
        self.threshold = float(threshold)
        self.min_std = float(min_std)
        self.border_frac = float(border_frac)
        self.open_px = int(open_px)
        self.close_px = int(close_px)
        self.trim_iters = int(trim_iters)
        self.max_fit_pixels = int(max_fit_pixels)
        self.mean: torch.Tensor | None = None  # (C,) float64, C = 3 (RGB) or 1 (grey)
        self.cov: torch.Tensor | None = None  # (C, C) float64, floor included

    @property
    def identity(self) -> str:
        return (
            f"classic:thr={self.threshold:g},min_std={self.min_std:g},border={self.border_frac:g},"
            f"open={self.open_px},close={self.close_px},trim={self.trim_iters}:{self.area_filter.identity}"
        )

    @property
    def fitted(self) -> bool:
        return self.mean is not None

    def fit(self, good_images01: torch.Tensor) -> "ClassicSegmenter":
        """good_images01: float (N, 3, H, W) RGB or (N, 1, H, W) grey in [0, 1], known-good
        images. Returns self."""
        _check_batch(good_images01)
        N, C, H, W = good_images01.shape
        b = max(1, int(round(self.border_frac * min(H, W))))
        band = torch.ones((H, W), dtype=torch.bool)
        band[b:H - b, b:W - b] = False
        px = good_images01.detach().double().cpu().permute(0, 2, 3, 1)[:, band].reshape(-1, C).numpy()
        if len(px) > self.max_fit_pixels:  # even stride: deterministic and covers all images
            px = px[np.linspace(0, len(px) - 1, self.max_fit_pixels).astype(np.int64)]
        chi2_975 = CHI2_975[C]
        keep = px
        floor = self.min_std**2 * np.eye(C)
        for _ in range(self.trim_iters + 1):
            mean = keep.mean(0)
            cov = np.cov(keep, rowvar=False).reshape(C, C) + floor
            d2 = self._mahalanobis2(px, mean, cov)
            keep = px[d2 <= chi2_975]
            if len(keep) < 10:
                raise SegmenterError("ClassicSegmenter.fit: the border pixels have no dominant colour")
        self.mean = torch.from_numpy(mean)
        self.cov = torch.from_numpy(cov)
        return self

    @staticmethod
    def _mahalanobis2(px: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
        """px (P, C), mean (C,), cov (C, C) -> squared Mahalanobis distances (P,)."""
        d = px - mean
        return np.einsum("pi,ij,pj->p", d, np.linalg.inv(cov), d)

    def foreground(self, image01: torch.Tensor) -> np.ndarray:
        """image01: float (C, H, W) -> bool (H, W) foreground after the morphological cleanup;
        C is the channels it was fitted on (3, or 1 for grey)."""
        if self.mean is None or self.cov is None:
            raise SegmenterError("ClassicSegmenter is not fitted: call fit(good_images) or load_state_dict")
        C, H, W = image01.shape
        if C != self.mean.shape[0]:
            raise SegmenterError(f"ClassicSegmenter was fitted on {self.mean.shape[0]}-channel images, given {C}")
        x = image01.detach().float().cpu().permute(1, 2, 0).reshape(-1, C).numpy()
        d = x - self.mean.numpy().astype(np.float32)
        inv = np.linalg.inv(self.cov.numpy()).astype(np.float32)
        d2 = np.einsum("pi,ij,pj->p", d, inv, d)
        fg = (d2 > self.threshold**2).reshape(H, W).astype(np.uint8)
        scale = min(H, W) / 256.0
        k_open = max(1, int(round(self.open_px * scale)))
        k_close = max(1, int(round(self.close_px * scale)))
        if k_open > 1:
            fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k_open, k_open)))
        if k_close > 1:
            fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k_close, k_close)))
        return fg.astype(bool)

    def compile_encoder(self) -> None:
        """Nothing to compile: no neural network."""

    def segment(self, images01: torch.Tensor, frames: torch.Tensor | None = None,
                seeds: tuple[torch.Tensor, torch.Tensor] | None = None) -> ObjectMasks:
        """`__call__`'s masks padded to the most objects of an image (at least 1)."""
        return ObjectMasks.from_list(self(images01, frames, seeds), tuple(images01.shape[-2:]))

    def __call__(self, images01: torch.Tensor, frames: torch.Tensor | None = None,
                 seeds: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """images01: float (B, C, H, W) in [0, 1], C as fitted -> B bool tensors (M_b, H, W), one mask per
        connected foreground component, sorted by area descending after the area filter.
        frames and seeds: unused (the contract of every segmenter)."""
        _check_batch(images01)
        _, _, H, W = images01.shape
        out = []
        for image in images01:
            fg = self.foreground(image)
            n, labels, stats, _ = cv2.connectedComponentsWithStats(fg.astype(np.uint8), connectivity=8)
            areas = stats[1:, cv2.CC_STAT_AREA]  # label 0 is the background
            idx = self.area_filter.select(areas, H * W)
            if idx:
                lab = torch.from_numpy(labels.astype(np.int64))
                ids = torch.tensor([i + 1 for i in idx], dtype=torch.int64)
                masks = lab[None] == ids[:, None, None]
            else:
                masks = torch.zeros((0, H, W), dtype=torch.bool)
            out.append(masks)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fitted background model as tensors: mean (C,), cov (C, C), float64 (C = 3, or 1 for grey)."""
        if self.mean is None or self.cov is None:
            raise SegmenterError("ClassicSegmenter is not fitted: nothing to save")
        return {"mean": self.mean.clone(), "cov": self.cov.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of state_dict; checks the keys and shapes (RGB or grey, mean and cov alike)."""
        c = tuple(state["mean"].shape)[0] if "mean" in state and state["mean"].ndim == 1 else 3
        c = c if c in (1, 3) else 3
        for key, shape in (("mean", (c,)), ("cov", (c, c))):
            if key not in state:
                raise SegmenterError(f"ClassicSegmenter state lacks {key!r} (has {sorted(state)})")
            if tuple(state[key].shape) != shape:
                got = tuple(state[key].shape)
                raise SegmenterError(f"ClassicSegmenter state {key!r} has shape {got}, want {shape}")
        self.mean = state["mean"].detach().double().cpu().clone()
        self.cov = state["cov"].detach().double().cpu().clone()
