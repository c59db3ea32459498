"""The control socket: `linewatch bank switch` talks to a running daemon through it.

A Unix stream socket at `runtime.control.socket`, served by one thread, one connection at a
time (a switch takes seconds; a second switch could not run beside it anyway). One JSON
request per connection, one JSON reply, each one line:

    {"command": "switch", "bank": "/abs/path.lwbank" | null, "config": "/abs/path.yaml" | null}
    -> {"ok": true, "switched": true, "bank_id": ..., ...}      (the daemon's BankSwitch)
    -> {"ok": true, "switched": false, "reason": ..., ...}      refused: the old bank stays
    -> {"ok": false, "error": ...}                               a request it cannot read

Who may switch: whoever may open the socket file. It is created with mode 0660 (the daemon's
user and group); keep it in a directory only they can reach (systemd: RuntimeDirectory=).
A socket file left by a daemon that crashed is replaced; one a running daemon answers on is
refused with an error, as is a path that is not a socket at all.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import stat
import threading
from pathlib import Path
from typing import Any, Callable

MAX_REQUEST_BYTES = 64 * 1024  # a request is a few hundred bytes; anything longer is not one
REQUEST_TIMEOUT_S = 10.0  # a client that connects and says nothing holds the socket this long at most
# How long `request` waits for the reply: a switch that builds new models (SAM on a CPU) and
# warms them up can take minutes.
REPLY_TIMEOUT_S = 600.0
SOCKET_MODE = 0o660

# switch(bank, config) -> the reply's fields (the daemon's BankSwitch as a dict)
SwitchHandler = Callable[[str | None, str | None], dict[str, Any]]


class ControlError(Exception):
    """The daemon cannot be reached, or its reply cannot be read (the client's side)."""


class ControlServer:
    """Serves `switch` requests on a Unix socket for the daemon (`start`, `stop`, `dead_threads`)."""

    def __init__(self, path: str, switch: SwitchHandler, log: Any) -> None:
        self.path = Path(path)
        self._switch = switch
        self._log = log
        self._sock: socket.socket | None = None
        self._inode: int | None = None  # of the socket file we made: stop() removes only that one
        self._stop = threading.Event()
        self._wake_read, self._wake_write = socket.socketpair()  # stop() wakes the serving thread
        self._thread = threading.Thread(target=self._serve, name="lw-control", daemon=True)

    def start(self) -> None:
        """Create the socket file and start serving; RuntimeError (naming the path) when it cannot."""
        self._replace_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, SOCKET_MODE)
            sock.listen(8)
        except OSError as e:
            sock.close()
            raise RuntimeError(f"runtime.control.socket: cannot listen on {self.path}: {e.strerror or e}") from None
        sock.setblocking(False)  # the serving thread waits in select; accept never blocks
        self._sock = sock
        self._inode = self.path.stat().st_ino
        self._thread.start()
        self._log.info("control_socket_listening", path=str(self.path))

    def _replace_stale(self) -> None:
        """Remove a socket file no daemon answers on (left by one that crashed); refuse a live
        one and anything that is not a socket."""
        try:
            mode = self.path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise RuntimeError(f"runtime.control.socket: {self.path} exists and is not a socket; "
                               "remove it or pick another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(2.0)
        try:
            probe.connect(str(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            self.path.unlink(missing_ok=True)  # nobody listens: a crashed daemon's
            self._log.warning("control_socket_stale_replaced", path=str(self.path))
            return
        except OSError as e:
            raise RuntimeError(f"runtime.control.socket: cannot check {self.path}: {e.strerror or e}") from None
        finally:
            probe.close()
        raise RuntimeError(f"runtime.control.socket: {self.path} is in use by a running daemon; "
                           "stop that one or give this one another path")

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop serving and remove the socket file (if it is still ours). A switch in progress
        finishes on its own (it is not interrupted); this waits for it `timeout_s` at most."""
        if not self._stop.is_set():
            self._stop.set()
            self._wake_write.send(b"!")
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._sock is not None:
            self._sock.close()
        if not self._thread.is_alive():
            self._wake_read.close()
            self._wake_write.close()
        try:
            if self._inode is not None and self.path.stat().st_ino == self._inode:
                self.path.unlink()
        except FileNotFoundError:
            pass

    def dead_threads(self) -> list[str]:
        """The serving thread's name when it has died while it should run (for /healthz)."""
        if self._thread.ident is None or self._stop.is_set() or self._thread.is_alive():
            return []
        return [self._thread.name]

    # ------------------------------------------------------------------ serving

    def _serve(self) -> None:
        """Wait for a connection or stop()'s wake-up; answer one connection at a time."""
        assert self._sock is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._sock, selectors.EVENT_READ)
            selector.register(self._wake_read, selectors.EVENT_READ)
            while not self._stop.is_set():
                if not any(key.fileobj is self._sock for key, _ in selector.select()) or self._stop.is_set():
                    continue
                try:
                    conn, _ = self._sock.accept()
                except BlockingIOError:  # the client left before we took it
                    continue
                except OSError:
                    if self._stop.is_set():
                        return
                    raise
                with conn:
                    self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        """Read one request, act on it, send one reply; a bad request gets an error reply."""
        conn.settimeout(REQUEST_TIMEOUT_S)
        try:
            bank, config = parse_request(_read_line(conn))
            reply = {"ok": True, **self._switch(bank, config)}
        except ValueError as e:
            self._log.warning("control_bad_request", error=str(e))
            reply = {"ok": False, "error": str(e)}
        except Exception as e:  # noqa: BLE001 - a bug answers this client, it does not end the socket
            self._log.error("control_request_failed", error=repr(e), exc_info=e)
            reply = {"ok": False, "error": f"internal error: {e!r}"}
        try:
            conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass  # the client went away; the switch itself is logged


def _read_line(conn: socket.socket) -> bytes:
    """One message (request or reply): the bytes up to a newline or the end of the stream;
    ValueError when it is too long or does not come within the socket's timeout."""
    data = b""
    while b"\n" not in data:
        try:
            chunk = conn.recv(4096)
        except TimeoutError:
            raise ValueError(f"nothing complete within {conn.gettimeout():g} s") from None
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST_BYTES:
            raise ValueError(f"longer than {MAX_REQUEST_BYTES} bytes")
    return data.split(b"\n", 1)[0]


def parse_request(line: bytes) -> tuple[str | None, str | None]:
    """(bank, config) of a switch request; ValueError naming what is wrong."""
    try:
        request = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"the request is not JSON: {e}") from None
    if not isinstance(request, dict):
        raise ValueError(f"the request must be a JSON object, got {type(request).__name__}")
    if request.get("command") != "switch":
        raise ValueError(f"unknown command {request.get('command')!r}; the only one is 'switch'")
    unknown = sorted(set(request) - {"command", "bank", "config"})
    if unknown:
        raise ValueError(f"unknown keys {unknown}; a switch request has 'bank' and 'config'")
    for key in ("bank", "config"):
        if not isinstance(request.get(key), (str, type(None))) or request.get(key) == "":
            raise ValueError(f"{key!r} must be a file path or null, got {request.get(key)!r}")
    return request.get("bank"), request.get("config")


def request(path: str, payload: dict[str, Any], timeout_s: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
    """Send one request to the daemon's control socket and return its reply (ControlError
    when there is no daemon there, or no readable reply)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(path)
        except OSError as e:
            raise ControlError(f"cannot reach the daemon at {path}: {e.strerror or e} "
                               "(is it running, with runtime.control.socket set to this path?)") from None
        try:
            sock.sendall(json.dumps(payload).encode() + b"\n")
            reply = _read_line(sock)
        except (OSError, ValueError) as e:
            raise ControlError(f"no reply from the daemon at {path}: {e}") from None
    finally:
        sock.close()
    try:
        answer = json.loads(reply)
    except json.JSONDecodeError:
        raise ControlError(f"the daemon at {path} sent no readable reply: {reply[:200]!r}") from None
    if not isinstance(answer, dict):
        raise ControlError(f"the daemon at {path} sent no readable reply: {reply[:200]!r}")
    return answer
