"""The GPU check's preflight: everything the later steps need, checked in seconds, every gap named at once.

    python benchmarks/gpu_preflight.py --out preflight.json [--dry-run] [--site DIR]

benchmarks/gpu_check.sh runs it first (under a 30 s timeout) and stops there when it fails, so that a
missing package costs seconds of a borrowed GPU's window, not a step's budget. It checks:
  modules       every third-party module that linewatch, the benchmark scripts and the CUDA-marked test
                modules import, by name, each with the distribution that provides it (a missing one: the
                package to add to benchmarks/fetch_gpu_wheels.sh);
  requirements  every distribution installed from the wheels (--site) has its own requirements installed
                at versions that satisfy them (a wheel needing a newer typing-extensions than the image's);
  linewatch     every module of the linewatch package and the benchmark scripts import;
  device        CUDA present with bf16 and Triton for torch.compile (--dry-run: a C++ compiler instead,
                since inductor compiles C++ on the CPU);
  cuda_tests    the test modules holding CUDA-marked tests (found by their `pytest.mark.cuda`) collect
                without error under `-m cuda`, and how many tests they hold;
and records the versions of the distributions that matter (the env report). Writes --out (JSON) and
exits 1 if anything failed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import json
import os
import pkgutil
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module -> distribution, for every third-party module imported by linewatch, benchmarks/ and the test
# modules the check collects (tests/detector/*.py import the project's stack; tests/runtime/* paho, imagezmq)
MODULES = {
    "torch": "torch", "torchvision": "torchvision", "timm": "timm", "numpy": "numpy", "scipy": "scipy",
    "cv2": "opencv-python-headless", "PIL": "pillow", "zmq": "pyzmq", "yaml": "pyyaml", "structlog": "structlog",
    "pydantic": "pydantic", "pydantic_core": "pydantic-core", "safetensors": "safetensors", "tqdm": "tqdm",
    "prometheus_client": "prometheus-client", "paho.mqtt.client": "paho-mqtt",
    "segment_anything": "segment-anything", "jsonschema": "jsonschema", "imagezmq": "imagezmq",
    "filelock": "filelock", "sklearn": "scikit-learn", "packaging": "packaging", "pytest": "pytest",
    "pytest_timeout": "pytest-timeout", "xdist": "pytest-xdist",
}
REPORTED = ("torch", "torchvision", "timm", "numpy", "scipy", "opencv-python-headless", "pillow", "pyzmq",
            "pydantic", "pydantic-core", "structlog", "safetensors", "segment-anything", "paho-mqtt", "jsonschema",
            "imagezmq", "pytest", "pytest-timeout", "scikit-learn", "triton", "typing-extensions")
BENCHMARK_SCRIPTS = ("gpu_e2e", "random_checkpoints")  # and tiny_cli for a dry run


def check_modules(report: dict) -> list[str]:
    problems = []
    seconds = {}
    for module, dist in MODULES.items():
        t0 = time.monotonic()
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 -- any failure to import is what we report
            problems.append(f"module {module} (distribution {dist}): {type(e).__name__}: {e}")
        seconds[module] = round(time.monotonic() - t0, 2)
    report["import_s"] = seconds
    return problems


def check_requirements(site: Path | None, report: dict) -> list[str]:
    """Requires-Dist of each distribution under `site`, evaluated for this Python, installed and satisfied."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    if site is None or not site.is_dir():
        report["site_distributions"] = []
        return []
    problems = []
    dists = list(md.distributions(path=[str(site)]))
    report["site_distributions"] = sorted(f"{d.metadata['Name']}=={d.version}" for d in dists)
    for dist in dists:
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = md.version(req.name)
            except md.PackageNotFoundError:
                problems.append(f"{dist.metadata['Name']} needs {req} (distribution {canonicalize_name(req.name)}): "
                                "not installed")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append(f"{dist.metadata['Name']} needs {req}, found {req.name} {have}")
    return problems


def check_linewatch(dry_run: bool, report: dict) -> list[str]:
    import linewatch

    problems = []
    names = []
    for info in pkgutil.walk_packages(linewatch.__path__, "linewatch."):
        names.append(info.name)
        try:
            importlib.import_module(info.name)
        except Exception as e:  # noqa: BLE001
            problems.append(f"linewatch module {info.name}: {type(e).__name__}: {e}")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    for name in (*BENCHMARK_SCRIPTS, "tiny_cli") if dry_run else BENCHMARK_SCRIPTS:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001
            problems.append(f"benchmarks/{name}.py: {type(e).__name__}: {e}")
    report["linewatch_modules"] = len(names)
    return problems


