"""`linewatch camera`: sources (a video file the test writes, a hot folder the test drops files
into), the bridge's reconnects and counts, the XPUB sender, grab, and bad URIs.

Frames are received by a SUB socket bound to port 0 and decoded with linewatch.wire.decode_frame.
Every wait polls a condition with a deadline; nothing here times anything.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq

from linewatch import cli, wire
from linewatch.config import CameraConfig, ConfigError, load_camera_config
from linewatch.runtime.transport.camera import (
    Backoff, CameraBridge, CameraMetrics, DaemonSink, SourceError, SourceLost, open_source)
from linewatch.runtime.transport.camera.folder import FolderSource, looks_complete
from linewatch.runtime.transport.replay import FramePublisher
from linewatch.runtime.transport.security import ClientKeys, KeyPair
from tests.logs import ListLog
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 20.0  # generous: a loaded machine is slow, never wrong


class Subscriber:
    """A SUB socket bound to a free loopback port (the daemon's side), decoding what arrives."""

    def __init__(self, curve_server: KeyPair | None = None) -> None:
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.SUB)
        if curve_server is not None:
            self.sock.curve_server = True
            self.sock.curve_publickey = curve_server.public
            self.sock.curve_secretkey = curve_server.secret
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.bind("tcp://127.0.0.1:0")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.frames: list[wire.Frame] = []
        self.errors: list[wire.WireError] = []  # refused as the daemon's ingest would (bad_header, ...)

    def receive(self, n: int, timeout_s: float = WAIT_S) -> list[wire.Frame]:
        end = time.monotonic() + timeout_s
        while len(self.frames) < n and time.monotonic() < end:
            if self.sock.poll(100):
                parts = self.sock.recv_multipart()
                try:
                    self.frames.append(wire.decode_frame(parts, 64 << 20, time.time(), time.monotonic()))
                except wire.WireError as e:
                    self.errors.append(e)
                    end = min(end, time.monotonic() + 0.5)  # a test waiting for frames sees errors soon
        return self.frames

    def pumping(self, condition):
        """`condition`, with the socket polled first: a ZeroMQ socket attaches a new peer (and
        sends it its subscription) only inside its own calls, as the daemon's ingest makes all the time."""
        def probe():
            self.receive(len(self.frames) + 1, timeout_s=0.01)
            return condition()
        return probe

    def close(self) -> None:
        self.sock.close(linger=0)
        self.context.term()


@pytest.fixture(autouse=True)
def _own_logging():
    """cli.main configures structlog for the process; put its defaults back after each test."""
    yield
    import structlog

    structlog.reset_defaults()


@pytest.fixture
def sub():
    s = Subscriber()
    yield s
    s.close()


