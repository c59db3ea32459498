"""Aravis's fake GigE Vision camera on loopback, for the tests and benchmarks/camera_overhead.py.

Two fakes, both Aravis's own GigE Vision device code (the GVCP control and GVSP stream a real
camera speaks), answering as `Aravis-Fake-GV01` on 127.0.0.1:

- `FakeGigECamera()`: Debian's `arv-fake-gv-camera-0.8` (aravis-tools), showing its own moving
  grey test pattern;
- `FakeGigECamera(images=FOLDER)`: this module run as a program (`python -m tests.gige FOLDER`):
  Aravis's `GvFakeCamera` in a process of its own, showing the folder's grey PNG files one per
  frame, in name order, round and round. Real parts in front of the camera: a test can build a
  bank from such images and expect verdicts that mean something.

The fill hook is set through ctypes on libaravis: through the GObject binding of
`arv_fake_camera_set_fill_pattern` the Python callback was never called (Aravis 0.8.26), and the
camera sent no frame at all.

Every fake answers on GigE Vision's fixed control port, 3956, so only one may run on the machine
at a time: a `FakeGigECamera` holds a file lock in the system's temporary folder from `start()`
to `close()` (across its kill and restart), which serialises the tests that use one -- in any
pytest-xdist worker, and in any checkout on this machine.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.waiting import wait_until

FAKE = shutil.which("arv-fake-gv-camera-0.8")
FAKE_ID = "Aravis-Fake-GV01"
LOCK = Path(tempfile.gettempdir()) / "linewatch-fake-gige-3956.lock"
LOCK_WAIT_S = 900.0  # another test (or checkout) may hold the camera port this long
READY_S = 60.0
REPO = Path(__file__).resolve().parents[1]


class FakeGigECamera:
    """A fake camera process that can be killed (SIGKILL: pulled out, no goodbye) and started again.
    Use it as a context manager, or call close() (kill and release the port lock) when done."""

    def __init__(self, images: Path | None = None, log: Path | None = None) -> None:
        from filelock import FileLock

        self.images = images
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self._lock = FileLock(str(LOCK))

    def start(self) -> None:
        if not self._lock.is_locked:
            self._lock.acquire(timeout=LOCK_WAIT_S)
        if self.images is None:
            command = [FAKE, "-i", "127.0.0.1"]
        else:
            command = [sys.executable, "-m", "tests.gige", str(self.images)]
        out = subprocess.DEVNULL if self.log is None else self.log.open("ab")
        self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        if out is not subprocess.DEVNULL:
            out.close()
        self.starts += 1
        if self.images is not None and self.log is not None:  # the program says when it serves
            assert wait_until(lambda: self.log.read_text().count("fake_gige_ready") >= self.starts
                              or self.proc.poll() is not None, READY_S), self.log.read_text()[-2000:]
            assert self.proc.poll() is None, self.log.read_text()[-2000:]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        if self._lock.is_locked:
            self._lock.release()

    def __enter__(self) -> "FakeGigECamera":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(folder: Path) -> None:
    """Run Aravis's GvFakeCamera on 127.0.0.1 showing `folder`'s PNGs (grey, 8 bit) in turn, each
    placed at the top left of the camera's region (the rest black); until SIGTERM or SIGINT."""
    import ctypes

    import cv2
    import gi
    import numpy as np

    gi.require_version("Aravis", "0.8")
    from gi.repository import Aravis

    images = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted(folder.glob("*.png"))]
    if not images or any(i is None for i in images):
        raise SystemExit(f"{folder}: no readable PNG files")
    lib = ctypes.CDLL("libaravis-0.8.so.0")
    lib.arv_buffer_get_image_data.restype = ctypes.c_void_p
    lib.arv_buffer_get_image_data.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
    lib.arv_buffer_get_image_width.argtypes = [ctypes.c_void_p]
    lib.arv_buffer_get_image_height.argtypes = [ctypes.c_void_p]
    # void (*ArvFakeCameraFillPattern) (ArvBuffer *, void *data, guint32 exposure_us, guint32 gain, ArvPixelFormat)
    fill_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32,
                                 ctypes.c_uint32)
    lib.arv_fake_camera_set_fill_pattern.argtypes = [ctypes.c_void_p, fill_type, ctypes.c_void_p]
    capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    capsule_pointer.restype = ctypes.c_void_p
    capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    shown = [0]

    def fill(buffer: int, data: int, exposure_us: int, gain: int, pixel_format: int) -> None:
        width, height = lib.arv_buffer_get_image_width(buffer), lib.arv_buffer_get_image_height(buffer)
        frame = np.zeros((height, width), np.uint8)
        image = images[shown[0] % len(images)]
        h, w = min(height, image.shape[0]), min(width, image.shape[1])
        frame[:h, :w] = image[:h, :w]
        size = ctypes.c_size_t()
        pixels = lib.arv_buffer_get_image_data(buffer, ctypes.byref(size))
        if pixel_format == 0x01080001:  # Mono8; any other format keeps what the buffer had
            ctypes.memmove(pixels, frame.ctypes.data, frame.nbytes)
        shown[0] += 1

    camera = Aravis.GvFakeCamera.new("127.0.0.1", "GV01")
    if not camera.is_running():
        raise SystemExit("the fake camera did not start (is port 3956 on 127.0.0.1 taken?)")
    hook = fill_type(fill)  # kept alive while the camera runs
    lib.arv_fake_camera_set_fill_pattern(capsule_pointer(camera.get_fake_camera().__gpointer__, None), hook, None)
    print(f"fake_gige_ready {FAKE_ID} images={len(images)}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
