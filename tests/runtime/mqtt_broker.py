"""Helpers of the MQTT tests (tests/runtime/test_mqtt.py, test_mqtt_security.py): a real
Mosquitto broker, a paho subscriber, a recording logger, verdicts and sinks. The broker fixtures
are in tests/runtime/conftest.py: one broker per session (per xdist worker) for the tests that
leave it running, one per test for those that stop and restart it.

Waits inside this process use conditions (the sink's and the subscriber's); the broker is
another process, asked through `tests.waiting.wait_until`.
"""

from __future__ import annotations

import getpass
import json
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from linewatch.config import MqttConfig
from linewatch.runtime.ops.metrics import Metrics
from linewatch.runtime.sinks.mqtt_client import MqttSink
from linewatch.wire import Verdict
from tests.ports import reserved_port
from tests.waiting import wait_until

WAIT_S = 30.0  # generous: a loaded machine is slow, never wrong
# Reconnect waits of the sinks and subscribers here: the broker is on loopback, restarted by the
# test itself, so they retry at once rather than after the sink's defaults (1 s doubling to 10 s,
# for a plant network). Every wait for a reconnect is a wait for its state, never for a time.
RECONNECT_MIN_S, RECONNECT_MAX_S = 0.05, 0.2


def mosquitto_path() -> str:
    """The broker binary (Debian puts it in /usr/sbin, often not on PATH), or skip saying why."""
    path = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if path is None:
        pytest.skip("mosquitto is not installed (Debian package `mosquitto`); "
                    "tests/ops/install-tools.sh installs it where it runs as root with apt-get")
    return path


