"""The output thread's reject pulse across a lost PLC, driven step by step (no thread, no PLC):
a reject that reached the PLC keeps its pulse when the connection comes back; a reject that did
not (missed: its part went by) never turns the output on later."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from linewatch.actuate.gate import Fire
from linewatch.actuate.outputs import Output, Unreachable
from linewatch.actuate.service import ActuateMetrics, OutputWorker


class ScriptedPlc(Output):
    """Records every write; `up` says whether it answers."""

    name = "scripted"

    def __init__(self) -> None:
        self.up = True
        self.writes: list[tuple[str, object]] = []

    def _answer(self) -> None:
        if not self.up:
            raise Unreachable("the PLC does not answer")

    def connect(self) -> None:
        self._answer()
        self.writes.append(("connect: reject off", False))

    def set_reject(self, on: bool, fire: Fire | None = None) -> None:
        self._answer()
        self.writes.append(("reject", on))

    def set_alarm(self, detail: str) -> None:
        self._answer()
        self.writes.append(("alarm", detail))


class Log:
    def __init__(self) -> None:
        self.events: list[str] = []

    def __getattr__(self, level: str):
        return lambda event, **fields: self.events.append(event)


def worker(plc: ScriptedPlc, pulse_s: float) -> OutputWorker:
    w = OutputWorker(plc, pulse_s=pulse_s, retry_max_s=0.0, metrics=ActuateMetrics(CollectorRegistry()), log=Log())
    w._apply()  # connects
    assert w.connected
    return w


def fire(n: int) -> Fire:
    return Fire(at=0.0, camera="cam", part=f"cam/{n}", verdict_id=f"v-{n}", reason="fail")


def test_a_missed_reject_does_not_set_the_output_when_the_plc_comes_back() -> None:
    plc = ScriptedPlc()
    w = worker(plc, pulse_s=3600.0)  # a pulse that would still be on at the reconnect
    plc.up = False
    w._take(("fire", fire(1)))  # the write fails: missed, the connection is dropped
    assert not w.connected and w.metrics.missed._value.get() == 1
    plc.up = True
    plc.writes.clear()
    w._retry_at = 0.0
    w._apply()
    assert w.connected
    assert plc.writes[0] == ("connect: reject off", False)
    assert ("reject", True) not in plc.writes  # no part is there to reject any more
    assert [kind for kind, _ in plc.writes] == ["connect: reject off", "alarm"]  # the miss is alarmed


def test_a_written_reject_keeps_its_pulse_across_a_reconnect() -> None:
    plc = ScriptedPlc()
    w = worker(plc, pulse_s=3600.0)
    w._take(("fire", fire(1)))
    assert plc.writes[-1] == ("reject", True) and w.metrics.rejects._value.get() == 1
    plc.up = False
    w._take(("fire", fire(2)))  # while the pulse is on, the PLC goes away: this one is missed
    plc.up = True
    plc.writes.clear()
    w._retry_at = 0.0
    w._apply()
    # the connect wrote the output off; part 1's pulse is put back on; part 2's miss is alarmed
    assert [kind for kind, _ in plc.writes] == ["connect: reject off", "reject", "alarm"]
    assert plc.writes[1] == ("reject", True)
