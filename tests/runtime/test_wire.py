"""linewatch.wire: frame and verdict messages, round trips and every refusal."""

from __future__ import annotations

import json
import zlib

import cv2
import numpy as np
import pytest

from linewatch import wire
from linewatch.wire import Verdict
from linewatch.wire import WireError

MAX = 1 << 20


def _image(h: int = 6, w: int = 8) -> np.ndarray:
    """A small RGB (h, w, 3) image with distinct channels, so a colour swap shows."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    image[..., 0] = 200  # red plane constant
    image[..., 2] = 10  # blue plane constant
    return image


def _decode(parts, max_bytes: int = MAX, cameras=None, **kw):
    return wire.decode_frame(parts, max_bytes, received_ts=100.0, received_mono=5.0, cameras=cameras, **kw)


def _with_header(parts: list[bytes], **changes) -> list[bytes]:
    header = json.loads(parts[1])
    for key, value in changes.items():
        if value is ...:
            header.pop(key)
        else:
            header[key] = value
    return [parts[0], json.dumps(header).encode(), parts[2]]


def _refused(parts, reason: str, camera: str | None = "cam0", frame_id: int | None = 7, **kw) -> WireError:
    with pytest.raises(WireError) as info:
        _decode(parts, **kw)
    err = info.value
    assert (err.reason, err.camera, err.frame_id) == (reason, camera, frame_id), err
    assert err.reason in wire.ERROR_REASONS
    return err


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("pixel_format", ["rgb", "bgr"])
def test_raw_round_trip_gives_rgb(pixel_format: str) -> None:
    rgb = _image()
    sent = rgb if pixel_format == "rgb" else rgb[..., ::-1]
    parts = wire.encode_frame("cam0", 7, sent, capture_ts=12.5, pixel_format=pixel_format, part_id="P-1", encoder_position=42)
    assert parts[0] == b"cam0" and len(parts) == 3
    frame = _decode(parts)
    assert (frame.camera, frame.frame_id, frame.capture_ts) == ("cam0", 7, 12.5)
    assert (frame.part_id, frame.encoder_position) == ("P-1", 42)
    assert (frame.received_ts, frame.received_mono) == (100.0, 5.0)
    assert frame.image.dtype == np.uint8 and frame.image.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(frame.image, rgb)


def test_png_round_trip_is_exact_and_jpeg_keeps_colour() -> None:
    rgb = _image(16, 16)
    np.testing.assert_array_equal(_decode(wire.encode_frame("cam0", 1, rgb, encoding="png")).image, rgb)
    flat = np.zeros((16, 16, 3), np.uint8)
    flat[...] = (200, 100, 10)
    got = _decode(wire.encode_frame("cam0", 1, flat, encoding="jpeg")).image
    assert got.shape == (16, 16, 3)
    assert np.abs(got.astype(int) - flat).max() <= 3  # red stays red: no channel swap


def test_optional_header_keys_default() -> None:
    parts = _with_header(wire.encode_frame("cam0", 7, _image()), capture_ts=..., part_id=..., encoder_position=...)
    frame = _decode(parts)
    assert frame.capture_ts == 100.0  # receive time
    assert frame.part_id is None and frame.encoder_position is None


def test_unknown_header_keys_are_ignored() -> None:
    assert _decode(_with_header(wire.encode_frame("cam0", 7, _image()), exposure_us=800)).frame_id == 7


# ---------------------------------------------------------------- refusals


def test_truncated_messages() -> None:
    parts = wire.encode_frame("cam0", 7, _image())
    _refused(parts[:1], "truncated", frame_id=None)
    _refused(parts[:2], "truncated")  # header readable: frame id known
    _refused([], "truncated", camera=None, frame_id=None)


def test_header_not_json_or_not_an_object() -> None:
    parts = wire.encode_frame("cam0", 7, _image())
    _refused([parts[0], b"{not json", parts[2]], "bad_header", frame_id=None)
    _refused([parts[0], b"\xff\xfe", parts[2]], "bad_header", frame_id=None)
    _refused([parts[0], b"[1, 2]", parts[2]], "bad_header", frame_id=None)
    _refused([parts[0], b"x" * (wire.MAX_HEADER_BYTES + 1), parts[2]], "bad_header", frame_id=None)
    _refused([b"\xff", parts[1], parts[2]], "bad_header", camera=None, frame_id=None)
    _refused([*parts, b"extra"], "bad_header", frame_id=None)


def test_unknown_version() -> None:
    parts = wire.encode_frame("cam0", 7, _image())
    _refused(_with_header(parts, v=2), "unknown_version")
    _refused(_with_header(parts, v=...), "unknown_version")


@pytest.mark.parametrize(
    "changes, frame_id",
    [
        ({"frame_id": ...}, None),
        ({"frame_id": "7"}, None),
        ({"frame_id": -1}, None),
        ({"camera": ...}, 7),
        ({"camera": "cam9"}, 7),  # header disagrees with the topic
        ({"encoding": ...}, 7),
        ({"encoding": "webp"}, 7),
        ({"pixel_format": ...}, 7),
        ({"capture_ts": "noon"}, 7),
        ({"part_id": 17}, 7),
        ({"encoder_position": 1.5}, 7),
    ],
)
def test_missing_or_wrong_keys(changes: dict, frame_id: int | None) -> None:
    _refused(_with_header(wire.encode_frame("cam0", 7, _image()), **changes), "bad_header", frame_id=frame_id)


def test_wrong_shape() -> None:
    parts = wire.encode_frame("cam0", 7, _image(6, 8))
    _refused(_with_header(parts, shape=[6, 9, 3]), "bad_shape")  # bytes do not match
    _refused([parts[0], parts[1], parts[2][:-1]], "bad_shape")
    _refused(_with_header(parts, shape=[6, 8]), "bad_shape")
    _refused(_with_header(parts, shape=[6, 4, 6]), "bad_shape")  # 6 channels
    _refused(_with_header(parts, shape=[0, 8, 3]), "bad_shape")
    _refused(_with_header(parts, shape=...), "bad_shape")
    _refused(_with_header(parts, shape=[4, 4, 9]), "bad_shape")
    _refused(_with_header(parts, shape=[12, 8, 2]), "bad_shape")
    _refused(_with_header(parts, pixel_format="gray"), "bad_shape")  # gray with 3 channels


def test_wrong_dtype() -> None:
    parts = wire.encode_frame("cam0", 7, _image())
    _refused(_with_header(parts, dtype="float32"), "bad_dtype")
    _refused(_with_header(parts, dtype=...), "bad_dtype")


def test_corrupt_or_empty_jpeg() -> None:
    parts = wire.encode_frame("cam0", 7, _image(32, 32), encoding="jpeg")
    _refused([parts[0], parts[1], b"\xff\xd8 definitely not a jpeg"], "decode_failed")
    _refused([parts[0], parts[1], b""], "decode_failed")


def test_too_large_is_checked_before_decoding() -> None:
    parts = wire.encode_frame("cam0", 7, _image(64, 64))
    err = _refused(parts, "too_large", max_bytes=1000)
    assert "12288" in err.detail
    # even a payload that would not decode is refused as too large, without decoding it
    _refused([parts[0], _with_header(parts, encoding="jpeg")[1], b"\0" * 2000], "too_large", max_bytes=1000)


def _grey(h: int = 6, w: int = 8) -> np.ndarray:
    return np.arange(h * w, dtype=np.uint8).reshape(h, w) * 5


@pytest.mark.parametrize("encoding", ["raw", "png", "jpeg"])
def test_grey_frames_are_read_grey_and_declare_it_before_decoding(encoding: str) -> None:
    grey = _grey(16, 16)
    parts = wire.encode_frame("cam0", 7, grey, encoding=encoding, pixel_format="gray")
    read = wire.read_frame(parts, wire.ImageLimits(), 1.0, 1.0)
    assert read.image is None and read.is_grey is True  # known from the header alone
    image = read.decoded()
    assert image.shape == (16, 16) and image.dtype == np.uint8 and read.image is None
    if encoding != "jpeg":
        np.testing.assert_array_equal(image, grey)
    colour = wire.read_frame(wire.encode_frame("cam0", 7, _image(16, 16), encoding=encoding), wire.ImageLimits(),
                             1.0, 1.0)
    assert colour.is_grey is False and colour.decoded().shape == (16, 16, 3)
    # one channel is grey whatever pixel_format says
    assert _decode(wire.encode_frame("cam0", 7, grey[..., None], pixel_format="rgb")).image.shape == (16, 16)


def test_grey_png_with_alpha_is_grey() -> None:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.dstack([_grey(), np.full((6, 8), 255, np.uint8)]), "LA").save(buffer, "PNG")
    png = buffer.getvalue()
    assert png[25] == 4  # PNG colour type 4: grey + alpha
    parts = wire.encode_frame("cam0", 7, _image(), encoding="png")
    assert wire.read_frame([parts[0], parts[1], png], wire.ImageLimits(), 1.0, 1.0).is_grey
    frame = _decode([parts[0], parts[1], png])
    np.testing.assert_array_equal(frame.image, _grey())


def test_16_bit_frames_are_scaled_through_the_window() -> None:
    # Mono12 samples in 16-bit words; the window [1000, 2000] by hand: round((v - 1000) * 255 / 1000)
    values = np.array([[0, 999, 1000, 1001, 1002, 1500, 1998, 2000, 4095]], np.uint16)
    expected = np.array([[0, 0, 0, 0, 1, 128, 254, 255, 255]], np.uint8)  # 1500: 127.5 rounds up
    raw = wire.encode_frame("cam0", 7, values, pixel_format="gray")
    assert json.loads(raw[1])["dtype"] == "uint16" and len(raw[2]) == values.size * 2
    assert raw[2][:4] == bytes([0, 0, 0xE7, 0x03])  # little-endian: 0, 999
    png = wire.encode_frame("cam0", 7, values, encoding="png", pixel_format="gray")
    for parts in (raw, png):
        np.testing.assert_array_equal(_decode(parts, window=(1000, 2000)).image, expected)
    # the default window is the whole 16-bit range: v / 257, rounded
    np.testing.assert_array_equal(_decode(raw).image, [[0, 4, 4, 4, 4, 6, 8, 8, 16]])
    # 16-bit colour PNG: the same window on every channel
    rgb16 = np.zeros((2, 2, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 1], rgb16[..., 2] = 1500, 2000, 900
    got = _decode(wire.encode_frame("cam0", 7, rgb16, encoding="png"), window=(1000, 2000)).image
    assert got.shape == (2, 2, 3) and got[0, 0].tolist() == [128, 255, 0]
    _refused(_with_header(raw, shape=[1, 9, 1], dtype="uint8"), "bad_shape")  # 18 bytes are not 9 uint8


def test_16_bit_png_header_is_read_without_decoding(monkeypatch) -> None:
    def no_decoding(*args, **kwargs):
        raise AssertionError("the image was handed to the decoder")

    grey16 = wire.encode_frame("cam0", 7, np.full((5, 7), 300, np.uint16), encoding="png", pixel_format="gray")
    rgba16 = cv2.imencode(".png", np.zeros((5, 7, 4), np.uint16))[1].tobytes()
    monkeypatch.setattr(wire.cv2, "imdecode", no_decoding)
    frame = wire.read_frame(grey16, wire.ImageLimits(), 1.0, 1.0)
    assert (frame.encoded.width, frame.encoded.height, frame.encoded.channels, frame.encoded.sample_bytes,
            frame.encoded.grey) == (7, 5, 1, 2, True)
    assert frame.encoded.decoded_bytes == 5 * 7 * 2 and "1 channels of 16 bits" in frame.describe()
    colour = wire.read_frame([grey16[0], grey16[1], rgba16], wire.ImageLimits(), 1.0, 1.0)
    assert (colour.encoded.channels, colour.encoded.sample_bytes, colour.is_grey) == (4, 2, False)
    # the declared decoded bytes count the 16-bit samples: 5 x 7 x 4 x 2 = 280
    with pytest.raises(WireError) as info:
        wire.read_frame([grey16[0], grey16[1], rgba16], wire.ImageLimits(max_decoded_bytes=279), 1.0, 1.0)
    assert info.value.reason == "too_large"


def test_sample_window_is_checked() -> None:
    from linewatch.images import scale_window

    for bad in [(5, 5), (10, 2), (-1, 10), (0, 65536), (0.5, 10), (1, 2, 3)]:
        with pytest.raises(ValueError):
            scale_window(np.zeros(1, np.uint16), bad)


def test_unknown_camera() -> None:
    parts = wire.encode_frame("cam0", 7, _image())
    _refused(parts, "unknown_camera", cameras={"cam1"})
    assert _decode(parts, cameras={"cam0"}).camera == "cam0"


# ---------------------------------------------------------------- imagezmq


def _imagezmq_array(msg: str, array: np.ndarray) -> list[bytes]:
    """Exactly what imagezmq's SerializingSocket.send_array puts on the wire."""
    return [json.dumps({"msg": msg, "dtype": str(array.dtype), "shape": array.shape}).encode(), array.tobytes()]


