"""systemd/linewatch-actuate@.service: verifies with `systemd-analyze verify`, restarts always,
runs `linewatch actuate` as the linewatch user with the daemon units' hardening."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.ops._tools import SYSTEMD, last_unit_settings, verify_unit

UNIT = SYSTEMD / "linewatch-actuate@.service"
INSTALLED_BIN = "/opt/linewatch/venv/bin/linewatch"


def test_unit_settings():
    s = last_unit_settings(UNIT)
    assert s["ExecStart"] == f"{INSTALLED_BIN} actuate -c /etc/linewatch/%i.yaml"
    assert s["Restart"] == "always" and s["User"] == "linewatch" and s["KillSignal"] == "SIGTERM"
    assert "linewatch@%i.service" in s["After"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes", "ProtectHome": "yes",
                       "RestrictSUIDSGID": "yes", "PrivateDevices": "yes"}.items():
        assert s.get(key) == value, f"{key}={s.get(key)!r}, want {value}"


@pytest.mark.system
def test_unit_verifies(tmp_path: Path):
    executable = Path(sys.executable).parent / "linewatch"
    staged = tmp_path / "linewatch-actuate@line-1.service"
    staged.write_text(UNIT.read_text().replace(INSTALLED_BIN, str(executable) if executable.exists() else sys.executable))
    problems = verify_unit(staged)
    assert not problems, problems
