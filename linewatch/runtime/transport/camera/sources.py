"""Where a camera bridge's frames come from: the source URIs and the OpenCV source.

    opencv:INDEX             a USB/V4L2 camera by index (cv2.VideoCapture(INDEX)); opencv:/dev/videoN by path
    rtsp://..., rtsps://...  a network stream through OpenCV (its FFmpeg backend)
    http://..., https://...  an MJPEG/HTTP stream through OpenCV
    file:///path/video.mp4   a video file played as a camera, at the file's own frame rate; its end is
                             a lost source like any other: reopened after the backoff, so it loops
    folder:///path           a hot folder (folder.py): new image files, each sent once
    aravis:[DEVICE-ID]       GenICam (GigE Vision / USB3 Vision) through Aravis 0.8 (aravis.py): the
                             first camera found, or the one with that device id

A source has `open()` (SourceLost when it cannot be opened now: the bridge tries again after its
backoff), `read(stop)` (a Captured frame; None when there is nothing yet; SourceLost when the
source went away) and `close()`. `lost_frames` counts the frames the source failed to deliver
(OpenCV: failed reads), `polls` how often it looked for a frame (tests wait on it). A source
whose frames keep (`can_wait`: the hot folder) is paced and held back by the bridge instead of
skipped or dropped, and gives a frame back with `Captured.undo`.

Frame ids: OpenCV sources count frames from 0, across reopens, per process (a restarted bridge
starts at 0 again: a verdict's `id` is the unique key, not the frame id). Capture time: the host
clock when `read()` returned the frame -- for live sources the receive time (the camera's own
timestamp is not on the host clock), and for files too (a file's position, CAP_PROP_POS_MSEC, is
no wall time).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import cv2
import numpy as np

from linewatch.config import CameraConfig, OpenCVSourceConfig
from linewatch.runtime.transport.camera.aravis import aravis_source
from linewatch.runtime.transport.camera.base import Captured, Source, SourceError, SourceLost, grey_or_colour
from linewatch.runtime.transport.camera.folder import FolderSource

SCHEMES = ("opencv:", "rtsp://", "rtsps://", "http://", "https://", "file://", "folder://", "aravis:")
EXAMPLES = "opencv:0, rtsp://HOST/stream, http://HOST/video.mjpg, file:///path/video.mp4, folder:///path, aravis:"
MAX_FILE_FPS = 1000.0  # a video file claiming more is played as fast as it can be read


# (setting name, OpenCV property)
DEVICE_SETTINGS = (("fourcc", cv2.CAP_PROP_FOURCC), ("width", cv2.CAP_PROP_FRAME_WIDTH),
                   ("height", cv2.CAP_PROP_FRAME_HEIGHT), ("fps", cv2.CAP_PROP_FPS),
                   ("exposure", cv2.CAP_PROP_EXPOSURE), ("gain", cv2.CAP_PROP_GAIN),
                   ("buffer_size", cv2.CAP_PROP_BUFFERSIZE))


def _fourcc_text(code: float) -> str:
    value = int(code)
    return "".join(chr((value >> (8 * i)) & 0xFF) for i in range(4)) if value > 0 else ""


def apply_device_settings(capture: Any, settings: OpenCVSourceConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Set the configured device settings on an open capture: ({setting: value the driver reports
    now}, {setting: (asked, reported) for those it refused or changed})."""
    reported: dict[str, Any] = {}
    refused: dict[str, Any] = {}
    for name, prop in DEVICE_SETTINGS:
        wanted = getattr(settings, name)
        if wanted is None:
            continue
        value = cv2.VideoWriter_fourcc(*wanted) if name == "fourcc" else float(wanted)
        accepted = bool(capture.set(prop, value))
        now = capture.get(prop)
        if name == "fourcc":
            now_shown: Any = _fourcc_text(now)
            same = now_shown == wanted
        else:
            now_shown = round(float(now), 4)
            same = abs(float(now) - float(wanted)) <= max(1e-6, 0.01 * abs(float(wanted)))
        reported[name] = now_shown
        if not (accepted and same):
            refused[name] = {"asked": wanted, "reported": now_shown}
    return reported, refused


