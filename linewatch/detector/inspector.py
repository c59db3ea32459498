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
too many ("surplus"). Both show in the heatmap and in the object list.
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

from linewatch.config import Config, DetectorConfig
from linewatch.detector.bank import BankError, TemplateBank
from linewatch.detector.describe import masked_global_max_pool, resize_masks
from linewatch.detector.match import match_objects
from linewatch.detector.measure import mahalanobis
from linewatch.detector.models import Models
from linewatch.detector.result import InspectionResult
from linewatch.detector.segment import interior_points


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
    valid: (B, M) bool; boxes: (B, M, 4) x, y, w, h in working pixels; descriptors: (B, M, C).
    """

    features: Tensor | None = None
    upsampled: Tensor | None = None
    masks: list[Tensor] | None = None
    soft_masks: Tensor | None = None
    valid: Tensor | None = None
    boxes: Tensor | None = None
    descriptors: Tensor | None = None

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


def to_images01(images: list[np.ndarray], size: int, device: torch.device) -> Tensor:
    """RGB uint8 (H, W, 3) images -> (B, 3, size, size) float in [0, 1] on `device`."""
    resized = [
        cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA) if img.shape[:2] != (size, size) else img
        for img in images
    ]
    array = np.stack(resized).astype(np.float32) / 255.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous().to(device)


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
    """Per-image bool masks (M_b, S, S) -> soft masks (B, M, H', W'), valid (B, M), boxes (B, M, 4)."""
    b = len(masks)
    m = max([int(x.shape[0]) for x in masks] + [1])
    soft = torch.zeros(b, m, *size, device=device)
    valid = torch.zeros(b, m, dtype=torch.bool, device=device)
    boxes = torch.zeros(b, m, 4, device=device)
    for i, mask in enumerate(masks):
        n = int(mask.shape[0])
        if n == 0:
            continue
        mask = mask.to(device)
        soft[i, :n] = resize_masks(mask[None].float(), size)[0]
        valid[i, :n] = True
        boxes[i, :n] = mask_boxes(mask)
    return soft, valid, boxes


def mask_boxes(masks: Tensor) -> Tensor:
    """Bounding boxes (M, 4) as x, y, w, h of bool masks (M, H, W); zeros for empty masks."""
    rows = masks.any(dim=2)  # (M, H)
    cols = masks.any(dim=1)  # (M, W)
    out = torch.zeros(masks.shape[0], 4, device=masks.device)
    for i in range(masks.shape[0]):
        ys = torch.nonzero(rows[i]).flatten()
        xs = torch.nonzero(cols[i]).flatten()
        if len(ys):
            out[i] = torch.tensor(
                [xs[0], ys[0], xs[-1] - xs[0] + 1, ys[-1] - ys[0] + 1], dtype=torch.float32, device=masks.device
            )
    return out


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
    scale = torch.tensor([w, h], device=ref_masks.device, dtype=ref_masks.dtype)
    cqn = ((2 * cq + 1) / scale - 1)[:, None].expand(q, k, 2)
    crn = (2 * cr + 1) / scale - 1
    cos, sin = torch.cos(turn), torch.sin(turn)
    rot = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # R(-turn), (q, k, 2, 2)
    offset = crn - (rot @ cqn[..., None])[..., 0]
    theta = torch.cat([rot, offset[..., None]], dim=-1)  # (q, k, 2, 3)
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], device=theta.device, dtype=theta.dtype)
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
        if bank is not None:
            bank.check_identity(self.identity(), source=f"bank {bank.bank_id}", settings=config.fingerprint_settings())
            if bank.size < config.k_references:
                raise BankError(
                    f"bank {bank.bank_id} holds {bank.size} good images, fewer than detector.k_references = "
                    f"{config.k_references}; lower k_references or rebuild the bank with more good images"
                )
            if bank.segmenter_state:
                self.models.segmenter.load_state_dict(bank.segmenter_state)
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

    # ------------------------------------------------------------------ identity

    def identity(self) -> dict[str, str]:
        return {
            "backend": self.config.backend,
            "backbone": self.models.backbone.identity,
            "upsampler": self.models.upsampler.identity,
            "segmenter": self.models.segmenter.identity,
            "config_hash": self.config.identity_hash(),
        }

    @property
    def bank_id(self) -> str:
        return self.bank.bank_id if self.bank is not None else "none"

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
        shape = tuple(self.bank.manifest["source_shape"][:2]) if self.bank is not None else (self.config.image_size,) * 2
        blank = np.full((*shape, 3), 128, dtype=np.uint8)
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
        batch.sizes = [tuple(bank.manifest["source_shape"][:2])] * len(indices)
        enc = batch.encoded
        enc.upsampled = bank.features[indices].float()
        enc.soft_masks = bank.masks[indices].float()
        enc.valid = bank.object_valid[indices]
        enc.boxes = bank.boxes[indices]
        enc.descriptors = bank.descriptors[indices]
        batch.references = bank.retrieve(bank.retrieval[indices], self.config.k_references, indices)
        return batch

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
            expected = self.bank.manifest.get("source_shape")
            if expected and list(image.shape[:2]) != list(expected[:2]):
                raise InputError(
                    f"{name}: image is {image.shape[1]}x{image.shape[0]} but the bank's good images are "
                    f"{expected[1]}x{expected[0]}; use the same camera setup or rebuild the bank"
                )

    @torch.inference_mode()
    def backbone(self, batch: Batch) -> Batch:
        batch.encoded.features = self.models.backbone(batch.images01)
        if self.bank is not None:
            batch.references = self.bank.retrieve(batch.encoded.retrieval, self.config.k_references, batch.exclude)
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
        (eqs. 11-15), plus missing-part and surplus maps; then image scores and results."""
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

        object_maps = self._object_maps(batch, assigned, is_matched)
        batch.object_maps = object_maps
        if cfg.normalize_objects:
            # each part's map in units of what that part's map reaches on good images
            noise = bank.object_noise[refs[:, :, None], assigned].mean(1)  # (B, M)
            object_maps = object_maps / noise.clamp_min(self.noise_floor)[..., None, None]
        weights = torch.where(is_surplus, cfg.surplus_weight, 1.0)
        image_maps = (object_maps * weights[..., None, None] * enc.valid[..., None, None]).sum(1)  # eq. 15

        missing_maps, missing_objects = self._missing_parts(batch, ref_matches)
        image_maps = image_maps + cfg.missing_part_weight * missing_maps

        batch.results = self._results(batch, image_maps, object_maps, is_matched, is_surplus, missing_objects)
        return batch

    def _object_maps(self, batch: Batch, assigned: Tensor, is_matched: Tensor) -> Tensor:
        """Mahalanobis map (B, M, H', W') of every valid query object against the k reference
        objects it matched or is closest to (eqs. 11-12), in chunks of objects to bound memory.

        Beyond the paper: a matched reference object is first moved onto the query object
        (translation of mask centroids, and rotation of the principal axes of elongated
        parts) when that motion is within `measure.align_max_shift` / `align_max_rotation_deg`.
        Parts shift and turn a little on any real line; without this their edges dominate the
        map of a good part. A larger displacement is not undone, so a part in the wrong place
        still scores at both places.
        """
        enc, refs, bank, eps = batch.encoded, batch.references, self.bank, self.config.measure.eps
        b, m = enc.valid.shape
        hf, wf = enc.upsampled.shape[-2:]
        max_shift = self.config.measure.align_max_shift * max(hf, wf)
        maps = torch.zeros(b, m, hf * wf, device=self.device)
        pairs = torch.nonzero(enc.valid)  # (Q, 2): image, object
        k = refs.shape[1]
        chunk = max(1, int(self.OBJECT_CHUNK_ELEMENTS // (4 * k * hf * wf)))  # masks and grids per object
        for start in range(0, len(pairs), chunk):
            bi, oi = pairs[start:start + chunk].unbind(1)
            query_masks = enc.soft_masks[bi, oi]  # (q, H', W')
            z = refs[bi]  # (q, k)
            ref_masks = bank.masks[z, assigned[bi, :, oi]].float()  # (q, k, H', W')
            grids = reference_grids(query_masks, ref_masks, is_matched[bi, oi] & (max_shift > 0), max_shift,
                                    math.radians(self.config.measure.align_max_rotation_deg))  # (q, k, H', W', 2)
            ref_masks = warp(ref_masks.view(-1, 1, hf, wf), grids.view(-1, hf, wf, 2)).view(-1, k, hf, wf)
            # Outside the query mask and every reference mask both sides are zero and so is the
            # distance: compute each object only inside the box around those masks.
            support = (query_masks + ref_masks.sum(1)) > 1e-4  # (q, H', W')
            for j in range(len(bi)):
                rows = torch.nonzero(support[j].any(1)).flatten()
                cols = torch.nonzero(support[j].any(0)).flatten()
                if len(rows) == 0:
                    continue
                y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
                query = enc.upsampled[bi[j], :, y0:y1, x0:x1] * query_masks[j, y0:y1, x0:x1]  # (C, h, w)
                ref_features = warp(bank.features[z[j]].float(), grids[j, :, y0:y1, x0:x1])  # (k, C, h, w)
                references = ref_features * ref_masks[j, :, None, y0:y1, x0:x1]
                box = mahalanobis(query.flatten(1), references.flatten(2), eps)
                maps[bi[j], oi[j]].view(hf, wf)[y0:y1, x0:x1] = box.view(y1 - y0, x1 - x0)
        return maps.view(b, m, hf, wf)

    OBJECT_CHUNK_ELEMENTS = 16 * 1024 * 1024  # floats of masks and grids held at once by _object_maps

    def _missing_parts(self, batch: Batch, ref_matches: Tensor) -> tuple[Tensor, list[list[dict]]]:
        """Reference objects that no query object matches, in more than half of the k references.

        Their map compares the query's features inside the reference mask with the reference
        object's features (K = 1 Gaussian, eps*I covariance), averaged over the references.
        Returns maps (B, H', W') and, per image, the missing objects (box in working pixels).
        """
        enc, refs, bank, eps = batch.encoded, batch.references, self.bank, self.config.measure.eps
        b, k = refs.shape
        hf, wf = enc.upsampled.shape[-2:]
        maps = torch.zeros(b, hf, wf, device=self.device)
        reports: list[list[dict]] = []
        for bi in range(b):
            z = refs[bi]
            unmatched = [
                torch.nonzero(bank.object_valid[z[r]] & (ref_matches[bi, r] < 0)).flatten().tolist() for r in range(k)
            ]
            # dilated masks: a thin part jittered by a cell or two still overlaps itself
            dilated = [{j: _dilate(bank.masks[z[r], j].float()) for j in unmatched[r]} for r in range(k)]
            found: list[dict] = []
            for r in range(k):
                for j in unmatched[r]:
                    mask = bank.masks[z[r], j].float()
                    votes = 1 + sum(
                        any(_overlap(dilated[r][j], other) > 0.3 for other in dilated[o].values())
                        for o in range(k)
                        if o != r
                    )
                    if 2 * votes <= k:
                        continue
                    query = (enc.upsampled[bi] * mask).flatten(1)
                    reference = (bank.features[z[r]].float() * mask).flatten(1)[None]
                    part_map = mahalanobis(query, reference, eps).view(hf, wf)
                    if self.config.measure.normalize_objects:
                        part_map = part_map / bank.object_noise[z[r], j].clamp_min(self.noise_floor)
                    maps[bi] += part_map / k
                    if not any(_overlap(mask, f["mask"]) > 0.3 for f in found):
                        found.append({"mask": mask, "box": bank.boxes[z[r], j], "map": part_map})
            reports.append(found)
        return maps, reports

    def _results(self, batch, image_maps, object_maps, is_matched, is_surplus, missing) -> list[InspectionResult]:
        size = self.config.image_size
        maps = F.interpolate(image_maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        maps = gaussian_blur(maps, self.config.measure.smoothing_sigma)
        scores = maps.flatten(1).amax(1).cpu().numpy()
        threshold = self.bank.threshold if self.bank.manifest["calibration"].get("threshold") is not None else math.inf
        object_scores = object_maps.flatten(2).amax(2).cpu().numpy()
        maps_np = maps.cpu().numpy()
        results = []
        enc = batch.encoded
        cell_area = (size / enc.soft_masks.shape[-1]) ** 2  # working pixels per feature cell
        areas = enc.soft_masks.flatten(2).sum(2).cpu() * cell_area  # (B, M), working pixels
        for bi, (h, w) in enumerate(batch.sizes):
            sx, sy = w / size, h / size
            objects = []
            for i in torch.nonzero(enc.valid[bi]).flatten().tolist():
                status = "matched" if is_matched[bi, i] else ("surplus" if is_surplus[bi, i] else "unmatched")
                objects.append(_object_record(enc.boxes[bi, i], float(areas[bi, i]), sx, sy, status, object_scores[bi, i]))
            for part in missing[bi]:
                area = float(part["mask"].sum()) * cell_area
                objects.append(_object_record(part["box"], area, sx, sy, "missing", float(part["map"].max())))
            score = float(scores[bi])
            heatmap = cv2.resize(maps_np[bi], (w, h), interpolation=cv2.INTER_LINEAR) if (h, w) != (size, size) else maps_np[bi]
            results.append(
                InspectionResult(
                    score=score,
                    verdict="fail" if score > threshold else "pass",
                    threshold=float(threshold),
                    heatmap=heatmap.astype(np.float32),
                    objects=objects,
                    backend=self.backend,
                )
            )
        return results


def _dilate(mask: Tensor, cells: int = 2) -> Tensor:
    """Grey dilation of a (H, W) mask by `cells` pixels in every direction."""
    return F.max_pool2d(mask[None, None], 2 * cells + 1, stride=1, padding=cells)[0, 0]


def _overlap(a: Tensor, b: Tensor) -> float:
    """Soft IoU of two masks of the same size."""
    inter = torch.minimum(a, b).sum()
    union = torch.maximum(a, b).sum()
    return float(inter / union) if union > 0 else 0.0


def _object_record(box: Tensor, area: float, sx: float, sy: float, status: str, score: float) -> dict:
    """Object dict in input pixels from a box (x, y, w, h) and area in working pixels."""
    x, y, w, h = box.tolist()
    return {
        "bbox": [round(x * sx, 1), round(y * sy, 1), round(w * sx, 1), round(h * sy, 1)],
        "area": round(area * sx * sy, 1),
        "status": status,
        "score": round(float(score), 4),
    }


def load_inspector(config: Config, bank_path: str | None = None) -> Inspector:
    """Config + bank file (default: config.bank.path) -> a ready Inspector. The bank's identity
    is checked against the config's models and settings, its threshold against the config's
    false-reject target (BankError naming each difference)."""
    from linewatch.detector.models import build_models, select_device

    path = bank_path or config.bank.path
    bank = TemplateBank.load(path)
    bank.check_calibration(config.calibration.target_false_reject_rate, source=f"bank {path}")
    device = select_device(config.detector.device)
    return Inspector(config.detector, build_models(config.detector, device), bank, device)
