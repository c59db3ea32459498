"""Replay: a camera simulator that sends a folder of images or a video file as frames.

Protocols:
  linewatch         a PUB socket sending linewatch.wire frame messages (connect by default,
                    to a daemon that binds; "bind" for a daemon that connects).
  imagezmq-pubsub   imagezmq's own ImageSender(REQ_REP=False), which always binds.
  imagezmq-reqrep   imagezmq's own ImageSender (REQ), which always connects and waits for the
                    hub's reply after each frame.
imagezmq supports encoding "raw" (send_image, BGR array) and "jpeg" (send_jpg) only.

PUB/SUB drops whatever is sent before a subscriber has joined ("slow joiner"), so PUB modes
wait `warmup_s` after opening the socket before the first frame (and, with `handshake_s`, for
the connection to the daemon first).

The frames come from a folder of images, a video file, or any iterable of (RGB image,
part_id) pairs (`linewatch demo` renders its frames as they are sent).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np
import zmq

from linewatch import wire
from linewatch.images import list_images, read_image, to_bgr
from linewatch.runtime.transport.security import ClientKeys

PROTOCOLS = ("linewatch", "imagezmq-pubsub", "imagezmq-reqrep")
_IMAGEZMQ_MODE = {"imagezmq-pubsub": "bind", "imagezmq-reqrep": "connect"}


def _frames(source: Path, loop: bool) -> Iterator[tuple[np.ndarray, str | None]]:
    """(RGB uint8 (H, W, 3) or grey (H, W), part_id) pairs: file stems for a folder, None for a video."""
    while True:
        if source.is_dir():
            for path in list_images(source):
                yield read_image(path), path.stem
        else:
            capture = cv2.VideoCapture(str(source))
            if not capture.isOpened():
                raise ValueError(f"{source}: not a folder of images nor a readable video file")
            got_any = False
            try:
                while True:
                    ok, bgr = capture.read()
                    if not ok:
                        break
                    got_any = True
                    yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), None
            finally:
                capture.release()
            if not got_any:
                raise ValueError(f"{source}: the video has no readable frames")
        if not loop:
            return


def _encode_file(rgb: np.ndarray, encoding: str) -> bytes:
    ok, buf = cv2.imencode(".jpg" if encoding == "jpeg" else ".png", to_bgr(rgb))
    if not ok:
        raise ValueError(f"could not encode a frame as {encoding}")
    return buf.tobytes()


def replay(
    source: Path | str | Iterable[tuple[np.ndarray, str | None]],
    endpoint: str,
    fps: float,
    protocol: str = "linewatch",
    camera: str = "cam0",
    encoding: str = "jpeg",
    loop: bool = False,
    count: int | None = None,
    mode: str | None = None,
    warmup_s: float = 0.5,
    stop: threading.Event | None = None,
    reply_timeout_s: float = 5.0,
    curve: ClientKeys | None = None,
    handshake_s: float = 0.0,
) -> int:
    """Send the images of `source` to `endpoint` at `fps` (<= 0: as fast as possible).

    `source`: a folder of images, a video file, or an iterable of (RGB uint8 (H, W, 3) image,
    part_id or None) pairs, taken one at a time as they are sent (no `loop` for those).
    Frame ids count from 0; capture_ts is the send time; part_id is the file stem (folders).
    `mode` defaults to "connect" for linewatch and to what imagezmq's sender does for its
    protocols (a contradicting mode is a ValueError). Stops after one pass (or forever with
    `loop`), after `count` frames, or when `stop` is set. Returns the number of frames sent.
    An imagezmq REQ/REP hub that does not reply within `reply_timeout_s` raises TimeoutError.
    `curve`: CurveZMQ keys for a daemon with runtime.security (linewatch protocol only).
    `handshake_s` (linewatch protocol, connect mode): first wait up to this long for the
    connection to the daemon to be made, then `warmup_s` for its subscription to arrive.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if encoding not in wire.ENCODINGS:
        raise ValueError(f"encoding must be one of {wire.ENCODINGS}, got {encoding!r}")
    if protocol in _IMAGEZMQ_MODE:
        if encoding == "png":
            raise ValueError("imagezmq carries raw arrays or JPEG only; use encoding 'raw' or 'jpeg'")
        if mode is not None and mode != _IMAGEZMQ_MODE[protocol]:
            raise ValueError(f"imagezmq's sender for {protocol} can only {_IMAGEZMQ_MODE[protocol]}, not {mode}")
        if curve is not None:
            raise ValueError("imagezmq's sender has no CurveZMQ option; use protocol 'linewatch' with keys")
    elif mode not in (None, "bind", "connect"):
        raise ValueError(f"mode must be 'bind' or 'connect', got {mode!r}")
    if isinstance(source, (str, Path)):
        if not Path(source).exists():
            raise ValueError(f"{source}: no such folder or file")
        frames = _frames(Path(source), loop)
    elif loop:
        raise ValueError("loop needs a folder or a video file to go through again, not frames")
    else:
        frames = iter(source)

    send, close = _open_sender(protocol, endpoint, mode or "connect", encoding, camera, reply_timeout_s, curve,
                               handshake_s)
    sent = 0
    try:
        if protocol != "imagezmq-reqrep" and warmup_s > 0:
            if stop is not None:
                stop.wait(warmup_s)
            else:
                time.sleep(warmup_s)
        start = time.monotonic()
        for image, part_id in frames:
            if (count is not None and sent >= count) or (stop is not None and stop.is_set()):
                break
            if fps > 0:
                delay = start + sent / fps - time.monotonic()
                if delay > 0:
                    if stop is not None and stop.wait(delay):
                        break
                    if stop is None:
                        time.sleep(delay)
            send(sent, image, part_id)
            sent += 1
    finally:
        close()
    return sent


