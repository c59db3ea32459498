"""A verdict's picture files as bytes (frame, heatmap, overlay), encoded in a child process.

encode_pictures() is the encoding itself; PictureEncoder runs it in a process of its own at the
lowest CPU priority (why: see PictureEncoder). What becomes of the bytes is pictures.py's.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import multiprocessing
import os
import signal
import threading
import time
import zipfile

import cv2
import numpy as np

from linewatch.images import to_bgr
from linewatch.overlay import overlay_jpeg
from linewatch.wire import Verdict

FRAME_SUFFIXES = {"png": ".png", "bmp": ".bmp"}  # by ArchiveConfig.frame_format
# the frame's PNG: deflate level 1 with run-length matching only (lossless like any PNG; on
# camera-like frames faster and no larger than level 1's default strategy: archive_bench.py --only encode)
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
PARENT_CHECK_S = 1.0  # how often the picture encoder process looks whether the daemon is still there


def encode_pictures(image: np.ndarray, verdict: Verdict, frame_format: str = "png",
                    overlay: bool = True) -> tuple[bytes, bytes | None, bytes | None]:
    """A verdict's picture files: the frame as PNG or BMP (`frame_format`; lossless, BGR as
    files are), the heatmap as float16 .npz (None without one) and the overlay as JPEG (None
    unless `overlay`: another sink rendered it already). Runs in the picture encoder process
    (see PictureEncoder)."""
    suffix = FRAME_SUFFIXES[frame_format]
    ok, frame = cv2.imencode(suffix, to_bgr(image), PNG_PARAMS if suffix == ".png" else [])
    if not ok:
        raise ValueError(f"could not encode the frame as {frame_format.upper()}")
    npz = None
    if verdict.heatmap is not None:
        heat = np.nan_to_num(np.asarray(verdict.heatmap, np.float32), posinf=65504, neginf=-65504)
        npz = _npz_bytes(np.clip(heat, -65504, 65504).astype(np.float16))
    return frame.tobytes(), npz, overlay_jpeg(image, verdict) if overlay else None


def _npz_bytes(heat: np.ndarray) -> bytes:
    """An .npz (np.load reads it) holding `heatmap`, deflated at level 1 (np.savez_compressed's
    level 6 took several times longer for little smaller files)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z, z.open("heatmap.npy", "w") as f:
        np.lib.format.write_array(f, heat)
    return buf.getvalue()


def _picture_process_init(daemon_pid: int, idle: bool) -> None:
    """The encoder process: deaf to Ctrl-C (the daemon stops it), gone with the daemon, and at
    the lowest CPU priority when `idle`: SCHED_IDLE on Linux (it runs only when no other thread
    wants the CPU, and gives way at once when one wakes up), else nice 19."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(daemon_pid,), name="exit-with-daemon", daemon=True).start()
    if not idle:
        return
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 19)
        except (AttributeError, OSError):
            pass


def _exit_with(daemon_pid: int) -> None:
    """(A thread of the encoder process.) Exit once the daemon is gone. Its task queue's pipe
    is open at both ends in this process too, so a daemon killed with kill -9 (or crashed)
    never closes it: without this the process would wait for tasks for ever, and with it
    multiprocessing's resource tracker, each crash of a daemon run outside systemd leaving
    two processes behind."""
    while os.getppid() == daemon_pid:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


class PictureEncoder:
    """Encodes pictures in a child process, started at the first picture.

    Encoding a picture is milliseconds of CPU, much of it holding the GIL (PNG and JPEG
    encoding, the overlay's array work), and on the picture thread it delayed the verdict
    path's threads. In a process of its own it takes no GIL of the daemon's, and at SCHED_IDLE
    it gives way to them for the CPU. `python benchmarks/runtime_bench.py --only sinks
    --verdicts 600`, case (c') archive (loopback, 200 frames/s, 30 % fails, random-noise
    224x224 frames: the worst case for PNG), added capture->verdict p99 over all sinks off,
    median of 3 rounds, one run each on a shared 2-core VM: encoding on the picture thread
    6.2 ms, in this process at SCHED_IDLE 2.6 ms. A process that dies is replaced at the next
    picture (that picture is lost, counted as `write_failed`).

    `idle=False` keeps the process at the daemon's priority: for tests of what the pictures
    hold, which would otherwise wait for a core no other test process wants."""

    def __init__(self, idle: bool = True) -> None:
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._idle = idle

    def encode(self, image: np.ndarray, verdict: Verdict, frame_format: str,
               timeout_s: float, overlay: bool = True) -> tuple[bytes, bytes | None, bytes | None]:
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_picture_process_init,
                initargs=(os.getpid(), self._idle))
        try:
            # the verdict without its image (sent once, as `image`)
            return self._pool.submit(encode_pictures, image, dataclasses.replace(verdict, image=None),
                                     frame_format, overlay).result(timeout_s)
        except concurrent.futures.process.BrokenProcessPool:
            self.close()
            raise

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
