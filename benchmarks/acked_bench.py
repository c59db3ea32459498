"""The acknowledged verdict channel (runtime.acked) on loopback, beside the PUB publisher.

    PYTHONPATH=. python benchmarks/acked_bench.py [--verdicts 2000] [--rate 200] [--replay 1000]

(a) what `publish()` costs the daemon's feeding thread per verdict (the sink only queues), for
    the acked channel and for the PUB publisher;
(b) publish() -> received by one subscriber in this process, p50 / p99, paced at --rate
    verdicts/s: a DEALER that acks each verdict (as `linewatch actuate` does), and a SUB;
(c) a subscriber that comes back to --replay waiting verdicts: hello -> the last of them received.

Prints figures; asserts nothing about time (no timed tests in this repository).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import zmq

from linewatch import wire
from linewatch.config import AckedConfig, PublishConfig
from linewatch.runtime.ops.metrics import Metrics
from linewatch.runtime.sinks.acked import AckedChannel
from linewatch.runtime.transport.publish import Publisher
from linewatch.wire import Verdict


class QuietLog:
    def _drop(self, *args, **kwargs) -> None:
        pass

    info = warning = error = debug = exception = _drop


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def verdicts(n: int) -> list[Verdict]:
    now = time.time()
    return [Verdict(camera="cam0", frame_id=i, verdict="fail" if i % 7 == 0 else "pass", capture_ts=now + i,
                    score=0.5, threshold=1.0, run_id="bench", seq=i) for i in range(n)]


def paced(items: list[Verdict], rate: float, publish, sent_at: dict[int, float], cost: list[float]) -> None:
    start = time.perf_counter()
    for i, v in enumerate(items):
        due = start + i / rate
        while time.perf_counter() < due:
            time.sleep(max(0.0, min(0.001, due - time.perf_counter())))
        t0 = time.perf_counter()
        sent_at[v.frame_id] = t0
        publish(v)
        cost.append(time.perf_counter() - t0)


def bench_acked(n: int, rate: float) -> dict[str, list[float]]:
    channel = AckedChannel(AckedConfig(enabled=True, url="tcp://127.0.0.1:0", subscribers=["gate1"],
                                       budget_ms=3_600_000), QuietLog(), Metrics())
    channel.start()
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(channel.bound_url)
    sock.send_multipart(wire.encode_acked("hello", {"subscriber": "gate1", "run": None, "last_seq": None}))
    welcome = wire.decode_acked(sock.recv_multipart(), wire.ACKED_TO_SUBSCRIBER)
    run = welcome.header["run"]
    received: dict[int, float] = {}

    def receive() -> None:
        while len(received) < n:
            if not sock.poll(10_000):
                return
            message = wire.decode_acked(sock.recv_multipart(), wire.ACKED_TO_SUBSCRIBER)
            if message.kind != "verdict":
                continue
            v = wire.decode_verdict(message.rest)
            received[v.frame_id] = time.perf_counter()
            sock.send_multipart(wire.encode_acked("ack", {"run": run, "seq": message.header["seq"]}))

    reader = threading.Thread(target=receive)
    reader.start()
    sent_at: dict[int, float] = {}
    cost: list[float] = []
    paced(verdicts(n), rate, channel.publish, sent_at, cost)
    reader.join(30)
    channel.wait(lambda: channel.ledger.unacked("gate1") == 0, 30)
    unacked = channel.ledger.unacked("gate1")
    sock.close(0)
    context.term()
    channel.stop()
    return {"cost": cost, "latency": [received[i] - sent_at[i] for i in received], "lost": [n - len(received)],
            "unacked": [unacked]}


def bench_pub(n: int, rate: float) -> dict[str, list[float]]:
    publisher = Publisher(PublishConfig(url="tcp://127.0.0.1:*"), QuietLog(), Metrics())
    publisher.start()
    context = zmq.Context()
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(publisher.bound_url)
    probe = Verdict(camera="probe", frame_id=0, verdict="pass", capture_ts=0.0)
    while True:  # PUB/SUB: until the subscription is through
        publisher.publish(probe)
        if sock.poll(100):
            sock.recv_multipart()
            break
    while sock.poll(100):
        sock.recv_multipart()
    received: dict[int, float] = {}

    def receive() -> None:
        while len(received) < n:
            if not sock.poll(10_000):
                return
            v = wire.decode_verdict(sock.recv_multipart())
            if v.camera == "cam0":
                received[v.frame_id] = time.perf_counter()

    reader = threading.Thread(target=receive)
    reader.start()
    sent_at: dict[int, float] = {}
    cost: list[float] = []
    paced(verdicts(n), rate, publisher.publish, sent_at, cost)
    reader.join(30)
    sock.close(0)
    context.term()
    publisher.stop()
    return {"cost": cost, "latency": [received[i] - sent_at[i] for i in received], "lost": [n - len(received)]}


def bench_replay(k: int) -> tuple[float, int]:
    channel = AckedChannel(AckedConfig(enabled=True, url="tcp://127.0.0.1:0", subscribers=["gate1"],
                                       budget_ms=3_600_000), QuietLog(), Metrics())
    channel.start()
    for v in verdicts(k):
        channel.publish(v)
    channel.wait(lambda: channel.ledger.unacked("gate1") == k, 30)
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(channel.bound_url)
    got = 0
    start = time.perf_counter()
    sock.send_multipart(wire.encode_acked("hello", {"subscriber": "gate1", "run": None, "last_seq": None}))
    while got < k and sock.poll(10_000):
        if wire.decode_acked(sock.recv_multipart(), wire.ACKED_TO_SUBSCRIBER).kind == "verdict":
            got += 1
    elapsed = time.perf_counter() - start
    sock.close(0)
    context.term()
    channel.stop()
    return elapsed, got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--verdicts", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=200.0, help="verdicts per second")
    ap.add_argument("--replay", type=int, default=1000, help="verdicts waiting for a subscriber that comes back")
    args = ap.parse_args()
    us, ms = 1e6, 1e3
    for name, bench in (("acked (DEALER, acks)", bench_acked), ("PUB (SUB)", bench_pub)):
        res = bench(args.verdicts, args.rate)
        print(f"{name}: {args.verdicts} verdicts at {args.rate:g}/s; publish() on the feeding thread p50 "
              f"{pct(res['cost'], 0.5) * us:.1f} us, p99 {pct(res['cost'], 0.99) * us:.1f} us; publish -> received "
              f"p50 {pct(res['latency'], 0.5) * ms:.3f} ms, p99 {pct(res['latency'], 0.99) * ms:.3f} ms, "
              f"mean {statistics.fmean(res['latency']) * ms:.3f} ms; not received {res['lost'][0]}"
              + (f"; unacked at the end {res['unacked'][0]}" if "unacked" in res else ""))
    elapsed, got = bench_replay(args.replay)
    print(f"replay: hello -> {got}/{args.replay} waiting verdicts received in {elapsed * ms:.1f} ms")


if __name__ == "__main__":
    main()
