"""The acknowledged verdict channel (runtime.acked) on real sockets on loopback: the sink's ROUTER
and its thread, and DEALER subscribers written here from docs/wire-format.md. The budget runs on
a clock the test sets; waits are on the channel's own condition or a bounded receive."""

from __future__ import annotations

from typing import Any

import pytest
import zmq

from linewatch import wire
from linewatch.config import AckedConfig, ConfigError, SecurityConfig, config_from_dict
from linewatch.runtime.daemon import Daemon
from linewatch.runtime.ops.metrics import Metrics
from linewatch.runtime.sinks.acked import AckedChannel
from linewatch.runtime.transport.security import ClientKeys, generate_keys
from linewatch.wire import Verdict
from tests.logs import ListLog
from tests.runtime.fakes import FakeProcessor, quiet_log
from tests.runtime.line import Line, runtime_config

WAIT_S = 20.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Subscriber:
    """A DEALER speaking the acknowledged channel by hand."""

    def __init__(self, context: zmq.Context, url: str, keys: ClientKeys | None = None) -> None:
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, int(WAIT_S * 1000))
        self.sock.setsockopt(zmq.SNDTIMEO, int(WAIT_S * 1000))  # a DEALER with no peer blocks on send
        if keys is not None:
            keys.apply(self.sock)
        self.sock.connect(url)

    def send(self, kind: str, **header: Any) -> None:
        self.sock.send_multipart(wire.encode_acked(kind, header))

    def receive(self) -> wire.AckedMessage:
        return wire.decode_acked(self.sock.recv_multipart(), wire.ACKED_TO_SUBSCRIBER)

    def hello(self, name: str, run: str | None = None, last_seq: int | None = None) -> wire.AckedMessage:
        self.send("hello", subscriber=name, run=run, last_seq=last_seq)
        return self.receive()

    def verdict(self) -> tuple[int, Verdict]:
        message = self.receive()
        assert message.kind == "verdict", message
        return message.header["seq"], wire.decode_verdict(message.rest)

    def close(self) -> None:
        self.sock.close(0)


def verdict(i: int, value: str = "pass", capture_ts: float = 1000.0) -> Verdict:
    return Verdict(camera="cam0", frame_id=i, verdict=value, capture_ts=capture_ts, run_id="daemon-run", seq=i)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def line():
    """(channel, metrics, log, clock, context, new_subscriber) with subscribers gate1 and gate2, budget 5 s."""
    context = zmq.Context()
    metrics, log, clock = Metrics(), ListLog(), Clock(1000.0)
    config = AckedConfig(enabled=True, url="tcp://127.0.0.1:0", subscribers=["gate1", "gate2"], budget_ms=5000)
    channel = AckedChannel(config, log, metrics, clock=clock, run="r1")
    channel.start()
    subscribers: list[Subscriber] = []

    def new_subscriber() -> Subscriber:
        subscribers.append(Subscriber(context, channel.bound_url))
        return subscribers[-1]

    yield channel, metrics, log, clock, new_subscriber
    channel.stop()
    for s in subscribers:
        s.close()
    context.term()


def test_hello_verdicts_under_the_subscribers_own_seq_and_acks(line):
    channel, metrics, log, clock, new_subscriber = line
    gate1 = new_subscriber()
    welcome = gate1.hello("gate1")
    assert welcome.kind == "welcome" and welcome.header == {"v": 1, "subscriber": "gate1", "run": "r1", "resending": 0}
    assert channel.wait(lambda: channel.ledger.connected("gate1"), WAIT_S)
    assert sample(metrics, "linewatch_acked_subscriber_connected", subscriber="gate1") == 1
    assert sample(metrics, "linewatch_acked_subscriber_connected", subscriber="gate2") == 0
    for i in range(3):
        channel.publish(verdict(i, "fail" if i == 1 else "pass"))
    got = [gate1.verdict() for _ in range(3)]
    assert [(seq, v.frame_id, v.verdict, v.id) for seq, v in got] == [
        (0, 0, "pass", "daemon-run-0"), (1, 1, "fail", "daemon-run-1"), (2, 2, "pass", "daemon-run-2")]
    for seq, _ in got:
        gate1.send("ack", run="r1", seq=seq)
    assert channel.wait(lambda: channel.ledger.unacked("gate1") == 0, WAIT_S)
    assert sample(metrics, "linewatch_acked_verdicts_sent_total", subscriber="gate1") == 3
    assert sample(metrics, "linewatch_acked_verdicts_acked_total", subscriber="gate1") == 3
    assert channel.ledger.unacked("gate2") == 3  # gate2 never came: its verdicts wait for it
    assert sample(metrics, "linewatch_acked_unacked", subscriber="gate2") == 3


