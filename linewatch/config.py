"""Typed configuration, loaded from YAML and validated at start-up.

Every key has a default, so an empty file is a valid config (the weights-free demo setup).
Unknown keys are errors (a typo must not silently fall back to a default). Errors name the
file, the key path and the reason. `configs/reference.yaml` lists every key with its meaning.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(Exception):
    """A config file that cannot be used; the message says which file, key and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------- detector


class ObjectFilterConfig(_Section):
    """Which segments count as objects (SAM-LAD 3.4.2), per product."""

    min_area: float = Field(0.002, gt=0, le=1, description="smallest object, fraction of image area")
    max_area: float = Field(0.5, gt=0, le=1, description="largest object, fraction of image area")
    max_objects: int = Field(16, ge=1, le=256, description="keep at most this many (largest first)")

    @model_validator(mode="after")
    def _ordered(self) -> "ObjectFilterConfig":
        if self.min_area >= self.max_area:
            raise ValueError(f"min_area ({self.min_area}) must be below max_area ({self.max_area})")
        return self


class BackendSection(_Section):
    """Settings of one detector backend: the `DetectorConfig` field named like the backend
    (`linewatch.detector.backends`). Only the chosen backend's section is checked (`check`)
    and part of the bank's fingerprint."""

    def check(self, detector: "DetectorConfig") -> None:
        """Raise ValueError when these settings do not fit the rest of `detector`."""


class ClassicBackendConfig(BackendSection):
    """The weights-free backend: classical features, joint bilateral upsampling, colour segmentation."""

    feature_stride: int = Field(4, ge=1, le=32, description="pixels per classical feature cell")
    upsample_stages: int = Field(1, ge=0, le=4, description="2x joint bilateral upsampling stages")
    position_gain: float = Field(2.0, ge=0, le=100, description="weight of the coordinate channels (where a part is)")
    background_threshold: float = Field(6.0, gt=0, description="colour distance (in background std units) above which a pixel is foreground")
    shape_weight: float = Field(1.0, ge=0, le=10, description="each part's outline descriptor: its weight in matching "
                                "(cosine of outlines times weight^2 against the pooled features' cosine) and, when above "
                                "0, its distance to the matched good parts in the part's score (0: outlines unused)")

    def check(self, detector: "DetectorConfig") -> None:
        if detector.image_size % self.feature_stride:
            raise ValueError(
                f"image_size ({detector.image_size}) must be a multiple of classic.feature_stride ({self.feature_stride})"
            )


# FeatUp's published JBU checkpoints (linewatch.detector.weights registry names) -> the image size
# and timm backbone they were trained with (FeatUp's DINOv2 upsampler: ViT-S/14, no registers, 224).
FEATUP_TRAINED_SETUP = {
    "featup_dinov2_jbu": (224, "vit_small_patch14_dinov2.lvd142m"),
    "featup_dinov2_jbu_no_norm": (224, "vit_small_patch14_dinov2.lvd142m"),
}


class SamConfig(_Section):
    kind: Literal["vit_b", "vit_l", "vit_h"] = "vit_b"
    checkpoint: str = Field("sam_vit_b", description="registry name or file path")
    generator: Literal["batched", "segment_anything"] = Field(
        "batched", description="linewatch's batched on-device mask generator, or segment-anything's own (one frame "
        "at a time; for comparison)")
    prompts: Literal["full_grid", "coarse_grid", "reference_seeded"] = Field(
        "full_grid", description="point prompts: points_per_side^2 grid (the paper's), coarse_points_per_side^2 grid, "
        "or one point inside each part of the k reference images plus the coarse grid")
    points_per_side: int = Field(32, ge=1, le=128)
    coarse_points_per_side: int = Field(8, ge=1, le=128, description="the coarse grid's points per side")
    points_per_batch: int = Field(64, ge=1, le=4096)
    pred_iou_thresh: float = Field(0.88, ge=0, le=1)
    stability_score_thresh: float = Field(0.95, ge=0, le=1)
    box_nms_thresh: float = Field(0.7, ge=0, le=1)


class SamLadBackendConfig(BackendSection):
    """The SAM-LAD backend: DINOv2 + FeatUp JBU + SAM (needs the official weights)."""

    weights_dir: str = Field("/var/lib/linewatch/models", description="where `linewatch models download` puts checkpoints")
    backbone: str = Field("vit_small_patch14_dinov2.lvd142m", description="timm model name")
    backbone_checkpoint: str = Field("dinov2_vits14", description="registry name or file path")
    upsampler_checkpoint: str = Field("featup_dinov2_jbu", description="registry name or file path")
    upsample_stages: int = Field(3, ge=0, le=4, description="2x JBU stages; 3 = the paper's 8x")
    upsampler_use_norm: bool = True
    allow_untrained_upsampler_setup: bool = Field(
        False, description="use FeatUp's published JBU with another image size or backbone than it was trained for "
        "(224, ViT-S/14 without registers); its upsampling is then not what FeatUp measured")
    sam: SamConfig = SamConfig()

    def check(self, detector: "DetectorConfig") -> None:
        if detector.image_size % 14:
            raise ValueError(f"image_size must be a multiple of 14 for the DINOv2 backbone, got {detector.image_size}")
        if self.upsampler_checkpoint in FEATUP_TRAINED_SETUP and not self.allow_untrained_upsampler_setup:
            size, backbone = FEATUP_TRAINED_SETUP[self.upsampler_checkpoint]
            if detector.image_size != size or self.backbone != backbone:
                raise ValueError(
                    f"samlad.upsampler_checkpoint {self.upsampler_checkpoint!r} was trained at image_size {size} on "
                    f"{backbone}; this config has image_size {detector.image_size} and {self.backbone}. Use those, or set "
                    "samlad.allow_untrained_upsampler_setup: true to run it outside its training setup on purpose"
                )


