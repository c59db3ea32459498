"""Reading image files and folders, with errors that name the file and the problem."""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageError(Exception):
    """An image that cannot be used; the message names the file and why."""


DEFAULT_SAMPLE_WINDOW = (0, 65535)  # detector.sample_window: the full 16-bit range -> 0..255


def check_window(window: tuple[int, int] | list[int]) -> tuple[int, int]:
    """A sample window [low, high]: integers with 0 <= low < high <= 65535; ValueError otherwise."""
    if len(window) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in window):
        raise ValueError(f"a sample window is two integers [low, high], got {window!r}")
    low, high = int(window[0]), int(window[1])
    if not 0 <= low < high <= 65535:
        raise ValueError(f"a sample window needs 0 <= low < high <= 65535, got [{low}, {high}]")
    return low, high


def scale_window(image: np.ndarray, window: tuple[int, int] | list[int] = DEFAULT_SAMPLE_WINDOW) -> np.ndarray:
    """16-bit samples -> uint8 through the window [low, high]: low and below become 0, high and
    above 255, linear between, rounded half up: round((v - low) * 255 / (high - low)).

    A Mono12 camera's samples (0..4095 in 16-bit words) want [0, 4095]; a dim scene a narrower
    window. The default [0, 65535] is the plain 16 -> 8 bit reduction (v / 257, rounded).
    One lookup per sample in a 65536-entry table (exact integers; no wider copy of the image)."""
    return _window_table(*check_window(window))[image]


@functools.lru_cache(maxsize=8)
def _window_table(low: int, high: int) -> np.ndarray:
    """uint8 (65536,): every 16-bit sample through the window [low, high] (`scale_window`)."""
    span = high - low
    shifted = np.clip(np.arange(65536, dtype=np.int64), low, high) - low
    table = ((shifted * 510 + span) // (2 * span)).astype(np.uint8)  # round(x * 255 / span), halves up
    table.flags.writeable = False
    return table


def read_image(path: str | Path, window: tuple[int, int] | list[int] = DEFAULT_SAMPLE_WINDOW) -> np.ndarray:
    """Read an image file as RGB uint8 (H, W, 3), or grey uint8 (H, W) for a grey file (a mono
    camera); 16-bit files are scaled to 8 bits through `window` (`scale_window`). Whether a
    grey image fits is the bank's business (a mono bank takes grey images only, a colour bank
    colour ones)."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise ImageError(f"{path}: not a readable image (corrupt or unsupported format)")
    if image.dtype != np.uint8:
        if image.dtype == np.uint16:
            image = scale_window(image, window)
        else:
            raise ImageError(f"{path}: unsupported pixel type {image.dtype} (8-bit or 16-bit images only)")
    if image.ndim == 2 or image.shape[2] == 1:
        return np.ascontiguousarray(image.reshape(image.shape[:2]))
    if image.shape[2] == 2:  # grey + alpha
        return np.ascontiguousarray(image[..., 0])
    if image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    else:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(image)


def is_grey(image: np.ndarray) -> bool:
    """Whether an image as `read_image` returns it is grey (H, W) rather than RGB (H, W, 3)."""
    return image.ndim == 2


def to_bgr(image: np.ndarray) -> np.ndarray:
    """An image as OpenCV writes it: RGB (H, W, 3) -> BGR; grey (H, W) as it is."""
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)


def write_image(path: str | Path, rgb: np.ndarray) -> None:
    """Write an RGB (H, W, 3) or grey (H, W) uint8 image; the format follows the suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb
    ok, encoded = cv2.imencode(path.suffix or ".png", array)
    if not ok:
        raise ImageError(f"{path}: could not encode image")
    encoded.tofile(str(path))


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name; a clear error when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"{folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ImageError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return files