def test_imagezmq_array_and_jpeg_are_bgr_converted() -> None:
    rgb = _image()
    frame = wire.decode_imagezmq(_imagezmq_array("host1|exposure=3", rgb[..., ::-1].copy()), MAX, 9.0, 1.0, frame_id=3)
    assert (frame.camera, frame.frame_id, frame.capture_ts) == ("host1", 3, 9.0)
    np.testing.assert_array_equal(frame.image, rgb)
    flat = np.zeros((16, 16, 3), np.uint8)
    flat[...] = (10, 100, 200)  # BGR: red in the last plane
    jpg = cv2.imencode(".jpg", flat)[1].tobytes()
    frame = wire.decode_imagezmq([json.dumps({"msg": "host1"}).encode(), jpg], MAX, 9.0, 1.0, frame_id=4)
    assert frame.image[0, 0, 0] > 190  # red first after conversion


def test_imagezmq_grey_and_16_bit_arrays() -> None:
    grey = _grey()
    frame = wire.decode_imagezmq(_imagezmq_array("host1", grey), MAX, 9.0, 1.0, frame_id=3)
    np.testing.assert_array_equal(frame.image, grey)
    bgr16 = np.zeros((2, 3, 3), np.uint16)
    bgr16[..., 2] = 65535  # red, BGR order
    frame = wire.decode_imagezmq(_imagezmq_array("host1", bgr16), MAX, 9.0, 1.0, frame_id=4)
    assert frame.image[0, 0].tolist() == [255, 0, 0]


