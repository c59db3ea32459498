"""GenICam cameras (GigE Vision, USB3 Vision) through Aravis 0.8: `aravis:[DEVICE-ID]`.

Aravis's Python bindings come through GObject introspection: the system's typelib (Debian/Ubuntu
`gir1.2-aravis-0.8`) and PyGObject in linewatch's venv (`pip install -e '.[genicam]'`; pip builds
it against `libgirepository1.0-dev` and `libcairo2-dev`), or a venv made with
`--system-site-packages` beside `python3-gi`. `aravis-tools` has `arv-tool-0.8` (list cameras,
read features) and the fake GigE Vision camera `arv-fake-gv-camera-0.8` the tests run.

`aravis:` opens the first camera Aravis finds, `aravis:DEVICE-ID` (as `arv-tool-0.8` lists it,
e.g. `aravis:Basler-21234567`) that one. What the source does with each buffer:

- **frame id**: the camera's own block id. A gap in it is frames the camera sent and the host
  never got (`lost_frames`, the bridge's `dropped{reason=read_failed}`), and the id sent on the
  wire moves on by the gap too, so that the daemon and `linewatch actuate` see the missing parts.
  GigE Vision 1.x ids are 16 bits and skip 0 when they wrap (65535 -> 1): `next_frame_id`.
  A camera that restarts starts its ids again; the wire id then just moves on by one.
- **capture_ts**: the camera's timestamp (its own clock, ns) mapped onto the host's: the offset
  host - camera is the smallest `system_timestamp - timestamp` seen since the source opened (the
  frame that reached the host fastest), so a late buffer does not move it. `clock_offset_s` says
  what it is; a camera without timestamps (0) gets the host's receive time.
- **pixels**: Mono8 and Mono10/12/16 (unpacked, little endian: 16-bit samples, sent as they are
  for the daemon's sample window) go grey, RGB8/BGR8 as they are, Bayer RG/GB/GR/BG 8 bit
  demosaiced by OpenCV (`to_image`); anything else is a SourceError naming the format.
- **settings** (`aravis:` section of the camera config): region size (width, height), the GigE
  Vision packet size, exposure (µs), gain (dB), frame rate, and the trigger: `free_run`, `line`
  (hardware trigger on `trigger_line`, rising edge), or `software`: `read` sends GenICam's
  TriggerSoftware command `frame_rate` times a second, on a schedule of its own (a trigger
  missed while the host was busy is not made up in a burst). A free-running or software-triggered
  camera that sends nothing for `lost_after_s` is lost (SourceLost): closed and opened again by
  the bridge.
- **a lost camera** is not told to stop (the commands would wait out GigE Vision's control
  timeouts and retries against a camera that is gone) and is released on a thread of its own:
  Aravis's release of a vanished GigE device takes about 7.5 s of control timeouts (measured on the
  fake camera), which the bridge need not wait for before it looks for the camera again.
- **part id** (`part_id: frame_counter`): the camera's own frame counter (the block id, as text),
  so that the PLC's part tracking can match it; with a hardware trigger, one count per trigger.
"""

from __future__ import annotations

import threading
import time
from typing import Any
from urllib.parse import unquote

import cv2
import numpy as np

from linewatch.runtime.transport.camera.base import Captured, Source, SourceError, SourceLost

INSTALL = ("Debian/Ubuntu: apt-get install gir1.2-aravis-0.8 libgirepository1.0-dev libcairo2-dev, then "
           "pip install -e '.[genicam]' (PyGObject) in linewatch's venv")
BUFFERS = 8  # buffers queued in the stream
POP_TIMEOUT_US = 100_000  # read() looks for a frame this long, then lets the bridge check its stop flag
GEV_ID_WRAP = 1 << 16  # GigE Vision 1.x block ids: 1..65535
WRAP_SLACK = 4096  # ids lost around a wrap that still count as a wrap, not a restart

# PFNC pixel format codes (GenICam Pixel Format Naming Convention) -> (numpy dtype, how to convert)
PIXEL_FORMATS: dict[int, tuple[str, np.dtype, int | None]] = {
    0x01080001: ("Mono8", np.dtype(np.uint8), None),
    0x01100003: ("Mono10", np.dtype("<u2"), None),
    0x01100005: ("Mono12", np.dtype("<u2"), None),
    0x01100007: ("Mono16", np.dtype("<u2"), None),
    0x02180014: ("RGB8", np.dtype(np.uint8), None),
    0x02180015: ("BGR8", np.dtype(np.uint8), None),
    # OpenCV names Bayer patterns by the second row's first two pixels: PFNC BayerRG = OpenCV BayerBG
    0x01080009: ("BayerRG8", np.dtype(np.uint8), cv2.COLOR_BayerBG2BGR),
    0x0108000A: ("BayerGB8", np.dtype(np.uint8), cv2.COLOR_BayerGR2BGR),
    0x01080008: ("BayerGR8", np.dtype(np.uint8), cv2.COLOR_BayerGB2BGR),
    0x0108000B: ("BayerBG8", np.dtype(np.uint8), cv2.COLOR_BayerRG2BGR),
}