def test_a_subscriber_that_reconnects_gets_what_it_missed_in_order(line):
    channel, metrics, log, clock, new_subscriber = line
    first = new_subscriber()
    first.hello("gate1")
    channel.publish(verdict(0))
    seq, _ = first.verdict()
    first.send("ack", run="r1", seq=seq)
    assert channel.wait(lambda: channel.ledger.unacked("gate1") == 0, WAIT_S)
    first.close()  # gone; three verdicts come meanwhile
    for i in range(1, 4):
        channel.publish(verdict(i, "fail"))
    assert channel.wait(lambda: channel.ledger.unacked("gate1") == 3, WAIT_S)
    again = new_subscriber()
    welcome = again.hello("gate1", run="r1", last_seq=0)
    assert welcome.kind == "welcome" and welcome.header["resending"] == 3
    got = [again.verdict() for _ in range(3)]
    assert [(seq, v.frame_id, v.id) for seq, v in got] == [(i, i, f"daemon-run-{i}") for i in range(1, 4)]
    channel.publish(verdict(4))  # new ones follow the replay
    assert again.verdict()[0] == 4
    assert sample(metrics, "linewatch_acked_verdicts_resent_total", subscriber="gate1") == 3
    assert sample(metrics, "linewatch_acked_verdicts_missed_total", subscriber="gate1", reason="expired") == 0


def test_a_verdict_past_its_budget_is_counted_missed_and_not_resent(line):
    channel, metrics, log, clock, new_subscriber = line
    channel.publish(verdict(0, "fail", capture_ts=1000.0))  # of use until 1005.0; nobody connected
    channel.publish(verdict(1, "fail", capture_ts=1003.0))  # until 1008.0
    assert channel.wait(lambda: channel.ledger.unacked("gate1") == 2, WAIT_S)
    clock.now = 1005.0
    assert channel.wait(lambda: sample(metrics, "linewatch_acked_verdicts_missed_total", subscriber="gate1",
                                       reason="expired") == 1, WAIT_S)
    assert sample(metrics, "linewatch_acked_verdicts_missed_total", subscriber="gate2", reason="expired") == 1
    assert [f["seq"] for f in log.named("acked_verdict_missed") if f["subscriber"] == "gate1"] == [0]
    gate1 = new_subscriber()
    assert gate1.hello("gate1").header["resending"] == 1
    seq, v = gate1.verdict()
    assert (seq, v.frame_id) == (1, 1)  # seq 0 is gone: the subscriber sees the gap


def test_an_unknown_name_is_refused_with_one_log_line(line):
    channel, metrics, log, clock, new_subscriber = line
    stranger = new_subscriber()
    refused = stranger.hello("gate9")
    assert refused.kind == "refused" and refused.header["reason"] == "unknown_subscriber"
    assert "gate9" in refused.header["detail"] and "gate1, gate2" in refused.header["detail"]
    assert stranger.hello("gate9").kind == "refused"  # asked again: refused again, not logged again
    assert channel.wait(lambda: sample(metrics, "linewatch_acked_hellos_refused_total") == 2, WAIT_S)
    [line_] = log.named("acked_subscriber_refused")
    assert line_["subscriber"] == "gate9" and line_["configured"] == ["gate1", "gate2"]
    channel.publish(verdict(0))
    assert channel.wait(lambda: channel.ledger.unacked("gate1") == 1, WAIT_S)
    stranger.send("ping")  # not a subscriber: told to say hello, gets no verdict
    assert stranger.receive().kind == "hello_needed"