def test_imagezmq_refusals() -> None:
    def refused(parts, reason, camera="host1", **kw):
        with pytest.raises(WireError) as info:
            wire.decode_imagezmq(parts, kw.get("max_bytes", MAX), 9.0, 1.0, frame_id=5, cameras=kw.get("cameras"))
        assert (info.value.reason, info.value.camera) == (reason, camera)
        if camera is not None:
            assert info.value.frame_id == 5

    bgr = _image()
    good = _imagezmq_array("host1", bgr)
    refused(good[:1], "truncated")
    refused([b"nope", good[1]], "bad_header", camera=None)
    refused([json.dumps({"msg": 3}).encode(), good[1]], "bad_header", camera=None)
    refused([good[0], good[1][:-3]], "bad_shape")
    refused(_imagezmq_array("host1", bgr.astype(np.float32)), "bad_dtype")
    refused(_imagezmq_array("host1", np.zeros((4, 4, 4), np.uint8)), "bad_shape")
    refused([json.dumps({"msg": "host1"}).encode(), b"garbage"], "decode_failed")
    refused(good, "too_large", max_bytes=10)
    refused(good, "unknown_camera", cameras={"host2"})


# ---------------------------------------------------------------- verdicts


def _verdict(**kw) -> Verdict:
    base = dict(
        camera="cam0",
        frame_id=17,
        verdict="fail",
        capture_ts=1000.5,
        part_id="P-17",
        score=3.21,
        threshold=2.1,
        objects=[{"label": "screw", "box": [1, 2, 3, 4], "score": np.float32(0.5)}],
        latency_s=0.0123,
        backend="classic",
        bank_id="bank-1",
        timings={"backbone": 0.004},
    )
    base.update(kw)
    return Verdict(**base)


