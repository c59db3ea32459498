"""The MQTT verdict sink against a real Mosquitto broker (started here, one per test, with
persistence so that sessions and retained messages survive a restart like a production broker's),
a paho subscriber in the test, and a real `linewatch serve` with `runtime.mqtt.enabled`.

Waits inside this process use conditions (the sink's and the subscriber's); the broker and the
daemon are other processes, asked through `tests.waiting.wait_until`.
"""

from __future__ import annotations

import getpass
import json
import shutil
import signal
import socket
import subprocess
import threading
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from linewatch import wire
from linewatch.config import ConfigError, MqttConfig, config_from_dict
from linewatch.runtime.metrics import Metrics
from linewatch.runtime.mqtt import MqttSink, camera_topic_level
from linewatch.wire import Verdict
from tests.test_serve import Served, free_port, sim_images, small_bank  # noqa: F401 - small_bank is a fixture
from tests.waiting import wait_until

WAIT_S = 30.0  # generous: a loaded machine is slow, never wrong


def mosquitto_path() -> str:
    """The broker binary (Debian puts it in /usr/sbin, often not on PATH), or skip saying why."""
    path = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if path is None:
        pytest.skip("mosquitto is not installed (Debian package `mosquitto`); "
                    "tests/ops/install-tools.sh installs it where it runs as root with apt-get")
    return path


class Broker:
    """A mosquitto process on a free loopback port. Its persistence file keeps the subscribers'
    sessions and the retained messages across stop()/start(), as a production broker's does."""

    def __init__(self, tmp: Path) -> None:
        self.binary = mosquitto_path()
        self.port = free_port()
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


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()


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
        self.client.reconnect_delay_set(1, 2)
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
    config = MqttConfig(enabled=True, host=host, port=broker_port, **settings)
    return MqttSink(config, log=log if log is not None else RecordingLog(), metrics=metrics or Metrics())


def dropped(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("linewatch_sink_dropped_total", {"sink": "mqtt", "reason": reason})
    return value or 0.0


def connected(metrics: Metrics) -> float | None:
    """The linewatch_mqtt_connected gauge."""
    return metrics.registry.get_sample_value("linewatch_mqtt_connected")


# ---------------------------------------------------------------- topics and config (no broker)


def test_a_camera_id_is_one_topic_level_and_can_be_read_back():
    ids = ["cam0", "line/1", "a+b", "#", "$SYS", "50%", "line%2F1", "kamera-ü 1"]
    levels = [camera_topic_level(c) for c in ids]
    assert levels[:6] == ["cam0", "line%2F1", "a%2Bb", "%23", "%24SYS", "50%25"]
    assert all(not set(level) & set("/+#$") for level in levels)
    assert len(set(levels)) == len(ids)  # "line/1" and "line%2F1" stay two cameras
    assert [urllib.parse.unquote(level) for level in levels] == ids


@pytest.mark.parametrize("mqtt, named", [
    ({"topic": "plant/+/verdict"}, "'+'"),
    ({"last_topic": "plant/#"}, "'#'"),
    ({"topic": "{camera}"}, "needs text besides {camera}"),
    ({"last_topic": "linewatch/{camera}/verdict"}, "topic and last_topic are both"),
    ({"max_queued": 70_000}, "max_queued"),
])
def test_bad_topics_are_refused_naming_the_key(mqtt, named):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"runtime": {"mqtt": mqtt}})
    assert "runtime.mqtt" in str(e.value) and named in str(e.value), str(e.value)


def test_before_start_the_queue_fills_and_the_rest_is_counted_not_raised():
    """Nothing takes from the queue before start(), so it fills deterministically."""
    metrics = Metrics()
    sink = sink_for(1, metrics=metrics, queue_size=2)
    for seq in range(5):
        sink.publish(verdict("cam0", seq))
    assert dropped(metrics, "queue_full") == 3
    assert sink.pending == 2 and sink.stats()["dropped"] == {"queue_full": 3}
    sink.stop()  # never started: nothing to flush, nothing hangs