class Broker:
    """A mosquitto process on a loopback port of its own. Its persistence file keeps the subscribers'
    sessions and the retained messages across stop()/start(), as a production broker's does."""

    def __init__(self, tmp: Path) -> None:
        self.binary = mosquitto_path()
        self.port = reserved_port()  # fixed: a restarted broker comes back where its clients look
        self.dir = tmp / "mosquitto"
        self.dir.mkdir()
        self.log_path = self.dir / "mosquitto.log"
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.dir}/\n"
            f"user {getpass.getuser()}\n"  # as root it would switch to user mosquitto, who cannot write here
            f"log_dest file {self.log_path}\n"
        )
        self.proc: subprocess.Popen | None = None

    def running_and_clean(self) -> "Broker":
        """This broker, started again if a test stopped it, with no retained message left."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        clear_retained(self.port)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else "(no log)"

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

        def accepts() -> bool:
            assert self.proc.poll() is None, f"mosquitto exited with {self.proc.returncode}:\n{self.log()}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                return False

        assert wait_until(accepts, WAIT_S), f"mosquitto not listening on {self.port}:\n{self.log()}"

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its persistence file), and wait for the exit."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(WAIT_S)
        self.proc = None


class Subscriber:
    """A paho client in the test: subscribes to `topic` at QoS 2 (so each message arrives with
    the QoS it was published with) on every connection, and keeps every message."""

    def __init__(self, port: int, topic: str = "linewatch/#", client_id: str = "", clean_session: bool = True) -> None:
        self.topic = topic
        self.messages: list[paho.MQTTMessage] = []
        self.subscribed = 0  # subscriptions acknowledged (one per connection)
        self.cond = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
                                  protocol=paho.MQTTv311)
        self.client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)  # floats: paho computes with them
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(self.topic, qos=2)
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.wait(lambda: self.subscribed >= 1), "the test subscriber never got its SUBACK"

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        with self.cond:
            self.subscribed += 1
            self.cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        with self.cond:
            self.messages.append(message)
            self.cond.notify_all()

    def wait(self, predicate, timeout_s: float = WAIT_S) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout_s)

    def on(self, suffix: str) -> list[paho.MQTTMessage]:
        """The messages whose topic ends with `suffix`, in arrival order."""
        with self.cond:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def ids(self, suffix: str = "/verdict") -> list[str]:
        return [json.loads(m.payload)["id"] for m in self.on(suffix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class RecordingLog:
    """A logger that keeps (level, event, fields) and lets the test wait for an event."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict]] = []
        self.cond = threading.Condition()

    def _add(self, level: str, event: str, **fields: Any) -> None:
        with self.cond:
            self.lines.append((level, event, fields))
            self.cond.notify_all()

    def info(self, event: str, **fields: Any) -> None:
        self._add("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._add("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._add("error", event, **fields)

    def wait_for(self, event: str, timeout_s: float = WAIT_S) -> dict | None:
        """The fields of the first `event` logged, waiting for it up to `timeout_s` (None: never came)."""
        return self.wait_for_any(event, timeout_s=timeout_s)

    def wait_for_any(self, *events: str, timeout_s: float = WAIT_S) -> dict | None:
        """The fields of the first of `events` logged, waiting up to `timeout_s`."""
        with self.cond:
            self.cond.wait_for(lambda: any(e in events for _, e, _ in self.lines), timeout_s)
            return next((f for _, e, f in self.lines if e in events), None)


def verdict(camera: str, seq: int, value: str = "pass") -> Verdict:
    """A verdict with everything a real one carries, local pictures included (never to be sent)."""
    judged = value in ("pass", "fail")
    return Verdict(
        camera=camera, frame_id=100 + seq, verdict=value, capture_ts=1_700_000_000.0 + seq, part_id=f"P-{seq}",
        score=2.5 if judged else None, threshold=2.0 if judged else None, reason=None if judged else "deadline",
        latency_s=0.012, backend="classic", bank_id="bank-1",
        objects=[{"bbox": [1, 2, 30, 40], "status": "missing", "score": 3.5}] if judged else [],
        heatmap=np.ones((64, 64), np.float32), overlay_jpeg=b"\xff\xd8\xff" + b"x" * 5000,
        image=np.zeros((64, 64, 3), np.uint8), run_id="run1", seq=seq,
    )


def sink_for(broker_port: int, metrics: Metrics | None = None, log: Any = None, host: str = "127.0.0.1",
             **settings: Any) -> MqttSink:
    settings = {"reconnect_min_s": RECONNECT_MIN_S, "reconnect_max_s": RECONNECT_MAX_S, **settings}
    config = MqttConfig(enabled=True, host=host, port=broker_port, **settings)
    return MqttSink(config, log=log if log is not None else RecordingLog(), metrics=metrics or Metrics())


def dropped(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("linewatch_sink_dropped_total", {"sink": "mqtt", "reason": reason})
    return value or 0.0


def connected(metrics: Metrics) -> float | None:
    """The linewatch_mqtt_connected gauge."""
    return metrics.registry.get_sample_value("linewatch_mqtt_connected")


def clear_retained(port: int, topic: str = "#") -> None:
    """Delete every retained message under `topic` on the broker at `port`, so that a broker
    shared by several tests shows each test only what it published itself.

    The broker sends the retained messages while it handles the SUBSCRIBE; a message this
    client publishes after its SUBACK therefore arrives after all of them -- when all come at
    QoS 0 (a QoS 2 delivery is reported only after its PUBREL, possibly after the marker)."""
    cond = threading.Condition()
    retained: set[str] = set()
    state = {"subscribed": False, "marker": False}
    marker = "linewatch-tests/clear-retained"

    def on_subscribe(client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        with cond:
            state["subscribed"] = True
            cond.notify_all()

    def on_message(client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        with cond:
            if message.topic == marker:
                state["marker"] = True
            elif message.retain and message.payload:
                retained.add(message.topic)
            cond.notify_all()

    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe([(topic, 0), (marker, 0)])
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        with cond:
            assert cond.wait_for(lambda: state["subscribed"], WAIT_S), "no SUBACK from the broker"
        client.publish(marker, b"end", qos=0)
        with cond:
            assert cond.wait_for(lambda: state["marker"], WAIT_S), "the marker never came back"
        for name in sorted(retained):
            client.publish(name, b"", qos=1, retain=True).wait_for_publish(WAIT_S)
    finally:
        client.disconnect()
        client.loop_stop()