def test_verdict_round_trip_without_attachments() -> None:
    verdict = _verdict(heatmap=np.ones((4, 4), np.float32), overlay_jpeg=b"\xff\xd8jpeg")
    parts = wire.encode_verdict(verdict)  # defaults: no attachments
    assert parts[0] == b"cam0" and len(parts) == 2
    back = wire.decode_verdict(parts)
    assert back.heatmap is None and back.overlay_jpeg is None
    for key in ("camera", "frame_id", "verdict", "capture_ts", "part_id", "score", "threshold", "latency_s", "backend", "bank_id", "timings"):
        assert getattr(back, key) == getattr(verdict, key), key
    assert back.objects == [{"label": "screw", "box": [1, 2, 3, 4], "score": 0.5}]


def test_verdict_heatmap_png16_and_float16() -> None:
    heat = np.linspace(-1.0, 7.0, 12 * 10, dtype=np.float32).reshape(12, 10)
    png = wire.decode_verdict(wire.encode_verdict(_verdict(heatmap=heat), heatmap="png"))
    assert png.heatmap.shape == (12, 10) and png.heatmap.dtype == np.float32
    assert np.abs(png.heatmap - heat).max() <= 8.0 / 65535  # one 16-bit step of the range
    f16 = wire.decode_verdict(wire.encode_verdict(_verdict(heatmap=heat), heatmap="float16"))
    np.testing.assert_allclose(f16.heatmap, heat, rtol=1e-3, atol=1e-3)
    flat = wire.decode_verdict(wire.encode_verdict(_verdict(heatmap=np.full((3, 3), 2.5, np.float32)), heatmap="png"))
    np.testing.assert_allclose(flat.heatmap, 2.5)


