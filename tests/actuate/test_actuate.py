"""`linewatch actuate` end to end on loopback: verdicts published on a ZeroMQ PUB socket by the test
-> the actuator's three threads -> the reject written to a Modbus/TCP or OPC UA server the test
started, and read back there. Waits are bounded (a condition polled with a deadline); nothing
here measures a duration: the timing rule itself is tested on a fake clock (test_gate.py)."""

from __future__ import annotations

import time
from collections import Counter as Tally
from typing import Any

import pytest
import zmq

from linewatch import wire
from linewatch.actuate.outputs import LogOutput, ModbusOutput, OpcUaOutput
from linewatch.actuate.service import Actuator
from linewatch.config import ActuateConfig
from linewatch.wire import Verdict
from tests.logs import ListLog
from tests.waiting import wait_until

pytest.importorskip("pymodbus", reason="the `line` extra (pymodbus, asyncua): pip install -e '.[line]'")
pytest.importorskip("asyncua", reason="the `line` extra (pymodbus, asyncua): pip install -e '.[line]'")

from tests.actuate.plc import ModbusPlc, OpcUaPlc  # noqa: E402 - after the extra's check

WAIT_S = 20.0
RUN = "run1"


@pytest.fixture
def publisher():
    context = zmq.Context()
    sock = context.socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:0")
    yield sock
    sock.close(0)
    context.term()


def endpoint(sock: zmq.Socket) -> str:
    return sock.getsockopt(zmq.LAST_ENDPOINT).decode()


def send(sock: zmq.Socket, frame_id: int, value: str, seq: int | None = None, camera: str = "cam0",
         capture_ts: float | None = None) -> str:
    v = Verdict(camera=camera, frame_id=frame_id, verdict=value,
                capture_ts=time.time() if capture_ts is None else capture_ts,
                run_id=RUN, seq=frame_id if seq is None else seq)
    sock.send_multipart(wire.encode_verdict(v))
    return v.id


def subscribed(sock: zmq.Socket, actuator: Actuator) -> None:
    """PUB/SUB drops what is sent before the subscription arrives: send probes (a camera the
    actuator ignores, no seq) until one gets through."""
    probe = wire.encode_verdict(Verdict(camera="probe", frame_id=0, verdict="pass", capture_ts=0.0))

    def through() -> bool:
        sock.send_multipart(probe)
        return actuator.received > 0

    assert wait_until(through, WAIT_S), "the actuator never received a verdict"


def settings(**changes: Any) -> ActuateConfig:
    # 30 ms from camera to ejector (a reject waits for it in real time: the gate's timing rule
    # itself is tested on a fake clock); a wide window so a slow test machine makes nothing late
    base = {"cameras": {"cam0": {"travel_ms": 30, "window_ms": 5000}}, "pulse_ms": 50, "retry_max_ms": 200}
    return ActuateConfig.model_validate({**base, **changes})


def sample(actuator: Actuator, name: str) -> float:
    return actuator.metrics.registry.get_sample_value(name) or 0.0


@pytest.fixture
def running():
    started: list[Actuator] = []

    def start(config: ActuateConfig, output, log: ListLog) -> Actuator:
        actuator = Actuator(config, output, log)
        actuator.check_output()
        actuator.start()
        started.append(actuator)
        return actuator

    yield start
    for actuator in started:
        actuator.stop()


def test_dry_run_decides_every_part_once_with_its_verdict_id(publisher, running):
    log = ListLog()
    config = settings(verdicts=endpoint(publisher))
    actuator = running(config, LogOutput(log), log)
    subscribed(publisher, actuator)
    values = ["pass", "fail", "pass", "timeout", "pass", "fail"]
    ids = [send(publisher, i, v) for i, v in enumerate(values)]
    # (the output logs a reject, then counts it: wait for both)
    assert wait_until(lambda: len(log.named("dry_run_reject")) == 3
                      and sample(actuator, "linewatch_actuate_rejects_total") == 3, WAIT_S), log.events
    rejected = [f["verdict_id"] for f in log.named("dry_run_reject")]
    assert rejected == [ids[1], ids[3], ids[5]]
    assert [f["verdict_id"] for f in log.named("reject_decided")] == rejected
    assert [f["reason"] for f in log.named("reject_decided")] == ["fail", "timeout", "fail"]
    decided = Tally(f["part"] for e, f in log.events if e in ("reject_decided", "pass") and f["part"] != "probe/0")
    assert decided == {f"cam0/{i}": 1 for i in range(6)}  # every frame, exactly one decision
    assert sample(actuator, "linewatch_actuate_rejects_total") == 3
    assert not log.named("alarm")


def test_a_seq_gap_and_a_skipped_frame_alarm_and_reject(publisher, running):
    log = ListLog()
    actuator = running(settings(verdicts=endpoint(publisher)), LogOutput(log), log)
    subscribed(publisher, actuator)
    send(publisher, 0, "pass", seq=0)
    gap_id = send(publisher, 2, "pass", seq=2)  # frame 1 / seq 1 never arrive
    assert wait_until(lambda: log.named("dry_run_reject"), WAIT_S), log.events
    [alarm] = log.named("alarm")
    assert (alarm["reason"], alarm["verdict_id"]) == ("seq_gap", gap_id)
    [reject] = log.named("dry_run_reject")
    assert (reject["part"], reject["reason"], reject["verdict_id"]) == ("cam0/1", "no_verdict", None)
    assert sample(actuator, "linewatch_actuate_lost_verdicts_total") == 1
    assert sample(actuator, "linewatch_actuate_watchdog_rejects_total") == 1


