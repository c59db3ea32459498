"""The Inspector composes the detector stages: a batch of images -> scores, maps, objects.

    preprocess  list of RGB uint8 (H, W, 3) -> images01 (B, 3, S, S)
    backbone    -> features (B, C, h, w)                                  (paper 3.2)
    retrieve    -> indices of the k nearest good images (B, k)            (3.3)
    upsample    -> upsampled features (B, C, H', W')                      (3.4.1)
    segment     -> object masks, per image (M_b, S, S)                    (3.4.2)
    describe    -> object vectors and DCGA descriptors (B, M, C)          (3.4.3, 3.5.1)
    match       -> OMM matches of the query objects with each reference   (3.5.2)
    measure     -> AMM anomaly maps, object statuses, scores              (3.6 + beyond)

The reference side (features, masks, descriptors of the k references) comes from the
template bank, so only the query image goes through the models. Each stage is a method
taking and returning a `Batch`, named once in `STAGES`: `run` runs any of them in that
order (inspect, the bank builder and the benchmark), `stages` groups them for the runtime's
pipeline (`PIPELINE_GROUPS`, one thread each).

Beyond the paper: a reference part that no query object matches (in more than half of
the k references) is scored at its reference location ("missing"), and an unmatched query
object whose closest reference part is already matched by another query object is a part
too many ("surplus"). Both show in the heatmap and in the object list. With the weights-free
backend each part also carries an outline descriptor (`linewatch.detector.shape`, used in
matching too) and grain statistics. The image score fuses the object map with a patch branch
(`linewatch.detector.patch_knn`) and, weights-free, the parts' outline and grain branches,
each in units of its spread on the good images (`detector.score`, `linewatch.detector.fusion`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from linewatch.config import DetectorConfig
from linewatch.detector.backends import get_backend
from linewatch.detector.bank import BankError, TemplateBank
from linewatch.detector.calibration import Calibration
from linewatch.detector.describe import masked_global_max_pool, resize_masks
from linewatch.detector.fusion import branch_z_scores, fuse_maps
from linewatch.detector.match import match_objects
from linewatch.detector.measure import mahalanobis
from linewatch.detector.models import Models
from linewatch.detector.patch_knn import local_patch_features, nearest_patch_distances
from linewatch.detector.result import InspectionResult
from linewatch.detector.segment import interior_points
from linewatch.detector.shape import shape_descriptors


ENCODE_STAGES = ("preprocess", "backbone", "upsample", "segment", "describe")  # one image alone
JUDGE_STAGES = ("match", "measure")  # the image against its references in the bank
STAGES = ENCODE_STAGES + JUDGE_STAGES
# The runtime's pipeline: one thread (and CUDA stream) per group; match + measure are cheap together.
PIPELINE_GROUPS = (("preprocess",), ("backbone",), ("upsample",), ("segment",), ("describe",), JUDGE_STAGES)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # detector.precision -> autocast dtype
MODEL_STAGES = frozenset({"backbone", "upsample", "segment"})  # run under detector.precision's autocast


class InputError(ValueError):
    """An input image the bank cannot judge (wrong size or channels); names the image."""


@dataclass
class Encoded:
    """Model outputs for a batch of images (query or reference).

    features: (B, C, h, w) backbone; retrieval: (B, D) flattened backbone features;
    upsampled: (B, C, H', W'); masks: list of (M_b, S, S) bool; soft_masks: (B, M, H', W');
    valid: (B, M) bool; boxes: (B, M, 4) x, y, w, h in working pixels; descriptors: (B, M, C);
    shapes: (B, M, D) outline descriptors, textures: (B, M, T) grain statistics (None when
    the backend does not use them).
    """

    features: Tensor | None = None
    upsampled: Tensor | None = None
    masks: list[Tensor] | None = None
    soft_masks: Tensor | None = None
    valid: Tensor | None = None
    boxes: Tensor | None = None
    descriptors: Tensor | None = None
    shapes: Tensor | None = None
    textures: Tensor | None = None

    @property
    def retrieval(self) -> Tensor:
        return self.features.flatten(1).float()


@dataclass
class Batch:
    """State of one batch as it moves through the stages."""

    images: list[np.ndarray]
    sizes: list[tuple[int, int]] = field(default_factory=list)  # input (H, W) per image
    images01: Tensor | None = None
    frames: Tensor | None = None  # (B, H, W, 3) uint8 input frames on the device, for a segmenter that wants them
    encoded: Encoded = field(default_factory=Encoded)
    references: Tensor | None = None  # (B, k)
    patch_references: Tensor | None = None  # (B, R) the good images the patch branch compares with
    exclude: Tensor | None = None  # (B,) reference index to skip in retrieval (leave-one-out)
    match: Any = None  # MatchResult over B*k query/reference pairs
    object_maps: Tensor | None = None  # (B, M, H', W') raw per-object Mahalanobis maps
    results: list[InspectionResult] | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, filled by StageTimer.resolve
    timer: "StageTimer | None" = None


class StageTimer:
    """Times stages without stalling the device: on CUDA a pair of events recorded on the
    stream the stage ran on (read once the batch's results reach the host, when they have
    long completed); on the CPU the wall time of the call."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.events: list[tuple[str, Any, Any]] = []
        self.seconds: dict[str, float] = {}

    def start(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, name: str, started: Any) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append((name, started, event))
        else:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def resolve(self) -> dict[str, float]:
        """Seconds per stage so far. On CUDA this waits for the last recorded event only (the
        caller has normally synchronised already by copying results to the host)."""
        for name, start, end in self.events:
            end.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + start.elapsed_time(end) / 1000.0
        self.events.clear()
        return dict(self.seconds)


@dataclass
class AlignedPairs:
    """The (image, object) pairs of a batch, image-major (B*M rows), with their k reference objects.

    query_masks (B*M, H', W'); grids (B*M, k, H', W', 2) that move the reference objects onto the
    query object (F.grid_sample, align_corners=False); ref_masks (B*M, k, H', W') the moved
    reference masks; in_box (B*M, H', W') bool, the bounding box of the query and moved reference
    masks, where the pair's distance map can be non-zero (all False for padding pairs).
    """

    query_masks: Tensor
    grids: Tensor
    ref_masks: Tensor
    in_box: Tensor


