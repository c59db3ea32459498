"""The types every camera source shares: Source (the interface), Captured (one frame), the two
errors, and the conversion of OpenCV images to what the bridge sends."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np


class SourceError(Exception):
    """A source that can never work as given (bad URI, missing file): a start-up error, exit status 2."""


class SourceLost(Exception):
    """The source cannot deliver now (cannot be opened, device gone, stream error, end of file,
    folder removed); the bridge closes it and opens it again after a backoff."""


@dataclass
class Captured:
    """One frame from a source."""

    image: np.ndarray  # uint8 or uint16, (H, W, 3) in `pixel_format` order, or grey (H, W)
    pixel_format: str  # "bgr", "rgb" or "gray"
    frame_id: int
    capture_ts: float  # seconds since the epoch, host clock
    part_id: str | None = None
    done: Callable[[], None] | None = None  # called once the frame was handed on (the folder moves its file)
    undo: Callable[[], None] | None = None  # called instead when it was not (a source that can wait takes it back)


class Source:
    """The interface of a camera source (see the module's docstring)."""

    uri: str = ""
    live: bool = True  # False for a video file: its end is expected, and it is paced at its frame rate
    can_wait: bool = False  # frames keep (files): paced and held back instead of skipped or dropped
    clock_offset_s: float | None = None  # host clock - the camera's, for a source that maps camera timestamps

    def __init__(self) -> None:
        self.lost_frames = 0
        self.polls = 0

    def open(self) -> None:
        raise NotImplementedError

    def read(self, stop: threading.Event) -> Captured | None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return self.uri


def grey_or_colour(image: np.ndarray) -> tuple[np.ndarray, str]:
    """An OpenCV image (BGR, BGRA, grey; 8 or 16 bit) and its pixel format ("bgr" or "gray").
    16-bit samples stay 16 bit: the daemon scales them through its `detector.sample_window`."""
    if image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"pixel type {image.dtype}; 8 or 16 bit only")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return image, "gray"
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR), "bgr"
    if image.ndim == 3 and image.shape[2] == 3:
        return image, "bgr"
    raise ValueError(f"image of shape {image.shape}; grey, BGR or BGRA only")


