"""Verdict sinks: every consumer of verdicts is a `VerdictSink`, built from a registry.

The daemon builds one ordered list of sinks (`build_sinks`) from `SINKS`, a registry of
factories keyed by the config section that configures each sink, in registration order; it
starts, stops, watches and feeds that list (`SinkList`) and knows no sink by name. A new sink is
one module (a factory returning a `VerdictSink`, or None when its section leaves it off) and one
`register` line below.

Order matters, and is the order of the lines below: each verdict goes to the sinks one after the
other on the pipeline's output thread. The archive comes first because its row is written (to
its journal) before the verdict leaves on ZeroMQ: a verdict an actuator acted on is never
missing from the archive after a crash (see linewatch/runtime/sinks/archive/). The others only
queue.

A sink that raises loses its copy of the verdict (counted in
`linewatch_sink_dropped_total{sink, reason="exception"}`, logged `sink_failed`), never the
verdict for the sinks after it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from linewatch.config import RuntimeConfig
from linewatch.runtime.pipeline.clock import Clock
from linewatch.runtime.ops.metrics import Metrics
from linewatch.runtime.sinks.outcome import Outcome
from linewatch.wire import Verdict

Route = Callable[[str, str], tuple[int, str, bytes]]  # (path, query) -> (status, content type, body)


class VerdictSink(Protocol):
    """What the daemon needs from a verdict consumer."""

    name: str  # its `sink` label (linewatch_sink_dropped_total) and `queue` label (linewatch_queue_depth)
    target: Any  # the object doing the work (Archive, LiveView, ...): for callers that want it
    wants_image: bool  # the pipeline attaches the frame's image for it (Outcome.image)
    wants_overlay: bool  # the pipeline renders the overlay on the stage thread (Outcome.overlay_jpeg)
    routes: dict[str, Route]  # HTTP routes it adds to the metrics server (path prefix -> handler)

    def start(self) -> None:
        """Open what it needs (raises, naming what could not be opened); before any verdict."""

    def publish(self, outcome: Outcome) -> None:
        """Take one verdict, on the pipeline's output thread: queue it, never block for long."""

    def stop(self) -> None:
        """Send or keep what is queued (bounded), then close. Idempotent; after the last verdict."""

    @property
    def pending(self) -> int | None:
        """Verdicts queued and not yet sent (the linewatch_queue_depth gauge); None: no queue."""

    def dead_threads(self) -> list[str]:
        """Its threads that died while it runs (for /healthz and the systemd watchdog)."""


class Sink:
    """Defaults for a `VerdictSink`: no picture, no routes, no queue, no threads."""

    name = "sink"
    target: Any = None
    wants_image = False
    wants_overlay = False
    routes: dict[str, Route] = {}

    def start(self) -> None:
        pass

    def publish(self, outcome: Outcome) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        pass

    @property
    def pending(self) -> int | None:
        return None

    def dead_threads(self) -> list[str]:
        return []


class Adapter(Sink):
    """A sink around an object that has start(), stop(), dead_threads() and a `pending` count
    of its own (the ZeroMQ publisher, the MQTT client, ...): only `publish` is left to write."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def start(self) -> None:
        self.target.start()

    def stop(self) -> None:
        self.target.stop()

    @property
    def pending(self) -> int | None:
        return self.target.pending

    def dead_threads(self) -> list[str]:
        return self.target.dead_threads()


@dataclass
class SinkContext:
    """What a sink factory is given: the `runtime` config (its section is in there) and the
    daemon's metrics, logger, clock and status (for the live page: bank, backend, ready)."""

    config: RuntimeConfig
    metrics: Metrics
    log: Any
    clock: Clock
    status: Callable[[], dict[str, Any]]


SinkFactory = Callable[[SinkContext], "VerdictSink | None"]  # None: its config section leaves it off

SINKS: dict[str, SinkFactory] = {}  # config section -> factory, in the order sinks are fed


def register(section: str, factory: SinkFactory, before: str | None = None) -> SinkFactory:
    """Make the sink that `section` configures part of every daemon: fed after the sinks
    registered so far, or just before the one of section `before`."""
    if section in SINKS:
        raise ValueError(f"a sink for section {section!r} is already registered")
    items = list(SINKS.items())
    if before is not None and before not in SINKS:
        raise ValueError(f"no sink is registered for section {before!r}; registered: {', '.join(SINKS)}")
    at = len(items) if before is None else list(SINKS).index(before)
    items.insert(at, (section, factory))
    SINKS.clear()
    SINKS.update(items)
    return factory


def build_sinks(context: SinkContext) -> list[VerdictSink]:
    """The sinks the config turns on, in registry order (not started)."""
    built = (factory(context) for factory in SINKS.values())
    return [sink for sink in built if sink is not None]


class SinkList:
    """The daemon's sinks as one: started in order, fed in order, stopped in reverse order."""

    def __init__(self, sinks: list[VerdictSink], metrics: Metrics, log: Any) -> None:
        self.sinks = sinks
        self._metrics = metrics
        self._log = log

    def __iter__(self) -> Iterator[VerdictSink]:
        return iter(self.sinks)

    def target(self, name: str) -> Any:
        """The object behind the sink named `name` (KeyError: none)."""
        for sink in self.sinks:
            if sink.name == name:
                return sink.target
        raise KeyError(f"no sink named {name!r}; running: {', '.join(s.name for s in self.sinks)}")

    @property
    def wants_image(self) -> bool:
        return any(s.wants_image for s in self.sinks)

    @property
    def wants_overlay(self) -> bool:
        return any(s.wants_overlay for s in self.sinks)

    @property
    def routes(self) -> dict[str, Route]:
        return {path: route for s in self.sinks for path, route in s.routes.items()}

    def start(self) -> None:
        """Start each sink and watch its queue depth; raises on the first that cannot start."""
        for sink in self.sinks:
            sink.start()
            if sink.pending is not None:
                self._metrics.track_queue(sink.name, lambda sink=sink: sink.pending)

    def publish(self, verdict: Verdict) -> None:
        """Hand one released verdict, as an Outcome, to every sink in order."""
        outcome = Outcome.of(verdict)
        for sink in self.sinks:
            try:
                sink.publish(outcome)
            except Exception as e:  # noqa: BLE001 - a sink that fails loses its copy, never the verdict
                self._metrics.sink_dropped.labels(sink=sink.name, reason="exception").inc()
                self._log.error("sink_failed", sink=sink.name, camera=verdict.camera, frame_id=verdict.frame_id,
                                error=repr(e))

    def stop(self) -> None:
        """Stop every sink, the last first; one that fails to stop is logged, the others stop."""
        for sink in reversed(self.sinks):
            try:
                sink.stop()
            except Exception as e:  # noqa: BLE001 - keep shutting down the rest
                self._log.error("close_failed", part=sink.name, error=repr(e))

    def dead_threads(self) -> list[str]:
        return [name for sink in self.sinks for name in sink.dead_threads()]


# The sinks, in the order each verdict reaches them (see the module docstring).
from linewatch.runtime.sinks import acked, live, mqtt, publish  # noqa: E402 - they use the names above
from linewatch.runtime.sinks.archive import sink as archive_sink  # noqa: E402

register("archive", archive_sink.build)
register("live", live.build)
register("publish", publish.build)
register("acked", acked.build)
register("mqtt", mqtt.build)