def aravis_bindings_problem() -> str | None:
    """Why Aravis 0.8's Python bindings cannot be imported here, or None when they can."""
    try:
        import gi

        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis  # noqa: F401
    except (ImportError, ValueError, AttributeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def next_frame_id(previous: int, current: int) -> int:
    """How many ids `current` is past `previous` (1: the next frame, 3: two lost), GigE Vision's
    16-bit ids wrapping from 65535 to 1 (a `previous` within WRAP_SLACK of the top); 1 for any
    other id that went back (the camera restarted and counts from 1 again)."""
    if current > previous:
        return current - previous
    if GEV_ID_WRAP - WRAP_SLACK <= previous < GEV_ID_WRAP and 1 <= current < WRAP_SLACK:  # ..., 65535, 1, ...
        return (GEV_ID_WRAP - 1 - previous) + current
    return 1


def to_image(data: bytes, width: int, height: int, pixel_format: int) -> tuple[np.ndarray, str]:
    """A buffer's pixels as (image, "gray" | "rgb" | "bgr"): uint8 or uint16 grey, uint8 colour."""
    known = PIXEL_FORMATS.get(pixel_format)
    if known is None:
        raise SourceError(f"pixel format 0x{pixel_format:08x} is not one linewatch converts; set the camera's "
                          f"PixelFormat to one of {', '.join(name for name, _, _ in PIXEL_FORMATS.values())}")
    name, dtype, bayer = known
    channels = 3 if name in ("RGB8", "BGR8") else 1
    expected = width * height * channels * dtype.itemsize
    if len(data) < expected:
        raise SourceLost(f"a {name} buffer of {len(data)} bytes for {width}x{height} (needs {expected})")
    pixels = np.frombuffer(data, dtype=dtype, count=width * height * channels)
    if channels == 3:
        return pixels.reshape(height, width, 3).copy(), "rgb" if name == "RGB8" else "bgr"
    image = pixels.reshape(height, width)
    if bayer is not None:
        return cv2.cvtColor(image, bayer), "bgr"
    return image.astype(np.uint16) if dtype.itemsize == 2 else image.copy(), "gray"


class AravisSource(Source):
    """One GenICam camera through Aravis (see the module docstring)."""

    def __init__(self, uri: str, device_id: str | None, settings: Any, log: Any = None) -> None:
        super().__init__()
        problem = aravis_bindings_problem()
        if problem is not None:
            raise SourceError(f"{uri}: this Python cannot import Aravis 0.8's GObject bindings ({problem}); {INSTALL}")
        import gi

        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis

        self._aravis = Aravis
        self.uri = uri
        self.device_id = device_id
        self._settings = settings
        self._log = log
        self._camera: Any = None
        self._stream: Any = None
        self._last_camera_id: int | None = None
        self._next_id = 0  # the id the next frame is sent with (wire frame ids grow across reopens)
        self._offset_ns: int | None = None
        self._last_frame_mono = 0.0
        self._gone = False  # the open camera stopped sending (read raised SourceLost)
        self._next_trigger = 0.0  # trigger: software, when the next trigger is due (monotonic)
        self.triggers = 0  # software triggers sent
        self.clock_offset_s: float | None = None

    def open(self) -> None:
        aravis = self._aravis
        aravis.update_device_list()
        seen = [aravis.get_device_id(i) for i in range(aravis.get_n_devices())]
        if self.device_id is not None and self.device_id not in seen:
            raise SourceLost(f"no GenICam camera {self.device_id!r} found; cameras seen: {seen or 'none'}")
        if not seen:
            raise SourceLost("no GenICam camera found (arv-tool-0.8 lists what Aravis sees)")
        try:
            camera = aravis.Camera.new(self.device_id)
            self._apply(camera)
            stream = camera.create_stream(None, None)
            payload = camera.get_payload()
            for _ in range(BUFFERS):
                stream.push_buffer(aravis.Buffer.new_allocate(payload))
            camera.set_acquisition_mode(aravis.AcquisitionMode.CONTINUOUS)
            camera.start_acquisition()
        except Exception as e:  # GLib.Error: the camera went away or refused a setting
            raise SourceLost(f"cannot start the camera: {e}") from None
        self._camera, self._stream, self._gone = camera, stream, False
        self._last_camera_id, self._offset_ns = None, None
        self._last_frame_mono = self._next_trigger = time.monotonic()
        if self._log is not None:
            self._log.info("camera_genicam_opened", source=self.uri, model=camera.get_model_name(),
                           vendor=camera.get_vendor_name(), pixel_format=camera.get_pixel_format_as_string(),
                           region=list(camera.get_region()),
                           trigger_source=None if self._settings.trigger == "free_run" else camera.get_trigger_source(),
                           packet_size=camera.gv_get_packet_size() if camera.is_gv_device() else None)

    def _apply(self, camera: Any) -> None:
        s = self._settings
        if s.width is not None or s.height is not None:  # Aravis leaves a side given as 0 as it is
            camera.set_region(-1, -1, s.width or 0, s.height or 0)
        if s.pixel_format is not None:
            camera.set_pixel_format_from_string(s.pixel_format)
        if s.packet_size is not None and camera.is_gv_device():
            camera.gv_set_packet_size(s.packet_size)
        if s.exposure_us is not None:
            camera.set_exposure_time(s.exposure_us)
        if s.gain_db is not None:
            camera.set_gain(s.gain_db)
        if s.frame_rate is not None and s.trigger != "software":  # software: the rate of our triggers
            camera.set_frame_rate(s.frame_rate)
        if s.trigger == "line":
            camera.set_trigger(s.trigger_line)
        elif s.trigger == "software":
            camera.set_trigger("Software")
        else:
            camera.clear_triggers()

    def read(self, stop: threading.Event) -> Captured | None:
        if self._stream is None:
            raise SourceLost("not open")
        self.polls += 1
        wait_us = POP_TIMEOUT_US
        if self._settings.trigger == "software":
            wait_us = self._trigger_when_due()
        buffer = self._stream.timeout_pop_buffer(wait_us)
        if buffer is None:
            lost_after_s = self._settings.lost_after_s
            if self._settings.trigger != "line" and time.monotonic() - self._last_frame_mono > lost_after_s:
                self._gone = True
                raise SourceLost(f"no frame for {lost_after_s:g} s")
            return None
        try:
            if buffer.get_status() != self._aravis.BufferStatus.SUCCESS:
                self.lost_frames += 1  # a frame that came incomplete: the camera sent it, the host lost it
                return None
            self._last_frame_mono = time.monotonic()
            camera_id = int(buffer.get_frame_id())
            step = 1 if self._last_camera_id is None else next_frame_id(self._last_camera_id, camera_id)
            self._last_camera_id = camera_id
            self.lost_frames += step - 1
            self._next_id += step
            image, pixel_format = to_image(buffer.get_data(), buffer.get_image_width(), buffer.get_image_height(),
                                           buffer.get_image_pixel_format())
            part_id = str(camera_id) if self._settings.part_id == "frame_counter" else None
            return Captured(image, pixel_format, self._next_id - 1, self._capture_ts(buffer), part_id)
        finally:
            self._stream.push_buffer(buffer)

    def _trigger_when_due(self) -> int:
        """Send the software trigger when it is due; returns how long (µs) to wait for a frame
        before the next one is due (at most POP_TIMEOUT_US)."""
        now = time.monotonic()
        period = 1.0 / self._settings.frame_rate
        if now >= self._next_trigger:
            try:
                self._camera.software_trigger()
            except Exception as e:  # GLib.Error: the camera went away
                self._gone = True
                raise SourceLost(f"cannot send the software trigger: {e}") from None
            self.triggers += 1
            self._next_trigger = max(self._next_trigger + period, now)  # late: from now, no burst
        return max(1, min(POP_TIMEOUT_US, int((self._next_trigger - now) * 1e6)))

    def _capture_ts(self, buffer: Any) -> float:
        camera_ns, host_ns = int(buffer.get_timestamp()), int(buffer.get_system_timestamp())
        if camera_ns <= 0:
            return host_ns / 1e9 if host_ns > 0 else time.time()
        offset = host_ns - camera_ns
        if self._offset_ns is None or offset < self._offset_ns:
            self._offset_ns = offset
            self.clock_offset_s = offset / 1e9
        return (camera_ns + self._offset_ns) / 1e9

    def close(self) -> None:
        if self._camera is None:
            return
        if self._gone:  # see the module docstring: not stopped, released on a thread of its own
            held = [self._camera, self._stream]  # this thread keeps no other reference to them
            self._camera, self._stream = None, None
            threading.Thread(target=held.clear, name="aravis-release", daemon=True).start()
            return
        try:
            self._camera.stop_acquisition()
        except Exception:  # noqa: BLE001 - a camera that is gone cannot be stopped
            pass
        self._camera, self._stream = None, None


def aravis_source(uri: str, settings: Any, log: Any = None) -> AravisSource:
    """The source `aravis:` or `aravis:DEVICE-ID` names (not opened yet)."""
    rest = unquote(uri[len("aravis:"):]).strip()
    if rest.startswith("//"):
        raise SourceError(f"{uri}: write aravis:DEVICE-ID (as arv-tool-0.8 lists it) or aravis: for the first camera")
    return AravisSource(uri, rest or None, settings, log)
