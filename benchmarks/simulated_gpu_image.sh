#!/usr/bin/env bash
# The GPU check's rehearsal on the CPU: a simulated GPU image runs `gpu_check.sh --dry-run` to the end.
#
#     bash benchmarks/simulated_gpu_image.sh [--torch-from SITE_PACKAGES] [WORK_DIR]
#                                                         # WORK_DIR: default /tmp/linewatch-gpu-image
#
# 1. WORK_DIR/venv: a fresh venv (no system site packages) holding only packages of the GPU machines'
#    image (benchmarks/gpu_image_packages.txt, from the device tool's KINDS.md) -- those the project
#    uses and whatever they pull in -- and refused if it holds any other package: what the image lacks
#    must come from the wheels, or the run fails. Torch as on the image, a CUDA build (it runs on a CPU
#    too; PyPI's torchvision loads only beside a CUDA torch): --torch-from a site-packages folder that
#    holds one (e.g. the development venv's, .venv/lib/python3.11/site-packages) links its torch,
#    torchvision, triton, nvidia-* and cuda-* distributions into the venv (nothing else of that folder);
#    without it pip installs torch and torchvision from the registry (several GB with CUDA's libraries).
#    Built once; delete WORK_DIR/venv to rebuild.
# 2. WORK_DIR/wheels: `benchmarks/fetch_gpu_wheels.sh --python-version X.Y` for the venv's Python (the
#    image's is 3.12; the wheels are those the real check carries, for this Python).
# 3. `benchmarks/gpu_check.sh --dry-run WORK_DIR/out WORK_DIR/wheels` with the venv's python: it installs
#    the wheels with the device README's `pip install --no-index --no-deps --target` (into
#    WORK_DIR/site) and PYTHONPATH, as on the GPU machine, then runs every step on the CPU at tiny sizes.
#    Its wall time is measured and printed; torch.compile's caches start empty, as on a bare GPU machine.
# 4. `pytest -m cuda --collect-only tests` (the whole suite's modules imported) in that environment:
#    every CUDA-marked test collected, no collection error.
# Exit 0 only if every step of the dry run ended ok and the collection is clean. WORK_DIR/out keeps the
# dry run's files (summary.json, preflight.json, ... as a GPU run leaves them).
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
fi
REPO="$(cd "$(dirname "$0")/.." && pwd)"
TORCH_FROM=""
if [[ "${1:-}" == "--torch-from" ]]; then
    TORCH_FROM="$(cd "$2" && pwd)"
    shift 2
fi
WORK="$(mkdir -p "${1:-/tmp/linewatch-gpu-image}" && cd "${1:-/tmp/linewatch-gpu-image}" && pwd)"
BASE_PYTHON="${PYTHON:-python3}"
VENV="$WORK/venv"
PY="$VENV/bin/python"

# The image's packages that linewatch, its tests and the check import (the rest of the image is not needed).
IMAGE_PACKAGES=(
    timm numpy scipy opencv-python-headless pillow prometheus-client pyyaml safetensors tqdm filelock packaging
    attrs typing-extensions pytest pytest-timeout pytest-xdist scikit-learn
    # the image's huggingface-hub (timm's need; KINDS.md: 1.33.0): newer ones pull in packages it lacks
    "huggingface-hub==1.33.0"
    # torch's own needs
    sympy networkx jinja2 fsspec setuptools
)

if [[ ! -f "$VENV/.complete" ]]; then
    echo "==> building the simulated image in $VENV"
    rm -rf "$VENV"
    "$BASE_PYTHON" -m venv "$VENV"
    if [[ -n "$TORCH_FROM" ]]; then
        "$PY" "$REPO/benchmarks/link_distributions.py" "$TORCH_FROM" \
            "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
            torch torchvision triton 'nvidia-*' 'cuda-*'
        "$PY" -m pip install -q "${IMAGE_PACKAGES[@]}"
    else
        "$PY" -m pip install -q torch "torchvision<=0.29.1" "${IMAGE_PACKAGES[@]}"
    fi
    touch "$VENV/.complete"
fi

# Nothing but the image's packages: a package the image lacks would hide a missing wheel.
"$PY" -I - "$REPO/benchmarks/gpu_image_packages.txt" <<'EOF'  # -I: not the current folder (a checkout's own egg-info)
import importlib.metadata as md
import re
import sys

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

image = {norm(line.strip()) for line in open(sys.argv[1]) if line.strip() and not line.startswith("#")}
installed = sorted({norm(d.metadata["Name"]) for d in md.distributions()})
extra = [n for n in installed if n not in image]
if extra:
    sys.exit(f"simulated image: the venv holds packages the GPU image lacks: {', '.join(extra)}")
print(f"simulated image: {len(installed)} distributions, all in the GPU image's list")
EOF

PY_VERSION="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
echo "==> wheels for CPython $PY_VERSION"
PYTHON="$BASE_PYTHON" bash "$REPO/benchmarks/fetch_gpu_wheels.sh" --python-version "$PY_VERSION" "$WORK/wheels" | tail -n 1

echo "==> gpu_check.sh --dry-run"
rm -rf "$WORK/out" "$WORK/site" "$WORK/inductor-cache"
# torch.compile's caches start empty, as on a GPU machine (each starts bare): the first serve compiles cold
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor-cache"
t0="$(date +%s.%N)"
set +e
PYTHON="$PY" GPU_CHECK_SITE="$WORK/site" bash "$REPO/benchmarks/gpu_check.sh" --dry-run "$WORK/out" "$WORK/wheels"
rc=$?
set -e
dry_s="$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')"
echo "gpu_check.sh --dry-run: exit $rc after $dry_s s"

echo "==> pytest -m cuda --collect-only tests (every test module imported)"
set +e
collect="$(cd "$REPO" && PYTHONPATH="$WORK/site:$REPO" "$PY" -m pytest -m cuda --collect-only -q -p no:cacheprovider tests 2>&1)"
crc=$?
set -e
echo "$collect" | tail -n 12
if (( crc != 0 )) || echo "$collect" | grep -qi "error"; then
    echo "simulated image: collection failed (exit $crc)"
    exit 1
fi
if (( rc != 0 )); then
    echo "simulated image: the dry run failed; see $WORK/out/summary.json and $WORK/out/logs.tgz"
    exit 1
fi
echo "simulated image: dry run ok in $dry_s s; every CUDA-marked test collected; files in $WORK/out"
