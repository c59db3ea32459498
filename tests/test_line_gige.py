"""Issue 21's acceptance run with a GigE Vision camera: every part a real process, on loopback.

A fake GigE Vision camera (Aravis's GvFakeCamera, tests/gige.py) shows grey synthetic parts, good
and with a part missing in turn -> `linewatch camera --source aravis:...` -> `linewatch serve` with
the demo's detector settings (configs/demo.yaml) and a mono bank built under them from grey good
images of the same product -> the acknowledged verdict channel -> two `linewatch actuate`, one per PLC: a pymodbus
server (reject coil) and an asyncua server (reject bit and verdict-id tag), whose writes the test reads.

Mid-stream the camera is killed (SIGKILL) and started again, then both PLCs are stopped and started
again. At the end every frame the bridge sent has exactly one verdict and exactly one gate
decision, the one its verdict asks for (pass lets it through, anything else rejects; a frame id the
bridge lost is a part without a verdict: a watchdog reject). The bridge counted the camera's
outage and came back by itself. While the PLCs were away, each reject that fell due was counted
and logged with its verdict id as missed (docs/line.md: rejects cannot be made up), and once the
PLC answered again the alarm output was raised; every other reject reached the PLC.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from linewatch.demo import DEMO_DETECTOR
from linewatch.runtime.transport.camera.aravis import aravis_bindings_problem
from linewatch.sim import render
from tests.gige import FAKE_ID, FakeGigECamera
from tests.logs import json_lines
from tests.serving import PRODUCT, SIZE, Served, of, scrape
from tests.waiting import wait_until

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parent.parent
CAMERA = "gige-1"
DEADLINE_MS = 4000.0  # the daemon's capture->verdict budget
TRAVEL_MS = 6000.0  # camera -> ejector: longer than the deadline (`linewatch config check` demands it)
FRAME_RATE = 5.0
WAIT_S = 120.0
REJECT_COIL, ALARM_COIL = 3, 4


def events(path: Path, name: str) -> list[dict]:
    return [r for r in json_lines(path) if r.get("event") == name]


def metrics_port(path: Path, event: str) -> int | None:
    for record in events(path, event):
        found = re.search(r":(\d+)/metrics", record.get("metrics", ""))
        if found:
            return int(found.group(1))
    return None


def sample(port: int, name: str) -> float:
    return sum(scrape(port).get(name, {}).values())


def write_parts(folder: Path, n: int, seed: int) -> None:
    """`n` grey 128x128 sim parts, good and with a part missing in turn, as the camera shows them."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        image = render(PRODUCT, rng, None if i % 2 == 0 else "missing", size=SIZE, mono=True)[0]
        cv2.imwrite(str(folder / f"part-{i:02d}.png"), image)


class Plc:
    """The PLC of one output kind, stopped and started again on the same port; what it received
    over all its runs."""

    def __init__(self, kind: str) -> None:
        from tests.actuate.plc import ModbusPlc, OpcUaPlc

        self.kind = kind
        self._opcua = OpcUaPlc
        self.servers = [ModbusPlc(coils=8) if kind == "modbus" else OpcUaPlc()]
        self.running = False

    @property
    def current(self):
        return self.servers[-1]

    def output(self) -> dict:
        plc = self.current
        if self.kind == "modbus":
            return {"output": "modbus", "modbus": {"host": "127.0.0.1", "port": plc.port, "reject_coil": REJECT_COIL,
                                                   "alarm_coil": ALARM_COIL, "timeout_ms": 500}}
        return {"output": "opcua", "opcua": {"url": plc.url, "reject_node": plc.node_id("Reject"),
                                             "alarm_node": plc.node_id("Alarm"),
                                             "verdict_id_node": plc.node_id("VerdictId"), "timeout_ms": 1000}}

    def start(self) -> None:
        self.current.start()
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.current.stop()
            self.running = False

    def restart(self) -> None:
        if self.kind == "opcua":  # an asyncua server does not start twice: a fresh one on the same address
            self.servers.append(self._opcua(port=self.current.port))
        self.start()

    def reject_sets(self) -> list[str | None]:
        """One entry per reject the PLC received: Modbus, a set of the reject coil (None: no
        part named); OPC UA, the verdict id written with it ("" for a watchdog's reject)."""
        if self.kind == "modbus":
            return [None for plc in self.servers for value in plc.coil_writes(REJECT_COIL) if value]
        return [value for plc in self.servers for name, value in plc.writes if name == "VerdictId"]

    def alarm_raised(self) -> bool:
        """Whether the alarm output was set on the PLC now serving (nothing else raises it here)."""
        plc = self.current
        if self.kind == "modbus":
            return True in plc.coil_writes(ALARM_COIL)
        return ("Alarm", True) in plc.writes


def hello_from(log: str, subscriber: str) -> bool:
    return any("acked_subscriber_hello" in line and subscriber in line for line in log.splitlines())


