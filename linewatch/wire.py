"""Frames and verdicts: the records (Frame, Verdict) and their messages on ZeroMQ.

Every received frame ends as exactly one Verdict. The records are plain data; the functions
below turn them into bytes and back (and decode imagezmq's frames).

Wire format version 1. The full reference, with the meaning of every verdict for an
actuator, is docs/wire-format.md; this docstring is the short form.

Frame message (camera -> linewatch), three ZMQ message parts::

    [topic, header, image]
    topic   camera id, UTF-8 (the same string as header["camera"])
    header  UTF-8 JSON object, at most 64 KiB:
            {"v": 1, "camera": str, "frame_id": int >= 0, "capture_ts": float (epoch s),
             "encoding": "raw"|"jpeg"|"png",
             "shape": [H, W, C] (raw only, C in {1, 3}), "dtype": "uint8"|"uint16" (raw only;
             uint16 little-endian),
             "pixel_format": "rgb"|"bgr"|"gray" (raw only; jpeg/png carry their own colour),
             "part_id": str|null, "encoder_position": int|null}
            `capture_ts`, `part_id` and `encoder_position` may be absent (receive time / null).
            Unknown keys are ignored, so v1 can grow optional keys without a version bump.
    image   raw: H*W*C bytes, row-major HWC; jpeg/png: the file bytes.

Grey (mono) frames (C == 1, pixel_format "gray", or a grey JPEG/PNG) are read as grey, and
16-bit samples (16-bit PNG, uint16 raw) are scaled to 8 bits through a window [low, high]
(`linewatch.images.scale_window`). Whether the bank judges grey or colour frames is the
pipeline's business: it refuses a grey frame on a colour bank (`grey_image`) and a colour frame
on a mono bank (`colour_image`) before decoding, from what the header declares here.

imagezmq messages (imagezmq 1.x `ImageSender`), two parts, no topic::

    send_image: [JSON {"msg": str, "dtype": str, "shape": [...]}, array bytes]   (BGR)
    send_jpg:   [JSON {"msg": str}, JPEG bytes]

The camera id is `msg` up to its first "|" ("host|anything" -> "host"); frame ids are
assigned by the receiver (receive time in microseconds since the epoch, strictly increasing
per camera, so they stay unique when sender or daemon restart), and capture_ts is the
receive time.

Verdict message (linewatch -> actuators, taps)::

    [topic, header, attachment...]
    topic   camera id, UTF-8
    header  {"v": 1, "camera", "frame_id", "part_id", "verdict", "score", "threshold",
             "objects", "reason", "capture_ts", "latency_s", "backend", "bank_id", "timings",
             "id", "run_id", "seq",
             "attachments": [...]}   one entry per extra part, in order:
             {"kind": "heatmap", "encoding": "png16", "shape": [H, W], "offset": o, "scale": s}
                 16-bit grey PNG; value = offset + pixel * scale
             {"kind": "heatmap", "encoding": "float16", "shape": [H, W]}
                 little-endian float16, row-major
             {"kind": "overlay", "encoding": "jpeg"}

Acknowledged verdicts (optional, ZeroMQ ROUTER <-> one DEALER per named subscriber): messages
[kind, header {"v": 1, ...}, more...], at the end of this module (encode_acked, decode_acked).

Decoding errors raise WireError whose `reason` is a short stable label (a metrics label):
truncated, bad_header, unknown_version, bad_shape, bad_dtype, decode_failed, too_large,
unknown_camera, bad_camera (the pipeline adds grey_image and colour_image). `camera` and
`frame_id` are filled whenever they could be read, so the frame can still be answered with an
`error` verdict.

Camera ids (the topic; imagezmq's msg up to "|") are 1..64 printable characters; anything
else is refused as bad_camera, unaddressed (they are metric labels, log fields and topics).
"""

from __future__ import annotations

import io
import json
import math
import struct
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from PIL import JpegImagePlugin, PngImagePlugin

from linewatch.images import DEFAULT_SAMPLE_WINDOW, scale_window


# ---------------------------------------------------------------- the records

VERDICT_VALUES = ("pass", "fail", "error", "timeout", "shed")