def write_video(path: Path, n: int, size: tuple[int, int] = (64, 48), fps: float = 50.0) -> list[tuple[int, int, int]]:
    """An MJPG .avi of `n` frames, frame i a flat colour; the BGR colours."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert writer.isOpened(), "OpenCV cannot write MJPG .avi here"
    colours = [((37 * i) % 256, (90 + 50 * i) % 256, (200 - 20 * i) % 256) for i in range(n)]
    for colour in colours:
        writer.write(np.full((size[1], size[0], 3), colour, dtype=np.uint8))
    writer.release()
    return colours


def png_bytes(image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", image)
    assert ok
    return encoded.tobytes()


def config(**values) -> CameraConfig:
    values.setdefault("reconnect", {"initial_s": 0.05, "max_s": 0.2})
    values.setdefault("connect_timeout_s", WAIT_S)
    return CameraConfig.model_validate(values)


class Running:
    """A bridge running in a thread, always stopped at the end."""

    def __init__(self, cfg: CameraConfig, source=None, count: int | None = None) -> None:
        self.log = ListLog()
        self.source = source or open_source(cfg.source, cfg, self.log)
        self.metrics = CameraMetrics(cfg.camera)
        self.bridge = CameraBridge(cfg, self.source, DaemonSink(cfg, None, self.log), self.metrics, self.log)
        self.stop = threading.Event()
        self.error: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(count,), daemon=True)
        self.thread.start()

    def _run(self, count) -> None:
        try:
            self.bridge.run(self.stop, count)
        except BaseException as e:  # noqa: BLE001
            self.error.append(e)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "the bridge did not stop"
        assert not self.error, self.error

    def value(self, name: str, **labels) -> float:
        return self.metrics.registry.get_sample_value(name, {"camera": self.bridge.config.camera, **labels}) or 0.0


# ---------------------------------------------------------------- OpenCV: a video file


def test_video_file_frames_reach_the_daemon_side_in_the_wire_format(tmp_path: Path, sub: Subscriber) -> None:
    video = tmp_path / "line.avi"
    colours = write_video(video, 6)
    before = time.time()
    run = Running(config(source=f"file://{video}", endpoint=sub.endpoint, camera="cam-7"), count=6)
    try:
        frames = sub.receive(6)
        assert wait_until(lambda: not run.thread.is_alive(), WAIT_S)
    finally:
        run.close()
    assert [f.frame_id for f in frames] == list(range(6))
    assert {f.camera for f in frames} == {"cam-7"}
    for frame, (b, g, r) in zip(frames, colours):
        assert frame.image.shape == (48, 64, 3)
        mean = frame.image.reshape(-1, 3).mean(axis=0)  # RGB after decoding; MJPG is lossy
        assert np.allclose(mean, (r, g, b), atol=12), (frame.frame_id, mean, (r, g, b))
        assert before <= frame.capture_ts <= time.time()  # host clock at read time
    assert run.value("linewatch_camera_frames_captured_total") == 6
    assert run.value("linewatch_camera_frames_sent_total") == 6
    assert run.log.named("camera_source_opened")


def test_end_of_file_is_a_lost_source_reopened_with_ids_going_on(tmp_path: Path, sub: Subscriber) -> None:
    video = tmp_path / "short.avi"
    write_video(video, 3)
    run = Running(config(source=f"file://{video}", endpoint=sub.endpoint), count=8)
    try:
        frames = sub.receive(8)
        assert wait_until(lambda: not run.thread.is_alive(), WAIT_S)
    finally:
        run.close()
    assert [f.frame_id for f in frames] == list(range(8))  # the counter goes on across reopens
    assert run.value("linewatch_camera_reconnects_total") >= 2
    lost = run.log.named("camera_source_lost")
    assert lost and lost[0]["reason"] == "end of the video file" and lost[0]["retry_in_s"] > 0
    assert run.log.named("camera_source_reopened")
    assert run.value("linewatch_camera_source_up") == 0  # after the stop


def test_a_file_that_is_no_video_is_a_start_up_error(tmp_path: Path) -> None:
    bad = tmp_path / "notes.avi"
    bad.write_text("not a video")
    cfg = config(source=f"file://{bad}")
    log = ListLog()
    bridge = CameraBridge(cfg, open_source(cfg.source, cfg, log), _NullSink(), CameraMetrics("cam0"), log)
    with pytest.raises(SourceError, match="cannot open"):
        bridge.run(threading.Event())


class _NullSink:
    def start(self, stop) -> None:
        pass

    def ready(self) -> bool:
        return True

    def deliver(self, captured, image, pixel_format) -> str:
        return "sent"

    def close(self) -> None:
        pass


class _FailingSource:
    """A live source that opens, then fails every read (a device that went away)."""

    uri = "opencv:99"
    live = True
    can_wait = False

    def __init__(self) -> None:
        self.lost_frames = 0
        self.polls = 0
        self.opens = 0

    def describe(self) -> str:
        return self.uri

    def open(self) -> None:
        self.opens += 1

    def read(self, stop):
        self.polls += 1
        self.lost_frames += 1
        if self.lost_frames % 3 == 0:
            raise SourceLost("3 failed reads in a row")
        return None

    def close(self) -> None:
        pass


def test_a_failing_live_source_counts_lost_frames_and_reconnects_with_backoff() -> None:
    cfg = config(reconnect={"initial_s": 0.01, "max_s": 0.04})
    source = _FailingSource()
    log = ListLog()
    metrics = CameraMetrics("cam0")
    bridge = CameraBridge(cfg, source, _NullSink(), metrics, log)
    stop = threading.Event()
    thread = threading.Thread(target=bridge.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: source.opens >= 5, WAIT_S)
    finally:
        stop.set()
        thread.join(WAIT_S)
    assert not thread.is_alive()
    lost = metrics.registry.get_sample_value("linewatch_camera_frames_dropped_total",
                                             {"camera": "cam0", "reason": "read_failed"})
    assert lost == source.lost_frames >= 12
    waits = [e["retry_in_s"] for e in log.named("camera_source_lost")]
    assert waits[:4] == [0.01, 0.02, 0.04, 0.04]  # doubling, capped: never a busy loop
    assert metrics.registry.get_sample_value("linewatch_camera_reconnects_total", {"camera": "cam0"}) >= 4


def test_backoff_doubles_up_to_its_cap_and_resets() -> None:
    b = Backoff(0.5, 3.0)
    assert [b.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    b.reset()
    assert b.next() == 0.5


# ---------------------------------------------------------------- the hot folder


def test_looks_complete_by_format() -> None:
    image = np.zeros((8, 8, 3), np.uint8)
    png = png_bytes(image)
    jpg = cv2.imencode(".jpg", image)[1].tobytes()
    bmp = cv2.imencode(".bmp", image)[1].tobytes()
    assert looks_complete(png, ".png") and not looks_complete(png[:-5], ".png")
    assert looks_complete(jpg, ".JPG") and not looks_complete(jpg[: len(jpg) // 2], ".jpg")
    assert looks_complete(bmp, ".bmp") and not looks_complete(bmp[:-10], ".bmp")
    assert looks_complete(b"whatever", ".tif")  # no end mark: size and mtime only


def test_folder_sends_each_new_file_once_waits_for_slow_writers_and_moves_them(tmp_path: Path,
                                                                               sub: Subscriber) -> None:
    hot = tmp_path / "hot"
    hot.mkdir()
    cfg = config(source=f"folder://{hot}", endpoint=sub.endpoint, mono_to_rgb=True,
                 folder={"poll_interval_s": 0.02, "part_id_regex": r"part-(?P<part>\w+)"})
    first = np.full((20, 30, 3), (10, 20, 30), np.uint8)  # BGR
    (hot / ".part-A1.png").write_bytes(png_bytes(first))
    (hot / ".part-A1.png").rename(hot / "part-A1.png")  # the rename convention
    run = Running(cfg)
    try:
        frames = sub.receive(1)
        assert len(frames) == 1 and frames[0].part_id == "A1" and frames[0].frame_id == 0
        np.testing.assert_array_equal(frames[0].image[0, 0], (30, 20, 10))  # RGB
        assert wait_until(lambda: (hot / "done" / "part-A1.png").exists(), WAIT_S)

        # a file written in two parts, slowly: not read while its end is missing
        slow = png_bytes(np.full((16, 16, 3), 200, np.uint8))
        with open(hot / "part-B2.png", "wb") as f:
            f.write(slow[: len(slow) // 2])
        polls = run.source.polls
        assert wait_until(lambda: run.source.polls >= polls + 5, WAIT_S)  # size stable for many looks
        assert run.value("linewatch_camera_frames_captured_total") == 1
        assert (hot / "part-B2.png").exists()
        with open(hot / "part-B2.png", "ab") as f:
            f.write(slow[len(slow) // 2:])
        frames = sub.receive(2)
        assert len(frames) == 2 and frames[1].part_id == "B2" and frames[1].frame_id == 1

        # Mono8 with mono_to_rgb: three equal channels
        cv2.imwrite(str(hot / "mono.png"), np.full((12, 12), 77, np.uint8))
        frames = sub.receive(3)
        assert len(frames) == 3 and frames[2].part_id is None
        assert frames[2].image.shape == (12, 12, 3) and (frames[2].image == 77).all()
    finally:
        run.close()
    assert {p.name for p in (hot / "done").iterdir()} == {"part-A1.png", "part-B2.png", "mono.png"}


def test_folder_set_aside_unreadable_file(tmp_path: Path, sub: Subscriber) -> None:
    hot = tmp_path / "hot"
    hot.mkdir()
    cfg = config(source=f"folder://{hot}", endpoint=sub.endpoint,
                 folder={"poll_interval_s": 0.02, "unreadable_after_s": 0.1})
    (hot / "junk.jpg").write_bytes(b"\xff\xd8\xff garbage \xff\xd9")
    run = Running(cfg)
    try:
        assert wait_until(sub.pumping(lambda: (hot / "failed" / "junk.jpg").exists()), WAIT_S)
        assert wait_until(lambda: run.value("linewatch_camera_frames_dropped_total", reason="unreadable_file") == 1,
                          WAIT_S)
    finally:
        run.close()
    assert run.log.named("camera_file_unreadable")
    assert not sub.receive(1, timeout_s=0.2)


def test_folder_frame_ids_and_sent_files_survive_a_restart(tmp_path: Path, sub: Subscriber) -> None:
    hot = tmp_path / "hot"
    hot.mkdir()
    cfg = config(source=f"folder://{hot}", endpoint=sub.endpoint,
                 folder={"poll_interval_s": 0.02, "after": "leave"})
    for name in ("a.png", "b.png"):
        (hot / name).write_bytes(png_bytes(np.full((8, 8, 3), 50, np.uint8)))
    run = Running(cfg, count=2)
    try:
        assert len(sub.receive(2)) == 2
        assert wait_until(lambda: not run.thread.is_alive(), WAIT_S)
    finally:
        run.close()
    assert (hot / "a.png").exists() and (hot / "b.png").exists()  # after: leave

    (hot / "c.png").write_bytes(png_bytes(np.full((8, 8, 3), 60, np.uint8)))
    run = Running(cfg, count=1)
    try:
        frames = sub.receive(3)
        assert wait_until(lambda: not run.thread.is_alive(), WAIT_S)
    finally:
        run.close()
    assert [f.frame_id for f in frames] == [0, 1, 2]  # c.png only, numbered on from the journal
    assert sorted(f.capture_ts for f in frames) == [f.capture_ts for f in frames]


def test_folder_removed_is_a_lost_source(tmp_path: Path) -> None:
    hot = tmp_path / "hot"
    hot.mkdir()
    cfg = config(source=f"folder://{hot}", folder={"after": "leave"})
    source = open_source(cfg.source, cfg)
    assert isinstance(source, FolderSource)
    source.open()
    assert source.read(threading.Event()) is None
    (hot / ".linewatch-camera-sent").unlink()
    hot.rmdir()
    with pytest.raises(SourceLost, match="cannot list"):
        source.read(threading.Event())
    with pytest.raises(SourceLost, match="no folder"):
        source.open()


# ---------------------------------------------------------------- the sender


def test_sender_says_no_daemon_then_counts_drops_at_the_high_water_mark() -> None:
    context = zmq.Context()
    slow = context.socket(zmq.SUB)
    slow.rcvhwm = 1
    slow.setsockopt(zmq.SUBSCRIBE, b"")
    slow.bind("tcp://127.0.0.1:0")
    endpoint = slow.getsockopt_string(zmq.LAST_ENDPOINT)
    image = np.zeros((512, 512, 3), np.uint8)
    publisher = FramePublisher("tcp://127.0.0.1:1", "cam0", "raw", watch_subscribers=True)  # nobody there
    try:
        assert publisher.send(0, image) == "no_daemon"
    finally:
        publisher.close(linger_ms=0)
    publisher = FramePublisher(endpoint, "cam0", "raw", send_hwm=1, watch_subscribers=True)
    try:
        assert wait_until(lambda: slow.poll(10) is not None and publisher.subscribed, WAIT_S)  # see Subscriber.pumping
        outcomes = []
        for i in range(2000):  # the subscriber never reads: socket buffers fill, then the HWM
            outcomes.append(publisher.send(i, image))
            if outcomes[-1] == "send_hwm":
                break
        assert outcomes[-1] == "send_hwm" and outcomes[0] == "sent"
    finally:
        publisher.close(linger_ms=0)
        slow.close(linger=0)
        context.term()


def test_curve_frames_reach_a_curve_server() -> None:
    server = KeyPair(*zmq.curve_keypair())
    client = KeyPair(*zmq.curve_keypair())
    s = Subscriber(curve_server=server)
    try:
        publisher = FramePublisher(s.endpoint, "cam0", "png", curve=ClientKeys(server.public, client),
                                   watch_subscribers=True)
        try:
            assert wait_until(s.pumping(lambda: publisher.subscribed), WAIT_S)
            assert publisher.send(5, np.full((6, 6, 3), 9, np.uint8), capture_ts=123.5, part_id="p") == "sent"
            frames = s.receive(1)
        finally:
            publisher.close()
    finally:
        s.close()
    assert len(frames) == 1 and frames[0].frame_id == 5 and frames[0].capture_ts == 123.5
    assert frames[0].part_id == "p"


# ---------------------------------------------------------------- URIs, config, grab (the command)


@pytest.mark.parametrize("uri, message", [
    ("nope:1", "unknown camera source"),
    ("opencv:front", "device index"),
    ("file:///no/such/video.avi", "no such video file"),
    ("file:video.avi", "file:///absolute"),
    ("folder:///no/such/folder", "no such folder"),
    ("rtsp://", "no host"),
    ("aravis://cam-1", "aravis:DEVICE-ID"),
])
def test_bad_uris_are_source_errors(uri: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        open_source(uri, CameraConfig())


@pytest.mark.parametrize("argv", [
    ["camera", "--source", "nope:1", "--metrics-port", "0"],
    ["camera", "grab", "--source", "file:///no/such/video.avi", "--frames", "2", "--out", "OUT"],
    ["camera", "--source", "aravis://cam-1", "--metrics-port", "0"],
])
def test_bad_uri_gives_one_error_line_and_exit_2(argv: list[str], tmp_path: Path, capsys) -> None:
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("linewatch: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err


def test_camera_config_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "cam.yaml"
    path.write_text("camera: press-2\nsource: opencv:0\nfolder:\n  after: leave\n")
    cfg = load_camera_config(path, {"source": "folder:///x", "metrics.port": 0})
    assert (cfg.camera, cfg.source, cfg.folder.after, cfg.metrics.port) == ("press-2", "folder:///x", "leave", 0)
    path.write_text("camera: a\nsecurity:\n  server_key: s.key\n")
    with pytest.raises(ConfigError, match="go together"):
        load_camera_config(path)
    path.write_text("camra: a\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_camera_config(path)


def test_grab_writes_n_pngs_and_a_json_of_ids_and_times(tmp_path: Path, capsys) -> None:
    video = tmp_path / "line.avi"
    colours = write_video(video, 4, size=(32, 24))
    out = tmp_path / "grab"
    before = time.time()
    assert cli.main(["camera", "grab", "--source", f"file://{video}", "--frames", "3", "--out", str(out)]) == 0
    record = json.loads((out / "grab.json").read_text())
    assert record["source"] == f"file://{video}"
    assert [f["frame_id"] for f in record["frames"]] == [0, 1, 2]
    assert sorted(p.name for p in out.glob("*.png")) == [f["file"] for f in record["frames"]]
    for entry, (b, g, r) in zip(record["frames"], colours):
        assert before <= entry["capture_ts"] <= time.time()
        image = cv2.imread(str(out / entry["file"]))
        assert image.shape == (24, 32, 3) and (entry["width"], entry["height"]) == (32, 24)
        assert np.allclose(image.reshape(-1, 3).mean(axis=0), (b, g, r), atol=12)


def test_grab_from_a_folder_leaves_the_folder_as_it_was(tmp_path: Path, capsys) -> None:
    hot = tmp_path / "hot"
    hot.mkdir()
    for i in range(2):
        (hot / f"p{i}.png").write_bytes(png_bytes(np.full((8, 8, 3), 10 * i, np.uint8)))
    out = tmp_path / "grab"
    assert cli.main(["camera", "grab", "--source", f"folder://{hot}", "--frames", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in hot.iterdir()) == ["p0.png", "p1.png"]  # not moved, no journal written
    assert len(json.loads((out / "grab.json").read_text())["frames"]) == 2


@pytest.mark.system
def test_camera_command_serves_metrics_and_exits_cleanly_on_sigterm(tmp_path: Path, sub: Subscriber) -> None:
    video = tmp_path / "loop.avi"
    write_video(video, 5)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "linewatch.cli", "camera", "--source", f"file://{video}", "--endpoint", sub.endpoint,
         "--metrics-port", "0", "--camera", "cam-s"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        assert len(sub.receive(7)) == 7  # past the end of the file: reopened, ids going on
        assert [f.frame_id for f in sub.frames] == list(range(7))

        def started() -> list[dict]:
            return [json.loads(ln) for ln in list(lines) if '"camera_started"' in ln]

        assert wait_until(started, WAIT_S), lines
        with urllib.request.urlopen(started()[0]["metrics"], timeout=WAIT_S) as response:
            text = response.read().decode()
        captured = re.search(r'^linewatch_camera_frames_captured_total\{camera="cam-s"\} (\S+)$', text, re.M)
        assert captured and float(captured.group(1)) >= 7, text
        assert 'linewatch_camera_seconds_since_last_frame{camera="cam-s"}' in text
        assert 'linewatch_camera_reconnects_total{camera="cam-s"}' in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT_S)
    reader.join(WAIT_S)
    assert any('"camera_stopped"' in ln for ln in lines), lines
    assert not any("Traceback" in ln for ln in lines), lines


def test_into_the_daemons_own_ingest_with_curvezmq_allow_list(tmp_path: Path) -> None:
    """The real Ingest, CurveZMQ on, this camera's key allowed: grey frames replicated, the
    frames arrive with their ids; then with a key the daemon does not know: nothing gets in, the
    file waits."""
    from linewatch.config import EndpointConfig, IngestConfig, SecurityConfig
    from linewatch.runtime.transport.ingest import Ingest
    from linewatch.runtime.transport.security import generate_keys
    from tests.runtime.fakes import FrameCollector

    keys = {}
    for name in ("server", "camera-1", "stranger"):
        keys[name] = generate_keys(tmp_path / "keys" / name, name)  # (public, secret)
    allowed = tmp_path / "senders"
    allowed.mkdir()
    (allowed / "camera-1.key").write_bytes(keys["camera-1"][0].read_bytes())
    (tmp_path / "subscribers").mkdir()
    (tmp_path / "subscribers" / "camera-1.key").write_bytes(keys["camera-1"][0].read_bytes())
    security = SecurityConfig(server_secret_key=str(keys["server"][1]), frame_senders=str(allowed),
                              verdict_subscribers=str(tmp_path / "subscribers"))
    sink = FrameCollector()
    ingest = Ingest(IngestConfig(endpoints=[EndpointConfig(url="tcp://127.0.0.1:*")]), sink.on_frame, sink.on_error,
                    security=security)
    ingest.start()
    hot = tmp_path / "hot"
    hot.mkdir()
    try:
        for i in range(3):
            cv2.imwrite(str(hot / f"{i}.png"), np.full((10, 10), 40 * i, np.uint8))  # Mono8
        cfg = config(source=f"folder://{hot}", endpoint=ingest.bound_urls[0], camera="press-1", mono_to_rgb=True,
                     security={"server_key": str(keys["server"][0]), "client_key": str(keys["camera-1"][1])},
                     folder={"poll_interval_s": 0.02})
        source = open_source(cfg.source, cfg)
        log = ListLog()
        curve = ClientKeys.load(cfg.security.server_key, cfg.security.client_key)
        bridge = CameraBridge(cfg, source, DaemonSink(cfg, curve, log), CameraMetrics(cfg.camera), log)
        assert bridge.run(threading.Event(), count=3) == 3
        assert sink.wait(lambda: len(sink.frames) >= 3, WAIT_S)
        assert sorted(f.frame_id for f in sink.frames) == [0, 1, 2] and not sink.errors
        assert {f.camera for f in sink.frames} == {"press-1"}
        assert all(f.decoded().shape == (10, 10, 3) for f in sink.frames)

        (hot / "3.png").write_bytes(png_bytes(np.zeros((10, 10, 3), np.uint8)))
        stranger = ClientKeys.load(cfg.security.server_key, keys["stranger"][1])
        cfg = cfg.model_copy(update={"connect_timeout_s": 0.5})
        metrics = CameraMetrics("press-1")
        bridge = CameraBridge(cfg, open_source(cfg.source, cfg), DaemonSink(cfg, stranger, log), metrics, log)
        stop = threading.Event()
        thread = threading.Thread(target=bridge.run, args=(stop,), daemon=True)
        thread.start()
        try:  # the daemon refuses the handshake: it never subscribes, the file waits in the folder
            assert wait_until(lambda: log.named("camera_waiting_for_daemon"), WAIT_S)
        finally:
            stop.set()
            thread.join(WAIT_S)
        assert log.named("camera_no_daemon") and (hot / "3.png").exists()
    finally:
        ingest.stop()
    assert len(sink.frames) == 3


def test_a_daemon_restart_is_counted_no_daemon_and_the_frames_resume(tmp_path: Path) -> None:
    video = tmp_path / "loop.avi"
    write_video(video, 4, fps=100.0)
    first = Subscriber()
    endpoint = first.endpoint
    run = Running(config(source=f"file://{video}", endpoint=endpoint))
    try:
        assert len(first.receive(3)) == 3
        first.close()  # the daemon goes away
        assert wait_until(lambda: run.value("linewatch_camera_frames_dropped_total", reason="no_daemon") >= 2, WAIT_S)
        again = Subscriber.__new__(Subscriber)
        again.context = zmq.Context()
        again.sock = again.context.socket(zmq.SUB)
        again.sock.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            again.sock.bind(endpoint)  # the daemon back on its port
        except zmq.ZMQError as e:
            again.close()
            pytest.skip(f"the port was taken meanwhile: {e}")
        again.endpoint, again.frames = endpoint, []
        try:
            frames = again.receive(3)
            assert len(frames) == 3
            dropped = run.value("linewatch_camera_frames_dropped_total", reason="no_daemon")
            assert frames[0].frame_id >= 3 + dropped - 1  # no stale frames queued for the absent daemon
            assert run.value("linewatch_camera_frames_dropped_total", reason="send_hwm") == 0
        finally:
            again.close()
    finally:
        run.close()


def test_grey_frames_are_sent_grey_unless_mono_to_rgb(tmp_path: Path, sub: Subscriber) -> None:
    hot = tmp_path / "hot"
    hot.mkdir()
    cv2.imwrite(str(hot / "a-grey.png"), np.full((6, 6), 90, np.uint8))
    cfg = config(source=f"folder://{hot}", endpoint=sub.endpoint, folder={"poll_interval_s": 0.02})
    run = Running(cfg, count=1)
    try:
        grey = sub.receive(1)
    finally:
        run.close()
    # sent grey, one channel: a mono bank judges it, a colour bank answers it `error` (grey_image)
    assert len(grey) == 1 and grey[0].image.shape == (6, 6) and (grey[0].image == 90).all() and not sub.errors
    assert run.value("linewatch_camera_grey_frames_total") == 1
    assert len(run.log.named("camera_grey_frames")) == 1

    cv2.imwrite(str(hot / "b-grey.png"), np.full((6, 6), 90, np.uint8))
    run = Running(cfg.model_copy(update={"mono_to_rgb": True}), count=1)
    try:
        frames = sub.receive(2)
    finally:
        run.close()
    assert frames[1].image.shape == (6, 6, 3) and (frames[1].image == 90).all()
    assert run.value("linewatch_camera_grey_frames_total") == 0


@pytest.mark.parametrize("encoding", ["raw", "png", "jpeg"])
def test_16_bit_samples_reach_the_daemon_whole_except_in_jpeg(tmp_path: Path, sub: Subscriber, encoding: str) -> None:
    """Mono12-like samples 1000..1245, 7 apart: raw and PNG frames carry each one, so the daemon's
    sample_window [1000, 1255] spreads them over 0..245 (v - 1000); the old `v // 257` in the
    bridge made them all 3 or 4 first. JPEG holds 8 bits: reduced through the full 16-bit range
    (4 or 5), with one warning."""
    hot = tmp_path / "hot"
    hot.mkdir()
    deep = (np.arange(36, dtype=np.uint16).reshape(6, 6) * 7 + 1000)
    cv2.imwrite(str(hot / "a-mono12.png"), deep)
    cv2.imwrite(str(hot / "b-colour16.png"), np.dstack([deep, deep + 1, deep + 2]))  # B, G, R
    cfg = config(source=f"folder://{hot}", endpoint=sub.endpoint, encoding=encoding, folder={"poll_interval_s": 0.02})
    run = Running(cfg, count=2)
    frames, end = [], time.monotonic() + WAIT_S
    try:
        while len(frames) < 2 and time.monotonic() < end:
            if sub.sock.poll(100):
                frames.append(wire.read_frame(sub.sock.recv_multipart(), wire.ImageLimits(), time.time(),
                                              time.monotonic(), frozenset()))
    finally:
        run.close()
    assert [f.frame_id for f in frames] == [0, 1]
    grey, colour = (f.decoded(window=(1000, 1255)) for f in frames)
    warned = run.log.named("camera_16bit_to_8bit")
    if encoding == "jpeg":
        assert np.abs(grey.astype(int) - 4.5).max() <= 1.5, grey
        assert len(warned) == 1  # once, not per frame
    else:
        assert np.array_equal(grey, deep - 1000)
        assert np.array_equal(colour, np.dstack([deep + 2, deep + 1, deep]) - 1000)  # decoded as RGB
        assert not warned


def test_max_fps_sends_at_most_that_rate_and_counts_the_rest_skipped(tmp_path: Path, sub: Subscriber) -> None:
    video = tmp_path / "v.avi"
    write_video(video, 5, fps=200.0)
    run = Running(config(source=f"file://{video}", endpoint=sub.endpoint, max_fps=0.001))  # one per 1000 s
    try:
        assert wait_until(sub.pumping(lambda: run.value("linewatch_camera_frames_captured_total") >= 5), WAIT_S)
    finally:
        run.close()
    captured = run.value("linewatch_camera_frames_captured_total")
    assert run.value("linewatch_camera_frames_sent_total") == 1
    assert run.value("linewatch_camera_frames_skipped_total") == captured - 1


def test_a_folder_holds_its_files_while_no_daemon_is_there(tmp_path: Path, sub: Subscriber) -> None:
    hot = tmp_path / "hot"
    hot.mkdir()
    (hot / "p.png").write_bytes(png_bytes(np.full((8, 8, 3), 5, np.uint8)))
    # the daemon's socket is not pumped yet, so it has not subscribed: "no daemon"
    run = Running(config(source=f"folder://{hot}", endpoint=sub.endpoint, connect_timeout_s=0.05,
                         folder={"poll_interval_s": 0.02}))
    try:
        assert wait_until(lambda: run.log.named("camera_waiting_for_daemon"), WAIT_S)
        assert (hot / "p.png").exists() and run.value("linewatch_camera_frames_captured_total") == 0
        frames = sub.receive(1)  # the daemon is there (its socket works): the file goes
        assert len(frames) == 1 and frames[0].frame_id == 0
        assert wait_until(lambda: (hot / "done" / "p.png").exists(), WAIT_S)
    finally:
        run.close()
    assert run.value("linewatch_camera_frames_dropped_total", reason="no_daemon") == 0
    assert run.log.named("camera_daemon_back")


def test_a_file_given_back_is_sent_again_after_a_restart(tmp_path: Path) -> None:
    hot = tmp_path / "hot"
    hot.mkdir()
    (hot / "p.png").write_bytes(png_bytes(np.full((8, 8, 3), 5, np.uint8)))
    cfg = config(source=f"folder://{hot}", folder={"poll_interval_s": 0.01})
    stop = threading.Event()

    def first_frame(source):
        source.open()
        end = time.monotonic() + WAIT_S
        while time.monotonic() < end:
            captured = source.read(stop)
            if captured is not None:
                return captured
        raise AssertionError("no frame")

    captured = first_frame(open_source(cfg.source, cfg))
    assert captured.frame_id == 0
    captured.undo()  # stopped while waiting for the daemon
    again = first_frame(open_source(cfg.source, cfg))  # a new process
    assert again.frame_id == 1 and (hot / "p.png").exists()
    again.done()
    assert (hot / "done" / "p.png").exists()


class _FakeDevice:
    """A capture whose driver takes some settings, rounds one and refuses another."""

    def __init__(self) -> None:
        self.values = {cv2.CAP_PROP_FOURCC: float(cv2.VideoWriter_fourcc(*"YUYV")), cv2.CAP_PROP_FRAME_WIDTH: 640.0,
                       cv2.CAP_PROP_FRAME_HEIGHT: 480.0, cv2.CAP_PROP_FPS: 30.0, cv2.CAP_PROP_GAIN: 0.0}

    def set(self, prop, value) -> bool:
        if prop == cv2.CAP_PROP_GAIN:
            return False  # refused
        self.values[prop] = 1280.0 if prop == cv2.CAP_PROP_FRAME_WIDTH else float(value)  # width rounded
        return True

    def get(self, prop) -> float:
        return self.values.get(prop, 0.0)


def test_device_settings_are_applied_and_what_the_driver_refused_is_reported() -> None:
    from linewatch.config import OpenCVSourceConfig
    from linewatch.runtime.transport.camera.sources import apply_device_settings

    settings = OpenCVSourceConfig(fourcc="MJPG", width=1300, height=720, fps=15, gain=4)
    reported, refused = apply_device_settings(_FakeDevice(), settings)
    assert reported == {"fourcc": "MJPG", "width": 1280.0, "height": 720.0, "fps": 15.0, "gain": 0.0}
    assert refused == {"width": {"asked": 1300, "reported": 1280.0}, "gain": {"asked": 4, "reported": 0.0}}
    assert apply_device_settings(_FakeDevice(), OpenCVSourceConfig()) == ({}, {})
    with pytest.raises(ValueError):
        OpenCVSourceConfig(fourcc="MJPEG")


def test_grab_from_a_stream_that_is_not_there_is_one_error_line(tmp_path: Path, capsys) -> None:
    from tests.ports import refused_port

    with refused_port() as port:
        code = cli.main(["camera", "grab", "--source", f"rtsp://127.0.0.1:{port}/stream", "--frames", "1",
                         "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if ln.startswith("linewatch: error:")] == [
        f"linewatch: error: cannot open rtsp://127.0.0.1:{port}/stream: OpenCV cannot open rtsp://127.0.0.1:{port}/stream"]


def test_max_fps_paces_a_folder_instead_of_skipping_its_files(tmp_path: Path, sub: Subscriber) -> None:
    hot = tmp_path / "hot"
    hot.mkdir()
    for name in ("a.png", "b.png"):
        (hot / name).write_bytes(png_bytes(np.full((8, 8, 3), 5, np.uint8)))
    run = Running(config(source=f"folder://{hot}", endpoint=sub.endpoint, max_fps=0.001,
                         folder={"poll_interval_s": 0.02}))
    try:  # the second file is read and waits for its turn (1000 s away)
        assert wait_until(sub.pumping(lambda: run.value("linewatch_camera_frames_captured_total") == 2), WAIT_S)
    finally:
        run.close()  # stopped while it waits: given back
    assert len(sub.receive(1)) == 1
    assert run.value("linewatch_camera_frames_skipped_total") == 0
    assert len(list((hot / "done").iterdir())) == 1 and len(list(hot.glob("*.png"))) == 1
    assert "\nu\t" in (hot / ".linewatch-camera-sent").read_text()


def test_grab_takes_its_source_from_the_config_or_before_grab(tmp_path: Path, capsys) -> None:
    video = tmp_path / "v.avi"
    write_video(video, 2, size=(16, 16))
    config_file = tmp_path / "cam.yaml"
    config_file.write_text(f"camera: press-9\nsource: file://{video}\n")
    assert cli.main(["camera", "grab", "-c", str(config_file), "--frames", "1", "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "grab.json").read_text())["camera"] == "press-9"
    assert cli.main(["camera", "--source", f"file://{video}", "grab", "--frames", "1", "--out", str(tmp_path / "b")]) == 0
    assert cli.main(["camera", "grab", "--frames", "1", "--out", str(tmp_path / "c")]) == 2
    assert "linewatch: error: no camera source" in capsys.readouterr().err
