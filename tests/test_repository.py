"""The repository itself: what a clone holds at its root, and the lock every install uses."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The design card's top level, plus the folders and dotfiles the project keeps beside it.
EXPECTED_ROOT = {
    "linewatch", "deploy", "configs", "tests", "systemd", "pyproject.toml", "README.md",  # the design card
    "docs", "benchmarks", ".ci", ".gitignore",
}


def tracked_root_entries() -> set[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return {name.split("/", 1)[0] for name in out.decode().split("\0") if name}


@pytest.mark.system  # runs git
def test_the_root_holds_only_the_expected_entries() -> None:
    entries = tracked_root_entries()
    assert entries - EXPECTED_ROOT == set(), "unexpected files at the repository root"
    assert {"linewatch", "tests", "pyproject.toml", "README.md"} <= entries


def locked_names() -> set[str]:
    text = (ROOT / "deploy" / "constraints.txt").read_text()
    return {re.split(r"[=\s;]", line, maxsplit=1)[0].lower()
            for line in text.splitlines() if line and not line.startswith((" ", "#"))}


def declared_names() -> set[str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [s for group in project["optional-dependencies"].values() for s in group]
    return {re.match(r"[A-Za-z0-9_.-]+", s).group(0).lower().replace("_", "-") for s in specs}


def test_the_lock_pins_every_declared_dependency() -> None:
    missing = declared_names() - locked_names()
    assert not missing, f"deploy/constraints.txt lacks {sorted(missing)}: run `bash deploy/lock.sh`"


def test_every_install_command_uses_the_lock() -> None:
    for path in ["README.md", "tests/run.sh", "deploy/Dockerfile.cpu", "deploy/Dockerfile.cuda", "docs/install.md"]:
        text = (ROOT / path).read_text()
        installs = [line for line in text.splitlines() if re.search(r"pip install\b", line) and "hadolint" not in line]
        assert installs, path
        for line in installs:
            assert "constraints.txt" in line or line.rstrip().endswith("\\"), f"{path}: {line.strip()}"