class MatchingConfig(_Section):
    """DCGA descriptors and OMM optimal-transport matching (SAM-LAD 3.5)."""

    dcga_kernel_size: int = Field(3, ge=1, le=31, description="1-D conv width of DCGA channel attention (odd)")
    context_weight: float = Field(0.5, ge=0, le=10, description="weight of other objects in a descriptor (DCGA A2 term)")
    center_descriptors: bool = Field(True, description="subtract the bank's mean object descriptor before matching")
    score_scale: float = Field(10.0, gt=0, description="cosine similarities are multiplied by this before Sinkhorn")
    dustbin: float = Field(5.0, description="OT dustbin score z, on the scaled scale (5 with scale 10 = cosine 0.5)")
    match_threshold: float = Field(0.2, ge=0, le=1, description="minimum assignment probability for a match")
    sinkhorn_iterations: int = Field(100, ge=1, le=1000)


class MeasureConfig(_Section):
    """AMM per-position Gaussians (SAM-LAD 3.6) and the image score."""

    eps: float = Field(0.01, gt=0, description="covariance regulariser epsilon*I (eq. 11)")
    align_max_shift: float = Field(0.05, ge=0, le=0.5, description="matched parts displaced by at most this fraction of the image are aligned before comparing (0: never)")
    align_max_rotation_deg: float = Field(20.0, ge=0, le=90, description="elongated matched parts turned by at most this are turned back before comparing")
    smoothing_sigma: float = Field(2.0, ge=0, description="Gaussian blur of the anomaly map, input pixels")
    normalize_objects: bool = Field(True, description="divide each part's map by the level that part reaches on good images (learned at bank build)")
    missing_part_weight: float = Field(1.0, ge=0, description="weight of the map of reference parts absent from the query")
    surplus_weight: float = Field(1.0, ge=0, description="weight of the map of query parts beyond the reference count")
    identity_weight: float = Field(4.0, ge=0, description="weights-free backend: weight in the object map of each "
                                   "part's identity distance to the nearest good part of its place in the bank, beyond "
                                   "identity_margin times how near that place's good parts are to each other (0: off)")
    identity_margin: float = Field(1.5, gt=0, description="weights-free backend: how many times its place's spread a "
                                   "part's identity distance may reach before it counts in the object map")
    identity_descriptor: Literal["outline", "outline_and_moment", "outline_or_moment"] = Field(
        "outline_or_moment", description="weights-free backend: what part identity compares: the outline "
        "descriptor (the part's mask at its box, 4 x 4 cells); that joined with the mask in its own moment frame "
        "('outline_and_moment': centroid, slant sheared away, each axis scaled to its spread; 8 x 8 cells); or, "
        "per place, the one of the two that tells its good parts from the other places' parts best "
        "('outline_or_moment')")


class ScoreConfig(_Section):
    """The image score (beyond the paper): the object branch, a patch branch, or both fused."""

    source: Literal["objects", "patch", "fused"] = Field(
        "fused", description="objects: the SAM-LAD object map; patch: each patch against the same place in the nearest "
        "good images; fused: every branch (objects, patch and, weights-free, part outline and grain) in units of its "
        "spread on the good images (z), softplus(z) summed")
    patch_window: int = Field(1, ge=0, le=8, description="the patch branch compares a patch with good patches up to "
                              "this many feature cells away")
    patch_images: int = Field(32, ge=1, le=64, description="the patch branch compares a frame with this many good images, "
                              "the nearest ones by the backbone features (all of them when the bank holds fewer)")
    patch_dims: int = Field(12, ge=0, le=4096, description="the patch branch searches the nearest good patch on this many "
                            "principal axes of the good patches' variation at each place (0: every channel), then measures the exact "
                            "distance to the patch found")


