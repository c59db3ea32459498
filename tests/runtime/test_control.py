"""The daemon's bank switch through its control socket: a real Unix socket, a real daemon
(fake detector), a bank loader the test gives. Switched and refused switches, the metrics
and log lines they leave, one switch at a time, bad requests, stale and live socket files."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
import threading
from pathlib import Path

import pytest

from linewatch.config import ControlConfig
from linewatch.runtime.ops import control
from linewatch.runtime.ops.control import ControlError, request
from linewatch.runtime.changeover import LoadedBank, SwitchRefused
from linewatch.runtime.daemon import Daemon
from tests.runtime.fakes import FakeProcessor, quiet_log
from tests.runtime.line import Line, http, runtime_config


def fake_bank(bank_id: str, stages: tuple[str, ...] = ("pre", "net"), images: int = 3) -> FakeProcessor:
    proc = FakeProcessor([(name, 0.0) for name in stages])
    proc.bank_id = bank_id
    proc.bank_images = images
    return proc


@pytest.fixture
def sock_dir():
    """A short directory for socket files (a Unix socket path has at most 107 bytes)."""
    d = tempfile.mkdtemp(prefix="lwc", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


class Loader:
    """A bank loader whose answer the test sets: a processor, or an exception to raise.
    `gate` (when set by the test) holds the load until opened; `entered` tells it began."""

    def __init__(self) -> None:
        self.answer: object = None
        self.calls: list[tuple] = []
        self.entered = threading.Event()
        self.gate: threading.Event | None = None

    def __call__(self, bank, config, in_service) -> LoadedBank:
        self.calls.append((bank, config, in_service.bank_id))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(30.0), "the test never opened the gate"
        if isinstance(self.answer, Exception):
            raise self.answer
        return LoadedBank(self.answer, bank or "default.lwbank", warnings=["runtime.batch.max_batch: differs"])


@pytest.fixture
def served(sock_dir):
    """A started daemon with bank "bank-old", a control socket and a Loader; stopped after."""
    config = runtime_config()
    config.control = ControlConfig(socket=str(sock_dir / "ctl.sock"))
    loader = Loader()
    log = io.StringIO()
    daemon = Daemon(config, fake_bank("bank-old"), log=quiet_log(log, logging.INFO), bank_loader=loader)
    daemon.start()
    daemon.log_text = log
    yield daemon, loader
    daemon.stop()


def sample(daemon: Daemon, name: str, **labels: str) -> float | None:
    return daemon.metrics.registry.get_sample_value(name, labels)


def switch(daemon: Daemon, bank: str | None = None, config: str | None = None) -> dict:
    return request(daemon.config.control.socket, {"command": "switch", "bank": bank, "config": config})


def log_events(daemon: Daemon) -> list[dict]:
    return [json.loads(line) for line in daemon.log_text.getvalue().splitlines()]


def test_switch_over_the_socket_puts_the_new_bank_in_service_with_metrics_and_log(served) -> None:
    daemon, loader = served
    line = Line(daemon)
    try:
        line.warm_up()
        for i in range(3):
            line.send("cam0", i, 50)
        before = [line.recv(5.0) for _ in range(3)]
        assert [(v.frame_id, v.bank_id) for v in before if v is not None] == [(i, "bank-old") for i in range(3)]
        loader.answer = fake_bank("bank-new", images=7)
        reply = switch(daemon, "/banks/new.lwbank", "/etc/new.yaml")
        assert reply["ok"] and reply["switched"], reply
        assert (reply["old_bank_id"], reply["bank_id"], reply["bank"]) == ("bank-old", "bank-new", "/banks/new.lwbank")
        assert reply["last_frame_ids"]["cam0"] == 2 and reply["frames_before"] >= 4
        assert reply["warnings"] == ["runtime.batch.max_batch: differs"]
        assert loader.calls == [("/banks/new.lwbank", "/etc/new.yaml", "bank-old")]
        line.send("cam0", 3, 50)
        got = line.recv(5.0)
        assert got is not None and (got.frame_id, got.bank_id) == (3, "bank-new"), got
    finally:
        line.close()
    assert daemon.processor is loader.answer and daemon.pipeline.processor is loader.answer
    assert "bank bank-new" in http(daemon.health.port, "/readyz")[1]
    assert sample(daemon, "linewatch_bank_switches_total", result="switched") == 1
    assert sample(daemon, "linewatch_bank_info", bank_id="bank-new", backend="fake", images="7") == 1
    assert sample(daemon, "linewatch_bank_info", bank_id="bank-old", backend="fake", images="3") is None  # removed
    switched = [e for e in log_events(daemon) if e["event"] == "bank_switched"]
    assert len(switched) == 1 and switched[0]["old_bank_id"] == "bank-old" and switched[0]["bank_id"] == "bank-new"
    assert switched[0]["last_frame_ids"]["cam0"] == 2


@pytest.mark.parametrize("failure, reason", [
    (SwitchRefused("bank /b.lwbank: built with another model or config"), "built with another model or config"),
    (MemoryError("CUDA out of memory"), "MemoryError: CUDA out of memory"),
])
def test_a_failing_load_is_refused_and_the_old_bank_stays(served, failure, reason) -> None:
    daemon, loader = served
    loader.answer = failure
    reply = switch(daemon, "/b.lwbank")
    assert reply["ok"] and not reply["switched"], reply
    assert reason in reply["reason"] and reply["bank_id"] == "bank-old"
    assert daemon.processor.bank_id == "bank-old" and daemon.pipeline.processor.bank_id == "bank-old"
    assert sample(daemon, "linewatch_bank_switches_total", result="refused") == 1
    assert sample(daemon, "linewatch_bank_switches_total", result="switched") in (None, 0)
    assert sample(daemon, "linewatch_bank_info", bank_id="bank-old", backend="fake", images="3") == 1
    refused = [e for e in log_events(daemon) if e["event"] == "bank_switch_refused"]
    assert len(refused) == 1 and reason in refused[0]["reason"]


def test_a_processor_with_other_stages_is_refused(served) -> None:
    daemon, loader = served
    loader.answer = fake_bank("bank-odd", stages=("whole",))
    reply = switch(daemon, "/odd.lwbank")
    assert not reply["switched"] and "stages" in reply["reason"], reply
    assert daemon.processor.bank_id == "bank-old"


def test_one_switch_at_a_time(served) -> None:
    daemon, loader = served
    loader.answer = fake_bank("bank-new")
    loader.gate = threading.Event()
    replies: list[dict] = []
    first = threading.Thread(target=lambda: replies.append(switch(daemon, "/new.lwbank")))
    first.start()
    try:
        assert loader.entered.wait(10.0)  # the first switch is loading
        second = daemon.switch_bank("/other.lwbank")
        assert not second.switched and "in progress" in second.reason
    finally:
        loader.gate.set()
        first.join(30.0)
    assert replies and replies[0]["switched"] and daemon.processor.bank_id == "bank-new"
    assert len(loader.calls) == 1


@pytest.mark.parametrize("raw, error", [
    (b"not json\n", "not JSON"),
    (b"[1, 2]\n", "JSON object"),
    (b'{"command": "reboot"}\n', "unknown command 'reboot'"),
    (b'{"command": "switch", "bank": "/b", "force": true}\n', "unknown keys ['force']"),
    (b'{"command": "switch", "bank": 7}\n', "'bank' must be a file path or null"),
])
def test_bad_requests_get_an_error_reply_and_the_socket_keeps_serving(served, raw, error) -> None:
    daemon, loader = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10.0)
        s.connect(daemon.config.control.socket)
        s.sendall(raw)
        reply = json.loads(s.makefile("rb").readline())
    assert reply["ok"] is False and error in reply["error"], reply
    assert loader.calls == []
    loader.answer = fake_bank("bank-new")
    assert switch(daemon, "/new.lwbank")["switched"]  # and the next request is served
    assert daemon.dead_threads() == []


def test_a_silent_client_is_dropped_after_the_request_timeout(served, monkeypatch) -> None:
    daemon, loader = served
    monkeypatch.setattr(control, "REQUEST_TIMEOUT_S", 0.05)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.settimeout(10.0)
        silent.connect(daemon.config.control.socket)
        silent.sendall(b'{"command": "swi')  # and nothing more
        reply = json.loads(silent.makefile("rb").readline())
    assert reply["ok"] is False and "nothing complete within 0.05 s" in reply["error"]
    loader.answer = fake_bank("bank-new")
    assert switch(daemon, "/new.lwbank")["switched"]


def test_socket_file_mode_and_removal_at_stop(sock_dir) -> None:
    path = sock_dir / "ctl.sock"
    server = control.ControlServer(str(path), lambda bank, config: {}, quiet_log())
    server.start()
    try:
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert stat.S_IMODE(path.lstat().st_mode) == 0o660
    finally:
        server.stop()
    assert not path.exists()


def test_a_stale_socket_file_is_replaced_and_a_live_one_refused(sock_dir) -> None:
    path = sock_dir / "ctl.sock"
    crashed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    crashed.bind(str(path))  # a daemon that died without removing its socket file
    crashed.close()
    assert path.exists()
    server = control.ControlServer(str(path), lambda bank, config: {"switched": True}, quiet_log())
    server.start()
    try:
        assert request(str(path), {"command": "switch", "bank": None, "config": None}) == {"ok": True, "switched": True}
        second = control.ControlServer(str(path), lambda bank, config: {}, quiet_log())
        with pytest.raises(RuntimeError, match="in use by a running daemon"):
            second.start()
        assert request(str(path), {"command": "switch", "bank": None, "config": None})["ok"]  # untouched
    finally:
        server.stop()


def test_a_path_that_is_not_a_socket_is_left_alone(sock_dir) -> None:
    path = sock_dir / "ctl.sock"
    path.write_text("someone's file")
    with pytest.raises(RuntimeError, match="exists and is not a socket"):
        control.ControlServer(str(path), lambda bank, config: {}, quiet_log()).start()
    assert path.read_text() == "someone's file"


def test_the_daemon_does_not_start_on_a_live_socket(served) -> None:
    daemon, loader = served
    config = runtime_config()
    config.control = ControlConfig(socket=daemon.config.control.socket)
    other = Daemon(config, fake_bank("bank-x"), log=quiet_log())
    with pytest.raises(RuntimeError, match="runtime.control.socket: .* in use by a running daemon"):
        other.start()
    loader.answer = fake_bank("bank-new")
    assert switch(daemon, "/new.lwbank")["switched"]  # the first daemon still answers on it


def test_no_daemon_is_a_control_error(sock_dir) -> None:
    with pytest.raises(ControlError, match="cannot reach the daemon"):
        request(str(sock_dir / "none.sock"), {"command": "switch"})
    assert not os.path.exists(sock_dir / "none.sock")


def test_stop_wakes_the_idle_serving_thread(sock_dir) -> None:
    """The serving thread waits in select without a timeout: only stop()'s wake-up ends it, so
    a thread still alive after stop() (which joins it) means the wake-up was lost."""
    server = control.ControlServer(str(sock_dir / "ctl.sock"), lambda bank, config: {}, quiet_log())
    server.start()
    assert request(str(sock_dir / "ctl.sock"), {"command": "switch", "bank": None, "config": None}) == {"ok": True}
    server.stop()
    assert not server._thread.is_alive()
    server.stop()  # twice is harmless
