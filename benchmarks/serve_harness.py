"""What the benchmarks against a real `linewatch serve` share (fault_run.py, overload.py).

    build_bank(work)            a demo-config bank from synthetic good parts, and good frames to send
    Daemon(work, bank)          `linewatch serve` (configs/demo.yaml, classic) on free loopback ports,
                                with a temp config; start/stop, /metrics, RSS from /proc
    Subscriber(url)             a thread counting verdicts per (camera, frame_id), keeping the first
    camera_socket(ctx, daemon)  a PUB socket connected to the daemon's ingest endpoint
    wait_joined(sock, sub, ..)  probe until a verdict comes back (PUB/SUB joins asynchronously)
    RssSampler(pid, every_s)    a thread sampling a process's VmRSS

Not a benchmark itself; import it with benchmarks/ on sys.path (the scripts run from there).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import yaml
import zmq
from prometheus_client.parser import text_string_to_metric_families

from linewatch import wire

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_bank(work: Path) -> tuple[Path, list[np.ndarray]]:
    """A demo-config bank from synthetic good parts; returns it and some good frames to send
    (held-out good parts of the same product, RGB uint8)."""
    from linewatch.bank_builder import build_bank as build
    from linewatch.config import load_config
    from linewatch.images import read_image
    from linewatch.sim import generate_dataset

    data = generate_dataset(work / "sim", "screw_tray", seed=1, n_train=20, n_val=10, n_test_good=8,
                            n_test_logical=0, n_test_structural=0, size=256)
    bank = build(load_config(ROOT / "configs" / "demo.yaml"), data / "train" / "good", data / "validation" / "good",
                 progress=False)
    path = work / "bank.lwbank"
    bank.save(path)
    frames = [read_image(p) for p in sorted((data / "test" / "good").iterdir())]
    return path, frames


def proc_status_mb(pid: int, field: str) -> float:
    """A size field of /proc/PID/status (VmRSS, VmHWM, ...) in MB; NaN if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Daemon:
    """`linewatch serve` with configs/demo.yaml, the bank given, loopback ports picked free.

    `ingest` updates runtime.ingest (e.g. {"cameras": []}). The process runs in `work`, so the
    demo config's relative paths (archive, control socket) land there; its log is work/serve.log.
    """

    def __init__(self, work: Path, bank: Path, ingest: dict | None = None) -> None:
        self.work = work
        self.ports = {k: free_port() for k in ("ingest", "publish", "metrics")}
        config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
        config["bank"] = {"path": str(bank)}
        config["runtime"].update({
            "ingest": {"endpoints": [{"url": f"tcp://127.0.0.1:{self.ports['ingest']}"}], "receive_hwm": 1000,
                       **(ingest or {})},
            "publish": {"url": f"tcp://127.0.0.1:{self.ports['publish']}", "send_hwm": 100_000},
            "metrics": {"host": "127.0.0.1", "port": self.ports["metrics"]},
            "logging": {"level": "INFO", "format": "json"},
        })
        self.config_data = config
        self.config = work / "serve.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.log = open(work / "serve.log", "ab")
        self.proc: subprocess.Popen | None = None

    @property
    def ingest_url(self) -> str:
        return f"tcp://127.0.0.1:{self.ports['ingest']}"

    @property
    def publish_url(self) -> str:
        return f"tcp://127.0.0.1:{self.ports['publish']}"

    def start(self) -> float:
        """Start `linewatch serve`; returns seconds until /readyz answered 200."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "linewatch.cli", "serve", "-c", str(self.config)],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=self.work, env=env)
        while time.monotonic() - t0 < 120:
            if self.proc.poll() is not None:
                raise SystemExit(f"serve exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['metrics']}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.05)
        raise SystemExit("serve not ready within 120 s")

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, wait; returns the exit status (kill -9 after timeout_s)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def metrics(self) -> dict[str, float]:
        """Sample name{labels} -> value, summed over labels not given."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['metrics']}/metrics", timeout=5) as r:
            text = r.read().decode()
        out: Counter = Counter()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[s.name] += s.value
                for k, v in s.labels.items():
                    out[f"{s.name}{{{k}={v}}}"] += s.value
        return out

    def rss_mb(self) -> float:
        return proc_status_mb(self.proc.pid, "VmRSS")

    def hwm_mb(self) -> float:
        """VmHWM: the process's peak RSS over its whole life so far."""
        return proc_status_mb(self.proc.pid, "VmHWM")