class DetectorConfig(_Section):
    # one name per backend of linewatch.detector.backends, each with its BackendSection field below
    backend: Literal["classic", "samlad"] = "classic"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    image_size: int = Field(224, ge=28, le=2048, description="images are resized to this square working size")
    sample_window: list[int] = Field(
        default_factory=lambda: [0, 65535], min_length=2, max_length=2,
        description="16-bit images and frames (16-bit PNG, uint16 raw: Mono12/Mono16 cameras) are scaled to 8 bits "
        "through [low, high]: low and below -> 0, high and above -> 255, linear between; the bank records it and "
        "frames are read through the same")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="the models' arithmetic: bf16/fp16 run backbone, upsampler and SAM under autocast; "
        "fp32 on CUDA allows TF32 matrix products")
    compile: bool = Field(False, description="torch.compile the backbone and the SAM image encoder (slower start, "
                          "warmed up before the daemon reports ready)")
    k_references: int = Field(3, ge=1, le=16, description="nearest good images each frame is compared with")
    objects: ObjectFilterConfig = ObjectFilterConfig()
    classic: ClassicBackendConfig = ClassicBackendConfig()
    samlad: SamLadBackendConfig = SamLadBackendConfig()
    matching: MatchingConfig = MatchingConfig()
    measure: MeasureConfig = MeasureConfig()
    score: ScoreConfig = ScoreConfig()

    @model_validator(mode="after")
    def _window(self) -> "DetectorConfig":
        low, high = self.sample_window
        if not 0 <= low < high <= 65535:
            raise ValueError(f"sample_window needs 0 <= low < high <= 65535, got [{low}, {high}]")
        return self

    @model_validator(mode="after")
    def _backend_settings(self) -> "DetectorConfig":
        section = getattr(self, self.backend, None)
        if not isinstance(section, BackendSection):
            raise ValueError(f"backend {self.backend!r} has no settings section detector.{self.backend}")
        section.check(self)
        return self

    def backend_sections(self) -> list[str]:
        """The fields holding a backend's settings (named like their backend)."""
        return [name for name, value in self if isinstance(value, BackendSection)]

    # Settings that change neither what the bank holds nor any score, so a bank stays valid
    # when they change. Every other key of this section is part of the bank's fingerprint
    # (tests/ops/test_configs.py walks the schema, so a new key cannot be left out by mistake).
    NOT_IN_FINGERPRINT: ClassVar[frozenset[str]] = frozenset({
        "device",  # where the same computation runs
        "compile",  # how the same computation runs
        "samlad.weights_dir",  # where checkpoint files are looked up, not which ones
        "samlad.allow_untrained_upsampler_setup",  # a permission; image_size and backbone are in it themselves
        # checked against the bank's manifest (BankManifest.sample_window) instead, where a bank
        # built before the key has the default: such banks stay valid
        "sample_window",
    })

    def fingerprint_settings(self) -> dict[str, object]:
        """Every setting that changes what the template bank holds, a score or the calibrated
        threshold, flattened to "key.path": value (the other backends' sections left out)."""
        dumped = self.model_dump(mode="json")
        for name in self.backend_sections():
            if name != self.backend:
                dumped.pop(name)
        flat: dict[str, object] = {}

        def walk(prefix: str, value: object) -> None:
            if isinstance(value, dict):
                for key, item in value.items():
                    walk(f"{prefix}{key}.", item)
            else:
                flat[prefix[:-1]] = value

        walk("", dumped)
        return {key: value for key, value in sorted(flat.items()) if key not in self.NOT_IN_FINGERPRINT}

    def identity_hash(self) -> str:
        """Hash of `fingerprint_settings()`: a bank built under another value of any of them is refused."""
        blob = json.dumps(self.fingerprint_settings(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class CalibrationConfig(_Section):
    target_false_reject_rate: float = Field(
        0.005, gt=0, lt=0.5, description="fraction of good parts allowed to fail; the threshold is the score the "
        "fitted tail of the good-image scores exceeds with this probability")
    min_validation_images: int = Field(5, ge=1, description="fewer held-out good images than this is an error")
    confidence: float = Field(
        0.95, gt=0, lt=1, description="level of the confidence interval reported for the false-reject rate "
        "(changes no threshold)")


class BankConfig(_Section):
    path: str = Field("bank.lwbank", description="template bank file (built by `linewatch bank build`)")


# ---------------------------------------------------------------- runtime


class EndpointConfig(_Section):
    url: str = Field(..., description="ZeroMQ endpoint, e.g. tcp://*:5555 or tcp://camera-pc:5555")
    mode: Literal["bind", "connect"] = "bind"
    protocol: Literal["linewatch", "imagezmq-pubsub", "imagezmq-reqrep"] = "linewatch"


class IngestConfig(_Section):
    endpoints: list[EndpointConfig] = Field(default_factory=lambda: [EndpointConfig(url="tcp://127.0.0.1:5555")])
    receive_hwm: int = Field(64, ge=1, description="ZMQ receive high-water mark, messages per socket")
    max_payload_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="larger image payloads are refused")
    max_image_pixels: int = Field(50_000_000, ge=1, description="images declaring more pixels (H x W) are refused before decoding")
    max_decoded_bytes: int = Field(200_000_000, ge=1024, description="images whose header declares more decoded bytes are refused before decoding")
    decode_workers: int = Field(2, ge=1, le=32, description="threads decoding admitted frames (the pipeline's first stage)")
    cameras: list[str] = Field(default_factory=list, description="accepted camera ids; empty accepts any")


class BatchConfig(_Section):
    max_batch: int = Field(8, ge=1, le=256)
    max_delay_ms: float = Field(10.0, ge=0, le=10_000, description="a lone frame waits at most this long for company")


class PipelineConfig(_Section):
    stage_queue_size: int = Field(2, ge=1, le=64, description="batches waiting between two stages")
    max_batches_inside: int | None = Field(
        None, ge=1, le=64, description="batches inside the stage graph at once; null: on a GPU one per stage plus one (every stage busy), on a CPU 2")
    max_pending_frames: int = Field(64, ge=1, description="frames waiting for a batch; beyond it the policy sheds")
    shed_policy: Literal["oldest", "newest"] = Field("oldest", description="which waiting frame is answered `shed` when full")
    deadline_ms: float = Field(2000.0, gt=0, description="capture->verdict budget; a frame without a result gets `timeout` then")
    deadline_from: Literal["capture", "receive"] = Field(
        "capture", description="count the deadline from the sender's capture time, or from receive (unsynchronised clocks)")
    clock_skew_tolerance_ms: float = Field(
        1000.0, ge=0, description="a capture time further than this in the future is an error (`capture_in_future`)")


class PublishConfig(_Section):
    protocol: Literal["linewatch"] = Field("linewatch", description="verdict sink: linewatch = wire-format verdicts on a ZeroMQ PUB socket")
    url: str = "tcp://127.0.0.1:5556"
    mode: Literal["bind", "connect"] = "bind"
    send_hwm: int = Field(1000, ge=1)
    heatmap: Literal["none", "png", "float16"] = "none"
    overlay_jpeg: bool = False


class ArchiveConfig(_Section):
    """The verdict archive: every verdict as a row of an SQLite file, images of failed parts beside it."""

    enabled: bool = Field(False, description="keep every verdict in an SQLite archive (linewatch archive query/export)")
    path: str = Field("archive", description="folder of the archive: verdicts.sqlite and images/")
    pass_image_sample: float = Field(0.0, ge=0.0, le=1.0, description="fraction of pass verdicts whose images are kept too (failed parts always)")
    max_age_days: float = Field(90.0, gt=0, description="verdicts and images older than this are deleted")
    max_bytes: int = Field(20 * 1024**3, ge=1024 * 1024, description="the archive's size limit; the oldest images, then rows, go first")
    queue_size: int = Field(256, ge=1, le=100_000, description="image writes waiting for the disk; beyond it they are dropped and counted")
    frame_format: Literal["png", "bmp"] = Field("png", description="file of the frame, both lossless: png (compressed, milliseconds of CPU per picture, tens at 1 MP) or bmp (about twice the disk, next to no CPU)")


class SecurityConfig(_Section):
    """CurveZMQ on the frame and verdict sockets: encryption and an allow-list of client keys.

    All three keys or none: a server key without allowed clients (or the reverse) would look
    secured and not be."""

    server_secret_key: str | None = Field(None, description="the daemon's secret certificate (`linewatch keys generate`)")
    frame_senders: str | None = Field(None, description="folder of public certificates of the senders allowed to send frames")
    verdict_subscribers: str | None = Field(None, description="folder of public certificates of the subscribers allowed to receive verdicts")

    @model_validator(mode="after")
    def _all_or_nothing(self) -> "SecurityConfig":
        keys = {"server_secret_key": self.server_secret_key, "frame_senders": self.frame_senders,
                "verdict_subscribers": self.verdict_subscribers}
        missing = [k for k, v in keys.items() if not v]
        if 0 < len(missing) < len(keys):
            raise ValueError("half-configured CurveZMQ security: set all of server_secret_key, frame_senders and "
                             f"verdict_subscribers, or none; missing {', '.join(missing)}")
        return self

    @property
    def enabled(self) -> bool:
        return self.server_secret_key is not None


class MqttConfig(_Section):
    """An optional second verdict sink: one JSON message per verdict to an MQTT broker
    (linewatch.runtime.sinks.mqtt_client).

    The retained copy goes to `last_topic`, never to `topic`: a broker hands a topic's retained
    message to every new subscriber first, so a reject actuator subscribed to `topic` would get
    an old fail again at each reconnect and could act on it twice (or on the wrong part)."""

    enabled: bool = Field(False, description="publish every verdict to an MQTT broker as JSON")
    host: str = Field("127.0.0.1", min_length=1, description="the broker's host name or address")
    port: int = Field(1883, ge=1, le=65535)
    topic: str = Field("linewatch/{camera}/verdict", description="topic of every verdict (never retained); {camera} is replaced by the camera id")
    last_topic: str = Field("linewatch/{camera}/last", description="topic of the retained copy of the verdicts in `retain`: the last one per camera, for late subscribers")
    qos: Literal[0, 1, 2] = Field(1, description="MQTT quality of service")
    retain: list[Literal["pass", "fail", "error", "timeout", "shed"]] = Field(
        default_factory=lambda: ["fail", "timeout"], description="verdict values also sent retained on last_topic (the broker keeps the last one per topic)")
    client_id: str = Field("", description="MQTT client id; empty: linewatch-<host>-<pid>")
    username: str | None = Field(None, min_length=1, description="user name the broker checks; with password_file for its password")
    password_file: str | None = Field(None, description="file holding the password (its first line): the config itself holds none")
    tls: bool = Field(False, description="connect over TLS (brokers listen on 8883 for it), verifying the broker's certificate and host name")
    tls_ca_file: str | None = Field(None, description="PEM CA certificate(s) the broker's certificate is checked against; none: the system's trusted CAs")
    tls_cert_file: str | None = Field(None, description="PEM client certificate, for a broker that requires one (with tls_key_file)")
    tls_key_file: str | None = Field(None, description="PEM private key of tls_cert_file")
    max_queued: int = Field(10_000, ge=1, le=65_535, description="messages held while the broker is away (QoS 1/2); beyond it they are dropped and counted")
    queue_size: int = Field(1000, ge=1, le=100_000, description="verdicts waiting for the sink's thread; beyond it they are dropped and counted")
    reconnect_min_s: float = Field(1.0, gt=0, le=3600, description="wait before the first connection attempt after a loss or a failed attempt; doubled at each further failure")
    reconnect_max_s: float = Field(10.0, gt=0, le=3600, description="the longest wait between connection attempts (the doubling stops here)")

    @model_validator(mode="after")
    def _topics(self) -> "MqttConfig":
        for name in ("topic", "last_topic"):
            template = getattr(self, name)
            if not template.replace("{camera}", ""):
                raise ValueError(f"{name} {template!r} needs text besides {{camera}} (an unaddressed error verdict has camera \"\")")
            bad = sorted(set(template) & set("+#\0"))
            if bad:
                raise ValueError(f"{name} {template!r} contains {', '.join(map(repr, bad))}: MQTT forbids wildcards (+ #) and NUL in the topic of a message")
        if self.topic == self.last_topic:
            raise ValueError(f"topic and last_topic are both {self.topic!r}; the retained copy needs its own topic "
                             "(retained messages on the verdict topic reach every new subscriber again)")
        if self.password_file and not self.username:
            raise ValueError("password_file is set without a username: set username too")
        tls_files = [name for name in ("tls_ca_file", "tls_cert_file", "tls_key_file") if getattr(self, name)]
        if tls_files and not self.tls:
            raise ValueError(f"{', '.join(tls_files)} set but tls is false: set tls: true (or remove them)")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together: a client certificate needs its key")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(f"reconnect_max_s {self.reconnect_max_s} is below reconnect_min_s {self.reconnect_min_s}")
        return self


class AckedConfig(_Section):
    """An optional verdict channel with an acknowledgement per subscriber (ZeroMQ ROUTER; each
    subscriber a DEALER that says hello with its name and acks every verdict; docs/wire-format.md,
    "Acknowledged verdicts"). The daemon counts, per subscriber, the verdicts it never acked, and
    sends a subscriber that comes back what it missed while still within `budget_ms`."""

    enabled: bool = Field(False, description="open the acknowledged verdict channel (linewatch actuate with actuate.channel: acked)")
    url: str = Field("tcp://127.0.0.1:5557", min_length=1, description="ZeroMQ endpoint the daemon binds; subscribers connect")
    subscribers: list[str] = Field(default_factory=list, description="the subscribers' names (actuate.subscriber); "
                                   "a hello with any other name is refused")
    budget_ms: float = Field(5000.0, gt=0, le=3_600_000, description="a verdict is of use until capture_ts + budget_ms: "
                             "kept for a subscriber until acked, sent again after a reconnect, counted missed after")
    max_unacked: int = Field(10_000, ge=1, le=1_000_000, description="verdicts kept per subscriber; beyond it the "
                             "oldest is counted missed (overflow)")
    absent_after_ms: float = Field(3000.0, ge=1500, description="a subscriber not heard from for this long counts as "
                                   "absent (subscribers ping once a second)")
    queue_size: int = Field(10_000, ge=1, le=1_000_000, description="verdicts waiting for the channel's thread; beyond "
                            "it they are dropped and counted")
    send_hwm: int = Field(10_000, ge=1, description="ZeroMQ send high-water mark per subscriber, messages")

    @model_validator(mode="after")
    def _names(self) -> "AckedConfig":
        if self.enabled and not self.subscribers:
            raise ValueError("acked is enabled without subscribers: name each one (its actuate.subscriber)")
        if len(set(self.subscribers)) != len(self.subscribers):
            raise ValueError(f"acked.subscribers repeat a name: {self.subscribers}")
        for name in self.subscribers:
            if not (0 < len(name) <= 64 and name.isprintable()):
                raise ValueError(f"acked.subscribers: {name!r} is not 1..64 printable characters")
        return self


class MetricsConfig(_Section):
    host: str = Field("127.0.0.1", description="address of the /metrics, /healthz, /readyz server")
    port: int = Field(9108, ge=0, le=65535, description="0 picks a free port")
    tls_cert_file: str | None = Field(None, description="PEM certificate (chain): serve HTTPS instead of HTTP")
    tls_key_file: str | None = Field(None, description="PEM private key of tls_cert_file")
    max_camera_labels: int = Field(64, ge=1, le=10_000, description="camera ids with a metrics label of their own; further ids share the label _other")

    @model_validator(mode="after")
    def _tls_pair(self) -> "MetricsConfig":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together (HTTPS needs both)")
        return self


class LiveConfig(_Section):
    """The live inspection page, served by the metrics server at /live."""

    enabled: bool = Field(True, description="serve the live page at /live on the metrics server")
    recent_failures: int = Field(12, ge=1, le=200, description="failed parts shown (the newest first)")


class ControlConfig(_Section):
    """The control socket: `linewatch bank switch` talks to the running daemon through it."""

    socket: str | None = Field(None, min_length=1, description="path of a Unix socket for `linewatch bank switch` "
                               "(mode 0660); null: no control socket (SIGHUP still switches banks)")


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "console"] = "json"
    capture_native_stderr: bool = Field(True, description="turn what native libraries (libpng, libjpeg, OpenCV) "
                                        "write to stderr into rate-limited log events; false: raw on stderr")