def test_a_bad_host_name_is_a_clear_log_line_not_a_crash():
    log = RecordingLog()
    metrics = Metrics()
    sink = sink_for(1883, metrics=metrics, log=log, host="no-such-broker.invalid", qos=0)
    sink.start()  # returns at once: it connects in the background
    try:
        assert log.wait_for("mqtt_connecting")["note"].startswith("connects in the background")
        failed = log.wait_for("mqtt_connect_failed")
        assert failed is not None, log.lines
        assert "cannot resolve host name 'no-such-broker.invalid'" in failed["reason"], failed
        sink.publish(verdict("cam0", 0))  # QoS 0 while disconnected: dropped and counted
        assert sink.wait_idle(WAIT_S)
        assert dropped(metrics, "disconnected") == 1
        assert sink.dead_threads() == []
    finally:
        sink.stop()
    assert connected(metrics) == 0


# ---------------------------------------------------------------- against the broker


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_every_verdict_arrives_once_as_json_on_its_camera_topic(broker, qos):
    sub = Subscriber(broker.port, topic="linewatch/+/verdict")  # "+": the camera must be one topic level
    metrics = Metrics()
    sink = sink_for(broker.port, metrics=metrics, qos=qos)
    sent = [verdict("cam0", 0, "pass"), verdict("line/1+#", 1, "fail"), verdict("cam0", 2, "timeout"),
            verdict("line/1+#", 3, "pass"), verdict("cam0", 4, "error"), verdict("line/1+#", 5, "shed"),
            verdict("", 6, "error")]  # an error verdict for a message with no readable camera id
    try:
        sink.start()
        assert sink.wait_connected(True, WAIT_S)
        assert connected(metrics) == 1
        for v in sent:
            sink.publish(v)
        # The last message on each topic comes after the others from this one connection:
        # once both have arrived, nothing earlier is still on its way, so the count is final.
        last = {"linewatch/cam0/verdict": "run1-4", "linewatch/line%2F1%2B%23/verdict": "run1-5",
                "linewatch//verdict": "run1-6"}
        assert sub.wait(lambda: all(any(m.topic == t and json.loads(m.payload)["id"] == i for m in sub.messages)
                                    for t, i in last.items())), [m.topic for m in sub.messages]
    finally:
        sink.stop()
        sub.close()
    assert sorted(sub.ids()) == [v.id for v in sent]  # each once
    for message in sub.messages:
        assert message.qos == qos and not message.retain
        body = json.loads(message.payload)  # strict JSON
        v = next(s for s in sent if s.id == body["id"])
        assert message.topic == f"linewatch/{urllib.parse.quote(v.camera, safe='')}/verdict"
        assert {k: body[k] for k in ("camera", "frame_id", "part_id", "verdict", "score", "threshold", "reason",
                                     "capture_ts", "latency_s", "bank_id", "backend", "objects")} == {
            "camera": v.camera, "frame_id": v.frame_id, "part_id": v.part_id, "verdict": v.verdict, "score": v.score,
            "threshold": v.threshold, "reason": v.reason, "capture_ts": v.capture_ts, "latency_s": v.latency_s,
            "bank_id": v.bank_id, "backend": v.backend, "objects": v.objects}
        assert body["attachments"] == [] and len(message.payload) < 1000  # no heatmap, overlay or image bytes
        # the same JSON a ZeroMQ subscriber gets: the wire format's decoder reads it
        assert wire.decode_verdict([v.camera.encode(), message.payload]).id == v.id
    assert sink.stats()["dropped"] == {} and sink.stats()["sent"] == len(sent) + 2  # + fail and timeout on .../last


