"""The line on one machine, every part a real process: a hot folder -> `linewatch camera` ->
`linewatch serve` -> the acknowledged verdict channel -> `linewatch actuate` -> a Modbus/TCP PLC
(a pymodbus server in this test) whose coil writes the test reads back.

Every file the camera delivered ends in exactly one gate decision, the one its verdict asks for
(pass lets it through; anything else rejects), and every reject is one pulse on the PLC's coil.
The camera here is the hot-folder source, whose frames the test's bank can judge; the fake GigE
Vision camera (grey test patterns) has its own tests (tests/runtime/test_aravis.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import yaml

from tests.logs import json_lines
from tests.serving import Served, of, sim_images
from tests.waiting import wait_until

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[1]
PARTS = 6
DEADLINE_MS = 4000.0  # the daemon's capture->verdict budget
TRAVEL_MS = 6000.0  # camera -> ejector; longer than the deadline, as `linewatch config check` demands
REJECT_COIL = 3


def test_camera_to_serve_to_actuate_to_a_modbus_plc(tmp_path: Path, small_bank: Path) -> None:
    pytest.importorskip("pymodbus", reason="the `line` extra: pip install -e '.[line]'")
    from tests.actuate.plc import ModbusPlc

    plc = ModbusPlc(coils=8)
    plc.start()
    served = Served(tmp_path, small_bank, deadline_ms=DEADLINE_MS, runtime={
        "acked": {"enabled": True, "url": "tcp://127.0.0.1:0", "subscribers": ["gate1"], "budget_ms": TRAVEL_MS}})
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    processes: dict[str, subprocess.Popen] = {}
    logs = {name: tmp_path / f"{name}.log" for name in ("camera", "actuate")}
    try:
        served.wait_ready()
        found = re.search(r"acked_channel_listening.*?url=(tcp://[0-9.]+:\d+)", served.log_path.read_text())
        assert found, served.log()
        actuate_config = tmp_path / "actuate.yaml"
        actuate_config.write_text(yaml.safe_dump({
            "runtime": {"pipeline": {"deadline_ms": DEADLINE_MS}, "logging": {"level": "DEBUG", "format": "json"}},
            "actuate": {"verdicts": found.group(1), "channel": "acked", "subscriber": "gate1", "output": "modbus",
                        "modbus": {"host": "127.0.0.1", "port": plc.port, "reject_coil": REJECT_COIL},
                        "cameras": {"press-1": {"travel_ms": TRAVEL_MS, "window_ms": 2000}},
                        "metrics": {"host": "127.0.0.1", "port": 0}}}))
        with logs["actuate"].open("wb") as out:
            processes["actuate"] = subprocess.Popen(
                [sys.executable, "-m", "linewatch.cli", "actuate", "-c", str(actuate_config)],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        assert wait_until(lambda: any(r.get("event") == "actuating" for r in json_lines(logs["actuate"]))
                          or processes["actuate"].poll() is not None, 120.0)
        assert processes["actuate"].poll() is None, logs["actuate"].read_text()[-3000:]
        # the actuator said hello on the acked channel before any part arrives
        assert wait_until(lambda: "acked_subscriber_hello" in served.log_path.read_text(), 60.0), served.log()

        hot = tmp_path / "hot"
        hot.mkdir()
        camera_config = tmp_path / "camera.yaml"
        camera_config.write_text("folder:\n  poll_interval_s: 0.05\n")
        with logs["camera"].open("wb") as out:
            processes["camera"] = subprocess.Popen(
                [sys.executable, "-m", "linewatch.cli", "camera", "-c", str(camera_config), "--source",
                 f"folder://{hot}", "--camera", "press-1", "--endpoint", served.ingest_url, "--metrics-port", "0",
                 "--encoding", "png"], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        for i, rgb in enumerate(sim_images(PARTS, seed=31)):  # good and missing-part frames in turn
            cv2.imwrite(str(hot / f".part-{i}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            os.rename(hot / f".part-{i}.png", hot / f"part-{i}.png")

        verdicts = of(served.recv(lambda vs: len(of(vs, "press-1")) >= PARTS, 120.0), "press-1")
        assert sorted(v.frame_id for v in verdicts) == list(range(PARTS)), [(v.frame_id, v.verdict) for v in verdicts]
        wanted = {f"press-1/{v.frame_id}": "pass" if v.verdict == "pass" else "reject" for v in verdicts}
        assert set(wanted.values()) == {"pass", "reject"}, [(v.frame_id, v.verdict, v.reason) for v in verdicts]

        def decisions() -> list[dict]:
            return [r for r in json_lines(logs["actuate"]) if r.get("event") in ("pass", "reject_decided")
                    and r.get("camera") == "press-1"]

        def pulses() -> int:
            """Reject writes on the coil, once it is back in the safe state (parts that reach the
            ejector within one pulse_ms share one raised coil: a set each, one reset after)."""
            writes = plc.coil_writes(REJECT_COIL)
            return sum(writes) if writes and writes[-1] is False else 0

        rejects = list(wanted.values()).count("reject")
        assert wait_until(lambda: len(decisions()) >= PARTS and pulses() >= rejects, 120.0), \
            (decisions(), plc.writes, logs["actuate"].read_text()[-3000:])
        decided = {}
        for d in decisions():
            assert d["part"] not in decided, f"part {d['part']} decided twice: {decisions()}"
            decided[d["part"]] = "pass" if d["event"] == "pass" else "reject"
        assert decided == wanted
        assert pulses() == rejects, plc.coil_writes(REJECT_COIL)  # each reject one set; no other
        assert all(r.get("event") != "alarm" for r in json_lines(logs["actuate"])), logs["actuate"].read_text()[-3000:]

        for name in ("camera", "actuate"):
            processes[name].send_signal(signal.SIGTERM)
            assert processes[name].wait(30) == 0, logs[name].read_text()[-3000:]
    finally:
        for proc in processes.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        stopped = served.stop()
        plc.stop()
    assert stopped == 0, served.log()