class SelfCheckConfig(_Section):
    """The line's self-check, the master-part routine done by the daemon itself: known-good and
    known-bad reference frames go through the live pipeline on a reserved camera id, at start and
    every `interval_s` (linewatch.runtime.selfcheck). Their verdicts go to the self-check only:
    never to the verdict publisher, MQTT or the archive."""

    enabled: bool = Field(False, description="run the self-check")
    camera: str = Field("_selfcheck", min_length=1, max_length=64, description="the reserved camera id its frames "
                        "carry; frames arriving from a real camera with this id are dropped and counted")
    interval_s: float = Field(3600.0, ge=1.0, description="seconds between two self-checks (the first runs at start "
                              "and after each bank switch)")
    drift_fraction: float = Field(0.9, gt=0, le=1, description="a good reference that passes with a score above this "
                                  "fraction of the threshold fails the self-check as drift")
    good: list[str] = Field(default_factory=list, description="image files of known-good parts; empty: good_count of "
                            "the bank's own good images (from the folder it was built from)")
    good_count: int = Field(2, ge=0, le=64, description="good images taken from the bank when `good` is empty "
                            "(spread evenly over its files)")
    bad: list[str] = Field(default_factory=list, description="image files of known-bad parts (master parts with the "
                           "defect the line must catch)")
    bad_count: int = Field(2, ge=0, le=64, description="known-bad references made from the good references by the "
                           "synthetic defect code (a painted defect: contamination, scratch, in turn), besides `bad`")
    seed: int = Field(0, ge=0, description="seed of the made defects: the same references at every start")
    unready_on_failure: bool = Field(False, description="/readyz answers 503 while the last self-check failed (a "
                                     "load balancer or orchestrator then stops sending frames); false: /readyz does not "
                                     "look at it")

    @model_validator(mode="after")
    def _has_references(self) -> "SelfCheckConfig":
        goods = len(self.good) if self.good else self.good_count
        if self.enabled and goods + len(self.bad) + self.bad_count == 0:
            raise ValueError("selfcheck is enabled without references: set good/good_count or bad/bad_count")
        if self.enabled and self.bad_count and not goods:
            raise ValueError(f"bad_count ({self.bad_count}) references are made from good ones, and there are none: "
                             "set good or good_count")
        if not self.camera.isprintable():
            raise ValueError(f"camera {self.camera!r} must be printable characters")
        return self


