#!/usr/bin/env bash
# Re-resolves deploy/constraints.txt, the versions every install of linewatch uses (the README's
# two commands, tests/run.sh, the Dockerfiles): the newest releases pyproject.toml admits, for
# Linux x86_64 and every Python linewatch supports. Run it on purpose, commit the result on its own
# and run the suite on it:   bash deploy/lock.sh && rm -rf .venv && bash tests/run.sh
# Needs uv (`python3 -m pip install uv`); extra arguments go to `uv pip compile` (e.g. --upgrade-package numpy).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v uv >/dev/null || { echo "deploy/lock.sh: needs uv: python3 -m pip install uv" >&2; exit 2; }
exec uv pip compile pyproject.toml --extra dev --extra genicam --universal --python-version 3.10 --upgrade \
    --custom-compile-command "bash deploy/lock.sh" -o deploy/constraints.txt "$@"
