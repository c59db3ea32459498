"""The good images a template bank is built from, read and checked before any model starts.

`read_good_images` is the first step of `linewatch.bank_builder.build_bank`: the good folder
and the validation folder read (one size, all grey or all colour), and enough images for the
detector and calibration settings. It needs neither torch nor the models, so `linewatch bank
build` answers a folder without images, or with too few, in a fraction of a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from linewatch.config import Config
from linewatch.images import DEFAULT_SAMPLE_WINDOW, ImageError, is_grey, list_images, read_image


class BankBuildError(Exception):
    """The bank cannot be built from what was given; the message says why."""


@dataclass(frozen=True)
class GoodImages:
    """What a bank is built from. good_dir / good_paths / good: the good images (RGB uint8, or
    grey). validation_dir / validation: the held-out good images for calibration, None when
    calibration is leave-one-out alone."""

    good_dir: str | Path  # as given: messages name it so
    good_paths: list[Path]
    good: list[np.ndarray]
    validation_dir: str | Path | None
    validation: list[np.ndarray] | None


def read_folder(folder: str | Path, window: tuple[int, int] = DEFAULT_SAMPLE_WINDOW
                ) -> tuple[list[Path], list[np.ndarray]]:
    """All images of a folder, all of one size and all grey or all colour; 16-bit ones scaled
    through `window`; errors name the file."""
    paths = list_images(folder)
    images = [read_image(p, window) for p in paths]
    first = images[0].shape
    for path, image in zip(paths, images):
        if is_grey(image) != is_grey(images[0]):
            kinds = ("grey", "colour") if is_grey(image) else ("colour", "grey")
            raise ImageError(f"{path}: is {kinds[0]} but {paths[0].name} is {kinds[1]}; the good images of one bank "
                             "are all grey (a mono bank) or all colour")
        if image.shape != first:
            raise ImageError(
                f"{path}: is {image.shape[1]}x{image.shape[0]} but {paths[0].name} is {first[1]}x{first[0]}; "
                "all good images of one bank must come from the same camera setup"
            )
    return paths, images


def read_good_images(config: Config, good_dir: str | Path, validation_dir: str | Path | None = None) -> GoodImages:
    """Read both folders and check that a bank can be built from them under `config`:
    ImageError (a folder without images, an unreadable or odd one) or BankBuildError (too few
    images for detector.k_references or calibration.min_validation_images), naming the folder."""
    det = config.detector
    good_paths, good = read_folder(good_dir, det.sample_window)
    validation = read_folder(validation_dir, det.sample_window)[1] if validation_dir is not None else None
    k = det.k_references
    if validation is None and len(good) < k + 2:
        raise BankBuildError(
            f"{good_dir}: {len(good)} good images; leave-one-out calibration needs at least k_references + 2 = {k + 2}"
        )
    # measuring each part's normal variation (normalize_objects) judges every good image against
    # k others (leave-one-out), so that needs one image more than k
    need = k + 1 if det.measure.normalize_objects else k
    if validation is not None and len(good) < need:
        raise BankBuildError(
            f"{good_dir}: {len(good)} good images; the bank needs at least "
            + (f"k_references + 1 = {need} (measure.normalize_objects compares each good image with k others)"
               if det.measure.normalize_objects else f"k_references = {need}")
        )
    if validation is not None and len(validation) < config.calibration.min_validation_images:
        raise BankBuildError(
            f"{validation_dir}: {len(validation)} validation images; calibration needs at least "
            f"{config.calibration.min_validation_images} (calibration.min_validation_images)"
        )
    if validation is not None and validation[0].shape != good[0].shape:
        def kind(image: np.ndarray) -> str:
            return f"{image.shape[1]}x{image.shape[0]} {'grey' if is_grey(image) else 'colour'}"
        raise ImageError(f"{validation_dir}: validation images are {kind(validation[0])}, "
                         f"good images are {kind(good[0])}")
    return GoodImages(good_dir, good_paths, good, validation_dir, validation)