class RuntimeConfig(_Section):
    ingest: IngestConfig = IngestConfig()
    batch: BatchConfig = BatchConfig()
    pipeline: PipelineConfig = PipelineConfig()
    publish: PublishConfig = PublishConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    security: SecurityConfig = SecurityConfig()
    live: LiveConfig = LiveConfig()
    archive: ArchiveConfig = ArchiveConfig()
    mqtt: MqttConfig = MqttConfig()
    acked: AckedConfig = AckedConfig()
    control: ControlConfig = ControlConfig()
    selfcheck: SelfCheckConfig = SelfCheckConfig()

    @model_validator(mode="after")
    def _selfcheck_camera_reserved(self) -> "RuntimeConfig":
        """A real camera must not carry the self-check's camera id: its verdicts would go to the self-check."""
        if self.selfcheck.enabled and self.selfcheck.camera in self.ingest.cameras:
            raise ValueError(f"ingest.cameras lists {self.selfcheck.camera!r}, the camera id selfcheck.camera reserves "
                             "for the self-check's frames; rename the camera or set selfcheck.camera")
        return self


# ---------------------------------------------------------------- actuate


class ActuateCameraConfig(_Section):
    """Where one camera's parts meet the ejector, in time (`linewatch actuate`)."""

    travel_ms: float = Field(..., gt=0, description="time a part takes from the camera (its capture_ts) to the ejector; "
                             "a reject fires at capture_ts + travel_ms")
    window_ms: float = Field(50.0, gt=0, description="how long the part is within the ejector's reach after that; a "
                             "verdict that arrives after the window is late")
    budget_ms: float | None = Field(None, gt=0, description="a part seen (a frame id skipped in the verdicts) without a "
                                    "verdict this long after its capture is rejected (the budget watchdog); null: travel_ms")
    consecutive_frame_ids: bool = Field(True, description="the camera numbers its frames 1, 2, 3, ...: a frame id "
                                        "skipped in its verdicts is a part without a verdict (false for imagezmq senders, "
                                        "whose frame ids are receive times)")

    @model_validator(mode="after")
    def _budget_within_travel(self) -> "ActuateCameraConfig":
        if self.budget_ms is not None and self.budget_ms > self.travel_ms:
            raise ValueError(f"budget_ms ({self.budget_ms:g}) is longer than travel_ms ({self.travel_ms:g}): the part "
                             "would pass the ejector before the watchdog rejects it")
        return self

    @property
    def budget(self) -> float:
        return self.travel_ms if self.budget_ms is None else self.budget_ms


