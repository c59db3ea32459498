"""`linewatch actuate` on the acknowledged channel (actuate.channel: acked): the daemon's side is a
real AckedChannel (runtime.acked) on loopback. Every verdict is acked once the decision thread has
it; an actuator that stops and starts again gets the verdicts it missed and rejects the failed
part among them. Waits are bounded (the channel's condition, or a poll of another process's log)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter as Tally
from pathlib import Path
from typing import Any

import pytest
import yaml
import zmq

from linewatch import wire
from linewatch.actuate.acked import AckedSubscriber
from linewatch.actuate.outputs import LogOutput
from linewatch.actuate.service import Actuator
from linewatch.config import AckedConfig, ActuateConfig
from linewatch.runtime.ops.metrics import Metrics
from linewatch.runtime.sinks.acked import AckedChannel
from linewatch.wire import Verdict
from tests.logs import ListLog
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 20.0


def verdict(frame_id: int, value: str) -> Verdict:
    return Verdict(camera="cam0", frame_id=frame_id, verdict=value, capture_ts=time.time(), run_id="run1", seq=frame_id)


@pytest.fixture
def channel():
    metrics = Metrics()
    config = AckedConfig(enabled=True, url="tcp://127.0.0.1:0", subscribers=["gate1"], budget_ms=60_000)
    ch = AckedChannel(config, ListLog(), metrics)
    ch.start()
    yield ch, metrics
    ch.stop()


def actuate_settings(url: str) -> ActuateConfig:
    # 0.15 s from camera to ejector; a wide window so a slow test machine makes nothing late
    return ActuateConfig.model_validate({"verdicts": url, "channel": "acked", "subscriber": "gate1",
                                         "cameras": {"cam0": {"travel_ms": 150, "window_ms": 30_000}}, "pulse_ms": 20})


def test_the_actuator_acks_what_it_decides_and_after_a_restart_gets_what_it_missed(channel):
    ch, metrics = channel
    log = ListLog()
    first = Actuator(actuate_settings(ch.bound_url), LogOutput(log), log)
    first.check_output()
    first.start()
    try:
        assert ch.wait(lambda: ch.ledger.connected("gate1"), WAIT_S)
        for i, value in enumerate(["pass", "fail", "pass"]):
            ch.publish(verdict(i, value))
        assert ch.wait(lambda: ch.ledger.unacked("gate1") == 0
                       and metrics.registry.get_sample_value("linewatch_acked_verdicts_acked_total",
                                                             {"subscriber": "gate1"}) == 3, WAIT_S)
        assert first.received == 3
    finally:
        first.stop()
    # the actuator is down: these wait in the daemon's buffer
    ch.publish(verdict(3, "pass"))
    ch.publish(verdict(4, "fail"))
    assert ch.wait(lambda: ch.ledger.unacked("gate1") == 2, WAIT_S)
    log2 = ListLog()
    second = Actuator(actuate_settings(ch.bound_url), LogOutput(log2), log2)
    second.check_output()
    second.start()
    try:
        assert ch.wait(lambda: ch.ledger.unacked("gate1") == 0, WAIT_S)
        # acked once handed to the decision thread: its decision may be logged a moment later
        assert wait_until(lambda: log2.named("reject_decided"), WAIT_S)
        assert [(f["verdict_id"], f["reason"]) for f in log2.named("reject_decided")] == [("run1-4", "fail")]
        assert second.received == 2  # only what it missed
        [welcome] = log2.named("acked_welcome")
        assert welcome["resending"] == 2
    finally:
        second.stop()
    assert [(f["verdict_id"], f["reason"]) for f in log.named("reject_decided")] == [("run1-1", "fail")]
    assert metrics.registry.get_sample_value("linewatch_acked_verdicts_resent_total", {"subscriber": "gate1"}) == 2


def test_a_verdict_that_comes_twice_is_decided_once(channel):
    """The same verdict (same id) twice on the channel, under two seqs: the gate ignores the
    second, and both are acked."""
    ch, metrics = channel
    log = ListLog()
    actuator = Actuator(actuate_settings(ch.bound_url), LogOutput(log), log)
    actuator.start()
    try:
        assert ch.wait(lambda: ch.ledger.connected("gate1"), WAIT_S)
        again = verdict(0, "fail")
        ch.publish(again)
        ch.publish(again)
        assert ch.wait(lambda: metrics.registry.get_sample_value("linewatch_acked_verdicts_acked_total",
                                                                 {"subscriber": "gate1"}) == 2, WAIT_S)
        decided = Tally()
        assert wait_until(lambda: actuator.metrics.registry.get_sample_value(
            "linewatch_actuate_decisions_total", {"action": "ignored"}) == 1, WAIT_S)
        for action in ("reject", "ignored"):
            decided[action] = actuator.metrics.registry.get_sample_value("linewatch_actuate_decisions_total",
                                                                         {"action": action})
        assert decided == {"reject": 1, "ignored": 1}
        assert actuator.gate.counts["duplicates"] == 1
    finally:
        actuator.stop()


def test_an_actuator_with_an_unknown_name_logs_the_refusal_once(channel):
    """The whole actuator: refused, it logs why and gets no verdict. (That it says hello again
    each heartbeat and logs the refusal only once: the fake-clock test below.)"""
    ch, metrics = channel
    log = ListLog()
    settings = actuate_settings(ch.bound_url)
    settings.subscriber = "gate7"
    actuator = Actuator(settings, LogOutput(log), log)
    actuator.start()
    try:
        assert ch.wait(lambda: (metrics.registry.get_sample_value("linewatch_acked_hellos_refused_total") or 0) >= 1,
                       WAIT_S)
        ch.publish(verdict(0, "fail"))
        assert ch.wait(lambda: ch.ledger.unacked("gate1") == 1, WAIT_S)
    finally:
        actuator.stop()
    [refused] = log.named("acked_refused")
    assert refused["reason"] == "unknown_subscriber" and "gate7" in refused["detail"]
    assert actuator.received == 0


def test_a_refused_subscriber_says_hello_once_each_heartbeat_and_logs_the_refusal_once(channel):
    """The actuator's side of the channel (what its socket thread runs) on a fake clock, against
    the real channel: each heartbeat brings exactly one more hello, each is refused, and the
    refusal is logged once."""
    ch, metrics = channel
    now = [0.0]
    log = ListLog()
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    AckedSubscriber.prepare(sock)  # a hello goes out only on a finished connection
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    sock.connect(ch.bound_url)
    subscriber = AckedSubscriber(sock, "gate7", log, clock=lambda: now[0])

    def refused() -> float:
        return metrics.registry.get_sample_value("linewatch_acked_hellos_refused_total") or 0

    def turn_until(predicate) -> bool:
        """The socket thread's loop (beat, then what arrives), the fake clock standing still."""
        end = time.monotonic() + WAIT_S
        while not predicate():
            if time.monotonic() > end:
                return False
            subscriber.beat()
            if sock.poll(10):
                subscriber.receive(sock.recv_multipart())
        return True

    try:
        assert monitor.poll(WAIT_S * 1000)  # connected: the first beat's hello is sent, not retried
        for heartbeat in range(3):
            now[0] = heartbeat * wire.ACKED_HEARTBEAT_S
            assert turn_until(lambda: refused() == heartbeat + 1 and subscriber.refused), (heartbeat, refused())
        assert refused() == 3
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)
        context.term()
    [line] = log.named("acked_refused")
    assert line["reason"] == "unknown_subscriber" and "gate7" in line["detail"]
    assert not subscriber.welcomed