@dataclass
class Frame:
    """One camera frame. `image` is RGB uint8 (H, W, 3) or grey uint8 (H, W); ingest leaves it
    None and the bytes in `encoded` (read, not decoded), so a frame that will not be judged is
    never decoded: the pipeline decodes the frames it admits (`decoded()`)."""

    camera: str
    frame_id: int
    capture_ts: float  # seconds since the epoch, from the sender (or receive time if absent)
    image: np.ndarray | None
    received_ts: float  # time.time() when ingest took it off the socket
    received_mono: float  # time.monotonic() at the same moment; deadlines use this clock
    part_id: str | None = None
    encoder_position: int | None = None
    reply: Any = None  # opaque handle for senders that wait for an answer (imagezmq REQ/REP)
    encoded: EncodedImage | None = field(default=None, repr=False)

    def decoded(self, window: tuple[int, int] = DEFAULT_SAMPLE_WINDOW) -> np.ndarray:
        """The image, RGB (H, W, 3) or grey (H, W) uint8: `image`, or `encoded` decoded now, its
        16-bit samples scaled through `window` (raises WireError)."""
        if self.image is not None:
            return self.image
        if self.encoded is None:
            raise WireError("decode_failed", self.camera, self.frame_id, "frame has neither an image nor its bytes")
        return self.encoded.decode(self.camera, self.frame_id, window)

    @property
    def is_grey(self) -> bool | None:
        """Whether the frame is grey (mono), decoded or as declared; None when unknown."""
        if self.image is not None:
            return self.image.ndim == 2
        if self.encoded is not None:
            return self.encoded.grey
        return None

    @property
    def height_width(self) -> tuple[int, int] | None:
        """(height, width) of the image, decoded or as declared; None when unknown."""
        if self.image is not None:
            return int(self.image.shape[0]), int(self.image.shape[1])
        if self.encoded is not None:
            return self.encoded.height, self.encoded.width
        return None

    def describe(self) -> str:
        """What arrived, for log lines and error details: "640x480 png, 3 channels of 8 bits"."""
        if self.encoded is not None:
            return self.encoded.describe()
        if self.image is not None:
            shape = self.image.shape
            return f"{shape[1]}x{shape[0]} decoded, {shape[2] if len(shape) > 2 else 1} channels of {self.image.dtype}"
        return "nothing"


@dataclass
class Verdict:
    """The answer for one frame. `verdict` is one of VERDICT_VALUES."""

    camera: str
    frame_id: int
    verdict: str
    capture_ts: float
    part_id: str | None = None
    score: float | None = None
    threshold: float | None = None
    objects: list[dict[str, Any]] = field(default_factory=list)
    reason: str | None = None  # why error / timeout / shed
    latency_s: float | None = None  # capture -> verdict
    backend: str | None = None
    bank_id: str | None = None
    heatmap: np.ndarray | None = None  # float32 (H, W) at input resolution, when configured
    overlay_jpeg: bytes | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # Set when the verdict is released: the daemon run (random, new at every start) and the
    # verdict's number within it (0, 1, 2, ... in publish order, so a gap is a lost verdict).
    run_id: str | None = None
    seq: int | None = None
    # Local only, never encoded: the frame's RGB image and the fused score's per-branch z-scores.
    # The pipeline attaches the image when a sink keeps pictures (archive, live page); the daemon
    # then hands it to the sinks beside the verdict (linewatch.runtime.sinks.outcome.Outcome).
    image: np.ndarray | None = field(default=None, repr=False, compare=False)
    branch_scores: dict[str, float] = field(default_factory=dict, repr=False, compare=False)

    @property
    def id(self) -> str | None:
        """Unique across daemon and sender restarts: "<run_id>-<seq>"."""
        return None if self.run_id is None or self.seq is None else f"{self.run_id}-{self.seq}"

    def __post_init__(self) -> None:
        if self.verdict not in VERDICT_VALUES:
            raise ValueError(f"verdict must be one of {VERDICT_VALUES}, got {self.verdict!r}")


# ---------------------------------------------------------------- the format

WIRE_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_PIXELS = 50_000_000  # ingest.max_image_pixels: 8K x 6K, 150 MB decoded
MAX_CAMERA_ID_LENGTH = 64  # characters; ids are metric labels, log fields and topics
ENCODINGS = ("raw", "jpeg", "png")
PIXEL_FORMATS = ("rgb", "bgr", "gray")
RAW_DTYPES = {"uint8": 1, "uint16": 2}  # raw sample types -> bytes per sample (uint16: little-endian)
HEATMAP_ENCODINGS = ("none", "png", "float16")
ERROR_REASONS = (
    "truncated",
    "bad_header",
    "unknown_version",
    "bad_shape",
    "bad_dtype",
    "decode_failed",
    "too_large",
    "unknown_camera",
    "bad_camera",
)

Buffer = bytes | bytearray | memoryview


