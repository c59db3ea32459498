"""Suite-wide fixtures and markers.

Layers: a test that starts another process -- a `linewatch serve` or other CLI subprocess, a
Mosquitto broker, a browser, Prometheus, a system tool -- is marked `system` (a whole module with
`pytestmark`, or the test; a test using a fixture in SYSTEM_FIXTURES is marked here);
`pytest -m "not system"` runs the unit layer alone, and a unit test that starts a program fails. `slow` and `cuda` as in
pyproject.toml: `cuda` tests run only where a CUDA device is present (benchmarks/gpu_check.sh
runs them on one); elsewhere they skip and say why.

Expensive results are made once per run: `made_once(kind, spec, make)` keeps what `make`
returned under a hash of `spec`, for every test and module -- and every pytest-xdist worker:
the first makes it under a file lock, the others read it. `sim_bank(...)` builds a classic bank
from sim images that way; `small_bank`, `second_bank` and `other_settings_bank` are the banks
the serve tests share. With xdist (`--dist loadfile`), a module's tests run in one worker, so
its module-scoped fixtures are made once too (SPREAD_MODULES: the exceptions).

Test modules never import each other (tests/test_suite_layout.py checks it): shared code lives
in helper modules (tests/serving.py, tests/ports.py, tests/waiting.py, tests/runtime/fakes.py,
...) and fixtures here or in a folder's conftest.py.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.serving import DETECTOR, PRODUCT, SIZE, build_sim_bank


# Fixtures that start another program: a test that uses one is a system test, marked here
# (before `-m` selects) so that no test has to repeat it.
SYSTEM_FIXTURES = frozenset({"session_broker", "broker", "own_broker", "secured_broker", "secured", "browser",
                             "live_daemon"})


# ---------------------------------------------------------------- pytest-xdist: which tests share a worker

# With `--dist loadfile` (tests/run.sh) each module's tests run in one worker, so a module-scoped
# fixture is made once, and so is the ops tests' live daemon (only tests/ops/test_prometheus.py
# uses it). The tests of SPREAD_MODULES share no fixture but `made_once` results and are slow
# one by one: they are dealt out singly. (xdist's own `--dist loadgroup` cannot do this with
# pytest 9.2: it marks groups by editing node ids, which no longer takes effect --
# pytest-dev/pytest-xdist#1386 -- so the tests of a group are spread like any others.)
SPREAD_MODULES = frozenset({"tests/detector/test_accuracy.py", "tests/detector/test_calibration.py"})


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ModulesExceptSpread(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return nodeid if module in SPREAD_MODULES else module

    return ModulesExceptSpread(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if SYSTEM_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.system)

    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------- the unit layer starts no program

_running: dict[str, pytest.Item | None] = {"item": None}


def _share_the_cores_between_xdist_workers(config: pytest.Config) -> None:
    """With pytest-xdist, each worker's torch, BLAS and OpenMP (and those of the programs its
    tests start) get the worker's share of the cores, not all of them: N workers each running N
    threads spin-wait on each other. The controller sets OMP_NUM_THREADS before it starts the
    workers (read when they load torch and numpy); a worker also tells torch directly."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT") or getattr(config.option, "numprocesses", None)
    if workers in ("auto", "logical"):
        workers = os.cpu_count() or 1
    if not workers or int(workers) < 2:
        return
    threads = max(1, (os.cpu_count() or 1) // int(workers))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(min(threads, torch.get_num_threads()))


# Programs the standard library runs on its own to learn about the machine (platform: uname;
# ctypes.util.find_library: ldconfig, gcc, objdump, ld), once and whichever test asks first.
INCIDENTAL_PROGRAMS = frozenset({"uname", "ldconfig", "gcc", "cc", "objdump", "ld"})


def _incidental(args) -> bool:
    first = args if isinstance(args, (str, bytes, os.PathLike)) else next(iter(args), "")
    words = os.fsdecode(first).split()
    return bool(words) and os.path.basename(words[0]) in INCIDENTAL_PROGRAMS


def pytest_configure(config):
    """The layers hold: while a test without the `system` marker runs (its fixtures included),
    starting another program through `subprocess` fails, saying to mark the test. Worker
    processes of the code under test (the archive's picture process, started by
    multiprocessing) are part of the unit and allowed."""
    real_init = subprocess.Popen.__init__

    @functools.wraps(real_init)
    def guarded_init(self, args, *a, **kw):
        item = _running["item"]
        if item is not None and item.get_closest_marker("system") is None and not _incidental(args):
            self._child_created = False  # Popen.__del__ reads it
            raise AssertionError(f"{item.nodeid} starts a program ({args!r:.160}) but is not marked `system`: "
                                 "mark the test (@pytest.mark.system) or its module (pytestmark = pytest.mark.system)")
        real_init(self, args, *a, **kw)

    subprocess.Popen.__init__ = guarded_init
    config.add_cleanup(lambda: setattr(subprocess.Popen, "__init__", real_init))
    _share_the_cores_between_xdist_workers(config)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _running["item"] = item
    try:
        yield
    finally:
        _running["item"] = None


# ---------------------------------------------------------------- expensive results, made once


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory) -> Path:
    """A folder for the whole run: under the session's base temp dir, or, in a pytest-xdist
    worker, the folder above the workers' own ones, which they all share."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = root / "shared"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def made_once(shared_dir: Path) -> Callable[..., Any]:
    """`made_once(kind, spec, make)`: what `make(folder)` returns (JSON data, or a path in
    `folder`), made on the first call with this `kind` and `spec` (a JSON-able dict, hashed to
    name the folder) and kept for the run: by every test and module, and by every xdist worker
    (the first takes a file lock and makes it, the others wait and read it). With `wait=False`
    it returns None instead of waiting while another worker is making it."""
    from filelock import FileLock, Timeout

    memo: dict[str, Any] = {}

    def get(kind: str, spec: dict, make: Callable[[Path], Any], *, wait: bool = True) -> Any:
        key = f"{kind}-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
        if key not in memo:
            folder = shared_dir / key
            done = folder / "result.json"
            lock = FileLock(str(folder) + ".lock")
            try:
                lock.acquire(timeout=-1 if wait else 0)
            except Timeout:
                return None
            try:
                if not done.is_file():
                    shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
                    folder.mkdir()
                    value = make(folder)
                    stored = {"path": str(value)} if isinstance(value, Path) else {"value": value}
                    done.write_text(json.dumps(stored))
            finally:
                lock.release()
            stored = json.loads(done.read_text())
            memo[key] = Path(stored["path"]) if "path" in stored else stored["value"]
        return memo[key]

    return get


@pytest.fixture(scope="session")
def sim_bank(made_once) -> Callable[..., Path]:
    """`sim_bank(detector, seed=, n_train=, n_val=, product=, size=)`: the path of a bank built
    from sim images with those arguments (tests.serving.build_sim_bank), built once per run."""
    def get(detector: dict, *, seed: int, n_train: int, n_val: int, product: str = PRODUCT, size: int = SIZE,
            mono: bool = False) -> Path:
        spec = {"detector": detector, "product": product, "seed": seed, "n_train": n_train, "n_val": n_val,
                "size": size, **({"mono": True} if mono else {})}
        return made_once("bank", spec, lambda folder: build_sim_bank(folder, detector, **{
            k: v for k, v in spec.items() if k != "detector"}))

    return get


@pytest.fixture(scope="session")
def small_bank(sim_bank) -> Path:
    """A classic-backend bank: 12 good sim images, calibrated on 6 held-out ones (128 px)."""
    return sim_bank(DETECTOR, seed=3, n_train=12, n_val=6)


@pytest.fixture(scope="session")
def mono_bank(sim_bank) -> Path:
    """A classic-backend mono bank: 12 grey good sim images (`linewatch sim generate --mono`),
    calibrated on 6 held-out grey ones (128 px)."""
    return sim_bank(DETECTOR, seed=3, n_train=12, n_val=6, mono=True)


@pytest.fixture(scope="session")
def demo_mono_bank(sim_bank) -> Path:
    """A mono bank under the demo's detector settings (configs/demo.yaml, `DEMO_DETECTOR`): 12 grey
    good sim images, calibrated on 6 held-out grey ones (128 px)."""
    from linewatch.demo import DEMO_DETECTOR

    return sim_bank(DEMO_DETECTOR, seed=3, n_train=12, n_val=6, mono=True)


@pytest.fixture(scope="session")
def second_bank(sim_bank) -> Path:
    """Another good-image subset of the same product, under the same detector settings."""
    return sim_bank(DETECTOR, seed=8, n_train=6, n_val=5)


@pytest.fixture(scope="session")
def other_settings_bank(sim_bank) -> Path:
    """A bank built under other detector settings (image_size): it does not fit serve's config."""
    return sim_bank({**DETECTOR, "image_size": 56}, seed=9, n_train=3, n_val=5)


@pytest.fixture
def browser():
    """Headless Chromium driven by Debian's chromedriver (nothing downloaded), 1280x900: the live
    page's tests (tests/runtime/test_live_page.py, tests/test_selfcheck_serve.py)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    from tests.ops._tools import require_tool

    options = webdriver.ChromeOptions()
    options.binary_location = require_tool("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(require_tool("chromedriver")), options=options)
    yield driver
    driver.quit()
