"""The Inspector composes the detector stages: a batch of images -> scores, maps, objects.

    preprocess  list of RGB uint8 (H, W, 3) -> images01 (B, 3, S, S); a mono bank's grey
                (H, W) -> (B, 1, S, S)
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
pipeline (`PIPELINE_GROUPS`, one thread each). The Inspector only orchestrates: it binds the
config, the models and the bank to the stages' math, which lives in `describe` (masks ->
descriptors), `match` (OMM), `align` (moving reference parts onto query parts), `measure`
(AMM and the other score branches' maps) and `report` (maps -> InspectionResult).

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
from torch import Tensor

from linewatch.config import DetectorConfig
from linewatch.detector.align import AlignedPairs, aligned_pairs
from linewatch.detector.backends import get_backend
from linewatch.detector.bank import BankError, TemplateBank
from linewatch.detector.calibration import Calibration
from linewatch.detector.describe import masked_global_max_pool, padded_soft_masks, part_textures
from linewatch.detector.identity import MIN_SPREAD, identity_descriptors, identity_distances, slot_spreads
from linewatch.detector.match import match_objects, matching_vectors
from linewatch.detector.measure import (identity_map, missing_parts, object_maps, object_statuses, part_maps,
                                        read_counts, rows_per_chunk, true_indices, unmatched_reference_parts)
from linewatch.detector.models import Models
from linewatch.detector.patch_knn import PatchIndex, local_patch_features
from linewatch.detector.report import build_results
from linewatch.detector.result import InspectionResult
from linewatch.detector.segment import ObjectMasks, interior_points
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
    upsampled: (B, C, H', W'); masks: the segmenter's ObjectMasks (B, M, S, S); soft_masks: (B, M, H', W');
    valid: (B, M) bool; boxes: (B, M, 4) x, y, w, h in working pixels; descriptors: (B, M, C);
    shapes: (B, M, D) outline descriptors, textures: (B, M, T) grain statistics (None when
    the backend does not use them).
    """

    features: Tensor | None = None
    upsampled: Tensor | None = None
    masks: ObjectMasks | None = None
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


def to_images01(images: list[np.ndarray], size: int, device: torch.device) -> Tensor:
    """RGB uint8 (H, W, 3) images -> (B, 3, size, size), grey uint8 (H, W) images -> (B, 1, size,
    size), float in [0, 1] on `device` (one kind per batch). The resize (OpenCV's area filter)
    runs on the host; the uint8 result crosses to the device as in `frames_to_device` (pinned,
    non-blocking on CUDA) and becomes float there."""
    resized = [
        cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA) if img.shape[:2] != (size, size) else img
        for img in images
    ]
    channels = 1 if resized[0].ndim == 2 else 3
    return frames_to_device(resized, device, channels).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def frames_to_device(images: list[np.ndarray], device: torch.device, channels: int = 3) -> Tensor:
    """uint8 images of one size, RGB (H, W, 3) or grey (H, W) -> uint8 (B, H, W, channels) on
    `device`; a grey image into 3 channels is replicated (SAM takes RGB frames). On CUDA through
    a pinned host buffer and a non-blocking copy (PyTorch's pinned-memory cache keeps the
    buffer until the copy has completed, so it is neither reused early nor allocated anew)."""
    h, w = images[0].shape[:2]
    host = torch.empty((len(images), h, w, channels), dtype=torch.uint8, pin_memory=device.type == "cuda")
    array = host.numpy()
    for i, image in enumerate(images):
        array[i] = image[..., None] if image.ndim == 2 else image
    return host.to(device, non_blocking=True) if device.type == "cuda" else host


def pipeline_stages(run: Callable[[Batch, tuple[str, ...]], Batch]) -> list[tuple[str, Callable[[Any], Any]]]:
    """(name, function) per `PIPELINE_GROUPS` entry, each running its stages through `run`: the
    first takes a list of RGB uint8 images, the last returns a list of InspectionResult."""

    def group(names: tuple[str, ...], first: bool, last: bool) -> Callable[[Any], Any]:
        def fn(data: Any) -> Any:
            batch = Batch(images=list(data)) if first else data
            batch = run(batch, names)
            return batch.results if last else batch
        return fn

    n = len(PIPELINE_GROUPS)
    return [("_".join(names), group(names, i == 0, i == n - 1)) for i, names in enumerate(PIPELINE_GROUPS)]


