"""`linewatch serve` as a real process: a classic-backend bank from sim data, frames in over
ZeroMQ (our wire format and imagezmq's own ImageSender), verdicts out, /metrics, bad frames,
SIGTERM mid-stream, config errors. Every wait is bounded."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

import zmq
from zmq.utils.monitor import recv_monitor_message

from linewatch import wire
from linewatch.sim import render
from tests.waiting import wait_until

SIZE = 128  # rendered frame side
DETECTOR = {"backend": "classic", "device": "cpu", "image_size": 112, "k_references": 2}
PRODUCT = "screw_tray"
START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def small_bank(tmp_path_factory) -> Path:
    """A classic-backend bank: 12 good sim images, calibrated on 6 held-out ones (128 px)."""
    from linewatch.bank_builder import build_bank
    from linewatch.config import config_from_dict
    from linewatch.sim import generate_dataset

    root = tmp_path_factory.mktemp("serve-bank")
    data = generate_dataset(root / "sim", PRODUCT, seed=3, n_train=12, n_val=6, n_test_good=0,
                            n_test_logical=0, n_test_structural=0, size=SIZE)
    config = config_from_dict({"detector": DETECTOR})
    bank = build_bank(config, data / "train" / "good", data / "validation" / "good", progress=False)
    path = root / "small.lwbank"
    bank.save(path)
    return path


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    """/metrics parsed with prometheus_client: sample name -> {sorted label items: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text = http_get(port, "/metrics")
    assert status == 200
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def by_label(samples: dict[tuple, float], key: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, value in samples.items():
        d = dict(labels)
        out[d[key]] = out.get(d[key], 0.0) + value
    return out


class Served:
    """A `linewatch serve` subprocess on free loopback ports, with a verdict subscriber."""

    def __init__(self, tmp: Path, bank: Path, deadline_ms: float = 60_000.0, runtime: dict | None = None) -> None:
        """`runtime`: more runtime sections for the config (e.g. {"control": {...}})."""
        self.ingest_port, self.izmq_port, self.publish_port, self.metrics_port = (free_port() for _ in range(4))
        config = {
            "detector": DETECTOR,
            "bank": {"path": str(bank)},
            "runtime": {
                "ingest": {"endpoints": [
                    {"url": f"tcp://127.0.0.1:{self.ingest_port}", "mode": "bind", "protocol": "linewatch"},
                    # imagezmq's PUB sender binds, so the daemon connects
                    {"url": f"tcp://127.0.0.1:{self.izmq_port}", "mode": "connect", "protocol": "imagezmq-pubsub"},
                ]},
                "batch": {"max_batch": 4, "max_delay_ms": 5},
                "pipeline": {"deadline_ms": deadline_ms},
                "publish": {"url": f"tcp://127.0.0.1:{self.publish_port}", "mode": "bind"},
                "metrics": {"host": "127.0.0.1", "port": self.metrics_port},
                "logging": {"level": "INFO", "format": "console"},
                **(runtime or {}),
            },
        }
        self.config_path = tmp / "serve.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp / "serve.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "linewatch.cli", "serve", "-c", str(self.config_path)],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.setsockopt(zmq.LINGER, 0)
        self.monitor = self.sub.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.sub.connect(f"tcp://127.0.0.1:{self.publish_port}")
        self.cam = self.ctx.socket(zmq.PUB)
        self.cam.setsockopt(zmq.LINGER, 0)
        self.cam.connect(f"tcp://127.0.0.1:{self.ingest_port}")
        self.verdicts: list = []

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"serve exited with {self.proc.returncode}:\n{self.log()}"
            try:
                return http_get(self.metrics_port, "/readyz", timeout=1)[0] == 200
            except OSError:
                return False

        assert wait_until(ready, START_TIMEOUT_S, poll_s=0.2), f"/readyz not 200 within {START_TIMEOUT_S} s:\n{self.log()}"

    def drain_after_exit(self) -> list:
        """After the daemon exited: read every verdict it sent. Its PUB socket disconnecting
        (seen on a socket monitor) comes after its last message on the same TCP stream."""
        assert self.proc.poll() is not None
        while self.monitor.poll(30_000):
            if recv_monitor_message(self.monitor)["event"] == zmq.EVENT_DISCONNECTED:
                break
        else:
            pytest.fail("the verdict socket never saw the daemon disconnect")
        while self.sub.poll(0):
            self.verdicts.append(wire.decode_verdict(self.sub.recv_multipart()))
        return self.verdicts

    def recv(self, until, timeout_s: float) -> list:
        """Collect verdicts into self.verdicts until `until(self.verdicts)` or the timeout."""
        end = time.monotonic() + timeout_s
        while not until(self.verdicts) and time.monotonic() < end:
            if self.sub.poll(100):
                self.verdicts.append(wire.decode_verdict(self.sub.recv_multipart()))
        return self.verdicts

    def warm_up(self, camera: str, send) -> None:
        """PUB/SUB drops messages sent before the peers are joined: send a cheap bad frame on
        `camera` until its error verdict comes back, which proves both directions are live."""
        end = time.monotonic() + 30
        while time.monotonic() < end:
            send()
            self.recv(lambda vs: any(v.camera == camera for v in vs), 0.3)
            if any(v.camera == camera for v in self.verdicts):
                return
        pytest.fail(f"no verdict for warm-up camera {camera} within 30 s:\n{self.log()}")

    def send_frame(self, camera: str, frame_id: int, image: np.ndarray, encoding: str = "jpeg") -> None:
        self.cam.send_multipart(wire.encode_frame(camera, frame_id, image, encoding=encoding, part_id=f"{camera}-{frame_id}"))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.sub.disable_monitor()
        self.monitor.close()
        self.sub.close()
        self.cam.close()
        self.ctx.term()
        self._log.close()
        return self.proc.returncode


def sim_images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [render(PRODUCT, rng, None if i % 2 == 0 else "missing", size=SIZE)[0] for i in range(n)]


def of(verdicts: list, camera: str) -> list:
    return [v for v in verdicts if v.camera == camera]


def test_serve_wire_and_imagezmq_frames_bad_frames_and_metrics(small_bank, tmp_path):
    import imagezmq
    served = Served(tmp_path, small_bank)
    sender = None
    try:
        served.wait_ready()
        log = served.log()
        assert "classic (weights-free" in log and "not SAM-LAD" in log, log  # the start line names the backend
        assert small_bank.exists()
        served.warm_up("warm", lambda: served.cam.send_multipart([b"warm", b"not json", b""]))
        sender = imagezmq.ImageSender(connect_to=f"tcp://127.0.0.1:{served.izmq_port}", REQ_REP=False)
        served.warm_up("izwarm", lambda: sender.send_jpg("izwarm", b"not a jpeg"))

        images = sim_images(8, seed=11)
        for i in range(6):
            served.send_frame("cam0", i, images[i])
        for image in images[:3]:  # imagezmq: BGR arrays; frame ids are counted by the daemon
            sender.send_image("izcam|extra text", np.ascontiguousarray(image[:, :, ::-1]))
        # bad frames: a header that is not JSON, then a JPEG that is not one
        served.cam.send_multipart([b"bad", b"{this is not json", b"\x00"])
        header = {"v": 1, "camera": "bad", "frame_id": 7, "capture_ts": time.time(), "encoding": "jpeg"}
        served.cam.send_multipart([b"bad", json.dumps(header).encode(), b"\xff\xd8\xff garbage"])
        # the daemon keeps serving after them
        for i in (6, 7):
            served.send_frame("cam0", i, images[i])

        want = {"cam0": 8, "izcam": 3, "bad": 2}
        verdicts = served.recv(lambda vs: all(len(of(vs, c)) >= n for c, n in want.items()), 120)
        # Nothing more (no duplicates) can follow once nothing is in flight in the daemon and
        # this subscriber has every verdict released since its first one: seq counts 0, 1, 2, ...
        # over the run, and the earliest warm-up verdicts may have gone out before it joined.
        def settled() -> bool:
            m = scrape(served.metrics_port)
            released = sum(m["linewatch_verdicts_total"].values())
            first = min(v.seq for v in served.verdicts)
            served.recv(lambda vs: len(vs) >= released - first, 1.0)
            seqs = sorted(v.seq for v in served.verdicts)
            return m["linewatch_inflight_frames"][()] == 0 and seqs == list(range(first, int(released)))

        assert wait_until(settled, 60), served.log()
        verdicts = served.verdicts
        assert len({v.id for v in verdicts}) == len(verdicts)  # and each has its own id

        cam0 = of(verdicts, "cam0")
        assert [v.frame_id for v in cam0] == list(range(8)), [(v.frame_id, v.verdict, v.reason) for v in cam0]
        assert all(v.verdict in ("pass", "fail") and v.score is not None and v.threshold is not None for v in cam0), \
            [(v.frame_id, v.verdict, v.reason) for v in cam0]
        assert all(v.backend == "classic" for v in cam0)
        assert [v.part_id for v in cam0] == [f"cam0-{i}" for i in range(8)]
        iz = of(verdicts, "izcam")
        assert len(iz) == 3 and [v.frame_id for v in iz] == sorted({v.frame_id for v in iz})  # increasing
        assert all(v.verdict in ("pass", "fail") for v in iz), [(v.verdict, v.reason) for v in iz]
        bad = of(verdicts, "bad")
        assert [v.verdict for v in bad] == ["error", "error"]
        assert [v.reason for v in bad] == ["bad_header", "decode_failed"]
        assert bad[1].frame_id == 7

        m = scrape(served.metrics_port)
        received = by_label(m["linewatch_frames_received_total"], "camera")
        for camera, n in want.items():
            assert received.get(camera) == n, received
        per_camera = by_label(m["linewatch_verdicts_total"], "camera")
        for camera, n in want.items():
            assert per_camera.get(camera) == n, per_camera
        by_value = {}
        for labels, value in m["linewatch_verdicts_total"].items():
            d = dict(labels)
            if d["camera"] in want:
                by_value[d["verdict"]] = by_value.get(d["verdict"], 0) + value
        assert by_value.get("error") == 2 and by_value.get("pass", 0) + by_value.get("fail", 0) == 11, by_value
        assert m["linewatch_ready"][()] == 1
        assert http_get(served.metrics_port, "/healthz")[0] == 200
    finally:
        if sender is not None:
            sender.close()
        rc = served.stop()
    assert rc == 0, served.log()


def test_sigterm_mid_stream_answers_every_frame_once(small_bank, tmp_path):
    served = Served(tmp_path, small_bank, deadline_ms=5000.0)
    try:
        served.wait_ready()
        served.warm_up("warm", lambda: served.cam.send_multipart([b"warm", b"not json", b""]))
        images = sim_images(4, seed=5)
        n = 12
        for i in range(n):  # faster than the detector: frames are still in flight at SIGTERM
            served.send_frame("cam0", i, images[i % 4], encoding="raw")
        def cam0_received() -> float:
            return by_label(scrape(served.metrics_port).get("linewatch_frames_received_total", {}), "camera").get("cam0", 0)

        assert wait_until(lambda: cam0_received() == n, 30) and cam0_received() == n, cam0_received()
        served.proc.send_signal(signal.SIGTERM)
        rc = served.proc.wait(60)
        verdicts = served.drain_after_exit()
        cam0 = of(verdicts, "cam0")
        assert [v.frame_id for v in cam0] == list(range(n)), [(v.frame_id, v.verdict, v.reason) for v in cam0]
        assert rc == 0, served.log()
        log = served.log()
        assert "signal_received" in log
        inflight = re.search(r"inflight_at_stop=(\d+)", log)
        assert inflight and int(inflight.group(1)) > 0, log  # the signal came while frames were in flight
    finally:
        served.stop()


def _run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "linewatch.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_serve_bad_config_key_exits_2_naming_the_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("runtime:\n  ingest:\n    endpointz: []\n")
    res = _run_cli("serve", "-c", str(cfg))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "runtime.ingest.endpointz" in res.stderr and "unknown key" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_serve_missing_bank_says_how_to_build_one(tmp_path):
    cfg = tmp_path / "ok.yaml"
    cfg.write_text(yaml.safe_dump({"detector": DETECTOR, "bank": {"path": str(tmp_path / "nope.lwbank")}}))
    res = _run_cli("serve", "-c", str(cfg))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "nope.lwbank" in res.stderr and "linewatch bank build" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("which", ["ingest", "publish", "metrics"])
def test_a_port_in_use_is_one_line_of_error(small_bank, tmp_path, which):
    # Fault run: an ingest port in use printed JSON log lines before the one-line error.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        urls = {name: f"tcp://127.0.0.1:{port if name == which else free_port()}" for name in ("ingest", "publish")}
        config = {
            "detector": DETECTOR,
            "bank": {"path": str(small_bank)},
            "runtime": {
                "ingest": {"endpoints": [{"url": urls["ingest"]}]},
                "publish": {"url": urls["publish"]},
                "metrics": {"port": port if which == "metrics" else 0},
            },
        }
        cfg = tmp_path / "taken.yaml"
        cfg.write_text(yaml.safe_dump(config))
        res = _run_cli("serve", "-c", str(cfg))
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("linewatch: error: ") and str(port) in lines[0] and "in use" in lines[0], lines[0]
