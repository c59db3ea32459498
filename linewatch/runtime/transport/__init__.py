"""What the daemon needs from the things that bring frames in and send verdicts on.

The daemon is typed against these two protocols, never against a socket library:

* `FrameSource` (linewatch.runtime.transport.ingest.Ingest): receives frames on the configured
  endpoints; each endpoint speaks one frame protocol (a class per protocol, chosen by
  `runtime.ingest.endpoints[].protocol` through `linewatch.runtime.transport.ingest.FRAME_PROTOCOLS`).
* `VerdictPublisher` (linewatch.runtime.transport.publish.Publisher): sends every verdict on; chosen by
  `runtime.publish.protocol` through `VERDICT_PUBLISHERS` below. The daemon feeds it as one
  of its verdict sinks (linewatch.runtime.sinks.publish), like the archive, the live page and
  MQTT.

Both: `start()` opens what they need (errors raise there, naming what could not be opened),
`stop()` is idempotent and prompt, `dead_threads()` names threads that died while running
(for /healthz and the systemd watchdog), `stats()` returns plain counters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from linewatch.config import PublishConfig, SecurityConfig
from linewatch.runtime.ops.metrics import Metrics
from linewatch.wire import Verdict


class FrameSource(Protocol):
    bound_urls: list[str]  # resolved endpoints (ports filled in), once started

    def start(self) -> None: ...

    def stop(self, timeout_s: float = 5.0) -> None: ...

    def dead_threads(self) -> list[str]: ...

    def stats(self) -> dict[str, Any]: ...


class VerdictPublisher(Protocol):
    bound_url: str

    def start(self) -> None: ...

    def publish(self, verdict: Verdict) -> None:
        """Queue one verdict; never blocks the caller."""

    def stop(self, timeout_s: float = 2.0) -> None:
        """Send what is queued (up to `timeout_s`), then close."""

    def dead_threads(self) -> list[str]: ...

    def stats(self) -> dict[str, Any]: ...

    @property
    def pending(self) -> int:
        """Verdicts queued and not yet sent (a metrics gauge)."""


def verdict_publisher(config: PublishConfig, log: Any, metrics: Metrics, security: SecurityConfig) -> VerdictPublisher:
    """The publisher `config.protocol` names (not started)."""
    return VERDICT_PUBLISHERS[config.protocol](config, log, metrics, security)


def _zmq_pub(config: PublishConfig, log: Any, metrics: Metrics, security: SecurityConfig) -> VerdictPublisher:
    from linewatch.runtime.transport.publish import Publisher

    return Publisher(config, log=log, metrics=metrics, security=security)


VERDICT_PUBLISHERS: dict[str, Callable[[PublishConfig, Any, Metrics, SecurityConfig], VerdictPublisher]] = {
    "linewatch": _zmq_pub,  # wire-format verdict messages on a ZeroMQ PUB socket
}