class ModbusOutputConfig(_Section):
    """The reject gate on a Modbus/TCP PLC: one coil, pulsed for each reject."""

    host: str = Field("127.0.0.1", min_length=1, description="the PLC's host name or address")
    port: int = Field(502, ge=1, le=65535)
    device_id: int = Field(1, ge=0, le=255, description="Modbus unit (device) id")
    reject_coil: int = Field(0, ge=0, le=65535, description="coil address set for pulse_ms at each reject")
    alarm_coil: int | None = Field(None, ge=0, le=65535, description="coil set (and left set) on an alarm; null: none")
    timeout_ms: float = Field(500.0, gt=0, description="a request without an answer by then has failed")


class OpcUaOutputConfig(_Section):
    """The reject gate on an OPC UA server (the PLC's): a boolean node pulsed for each reject."""

    url: str = Field("opc.tcp://127.0.0.1:4840", min_length=1, description="the server's endpoint URL")
    reject_node: str = Field("ns=2;s=Linewatch.Reject", min_length=1, description="boolean node set for pulse_ms at each reject")
    alarm_node: str | None = Field(None, min_length=1, description="boolean node set (and left set) on an alarm; null: none")
    verdict_id_node: str | None = Field(None, min_length=1, description="string node written with the verdict id of each reject; null: none")
    reason_node: str | None = Field(None, min_length=1, description="string node written with the reason of each reject; null: none")
    username: str | None = Field(None, min_length=1, description="user name the server checks; with password_file")
    password_file: str | None = Field(None, description="file holding the password (its first line)")
    security_policy: Literal["None", "Basic256Sha256", "Aes128Sha256RsaOaep", "Aes256Sha256RsaPss"] = Field(
        "None", description="OPC UA security policy; other than None needs certificate_file and private_key_file")
    security_mode: Literal["Sign", "SignAndEncrypt"] = Field("SignAndEncrypt", description="with a security policy: sign, or sign and encrypt")
    certificate_file: str | None = Field(None, description="this client's certificate (DER or PEM), for a security policy")
    private_key_file: str | None = Field(None, description="its private key (PEM)")
    server_certificate_file: str | None = Field(None, description="the server's certificate, to trust it; null: taken from the endpoint")
    timeout_ms: float = Field(2000.0, gt=0, description="a request without an answer by then has failed")

    @model_validator(mode="after")
    def _security(self) -> "OpcUaOutputConfig":
        if self.password_file and not self.username:
            raise ValueError("password_file is set without a username: set username too")
        if self.security_policy != "None" and not (self.certificate_file and self.private_key_file):
            raise ValueError(f"security_policy {self.security_policy} needs certificate_file and private_key_file")
        if bool(self.certificate_file) != bool(self.private_key_file):
            raise ValueError("certificate_file and private_key_file go together")
        return self


class ActuateMetricsConfig(_Section):
    host: str = Field("127.0.0.1", description="address of the actuator's /metrics server")
    port: int = Field(9111, ge=0, le=65535, description="0 picks a free port; the actuator logs the one it got")


class ActuateConfig(_Section):
    """`linewatch actuate`: the reject component. It subscribes to the verdicts and drives the gate."""

    verdicts: str = Field("tcp://127.0.0.1:5556", min_length=1, description="the daemon's verdict endpoint (runtime.publish.url as seen from here; with channel: acked, runtime.acked.url)")
    mode: Literal["connect", "bind"] = Field("connect", description="connect to the daemon's verdict socket (its runtime.publish.mode: bind), or bind for a daemon that connects")
    channel: Literal["publish", "acked"] = Field("publish", description="publish: subscribe to the daemon's PUB socket; acked: "
                                                 "the acknowledged channel (runtime.acked), as `subscriber`")
    subscriber: str | None = Field(None, min_length=1, max_length=64, description="this actuator's name on the acked "
                                   "channel (one of the daemon's runtime.acked.subscribers)")
    cameras: dict[str, ActuateCameraConfig] = Field(default_factory=dict, description="camera id -> its timing; verdicts of other cameras are counted and ignored")
    let_through: list[Literal["error", "timeout", "shed"]] = Field(
        default_factory=list, description="verdict values that let a part through besides pass (default none: a part "
        "not inspected is rejected)")
    late: Literal["reject_next", "alarm"] = Field(
        "reject_next", description="a rejecting verdict after its window: reject at once (the next possible slot), or raise the alarm")
    pulse_ms: float = Field(100.0, gt=0, description="how long the reject output stays set")
    output: Literal["log", "modbus", "opcua"] = Field("log", description="log: a dry run, each reject a log line")
    retry_max_ms: float = Field(2000.0, gt=0, description="longest wait between two tries to reach an unreachable PLC")
    modbus: ModbusOutputConfig = ModbusOutputConfig()
    opcua: OpcUaOutputConfig = OpcUaOutputConfig()
    metrics: ActuateMetricsConfig = ActuateMetricsConfig()

    @model_validator(mode="after")
    def _acked_channel(self) -> "ActuateConfig":
        if self.channel == "acked":
            if not self.subscriber:
                raise ValueError("channel acked needs subscriber: this actuator's name in the daemon's runtime.acked.subscribers")
            if self.mode != "connect":
                raise ValueError("channel acked needs mode connect: the daemon binds runtime.acked.url")
        return self