def test_fake_gige_camera_to_serve_to_actuate_to_a_plc(tmp_path: Path, demo_mono_bank: Path) -> None:
    """One line run, two gates: an actuator per PLC kind (Modbus, OPC UA), each its own subscriber
    of the acknowledged channel, both fed by the same camera, serve and outages."""
    for module in ("pymodbus", "asyncua"):
        pytest.importorskip(module, reason="the `line` extra: pip install -e '.[line]'")
    if aravis_bindings_problem() is not None:
        pytest.skip(f"Aravis 0.8's bindings: {aravis_bindings_problem()} (tests/ops/install-tools.sh)")
    parts = tmp_path / "parts"
    write_parts(parts, 6, seed=31)
    plcs = {kind: Plc(kind) for kind in ("modbus", "opcua")}
    for plc in plcs.values():
        plc.start()
    camera = FakeGigECamera(images=parts, log=tmp_path / "fake-camera.log")
    served = Served(tmp_path, demo_mono_bank, detector=DEMO_DETECTOR, deadline_ms=DEADLINE_MS, runtime={
        "acked": {"enabled": True, "url": "tcp://127.0.0.1:0", "subscribers": list(plcs), "budget_ms": TRAVEL_MS}})
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    processes: dict[str, subprocess.Popen] = {}
    logs = {name: tmp_path / f"{name}.log" for name in ("bridge", *plcs)}
    actuate_ports: dict[str, int] = {}

    def tail(name: str) -> str:
        return logs[name].read_text(errors="replace")[-3000:]

    def more_verdicts(n: int) -> None:
        wanted = len(of(served.verdicts, CAMERA)) + n
        assert len(of(served.recv(lambda vs: len(of(vs, CAMERA)) >= wanted, WAIT_S), CAMERA)) >= wanted, tail("bridge")

    try:
        camera.start()
        served.wait_ready()
        found = re.search(r"acked_channel_listening.*?url=(tcp://[0-9.]+:\d+)", served.log_path.read_text())
        assert found, served.log()
        for kind, plc in plcs.items():  # one actuator per PLC: the acked channel's subscriber of that name
            actuate_config = tmp_path / f"actuate-{kind}.yaml"
            actuate_config.write_text(yaml.safe_dump({
                "runtime": {"pipeline": {"deadline_ms": DEADLINE_MS}, "logging": {"level": "DEBUG", "format": "json"}},
                "actuate": {"verdicts": found.group(1), "channel": "acked", "subscriber": kind, **plc.output(),
                            "retry_max_ms": 500, "cameras": {CAMERA: {"travel_ms": TRAVEL_MS, "window_ms": 2000}},
                            "metrics": {"host": "127.0.0.1", "port": 0}}}))
            with logs[kind].open("wb") as out:
                processes[kind] = subprocess.Popen(
                    [sys.executable, "-m", "linewatch.cli", "actuate", "-c", str(actuate_config)],
                    stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        for kind in plcs:
            port = wait_until(lambda: metrics_port(logs[kind], "actuating") or processes[kind].poll() is not None,
                              WAIT_S)
            assert processes[kind].poll() is None and port, tail(kind)
            actuate_ports[kind] = port
            assert wait_until(lambda: hello_from(served.log_path.read_text(), kind), 60.0), served.log()

        bridge_config = tmp_path / "bridge.yaml"
        bridge_config.write_text(yaml.safe_dump({
            "aravis": {"width": SIZE, "height": SIZE, "frame_rate": FRAME_RATE, "pixel_format": "Mono8",
                       "lost_after_s": 1.0},
            "reconnect": {"initial_s": 0.2, "max_s": 1.0}}))
        with logs["bridge"].open("wb") as out:
            processes["bridge"] = subprocess.Popen(
                [sys.executable, "-m", "linewatch.cli", "camera", "-c", str(bridge_config), "--source",
                 f"aravis:{FAKE_ID}", "--camera", CAMERA, "--endpoint", served.ingest_url, "--metrics-port", "0"],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        bridge_port = wait_until(lambda: metrics_port(logs["bridge"], "camera_started")
                                 or processes["bridge"].poll() is not None, WAIT_S)
        assert processes["bridge"].poll() is None and bridge_port, tail("bridge")
        more_verdicts(6)

        # the camera pulled out mid-stream, and plugged in again: the bridge carries on by itself
        camera.kill()
        assert wait_until(lambda: events(logs["bridge"], "camera_source_lost"), WAIT_S), tail("bridge")
        assert sample(bridge_port, "linewatch_camera_source_up") == 0
        camera.start()
        assert wait_until(lambda: events(logs["bridge"], "camera_source_reopened"), WAIT_S), tail("bridge")
        more_verdicts(4)
        assert sample(bridge_port, "linewatch_camera_reconnects_total") == 1
        assert sample(bridge_port, "linewatch_camera_source_up") == 1
        assert processes["bridge"].poll() is None  # the same bridge process throughout

        # the PLCs away while parts go on: rejects due meanwhile are missed, counted, then alarmed
        for plc in plcs.values():
            plc.stop()
        for kind in plcs:
            port = actuate_ports[kind]
            assert wait_until(lambda: sample(port, "linewatch_actuate_missed_rejects_total") >= 1, WAIT_S), tail(kind)
            assert sample(port, "linewatch_actuate_plc_connected") == 0
        for plc in plcs.values():
            plc.restart()
        for kind, plc in plcs.items():
            port = actuate_ports[kind]
            assert wait_until(lambda: sample(port, "linewatch_actuate_plc_connected") == 1, WAIT_S), tail(kind)
            assert wait_until(plc.alarm_raised, WAIT_S), tail(kind)
        more_verdicts(4)

        processes["bridge"].send_signal(signal.SIGTERM)
        assert processes["bridge"].wait(30) == 0, tail("bridge")
        stopped = events(logs["bridge"], "camera_stopped")[-1]
        sent = stopped["frames_sent"]
        got = of(served.recv(lambda vs: len(of(vs, CAMERA)) >= sent, WAIT_S), CAMERA)

        # every frame the bridge sent: one verdict
        ids = sorted(v.frame_id for v in got)
        assert len(ids) == sent and len(set(ids)) == sent, (sent, ids)
        # the daemon saw a gap in the camera's frames, not garbage: no frame it could not use
        assert not [(v.frame_id, v.reason) for v in got if v.verdict == "error"]
        lost = sorted(set(range(ids[0], ids[-1] + 1)) - set(ids))  # ids the bridge never sent: no verdict
        assert len(lost) <= stopped["frames_dropped"], (lost, stopped)
        wanted = {f"{CAMERA}/{v.frame_id}": ("pass" if v.verdict == "pass" else "reject", v.id) for v in got}
        wanted.update({f"{CAMERA}/{i}": ("reject", None) for i in lost})  # the watchdog's
        assert {action for action, _ in wanted.values()} == {"pass", "reject"}, [(v.frame_id, v.verdict) for v in got]
        rejects = [vid for action, vid in wanted.values() if action == "reject"]
        for kind, plc in plcs.items():
            check_gate(kind, plc, logs[kind], actuate_ports[kind], wanted, rejects)
            processes[kind].send_signal(signal.SIGTERM)
            assert processes[kind].wait(30) == 0, tail(kind)
    finally:
        for proc in processes.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        stopped_code = served.stop()
        camera.close()
        for plc in plcs.values():
            plc.stop()
    assert stopped_code == 0, served.log()


def check_gate(kind: str, plc: Plc, log: Path, port: int, wanted: dict[str, tuple[str, str | None]],
               rejects: list[str | None]) -> None:
    """One actuator's account: every verdict one gate decision, the one it asks for; every reject
    decided on the PLC, or missed while the PLC was away."""

    def decisions() -> list[dict]:
        return [r for r in json_lines(log) if r.get("event") in ("pass", "reject_decided") and r.get("camera") == CAMERA]

    def fired() -> float:
        return sample(port, "linewatch_actuate_rejects_total") + sample(port, "linewatch_actuate_missed_rejects_total")

    tail = log.read_text(errors="replace")[-3000:]
    assert wait_until(lambda: len(decisions()) >= len(wanted) and fired() >= len(rejects), WAIT_S), \
        (kind, len(decisions()), len(wanted), fired(), len(rejects), tail)
    decided = {}
    for d in decisions():
        assert d["part"] not in decided, f"{kind}: part {d['part']} decided twice"
        decided[d["part"]] = ("pass" if d["event"] == "pass" else "reject", d["verdict_id"])
    assert decided == wanted, kind
    assert fired() == len(rejects), kind
    missed = [r["verdict_id"] for r in events(log, "reject_missed_plc_unreachable")]
    assert len(missed) == sample(port, "linewatch_actuate_missed_rejects_total") >= 1, kind
    assert set(missed) <= set(rejects), kind
    written = sample(port, "linewatch_actuate_rejects_total")
    on_plc = plc.reject_sets()
    # A write that timed out counts as missed, but may have reached the PLC (its answer was what
    # got lost): such a reject may be on the PLC or not. Every reject written is on the PLC, and
    # nothing is on the PLC that was not a reject decided.
    if kind == "opcua":  # the verdict ids written with the reject bit ("": the watchdog's rejects)
        asked, lost = Counter(vid or "" for vid in rejects), Counter(vid or "" for vid in missed)
        assert asked - lost <= Counter(on_plc) <= asked, (on_plc, rejects, missed)
    else:
        # one set per reject written or perhaps written; a pulse that was on when the connection
        # dropped is set again at each reconnect (its part may still be at the ejector)
        reconnects = len(events(log, "plc_connected")) - 1
        assert written <= len(on_plc) <= written + len(missed) + reconnects, (on_plc, written, missed, reconnects)
    assert sample(port, "linewatch_actuate_plc_write_failures_total") >= 1, kind
    assert not events(log, "alarm"), tail  # no late verdict, no seq gap
