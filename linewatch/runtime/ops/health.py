"""HTTP endpoints for Prometheus and for orchestration: /metrics, /healthz, /readyz.

A stdlib ThreadingHTTPServer on its own thread: no dependency, and a slow scraper cannot
block another request. Port 0 binds a free port (`HealthServer.port` tells which).
"""

from __future__ import annotations

import selectors
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.exposition import generate_latest

from linewatch.config import MetricsConfig

# dead_threads() -> names of threads that should be alive but are not (empty: healthy)
LivenessCheck = Callable[[], list[str]]
# ready() -> (ready, why)
ReadinessCheck = Callable[[], tuple[bool, str]]
# route(path, query) -> (status, content type, body); path is the request path under the route's
# prefix (e.g. "/live/state.json"), query the part after "?" ("" without one)
Route = Callable[[str, str], tuple[int, str, bytes]]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    registry: CollectorRegistry
    liveness: LivenessCheck
    readiness: ReadinessCheck
    routes: dict[str, Route]

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that is not TLS, or hangs up mid-request, is its own problem: no traceback


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # seconds a silent client (or TLS handshake) may hold its thread

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        path, _, query = self.path.partition("?")
        try:
            route = self._route(path)
            if route is not None:
                self._send(*route(path, query))
            elif path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(self.server.registry))
            elif path == "/healthz":
                dead = self.server.liveness()
                if dead:
                    self._text(503, "dead threads: " + ", ".join(dead))
                else:
                    self._text(200, "ok")
            elif path == "/readyz":
                ok, why = self.server.readiness()
                self._text(200 if ok else 503, why)
            else:
                self._text(404, "not found; try /metrics, /healthz, /readyz")
        except Exception as e:  # noqa: BLE001 - a failing check is an unhealthy answer, not a crash
            self._text(500, f"check failed: {e!r}")

    def _route(self, path: str) -> Route | None:
        for prefix, route in self.server.routes.items():
            if path == prefix or path.startswith(prefix + "/"):
                return route
        return None

    def _text(self, code: int, body: str) -> None:
        self._send(code, "text/plain; charset=utf-8", (body + "\n").encode())

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # scrapes every few seconds must not reach the journal


def server_tls_context(config: MetricsConfig) -> ssl.SSLContext | None:
    """The HTTPS context of `config` (None: plain HTTP); RuntimeError naming the files when they do not load."""
    if not config.tls_cert_file:
        return None
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        tls.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    except (OSError, ssl.SSLError) as e:
        raise RuntimeError(f"runtime.metrics: cannot use the TLS certificate {config.tls_cert_file} "
                           f"with key {config.tls_key_file}: {e}") from None
    return tls


class HealthServer:
    """Serves /metrics from `registry`, /healthz from `liveness`, /readyz from `readiness`.

    /healthz: 200 "ok" while liveness() returns no names, else 503 naming the dead threads.
    /readyz: 200 when readiness() says ready, else 503; the body is its reason either way.
    `routes` maps a path prefix (e.g. "/live") to the handler of every path under it.
    """

    def __init__(self, config: MetricsConfig, registry: CollectorRegistry,
                 liveness: LivenessCheck = lambda: [], readiness: ReadinessCheck = lambda: (True, "ready"),
                 routes: dict[str, Route] | None = None) -> None:
        tls = server_tls_context(config)
        self._server = _Server((config.host, config.port), _Handler, bind_and_activate=True)
        if tls is not None:
            # the handshake runs in the request's own thread, so a slow client blocks nobody
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True,
                                                  do_handshake_on_connect=False)
        self.scheme = "https" if tls is not None else "http"
        self._server.registry = registry
        self._server.liveness = liveness
        self._server.readiness = readiness
        self._server.routes = dict(routes or {})
        self._server.timeout = 0  # handle_request() takes a waiting connection; it never waits itself
        self._stopping = threading.Event()
        self._wake_read, self._wake_write = socket.socketpair()  # stop() wakes the serving thread
        self._thread = threading.Thread(target=self._serve, name="lw-health", daemon=True)

    @property
    def port(self) -> int:
        """The bound TCP port (useful with port 0)."""
        return self._server.server_address[1]

    @property
    def host(self) -> str:
        """The bound address."""
        return self._server.server_address[0]

    @property
    def thread(self) -> threading.Thread:
        """The server thread."""
        return self._thread

    def start(self) -> None:
        """Serve on a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if not self._stopping.is_set():
            self._stopping.set()
            self._wake_write.send(b"!")
        if self._thread.is_alive():
            self._thread.join(2.0)
        self._server.server_close()
        if not self._thread.is_alive():
            self._wake_read.close()
            self._wake_write.close()

    def _serve(self) -> None:
        """Wait for a connection or stop()'s wake-up (socketserver's serve_forever polls for
        shutdown instead); each request is answered on a thread of its own."""
        with selectors.DefaultSelector() as selector:
            selector.register(self._server, selectors.EVENT_READ)
            selector.register(self._wake_read, selectors.EVENT_READ)
            while not self._stopping.is_set():
                if any(key.fileobj is self._server for key, _ in selector.select()) and not self._stopping.is_set():
                    self._server.handle_request()