def test_verdict_overlay_and_header_lists_attachments() -> None:
    image = _image(20, 30)
    heat = np.random.default_rng(1).random((10, 15), dtype=np.float32)
    overlay = cv2.imencode(".jpg", image)[1].tobytes()  # any JPEG: the pipeline makes the real one
    parts = wire.encode_verdict(_verdict(heatmap=heat, overlay_jpeg=overlay), heatmap="float16", overlay=True)
    header = json.loads(parts[1])
    assert [a["kind"] for a in header["attachments"]] == ["heatmap", "overlay"] and len(parts) == 4
    back = wire.decode_verdict(parts)
    assert back.overlay_jpeg == overlay and back.heatmap.shape == (10, 15)
    # the overlay is only attached when someone made it
    assert len(wire.encode_verdict(_verdict(), heatmap="png", overlay=True)) == 2


def test_verdict_error_values_and_non_finite_numbers() -> None:
    verdict = _verdict(verdict="error", reason="too_large", score=float("nan"), threshold=None, objects=[])
    parts = wire.encode_verdict(verdict)
    json.loads(parts[1], parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    back = wire.decode_verdict(parts)
    assert (back.verdict, back.reason, back.score) == ("error", "too_large", None)


def test_verdict_refusals() -> None:
    parts = wire.encode_verdict(_verdict(heatmap=np.ones((2, 2), np.float32)), heatmap="float16")
    for bad, reason in [
        (parts[:1], "truncated"),
        (parts[:2], "truncated"),  # the header promises an attachment
        ([parts[0], b"{", *parts[2:]], "bad_header"),
        ([parts[0], json.dumps({**json.loads(parts[1]), "v": 9}).encode(), parts[2]], "unknown_version"),
        ([parts[0], json.dumps({**json.loads(parts[1]), "verdict": "maybe"}).encode(), parts[2]], "bad_header"),
        ([parts[0], parts[1], parts[2][:-1]], "bad_shape"),
    ]:
        with pytest.raises(WireError) as info:
            wire.decode_verdict(bad)
        assert info.value.reason == reason, bad


# ---------------------------------------------------------------- declared image size (decompression bombs)


def _jpeg_declaring(height: int, width: int) -> bytes:
    """A small real JPEG whose SOF0 header is patched to declare height x width."""
    data = bytearray(cv2.imencode(".jpg", _image(16, 16)[..., ::-1])[1].tobytes())
    sof = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def _png_declaring(height: int, width: int) -> bytes:
    """A small real PNG whose IHDR declares height x width (CRC recomputed, so it is valid)."""
    data = bytearray(cv2.imencode(".png", _image(16, 16))[1].tobytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


@pytest.mark.parametrize("make", [_jpeg_declaring, _png_declaring])
def test_declared_pixel_count_is_refused_before_any_decoding(make, monkeypatch) -> None:
    # The fault run's bomb: 629 bytes declaring 20000 x 20000 pixels were decoded in full (5 GB).
    def no_decoding(*args, **kwargs):
        raise AssertionError("the image was handed to the decoder")

    monkeypatch.setattr(wire.cv2, "imdecode", no_decoding)
    parts = wire.encode_frame("cam0", 7, _image(16, 16), encoding="jpeg")
    bomb = make(20000, 20000)
    assert len(bomb) < 2000
    err = _refused([parts[0], parts[1], bomb], "too_large")
    assert "20000x20000" in err.detail and "max_image_pixels" in err.detail
    # the limit is the caller's: 100 x 100 declared against a limit of 5000 pixels
    _refused([parts[0], parts[1], make(100, 100)], "too_large", max_pixels=5000)
    # and the same for imagezmq's send_jpg
    with pytest.raises(WireError) as info:
        wire.decode_imagezmq([json.dumps({"msg": "host1"}).encode(), bomb], MAX, 9.0, 1.0, frame_id=5)
    assert (info.value.reason, info.value.camera, info.value.frame_id) == ("too_large", "host1", 5)


def test_declared_size_within_the_limit_decodes() -> None:
    parts = wire.encode_frame("cam0", 7, _image(16, 16), encoding="png")
    assert _decode(parts, max_pixels=16 * 16).image.shape == (16, 16, 3)
    _refused(parts, "too_large", max_pixels=16 * 16 - 1)
    raw = wire.encode_frame("cam0", 7, _image(16, 16))
    _refused(raw, "too_large", max_pixels=255)


def test_only_jpeg_and_png_files_are_decoded() -> None:
    # OpenCV would decode BMP, TIFF, WebP, ... too; the wire format promises JPEG or PNG only.
    parts = wire.encode_frame("cam0", 7, _image(16, 16), encoding="jpeg")
    bmp = cv2.imencode(".bmp", _image(16, 16))[1].tobytes()
    err = _refused([parts[0], parts[1], bmp], "decode_failed")
    assert "JPEG or PNG" in err.detail


# ---------------------------------------------------------------- camera ids


@pytest.mark.parametrize("camera", ["", "c" * 65, "cam\n0", "cam\x00", "bell\x07"])
def test_camera_ids_must_be_short_printable_text(camera: str) -> None:
    # Camera ids become metric labels, log fields and topics: a 10 kB id or a newline must not.
    parts = wire.encode_frame("cam0", 7, _image())
    with pytest.raises(WireError) as info:
        _decode([camera.encode(), *parts[1:]])
    assert (info.value.reason, info.value.camera) == ("bad_camera", None)
    with pytest.raises(WireError) as info:
        wire.decode_imagezmq(_imagezmq_array(camera + "|x", _image()), MAX, 9.0, 1.0, frame_id=5)
    assert info.value.reason in ("bad_camera", "bad_header")  # "" is no msg at all


def test_longest_camera_id_and_non_ascii_ids_are_accepted() -> None:
    for camera in ("c" * wire.MAX_CAMERA_ID_LENGTH, "Kamera-Prüfstand-3"):
        parts = wire.encode_frame(camera, 7, _image())
        assert _decode(parts).camera == camera


def test_a_huge_topic_is_refused_without_decoding_it() -> None:
    parts = wire.encode_frame("cam0", 7, _image())
    with pytest.raises(WireError) as info:
        _decode([b"\xff" * 1_000_000, *parts[1:]])  # not even UTF-8: the length alone refuses it
    assert info.value.reason == "bad_camera" and "1000000 bytes" in info.value.detail


def test_error_verdicts_without_a_camera_still_round_trip() -> None:
    verdict = Verdict(camera="", frame_id=-1, verdict="error", capture_ts=1.0, reason="bad_camera")
    assert wire.decode_verdict(wire.encode_verdict(verdict)).reason == "bad_camera"