def test_a_late_subscriber_gets_the_last_fail_or_timeout_per_camera_only_on_last_topic(broker):
    sink = sink_for(broker.port, qos=1)  # retain: [fail, timeout]
    sink.start()
    for seq, (camera, value) in enumerate([("cam0", "fail"), ("cam0", "pass"), ("cam0", "timeout"), ("cam0", "pass"),
                                           ("cam1", "fail"), ("cam1", "pass"), ("cam2", "pass")]):
        sink.publish(verdict(camera, seq, value))
    sink.stop()  # waits for the broker's acknowledgements
    assert sink.stats()["dropped"] == {}

    late = Subscriber(broker.port, topic="linewatch/#")
    try:
        # The broker sends the retained messages while it handles the SUBSCRIBE; a message this
        # client publishes after its SUBACK therefore arrives after all of them.
        late.client.publish("linewatch/marker", b"end", qos=1)
        assert late.wait(lambda: any(m.topic == "linewatch/marker" for m in late.messages))
    finally:
        late.close()
    got = {m.topic: (json.loads(m.payload)["id"], json.loads(m.payload)["verdict"], m.retain)
           for m in late.messages if m.topic != "linewatch/marker"}
    assert got == {"linewatch/cam0/last": ("run1-2", "timeout", True),
                   "linewatch/cam1/last": ("run1-4", "fail", True)}  # nothing old on .../verdict


def test_broker_down_at_start_then_up_the_held_verdicts_arrive(broker, tmp_path):
    # A subscriber with a session the broker keeps (persistence file): it gets what is published
    # while it is offline, whoever connects first after the broker comes up.
    sub = Subscriber(broker.port, client_id="plc-1", clean_session=False)
    broker.stop()
    log = RecordingLog()
    metrics = Metrics()
    sink = sink_for(broker.port, metrics=metrics, log=log, qos=1)
    try:
        sink.start()  # no broker: returns at once, retries in the background
        failed = log.wait_for("mqtt_connect_failed")
        assert failed is not None and "Connection refused" in failed["reason"], log.lines
        for seq in range(3):
            sink.publish(verdict("cam0", seq))
        assert sink.wait_idle(WAIT_S)
        assert sink.pending == 3 and connected(metrics) == 0

        broker.start()
        assert sink.wait_connected(True, WAIT_S), log.lines
        assert connected(metrics) == 1
        assert sub.wait(lambda: len(sub.on("/verdict")) >= 3), broker.log()
        assert sorted(set(sub.ids())) == ["run1-0", "run1-1", "run1-2"]
        assert log.wait_for("mqtt_connected") is not None
    finally:
        sink.stop()
        sub.close()
    assert sink.stats()["dropped"] == {}


@pytest.mark.parametrize("qos", [0, 1])
def test_broker_restart_mid_stream_the_sink_reconnects_by_itself(broker, qos):
    """QoS 1: paho keeps what the broker has not acknowledged and resends it after reconnecting,
    so the verdicts published while the broker was away arrive too (at least once). QoS 0:
    those are dropped and counted; the later ones arrive."""
    sub = Subscriber(broker.port, client_id="plc-1", clean_session=False)
    metrics = Metrics()
    sink = sink_for(broker.port, metrics=metrics, qos=qos)
    try:
        sink.start()
        assert sink.wait_connected(True, WAIT_S)
        for seq in range(3):
            sink.publish(verdict("cam0", seq))
        assert sub.wait(lambda: len(sub.on("/verdict")) >= 3)

        broker.stop()
        assert sink.wait_connected(False, WAIT_S)
        assert connected(metrics) == 0
        for seq in range(3, 6):  # while the broker is away
            sink.publish(verdict("cam0", seq))
        assert sink.wait_idle(WAIT_S)

        broker.start()
        assert sink.wait_connected(True, WAIT_S), broker.log()
        assert sub.wait(lambda: sub.subscribed >= 2)  # the subscriber is back too (QoS 0 is not queued for it)
        for seq in range(6, 9):
            sink.publish(verdict("cam0", seq))
        expected = {f"run1-{s}" for s in (range(9) if qos else [*range(3), *range(6, 9)])}
        assert sub.wait(lambda: set(sub.ids()) >= expected), (sub.ids(), broker.log())
    finally:
        sink.stop()
        sub.close()
    assert set(sub.ids()) == expected
    assert dropped(metrics, "disconnected") == (0 if qos else 3)
    assert connected(metrics) == 0  # after stop


