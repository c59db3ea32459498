"""CurveZMQ for the frame and verdict sockets: keys, the allow-list, and counting refusals.

With `runtime.security` set, every frame socket and the verdict socket is a CURVE server
holding the daemon's key pair; a peer gets in only if it speaks CURVE with the daemon's public
key *and* its own public key is in the allowed folder (`frame_senders` for frames,
`verdict_subscribers` for verdicts). Traffic is encrypted. pyzmq's ZAP authenticator
(zmq.auth.thread.ThreadAuthenticator) checks the client keys, one per ZMQ context.

Refused handshakes are counted from socket monitor events, per socket and reason:
`linewatch_connections_refused_total{socket="frames"|"verdicts"|"acked", reason=...}` with reason
`not_allowed` (CURVE spoken, key not in the folder) or `handshake_failed` (no CURVE, the wrong
server key, garbage). A refused peer never gets a message in or out.

Keys are zmq.auth certificate files: `linewatch keys generate --dir D --name N` writes
D/N.key (public: give it to the other side) and D/N.key_secret (keep it).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from linewatch.config import SecurityConfig
from linewatch.runtime.ops.logs import RateLimiter
from linewatch.runtime.ops.metrics import Metrics

_REFUSED = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "not_allowed",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_failed",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed",
}


class SecurityError(RuntimeError):
    """A key file or folder that cannot be used; the message names it (a start-up error)."""


@dataclass(frozen=True)
class KeyPair:
    public: bytes
    secret: bytes


def generate_keys(folder: str | Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key (public) and NAME.key_secret (secret, mode 0600) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for suffix in (".key", ".key_secret"):
        if (folder / f"{name}{suffix}").exists():
            raise SecurityError(f"{folder / (name + suffix)} exists; pick another name or remove it first")
    public, secret = zmq.auth.create_certificates(folder, name)
    Path(secret).chmod(0o600)
    return Path(public), Path(secret)


def load_secret_key(path: str | Path, what: str = "runtime.security.server_secret_key") -> KeyPair:
    """The key pair from a secret certificate file."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise SecurityError(f"{what}: cannot read the secret certificate {path}: {e}") from None
    if not secret:
        raise SecurityError(f"{what}: {path} holds no secret key (that is the public .key file; use .key_secret)")
    return KeyPair(public, secret)


def load_public_key(path: str | Path, what: str = "server key") -> bytes:
    """The public key from a certificate file (public or secret)."""
    try:
        return zmq.auth.load_certificate(path)[0]
    except (OSError, ValueError) as e:
        raise SecurityError(f"{what}: cannot read the certificate {path}: {e}") from None


def allowed_keys_folder(path: str | Path, what: str) -> Path:
    """Check that an allow-list folder exists and holds at least one public certificate."""
    folder = Path(path)
    if not folder.is_dir():
        raise SecurityError(f"{what}: {folder} is not a folder of public certificates (*.key)")
    if not list(folder.glob("*.key")):
        raise SecurityError(f"{what}: {folder} holds no public certificate (*.key): nobody could connect")
    return folder


@dataclass(frozen=True)
class ClientKeys:
    """What a sender or subscriber needs: the daemon's public key and its own key pair."""

    server_public: bytes
    client: KeyPair

    @classmethod
    def load(cls, server_key: str | Path, client_secret_key: str | Path) -> "ClientKeys":
        return cls(load_public_key(server_key, "--server-key"), load_secret_key(client_secret_key, "--client-key"))

    def apply(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE client of the daemon (before connect/bind)."""
        sock.curve_publickey = self.client.public
        sock.curve_secretkey = self.client.secret
        sock.curve_serverkey = self.server_public


class CurveServer:
    """The server side for one ZMQ context: the authenticator with its allowed keys, the
    CURVE options on each socket, and a thread counting refused handshakes."""

    def __init__(self, context: zmq.Context, keys: KeyPair, allowed: Path, label: str, metrics: Metrics,
                 log: Any = None) -> None:
        self._keys = keys
        self._label = label  # "frames" or "verdicts": the metrics label and the ZAP domain
        self._metrics = metrics
        self._log = log
        self._auth = ThreadAuthenticator(context)
        self._auth.start()
        self._auth.configure_curve(domain=label, location=str(allowed))
        self._monitors: list[zmq.Socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"curve-{label}", daemon=True)
        self._refused = 0
        self._cond = threading.Condition()
        self._log_limit = RateLimiter(10.0)  # one log line per reason per 10 s

    @classmethod
    def from_config(cls, context: zmq.Context, security: SecurityConfig, label: str, metrics: Metrics,
                    log: Any = None) -> "CurveServer":
        """The server for the frame sockets (label "frames": security.frame_senders), the
        verdict socket ("verdicts": security.verdict_subscribers) or the acknowledged verdict
        channel ("acked": the same subscribers). SecurityError names a bad file."""
        key = {"frames": "frame_senders", "verdicts": "verdict_subscribers", "acked": "verdict_subscribers"}[label]
        allowed = allowed_keys_folder(getattr(security, key), f"runtime.security.{key}")
        return cls(context, load_secret_key(security.server_secret_key), allowed, label, metrics, log)

    def secure(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE server under this allow-list (before bind/connect)."""
        sock.curve_server = True
        sock.curve_publickey = self._keys.public
        sock.curve_secretkey = self._keys.secret
        sock.zap_domain = self._label.encode()
        self._monitors.append(sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                                      | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                                      | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL))

    def start(self) -> None:
        """Start counting refused handshakes (after every socket was secured)."""
        self._thread.start()

    def wait_refused(self, n: int, timeout_s: float) -> bool:
        """Wait until at least `n` handshakes were refused (for tests and diagnostics)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._refused >= n, timeout_s)

    def stop(self) -> None:
        """Stop the monitor thread and the authenticator (before the context terminates)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)
        for monitor in self._monitors:
            monitor.close(linger=0)
        self._auth.stop()

    def _watch(self) -> None:
        poller = zmq.Poller()
        for monitor in self._monitors:
            poller.register(monitor, zmq.POLLIN)
        while not self._stop.is_set():
            for monitor, _ in poller.poll(100):
                try:
                    event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
                except (zmq.ZMQError, ValueError):
                    continue
                reason = _REFUSED.get(event["event"])
                if reason is None:
                    continue
                self._metrics.connections_refused.labels(socket=self._label, reason=reason).inc()
                held_back = self._log_limit.allow(reason, time.monotonic())
                if self._log is not None and held_back is not None:
                    self._log.warning("connection refused", socket=self._label, reason=reason,
                                      endpoint=event.get("endpoint", b"").decode(errors="replace"),
                                      not_logged_since_last=held_back)
                with self._cond:
                    self._refused += 1
                    self._cond.notify_all()
