"""systemd/: the units pass `systemd-analyze verify` (Debian's systemd) and keep their hardening.

`verify` fails when ExecStart's binary does not exist, and the units point at the installed
path /opt/linewatch/venv/bin/linewatch. The test copies each unit into a temporary directory
and points ExecStart at this checkout's `linewatch` entry point (next to the running Python),
or at the Python interpreter itself if the entry point is not installed; nothing else changes.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from linewatch.config import Config

from ._tools import SYSTEMD, require_tool, run, unit_settings, verify_unit

INSTALLED_BIN = "/opt/linewatch/venv/bin/linewatch"
UNITS = {"linewatch.service": "linewatch.service", "linewatch@.service": "linewatch@line-1.service"}


def _executable() -> str:
    candidate = Path(sys.executable).parent / "linewatch"
    return str(candidate) if candidate.exists() else sys.executable


def _staged(tmp_path: Path) -> Path:
    for name in UNITS:
        text = (SYSTEMD / name).read_text()
        assert INSTALLED_BIN in text, f"{name}: ExecStart no longer uses {INSTALLED_BIN}; update this test"
        (tmp_path / name).write_text(text.replace(INSTALLED_BIN, _executable()))
    return tmp_path


@pytest.mark.system
@pytest.mark.parametrize("name", list(UNITS))
def test_unit_verifies(tmp_path: Path, name: str):
    staged = _staged(tmp_path)
    problems = verify_unit(staged / UNITS[name])
    assert not problems, "\n".join(problems)


@pytest.mark.system
def test_verify_harness_catches_mistakes(tmp_path: Path):
    """A misspelt key must be reported, or test_unit_verifies proves nothing."""
    staged = _staged(tmp_path)
    unit = staged / "linewatch.service"
    unit.write_text(unit.read_text().replace("WatchdogSec=", "WatchdogSecs=", 1))
    assert verify_unit(unit), "systemd-analyze verify did not report an unknown key"


@pytest.mark.system
@pytest.mark.parametrize("name", list(UNITS))
def test_security_exposure_is_low(tmp_path: Path, name: str):
    """`systemd-analyze security --offline` rates the hardening; 3.0 or lower is 'OK'."""
    tool = require_tool("systemd-analyze")
    staged = _staged(tmp_path)
    res = run([tool, "security", "--offline=true", "--threshold=30", str(staged / UNITS[name])], timeout=60)
    if "--offline" in res.stderr and ("unrecognized" in res.stderr or "Unknown option" in res.stderr):
        pytest.skip("this systemd-analyze has no --offline security review (systemd < 250)")
    assert res.returncode == 0, res.stdout[-1500:] + res.stderr[-500:]


@pytest.mark.parametrize("name", list(UNITS))
def test_unit_settings(name: str):
    s = unit_settings(SYSTEMD / name)
    one = {k: v[-1] for k, v in s.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert int(one["WatchdogSec"]) > 0
    assert one["Restart"] == "on-failure" and one["RestartSec"]
    assert one["User"] == "linewatch"
    assert one["KillSignal"] == "SIGTERM"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                       "ProtectHome": "yes", "RestrictSUIDSGID": "yes"}.items():
        assert one.get(key) == value, f"{name}: {key}={one.get(key)!r}, want {value}"
    assert "linewatch" in one["StateDirectory"].split(), "the bank/models path must stay writable"
    # stop timeout: at least the frame deadline plus a margin, so every in-flight frame is answered
    deadline_s = Config().runtime.pipeline.deadline_ms / 1000
    assert int(one["TimeoutStopSec"]) >= deadline_s + 10
    assert " serve -c " in one["ExecStart"]
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"  # reload: the daemon re-reads its config, switches bank
    if "@" in name:
        assert "%i" in one["ExecStart"] and "%i" in one["StateDirectory"]


@pytest.mark.system
def test_sysusers_creates_the_account(tmp_path: Path):
    tool = require_tool("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    res = run([tool, f"--root={tmp_path}", str(SYSTEMD / "linewatch.sysusers")], timeout=60)
    assert res.returncode == 0, res.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text()
    assert re.search(r"^linewatch:x:\d+:\d+:.*:/var/lib/linewatch:", passwd, re.M), passwd
