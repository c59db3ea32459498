#!/usr/bin/env bash
# The project's test command (README, .ci/run): makes the venv, installs linewatch with its
# dev extras, installs the Debian tools the ops tests use where it can, runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -e '.[dev]'
if [ -f tests/ops/install-tools.sh ]; then
    bash tests/ops/install-tools.sh || echo "tests/run.sh: could not install the ops tools; those tests will skip and say why" >&2
fi
exec .venv/bin/python -m pytest -q "$@"
