"""MQTT out as a sink (`runtime.mqtt`): linewatch.runtime.sinks.mqtt_client.MqttSink."""

from __future__ import annotations

from linewatch.runtime.sinks.outcome import Outcome
from linewatch.runtime.sinks import Adapter, SinkContext


class MqttAdapter(Adapter):
    name = "mqtt"

    def publish(self, outcome: Outcome) -> None:
        self.target.publish(outcome.verdict)


def build(context: SinkContext) -> MqttAdapter | None:
    if not context.config.mqtt.enabled:
        return None
    from linewatch.runtime.sinks.mqtt_client import MqttSink  # paho: only when MQTT is on

    return MqttAdapter(MqttSink(context.config.mqtt, log=context.log, metrics=context.metrics))
