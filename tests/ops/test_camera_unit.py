"""systemd/linewatch-camera@.service: passes `systemd-analyze verify`, keeps the hardening of the
daemon's units, and runs `linewatch camera` from a per-instance config (as tests/ops/test_systemd.py
does for the daemon's units)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from linewatch.cli import build_parser

from ._tools import SYSTEMD, last_unit_settings, require_tool, run, verify_unit

UNIT = SYSTEMD / "linewatch-camera@.service"
INSTALLED_BIN = "/opt/linewatch/venv/bin/linewatch"


def test_camera_unit_settings() -> None:
    s = last_unit_settings(UNIT)
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main" and int(s["WatchdogSec"]) > 0
    assert s["Restart"] == "on-failure" and s["KillSignal"] == "SIGTERM" and s["User"] == "linewatch"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                       "ProtectHome": "yes", "RestrictSUIDSGID": "yes"}.items():
        assert s.get(key) == value, f"{key}={s.get(key)!r}, want {value}"
    assert s["ExecStart"] == f"{INSTALLED_BIN} camera -c /etc/linewatch/camera-%i.yaml"
    assert "%i" in s["StateDirectory"] and "%i" in s["WorkingDirectory"]
    # the command line the unit runs parses
    args = build_parser().parse_args(s["ExecStart"].split()[1:])
    assert args.func.__name__ == "cmd_camera" and args.config == "/etc/linewatch/camera-%i.yaml"


def _staged(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's entry point (verify checks it exists)."""
    executable = Path(sys.executable).parent / "linewatch"
    staged = tmp_path / "linewatch-camera@press-1.service"
    staged.write_text(UNIT.read_text().replace(INSTALLED_BIN, str(executable if executable.exists() else sys.executable)))
    return staged


@pytest.mark.system
def test_camera_unit_verifies(tmp_path: Path) -> None:
    problems = verify_unit(_staged(tmp_path))
    assert not problems, problems


@pytest.mark.system
def test_camera_unit_security_exposure_is_low(tmp_path: Path) -> None:
    """`systemd-analyze security --offline` rates the hardening; 3.0 or lower is 'OK' (2.0 when written)."""
    tool = require_tool("systemd-analyze")
    res = run([tool, "security", "--offline=true", "--threshold=30", str(_staged(tmp_path))], timeout=60)
    if "--offline" in res.stderr and ("unrecognized" in res.stderr or "Unknown option" in res.stderr):
        pytest.skip("this systemd-analyze has no --offline security review (systemd < 250)")
    assert res.returncode == 0, res.stdout[-1500:] + res.stderr[-500:]
