"""The GPU check's package lists stay in step with the code (benchmarks/gpu_check.sh, issue #20).

A module imported by linewatch, the benchmark scripts or a test module but missing on the GPU machine
stops the check there, in a window that is lent once. These tests keep the lists that prevent it
complete: the preflight's MODULES name every third-party module imported, and each of their
distributions is either in the GPU image (benchmarks/gpu_image_packages.txt, from the device tool's
KINDS.md) or fetched as a wheel by benchmarks/fetch_gpu_wheels.sh. benchmarks/simulated_gpu_image.sh
proves the same by running the check's dry run in a venv holding only the image's packages (minutes,
so not here)."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# this repository's own: the packages, and the benchmark scripts' modules (benchmarks/ is their sys.path[0])
LOCAL = {"linewatch", "tests", "benchmarks", "__future__", *(p.stem for p in (ROOT / "benchmarks").glob("*.py"))}
# imported only where the GPU check never goes: inside a test that needs a program it does not run
# (the live page's browser), or by `linewatch camera`'s GenICam source, on the camera's host (Aravis), or
# by `linewatch actuate`'s PLC outputs, on the line (pymodbus, asyncua and its cryptography; their tests
# skip where the `line` extra is missing)
NOT_ON_GPU = {"selenium", "gi", "pymodbus", "asyncua", "cryptography"}


def _preflight():
    spec = importlib.util.spec_from_file_location("gpu_preflight", ROOT / "benchmarks" / "gpu_preflight.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree)
    if top_level_only:  # the module body, including its if/try blocks: what importing the module runs
        nodes = [n for stmt in tree.body for n in (ast.walk(stmt) if isinstance(stmt, (ast.If, ast.Try)) else [stmt])]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m not in LOCAL}


def test_the_preflight_checks_every_third_party_module_the_check_imports():
    used: dict[str, set[str]] = {}
    scripts = [p for p in (ROOT / "benchmarks").glob("*.py") if p.name != "gpu_preflight.py"]  # it checks, needs none
    for path in [*(ROOT / "linewatch").rglob("*.py"), *scripts]:
        for module in _imports(path, top_level_only=False):  # the daemon and the steps import lazily too
            used.setdefault(module, set()).add(str(path.relative_to(ROOT)))
    for path in (ROOT / "tests").rglob("*.py"):  # collecting a test module runs its body
        for module in _imports(path, top_level_only=True):
            used.setdefault(module, set()).add(str(path.relative_to(ROOT)))
    checked = {m.split(".")[0] for m in _preflight().MODULES}
    unchecked = {m: sorted(files)[:3] for m, files in used.items() if m not in checked and m not in NOT_ON_GPU}
    assert not unchecked, f"add these to benchmarks/gpu_preflight.py MODULES (and the wheels if the image lacks them): {unchecked}"


def test_every_distribution_the_check_needs_is_in_the_image_or_fetched():
    image = {_norm(line.strip()) for line in (ROOT / "benchmarks" / "gpu_image_packages.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    script = (ROOT / "benchmarks" / "fetch_gpu_wheels.sh").read_text()
    block = script[script.index("WHEELS=(") + len("WHEELS=("):]
    block = block[:block.index("\n)")]
    fetched = {_norm(word) for line in block.splitlines() for word in line.split("#", 1)[0].split()}
    needed = {_norm(dist) for dist in _preflight().MODULES.values()}
    assert not needed - image - fetched, f"neither in the GPU image nor fetched: {sorted(needed - image - fetched)}"
    assert fetched and not fetched & image - {"typing-extensions"}, \
        f"fetched but already in the image (carry one only for another version): {sorted(fetched & image)}"
    # one version of each, pinned for the GPU image's Python in deploy/constraints.txt
    assert "deploy/constraints.txt" in script


@pytest.mark.system  # runs bash
@pytest.mark.parametrize("script", ["gpu_check.sh", "fetch_gpu_wheels.sh", "simulated_gpu_image.sh"])
def test_the_scripts_parse_and_explain_themselves(script):
    path = ROOT / "benchmarks" / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    out = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "bash benchmarks/" + script in out.stdout, out.stdout + out.stderr