class Process:
    """`linewatch actuate` in its own process, its JSON log lines collected by a thread."""

    def __init__(self, config: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-m", "linewatch.cli", "actuate", "-c", config],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in list(self.lines):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == name:
                out.append(record)
        return out

    def wait_for(self, name: str, count: int = 1) -> list[dict[str, Any]]:
        def seen() -> list[dict[str, Any]] | None:
            if self.proc.poll() is not None and len(self.events(name)) < count:
                raise AssertionError("".join(self.lines))
            found = self.events(name)
            return found if len(found) >= count else None

        found = wait_until(seen, 60)
        assert found, "".join(self.lines)
        return found

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._reader.join(10)


@pytest.mark.system
def test_linewatch_actuate_killed_and_restarted_gets_the_verdicts_it_missed(channel, tmp_path):
    ch, metrics = channel
    config = tmp_path / "line.yaml"
    config.write_text(yaml.safe_dump({
        "runtime": {"pipeline": {"deadline_ms": 100}},
        "actuate": {"verdicts": ch.bound_url, "channel": "acked", "subscriber": "gate1", "pulse_ms": 20,
                    "cameras": {"cam0": {"travel_ms": 150, "window_ms": 60_000}}, "metrics": {"port": 0}}}))
    first = Process(str(config))
    try:
        first.wait_for("acked_welcome")
        ch.publish(verdict(0, "fail"))
        first.wait_for("dry_run_reject")
        assert ch.wait(lambda: ch.ledger.unacked("gate1") == 0, WAIT_S)
    finally:
        first.kill()  # kill -9: no goodbye
    ch.publish(verdict(1, "pass"))
    ch.publish(verdict(2, "fail"))
    assert ch.wait(lambda: ch.ledger.unacked("gate1") == 2, WAIT_S)
    second = Process(str(config))
    try:
        [welcome] = second.wait_for("acked_welcome")
        assert welcome["resending"] == 2
        [reject] = second.wait_for("dry_run_reject")
        assert (reject["verdict_id"], reject["reason"]) == ("run1-2", "fail")
        assert ch.wait(lambda: ch.ledger.unacked("gate1") == 0, WAIT_S)
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(30) == 0
        [stopping] = second.events("stopping")
        assert stopping["verdicts_received"] == 2 and stopping["rejects"] == 1
    finally:
        second.kill()
    missed = metrics.registry.get_sample_value("linewatch_acked_verdicts_missed_total",
                                               {"subscriber": "gate1", "reason": "expired"})
    assert not missed