class WireError(Exception):
    """A message that cannot be turned into a Frame (or Verdict).

    `reason` is one of ERROR_REASONS (stable; used as a metrics label); `camera` and
    `frame_id` are set when they could be read, so an `error` verdict can be addressed.
    """

    def __init__(self, reason: str, camera: str | None = None, frame_id: int | None = None, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.camera = camera
        self.frame_id = frame_id
        self.detail = detail


@dataclass(frozen=True)
class EncodedImage:
    """An image as it arrived: what its header declares, and its bytes, not decoded yet.

    Reading one costs a header parse; `decode()` is the pixel work (and the memory:
    `decoded_bytes`, before the conversion to 8 bits). `grey`: the image is grey (mono), read
    from its header (a grey PNG with alpha decodes to 4 channels, but is grey).
    """

    payload: Buffer
    encoding: str  # "raw", "jpeg" or "png"
    height: int
    width: int
    channels: int  # what the decoder produces before conversion to RGB (PNG: an upper bound)
    sample_bytes: int  # bytes per channel: 1, or 2 for a 16-bit PNG or uint16 raw
    pixel_format: str = "bgr"  # channel order (raw frames say theirs; OpenCV decodes files to BGR)
    grey: bool = False

    @property
    def decoded_bytes(self) -> int:
        return self.height * self.width * self.channels * self.sample_bytes

    def describe(self) -> str:
        """"7000x7000 png, 4 channels of 16 bits (392.0 MB decoded)"."""
        return (f"{self.width}x{self.height} {self.encoding}, {self.channels} channels of {8 * self.sample_bytes} bits "
                f"({self.decoded_bytes / 1e6:.1f} MB decoded)")

    def decode(self, camera: str | None, frame_id: int | None,
               window: tuple[int, int] = DEFAULT_SAMPLE_WINDOW) -> np.ndarray:
        """RGB uint8 (H, W, 3), or grey uint8 (H, W) when `grey`; 16-bit samples are scaled
        through `window` ([low, high] -> 0..255). Raises WireError (decode_failed, bad_dtype)."""
        if self.encoding == "raw":
            dtype = np.dtype("<u2") if self.sample_bytes == 2 else np.dtype(np.uint8)
            image = np.frombuffer(self.payload, dtype=dtype).reshape((self.height, self.width, self.channels))
            pixel_format = self.pixel_format
        else:
            image = cv2.imdecode(np.frombuffer(self.payload, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
            if image is None:
                raise WireError("decode_failed", camera, frame_id,
                                f"{len(self.payload)} bytes are not a readable {self.encoding.upper()} image")
            if image.shape[:2] != (self.height, self.width):  # the decoder read another size than the header said
                raise WireError("decode_failed", camera, frame_id,
                                f"decoded {image.shape[1]}x{image.shape[0]}, header said {self.width}x{self.height}")
            pixel_format = "bgr"  # OpenCV decodes to BGR(A)
        if image.dtype == np.uint16:
            image = scale_window(image, window)
        elif image.dtype != np.uint8:
            raise WireError("bad_dtype", camera, frame_id, f"decoded pixel type {image.dtype}; 8 or 16 bit only")
        decoded_grey = image.ndim == 2 or image.shape[2] == 1
        if self.grey:
            # a grey PNG with alpha decodes to BGRA with B = G = R: its first plane is the grey
            return np.ascontiguousarray(image if image.ndim == 2 else image[..., 0])
        if decoded_grey:  # admission judged it colour from its header: it must not turn grey now
            raise WireError("decode_failed", camera, frame_id,
                            f"decoded a grey image, its header declared {self.channels} channels")
        return _to_rgb(image, pixel_format)


# ---------------------------------------------------------------- helpers


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parse_json_object(part: Buffer, what: str, camera: str | None) -> dict[str, Any]:
    """Parse a small JSON object; any problem is a `bad_header` WireError."""
    if len(part) > MAX_HEADER_BYTES:
        raise WireError("bad_header", camera, None, f"{what} is {len(part)} bytes (limit {MAX_HEADER_BYTES})")
    try:
        value = json.loads(bytes(part).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise WireError("bad_header", camera, None, f"{what} is not UTF-8 JSON: {e}") from None
    if not isinstance(value, dict):
        raise WireError("bad_header", camera, None, f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _to_rgb(image: np.ndarray, pixel_format: str) -> np.ndarray:
    """(H, W, 3 or 4) uint8 in `pixel_format` -> contiguous RGB (H, W, 3)."""
    if image.shape[2] == 4:  # alpha from a PNG: drop it (same as linewatch.images.read_image)
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if pixel_format == "bgr" else cv2.COLOR_RGBA2RGB)
    if pixel_format == "bgr":
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(image)


# PNG colour type -> channels OpenCV decodes it to (IMREAD_UNCHANGED): grey, -, RGB, palette
# (RGB, or RGBA with transparency: counted as 4), grey+alpha (decoded as BGRA), RGBA
_PNG_CHANNELS = {0: 1, 2: 3, 3: 4, 4: 4, 6: 4}
_PNG_GREY_TYPES = (0, 4)  # grey, grey+alpha (a palette of greys counts as colour: its palette is not read)


def _read_file(payload: Buffer, limits: ImageLimits, camera: str | None, frame_id: int | None) -> EncodedImage:
    """A JPEG/PNG file's declared size, pixel type and whether it is grey, read without
    decoding pixels, checked against `limits`.

    A few hundred bytes can declare 20000 x 20000 pixels (a decompression bomb): the size must
    be known before the decoder allocates it. Pillow's JPEG and PNG readers parse the header
    only (pixels are read lazily, never here); they are called directly, not via Image.open,
    whose own bomb ceiling (warning, then error at 179 M pixels) would take the place of
    max_image_pixels. Any other file is refused before OpenCV, which would decode BMP, TIFF,
    WebP and more, sees it.
    """
    if not len(payload):
        raise WireError("decode_failed", camera, frame_id, "empty image part")
    head = bytes(payload[:8])
    is_png = head == b"\x89PNG\r\n\x1a\n"
    reader = (JpegImagePlugin.JpegImageFile if head.startswith(b"\xff\xd8\xff")
              else PngImagePlugin.PngImageFile if is_png else None)
    if reader is None:
        raise WireError("decode_failed", camera, frame_id,
                        f"{len(payload)} bytes are not a JPEG or PNG file (they start {head[:4]!r})")
    try:
        with reader(io.BytesIO(payload)) as probe:
            width, height = probe.size
            if is_png:  # IHDR, the first chunk (Pillow checked it): bit depth, colour type
                bit_depth, colour_type = payload[24], payload[25]
                channels, sample_bytes = _PNG_CHANNELS.get(colour_type, 4), 2 if bit_depth == 16 else 1
                grey = colour_type in _PNG_GREY_TYPES
            else:
                channels = 1 if probe.mode == "L" else 3
                sample_bytes = 2 if getattr(probe, "bits", 8) > 8 else 1
                grey = channels == 1
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError) as e:
        raise WireError("decode_failed", camera, frame_id,
                        f"{len(payload)} bytes are not a readable JPEG or PNG image ({type(e).__name__}: {e})") from None
    encoded = EncodedImage(payload, "png" if is_png else "jpeg", height, width, channels, sample_bytes, grey=grey)
    limits.check(encoded, camera, frame_id)
    return encoded


def _read_raw(payload: Buffer, shape: Any, dtype: Any, pixel_format: str, limits: ImageLimits, camera: str | None,
              frame_id: int | None) -> EncodedImage:
    """Raw HWC bytes + declared shape/dtype, checked (sizes, channels) without touching pixels.
    One channel, or pixel_format "gray", is a grey image."""
    if dtype not in RAW_DTYPES:
        raise WireError("bad_dtype", camera, frame_id, f"dtype must be one of {sorted(RAW_DTYPES)}, got {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) not in (2, 3)
        or not all(_is_int(n) and n > 0 for n in shape)
        or (len(shape) == 3 and shape[2] not in (1, 3, 4))
    ):
        raise WireError("bad_shape", camera, frame_id, f"shape must be [H, W] or [H, W, C] with C in 1, 3, got {shape!r}")
    channels = shape[2] if len(shape) == 3 else 1
    sample_bytes = RAW_DTYPES[dtype]
    encoded = EncodedImage(payload, "raw", shape[0], shape[1], channels, sample_bytes, pixel_format, grey=channels == 1)
    limits.check(encoded, camera, frame_id)
    expected = math.prod(shape) * sample_bytes
    if expected != len(payload):
        raise WireError("bad_shape", camera, frame_id,
                        f"shape {shape} of {dtype} needs {expected} bytes, got {len(payload)}")
    if channels == 4:
        raise WireError("bad_shape", camera, frame_id, f"4-channel raw images are not accepted, shape {shape}")
    if channels == 3 and pixel_format == "gray":
        raise WireError("bad_shape", camera, frame_id, "pixel_format 'gray' with 3 channels")
    return encoded


@dataclass(frozen=True)
class ImageLimits:
    """What a frame may declare before anything is decoded (runtime.ingest's limits)."""

    max_payload_bytes: int = 64 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_decoded_bytes: int | None = None  # None: no limit beyond max_pixels

    def check_payload(self, payload: Buffer, camera: str | None, frame_id: int | None) -> None:
        if len(payload) > self.max_payload_bytes:
            raise WireError("too_large", camera, frame_id,
                            f"payload {len(payload)} bytes exceeds max_payload_bytes {self.max_payload_bytes}")

    def check(self, image: EncodedImage, camera: str | None, frame_id: int | None) -> None:
        """Refuse (too_large) an image declaring more pixels or decoded bytes than allowed."""
        if image.height * image.width > self.max_pixels:
            raise WireError("too_large", camera, frame_id,
                            f"arrived {image.describe()}: {image.height * image.width} pixels, "
                            f"over max_image_pixels {self.max_pixels}")
        if self.max_decoded_bytes is not None and image.decoded_bytes > self.max_decoded_bytes:
            raise WireError("too_large", camera, frame_id,
                            f"arrived {image.describe()}, over max_decoded_bytes {self.max_decoded_bytes}")


# ---------------------------------------------------------------- frames (linewatch format)


def encode_frame(
    camera: str,
    frame_id: int,
    image: np.ndarray,
    capture_ts: float | None = None,
    encoding: str = "raw",
    pixel_format: str = "rgb",
    part_id: str | None = None,
    encoder_position: int | None = None,
    jpeg_quality: int = 90,
) -> list[bytes]:
    """Build a v1 frame message: [topic, header, image bytes].

    `image` is uint8 or uint16 (H, W, 3) in `pixel_format` ("rgb" or "bgr"), or (H, W)/(H, W, 1)
    with pixel_format "gray" (a mono camera; uint16 for Mono12/Mono16, sent little-endian raw or
    as a 16-bit PNG; JPEG takes uint8 only). `capture_ts` defaults to now. For jpeg/png the image
    is re-encoded as a standard (BGR-ordered) file, so the receiver needs no pixel_format.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    if pixel_format not in PIXEL_FORMATS:
        raise ValueError(f"pixel_format must be one of {PIXEL_FORMATS}, got {pixel_format!r}")
    if image.dtype not in (np.uint8, np.uint16) or (image.dtype == np.uint16 and encoding == "jpeg"):
        raise ValueError(f"image must be uint8 (or uint16, raw and png only), got {image.dtype} for {encoding}")
    header: dict[str, Any] = {
        "v": WIRE_VERSION,
        "camera": camera,
        "frame_id": int(frame_id),
        "capture_ts": time.time() if capture_ts is None else float(capture_ts),
        "encoding": encoding,
        "part_id": part_id,
        "encoder_position": encoder_position,
    }
    if encoding == "raw":
        image = np.ascontiguousarray(image)
        shape = list(image.shape) if image.ndim == 3 else [*image.shape, 1]
        header.update(shape=shape, dtype="uint16" if image.dtype == np.uint16 else "uint8", pixel_format=pixel_format)
        payload = image.astype(image.dtype.newbyteorder("<"), copy=False).tobytes()
    else:
        if pixel_format == "rgb" and image.ndim == 3:
            image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if encoding == "jpeg" else []
        ok, buf = cv2.imencode(".jpg" if encoding == "jpeg" else ".png", image, params)
        if not ok:
            raise ValueError(f"could not encode image as {encoding}")
        payload = buf.tobytes()
    return [camera.encode("utf-8"), json.dumps(header).encode("utf-8"), payload]


def check_camera_id(camera: str) -> str:
    """A camera id must be 1..MAX_CAMERA_ID_LENGTH printable characters; raises WireError("bad_camera")."""
    if not camera or len(camera) > MAX_CAMERA_ID_LENGTH or not camera.isprintable():
        shown = camera[:MAX_CAMERA_ID_LENGTH] + ("..." if len(camera) > MAX_CAMERA_ID_LENGTH else "")
        raise WireError("bad_camera", None, None,
                        f"camera id {shown!r} ({len(camera)} characters) must be 1..{MAX_CAMERA_ID_LENGTH} printable characters")
    return camera


def _topic(parts: Sequence[Buffer]) -> str:
    if not parts:
        raise WireError("truncated", None, None, "empty message")
    if len(parts[0]) > 4 * MAX_CAMERA_ID_LENGTH:  # longer in UTF-8 than any valid id
        raise WireError("bad_camera", None, None, f"topic (camera id) is {len(parts[0])} bytes")
    try:
        return bytes(parts[0]).decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("bad_header", None, None, "topic (camera id) is not UTF-8") from None


def peek_camera(parts: Sequence[Buffer]) -> str:
    """The camera id of a linewatch frame message from its topic alone (cheap: no JSON).

    Used by ingest to apply the camera allow-list before any decoding work.
    """
    return check_camera_id(_topic(parts))


def read_frame(
    parts: Sequence[Buffer],
    limits: ImageLimits,
    received_ts: float,
    received_mono: float,
    cameras: Collection[str] | None = None,
) -> Frame:
    """Validate a v1 frame message into a Frame whose image is not decoded yet (`encoded`).

    `cameras`, when non-empty, is the allow-list. The payload size, and the size the image
    declares (raw: its shape; JPEG/PNG: their file header), are checked against `limits`
    here, so a refused frame costs only a header parse. Raises WireError.
    """
    camera = peek_camera(parts)
    if len(parts) < 3:
        frame_id = None
        if len(parts) == 2:  # the header may still say which frame this was
            try:
                fid = _parse_json_object(parts[1], "header", camera).get("frame_id")
                frame_id = fid if _is_int(fid) else None
            except WireError:
                pass
        raise WireError("truncated", camera, frame_id, f"expected 3 message parts, got {len(parts)}")
    if len(parts) > 3:
        raise WireError("bad_header", camera, None, f"expected 3 message parts, got {len(parts)}")
    header = _parse_json_object(parts[1], "header", camera)
    fid = header.get("frame_id")
    frame_id = fid if _is_int(fid) and fid >= 0 else None

    version = header.get("v")
    if version != WIRE_VERSION:
        raise WireError("unknown_version", camera, frame_id, f"wire version {version!r}; this receiver speaks {WIRE_VERSION}")
    if header.get("camera") != camera:
        raise WireError("bad_header", camera, frame_id, f"header camera {header.get('camera')!r} differs from topic {camera!r}")
    if frame_id is None:
        raise WireError("bad_header", camera, None, f"frame_id must be an integer >= 0, got {fid!r}")
    if cameras and camera not in cameras:
        raise WireError("unknown_camera", camera, frame_id, f"camera {camera!r} is not in the accepted list")

    capture_ts = header.get("capture_ts")
    if capture_ts is None:
        capture_ts = received_ts
    elif not _is_number(capture_ts):
        raise WireError("bad_header", camera, frame_id, f"capture_ts must be a number, got {capture_ts!r}")
    part_id = header.get("part_id")
    if part_id is not None and not isinstance(part_id, str):
        raise WireError("bad_header", camera, frame_id, f"part_id must be a string or null, got {part_id!r}")
    encoder_position = header.get("encoder_position")
    if encoder_position is not None and not _is_int(encoder_position):
        raise WireError("bad_header", camera, frame_id, f"encoder_position must be an integer or null, got {encoder_position!r}")
    encoding = header.get("encoding")
    if encoding not in ENCODINGS:
        raise WireError("bad_header", camera, frame_id, f"encoding must be one of {ENCODINGS}, got {encoding!r}")

    payload = parts[2]
    limits.check_payload(payload, camera, frame_id)
    if encoding == "raw":
        pixel_format = header.get("pixel_format")
        if pixel_format not in PIXEL_FORMATS:
            raise WireError("bad_header", camera, frame_id, f"pixel_format must be one of {PIXEL_FORMATS}, got {pixel_format!r}")
        encoded = _read_raw(payload, header.get("shape"), header.get("dtype"), pixel_format, limits, camera, frame_id)
    else:
        encoded = _read_file(payload, limits, camera, frame_id)
        if encoded.encoding != encoding:
            raise WireError("bad_header", camera, frame_id, f"header says {encoding}, the bytes are {encoded.encoding}")
    return Frame(
        camera=camera,
        frame_id=frame_id,
        capture_ts=float(capture_ts),
        image=None,
        encoded=encoded,
        received_ts=received_ts,
        received_mono=received_mono,
        part_id=part_id,
        encoder_position=encoder_position,
    )


def decode_frame(
    parts: Sequence[Buffer],
    max_payload_bytes: int,
    received_ts: float,
    received_mono: float,
    cameras: Collection[str] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    window: tuple[int, int] = DEFAULT_SAMPLE_WINDOW,
) -> Frame:
    """`read_frame`, then the image decoded (RGB (H, W, 3) or grey (H, W) uint8; 16-bit samples
    through `window`). Raises WireError."""
    frame = read_frame(parts, ImageLimits(max_payload_bytes, max_pixels), received_ts, received_mono, cameras)
    frame.image, frame.encoded = frame.decoded(window), None
    return frame


# ---------------------------------------------------------------- frames (imagezmq)


def imagezmq_camera(parts: Sequence[Buffer]) -> str:
    """The camera id of an imagezmq message: its text `msg` up to the first "|"."""
    if len(parts) < 1:
        raise WireError("truncated", None, None, "empty message")
    metadata = _parse_json_object(parts[0], "imagezmq metadata", None)
    msg = metadata.get("msg")
    if not isinstance(msg, str) or not msg.split("|", 1)[0].strip():
        raise WireError("bad_header", None, None, f"imagezmq msg must be a non-empty string, got {str(msg)[:80]!r}")
    return check_camera_id(msg.split("|", 1)[0].strip())


def read_imagezmq(
    parts: Sequence[Buffer],
    limits: ImageLimits,
    received_ts: float,
    received_mono: float,
    frame_id: int,
    cameras: Collection[str] | None = None,
) -> Frame:
    """Read an imagezmq message (send_image: BGR array; send_jpg: JPEG) into a Frame whose
    image is not decoded yet (`encoded`), checked against `limits`.

    imagezmq carries no frame id or capture time: `frame_id` is given by the receiver (a
    per-camera counter) and capture_ts is `received_ts`. Raises WireError.
    """
    camera = imagezmq_camera(parts)
    if len(parts) != 2:
        reason = "truncated" if len(parts) < 2 else "bad_header"
        raise WireError(reason, camera, frame_id, f"imagezmq messages have 2 parts, got {len(parts)}")
    if cameras and camera not in cameras:
        raise WireError("unknown_camera", camera, frame_id, f"camera {camera!r} is not in the accepted list")
    metadata = _parse_json_object(parts[0], "imagezmq metadata", camera)
    payload = parts[1]
    limits.check_payload(payload, camera, frame_id)
    if "shape" in metadata or "dtype" in metadata:  # send_image: a numpy array, BGR like OpenCV
        encoded = _read_raw(payload, metadata.get("shape"), metadata.get("dtype"), "bgr", limits, camera, frame_id)
    else:  # send_jpg
        encoded = _read_file(payload, limits, camera, frame_id)
    return Frame(
        camera=camera,
        frame_id=frame_id,
        capture_ts=received_ts,
        image=None,
        encoded=encoded,
        received_ts=received_ts,
        received_mono=received_mono,
    )


def decode_imagezmq(
    parts: Sequence[Buffer],
    max_payload_bytes: int,
    received_ts: float,
    received_mono: float,
    frame_id: int,
    cameras: Collection[str] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Frame:
    """`read_imagezmq`, then the image decoded (RGB (H, W, 3) or grey (H, W) uint8). Raises WireError."""
    frame = read_imagezmq(parts, ImageLimits(max_payload_bytes, max_pixels), received_ts, received_mono, frame_id, cameras)
    frame.image, frame.encoded = frame.decoded(), None
    return frame


# ---------------------------------------------------------------- verdicts


def _jsonable(value: Any) -> Any:
    """Plain JSON values; numpy scalars/arrays converted; non-finite floats become null
    (strict JSON parsers on PLCs and actuators reject NaN/Infinity)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _encode_heatmap(heatmap: np.ndarray, encoding: str) -> tuple[dict[str, Any], bytes]:
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"heatmap must be (H, W), got shape {heat.shape}")
    heat = np.nan_to_num(heat, nan=0.0, posinf=np.finfo(np.float32).max, neginf=np.finfo(np.float32).min)
    shape = [int(heat.shape[0]), int(heat.shape[1])]
    if encoding == "float16":
        data = np.clip(heat, -65504.0, 65504.0).astype("<f2").tobytes()
        return {"kind": "heatmap", "encoding": "float16", "shape": shape}, data
    # png16: the full range of this map over 0..65535; offset/scale in the header undo it
    lo, hi = float(heat.min()), float(heat.max())
    scale = (hi - lo) / 65535.0 if hi > lo else 1.0
    pixels = np.round((heat - lo) / scale).clip(0, 65535).astype(np.uint16)
    ok, buf = cv2.imencode(".png", pixels)
    if not ok:
        raise ValueError("could not encode heatmap PNG")
    return {"kind": "heatmap", "encoding": "png16", "shape": shape, "offset": lo, "scale": scale}, buf.tobytes()


def encode_verdict(verdict: Verdict, heatmap: str = "none", overlay: bool = False) -> list[bytes]:
    """Build a v1 verdict message: [topic, header, attachments...].

    `heatmap` ("none", "png", "float16") attaches Verdict.heatmap when it is set; `overlay`
    attaches Verdict.overlay_jpeg when it is set. A missing map or overlay is simply not
    attached (the header's `attachments` list says what is there).
    """
    if heatmap not in HEATMAP_ENCODINGS:
        raise ValueError(f"heatmap must be one of {HEATMAP_ENCODINGS}, got {heatmap!r}")
    attachments: list[dict[str, Any]] = []
    extra: list[bytes] = []
    if heatmap != "none" and verdict.heatmap is not None:
        meta, data = _encode_heatmap(verdict.heatmap, heatmap)
        attachments.append(meta)
        extra.append(data)
    if overlay and verdict.overlay_jpeg is not None:
        attachments.append({"kind": "overlay", "encoding": "jpeg"})
        extra.append(bytes(verdict.overlay_jpeg))
    header = {
        "v": WIRE_VERSION,
        "camera": verdict.camera,
        "frame_id": verdict.frame_id,
        "part_id": verdict.part_id,
        "verdict": verdict.verdict,
        "score": verdict.score,
        "threshold": verdict.threshold,
        "objects": verdict.objects,
        "reason": verdict.reason,
        "capture_ts": verdict.capture_ts,
        "latency_s": verdict.latency_s,
        "backend": verdict.backend,
        "bank_id": verdict.bank_id,
        "timings": verdict.timings,
        "id": verdict.id,
        "run_id": verdict.run_id,
        "seq": verdict.seq,
        "attachments": attachments,
    }
    blob = json.dumps(_jsonable(header), allow_nan=False).encode("utf-8")
    return [verdict.camera.encode("utf-8"), blob, *extra]


def _decode_heatmap(meta: dict[str, Any], data: Buffer) -> np.ndarray:
    shape = meta.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(n) and n > 0 for n in shape)):
        raise WireError("bad_shape", None, None, f"heatmap shape must be [H, W], got {shape!r}")
    if meta.get("encoding") == "float16":
        if len(data) != shape[0] * shape[1] * 2:
            raise WireError("bad_shape", None, None, f"float16 heatmap {shape} needs {shape[0] * shape[1] * 2} bytes, got {len(data)}")
        return np.frombuffer(data, dtype="<f2").reshape(shape).astype(np.float32)
    if meta.get("encoding") == "png16":
        pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED) if len(data) else None
        if pixels is None or list(pixels.shape) != shape:
            raise WireError("decode_failed", None, None, "heatmap PNG unreadable or of the wrong shape")
        return (float(meta.get("offset", 0.0)) + pixels.astype(np.float64) * float(meta.get("scale", 1.0))).astype(np.float32)
    raise WireError("bad_header", None, None, f"unknown heatmap encoding {meta.get('encoding')!r}")