class Inspector:
    """Judges batches of images against a template bank: binds the config, the models and the
    bank to the stages' math (`align`, `describe`, `match`, `measure`, `report`) and runs them.

    `inspect(images)` runs every stage; the runtime runs `stages` as a pipeline instead.
    """

    OBJECT_CHUNK_ELEMENTS = 16 * 1024 * 1024  # floats held at once by one chunk of the measure stage (CPU)
    CUDA_CHUNK_ELEMENTS = 256 * 1024 * 1024  # on a GPU (1 GiB of fp32): a batch in one or two chunks, few launches

    def __init__(self, config: DetectorConfig, models: Models, bank: TemplateBank | None, device: torch.device):
        self.config = config
        self.models = models
        self.device = device
        self.bank = bank.to(device) if bank is not None else None
        self.backend = config.backend
        self.descriptor_mean: Tensor | None = None
        self.seed_points: Tensor | None = None  # (N, M, 2) a point inside each bank part, for seeded prompts
        self.shape_mean: Tensor | None = None  # mean outline descriptor of the bank's parts, when outlines are used
        self.patch_index: PatchIndex | None = None  # the bank's patch features, for the patch branch
        self.slot_spreads: Tensor | None = None  # (Z, N) how near each bank part is to its slot's others (identity)
        self.bank_identities: Tensor | None = None  # (Z, N, D) the bank parts' identity descriptors
        self.slot_floor = 1.0  # the least spread a slot is given (identity)
        self.normalisation: dict | None = None  # each branch's spread on good images (fusion.branch_normalisation)
        self.keep_component_maps = False  # evaluation: results carry each branch's map too
        if bank is not None:
            bank.check_identity(self.identity(), source=f"bank {bank.bank_id}", settings=config.fingerprint_settings())
            if list(bank.manifest.sample_window) != list(config.sample_window):
                raise BankError(
                    f"bank {bank.bank_id}: its 16-bit images were scaled through detector.sample_window "
                    f"{list(bank.manifest.sample_window)}, this config has {list(config.sample_window)}; frames must "
                    "be read as the good images were: set it back or rebuild the bank")
            if bank.size < config.k_references:
                raise BankError(
                    f"bank {bank.bank_id} holds {bank.size} good images, fewer than detector.k_references = "
                    f"{config.k_references}; lower k_references or rebuild the bank with more good images"
                )
            # the bank's fitted state (the classic background model) on models of this inspector
            # alone: `models` stay as given, so other banks' inspectors may share them
            self.models = get_backend(config.backend).load_state(models, bank.segmenter_state)
            if config.matching.center_descriptors:  # see match.matching_vectors
                self.descriptor_mean = self.bank.descriptors[self.bank.object_valid].mean(0)
            if self.models.segmenter.wants_seeds:
                self.seed_points = interior_points(self.bank.masks.float())
            # a part whose good-image maps are nearly flat must not turn tiny differences into alarms
            noise = self.bank.object_noise[self.bank.object_valid]
            self.noise_floor = float(noise.median()) * 0.25 if noise.numel() else 1.0
            if self.uses_shapes:
                good_shapes = self.bank.shapes[self.bank.object_valid]
                self.shape_mean = good_shapes.mean(0) if good_shapes.numel() else None
                if config.measure.identity_weight > 0:  # linewatch.detector.identity
                    self.bank_identities = (identity_descriptors(self.bank.shapes, self.bank.masks)
                                            if config.measure.identity_descriptor == "outline_and_moment"
                                            else self.bank.shapes)
                    self.slot_spreads = slot_spreads(self.bank_identities, self.bank.boxes, self.bank.object_valid)
                    spread = self.slot_spreads[self.bank.object_valid & (self.slot_spreads > 0)]
                    self.slot_floor = max(float(spread.median()) * 0.25 if spread.numel() else 1.0, MIN_SPREAD)
            if config.score.source != "objects":
                self.patch_index = PatchIndex(local_patch_features(self._backbone_maps(self.bank.retrieval)),
                                              config.score.patch_dims)
            self.normalisation = self.bank.manifest.score_normalisation

    @property
    def uses_shapes(self) -> bool:
        """Whether parts carry outline descriptors and grain statistics (classic.shape_weight > 0)."""
        return self.models.shape_weight > 0

    def _backbone_maps(self, retrieval: Tensor) -> Tensor:
        """Flattened backbone features (n, C*h*w), as the bank keeps them -> (n, C, h, w)."""
        side = self.config.image_size // self.models.backbone.stride
        c = self.models.backbone.channels_for(grey=self.colour_mode == "mono")
        if retrieval.shape[1] != c * side * side:
            raise BankError(f"bank {self.bank_id}: its retrieval vectors have {retrieval.shape[1]} values, the backbone "
                            f"gives {c} x {side} x {side}; rebuild the bank")
        return retrieval.float().view(-1, c, side, side)

    def identity(self) -> dict[str, str]:
        backend = get_backend(self.config.backend)
        return {"backend": backend.name, **backend.identity(self.models), "config_hash": self.config.identity_hash()}

    @property
    def bank_id(self) -> str:
        return self.bank.bank_id if self.bank is not None else "none"

    # ------------------------------------------------------------------ running the stages

    @property
    def bank_images(self) -> int:
        """Good images in the bank (0 without one): shown in linewatch_bank_info."""
        return self.bank.size if self.bank is not None else 0

    @property
    def frame_size(self) -> tuple[int, int] | None:
        """(height, width) of the frames it judges: the bank's good images' (None without a bank).
        The runtime refuses a frame declaring another size before decoding it."""
        shape = self.bank.manifest.source_shape if self.bank is not None else None
        return (int(shape[0]), int(shape[1])) if shape else None

    @property
    def colour_mode(self) -> str | None:
        """"colour" or "mono": the frames its bank judges (None without a bank: either). The
        runtime refuses a grey frame on a colour bank, and a colour one on a mono bank, before
        decoding it."""
        return self.bank.manifest.colour_mode if self.bank is not None else None

    @property
    def sample_window(self) -> tuple[int, int]:
        """[low, high] through which 16-bit frames are scaled to 8 bits (detector.sample_window,
        the bank's)."""
        low, high = self.config.sample_window
        return int(low), int(high)

    @property
    def calibration(self) -> Calibration | None:
        """The bank's threshold and the good scores it came from (None without a bank)."""
        return self.bank.calibration if self.bank is not None else None

    @property
    def stages(self) -> list[tuple[str, Callable[[Any], Any]]]:
        """Stage functions for the runtime (`pipeline_stages` of `run`)."""
        return pipeline_stages(self.run)

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
        shape = self.bank.manifest.source_shape[:2] + ([] if self.colour_mode == "mono" else [3])  # needs a bank
        blank = np.full(shape, 128, dtype=np.uint8)
        for size in sorted(set(batch_sizes)):
            self.inspect([blank] * size)

    def inspect(self, images: list[np.ndarray], exclude: Tensor | None = None) -> list[InspectionResult]:
        """Run every stage on a batch of RGB uint8 (H, W, 3) images, or grey (H, W) ones for a mono
        bank. `exclude` (B,): a bank index each image must not be compared with (itself, in
        leave-one-out calibration)."""
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
        if self.patch_index is not None:
            r = min(self.config.score.patch_images, self.bank.size - (0 if batch.exclude is None else 1))
        nearest = self.bank.retrieve(retrieval, max(k, r), batch.exclude)
        batch.references = nearest[:, :k]
        batch.patch_references = nearest[:, :r] if r else None

    # ------------------------------------------------------------------ stages

    def preprocess(self, batch: Batch) -> Batch:
        for i, img in enumerate(batch.images):
            self.check_image(img, f"image {i}")
        if len({img.ndim for img in batch.images}) > 1:
            raise InputError("the images of one batch must be all grey or all colour")
        batch.sizes = [img.shape[:2] for img in batch.images]
        batch.images01 = to_images01(batch.images, self.config.image_size, self.device)
        if self.models.segmenter.wants_frames:  # RGB frames: a grey one as three equal channels
            if len(set(batch.sizes)) > 1:
                raise InputError(f"the images of one batch must have one size, got {sorted(set(batch.sizes))}")
            batch.frames = frames_to_device(batch.images, self.device, channels=3)
        return batch

    def check_image(self, image: np.ndarray, name: str) -> None:
        """Refuse images the bank cannot judge: not RGB uint8 (H, W, 3) or grey uint8 (H, W), grey
        on a colour bank or colour on a mono bank, or another size than the good images."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or not (
                image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            shape = getattr(image, "shape", None)
            dtype = getattr(image, "dtype", type(image).__name__)
            raise InputError(f"{name}: expected an RGB uint8 image (H, W, 3) or a grey one (H, W), "
                             f"got shape {shape} dtype {dtype}")
        mode = self.colour_mode
        if mode is not None and (image.ndim == 2) != (mode == "mono"):
            kind = "grey" if image.ndim == 2 else "colour"
            raise InputError(f"{name}: a {kind} image; the bank judges {'grey (mono)' if mode == 'mono' else 'colour'} "
                             "images (built from " + ("grey" if mode == "mono" else "colour") + " good images)")
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
        if self.models.segmenter.wants_seeds and self.seed_points is not None:
            refs = batch.references  # (B, k): one prompt inside each part of each reference
            seeds = (self.seed_points[refs].flatten(1, 2), self.bank.object_valid[refs].flatten(1, 2))
        batch.encoded.masks = self.models.segmenter.segment(batch.images01, frames=batch.frames,
                                                            seeds=seeds).to(self.device)
        return batch

    @torch.inference_mode()
    def describe(self, batch: Batch) -> Batch:
        enc = batch.encoded
        size = tuple(enc.upsampled.shape[-2:])
        enc.soft_masks, enc.valid, enc.boxes = padded_soft_masks(enc.masks.masks, enc.masks.valid, size)
        pooled = masked_global_max_pool(enc.upsampled, enc.soft_masks)
        enc.descriptors = self.models.dcga(pooled, enc.valid)
        if self.uses_shapes:
            enc.shapes = shape_descriptors(enc.masks.per_image(), enc.boxes)  # masks and boxes at the working size
            enc.textures = part_textures(self.models.backbone.texture_channels(enc.features.float()), enc.soft_masks)
        return batch

    @torch.inference_mode()
    def match(self, batch: Batch) -> Batch:
        """OMM of each query image's objects with each of its k references (batched over B*k)."""
        if self.bank is None:
            raise RuntimeError("match needs a template bank")
        enc, refs, cfg, bank = batch.encoded, batch.references, self.config.matching, self.bank
        (b, k), m, flat = refs.shape, enc.descriptors.shape[1], refs.flatten()

        def vectors(descriptors: Tensor, shapes: Tensor | None) -> Tensor:
            return matching_vectors(descriptors, shapes if self.uses_shapes else None, self.descriptor_mean,
                                    self.shape_mean, self.models.shape_weight)

        query, reference = vectors(enc.descriptors, enc.shapes), vectors(bank.descriptors[flat], bank.shapes[flat])
        batch.match = match_objects(  # (B*k) query/reference pairs
            query[:, None].expand(b, k, m, -1).reshape(b * k, m, -1), reference,
            enc.valid[:, None].expand(b, k, m).reshape(b * k, m), bank.object_valid[flat],
            dustbin=cfg.dustbin, threshold=cfg.match_threshold, iterations=cfg.sinkhorn_iterations,
            score_scale=cfg.score_scale,
        )
        return batch

    @torch.inference_mode()
    def measure(self, batch: Batch) -> Batch:
        """AMM: per-object Mahalanobis maps against the matched (or closest) reference objects
        (eqs. 11-15), plus missing-part and surplus maps and the score branches; then image
        scores and results (`linewatch.detector.measure`, `linewatch.detector.report`).

        The device is read back twice per batch, whatever the number of objects: `read_counts`
        (the sizes of the cell lists to compute) and `to_host` (everything the results need)."""
        enc, refs, bank, cfg = batch.encoded, batch.references, self.bank, self.config.measure
        b, k = refs.shape
        assigned, is_matched, is_surplus, ref_matches = object_statuses(batch.match, enc.valid, k)
        pairs = self._aligned_pairs(batch, assigned, is_matched)
        unmatched, unmatched_cells = unmatched_reference_parts(refs, bank, ref_matches)
        counts = read_counts(torch.cat([pairs.in_box.reshape(b, -1).sum(1), unmatched.sum().view(1),
                                        unmatched_cells.sum().view(1)]))
        most_cells, n_unmatched, n_unmatched_cells = max(counts[:b], default=0), counts[b], counts[b + 1]

        object_maps = batch.object_maps = self._object_maps(batch, pairs, most_cells)
        if cfg.normalize_objects:
            # each part's map in units of what that part's map reaches on good images
            noise = bank.object_noise[refs[:, :, None], assigned].mean(1)  # (B, M)
            object_maps = object_maps / noise.clamp_min(self.noise_floor)[..., None, None]
        weights = torch.where(is_surplus, cfg.surplus_weight, 1.0)
        image_maps = (object_maps * weights[..., None, None] * enc.valid[..., None, None]).sum(1)  # eq. 15
        if self.slot_spreads is not None:  # each part against the good parts of its place (beyond the paper)
            descriptors = (identity_descriptors(enc.shapes, enc.soft_masks)
                           if cfg.identity_descriptor == "outline_and_moment" else enc.shapes)
            identity = identity_distances(descriptors, enc.boxes, enc.valid,
                                          self.bank_identities, bank.boxes, bank.object_valid,
                                          self.slot_spreads, self.slot_floor, batch.exclude)
            image_maps = image_maps + cfg.identity_weight * identity_map(identity, enc.soft_masks)
        missing_maps, missing = missing_parts(
            enc.upsampled, refs, bank, true_indices(unmatched.reshape(1, -1), n_unmatched)[0],
            true_indices(unmatched_cells.reshape(1, -1), n_unmatched_cells)[0], cfg.eps,
            self.noise_floor if cfg.normalize_objects else None, self._chunk_floats)
        branch_maps = {"objects": image_maps + cfg.missing_part_weight * missing_maps}  # (B, H', W') each
        if self.config.score.source != "objects":  # the patch branch (linewatch.detector.patch_knn): (B, h, w)
            branch_maps["patch"] = self.patch_index.distances(local_patch_features(enc.features),
                                                              self.config.score.patch_window, batch.patch_references)
            if self.uses_shapes:
                branch_maps.update(part_maps(enc.shapes, enc.textures, enc.valid, enc.soft_masks, bank, batch.exclude))
        threshold = self.bank.threshold  # inf while the bank builder calibrates
        batch.results = build_results(
            branch_maps, object_maps, is_matched, is_surplus, missing, enc.soft_masks, enc.boxes, enc.valid,
            batch.sizes, image_size=self.config.image_size, smoothing_sigma=cfg.smoothing_sigma,
            normalisation=self.normalisation, source=self.config.score.source, threshold=threshold,
            backend=self.backend, keep_component_maps=self.keep_component_maps)
        return batch

    def _aligned_pairs(self, batch: Batch, assigned: Tensor, is_matched: Tensor) -> AlignedPairs:
        """`align.aligned_pairs` of the batch's objects under measure.align_max_shift / _rotation_deg."""
        hf, wf = batch.encoded.upsampled.shape[-2:]
        return aligned_pairs(batch.encoded.soft_masks, batch.encoded.valid, batch.references, assigned, is_matched,
                             self.bank.masks, self.config.measure.align_max_shift * max(hf, wf),
                             math.radians(self.config.measure.align_max_rotation_deg), self._chunk_floats)

    def _object_maps(self, batch: Batch, pairs: AlignedPairs, most_cells: int) -> Tensor:
        """`measure.object_maps` of the batch's aligned pairs: (B, M, H', W')."""
        return object_maps(batch.encoded.upsampled, batch.references, self.bank.features, pairs, most_cells,
                           self.config.measure.eps, self._chunk_floats)

    @property
    def _chunk_floats(self) -> int:
        return self.CUDA_CHUNK_ELEMENTS if self.device.type == "cuda" else self.OBJECT_CHUNK_ELEMENTS

    def _chunk_size(self, floats_per_row: int) -> int:
        """Rows (pairs, images or cells) per chunk so that a chunk holds about OBJECT_CHUNK_ELEMENTS floats."""
        return rows_per_chunk(self._chunk_floats, floats_per_row)

