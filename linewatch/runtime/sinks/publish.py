"""The verdict publisher as a sink (`runtime.publish`): the class `publish.protocol` names
(linewatch.runtime.transport.VERDICT_PUBLISHERS; ZeroMQ PUB for "linewatch")."""

from __future__ import annotations

from linewatch.runtime.sinks.outcome import Outcome
from linewatch.runtime.sinks import Adapter, SinkContext
from linewatch.runtime.transport import verdict_publisher


class PublishSink(Adapter):
    name = "publish"

    def __init__(self, publisher, overlay: bool) -> None:
        super().__init__(publisher)
        self.wants_overlay = overlay  # `publish.overlay_jpeg`: rendered before the verdict is released

    def publish(self, outcome: Outcome) -> None:
        self.target.publish(outcome.verdict)  # the wire encoding never carries the image


def build(context: SinkContext) -> PublishSink:
    c = context.config
    return PublishSink(verdict_publisher(c.publish, context.log, context.metrics, c.security), c.publish.overlay_jpeg)