def decode_verdict(parts: Sequence[Buffer]) -> Verdict:
    """Parse a v1 verdict message back into a Verdict (heatmap as float32 (H, W)). Raises WireError."""
    if len(parts) < 2:
        raise WireError("truncated", None, None, f"verdict messages have at least 2 parts, got {len(parts)}")
    camera = _topic(parts)  # "" for an error verdict whose frame named no readable camera
    header = _parse_json_object(parts[1], "verdict header", camera)
    fid = header.get("frame_id")
    frame_id = fid if _is_int(fid) else None
    if header.get("v") != WIRE_VERSION:
        raise WireError("unknown_version", camera, frame_id, f"wire version {header.get('v')!r}")
    if frame_id is None or header.get("verdict") not in VERDICT_VALUES:
        raise WireError("bad_header", camera, frame_id, "frame_id and verdict are required")
    attachments = header.get("attachments") or []
    if not isinstance(attachments, list) or len(attachments) != len(parts) - 2:
        raise WireError("truncated", camera, frame_id, f"header lists {len(attachments)} attachments, message has {len(parts) - 2}")
    heat: np.ndarray | None = None
    overlay_jpeg: bytes | None = None
    for meta, data in zip(attachments, parts[2:]):
        if not isinstance(meta, dict):
            raise WireError("bad_header", camera, frame_id, "attachment entries must be objects")
        if meta.get("kind") == "heatmap":
            try:
                heat = _decode_heatmap(meta, data)
            except WireError as e:
                raise WireError(e.reason, camera, frame_id, e.detail) from None
        elif meta.get("kind") == "overlay":
            overlay_jpeg = bytes(data)
        # unknown kinds are skipped: v1 may gain attachment kinds
    capture_ts = header.get("capture_ts")
    return Verdict(
        camera=camera,
        frame_id=frame_id,
        verdict=header["verdict"],
        capture_ts=float(capture_ts) if _is_number(capture_ts) else 0.0,
        part_id=header.get("part_id"),
        score=header.get("score"),
        threshold=header.get("threshold"),
        objects=header.get("objects") or [],
        reason=header.get("reason"),
        latency_s=header.get("latency_s"),
        backend=header.get("backend"),
        bank_id=header.get("bank_id"),
        heatmap=heat,
        overlay_jpeg=overlay_jpeg,
        timings=header.get("timings") or {},
        run_id=header.get("run_id") if isinstance(header.get("run_id"), str) else None,
        seq=header.get("seq") if _is_int(header.get("seq")) else None,
    )