def test_a_ping_or_ack_from_a_connection_that_never_said_hello_asks_for_one(line):
    channel, metrics, log, clock, new_subscriber = line
    anonymous = new_subscriber()
    anonymous.send("ack", run="r1", seq=0)
    assert anonymous.receive().kind == "hello_needed"
    anonymous.send("ping")
    assert anonymous.receive().kind == "hello_needed"
    anonymous.sock.send_multipart([b"gibberish", b"{}"])  # a bad message: logged, nothing else
    assert anonymous.hello("gate2").kind == "welcome"
    assert log.named("acked_bad_message")


def test_the_config_refuses_a_channel_without_subscribers_and_a_budget_within_the_deadline():
    with pytest.raises(ConfigError, match="without subscribers"):
        config_from_dict({"runtime": {"acked": {"enabled": True}}})
    with pytest.raises(ConfigError, match=r"budget_ms \(1000\) is not longer than runtime.pipeline.deadline_ms \(2000\)"):
        config_from_dict({"runtime": {"acked": {"enabled": True, "subscribers": ["g"], "budget_ms": 1000}}})
    with pytest.raises(ConfigError, match="channel acked needs subscriber"):
        config_from_dict({"actuate": {"channel": "acked"}})
    with pytest.raises(ConfigError, match="channel acked needs mode connect"):
        config_from_dict({"actuate": {"channel": "acked", "subscriber": "g", "mode": "bind"}})


def test_an_address_that_cannot_be_bound_is_one_error():
    context = zmq.Context()
    taken = context.socket(zmq.ROUTER)
    taken.bind("tcp://127.0.0.1:0")
    url = taken.getsockopt_string(zmq.LAST_ENDPOINT)
    try:
        channel = AckedChannel(AckedConfig(enabled=True, url=url, subscribers=["g"]), ListLog(), Metrics())
        with pytest.raises(RuntimeError, match=f"runtime.acked: cannot bind {url}"):
            channel.start()
    finally:
        taken.close(0)
        context.term()


def test_the_daemon_feeds_the_channel_from_its_sink_list():
    """runtime.acked on: a real Daemon judges frames from a camera; the subscriber gets each
    verdict under its own seq with the daemon's verdict id, and the daemon's /metrics says so."""
    config = runtime_config()
    config.acked = AckedConfig(enabled=True, url="tcp://127.0.0.1:0", subscribers=["gate1"], budget_ms=60_000)
    daemon = Daemon(config, FakeProcessor([("net", 0.0)]), log=quiet_log())
    assert [s.name for s in daemon.sinks] == ["live", "publish", "acked"]
    daemon.start()
    line = Line(daemon)
    context = zmq.Context()
    gate1 = Subscriber(context, daemon.sinks.target("acked").bound_url)
    try:
        assert gate1.hello("gate1").kind == "welcome"
        line.warm_up()
        for i in range(4):
            line.send("cam0", i, 200 if i % 2 else 50)
        published = [line.recv(10.0) for _ in range(4)]
        assert None not in published
        got: list[tuple[int, Verdict]] = []
        while len([v for _, v in got if v.camera == "cam0"]) < 4:
            got.append(gate1.verdict())
        assert [seq for seq, _ in got] == list(range(len(got)))  # its own numbering, from 0, no gap
        cam0 = [v for _, v in got if v.camera == "cam0"]
        assert [(v.frame_id, v.verdict, v.id) for v in cam0] == [(v.frame_id, v.verdict, v.id) for v in published]
        for seq, _ in got:
            gate1.send("ack", run=daemon.sinks.target("acked").ledger.run, seq=seq)
        channel = daemon.sinks.target("acked")
        assert channel.wait(lambda: channel.ledger.unacked("gate1") == 0, WAIT_S)
        registry = daemon.metrics.registry
        assert registry.get_sample_value("linewatch_acked_verdicts_acked_total", {"subscriber": "gate1"}) == len(got)
        assert registry.get_sample_value("linewatch_acked_subscriber_connected", {"subscriber": "gate1"}) == 1
        assert b'linewatch_acked_verdicts_sent_total{subscriber="gate1"}' in daemon.metrics.exposition()
    finally:
        gate1.close()
        context.term()
        line.close()
        daemon.stop()


