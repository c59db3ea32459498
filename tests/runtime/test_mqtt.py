"""The MQTT verdict sink against a real Mosquitto broker (with persistence so that sessions
and retained messages survive a restart like a production broker's: one per session for the
tests that leave it running, cleared of retained messages before each; one of its own for a
test that stops and restarts it -- tests/runtime/conftest.py), a paho subscriber in the test,
and a real `linewatch serve` with `runtime.mqtt.enabled`.

Waits inside this process use conditions (the sink's and the subscriber's); the broker and the
daemon are other processes, asked through `tests.waiting.wait_until`.
"""

from __future__ import annotations

import json
import signal
import urllib.parse

import pytest

from linewatch import wire
from linewatch.config import ConfigError, config_from_dict
from linewatch.runtime.ops.metrics import Metrics
from linewatch.runtime.sinks.mqtt_client import camera_topic_level
from tests.ports import refused_port
from tests.runtime.mqtt_broker import WAIT_S, RecordingLog, Subscriber, connected, dropped, sink_for, verdict
from tests.serving import Served, sim_images

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
    ({"reconnect_min_s": 0}, "reconnect_min_s"),
    ({"reconnect_min_s": 5, "reconnect_max_s": 2}, "reconnect_max_s 2.0 is below reconnect_min_s 5.0"),
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


def test_broker_down_at_start_then_up_the_held_verdicts_arrive(own_broker, tmp_path):
    # A subscriber with a session the broker keeps (persistence file): it gets what is published
    # while it is offline, whoever connects first after the broker comes up.
    sub = Subscriber(own_broker.port, client_id="plc-1", clean_session=False)
    own_broker.stop()
    log = RecordingLog()
    metrics = Metrics()
    sink = sink_for(own_broker.port, metrics=metrics, log=log, qos=1)
    try:
        sink.start()  # no broker: returns at once, retries in the background
        failed = log.wait_for("mqtt_connect_failed")
        assert failed is not None and "Connection refused" in failed["reason"], log.lines
        assert failed["retry"] == "every 0.05..0.2 s"  # the configured waits (mqtt_broker.RECONNECT_*_S)
        for seq in range(3):
            sink.publish(verdict("cam0", seq))
        assert sink.wait_idle(WAIT_S)
        assert sink.pending == 3 and connected(metrics) == 0

        own_broker.start()
        assert sink.wait_connected(True, WAIT_S), log.lines
        assert connected(metrics) == 1
        assert sub.wait(lambda: len(sub.on("/verdict")) >= 3), own_broker.log()
        assert sorted(set(sub.ids())) == ["run1-0", "run1-1", "run1-2"]
        assert log.wait_for("mqtt_connected") is not None
    finally:
        sink.stop()
        sub.close()
    assert sink.stats()["dropped"] == {}


@pytest.mark.parametrize("qos", [0, 1])
def test_broker_restart_mid_stream_the_sink_reconnects_by_itself(own_broker, qos):
    """QoS 1: paho keeps what the broker has not acknowledged and resends it after reconnecting,
    so the verdicts published while the broker was away arrive too (at least once). QoS 0:
    those are dropped and counted; the later ones arrive."""
    sub = Subscriber(own_broker.port, client_id="plc-1", clean_session=False)
    metrics = Metrics()
    sink = sink_for(own_broker.port, metrics=metrics, qos=qos)
    try:
        sink.start()
        assert sink.wait_connected(True, WAIT_S)
        for seq in range(3):
            sink.publish(verdict("cam0", seq))
        assert sub.wait(lambda: len(sub.on("/verdict")) >= 3)

        own_broker.stop()
        assert sink.wait_connected(False, WAIT_S)
        assert connected(metrics) == 0
        for seq in range(3, 6):  # while the broker is away
            sink.publish(verdict("cam0", seq))
        assert sink.wait_idle(WAIT_S)

        own_broker.start()
        assert sink.wait_connected(True, WAIT_S), own_broker.log()
        assert sub.wait(lambda: sub.subscribed >= 2)  # the subscriber is back too (QoS 0 is not queued for it)
        for seq in range(6, 9):
            sink.publish(verdict("cam0", seq))
        expected = {f"run1-{s}" for s in (range(9) if qos else [*range(3), *range(6, 9)])}
        assert sub.wait(lambda: set(sub.ids()) >= expected), (sub.ids(), own_broker.log())
    finally:
        sink.stop()
        sub.close()
    assert set(sub.ids()) == expected
    assert dropped(metrics, "disconnected") == (0 if qos else 3)
    assert connected(metrics) == 0  # after stop


def test_a_full_paho_queue_while_the_broker_is_away_is_counted(tmp_path):
    """QoS 1 with no broker: paho holds max_queued messages, the rest are dropped and counted;
    stop() with the broker still away counts what it could not send."""
    metrics = Metrics()
    with refused_port() as port:  # nothing listens there
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
