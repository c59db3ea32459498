#!/usr/bin/env bash
# Download, on a machine that reaches the package registry, the wheels that the GPU machine lacks
# (manylinux x86-64, CPython 3.12 unless --python-version says otherwise), into DEST (default
# <repo>/.whl, git-ignored). benchmarks/gpu_check.sh installs them there with
# `pip install --no-index --no-deps --target` and PYTHONPATH, as the device tool's README says.
#
#     bash benchmarks/fetch_gpu_wheels.sh [--python-version X.Y] [DEST]
#
# The GPU machine's image ('cuda'; the device tool's KINDS.md lists its packages) has torch,
# torchvision, timm, numpy, scipy, opencv-python-headless, pillow, prometheus-client, pyyaml,
# safetensors, tqdm, filelock, attrs, packaging, typing-extensions and pytest with pytest-timeout
# and pytest-xdist, but no network. What else gpu_check.sh imports -- linewatch's own
# dependencies, those of the test modules it collects (`pytest -m cuda` imports every test
# module), and what those need -- is WHEELS below, one version each (two wheels of one package
# stop the whole install): the version deploy/constraints.txt pins for that Python.
# typing-extensions is in the image too, but pydantic needs a recent one: it travels as well.
# benchmarks/simulated_gpu_image.sh proves the list: a venv holding only the image's packages
# plus these wheels runs `gpu_check.sh --dry-run` to the end.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
PY_VERSION=3.12
DEST=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --python-version) PY_VERSION="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "fetch_gpu_wheels.sh: unknown option $1" >&2; exit 2 ;;
        *) DEST="$1"; shift ;;
    esac
done
DEST="${DEST:-$REPO/.whl}"

WHEELS=(
    # linewatch's dependencies (pyproject.toml) that the image lacks
    segment-anything pyzmq structlog pydantic paho-mqtt
    # what pydantic needs
    pydantic-core annotated-types typing-inspection typing-extensions
    # the tests' (pyproject.toml's dev extras; imported at the top of test modules)
    imagezmq jsonschema
    # what jsonschema needs (attrs is in the image)
    jsonschema-specifications referencing rpds-py
)

# name==version as deploy/constraints.txt pins it for this Python on Linux x86-64
SPECS="$("$PYTHON" - "$REPO/deploy/constraints.txt" "$PY_VERSION" "${WHEELS[@]}" <<'EOF'
import re
import sys

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # pip always carries its own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

path, version, *names = sys.argv[1:]
env = {"python_version": version, "python_full_version": version + ".0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython"}
pins = {}
for line in open(path):
    line = line.split("#", 1)[0].strip()
    if not line or line.startswith("-"):
        continue
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate(env):
        continue
    exact = [s.version for s in req.specifier if s.operator == "=="]
    if exact:
        pins[canonicalize_name(req.name)] = exact[0]
missing = [n for n in names if canonicalize_name(n) not in pins]
if missing:
    sys.exit(f"fetch_gpu_wheels.sh: deploy/constraints.txt pins no version of {', '.join(missing)} for Python {version}")
print("\n".join(f"{n}=={pins[canonicalize_name(n)]}" for n in names))
EOF
)"

PLATFORMS=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for n in $(seq 17 35); do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two wheels of one package stop the whole install
# shellcheck disable=SC2086
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" $SPECS
count="$(ls "$DEST"/*.whl | wc -l)"
if (( count != ${#WHEELS[@]} )); then
    echo "fetch_gpu_wheels.sh: expected ${#WHEELS[@]} wheels in $DEST, found $count" >&2
    exit 1
fi
ls -l "$DEST"
echo "$count wheels for CPython $PY_VERSION, $(du -sh "$DEST" | cut -f1) in $DEST"
