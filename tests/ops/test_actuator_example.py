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
    from linewatch.runtime.types import Verdict

    ex = _example()
    rec = Recorder()
    gate = ex.Gate(rec, budget_s=0.3)
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    worker = threading.Thread(target=ex.run, args=(f"tcp://127.0.0.1:{port}", gate, 2.5), daemon=True)
    worker.start()

    def send(part, verdict, reason=None):
        v = Verdict(camera="cam0", frame_id=1, verdict=verdict, capture_ts=time.time(), part_id=part, reason=reason)
        pub.send_multipart(wire.encode_verdict(v))

    try:
        deadline = time.monotonic() + 3  # PUB/SUB: wait until the subscription is live
        while "warmup" not in gate.decided and time.monotonic() < deadline:
            send("warmup", "pass")
            time.sleep(0.05)
        assert gate.decided.get("warmup") == "pass", "subscriber never got a verdict"

        for part in "ABCDEFG":
            gate.part_seen(part)
        pub.send_multipart([b"cam0", b"not json"])  # garbage is ignored, never crashes the loop
        send("A", "pass")
        send("B", "fail")
        send("C", "error", "decode_failed")
        send("D", "timeout", "deadline")
        send("E", "shed", "overload")
        # F: no verdict at all; G: its verdict comes after the budget
        time.sleep(0.6)
        send("G", "pass")
        time.sleep(0.2)
    finally:
        worker.join(6)
        pub.close()

    decided = {k: v for k, v in gate.decided.items() if k != "warmup"}
    assert decided == {"A": "pass", "B": "reject", "C": "reject", "D": "reject", "E": "reject",
                       "F": "reject", "G": "reject"}
    events = dict(e for e in rec.events if e[0] != "warmup")
    assert events["C"] == "reject:verdict error (decode_failed)"
    assert events["F"].startswith("reject:no verdict within")
    assert events["G"].startswith("reject:no verdict within"), "a late pass must not undo the reject"
