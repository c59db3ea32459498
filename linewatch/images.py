"""Reading image files and folders, with errors that name the file and the problem."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageError(Exception):
    """An image that cannot be used; the message names the file and why."""


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 (H, W, 3). Grey files are refused: the detector
    compares colour features, and a grey frame from a colour line means a wrong camera setting."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise ImageError(f"{path}: not a readable image (corrupt or unsupported format)")
    if image.dtype != np.uint8:
        if image.dtype == np.uint16:
            image = (image // 257).astype(np.uint8)
        else:
            raise ImageError(f"{path}: unsupported pixel type {image.dtype} (8-bit or 16-bit images only)")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        raise ImageError(f"{path}: grey image ({image.shape[1]}x{image.shape[0]}); linewatch needs colour (RGB) images")
    if image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    else:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(image)


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