def test_modbus_coil_pulsed_for_each_reject(publisher, running):
    plc = ModbusPlc()
    plc.start()
    try:
        log = ListLog()
        config = settings(verdicts=endpoint(publisher), output="modbus",
                          modbus={"host": "127.0.0.1", "port": plc.port, "reject_coil": 3, "alarm_coil": 4})
        actuator = running(config, ModbusOutput(config.modbus), log)
        assert actuator.worker.connected
        subscribed(publisher, actuator)
        send(publisher, 0, "fail")
        send(publisher, 1, "pass")
        send(publisher, 2, "shed")
        # each reject sets the coil; the pulse ends with it cleared
        # (the PLC sees a write before the actuator has its reply and times it: wait for both)
        assert wait_until(lambda: plc.coil_writes(3).count(True) == 2 and plc.coil_writes(3)[-1] is False
                          and sample(actuator, "linewatch_actuate_plc_write_seconds_count") >= 3, WAIT_S), plc.writes
        assert plc.coil_writes(4) == []  # no alarm
        assert sample(actuator, "linewatch_actuate_rejects_total") == 2
    finally:
        plc.stop()


def test_opcua_reject_bit_and_verdict_tags(publisher, running):
    plc = OpcUaPlc()
    plc.start()
    try:
        log = ListLog()
        config = settings(verdicts=endpoint(publisher), output="opcua",
                          opcua={"url": plc.url, "reject_node": plc.node_id("Reject"), "alarm_node": plc.node_id("Alarm"),
                                 "verdict_id_node": plc.node_id("VerdictId"), "reason_node": plc.node_id("Reason")})
        actuator = running(config, OpcUaOutput(config.opcua), log)
        assert actuator.worker.connected
        subscribed(publisher, actuator)
        send(publisher, 0, "pass")
        vid = send(publisher, 1, "fail")
        assert wait_until(lambda: plc.value("VerdictId") == vid and ("Reject", True) in plc.changes
                          and plc.value("Reject") is False, WAIT_S), plc.changes
        assert plc.value("Reason") == "fail"
        assert plc.value("Alarm") is False
    finally:
        plc.stop()


def test_plc_stopped_and_restarted_counts_and_recovers(publisher, running):
    plc = ModbusPlc()
    plc.start()
    try:
        log = ListLog()
        config = settings(verdicts=endpoint(publisher), output="modbus",
                          modbus={"host": "127.0.0.1", "port": plc.port, "reject_coil": 3, "alarm_coil": 4,
                                  "timeout_ms": 300})
        actuator = running(config, ModbusOutput(config.modbus), log)
        subscribed(publisher, actuator)
        send(publisher, 0, "fail")
        # the pulse done: its set and its clear answered (the PLC received them and the actuator got the replies)
        assert wait_until(lambda: sample(actuator, "linewatch_actuate_plc_write_seconds_count") >= 2, WAIT_S), plc.writes
        assert plc.coil_writes(3) == [False, True, False]  # the safe state written at start, then the pulse
        plc.stop()
        missed_id = send(publisher, 1, "fail")
        assert wait_until(lambda: sample(actuator, "linewatch_actuate_missed_rejects_total") >= 1
                          and sample(actuator, "linewatch_actuate_plc_write_failures_total") >= 1, WAIT_S), log.events
        assert sample(actuator, "linewatch_actuate_plc_connected") == 0
        assert [f["verdict_id"] for f in log.named("reject_missed_plc_unreachable")] == [missed_id]
        plc.writes.clear()
        plc.start()  # the same port: the PLC is back
        assert wait_until(lambda: sample(actuator, "linewatch_actuate_plc_connected") == 1, WAIT_S), log.events
        # the missed reject raised the alarm coil; the next reject is written again
        assert wait_until(lambda: True in plc.coil_writes(4), WAIT_S), plc.writes
        send(publisher, 2, "fail")
        assert wait_until(lambda: True in plc.coil_writes(3), WAIT_S), plc.writes
    finally:
        plc.stop()


def test_opcua_server_stopped_and_restarted_counts_and_recovers(publisher, running):
    plc = OpcUaPlc()
    plc.start()
    log = ListLog()
    config = settings(verdicts=endpoint(publisher), output="opcua",
                      opcua={"url": plc.url, "reject_node": plc.node_id("Reject"), "alarm_node": plc.node_id("Alarm"),
                             "verdict_id_node": plc.node_id("VerdictId"), "timeout_ms": 1000})
    actuator = running(config, OpcUaOutput(config.opcua), log)
    subscribed(publisher, actuator)
    plc.stop()
    missed_id = send(publisher, 0, "fail")
    assert wait_until(lambda: sample(actuator, "linewatch_actuate_missed_rejects_total") >= 1, WAIT_S), log.events
    assert sample(actuator, "linewatch_actuate_plc_connected") == 0
    assert [f["verdict_id"] for f in log.named("reject_missed_plc_unreachable")] == [missed_id]
    plc = OpcUaPlc(port=plc.port)  # a fresh server on the same address
    plc.start()
    try:
        assert wait_until(lambda: sample(actuator, "linewatch_actuate_plc_connected") == 1, WAIT_S), log.events
        assert wait_until(lambda: plc.value("Alarm") is True, WAIT_S)  # the missed reject raised the alarm
        vid = send(publisher, 1, "fail")
        assert wait_until(lambda: plc.value("VerdictId") == vid and ("Reject", True) in plc.changes, WAIT_S), plc.changes
    finally:
        plc.stop()