# ---------------------------------------------------------------- the acknowledged channel

# ZeroMQ ROUTER (the daemon, `runtime.acked`) <-> DEALER (one per subscriber, e.g. `linewatch
# actuate`). Every message: [kind, JSON header {"v": 1, ...}, more parts...] (docs/wire-format.md,
# "Acknowledged verdicts"). Subscriber -> daemon: hello, ack, ping. Daemon -> subscriber:
# welcome, verdict (the header, then a whole verdict message as above), refused, hello_needed.
ACKED_TO_DAEMON = ("hello", "ack", "ping")
ACKED_TO_SUBSCRIBER = ("welcome", "verdict", "refused", "hello_needed")
ACKED_HEARTBEAT_S = 1.0  # a subscriber sends a ping (or, before its welcome, a hello) this often


@dataclass(frozen=True)
class AckedMessage:
    """One message of the acknowledged channel: its kind, its header, the parts after them."""

    kind: str
    header: dict[str, Any]
    rest: tuple[Buffer, ...] = ()

    def int_or_none(self, key: str) -> int | None:
        value = self.header.get(key)
        return value if _is_int(value) else None

    def str_or_none(self, key: str) -> str | None:
        value = self.header.get(key)
        return value if isinstance(value, str) else None


def encode_acked(kind: str, header: dict[str, Any] | None = None, rest: Sequence[Buffer] = ()) -> list[bytes]:
    """[kind, {"v": 1, **header}, *rest] for the acknowledged channel."""
    if kind not in ACKED_TO_DAEMON + ACKED_TO_SUBSCRIBER:
        raise ValueError(f"unknown acked message kind {kind!r}")
    blob = json.dumps(_jsonable({"v": WIRE_VERSION, **(header or {})}), allow_nan=False).encode("utf-8")
    return [kind.encode("ascii"), blob, *(bytes(p) for p in rest)]


def decode_acked(parts: Sequence[Buffer], kinds: Collection[str]) -> AckedMessage:
    """Parse one acknowledged-channel message whose kind must be one of `kinds`. Raises WireError."""
    if len(parts) < 2:
        raise WireError("truncated", None, None, f"acked messages have at least 2 parts, got {len(parts)}")
    kind = bytes(parts[0]).decode("ascii", errors="replace")
    if kind not in kinds:
        raise WireError("bad_header", None, None, f"acked message kind {kind[:32]!r}; expected one of {sorted(kinds)}")
    header = _parse_json_object(parts[1], f"acked {kind} header", None)
    if header.get("v") != WIRE_VERSION:
        raise WireError("unknown_version", None, None, f"wire version {header.get('v')!r}")
    return AckedMessage(kind, header, tuple(parts[2:]))