class Config(_Section):
    detector: DetectorConfig = DetectorConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    bank: BankConfig = BankConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    actuate: ActuateConfig = ActuateConfig()

    @model_validator(mode="after")
    def _actuator_after_deadline(self) -> "Config":
        """The daemon answers `timeout` at deadline_ms; a gate that must decide earlier never gets that answer."""
        deadline = self.runtime.pipeline.deadline_ms
        acked = self.runtime.acked
        if acked.enabled and acked.budget_ms <= deadline:
            raise ValueError(f"runtime.acked.budget_ms ({acked.budget_ms:g}) is not longer than runtime.pipeline.deadline_ms "
                             f"({deadline:g}): a verdict released at its deadline would be of no use already")
        for camera, timing in self.actuate.cameras.items():
            if timing.budget <= deadline:
                what = "travel_ms" if timing.budget_ms is None else "budget_ms"
                raise ValueError(
                    f"actuate.cameras.{camera}.{what} ({timing.budget:g}) is not longer than runtime.pipeline.deadline_ms "
                    f"({deadline:g}): the part reaches the ejector before the daemon's timeout verdict; lower deadline_ms "
                    "or check the travel time")
        return self


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against configs/reference.yaml)"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def config_from_dict(data: dict | None, source: str = "<config>") -> Config:
    """Validate a plain dict (as read from YAML)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, source)) from None


def load_config(path: str | Path | None) -> Config:
    """Read and validate a YAML config file; None gives the defaults."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return config_from_dict(data, str(path))


# ---------------------------------------------------------------- camera bridge (`linewatch camera`)
#
# A file of its own, one per camera (e.g. /etc/linewatch/camera-LINE.yaml for
# linewatch-camera@LINE.service), loaded by `load_camera_config`; the daemon's Config does not
# include it. Command-line options of `linewatch camera` override its keys.


class FolderSourceConfig(_Section):
    """The hot-folder source (`folder:///path`): new image files, each sent once."""

    after: Literal["move", "leave"] = Field(
        "move", description="what happens to a sent file: moved into done_dir, or left where it is (remembered in state_file)")
    done_dir: str = Field("done", min_length=1, description="where sent files go (after: move); relative to the watched folder")
    failed_dir: str = Field("failed", min_length=1, description="where unreadable files go (after: move); relative to the watched folder")
    state_file: str = Field(".linewatch-camera-sent", min_length=1,
                            description="journal of the files sent (frame id, size, mtime, name): frame ids go on "
                            "from it after a restart and no file is sent twice; relative to the watched folder")
    poll_interval_s: float = Field(0.2, gt=0, le=60, description="seconds between two looks at the folder")
    settle_polls: int = Field(2, ge=1, le=100, description="a file is read once its size and mtime were the same "
                              "in this many looks in a row (and, for PNG/JPEG/BMP, its end is there)")
    unreadable_after_s: float = Field(30.0, gt=0, description="a file whose size stays put this long without "
                                      "becoming a readable image is set aside (failed_dir) and counted")
    part_id_regex: str | None = Field(None, description="part id from the file name (stem): the group named "
                                      "`part`, else group 1, else the whole match; null: no part id")
    capture_ts: Literal["read", "mtime"] = Field(
        "read", description="capture time of a file: when it is read, or its mtime (only where the writer's clock is "
        "this host's and files never wait: a file older than the daemon's deadline is answered `timeout`)")

    @model_validator(mode="after")
    def _regex(self) -> "FolderSourceConfig":
        if self.part_id_regex is not None:
            try:
                re.compile(self.part_id_regex)
            except re.error as e:
                raise ValueError(f"part_id_regex {self.part_id_regex!r} is not a regular expression: {e}") from None
        if self.done_dir == self.failed_dir:
            raise ValueError(f"done_dir and failed_dir are both {self.done_dir!r}; unreadable files need their own folder")
        return self


class ReconnectConfig(_Section):
    """When the source is lost: wait, then open it again, each wait twice the last, up to max_s."""

    initial_s: float = Field(0.5, gt=0, le=600, description="first wait before opening a lost source again")
    max_s: float = Field(30.0, gt=0, le=3600, description="the longest wait between two tries")
    read_failures: int = Field(5, ge=1, le=10_000, description="failed reads in a row (each a lost frame) that "
                               "count as the source lost")

    @model_validator(mode="after")
    def _ordered(self) -> "ReconnectConfig":
        if self.initial_s > self.max_s:
            raise ValueError(f"initial_s ({self.initial_s}) must not exceed max_s ({self.max_s})")
        return self


class OpenCVSourceConfig(_Section):
    """Settings of an OpenCV source. Device settings (size, rate, pixel format, exposure, gain) go to a
    USB/V4L2 camera (opencv:) after each open; the driver may refuse or round them, and the
    values it reports back are logged (camera_settings). null: leave the camera's own."""

    width: int | None = Field(None, ge=1, le=65535, description="frame width in pixels")
    height: int | None = Field(None, ge=1, le=65535, description="frame height in pixels")
    fps: float | None = Field(None, gt=0, le=10_000, description="frame rate the camera is asked for")
    fourcc: str | None = Field(None, min_length=4, max_length=4, description="pixel format, e.g. MJPG (USB cameras: "
                               "full resolution at full rate) or YUYV")
    exposure: float | None = Field(None, description="exposure, in the driver's units (V4L2: 100 us steps)")
    gain: float | None = Field(None, description="gain, in the driver's units")
    buffer_size: int | None = Field(None, ge=1, le=64, description="frames the driver keeps queued; 1: always the "
                                    "newest frame (least latency), where the driver supports it")
    open_timeout_s: float = Field(10.0, gt=0, le=600, description="rtsp/http: give up opening the stream after this long")
    read_timeout_s: float = Field(10.0, gt=0, le=600, description="rtsp/http: a frame that does not come within this "
                                  "long is a failed read")


