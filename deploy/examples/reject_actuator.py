"""Drive a reject actuator from linewatch verdicts, fail-safe (docs/actuators.md).

Only `pass` lets a part through. `fail` rejects it; `error`, `timeout` and `shed` mean the part
was NOT inspected, so they reject it too. A part the line's trigger saw but that gets no verdict
within the budget is rejected as well (daemon down, network cut, message lost): silence never
lets a part through.

Needs only pyzmq (no linewatch install) and speaks wire format v1 (docs/wire-format.md):
each verdict is [topic = camera id, JSON header, attachments...].

Run:  python reject_actuator.py --verdicts tcp://inspection-pc:5556 --budget 1.5
Replace `Actuator` with your I/O (a PLC output, a GPIO pin, a Modbus coil, ...). The part
trigger here is simulated from the verdict stream's frame ids only for the demo; on a line it
comes from the same sensor that triggers the camera (`Gate.part_seen`).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import zmq

LET_THROUGH = {"pass"}  # everything else -- fail, error, timeout, shed, unknown -- rejects
REMEMBERED = 100_000  # decided parts kept (to ignore late verdicts); older ones are forgotten


class Actuator:
    """Stub of the reject output. Replace both methods with real I/O."""

    def reject(self, part: str, why: str) -> None:
        print(f"REJECT {part}: {why}", flush=True)

    def let_through(self, part: str) -> None:
        print(f"pass   {part}", flush=True)


@dataclass
class Gate:
    """Decides each part once: by its verdict, or by the budget running out."""

    actuator: Actuator
    budget_s: float
    clock: Callable[[], float] = time.monotonic
    waiting: dict[str, float] = field(default_factory=dict)  # part key -> time it was seen
    decided: OrderedDict[str, str] = field(default_factory=OrderedDict)  # part key -> "pass" / "reject"
    lost: int = 0  # verdicts lost on the way (gaps in `seq`): alarm on it
    _run: str | None = None
    _next_seq: int = 0

    def _decide(self, key: str, decision: str) -> None:
        self.decided[key] = decision
        if len(self.decided) > REMEMBERED:
            self.decided.popitem(last=False)

    def part_seen(self, key: str) -> None:
        """The trigger saw a part at the camera: its verdict is due within the budget."""
        if key not in self.decided:
            self.waiting.setdefault(key, self.clock())

    def on_verdict(self, header: dict) -> None:
        self._count_lost(header)
        key = part_key(header)
        if key in self.decided:
            return  # already rejected by the watchdog: a late verdict changes nothing
        self.waiting.pop(key, None)
        verdict = header.get("verdict")
        if verdict in LET_THROUGH:
            self._decide(key, "pass")
            self.actuator.let_through(key)
        else:
            self._decide(key, "reject")
            reason = f" ({header['reason']})" if header.get("reason") else ""
            self.actuator.reject(key, f"verdict {verdict}{reason}")

    def check_budget(self) -> None:
        """Reject every part whose verdict is overdue. Call it often (every few ms)."""
        now = self.clock()
        for key, seen in list(self.waiting.items()):
            if now - seen > self.budget_s:
                del self.waiting[key]
                self._decide(key, "reject")
                self.actuator.reject(key, f"no verdict within {self.budget_s:.3g} s")

    def _count_lost(self, header: dict) -> None:
        """Verdicts are numbered 0, 1, 2, ... per daemon run (`run_id`, `seq`): a gap means
        verdicts were lost on the way (the parts they were for are rejected by the budget)."""
        run, seq = header.get("run_id"), header.get("seq")
        if not isinstance(run, str) or not isinstance(seq, int):
            return
        if run != self._run:  # first verdict seen, or the daemon restarted
            self._run, self._next_seq = run, seq + 1
            return
        if seq > self._next_seq:
            self.lost += seq - self._next_seq
            print(f"ALARM {seq - self._next_seq} verdict(s) lost before {header.get('id')}", flush=True)
        self._next_seq = max(self._next_seq, seq + 1)


def part_key(header: dict) -> str:
    """A part's identity: part_id when the sender sets one, else camera/frame_id (imagezmq
    frames get receive-time ids from linewatch, which do not repeat across restarts)."""
    if header.get("part_id"):
        return str(header["part_id"])
    return f"{header.get('camera')}/{header.get('frame_id')}"


def decode(parts: list[bytes]) -> dict | None:
    """The header of a v1 verdict message, or None for anything unreadable (never raises)."""
    try:
        header = json.loads(parts[1])
    except (IndexError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(header, dict) or header.get("v") != 1:
        return None
    return header


def run(url: str, gate: Gate, stop: threading.Event | None = None, poll_ms: int = 5) -> None:
    """Decide parts from the verdicts at `url` until `stop` is set (for ever without one)."""
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    # All cameras: the loss count needs every verdict. Filter by header["camera"] if needed.
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(url)
    try:
        while stop is None or not stop.is_set():
            if sub.poll(poll_ms):
                header = decode(sub.recv_multipart())
                if header is not None:
                    gate.on_verdict(header)
            gate.check_budget()
    finally:
        sub.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--verdicts", default="tcp://127.0.0.1:5556", help="linewatch's publish URL")
    ap.add_argument("--budget", type=float, default=1.5, help="seconds from trigger to decision")
    args = ap.parse_args()
    run(args.verdicts, Gate(Actuator(), args.budget))


if __name__ == "__main__":
    main()