def test_a_full_paho_queue_while_the_broker_is_away_is_counted(tmp_path):
    """QoS 1 with no broker: paho holds max_queued messages, the rest are dropped and counted;
    stop() with the broker still away counts what it could not send."""
    port = free_port()  # nothing listens there
    metrics = Metrics()
    sink = sink_for(port, metrics=metrics, qos=1, max_queued=3)
    sink.start()
    for seq in range(5):
        sink.publish(verdict("cam0", seq))  # pass: one message each
    assert sink.wait_idle(WAIT_S)
    assert dropped(metrics, "broker_queue_full") == 2 and sink.pending == 3
    sink.stop(timeout_s=0.0)
    assert dropped(metrics, "unsent_at_stop") == 3
    sink.publish(verdict("cam0", 9))  # after stop: counted, never raised
    assert dropped(metrics, "stopped") == 1


def test_the_queued_verdicts_are_sent_once_started(broker):
    metrics = Metrics()
    sink = sink_for(broker.port, metrics=metrics, queue_size=2)
    sub = Subscriber(broker.port)
    try:
        for seq in range(4):
            sink.publish(verdict("cam0", seq))
        sink.start()
        assert sub.wait(lambda: len(sub.on("/verdict")) >= 2)
    finally:
        sink.stop()
        sub.close()
    assert sub.ids() == ["run1-0", "run1-1"] and dropped(metrics, "queue_full") == 2


# ---------------------------------------------------------------- a real daemon


def test_serve_with_mqtt_enabled_publishes_every_verdict_to_the_broker(small_bank, broker, tmp_path):
    sub = Subscriber(broker.port)  # before the daemon: every verdict of its run is seen here
    served = Served(tmp_path, small_bank, runtime={"mqtt": {"enabled": True, "host": "127.0.0.1", "port": broker.port}})
    try:
        served.wait_ready()
        served.warm_up("warm", lambda: served.cam.send_multipart([b"warm", b"not json", b""]))
        for i, image in enumerate(sim_images(4, seed=7)):
            served.send_frame("cam/0", i, image)  # a "/" in the camera id: one topic level all the same
        served.recv(lambda vs: sum(v.camera == "cam/0" for v in vs) >= 4, 120)
        served.proc.send_signal(signal.SIGTERM)  # stop flushes the MQTT sink
        assert served.proc.wait(60) == 0, served.log()
        zmq_verdicts = served.drain_after_exit()
        # The daemon has exited: everything it acknowledged is at the broker, on its way here.
        last_seq = max(v.seq for v in zmq_verdicts)
        assert sub.wait(lambda: len(sub.on("/verdict")) >= last_seq + 1), (len(sub.messages), served.log())
    finally:
        served.stop()
        sub.close()
    mqtt = [json.loads(m.payload) for m in sub.on("/verdict")]
    assert sorted(b["seq"] for b in mqtt) == list(range(last_seq + 1))  # every verdict of the run, once
    by_id = {b["id"]: b for b in mqtt}
    for v in zmq_verdicts:
        assert (by_id[v.id]["camera"], by_id[v.id]["frame_id"], by_id[v.id]["verdict"]) == (v.camera, v.frame_id, v.verdict)
    cam0 = [m for m in sub.on("/verdict") if m.topic == "linewatch/cam%2F0/verdict"]
    assert sorted(json.loads(m.payload)["frame_id"] for m in cam0) == [0, 1, 2, 3]
    assert all(m.qos == 1 for m in sub.messages)
    log = served.log()
    assert "mqtt_connecting" in log and "mqtt_connected" in log and "mqtt_unsent_at_stop" not in log, log
