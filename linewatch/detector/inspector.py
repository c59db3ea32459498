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

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import cv2
import numpy as np
import torch
from torch import Tensor

from linewatch.config import DetectorConfig
from linewatch.detector.backends import get_backend
from linewatch.detector.bank import BankError, TemplateBank, image_problem
from linewatch.detector.calibration import Calibration
from linewatch.detector.describe import masked_global_max_pool, padded_soft_masks, part_textures
from linewatch.detector.identity import SlotIdentity, part_identities
from linewatch.detector.match import match_objects, matching_vectors
from linewatch.detector.measure import noise_floor, object_branch, part_maps
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
    the backend does not use them); identities: (B, M, I) identity descriptors (None when part
    identity is off: `Inspector.uses_identity`).
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
    identities: Tensor | None = None

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
        self.slots: SlotIdentity | None = None  # how near each bank part is to its slot's others (identity)
        self.normalisation: dict | None = None  # each branch's spread on good images (fusion.branch_normalisation)
        self.keep_component_maps = False  # evaluation: results carry each branch's map too
        if bank is not None:
            bank.check_identity(self.identity(), source=f"bank {bank.bank_id}", settings=config.fingerprint_settings())
            bank.check_settings(config.sample_window, config.k_references)
            # the bank's fitted state (the classic background model) on models of this inspector
            # alone: `models` stay as given, so other banks' inspectors may share them
            self.models = get_backend(config.backend).load_state(models, bank.segmenter_state)
            if config.matching.center_descriptors:  # see match.matching_vectors
                self.descriptor_mean = self.bank.descriptors[self.bank.object_valid].mean(0)
            if self.models.segmenter.wants_seeds:
                self.seed_points = interior_points(self.bank.masks.float())
            self.noise_floor = noise_floor(self.bank)
            if self.uses_shapes:
                good_shapes = self.bank.shapes[self.bank.object_valid]
                self.shape_mean = good_shapes.mean(0) if good_shapes.numel() else None
            if self.uses_identity:  # linewatch.detector.identity
                if self.bank.identities.shape[-1] == 0:
                    raise BankError(f"bank {bank.bank_id}: it holds no part identities; rebuild it")
                self.slots = SlotIdentity.of_bank(self.bank.identities, self.bank.boxes, self.bank.object_valid,
                                                  config.measure.identity_descriptor, config.measure.identity_margin)
            if config.score.source != "objects":
                self.patch_index = PatchIndex(local_patch_features(self._backbone_maps(self.bank.retrieval)),
                                              config.score.patch_dims)
            self.normalisation = self.bank.manifest.score_normalisation

    @property
    def uses_shapes(self) -> bool:
        """Whether parts carry outline descriptors and grain statistics (classic.shape_weight > 0)."""
        return self.models.shape_weight > 0

    @property
    def uses_identity(self) -> bool:
        """Whether parts carry identity descriptors (outlines are used and measure.identity_weight > 0)."""
        return self.uses_shapes and self.config.measure.identity_weight > 0

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
        enc.identities = bank.identities[indices] if self.uses_identity else None
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
        """Refuse an image the bank cannot judge (`bank.image_problem`: not RGB or grey uint8, grey
        on a colour bank or colour on a mono bank, another size than the good images)."""
        problem = image_problem(image, self.bank.manifest if self.bank is not None else None)
        if problem is not None:
            raise InputError(f"{name}: {problem}")

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
        if self.uses_identity:  # from the masks at the working size, as the outlines
            enc.identities = part_identities(enc.shapes, enc.masks.masks, self.config.measure.identity_descriptor)
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
        (eqs. 11-15), plus missing-part, surplus and identity maps (`measure.object_branch`), the
        other score branches' maps, then image scores and results (`linewatch.detector.report`).
        The device is read back twice per batch, whatever the number of objects: `read_counts`
        (in object_branch) and `to_host` (everything the results need)."""
        enc, bank, cfg = batch.encoded, self.bank, self.config
        identity = None
        if self.slots is not None:  # each part against the good parts of its place (beyond the paper)
            identity = self.slots.distances(enc.identities, enc.boxes, enc.valid, bank.identities, bank.boxes,
                                            bank.object_valid, batch.exclude)
        objects = object_branch(enc.upsampled, enc.soft_masks, enc.valid, batch.references, batch.match, bank,
                                cfg.measure, self.noise_floor, self._chunk_floats, identity)
        batch.object_maps = objects.raw_maps
        branch_maps = {"objects": objects.image_maps}  # (B, H', W') each
        if cfg.score.source != "objects":  # the patch branch (linewatch.detector.patch_knn): (B, h, w)
            branch_maps["patch"] = self.patch_index.distances(local_patch_features(enc.features),
                                                              cfg.score.patch_window, batch.patch_references)
            if self.uses_shapes:
                branch_maps.update(part_maps(enc.shapes, enc.textures, enc.valid, enc.soft_masks, bank, batch.exclude))
        batch.results = build_results(  # bank.threshold: inf while the bank builder calibrates
            branch_maps, objects.object_maps, objects.is_matched, objects.is_surplus, objects.missing, enc.soft_masks,
            enc.boxes, enc.valid, batch.sizes, image_size=cfg.image_size, smoothing_sigma=cfg.measure.smoothing_sigma,
            normalisation=self.normalisation, source=cfg.score.source, threshold=bank.threshold,
            backend=self.backend, keep_component_maps=self.keep_component_maps)
        return batch

    @property
    def _chunk_floats(self) -> int:
        """About how many floats one chunk of the measure stage holds (measure.py's chunk_floats)."""
        return self.CUDA_CHUNK_ELEMENTS if self.device.type == "cuda" else self.OBJECT_CHUNK_ELEMENTS
