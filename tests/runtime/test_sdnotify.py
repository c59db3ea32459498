"""sd_notify over a real unix datagram socket, and the watchdog interval."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid

import pytest

from linewatch.runtime.systemd import sd_notify, watchdog_interval_s


@pytest.fixture
def notify_socket():
    # A short path: unix socket paths are limited to ~108 bytes, pytest's tmp_path may not be.
    d = tempfile.mkdtemp(prefix="lwsd", dir="/tmp")
    path = os.path.join(d, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    yield path, sock
    sock.close()
    os.unlink(path)
    os.rmdir(d)


def test_sends_state_to_the_notify_socket(notify_socket) -> None:
    path, sock = notify_socket
    assert sd_notify("READY=1\nSTATUS=inspecting", env={"NOTIFY_SOCKET": path}) is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=inspecting"
    assert sd_notify("STOPPING=1", env={"NOTIFY_SOCKET": path}) is True
    assert sock.recv(4096) == b"STOPPING=1"


def test_abstract_namespace_socket() -> None:
    name = "lw-test-" + uuid.uuid4().hex
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        assert sd_notify("WATCHDOG=1", env={"NOTIFY_SOCKET": "@" + name}) is True
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        sock.close()


def test_without_systemd_it_is_a_quiet_no_op() -> None:
    assert sd_notify("READY=1", env={}) is False
    assert sd_notify("READY=1", env={"NOTIFY_SOCKET": "/nonexistent/socket"}) is False


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval_s({"WATCHDOG_USEC": "10000000"}) == 5.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}) == 5.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval_s({}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "junk"}) is None