class CameraSecurityConfig(_Section):
    """CurveZMQ to a daemon with runtime.security: its public key and this camera's key pair."""

    server_key: str | None = Field(None, description="the daemon's public key file (linewatch keys generate)")
    client_key: str | None = Field(None, description="this camera's secret key file; its public key is in the "
                                   "daemon's frame_senders folder")

    @model_validator(mode="after")
    def _both(self) -> "CameraSecurityConfig":
        if (self.server_key is None) != (self.client_key is None):
            raise ValueError("server_key and client_key go together (CurveZMQ needs both)")
        return self


class AravisSourceConfig(_Section):
    """A GenICam camera through Aravis (`aravis:[DEVICE-ID]`): what is set on it when it opens; null
    leaves the camera's own setting."""

    pixel_format: str | None = Field(None, min_length=1, description="GenICam PixelFormat: Mono8, Mono12, Mono16, RGB8, "
                                     "BGR8, BayerRG8, BayerGB8, BayerGR8, BayerBG8")
    width: int | None = Field(None, ge=1, le=65535, description="region of interest width in pixels (GenICam Width)")
    height: int | None = Field(None, ge=1, le=65535, description="region of interest height in pixels (GenICam Height)")
    packet_size: int | None = Field(None, ge=576, le=16384, description="GigE Vision stream packet size in bytes "
                                    "(GevSCPSPacketSize); 8000 or so with jumbo frames on the camera's network "
                                    "interface: fewer packets per frame, less delay; USB3 Vision cameras: not used")
    exposure_us: float | None = Field(None, gt=0, description="exposure time, microseconds")
    gain_db: float | None = Field(None, ge=0, description="gain, dB")
    frame_rate: float | None = Field(None, gt=0, le=1000, description="frames per second: with trigger: free_run set "
                                     "on the camera; with trigger: software the rate linewatch camera triggers at")
    trigger: Literal["free_run", "line", "software"] = Field(
        "free_run", description="free_run: the camera's own rate; line: one frame per rising edge on trigger_line (the "
        "part sensor); software: one frame per software trigger, sent by linewatch camera frame_rate times a second")
    trigger_line: str = Field("Line1", min_length=1, description="the hardware trigger input, with trigger: line")
    lost_after_s: float = Field(5.0, gt=0, le=3600, description="with trigger: free_run, a camera that sends no "
                                "frame (and no error) this long is lost: closed and opened again with the "
                                "backoff, like an unplugged one. Keep it above the longest gap between frames")
    part_id: Literal["none", "frame_counter"] = Field(
        "none", description="frame_counter: each frame's part_id is the camera's own frame counter (its GigE Vision "
        "block id, as text): with trigger: line one count per part sensor edge; it starts again when the camera "
        "restarts, and 16-bit ids wrap (65535 -> 1). none: no part_id")

    @model_validator(mode="after")
    def _software_rate(self) -> "AravisSourceConfig":
        if self.trigger == "software" and self.frame_rate is None:
            raise ValueError("trigger: software needs frame_rate (the rate linewatch camera sends software triggers at)")
        return self


class CameraConfig(_Section):
    """One capture process (`linewatch camera`): a source, the daemon's ingest, metrics."""

    camera: str = Field("cam0", min_length=1, max_length=64, description="camera id: the frames' topic, a metrics label")
    source: str | None = Field(None, description="opencv:INDEX, rtsp://..., http(s)://..., file:///video, "
                               "folder:///path, aravis:[DEVICE]; --source overrides it")
    endpoint: str = Field("tcp://127.0.0.1:5555", description="the daemon's frame ingest (it binds, the camera connects)")
    encoding: Literal["raw", "jpeg", "png"] = Field(
        "raw", description="raw: lossless, no CPU, H*W*3 bytes a frame (same host or a fast link); jpeg: small, lossy; "
        "png: lossless, CPU-heavy")
    jpeg_quality: int = Field(95, ge=1, le=100)
    send_hwm: int = Field(8, ge=1, le=100_000, description="frames queued for the daemon; beyond it new frames are "
                          "dropped (counted), never queued without bound")
    connect_timeout_s: float = Field(10.0, ge=0, le=600, description="at start, wait this long for the daemon to "
                                     "subscribe before the first frame (frames before that would be lost)")
    mono_to_rgb: bool = Field(False, description="replicate grey (Mono8) frames to 3 channels, for a daemon whose bank "
                              "is colour; false: send them grey, as a mono bank (built from grey good images) judges "
                              "them; a colour bank answers grey frames `error` (grey_image)")
    max_fps: float = Field(0.0, ge=0, description="send at most this many frames a second (the others are read and "
                           "skipped); 0: every frame")
    reconnect: ReconnectConfig = ReconnectConfig()
    opencv: OpenCVSourceConfig = OpenCVSourceConfig()
    folder: FolderSourceConfig = FolderSourceConfig()
    aravis: AravisSourceConfig = AravisSourceConfig()
    security: CameraSecurityConfig = CameraSecurityConfig()
    metrics: MetricsConfig = MetricsConfig(port=9120)
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _printable_camera(self) -> "CameraConfig":
        if not self.camera.isprintable():
            raise ValueError(f"camera id {self.camera!r} must be printable characters (it is a topic, a log field, a metrics label)")
        return self


def _validated(model: type[BaseModel], data: object, source: str) -> BaseModel:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, source)) from None


def load_camera_config(path: str | Path | None, overrides: dict | None = None) -> CameraConfig:
    """A camera bridge's YAML file (None: the defaults), then `overrides` (command-line options,
    dotted keys such as "folder.after") on top, validated together."""
    data: dict = {}
    source = "<defaults>" if path is None else str(path)
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read camera config file: {e.strerror or e}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    for key, value in (overrides or {}).items():
        node = data
        *parents, leaf = key.split(".")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return _validated(CameraConfig, data, source)  # type: ignore[return-value]