def to_images01(images: list[np.ndarray], size: int, device: torch.device) -> Tensor:
    """RGB uint8 (H, W, 3) images -> (B, 3, size, size) float in [0, 1] on `device`. The resize
    (OpenCV's area filter) runs on the host; the uint8 result crosses to the device as in
    `frames_to_device` (pinned, non-blocking on CUDA) and becomes float there."""
    resized = [
        cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA) if img.shape[:2] != (size, size) else img
        for img in images
    ]
    return frames_to_device(resized, device).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def frames_to_device(images: list[np.ndarray], device: torch.device) -> Tensor:
    """RGB uint8 (H, W, 3) images of one size -> uint8 (B, H, W, 3) on `device`. On CUDA through
    a pinned host buffer and a non-blocking copy (PyTorch's pinned-memory cache keeps the
    buffer until the copy has completed, so it is neither reused early nor allocated anew)."""
    h, w = images[0].shape[:2]
    host = torch.empty((len(images), h, w, 3), dtype=torch.uint8, pin_memory=device.type == "cuda")
    array = host.numpy()
    for i, image in enumerate(images):
        array[i] = image
    return host.to(device, non_blocking=True) if device.type == "cuda" else host


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


def mask_boxes(masks: Tensor) -> Tensor:
    """Bounding boxes (..., 4) as x, y, w, h (float32) of bool masks (..., H, W); zeros for empty masks.

    Batched over all masks: the first and last occupied row and column come from argmax over
    the any() profiles (argmax returns the first maximum), no per-mask loop, no host sync."""
    rows = masks.any(dim=-1)  # (..., H)
    cols = masks.any(dim=-2)  # (..., W)
    y0, y1 = _first_last(rows)
    x0, x1 = _first_last(cols)
    box = torch.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], dim=-1).float()
    return torch.where(rows.any(dim=-1)[..., None], box, torch.zeros_like(box))


def _first_last(line: Tensor) -> tuple[Tensor, Tensor]:
    """Indices (...,) of the first and the last True along the last dim of `line` (..., L) bool
    (0 and L - 1 where there is none)."""
    as_int = line.to(torch.uint8)
    first = as_int.argmax(dim=-1)
    last = line.shape[-1] - 1 - as_int.flip(-1).argmax(dim=-1)
    return first, last


def box_of_support(support: Tensor) -> Tensor:
    """(..., H, W) bool -> (..., H, W) bool, True inside the bounding box of each map's True cells
    (all False for an empty map)."""
    rows = _span(support.any(dim=-1))  # (..., H)
    cols = _span(support.any(dim=-2))  # (..., W)
    return rows[..., :, None] & cols[..., None, :]


def _span(line: Tensor) -> Tensor:
    """(..., L) bool -> True from the first to the last True of each line."""
    return (line.cumsum(dim=-1) > 0) & (line.flip(-1).cumsum(dim=-1).flip(-1) > 0)