def test_with_curvezmq_only_allowed_subscribers_get_in(tmp_path):
    keys = {}
    for name, folder in (("server", "server"), ("gate-key", "subscribers"), ("stranger", "other")):
        public, secret = generate_keys(tmp_path / "secret" / name, name)
        (tmp_path / folder).mkdir(exist_ok=True)
        if folder == "subscribers":
            (tmp_path / folder / public.name).write_bytes(public.read_bytes())
        keys[name], keys[name + ".pub"] = secret, public
    (tmp_path / "senders").mkdir()
    (tmp_path / "senders" / "server.key").write_bytes(keys["server.pub"].read_bytes())
    security = SecurityConfig(server_secret_key=str(keys["server"]), frame_senders=str(tmp_path / "senders"),
                              verdict_subscribers=str(tmp_path / "subscribers"))
    metrics, log = Metrics(), ListLog()
    channel = AckedChannel(AckedConfig(enabled=True, url="tcp://127.0.0.1:0", subscribers=["gate1"]), log,
                           metrics, security=security, clock=Clock(1000.0), run="r1")
    channel.start()
    context = zmq.Context()
    allowed = Subscriber(context, channel.bound_url, ClientKeys.load(keys["server.pub"], keys["gate-key"]))
    stranger = Subscriber(context, channel.bound_url, ClientKeys.load(keys["server.pub"], keys["stranger"]))
    try:
        assert allowed.hello("gate1").kind == "welcome"
        try:  # refused in the CURVE handshake: its pipe may be gone before the send, which then cannot go
            stranger.sock.send_multipart(wire.encode_acked("hello", {"subscriber": "gate1", "run": None,
                                                                    "last_seq": None}), zmq.NOBLOCK)
        except zmq.Again:
            pass
        assert channel.wait(lambda: (metrics.registry.get_sample_value(
            "linewatch_connections_refused_total", {"socket": "acked", "reason": "not_allowed"}) or 0) >= 1, WAIT_S)
        channel.publish(verdict(0, "fail"))
        assert allowed.verdict()[1].id == "daemon-run-0"
        # the stranger's hello never reached the channel: gate1 is still the allowed connection
        assert [f["subscriber"] for f in log.named("acked_subscriber_hello")] == ["gate1"]
    finally:
        allowed.close()
        stranger.close()
        context.term()
        channel.stop()


def test_a_full_queue_drops_and_counts_and_never_blocks_the_feeding_thread():
    metrics, log = Metrics(), ListLog()
    # not started: nothing takes verdicts off the queue, as if the channel's thread were stuck
    channel = AckedChannel(AckedConfig(enabled=True, subscribers=["gate1"], queue_size=2), log, metrics)
    for i in range(5):
        channel.publish(verdict(i))
    assert channel.pending == 2
    assert sample(metrics, "linewatch_sink_dropped_total", sink="acked", reason="queue_full") == 3
    assert len(log.named("acked_queue_full")) == 1  # one line per 10 s, with the count held back
    channel.stop()
    assert log.named("acked_verdicts_not_sent_before_close") == [{"count": 2}]
    with pytest.raises(RuntimeError, match="after close"):
        channel.publish(verdict(5))