class OpenCVSource(Source):
    """cv2.VideoCapture on a device index, a URL or a video file."""

    def __init__(self, uri: str, target: int | str, live: bool, read_failures: int,
                 settings: OpenCVSourceConfig | None = None, log: Any = None) -> None:
        super().__init__()
        self._settings = settings if settings is not None else OpenCVSourceConfig()
        self._log = log
        self.uri = uri
        self.live = live
        self._target = target
        self._read_failures = read_failures  # failed reads in a row that make the source lost
        self._capture: Any = None
        self._next_id = 0
        self._failures = 0
        self._fps = 0.0
        self._opened_mono = 0.0
        self._frames_since_open = 0

    def open(self) -> None:
        if self.is_stream:  # FFmpeg: bounded waits for a stream that is not there or stalls
            capture = cv2.VideoCapture(self._target, cv2.CAP_FFMPEG, [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(self._settings.open_timeout_s * 1000),
                cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self._settings.read_timeout_s * 1000)])
        else:
            capture = cv2.VideoCapture(self._target)
        if not capture.isOpened():
            capture.release()
            raise SourceLost(f"OpenCV cannot open {self.uri}")
        if self.is_device:
            reported, refused = apply_device_settings(capture, self._settings)
            if self._log is not None and reported:
                self._log.info("camera_settings", source=self.uri, reported=reported)
            if self._log is not None and refused:
                self._log.warning("camera_settings_not_applied", source=self.uri, settings=refused,
                                  detail="the driver refused or changed these; the frames have what it reports")
        self._capture = capture
        self._failures = 0
        self._frames_since_open = 0
        self._opened_mono = time.monotonic()
        fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0) if not self.live else 0.0
        self._fps = fps if 0 < fps <= MAX_FILE_FPS else 0.0

    @property
    def is_stream(self) -> bool:
        return isinstance(self._target, str) and self._target.startswith(("rtsp://", "rtsps://", "http://", "https://"))

    @property
    def is_device(self) -> bool:
        return self.live and not self.is_stream

    def read(self, stop: threading.Event) -> Captured | None:
        if self._capture is None:
            raise SourceLost("not open")
        self.polls += 1
        if self._fps:  # a file plays at its own frame rate, like the camera that recorded it
            delay = self._opened_mono + self._frames_since_open / self._fps - time.monotonic()
            if delay > 0 and stop.wait(delay):
                return None
        ok, image = self._capture.read()
        now = time.time()
        if not ok or image is None:
            if not self.live:
                raise SourceLost("end of the video file" if self._frames_since_open else "the video file has no readable frame")
            self.lost_frames += 1
            self._failures += 1
            if self._failures >= self._read_failures:
                raise SourceLost(f"{self._failures} failed reads in a row")
            return None
        self._failures = 0
        self._frames_since_open += 1
        try:
            image, pixel_format = grey_or_colour(image)
        except ValueError as e:
            raise SourceLost(f"{self.uri} delivers frames linewatch cannot send: {e}") from None
        frame_id = self._next_id
        self._next_id += 1
        return Captured(image, pixel_format, frame_id, now)

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None


def _path_of(uri: str, scheme: str) -> Path:
    parsed = urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise SourceError(f"{uri}: {scheme}// URIs name a path on this machine: {scheme}///absolute/path "
                          f"(three slashes), not host {parsed.netloc!r}")
    path = unquote(parsed.path)
    if not path.startswith("/"):
        raise SourceError(f"{uri}: give an absolute path, {scheme}///absolute/path")
    return Path(path)


def open_source(uri: str | None, config: CameraConfig, log: Any = None, readonly: bool = False) -> Source:
    """The source a URI names (not opened yet). SourceError for a URI that can never work:
    unknown scheme, malformed, a video file or folder that does not exist.

    `readonly` (for `linewatch camera grab`): a hot folder's files are read but not moved, and
    its journal is not written."""
    if not uri:
        raise SourceError(f"no camera source: give --source URI (or `source:` in the camera config), e.g. {EXAMPLES}")
    uri = uri.strip()
    if uri.startswith("opencv:"):
        rest = uri[len("opencv:"):]
        if rest.isdigit():
            return OpenCVSource(uri, int(rest), live=True, read_failures=config.reconnect.read_failures,
                                settings=config.opencv, log=log)
        if rest.startswith("/dev/"):
            return OpenCVSource(uri, rest, live=True, read_failures=config.reconnect.read_failures,
                                settings=config.opencv, log=log)
        raise SourceError(f"{uri}: opencv: takes a device index (opencv:0) or a device path (opencv:/dev/video0); "
                          "streams are rtsp://... or http://..., video files file:///path")
    if uri.startswith(("rtsp://", "rtsps://", "http://", "https://")):
        if not urlparse(uri).netloc:
            raise SourceError(f"{uri}: no host in this URL")
        return OpenCVSource(uri, uri, live=True, read_failures=config.reconnect.read_failures,
                                settings=config.opencv, log=log)
    if uri.startswith("file:"):
        if not uri.startswith("file://"):
            raise SourceError(f"{uri}: write file:///absolute/path/video.mp4")
        path = _path_of(uri, "file:")
        if path.is_dir():
            raise SourceError(f"{uri}: {path} is a folder; a hot folder is folder://{path}")
        if not path.is_file():
            raise SourceError(f"{uri}: no such video file {path}")
        return OpenCVSource(uri, str(path), live=False, read_failures=config.reconnect.read_failures)
    if uri.startswith("folder:"):
        if not uri.startswith("folder://"):
            raise SourceError(f"{uri}: write folder:///absolute/path")
        path = _path_of(uri, "folder:")
        if not path.is_dir():
            raise SourceError(f"{uri}: no such folder {path}")
        if not readonly and not os.access(path, os.W_OK) and config.folder.after == "move":
            raise SourceError(f"{uri}: {path} is not writable, and folder.after is move (sent files go to "
                              f"{config.folder.done_dir}/); make it writable or set folder.after: leave")
        return FolderSource(uri, path, config.folder, log, readonly=readonly)
    if uri.startswith("aravis:"):
        return aravis_source(uri, config.aravis, log)
    raise SourceError(f"{uri!r}: unknown camera source; use one of {EXAMPLES}")
