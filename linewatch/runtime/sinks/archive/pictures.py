"""The pictures under images/: which verdicts keep theirs, where they go, writing them whole,
removing them, and the bytes they take.

A verdict's pictures are "images/<UTC day>/<verdict id>" (its `stem`, its row's `pictures`
column) + a suffix: the frame (FRAME_SUFFIXES), HEATMAP_SUFFIX, OVERLAY_SUFFIX (the layout: the
package's docstring). The bytes come from the encoder process (encoder.py), except an overlay
that another sink rendered first (the verdict's `Outcome` shares it: rendered once). PictureFiles
is used by one thread at a time, except wanted() and stem(), which the output thread calls (they
touch nothing the others do).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from linewatch.runtime.sinks.archive.encoder import FRAME_SUFFIXES, PictureEncoder
from linewatch.wire import Verdict

if TYPE_CHECKING:
    from linewatch.runtime.sinks.outcome import Outcome

IMAGES = "images"
# the files of one verdict's pictures: the `pictures` stem + these (the frame's: FRAME_SUFFIXES)
HEATMAP_SUFFIX, OVERLAY_SUFFIX = ".heatmap.npz", ".overlay.jpg"
# every file a verdict's pictures may have (a folder can hold both frame formats after a change)
PICTURE_SUFFIXES = (*FRAME_SUFFIXES.values(), HEATMAP_SUFFIX, OVERLAY_SUFFIX)
PICTURE_TIMEOUT_S = 30.0  # one verdict's pictures in the encoder process (a 5 MP frame: well under a second)


def picture_sampled(verdict_id: str, fraction: float) -> bool:
    """Whether a pass verdict's pictures are kept: deterministic per verdict id (a hash of it
    below `fraction`), so the same verdict is always in or out whoever asks."""
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    h = int.from_bytes(hashlib.blake2b(verdict_id.encode(), digest_size=8).digest(), "big")
    return h / 2.0**64 < fraction


def tree_bytes(folder: Path) -> int:
    """The bytes of the files under `folder` (0 when there is none)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except FileNotFoundError:
                pass
    return total


class PictureFiles:
    """The pictures of the archive in `folder`, and `bytes`, what they take on disk (scan() at
    start, then kept up to date by write() and the removals); `written`: write()s that succeeded."""

    def __init__(self, folder: Path, frame_format: str = "png", pass_image_sample: float = 0.0,
                 encoder: PictureEncoder | None = None) -> None:
        self.folder = folder
        self.frame_format = frame_format
        self.pass_image_sample = pass_image_sample
        self.encoder = encoder if encoder is not None else PictureEncoder()
        self.bytes = 0
        self.written = 0  # verdicts whose pictures write() wrote
        self._day = (-1, "")  # the last UTC day a stem was made for: (days since 1970, "YYYY-MM-DD")

    def scan(self) -> None:
        self.bytes = tree_bytes(self.folder / IMAGES)

    def close(self) -> None:
        """Stop the encoder process (a later write() starts another)."""
        self.encoder.close()

    # ------------------------------------------------------------------ which, and where

    def wanted(self, verdict: Verdict) -> bool:
        """Failed parts and a sample of passes (pass_image_sample) that come with their image."""
        if verdict.image is None or verdict.id is None:
            return False
        return verdict.verdict == "fail" or (verdict.verdict == "pass"
                                             and picture_sampled(verdict.id, self.pass_image_sample))

    def stem(self, verdict_id: str, now: float) -> str:
        """"images/<UTC day of `now`>/<verdict id>"."""
        day = int(now // 86400)  # the UTC day (POSIX time has 86400 s a day)
        if day != self._day[0]:  # (formatting a date on every failed part costs more than the rest of this)
            self._day = (day, dt.datetime.fromtimestamp(day * 86400, dt.timezone.utc).date().isoformat())
        return f"{IMAGES}/{self._day[1]}/{verdict_id}"

    # ------------------------------------------------------------------ writing and removing

    def write(self, stem: str, image: np.ndarray, verdict: Verdict, outcome: Outcome | None = None) -> None:
        """The frame (frame_format), the heatmap (float16 .npz) and the overlay (JPEG), each
        written to a temporary name and renamed, so a kill leaves whole files or none. On a
        failure (raised) none of the verdict's files is left. `outcome`: the verdict's, whose
        overlay is shared (`encode`)."""
        base = self.folder / stem
        try:
            base.parent.mkdir(parents=True, exist_ok=True)
            frame, npz, jpeg = self.encode(image, verdict, outcome)
            self._write_file(base, FRAME_SUFFIXES[self.frame_format], frame)
            if npz is not None:
                self._write_file(base, HEATMAP_SUFFIX, npz)
            self._write_file(base, OVERLAY_SUFFIX, jpeg)
        except Exception:
            self.remove(stem)
            raise
        self.written += 1

    def encode(self, image: np.ndarray, verdict: Verdict, outcome: Outcome | None) -> tuple[bytes, bytes | None, bytes]:
        """The three files' bytes from the encoder process. With the verdict's `outcome`, its
        overlay is rendered once for every sink: when another sink (the verdict stream, the live
        page) rendered it already, the encoder leaves it out and the outcome's bytes are written;
        else the encoder renders it with the frame and the outcome keeps it for the others (who
        ask meanwhile wait for it)."""
        if outcome is None:
            return self.encoder.encode(image, verdict, self.frame_format, PICTURE_TIMEOUT_S)
        encoded: list = []

        def with_the_frame() -> bytes:
            encoded.extend(self.encoder.encode(image, verdict, self.frame_format, PICTURE_TIMEOUT_S))
            return encoded[2]

        jpeg = outcome.overlay_jpeg(with_the_frame)
        if encoded:
            return encoded[0], encoded[1], encoded[2]
        if jpeg is None:  # an outcome without the picture (not the archive sink's): the encoder draws it
            return self.encoder.encode(image, verdict, self.frame_format, PICTURE_TIMEOUT_S)
        frame, npz, _ = self.encoder.encode(image, verdict, self.frame_format, PICTURE_TIMEOUT_S, overlay=False)
        return frame, npz, jpeg

    def _write_file(self, base: Path, suffix: str, data: bytes) -> None:
        final = base.with_name(base.name + suffix)
        tmp = final.with_name(final.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        self.bytes += len(data)

    def remove(self, stem: str) -> int:
        """Delete one verdict's picture files (those that exist); returns the bytes freed."""
        freed = 0
        for suffix in PICTURE_SUFFIXES:
            path = self.folder / (stem + suffix)
            try:
                size = path.stat().st_size
                path.unlink()
                freed += size
            except FileNotFoundError:
                pass
        self.bytes -= freed
        return freed

    def remove_days_before(self, cutoff: float) -> int:
        """Day folders wholly older than `cutoff` (epoch seconds): pictures whose rows are gone (a
        kill between queueing and the row, a failed insert) are removed with them. Returns how many."""
        cutoff_day = dt.datetime.fromtimestamp(cutoff, dt.timezone.utc).date()
        removed = 0
        images = self.folder / IMAGES
        for folder in sorted(images.iterdir()) if images.is_dir() else ():
            try:
                day = dt.date.fromisoformat(folder.name)
            except ValueError:
                continue  # not ours
            if folder.is_dir() and day < cutoff_day:
                self.bytes -= tree_bytes(folder)
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        return removed
