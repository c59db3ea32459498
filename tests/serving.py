"""A real `linewatch serve` for the system tests (tests/test_serve.py, test_changeover.py,
test_archive_serve.py, runtime/test_mqtt.py, runtime/test_live_page.py, ops/conftest.py):
the subprocess, a camera and a verdict subscriber on loopback, /metrics scraping, sim frames.

No port is picked in advance (safe under pytest-xdist, see tests/ports.py): the daemon binds
ingest and /metrics on port 0 and its log says which ports it got; the test's verdict SUB
socket binds port 0 and the daemon's publisher connects to it (`publish.mode: connect`).
"""

from __future__ import annotations

import re
import signal
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

_METRICS_PORT = re.compile(r"\bstarted\b.*?\bmetrics_port[\"']?[=:]\s*(\d+)")
_INGEST_LINE = re.compile(r"ingest started.*")
_TCP_URL = re.compile(r"tcp://[0-9.]+:\d+")


def bound_ports(log: str) -> tuple[list[str], int] | None:
    """From a `linewatch serve` log (console or JSON): the ingest endpoints as bound (real ports;
    `connect` ones as configured) and the /metrics port, once the daemon has logged `started`;
    None before."""
    metrics = _METRICS_PORT.search(log)
    ingest = _INGEST_LINE.search(log)
    if metrics is None or ingest is None:
        return None
    return _TCP_URL.findall(ingest.group(0)), int(metrics.group(1))


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
    """A `linewatch serve` subprocess on loopback ports it binds itself (port 0), with a camera
    (PUB, connected to its ingest once `wait_ready` read the port) and a verdict subscriber
    (SUB, bound here; the daemon connects to it). `imagezmq_url`: an imagezmq PUB sender's
    bound endpoint the daemon connects to as a second ingest endpoint."""

    def __init__(self, tmp: Path, bank: Path, deadline_ms: float = 60_000.0, runtime: dict | None = None,
                 imagezmq_url: str | None = None, detector: dict = DETECTOR) -> None:
        """`runtime`: more sections of `runtime` (e.g. {"mqtt": {...}}), set over the ones below;
        `detector`: the detector section (the bank's)."""
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.setsockopt(zmq.LINGER, 0)
        self.monitor = self.sub.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.sub.bind("tcp://127.0.0.1:0")
        self.publish_url = self.sub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.cam = self.ctx.socket(zmq.PUB)
        self.cam.setsockopt(zmq.LINGER, 0)
        self.ingest_url = ""  # the daemon's bound ingest endpoint, known after wait_ready()
        self.metrics_port = 0  # known after wait_ready()
        endpoints = [{"url": "tcp://127.0.0.1:0", "mode": "bind", "protocol": "linewatch"}]
        if imagezmq_url is not None:  # imagezmq's PUB sender binds, so the daemon connects
            endpoints.append({"url": imagezmq_url, "mode": "connect", "protocol": "imagezmq-pubsub"})
        config = {
            "detector": detector,
            "bank": {"path": str(bank)},
            "runtime": {
                "ingest": {"endpoints": endpoints},
                "batch": {"max_batch": 4, "max_delay_ms": 5},
                "pipeline": {"deadline_ms": deadline_ms},
                "publish": {"url": self.publish_url, "mode": "connect"},
                "metrics": {"host": "127.0.0.1", "port": 0},
                "logging": {"level": "INFO", "format": "console"},
            },
        }
        config["runtime"].update(runtime or {})
        self.config_path = tmp / "serve.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp / "serve.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "linewatch.cli", "serve", "-c", str(self.config_path)],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        self.verdicts: list = []

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self) -> None:
        """Wait for the `started` log line (it names the ports the daemon bound), connect the
        camera to the ingest port, then wait for /readyz."""
        def started() -> tuple[list[str], int] | None:
            assert self.proc.poll() is None, f"serve exited with {self.proc.returncode}:\n{self.log()}"
            return bound_ports(self.log_path.read_text(errors="replace"))

        ports = wait_until(started, START_TIMEOUT_S, poll_s=0.1)
        assert ports, f"no `started` line within {START_TIMEOUT_S} s:\n{self.log()}"
        endpoints, self.metrics_port = ports
        self.ingest_url = endpoints[0]
        self.cam.connect(self.ingest_url)

        def ready() -> bool:
            assert self.proc.poll() is None, f"serve exited with {self.proc.returncode}:\n{self.log()}"
            try:
                return http_get(self.metrics_port, "/readyz", timeout=1)[0] == 200
            except OSError:
                return False

        assert wait_until(ready, START_TIMEOUT_S, poll_s=0.1), f"/readyz not 200 within {START_TIMEOUT_S} s:\n{self.log()}"

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


def build_sim_bank(root: Path, detector: dict, *, product: str = PRODUCT, seed: int, n_train: int, n_val: int,
                   size: int = SIZE, mono: bool = False) -> Path:
    """A bank from `n_train` good sim images of `product` (seed `seed`; grey when `mono`: a mono
    bank), calibrated on `n_val` held-out ones, saved under `root`. Tests get banks through the `sim_bank` fixture
    (tests/conftest.py), which builds each distinct one once per session."""
    from linewatch.bank_builder import build_bank
    from linewatch.config import config_from_dict
    from linewatch.sim import generate_dataset

    data = generate_dataset(root / "sim", product, seed=seed, n_train=n_train, n_val=n_val, n_test_good=0,
                            n_test_logical=0, n_test_structural=0, size=size, mono=mono)
    bank = build_bank(config_from_dict({"detector": detector}), data / "train" / "good", data / "validation" / "good",
                      progress=False)
    path = root / "bank.lwbank"
    bank.save(path)
    return path