class FramePublisher:
    """A socket sending linewatch.wire frame messages: the sender of `replay` and of
    `linewatch camera` (linewatch.runtime.transport.camera).

    By default a PUB socket, as replay always had: frames sent before the daemon has
    subscribed, or beyond the high-water mark, are dropped by ZeroMQ without a word.

    With `watch_subscribers` it is an XPUB socket (the daemon's SUB cannot tell the difference)
    that reads the subscriptions coming back: `wait_subscribed` waits until the daemon has
    subscribed (no first frames lost to a slow joiner), and `send` says what became of each
    frame: "sent", "no_daemon" (nobody subscribed: the daemon is down or restarting) or
    "send_hwm" (XPUB_NODROP: `send_hwm` frames already wait for the daemon). A subscriber that
    goes away unsubscribes (libzmq sends the unsubscription when its connection ends).
    """

    def __init__(self, endpoint: str, camera: str, encoding: str = "jpeg", mode: str = "connect",
                 curve: ClientKeys | None = None, handshake_s: float = 0.0, send_hwm: int | None = None,
                 watch_subscribers: bool = False, jpeg_quality: int = 90) -> None:
        if encoding not in wire.ENCODINGS:
            raise ValueError(f"encoding must be one of {wire.ENCODINGS}, got {encoding!r}")
        self.camera = camera
        self.endpoint = endpoint
        self._topic = camera.encode("utf-8")
        self._encoding = encoding
        self._jpeg_quality = jpeg_quality
        self._watch = watch_subscribers
        self._subscriptions: set[bytes] = set()
        self._context = zmq.Context()
        sock = self._context.socket(zmq.XPUB if watch_subscribers else zmq.PUB)
        self._sock = sock
        try:
            if send_hwm is not None:
                sock.sndhwm = send_hwm
            if watch_subscribers:
                sock.setsockopt(zmq.XPUB_NODROP, 1)
                # no queue for a daemon that is not connected: its pipe ends with the connection (so
                # the subscription goes, and frames are "no_daemon"), and a new one comes with the next
                sock.immediate = 1
            if curve is not None:
                curve.apply(sock)
            if mode == "bind":
                sock.bind(endpoint)
            elif handshake_s > 0 and not watch_subscribers:
                monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
                sock.connect(endpoint)
                monitor.poll(int(handshake_s * 1000))  # the connection is made (or the wait is over)
                sock.disable_monitor()
                monitor.close()
            else:
                sock.connect(endpoint)
        except zmq.ZMQError as e:
            self.close(linger_ms=0)
            raise ValueError(f"cannot {mode} a frame socket to {endpoint!r}: {e}") from None

    def _read_subscriptions(self, timeout_ms: int = 0) -> None:
        while self._sock.poll(timeout_ms, zmq.POLLIN):
            message = self._sock.recv(zmq.NOBLOCK)
            if message[:1] == b"\x01":
                self._subscriptions.add(message[1:])
            elif message[:1] == b"\x00":
                self._subscriptions.discard(message[1:])
            timeout_ms = 0

    @property
    def subscribed(self) -> bool:
        """Whether someone (the daemon) subscribed to this camera's frames (watch_subscribers only)."""
        self._read_subscriptions()
        return any(self._topic.startswith(prefix) for prefix in self._subscriptions)

    def wait_subscribed(self, timeout_s: float, stop: threading.Event | None = None) -> bool:
        """Wait up to `timeout_s` (or until `stop` is set) for a subscriber; True once there is one."""
        end = time.monotonic() + timeout_s
        while not self.subscribed:
            left = end - time.monotonic()
            if left <= 0 or (stop is not None and stop.is_set()):
                return False
            self._read_subscriptions(int(min(left, 0.1) * 1000) + 1)
        return True

    def send(self, frame_id: int, image: np.ndarray, capture_ts: float | None = None, part_id: str | None = None,
             pixel_format: str = "rgb") -> str:
        """Encode and send one frame: "sent", or why not ("no_daemon", "send_hwm"; watch_subscribers only)."""
        if self._watch and not self.subscribed:
            return "no_daemon"
        parts = wire.encode_frame(self.camera, frame_id, image, capture_ts=capture_ts, encoding=self._encoding,
                                  pixel_format=pixel_format, part_id=part_id, jpeg_quality=self._jpeg_quality)
        if not self._watch:
            self._sock.send_multipart(parts, copy=False)
            return "sent"
        try:
            self._sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return "send_hwm"
        return "sent"

    def close(self, linger_ms: int = 2000) -> None:
        """Close the socket, letting queued frames out for up to `linger_ms`."""
        self._sock.close(linger=linger_ms)
        self._context.term()


