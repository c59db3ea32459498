"""systemd glue: readiness/stopping notifications and the watchdog's pings.

`sd_notify` sends a datagram to $NOTIFY_SOCKET: the whole protocol, so no libsystemd binding is
needed. `Watchdog` pings WATCHDOG=1 every half $WATCHDOG_USEC while its check says healthy: a
stuck daemon gets no ping, and systemd restarts it.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable


def sd_notify(state: str, env: dict[str, str] | None = None) -> bool:
    """Send `state` (e.g. "READY=1", "WATCHDOG=1", "STOPPING=1") to systemd.

    Uses $NOTIFY_SOCKET (a filesystem path, or "@name" for the abstract namespace). Returns
    False when there is no socket to notify (not run by systemd) or the send failed; never
    raises, since a missing supervisor must not stop the line.
    """
    env = os.environ if env is None else env
    addr = env.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(state.encode())
        return True
    except OSError:
        return False


def watchdog_interval_s(env: dict[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of $WATCHDOG_USEC, or None when not enabled.

    $WATCHDOG_PID, when set, must be this process (systemd sets it for the main PID only).
    """
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2 / 1e6 if value > 0 else None


class Watchdog:
    """A thread calling `check()` (which sends WATCHDOG=1 when healthy) every half watchdog
    interval, when systemd asked for a watchdog; nothing otherwise."""

    def __init__(self, check: Callable[[], object]) -> None:
        self.interval_s: float | None = None  # read from the environment at start()
        self._check = check
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.interval_s = watchdog_interval_s()
        if self.interval_s:
            self._thread = threading.Thread(target=self._loop, name="lw-watchdog", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """No ping after this returns (call it before STOPPING=1)."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(2.0)

    def _loop(self) -> None:
        while not self._stopped.wait(self.interval_s):
            self._check()