def mask_moments(masks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Centroid (..., 2) as (x, y) pixels, principal-axis angle (...,) in radians, and
    elongation (...,) = major / minor axis variance, of soft masks (..., H, W)."""
    h, w = masks.shape[-2:]
    ys = torch.arange(h, device=masks.device, dtype=masks.dtype).view(h, 1)
    xs = torch.arange(w, device=masks.device, dtype=masks.dtype).view(1, w)
    mass = masks.sum((-2, -1)).clamp_min(1e-6)
    cx = (masks * xs).sum((-2, -1)) / mass
    cy = (masks * ys).sum((-2, -1)) / mass
    dx = xs - cx[..., None, None]
    dy = ys - cy[..., None, None]
    mxx = (masks * dx * dx).sum((-2, -1)) / mass
    myy = (masks * dy * dy).sum((-2, -1)) / mass
    mxy = (masks * dx * dy).sum((-2, -1)) / mass
    angle = 0.5 * torch.atan2(2 * mxy, mxx - myy)
    spread = torch.sqrt((mxx - myy) ** 2 + 4 * mxy**2)
    elongation = (mxx + myy + spread) / (mxx + myy - spread).clamp_min(1e-6)
    return torch.stack([cx, cy], dim=-1), angle, elongation


def reference_grids(query_masks: Tensor, ref_masks: Tensor, allowed: Tensor, max_shift: float,
                    max_rotation: float, min_elongation: float = 1.5) -> Tensor:
    """Sampling grids (q, k, H, W, 2) that move each reference object onto its query object
    (beyond the paper; see Inspector._object_maps), for F.grid_sample with align_corners=False.

    query_masks (q, H, W); ref_masks (q, k, H, W); allowed (q,) bool. Translation takes the
    reference mask centroid to the query's; rotation turns the reference's principal axis onto
    the query's when both parts are elongated. Pairs whose motion exceeds max_shift (pixels) or
    max_rotation (radians), or that are not allowed, get the identity grid.
    """
    q, k, h, w = ref_masks.shape
    cq, aq, eq = mask_moments(query_masks)
    cr, ar, er = mask_moments(ref_masks)
    turn = torch.remainder(aq[:, None] - ar + math.pi / 2, math.pi) - math.pi / 2  # axis angles are mod pi
    turn = torch.where((eq[:, None] > min_elongation) & (er > min_elongation), turn, torch.zeros_like(turn))
    shift = (cq[:, None] - cr).norm(dim=-1)
    ok = allowed[:, None] & (shift <= max_shift) & (turn.abs() <= max_rotation)
    turn = torch.where(ok, turn, torch.zeros_like(turn))
    # output pixel p takes the reference at R(-turn) (p - cq) + cr; in normalised coordinates
    # (align_corners=False, square maps assumed equal in x and y scale)
    def normalised(c: Tensor) -> Tensor:  # pixel centres (x, y) -> [-1, 1]
        return torch.stack([(2 * c[..., 0] + 1) / w - 1, (2 * c[..., 1] + 1) / h - 1], dim=-1)

    cqn = normalised(cq)[:, None].expand(q, k, 2)
    crn = normalised(cr)
    cos, sin = torch.cos(turn), torch.sin(turn)
    rot = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # R(-turn), (q, k, 2, 2)
    offset = crn - (rot @ cqn[..., None])[..., 0]
    theta = torch.cat([rot, offset[..., None]], dim=-1)  # (q, k, 2, 3)
    identity = torch.eye(2, 3, device=theta.device, dtype=theta.dtype)  # made on the device: no host copy
    theta = torch.where(ok[..., None, None], theta, identity)
    grid = F.affine_grid(theta.reshape(q * k, 2, 3), [q * k, 1, h, w], align_corners=False)
    return grid.view(q, k, h, w, 2)


def warp(maps: Tensor, grid: Tensor) -> Tensor:
    """Sample maps (n, C, H, W) at grid (n, h, w, 2) -> (n, C, h, w); zeros outside."""
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Blur (B, H, W) maps with a Gaussian of `sigma` pixels (separable, reflect padding)."""
    if sigma <= 0:
        return maps
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, device=maps.device, dtype=maps.dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = maps[:, None]
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return out[:, 0]


class Inspector:
    """Judges batches of images against a template bank.

    `inspect(images)` runs every stage; the runtime runs `stages` as a pipeline instead.
    """

    def __init__(self, config: DetectorConfig, models: Models, bank: TemplateBank | None, device: torch.device):
        self.config = config
        self.models = models
        self.device = device
        self.bank = bank.to(device) if bank is not None else None
        self.backend = config.backend
        self.descriptor_mean: Tensor | None = None
        self.seed_points: Tensor | None = None  # (N, M, 2) a point inside each bank part, for seeded prompts
        self.shape_mean: Tensor | None = None  # mean outline descriptor of the bank's parts, when outlines are used
        self.patch_memory: Tensor | None = None  # (Z, C, h, w) the bank's patch features, for the patch branch
        self.normalisation: dict | None = None  # each branch's spread on good images (fusion.branch_normalisation)
        self.keep_component_maps = False  # evaluation: results carry each branch's map too
        if bank is not None:
            bank.check_identity(self.identity(), source=f"bank {bank.bank_id}", settings=config.fingerprint_settings())
            if bank.size < config.k_references:
                raise BankError(
                    f"bank {bank.bank_id} holds {bank.size} good images, fewer than detector.k_references = "
                    f"{config.k_references}; lower k_references or rebuild the bank with more good images"
                )
            # the bank's fitted state (the classic background model) on models of this inspector
            # alone: `models` stay as given, so other banks' inspectors may share them
            self.models = get_backend(config.backend).load_state(models, bank.segmenter_state)
            if config.matching.center_descriptors:
                # Descriptors of different parts share a large common component (every object
                # pools the same kind of features); matching on what sets them apart works far
                # better. The mean over the bank's good objects is that common part.
                self.descriptor_mean = self.bank.descriptors[self.bank.object_valid].mean(0)
            if getattr(self.models.segmenter, "wants_seeds", False):
                self.seed_points = interior_points(self.bank.masks.float())
            # a part whose good-image maps are nearly flat must not turn tiny differences into alarms
            noise = self.bank.object_noise[self.bank.object_valid]
            self.noise_floor = float(noise.median()) * 0.25 if noise.numel() else 1.0
            if self.uses_shapes:
                good_shapes = self.bank.shapes[self.bank.object_valid]
                self.shape_mean = good_shapes.mean(0) if good_shapes.numel() else None
            if config.score.source != "objects":
                self.patch_memory = local_patch_features(self._backbone_maps(self.bank.retrieval))
            self.normalisation = self.bank.manifest.score_normalisation

    @property
    def uses_shapes(self) -> bool:
        """Whether parts carry outline descriptors and grain statistics (the weights-free backend
        with classic.shape_weight > 0)."""
        return self.models.shape_weight > 0

    def _texture_statistics(self, features: Tensor, soft_masks: Tensor) -> Tensor:
        """Mean grain statistics (`ClassicFeatures.texture_channels`) over the interior of each
        part's mask: features (B, C, h, w) backbone map, soft_masks (B, M, H', W') -> (B, M, T)."""
        channels = self.models.backbone.texture_channels(features.float())
        masks = F.interpolate(soft_masks, size=channels.shape[-2:], mode="area") if soft_masks.shape[1] else \
            soft_masks.new_zeros(*soft_masks.shape[:2], *channels.shape[-2:])
        if masks.shape[1]:
            # the part's interior (mask eroded by one cell): the grains, not the part's outline
            # against the tray, whose strong coherent edges would drown them
            inner = -F.max_pool2d(-masks, 3, stride=1, padding=1)
            masks = torch.where(inner.sum((-2, -1), keepdim=True) > 0, inner, masks)  # a thin part keeps its mask
        return torch.einsum("bthw,bmhw->bmt", channels, masks) / masks.sum((-2, -1)).clamp_min(1e-6)[..., None]

    def _backbone_maps(self, retrieval: Tensor) -> Tensor:
        """Flattened backbone features (n, C*h*w), as the bank keeps them -> (n, C, h, w)."""
        side = self.config.image_size // self.models.backbone.stride
        c = self.models.backbone.out_channels
        if retrieval.shape[1] != c * side * side:
            raise BankError(f"bank {self.bank_id}: its retrieval vectors have {retrieval.shape[1]} values, the backbone "
                            f"gives {c} x {side} x {side}; rebuild the bank")
        return retrieval.float().view(-1, c, side, side)

    # ------------------------------------------------------------------ identity

    def identity(self) -> dict[str, str]:
        backend = get_backend(self.config.backend)
        return {"backend": backend.name, **backend.identity(self.models), "config_hash": self.config.identity_hash()}

    @property
    def bank_id(self) -> str:
        return self.bank.bank_id if self.bank is not None else "none"

    @property
    def bank_images(self) -> int:
        """Good images in the bank (0 without one): shown in linewatch_bank_info."""
        return self.bank.size if self.bank is not None else 0

    @property
    def calibration(self) -> Calibration | None:
        """The bank's threshold and the good scores it came from (None without a bank)."""
        return self.bank.calibration if self.bank is not None else None

    @property
    def stages(self) -> list[tuple[str, Callable[[Any], Any]]]:
        """Stage functions for the runtime, one per `PIPELINE_GROUPS` entry: the first takes a
        list of RGB uint8 images, the last returns a list of InspectionResult."""

        def group(names: tuple[str, ...], first: bool, last: bool) -> Callable[[Any], Any]:
            def fn(data: Any) -> Any:
                batch = Batch(images=list(data)) if first else data
                batch = self.run(batch, names)
                return batch.results if last else batch
            return fn

        n = len(PIPELINE_GROUPS)
        return [("_".join(names), group(names, i == 0, i == n - 1)) for i, names in enumerate(PIPELINE_GROUPS)]

    def run(self, batch: Batch, names: tuple[str, ...] = STAGES) -> Batch:
        """Run the stages `names` (a run of `STAGES`, in that order) on `batch`, each timed by
        the batch's StageTimer (CUDA events: no device-wide synchronisation)."""
        if batch.timer is None:
            batch.timer = StageTimer(self.device)
        for name in names:
            step = getattr(self, name)
            started = batch.timer.start()
            if name in MODEL_STAGES:
                with self.autocast():
                    batch = step(batch)
            else:
                batch = step(batch)
            batch.timer.stop(name, started)
        if "measure" in names:  # results are on the host: every event has completed
            batch.timings = batch.timer.resolve()
            for result in batch.results:
                result.timings = dict(batch.timings)
        return batch

    def autocast(self):
        """detector.precision as an autocast context for the model stages (fp32: disabled)."""
        dtype = PRECISIONS[self.config.precision]
        return torch.autocast(device_type=self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def warm_up(self, batch_sizes: tuple[int, ...]) -> None:
        """Judge blank frames of the bank's image size once per batch size, so that compiled
        models are compiled and CUDA kernels chosen before the first real frame (the daemon
        reports ready only after this)."""
        blank = np.full((*self.bank.manifest.source_shape[:2], 3), 128, dtype=np.uint8)  # needs a bank, as inspect
        for size in sorted(set(batch_sizes)):
            self.inspect([blank] * size)

    def inspect(self, images: list[np.ndarray], exclude: Tensor | None = None) -> list[InspectionResult]:
        """Run every stage on a batch of RGB uint8 (H, W, 3) images. `exclude` (B,): a bank
        index each image must not be compared with (itself, in leave-one-out calibration)."""
        return self.run(Batch(images=list(images), exclude=exclude)).results

    def bank_batch(self, indices: Tensor) -> Batch:
        """Bank images as queries, rebuilt from the bank's own tensors without running a model,
        each excluded from its own retrieval: the leave-one-out passes of the bank build run
        `match` and `measure` on these instead of encoding every good image again."""
        bank = self.bank
        batch = Batch(images=[], exclude=indices)
        batch.sizes = [tuple(bank.manifest.source_shape[:2])] * len(indices)
        enc = batch.encoded
        enc.upsampled = bank.features[indices].float()
        enc.soft_masks = bank.masks[indices].float()
        enc.valid = bank.object_valid[indices]
        enc.boxes = bank.boxes[indices]
        enc.descriptors = bank.descriptors[indices]
        enc.shapes = bank.shapes[indices] if self.uses_shapes else None
        enc.textures = bank.textures[indices] if self.uses_shapes else None
        enc.features = self._backbone_maps(bank.retrieval[indices])
        self._retrieve(batch, bank.retrieval[indices])
        return batch

    def _retrieve(self, batch: Batch, retrieval: Tensor) -> None:
        """The k references of each image, and (patch branch) its R nearest good images, in one
        search (the first k of the R nearest are the k nearest)."""
        k = self.config.k_references
        r = 0
        if self.patch_memory is not None:
            r = min(self.config.score.patch_images, self.bank.size - (0 if batch.exclude is None else 1))
        nearest = self.bank.retrieve(retrieval, max(k, r), batch.exclude)
        batch.references = nearest[:, :k]
        batch.patch_references = nearest[:, :r] if r else None

    # ------------------------------------------------------------------ stages

    def preprocess(self, batch: Batch) -> Batch:
        for i, img in enumerate(batch.images):
            self.check_image(img, f"image {i}")
        batch.sizes = [img.shape[:2] for img in batch.images]
        batch.images01 = to_images01(batch.images, self.config.image_size, self.device)
        if getattr(self.models.segmenter, "wants_frames", False):
            if len(set(batch.sizes)) > 1:
                raise InputError(f"the images of one batch must have one size, got {sorted(set(batch.sizes))}")
            batch.frames = frames_to_device(batch.images, self.device)
        return batch

    def check_image(self, image: np.ndarray, name: str) -> None:
        """Refuse images the bank cannot judge: not RGB uint8, or another size than the good images."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            shape = getattr(image, "shape", None)
            dtype = getattr(image, "dtype", type(image).__name__)
            raise InputError(f"{name}: expected an RGB uint8 image (H, W, 3), got shape {shape} dtype {dtype}")
        if self.bank is not None:
            expected = self.bank.manifest.source_shape
            if expected and list(image.shape[:2]) != list(expected[:2]):
                raise InputError(
                    f"{name}: image is {image.shape[1]}x{image.shape[0]} but the bank's good images are "
                    f"{expected[1]}x{expected[0]}; use the same camera setup or rebuild the bank"
                )

    @torch.inference_mode()
    def backbone(self, batch: Batch) -> Batch:
        batch.encoded.features = self.models.backbone(batch.images01)
        if self.bank is not None:
            self._retrieve(batch, batch.encoded.retrieval)
        return batch

    @torch.inference_mode()
    def upsample(self, batch: Batch) -> Batch:
        batch.encoded.upsampled = self.models.upsampler(batch.encoded.features, batch.images01).float()
        return batch

    @torch.inference_mode()
    def segment(self, batch: Batch) -> Batch:
        seeds = None
        if getattr(self.models.segmenter, "wants_seeds", False) and self.seed_points is not None:
            refs = batch.references  # (B, k): one prompt inside each part of each reference
            seeds = (self.seed_points[refs].flatten(1, 2), self.bank.object_valid[refs].flatten(1, 2))
        masks = self.models.segmenter(batch.images01, frames=batch.frames, seeds=seeds)
        batch.encoded.masks = [m.to(self.device) for m in masks]
        return batch

    @torch.inference_mode()
    def describe(self, batch: Batch) -> Batch:
        enc = batch.encoded
        size = tuple(enc.upsampled.shape[-2:])
        enc.soft_masks, enc.valid, enc.boxes = pad_masks(enc.masks, size, self.device)
        pooled = masked_global_max_pool(enc.upsampled, enc.soft_masks)
        enc.descriptors = self.models.dcga(pooled, enc.valid)
        if self.uses_shapes:
            enc.shapes = shape_descriptors(enc.masks, enc.boxes)  # masks and boxes at the working size
            enc.textures = self._texture_statistics(enc.features, enc.soft_masks)
        return batch

    @torch.inference_mode()
    def match(self, batch: Batch) -> Batch:
        """OMM of each query image's objects with each of its k references (batched over B*k)."""
        if self.bank is None:
            raise RuntimeError("match needs a template bank")
        enc, refs, cfg = batch.encoded, batch.references, self.config.matching
        b, k = refs.shape
        m = enc.descriptors.shape[1]
        flat = refs.flatten()
        query, reference = enc.descriptors, self.bank.descriptors[flat]
        if self.descriptor_mean is not None:
            query = F.normalize(query - self.descriptor_mean, dim=-1)
            reference = F.normalize(reference - self.descriptor_mean, dim=-1)
        if self.uses_shapes:
            # outlines next to the pooled features: for unit halves the cosine of the joined
            # vectors is (cos_features + w^2 cos_outlines) / (1 + w^2)
            w = self.models.shape_weight
            query_shapes, reference_shapes = enc.shapes, self.bank.shapes[flat]
            if self.shape_mean is not None:
                query_shapes = query_shapes - self.shape_mean
                reference_shapes = reference_shapes - self.shape_mean
            query = F.normalize(torch.cat([query, w * F.normalize(query_shapes, dim=-1)], dim=-1), dim=-1)
            reference = F.normalize(torch.cat([reference, w * F.normalize(reference_shapes, dim=-1)], dim=-1), dim=-1)
        batch.match = match_objects(
            query[:, None].expand(b, k, m, -1).reshape(b * k, m, -1),
            reference,
            enc.valid[:, None].expand(b, k, m).reshape(b * k, m),
            self.bank.object_valid[flat],
            dustbin=cfg.dustbin,
            threshold=cfg.match_threshold,
            iterations=cfg.sinkhorn_iterations,
            score_scale=cfg.score_scale,
        )
        return batch

    @torch.inference_mode()
    def measure(self, batch: Batch) -> Batch:
        """AMM: per-object Mahalanobis maps against the matched (or closest) reference objects
        (eqs. 11-15), plus missing-part and surplus maps; then image scores and results.

        Batched tensor ops over padded (image, object) and (image, reference, part) tensors; the
        device is read back twice per batch, whatever the number of objects: `read_counts` (the
        sizes of the cell lists to compute) and `to_host` (everything the results need)."""
        enc, refs, bank, cfg = batch.encoded, batch.references, self.bank, self.config.measure
        b, k = refs.shape
        m = enc.valid.shape[1]
        n = bank.object_valid.shape[1]
        hf, wf = enc.upsampled.shape[-2:]
        res = batch.match
        matches = res.matches.view(b, k, m)
        closest = res.closest.view(b, k, m)
        ref_matches = res.ref_matches.view(b, k, n)
        assigned = torch.where(matches >= 0, matches, closest).clamp(min=0)  # (B, k, M)

        matched_in = (matches >= 0).sum(1)  # (B, M)
        is_matched = (2 * matched_in >= k) & enc.valid
        # closest reference object already taken by another query object -> a part too many
        taken_by = torch.gather(ref_matches, 2, closest.clamp(min=0))  # (B, k, M)
        own = torch.arange(m, device=self.device).view(1, 1, m)
        taken = ((taken_by >= 0) & (taken_by != own)).sum(1)
        is_surplus = enc.valid & ~is_matched & (2 * taken >= k)

        # Which cells to compute depends on the masks: their counts are the one host read before
        # the results copy; everything else stays on the device.
        pairs = self._aligned_pairs(batch, assigned, is_matched)
        unmatched, unmatched_cells = self._unmatched_reference_parts(batch, ref_matches)
        counts = read_counts(torch.cat([pairs.in_box.reshape(b, -1).sum(1), unmatched.sum().view(1),
                                        unmatched_cells.sum().view(1)]))
        most_cells, n_unmatched, n_unmatched_cells = max(counts[:b], default=0), counts[b], counts[b + 1]

        object_maps = self._object_maps(batch, pairs, most_cells)
        batch.object_maps = object_maps
        if cfg.normalize_objects:
            # each part's map in units of what that part's map reaches on good images
            noise = bank.object_noise[refs[:, :, None], assigned].mean(1)  # (B, M)
            object_maps = object_maps / noise.clamp_min(self.noise_floor)[..., None, None]
        weights = torch.where(is_surplus, cfg.surplus_weight, 1.0)
        image_maps = (object_maps * weights[..., None, None] * enc.valid[..., None, None]).sum(1)  # eq. 15

        missing_maps, missing = self._missing_parts(
            batch, true_indices(unmatched.reshape(1, -1), n_unmatched)[0],
            true_indices(unmatched_cells.reshape(1, -1), n_unmatched_cells)[0],
        )
        image_maps = image_maps + cfg.missing_part_weight * missing_maps

        branch_maps = {"objects": image_maps}
        if self.config.score.source != "objects":
            branch_maps["patch"] = self._patch_maps(batch)
            if self.uses_shapes:
                branch_maps.update(self._part_maps(batch))
        batch.results = self._results(batch, branch_maps, object_maps, is_matched, is_surplus, missing)
        return batch

    def _part_maps(self, batch: Batch) -> dict[str, Tensor]:
        """The part branches (weights-free backend): each query part's distance to the nearest
        good part of the bank (any image but the query's own, any place) by its outline
        (`linewatch.detector.shape`) and by its grain statistics (`ClassicFeatures.
        texture_channels`), spread over the part's mask: {"outline", "texture"}: (B, H', W').
        A part that no good part resembles (another shape, mirrored, turned, another granular
        texture) stands out whatever the matching did; where a part is (a swap) is left to the
        object and patch branches."""
        enc, bank = batch.encoded, self.bank
        z, n = bank.object_valid.shape
        usable = bank.object_valid[None].expand(enc.valid.shape[0], z, n).clone()  # (B, Z, N)
        if batch.exclude is not None:
            own = batch.exclude[:, None] == torch.arange(z, device=self.device)[None]  # (B, Z)
            usable &= ~own[..., None]
        usable = usable.reshape(-1, z * n)[:, None]  # (B, 1, Z*N)
        maps = {}
        for name, query, good in (("outline", enc.shapes, bank.shapes), ("texture", enc.textures, bank.textures)):
            distances = torch.cdist(query.float(), good.reshape(1, z * n, -1).float().expand(query.shape[0], -1, -1))
            nearest = distances.masked_fill(~usable, float("inf")).amin(2)  # (B, M)
            nearest = torch.where(enc.valid & torch.isfinite(nearest), nearest, torch.zeros_like(nearest))
            maps[name] = (enc.soft_masks * nearest[..., None, None]).amax(1)
        return maps

    def _patch_maps(self, batch: Batch) -> Tensor:
        """The patch branch (`linewatch.detector.patch_knn`): (B, h, w) distance of each patch of
        the backbone map to the nearest patch near the same place in the image's R nearest good
        images (retrieved without the image itself when it is one of the bank's)."""
        query = local_patch_features(batch.encoded.features)
        memory = self.patch_memory[batch.patch_references]  # (B, R, C, h, w)
        return nearest_patch_distances(query, memory, self.config.score.patch_window)

    def _aligned_pairs(self, batch: Batch, assigned: Tensor, is_matched: Tensor) -> AlignedPairs:
        """Every (image, object) pair, padding included, with its k reference objects moved onto
        it where allowed (see `_object_maps`) and the box where its distance map can be non-zero.
        Masks and grids only (no features), on the full grid, in chunks of pairs that hold about
        OBJECT_CHUNK_ELEMENTS floats."""
        enc, refs, bank = batch.encoded, batch.references, self.bank
        b, m = enc.valid.shape
        k = refs.shape[1]
        hf, wf = enc.upsampled.shape[-2:]
        n_pairs = b * m
        max_shift = self.config.measure.align_max_shift * max(hf, wf)
        max_rotation = math.radians(self.config.measure.align_max_rotation_deg)
        query_masks = enc.soft_masks.reshape(n_pairs, hf, wf)  # image-major
        bank_index = refs[:, None].expand(b, m, k).reshape(n_pairs, k)  # (B*M, k) bank image of each reference
        ref_objects = assigned.transpose(1, 2).reshape(n_pairs, k)  # (B*M, k)
        allowed = (is_matched & (max_shift > 0)).reshape(n_pairs)
        grids = torch.empty(n_pairs, k, hf, wf, 2, device=self.device)
        ref_masks = torch.empty(n_pairs, k, hf, wf, device=self.device)
        in_box = torch.empty(n_pairs, hf, wf, dtype=torch.bool, device=self.device)
        chunk = self._chunk_size(4 * k * hf * wf)  # masks and grids per pair
        for start in range(0, n_pairs, chunk):
            rows = slice(start, start + chunk)
            original = bank.masks[bank_index[rows], ref_objects[rows]].float()  # (q, k, H', W')
            q = original.shape[0]
            grids[rows] = reference_grids(query_masks[rows], original, allowed[rows], max_shift, max_rotation)
            moved = warp(original.reshape(q * k, 1, hf, wf), grids[rows].reshape(q * k, hf, wf, 2))
            ref_masks[rows] = moved.view(q, k, hf, wf)
            # outside the query mask and every reference mask both sides are zero and so is the distance
            in_box[rows] = box_of_support((query_masks[rows] + ref_masks[rows].sum(1)) > 1e-4)
        in_box &= enc.valid.reshape(n_pairs, 1, 1)
        return AlignedPairs(query_masks, grids, ref_masks, in_box)

    def _object_maps(self, batch: Batch, pairs: AlignedPairs, most_cells: int) -> Tensor:
        """Mahalanobis map (B, M, H', W') of every valid query object against the k reference
        objects it matched or is closest to (eqs. 11-12), computed inside `pairs.in_box` and
        exactly 0 elsewhere (and for padding objects). most_cells: the largest number of
        in-box cells of one image (from `read_counts`).

        Beyond the paper: a matched reference object is first moved onto the query object
        (translation of mask centroids, and rotation of the principal axes of elongated
        parts) when that motion is within `measure.align_max_shift` / `align_max_rotation_deg`.
        Parts shift and turn a little on any real line; without this their edges dominate the
        map of a good part. A larger displacement is not undone, so a part in the wrong place
        still scores at both places.

        Batched per image over the in-box cells of all its objects (padded to `most_cells`):
        every object of an image has the same k reference images, so one grid_sample per
        (image, reference) moves the reference features of all its objects. In chunks of
        images and of cells that hold about OBJECT_CHUNK_ELEMENTS floats (a fixed number for
        given shapes); no per-object loop, no host sync.
        """
        enc, refs, bank, eps = batch.encoded, batch.references, self.bank, self.config.measure.eps
        b, m = enc.valid.shape
        k = refs.shape[1]
        c, hf, wf = enc.upsampled.shape[-3:]
        n_cells = hf * wf
        spare = m * n_cells  # the padding cell index of an image
        cells = true_indices(pairs.in_box.view(b, spare), most_cells)  # (B, L): object * H'W' + cell, or spare
        real = cells < spare
        cells = torch.where(real, cells, 0)  # padding computes cell 0 of object 0, and is dropped
        pair = torch.arange(b, device=self.device)[:, None] * m + cells // n_cells  # (B, L)
        cell = cells % n_cells
        query_masks = pairs.query_masks.view(b * m, n_cells)[pair, cell]  # (B, L)
        grids = pairs.grids.view(b * m, k, n_cells, 2)[pair, :, cell].transpose(1, 2)  # (B, k, L, 2)
        ref_masks = pairs.ref_masks.view(b * m, k, n_cells)[pair, :, cell].transpose(1, 2)  # (B, k, L)
        target = torch.where(real, cells, spare)  # where each distance goes; padding into a spare column
        maps = torch.zeros(b, spare + 1, device=self.device)
        # chunks: half the budget for the images' reference feature maps, half for the cells' terms
        images_per_chunk = self._chunk_size(2 * k * c * n_cells)
        cells_per_chunk = self._chunk_size(2 * (5 * k + 3) * c * min(images_per_chunk, b))  # query, k refs, Woodbury
        for start in range(0, b, images_per_chunk):
            rows = slice(start, start + images_per_chunk)
            q = refs[rows].shape[0]
            reference_features = bank.features[refs[rows].reshape(-1)].float()  # (q*k, C, H', W')
            query_features = enc.upsampled[rows].flatten(2)  # (q, C, H'*W')
            for first in range(0, most_cells, cells_per_chunk):
                cols = slice(first, first + cells_per_chunk)
                query = query_features.gather(2, cell[rows, None, cols].expand(q, c, -1))  # (q, C, l)
                query = query * query_masks[rows, None, cols]
                moved = warp(reference_features, grids[rows, :, cols].reshape(q * k, 1, -1, 2))  # (q*k, C, 1, l)
                references = moved.view(q, k, c, -1) * ref_masks[rows, :, None, cols]  # (q, k, C, l)
                maps[rows].scatter_(1, target[rows, cols], mahalanobis(query, references, eps))
        return maps[:, :spare].reshape(b, m, hf, wf)

    OBJECT_CHUNK_ELEMENTS = 16 * 1024 * 1024  # floats held at once by one chunk of the measure stage (CPU)
    CUDA_CHUNK_ELEMENTS = 256 * 1024 * 1024  # on a GPU (1 GiB of fp32): a batch in one or two chunks, few launches

    def _chunk_size(self, floats_per_row: int) -> int:
        """Rows (pairs, images or cells) per chunk so that a chunk holds about OBJECT_CHUNK_ELEMENTS floats."""
        budget = self.CUDA_CHUNK_ELEMENTS if self.device.type == "cuda" else self.OBJECT_CHUNK_ELEMENTS
        return max(1, budget // max(1, floats_per_row))

    def _unmatched_reference_parts(self, batch: Batch, ref_matches: Tensor) -> tuple[Tensor, Tensor]:
        """Reference parts no query object matches: (B, k, N) bool, and the cells (B, k, H', W')
        bool where at least one of them has mask > 0 (where a missing part's map can be non-zero)."""
        refs, bank = batch.references, self.bank
        unmatched = bank.object_valid[refs] & (ref_matches < 0)  # (B, k, N)
        cells = ((bank.masks[refs] > 0) & unmatched[..., None, None]).any(dim=2)  # (B, k, H', W')
        return unmatched, cells

    def _missing_parts(self, batch: Batch, candidates: Tensor, cells: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Reference objects that no query object matches, in more than half of the k references.

        candidates (U,): flat indices into (B, k, N) of the unmatched reference parts, in
        (image, reference, part) order; cells (L,): flat indices into (B, k, H', W') where one of
        them has mask > 0. A candidate (r, j) gets one vote from its reference r and one from
        every other reference o holding an unmatched part whose dilated mask overlaps its
        dilated mask (soft IoU > 0.3); it is missing when 2 * votes > k. Its map compares the
        query's features inside the reference mask with the reference object's features (K = 1
        Gaussian, eps*I covariance): mask * |query - reference| / sqrt(eps), divided by the
        part's noise level when `measure.normalize_objects`; the image map adds the missing
        parts' maps / k. The distance is computed once per (image, reference) cell, not per part.

        Returns maps (B, H', W') and, for `_results` to copy to the host (where the parts found
        in several references are reported once), on the device: image (U,), missing (U,) bool,
        overlap (U, U) soft IoU of the candidates' masks, box (U, 4) in working pixels, mass (U,)
        mask sum in feature cells, score (U,) peak of the part's map.
        """
        enc, refs, bank, eps = batch.encoded, batch.references, self.bank, self.config.measure.eps
        b, k = refs.shape
        n = bank.object_valid.shape[1]
        c, hf, wf = enc.upsampled.shape[-3:]
        image, ref, part = candidates // (k * n), (candidates // n) % k, candidates % n
        z = refs[image, ref]  # (U,) bank image of each candidate
        masks = bank.masks[z, part].float()  # (U, H', W')
        u = masks.shape[0]

        # votes; dilated masks: a thin part jittered by a cell or two still overlaps itself
        same_image = image[:, None] == image[None, :]
        near = (soft_overlaps(_dilate(masks).view(u, hf * wf)) > 0.3) & same_image  # (U, U)
        refs_of = (ref[:, None] == torch.arange(k, device=self.device)).float()  # (U, k) one-hot
        seen_in = (near.float() @ refs_of) > 0  # (U, k): reference o holds an overlapping unmatched part
        votes = 1 + (seen_in & ~refs_of.bool()).sum(1)
        missing = 2 * votes > k

        # |query - reference| / sqrt(eps) at the cells, as a dense (B, k, H'*W') map (0 elsewhere)
        distance = torch.zeros(b * k * hf * wf, device=self.device)
        pair, cell = cells // (hf * wf), cells % (hf * wf)
        y, x = cell // wf, cell % wf
        features_by_channel = enc.upsampled.transpose(0, 1)  # (C, B, H', W') views
        bank_by_channel = bank.features.transpose(0, 1)  # (C, Z, H', W')
        chunk = self._chunk_size(4 * c)
        for start in range(0, cells.shape[0], chunk):
            at = slice(start, start + chunk)
            query = features_by_channel[:, pair[at] // k, y[at], x[at]]  # (C, L)
            reference = bank_by_channel[:, refs.reshape(-1)[pair[at]], y[at], x[at]].float()[None]  # (1, C, L)
            distance[cells[at]] = mahalanobis(query, reference, eps)
        part_maps = masks.view(u, hf * wf) * distance.view(b * k, hf * wf)[image * k + ref]  # (U, H'*W')
        if self.config.measure.normalize_objects:
            part_maps = part_maps / bank.object_noise[z, part].clamp_min(self.noise_floor)[:, None]
        maps = torch.zeros(b, hf * wf, device=self.device)
        maps.index_add_(0, image, part_maps * missing[:, None] / k)
        report = {
            "image": image,
            "missing": missing,
            "overlap": soft_overlaps(masks.view(u, hf * wf)),
            "box": bank.boxes[z, part],
            "mass": masks.view(u, hf * wf).sum(1),
            "score": part_maps.amax(1),
        }
        return maps.view(b, hf, wf), report

    def _results(self, batch, raw_maps, object_maps, is_matched, is_surplus, missing) -> list[InspectionResult]:
        """Smoothed maps, scores and object lists, from ONE device -> host copy (`to_host`) of
        everything they need; the Python records are built on the host. raw_maps: the branches'
        maps, {"objects": (B, H', W'), "patch": (B, h, w), ...}; the score map is their
        `fuse_maps` at the working size."""
        size = self.config.image_size
        enc = batch.encoded

        def smoothed(raw: Tensor) -> Tensor:
            up = F.interpolate(raw[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
            return gaussian_blur(up, self.config.measure.smoothing_sigma)

        branch_maps = {name: smoothed(raw) for name, raw in raw_maps.items()}
        components = {name: m.flatten(1).amax(1) for name, m in branch_maps.items()}
        maps = fuse_maps(branch_maps, self.normalisation, self.config.score.source)
        scores = fuse_maps(components, self.normalisation, self.config.score.source)  # the same rule on the peaks
        kept = branch_maps if self.keep_component_maps else {}
        cell_area = (size / enc.soft_masks.shape[-1]) ** 2  # working pixels per feature cell
        host = to_host({
            "maps": maps,
            "scores": scores,
            **{f"component_{name}": value for name, value in components.items()},
            **{f"component_map_{name}": m for name, m in kept.items()},
            "object_scores": object_maps.flatten(2).amax(2),
            "areas": enc.soft_masks.flatten(2).sum(2) * cell_area,  # (B, M), working pixels
            "boxes": enc.boxes,
            "valid": enc.valid,
            "matched": is_matched,
            "surplus": is_surplus,
            **{f"missing_{name}": value for name, value in missing.items()},
        })
        threshold = self.bank.threshold  # inf while the bank builder calibrates
        results = []
        for bi, (h, w) in enumerate(batch.sizes):
            sx, sy = w / size, h / size
            objects = []
            for i in np.flatnonzero(host["valid"][bi]):
                status = "matched" if host["matched"][bi, i] else ("surplus" if host["surplus"][bi, i] else "unmatched")
                objects.append(_object_record(host["boxes"][bi, i], float(host["areas"][bi, i]), sx, sy, status,
                                              host["object_scores"][bi, i]))
            for t in _distinct_parts(host["missing_missing"] & (host["missing_image"] == bi), host["missing_overlap"]):
                area = float(host["missing_mass"][t]) * cell_area
                objects.append(_object_record(host["missing_box"][t], area, sx, sy, "missing",
                                              float(host["missing_score"][t])))
            score = float(host["scores"][bi])

            def at_input_size(amap: np.ndarray) -> np.ndarray:
                resized = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR) if (h, w) != (size, size) else amap
                return resized.astype(np.float32)

            results.append(
                InspectionResult(
                    score=score,
                    verdict="fail" if score > threshold else "pass",
                    threshold=float(threshold),
                    heatmap=at_input_size(host["maps"][bi]),
                    objects=objects,
                    backend=self.backend,
                    components={name: float(host[f"component_{name}"][bi]) for name in branch_maps},
                    branch_scores=branch_z_scores({name: float(host[f"component_{name}"][bi]) for name in branch_maps},
                                                  self.normalisation if self.config.score.source == "fused" else None),
                    component_maps={name: at_input_size(host[f"component_map_{name}"][bi]) for name in kept} or None,
                )
            )
        return results


def read_counts(counts: Tensor) -> list[int]:
    """(n,) integer tensor -> list of n ints, in ONE small device -> host read: the sizes of the
    measure stage's data-dependent lists of cells (its only host sync before `to_host`)."""
    return counts.tolist()


def true_indices(mask: Tensor, count: int) -> Tensor:
    """Column indices of the True entries of each row of a bool mask (R, n), in order, padded
    with n to `count` columns (count >= any row's number of True, from `read_counts`): (R, count).
    What torch.nonzero gives per row, without its host sync."""
    r, n = mask.shape
    slot = torch.where(mask, mask.cumsum(1) - 1, count)  # output column; `count` is a spare one for False
    out = torch.full((r, count + 1), n, dtype=torch.long, device=mask.device)
    out.scatter_(1, slot, torch.arange(n, device=mask.device).expand(r, n))
    return out[:, :count]


def to_host(tensors: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """Copy named tensors to the host in ONE transfer: packed into one float32 vector on their
    device, `.cpu()` once, split into arrays of the original shapes (bool tensors come back as
    bool arrays; float32 holds every other value here exactly)."""
    packed = torch.cat([t.reshape(-1).float() for t in tensors.values()])
    flat = packed.cpu().numpy()
    out, start = {}, 0
    for name, t in tensors.items():
        part = flat[start : start + t.numel()].reshape(t.shape)
        out[name] = part > 0.5 if t.dtype == torch.bool else part
        start += t.numel()
    return out


def _distinct_parts(missing: np.ndarray, overlap: np.ndarray) -> list[int]:
    """Missing candidates to report, in candidate order: each one unless its mask overlaps
    (soft IoU > 0.3) one already reported (the same part seen in several references).
    missing (U,) bool, overlap (U, U) -> candidate indices."""
    kept: list[int] = []
    for t in np.flatnonzero(missing):
        if not any(overlap[t, s] > 0.3 for s in kept):
            kept.append(int(t))
    return kept


def soft_overlaps(masks: Tensor) -> Tensor:
    """Pairwise soft IoU sum(min) / sum(max) (0 where both are empty) of masks (..., T, P) -> (..., T, T).

    With L1 = sum |a - b| and S = sum a + sum b: sum min(a, b) = (S - L1) / 2 and
    sum max(a, b) = (S + L1) / 2, so one torch.cdist(p=1) gives both without a (T, T, P) tensor."""
    l1 = torch.cdist(masks, masks, p=1)
    mass = masks.sum(-1)
    total = mass[..., :, None] + mass[..., None, :]
    union = total + l1
    return torch.where(union > 0, (total - l1) / union.clamp_min(1e-12), torch.zeros_like(union))


def _dilate(masks: Tensor, cells: int = 2) -> Tensor:
    """Grey dilation of masks (..., H, W) by `cells` pixels in every direction (a square max
    filter, done as a row then a column max filter)."""
    h, w = masks.shape[-2:]
    flat = masks.reshape(-1, 1, h, w)
    if flat.shape[0] == 0:
        return masks
    size = 2 * cells + 1
    rows = F.max_pool2d(flat, (1, size), stride=1, padding=(0, cells))
    return F.max_pool2d(rows, (size, 1), stride=1, padding=(cells, 0)).view(masks.shape)


def _object_record(box: np.ndarray, area: float, sx: float, sy: float, status: str, score: float) -> dict:
    """Object dict in input pixels from a box (x, y, w, h) and area in working pixels."""
    x, y, w, h = box.tolist()
    return {
        "bbox": [round(x * sx, 1), round(y * sy, 1), round(w * sx, 1), round(h * sy, 1)],
        "area": round(area * sx * sy, 1),
        "status": status,
        "score": round(float(score), 4),
    }
