"""deploy/examples/reject_actuator.py (quoted in docs/actuators.md): real verdict messages from
linewatch.wire over a loopback ZeroMQ PUB socket; only `pass` lets a part through, every other
verdict and a missing verdict reject it."""

from __future__ import annotations

import importlib.util
import sys
import threading
import time

import pytest

from ._tools import DEPLOY

import zmq


def _example():
    spec = importlib.util.spec_from_file_location("reject_actuator", DEPLOY / "examples" / "reject_actuator.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look the module up
    spec.loader.exec_module(mod)
    return mod


class Recorder:
    def __init__(self):
        self.events: list[tuple[str, str]] = []

    def reject(self, part, why):
        self.events.append((part, "reject:" + why))

    def let_through(self, part):
        self.events.append((part, "pass"))


def test_gate_is_fail_safe():
    from linewatch import wire
    from linewatch.wire import Verdict
    from tests.waiting import wait_until

    ex = _example()
    rec = Recorder()
    now = [0.0]  # the gate's clock: moves only when the test says so
    gate = ex.Gate(rec, budget_s=0.3, clock=lambda: now[0])
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()
    worker = threading.Thread(target=ex.run, args=(f"tcp://127.0.0.1:{port}", gate, stop), daemon=True)
    worker.start()
    seq = iter(range(1000))

    def send(part, verdict, reason=None, skip=0):
        for _ in range(skip):
            next(seq)  # verdicts lost on the way
        v = Verdict(camera="cam0", frame_id=1, verdict=verdict, capture_ts=time.time(), part_id=part, reason=reason,
                    run_id="run1", seq=next(seq))
        pub.send_multipart(wire.encode_verdict(v))

    def sent_and_seen(part):
        send(part, "pass")
        return part in gate.decided

    try:
        # PUB/SUB: resend until the subscription is live
        assert wait_until(lambda: sent_and_seen("warmup"), 10.0), "subscriber never got a verdict"
        for part in "ABCDEFG":
            gate.part_seen(part)
        pub.send_multipart([b"cam0", b"not json"])  # garbage is ignored, never crashes the loop
        send("A", "pass")
        send("B", "fail")
        send("C", "error", "decode_failed")
        send("D", "timeout", "deadline")
        send("E", "shed", "overload", skip=2)  # two verdicts before E were lost
        assert wait_until(lambda: "E" in gate.decided, 10.0)  # in order: A-D are decided too
        # F: no verdict at all; G: its verdict comes after the budget
        now[0] += 0.31
        assert wait_until(lambda: "F" in gate.decided, 10.0)  # the loop checks the budget
        send("G", "pass")
        assert wait_until(lambda: sent_and_seen("marker"), 10.0)  # G's verdict has been handled
    finally:
        stop.set()
        worker.join(6)
        pub.close()
    assert not worker.is_alive()

    decided = {k: v for k, v in gate.decided.items() if k not in ("warmup", "marker")}
    assert decided == {"A": "pass", "B": "reject", "C": "reject", "D": "reject", "E": "reject",
                       "F": "reject", "G": "reject"}
    events = dict(e for e in rec.events if e[0] not in ("warmup", "marker"))
    assert events["C"] == "reject:verdict error (decode_failed)"
    assert events["F"].startswith("reject:no verdict within")
    assert events["G"].startswith("reject:no verdict within"), "a late pass must not undo the reject"
    assert gate.lost == 2