def check_device(dry_run: bool, report: dict) -> list[str]:
    import torch

    problems = []
    cuda = torch.cuda.is_available()
    device = {"cuda_available": cuda, "torch_cuda": torch.version.cuda}
    if cuda:
        p = torch.cuda.get_device_properties(0)
        device.update(name=p.name, memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count,
                      bf16=torch.cuda.is_bf16_supported())
        if not device["bf16"]:
            problems.append(f"{p.name} does not support bf16 (the target configuration's precision)")
    elif not dry_run:
        problems.append("no CUDA device: torch.cuda.is_available() is False (use --dry-run on a CPU)")
    if dry_run:
        compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
        device["cxx"] = compiler
        if compiler is None:
            problems.append("no C++ compiler (g++, c++): torch.compile's inductor needs one on the CPU")
    else:
        try:
            import triton

            device["triton"] = triton.__version__
        except Exception as e:  # noqa: BLE001
            problems.append(f"module triton (torch.compile on CUDA): {type(e).__name__}: {e}")
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        device["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
    report["device"] = device
    return problems


def cuda_test_files() -> list[str]:
    """Test modules that hold CUDA-marked tests (a `pytestmark = pytest.mark.cuda` or `@pytest.mark.cuda`)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if "pytest.mark.cuda" in p.read_text(errors="replace"))


def check_cuda_tests(report: dict) -> list[str]:
    """`pytest -m cuda --collect-only` on those modules, in this process (torch is imported already)."""
    import pytest

    files = cuda_test_files()
    report["cuda_test_files"] = files
    if not files:
        return ["no test module marks a test `cuda`"]

    class Collected:
        def __init__(self) -> None:
            self.ids: list[str] = []
            self.errors: list[str] = []

        def pytest_collectreport(self, report) -> None:
            if report.failed:
                self.errors.append(f"{report.nodeid}: {str(report.longrepr).strip().splitlines()[-1]}")

        def pytest_collection_finish(self, session) -> None:
            self.ids = [item.nodeid for item in session.items]

    seen = Collected()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        code = pytest.main(["-m", "cuda", "--collect-only", "-q", "-p", "no:cacheprovider", "-W",
                            "ignore::pytest.PytestAssertRewriteWarning", *files], plugins=[seen])
    finally:
        os.chdir(cwd)
    report["cuda_tests"] = seen.ids
    if int(code) != 0 or seen.errors or not seen.ids:
        return [f"`pytest -m cuda --collect-only` exited {int(code)} with {len(seen.ids)} tests; errors: {seen.errors}"]
    return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON report")
    ap.add_argument("--dry-run", action="store_true", help="on a CPU: no CUDA device expected")
    ap.add_argument("--site", help="the folder the wheels were installed into (their requirements are checked)")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    report: dict = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "dry_run": args.dry_run,
                    "python": platform.python_version(), "executable": sys.executable,
                    "pythonpath": os.environ.get("PYTHONPATH", "")}
    problems: list[str] = []
    checks = [("modules", lambda: check_modules(report)),
              ("requirements", lambda: check_requirements(Path(args.site) if args.site else None, report)),
              ("linewatch", lambda: check_linewatch(args.dry_run, report)),
              ("device", lambda: check_device(args.dry_run, report)),
              ("cuda_tests", lambda: check_cuda_tests(report))]
    report["check_s"] = {}
    for name, check in checks:
        c0 = time.monotonic()
        try:
            found = check()
        except Exception as e:  # noqa: BLE001 -- a check that breaks is a problem to report, not a crash
            found = [f"{name}: the check itself failed: {type(e).__name__}: {e}"]
        report["check_s"][name] = round(time.monotonic() - c0, 2)
        problems += found
    versions = {}
    for dist in REPORTED:
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    report["versions"] = versions
    report["problems"] = problems
    report["ok"] = not problems
    report["total_s"] = round(time.monotonic() - t0, 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"preflight: python {report['python']}, torch {versions['torch']}, device {report.get('device', {})}")
    print(f"preflight: {len(report.get('cuda_tests', []))} CUDA-marked tests collected from "
          f"{', '.join(report.get('cuda_test_files', []))}; checks took {report['check_s']}")
    missing = sorted({m.group(1) for p in problems for m in [re.search(r"distribution ([\w.-]+)", p)] if m})
    for p in problems:
        print(f"preflight: MISSING/FAILED: {p}", file=sys.stderr)
    if missing:
        print(f"preflight: distributions to carry as wheels (benchmarks/fetch_gpu_wheels.sh): {' '.join(missing)}",
              file=sys.stderr)
    print(f"preflight: {'ok' if report['ok'] else 'FAILED'} in {report['total_s']} s")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