def _open_sender(protocol: str, endpoint: str, mode: str, encoding: str, camera: str, reply_timeout_s: float,
                 curve: ClientKeys | None = None, handshake_s: float = 0.0):
    """(send(frame_id, rgb, part_id), close()) for the protocol."""
    if protocol == "linewatch":
        publisher = FramePublisher(endpoint, camera, encoding, mode, curve, handshake_s)

        def send(frame_id: int, rgb: np.ndarray, part_id: str | None) -> None:
            publisher.send(frame_id, rgb, part_id=part_id, pixel_format="gray" if rgb.ndim == 2 else "rgb")

        return send, publisher.close

    import imagezmq  # only needed for the imagezmq protocols

    sender = imagezmq.ImageSender(connect_to=endpoint, REQ_REP=protocol == "imagezmq-reqrep")
    sender.zmq_socket.setsockopt(zmq.RCVTIMEO, int(reply_timeout_s * 1000))
    sender.zmq_socket.setsockopt(zmq.LINGER, 2000)

    def send_imagezmq(frame_id: int, rgb: np.ndarray, part_id: str | None) -> None:
        try:
            if encoding == "jpeg":
                sender.send_jpg(camera, _encode_file(rgb, "jpeg"))
            else:
                sender.send_image(camera, to_bgr(rgb))
        except zmq.Again:
            raise TimeoutError(f"no reply from the imagezmq hub at {endpoint} within {reply_timeout_s}s") from None

    return send_imagezmq, sender.close
