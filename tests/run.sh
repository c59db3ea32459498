#!/usr/bin/env bash
# The project's test command (README, .ci/run): makes the venv, installs linewatch with its
# dev extras at the versions of the lock (deploy/constraints.txt), installs the Debian tools the
# ops tests use where it can, runs the whole suite on every core.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    # PyTorch with its CUDA libraries makes the venv about 6 GiB: say so before pip runs out of disk
    free_mib=$(( $(df -Pk . | awk 'NR == 2 {print $4}') / 1024 ))
    if [ "$free_mib" -lt 7168 ]; then
        echo "tests/run.sh: $free_mib MiB free on this disk; the virtual environment needs about 6 GiB" >&2
    fi
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q -c deploy/constraints.txt -e '.[dev]'
if [ -f tests/ops/install-tools.sh ]; then
    bash tests/ops/install-tools.sh || echo "tests/run.sh: could not install the ops tools; those tests will skip and say why" >&2
fi
# pytest-xdist: one worker per core and one more (many tests wait on a process or a socket for a
# moment; the extra worker's tests use the core meanwhile: the whole suite 299 -> 256 s on 2 cores),
# each module's tests in one worker (its module-scoped fixtures are made once; tests/conftest.py
# deals out a few slow modules' tests singly); banks and other results made once per run are
# shared between the workers (tests/conftest.py `made_once`). TEST_WORKERS=N runs N workers, 0 in
# this process. `bash tests/run.sh -m "not system"`: the unit layer alone.
# Compiled modules are kept (__pycache__, ignored by git) even where the environment says not
# to write them (PYTHONDONTWRITEBYTECODE, common in containers): otherwise every worker compiles
# linewatch and has pytest rewrite every test module again, at every run.
export PYTHONDONTWRITEBYTECODE=
exec .venv/bin/python -m pytest -q -n "${TEST_WORKERS:-$(( $(nproc) + 1 ))}" --dist loadfile "$@"
