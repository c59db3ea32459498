"""Suite-wide fixtures and markers.

Layers: a test that starts another process -- a `linewatch serve` or other CLI subprocess, a
Mosquitto broker, a browser, Prometheus, a system tool -- is marked `system` (by module, with
`pytestmark`); `pytest -m "not system"` runs the unit layer alone. `slow` and `cuda` as in
pyproject.toml: `cuda` tests run only where a CUDA device is present (benchmarks/gpu_check.sh
runs them on one); elsewhere they skip and say why.

Banks: `sim_bank(...)` builds a classic-backend bank from sim images once per set of arguments
(a hash of them names it), shared by every test and module of the session -- and by every
pytest-xdist worker: the first worker builds it under a file lock, the others load the file.
`small_bank`, `second_bank` and `other_settings_bank` are the banks the serve tests share.

Test modules never import each other (tests/test_suite_layout.py checks it): shared code lives
in helper modules (tests/serving.py, tests/ports.py, tests/waiting.py, tests/runtime/fakes.py,
...) and fixtures here or in a folder's conftest.py.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.serving import DETECTOR, PRODUCT, SIZE, build_sim_bank


# Fixtures that start another program: a test that uses one is a system test, marked here
# (before `-m` selects) so that no test has to repeat it.
SYSTEM_FIXTURES = frozenset({"session_broker", "broker", "own_broker", "secured_broker", "secured", "browser",
                             "live_daemon"})


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


def pytest_configure(config):
    """The layers hold: while a test without the `system` marker runs (its fixtures included),
    starting another program through `subprocess` fails, saying to mark the test. Worker
    processes of the code under test (the archive's picture process, started by
    multiprocessing) are part of the unit and allowed."""
    real_init = subprocess.Popen.__init__

    @functools.wraps(real_init)
    def guarded_init(self, args, *a, **kw):
        item = _running["item"]
        if item is not None and item.get_closest_marker("system") is None:
            self._child_created = False  # Popen.__del__ reads it
            raise AssertionError(f"{item.nodeid} starts a program ({args!r:.160}) but is not marked `system`: "
                                 "mark the test (@pytest.mark.system) or its module (pytestmark = pytest.mark.system)")
        real_init(self, args, *a, **kw)

    subprocess.Popen.__init__ = guarded_init
    config.add_cleanup(lambda: setattr(subprocess.Popen, "__init__", real_init))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _running["item"] = item
    try:
        yield
    finally:
        _running["item"] = None


# ---------------------------------------------------------------- banks, built once


@pytest.fixture(scope="session")
def _bank_cache_dir(tmp_path_factory) -> Path:
    """Where built banks are kept: under the session's base temp dir, or, in a pytest-xdist
    worker, the folder above the workers' own ones, which they share."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = root / "bank-cache"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def sim_bank(_bank_cache_dir: Path) -> Callable[..., Path]:
    """`sim_bank(detector, seed=, n_train=, n_val=, product=, size=)`: the path of a bank built
    from sim images with those arguments (see tests.serving.build_sim_bank), built on first use
    and cached by a hash of the arguments for the session (and across xdist workers)."""
    from filelock import FileLock

    built: dict[str, Path] = {}

    def get(detector: dict, *, seed: int, n_train: int, n_val: int, product: str = PRODUCT, size: int = SIZE) -> Path:
        spec = {"detector": detector, "product": product, "seed": seed, "n_train": n_train, "n_val": n_val,
                "size": size}
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
        if key not in built:
            folder = _bank_cache_dir / key
            with FileLock(str(folder) + ".lock"):
                path = folder / "bank.lwbank"
                if not path.is_file():
                    folder.mkdir(exist_ok=True)
                    built_path = build_sim_bank(folder, detector, product=product, seed=seed, n_train=n_train,
                                                n_val=n_val, size=size)
                    assert built_path == path
            built[key] = path
        return built[key]

    return get


@pytest.fixture(scope="session")
def small_bank(sim_bank) -> Path:
    """A classic-backend bank: 12 good sim images, calibrated on 6 held-out ones (128 px)."""
    return sim_bank(DETECTOR, seed=3, n_train=12, n_val=6)


@pytest.fixture(scope="session")
def second_bank(sim_bank) -> Path:
    """Another good-image subset of the same product, under the same detector settings."""
    return sim_bank(DETECTOR, seed=8, n_train=6, n_val=5)


@pytest.fixture(scope="session")
def other_settings_bank(sim_bank) -> Path:
    """A bank built under other detector settings (image_size): it does not fit serve's config."""
    return sim_bank({**DETECTOR, "image_size": 56}, seed=9, n_train=3, n_val=5)
