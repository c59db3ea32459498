"""Loopback ports for tests that run in parallel (pytest-xdist) beside other programs.

The rule: whatever can bind port 0 does, and the test reads the real port back (a ZeroMQ
socket's LAST_ENDPOINT, `HealthServer.port`, a `linewatch serve` log line, Prometheus's
"Listening on" line). "Bind port 0, close it, hand the number to a program that binds it again"
is a race: between the close and the second bind any other process -- another xdist worker's
daemon, an outgoing connection -- may be given the same port.

Two cases remain, each with a helper that has no such window:
- `reserved_port()`: for a program that must be told its port in advance and cannot report a
  port it picked (Mosquitto: several listeners on port 0 could not be told apart, and a broker
  restarted by a test must come back on the port its clients know).
- `refused_port()`: a port where nothing listens, for tests of "connection refused".
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

LOOPBACK = "127.0.0.1"


def reserved_port() -> int:
    """A loopback port left in TIME_WAIT: the kernel hands it to no bind(0) and no outgoing
    connection for about a minute, while a server that sets SO_REUSEADDR (Mosquitto, Go's
    net/http, Python's HTTPServer, libzmq) can bind it. The accepted side closes first, so the
    TIME_WAIT entry is on this port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with socket.create_connection((LOOPBACK, port)) as client:
            accepted, _ = listener.accept()
            accepted.close()  # active close on the server side: TIME_WAIT on (LOOPBACK, port)
            client.recv(1)  # the FIN has arrived: the client's close is the passive one
    return port


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port bound (so no one else gets it) but not listening: connecting is refused
    for as long as the block runs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        yield s.getsockname()[1]
