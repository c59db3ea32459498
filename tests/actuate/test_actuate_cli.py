"""`linewatch actuate` as a command: config errors are one line and exit status 2; a dry run
serves its metrics and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from linewatch.cli import main
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]


def write_config(tmp_path: Path, actuate: dict, deadline_ms: float = 100.0) -> str:
    path = tmp_path / "line.yaml"
    path.write_text(yaml.safe_dump({"runtime": {"pipeline": {"deadline_ms": deadline_ms}}, "actuate": actuate}))
    return str(path)


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_travel_time_shorter_than_the_deadline_is_one_line_exit_2(tmp_path, capsys):
    path = write_config(tmp_path, {"cameras": {"cam0": {"travel_ms": 80}}}, deadline_ms=100)
    assert main(["actuate", "-c", path]) == 2
    [line] = error_lines(capsys)
    assert line.startswith("linewatch: error: ") and "actuate.cameras.cam0.travel_ms (80)" in line
    assert "runtime.pipeline.deadline_ms (100)" in line


def test_config_check_covers_the_timing_contradiction(tmp_path, capsys):
    path = write_config(tmp_path, {"cameras": {"cam0": {"travel_ms": 500, "budget_ms": 90}}}, deadline_ms=100)
    assert main(["config", "check", path]) == 2
    assert "actuate.cameras.cam0.budget_ms (90)" in capsys.readouterr().err


def test_no_camera_is_one_line_exit_2(tmp_path, capsys):
    path = write_config(tmp_path, {})
    assert main(["actuate", "-c", path]) == 2
    [line] = error_lines(capsys)
    assert "actuate.cameras is empty" in line


def test_a_coil_the_plc_refuses_is_one_line_exit_2(tmp_path, capsys):
    pytest.importorskip("pymodbus", reason="the `line` extra: pip install -e '.[line]'")
    from tests.actuate.plc import ModbusPlc

    plc = ModbusPlc(coils=8)
    plc.start()
    try:
        path = write_config(tmp_path, {"cameras": {"cam0": {"travel_ms": 500}}, "output": "modbus",
                                       "modbus": {"port": plc.port, "reject_coil": 500}})
        assert main(["actuate", "-c", path]) == 2
    finally:
        plc.stop()
    lines = [line for line in error_lines(capsys) if line.startswith("linewatch: error")]
    assert len(lines) == 1 and "refuses coil 500" in lines[0], lines


def test_an_opcua_node_the_server_lacks_is_one_line_exit_2(tmp_path, capsys):
    pytest.importorskip("asyncua", reason="the `line` extra: pip install -e '.[line]'")
    from tests.actuate.plc import OpcUaPlc

    plc = OpcUaPlc()
    plc.start()
    try:
        path = write_config(tmp_path, {"cameras": {"cam0": {"travel_ms": 500}}, "output": "opcua",
                                       "opcua": {"url": plc.url, "reject_node": "ns=2;s=Linewatch.NoSuchNode"}})
        assert main(["actuate", "-c", path]) == 2
    finally:
        plc.stop()
    lines = [line for line in error_lines(capsys) if line.startswith("linewatch: error")]
    assert len(lines) == 1 and "Linewatch.NoSuchNode" in lines[0], lines


@pytest.mark.system
def test_dry_run_serves_metrics_and_stops_on_sigterm(tmp_path):
    path = write_config(tmp_path, {"verdicts": "tcp://127.0.0.1:9", "cameras": {"cam0": {"travel_ms": 500}},
                                   "metrics": {"port": 0}})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "linewatch.cli", "actuate", "-c", path], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines: list[str] = []

        def started() -> str | None:
            line = proc.stdout.readline()
            lines.append(line)
            if not line and proc.poll() is not None:
                raise AssertionError("".join(lines))
            return line if '"actuating"' in line else None

        line = wait_until(started, 60, poll_s=0)
        metrics = json.loads(line)["metrics"]
        body = urllib.request.urlopen(metrics, timeout=10).read().decode()
        assert "linewatch_actuate_rejects_total" in body and "linewatch_actuate_plc_connected" in body
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_verdict_address_that_cannot_be_bound_is_one_line_exit_2(tmp_path, capsys):
    import zmq

    context = zmq.Context()
    taken = context.socket(zmq.PUB)
    taken.bind("tcp://127.0.0.1:0")
    try:
        path = write_config(tmp_path, {"verdicts": taken.getsockopt(zmq.LAST_ENDPOINT).decode(), "mode": "bind",
                                       "cameras": {"cam0": {"travel_ms": 500}}, "metrics": {"port": 0}})
        assert main(["actuate", "-c", path]) == 2
    finally:
        taken.close(0)
        context.term()
    lines = [line for line in error_lines(capsys) if line.startswith("linewatch: error")]
    assert len(lines) == 1 and "actuate.verdicts: cannot bind" in lines[0], lines


def test_config_check_reports_the_actuate_section_and_its_files(tmp_path, capsys):
    path = write_config(tmp_path, {"cameras": {"cam0": {"travel_ms": 500}}})
    assert main(["config", "check", "--config-only", path]) == 0
    assert "ok  actuate: 1 camera(s)" in capsys.readouterr().out
    path = write_config(tmp_path, {"cameras": {"cam0": {"travel_ms": 500}}, "output": "opcua",
                                   "opcua": {"username": "gate", "password_file": str(tmp_path / "missing")}})
    assert main(["config", "check", "--config-only", path]) == 2
    [line] = error_lines(capsys)
    assert "actuate.opcua:" in line and "missing" in line
