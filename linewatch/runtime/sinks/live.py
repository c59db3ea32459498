"""The live page as a sink (`runtime.live`): linewatch.runtime.live.LiveView, served under /live."""

from __future__ import annotations

from linewatch.runtime.outcome import Outcome
from linewatch.runtime.sinks import Sink, SinkContext


class LiveSink(Sink):
    name = "live"
    wants_image = True  # a failed part's overlay is drawn from it (Outcome.overlay_jpeg, on request)

    def __init__(self, view) -> None:  # a LiveView
        self.target = view
        self.routes = {"/live": view.handle}

    def publish(self, outcome: Outcome) -> None:
        self.target.publish(outcome)


def build(context: SinkContext) -> LiveSink | None:
    if not context.config.live.enabled:
        return None
    from linewatch.runtime.live import LiveView

    return LiveSink(LiveView(context.config.live, status=context.status, clock=context.clock))