class Subscriber(threading.Thread):
    """Counts verdicts per (camera, frame_id), values, error reasons and seq gaps; keeps each
    frame's first verdict as `first[(camera, frame_id)] = (verdict, reason, latency_s)`.
    `cond` (on `lock`) is notified at every verdict."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.setsockopt(zmq.RCVHWM, 1_000_000)
        self.sock.connect(url)
        self.per_frame: Counter = Counter()
        self.first: dict[tuple[str, int], tuple[str, str | None, float | None]] = {}
        self.per_camera: Counter = Counter()  # verdicts (all values) per camera
        self.by_camera: Counter = Counter()  # (camera, verdict value)
        self.values: Counter = Counter()
        self.reasons: Counter = Counter()  # (camera, reason) of `error` verdicts
        self.lost = 0
        self._next: dict[str, int] = {}
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)

    def run(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(100):
                continue
            v = wire.decode_verdict(self.sock.recv_multipart())
            with self.lock:
                key = (v.camera, v.frame_id)
                self.per_frame[key] += 1
                self.first.setdefault(key, (v.verdict, v.reason, v.latency_s))
                self.per_camera[v.camera] += 1
                self.by_camera[(v.camera, v.verdict)] += 1
                self.values[v.verdict] += 1
                if v.verdict == "error":
                    self.reasons[(v.camera, v.reason)] += 1
                nxt = self._next.get(v.run_id)
                if nxt is not None and v.seq > nxt:
                    self.lost += v.seq - nxt
                self._next[v.run_id] = max(nxt or 0, v.seq + 1)
                self.cond.notify_all()

    def settle(self, keys: list[tuple[str, int]], timeout_s: float = 60.0) -> bool:
        """Wait until every (camera, frame_id) in `keys` has a verdict; False on timeout."""
        end = time.monotonic() + timeout_s
        missing = list(keys)
        while True:
            with self.lock:
                missing = [key for key in missing if not self.per_frame[key]]
            if not missing:
                return True
            if time.monotonic() >= end:
                return False
            time.sleep(0.1)

    def close(self) -> None:
        self.stop.set()
        self.join(5)
        self.sock.close(linger=0)
        self.ctx.term()


def camera_socket(ctx: zmq.Context, daemon: Daemon) -> zmq.Socket:
    """A camera's PUB socket, connected to the daemon's ingest endpoint."""
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, 1_000_000)
    sock.connect(daemon.ingest_url)
    return sock


def wait_joined(sock: zmq.Socket, sub: Subscriber, image: np.ndarray, timeout_s: float = 60.0) -> None:
    """PUB/SUB joins asynchronously: send camera "warm" frames until a verdict comes back."""
    end = time.monotonic() + timeout_s
    while not sub.per_camera["warm"]:
        if time.monotonic() > end:
            raise SystemExit("no verdict came back from the daemon")
        sock.send_multipart(wire.encode_frame("warm", 0, image, encoding="jpeg"))
        time.sleep(0.2)


class RssSampler(threading.Thread):
    """Samples VmRSS of `pid` every `every_s` until stopped; `samples` are (monotonic, MB)."""

    def __init__(self, pid: int, every_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.every_s = every_s
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.monotonic(), proc_status_mb(self.pid, "VmRSS")))
            self.stop.wait(self.every_s)

    def peak_mb(self) -> float:
        return max((mb for _, mb in self.samples), default=float("nan"))

    def close(self) -> None:
        self.stop.set()
        self.join(5)


def pace(t0: float, k: int, rate: float) -> None:
    """Sleep until frame k of a stream at `rate` per second that started at t0 is due."""
    delay = t0 + k / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def check(name: str, ok: bool, failures: list[str]) -> str:
    if not ok:
        failures.append(name)
    return "ok" if ok else "BROKEN"
