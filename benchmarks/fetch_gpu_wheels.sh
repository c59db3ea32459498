#!/usr/bin/env bash
# Download, on a machine that reaches the package registry, the wheels that the GPU machine
# lacks (CPython 3.12, manylinux x86-64), into .whl/ at the repository root (git-ignored).
#
#     bash benchmarks/fetch_gpu_wheels.sh [DEST]      # DEST defaults to <repo>/.whl
#
# The GPU machine has torch (CUDA), torchvision, timm, numpy, opencv-python-headless, pytest,
# scikit-learn, safetensors, pyyaml and prometheus-client, but no network. Everything else that
# pyproject.toml needs at run time or for the tests (dev extras) travels as a wheel, with the
# needs of those wheels that are not on that list either. Versions are those installed in the
# development venv (/work/main/.venv, `pip list`), so the GPU run uses what the tests here use.
# benchmarks/gpu_check.sh installs them with `pip install --no-index --no-deps --target`.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${1:-$REPO/.whl}"
PYTHON="${PYTHON:-python3}"

WHEELS=(
    # runtime dependencies of pyproject.toml
    segment-anything==1.0
    pyzmq==27.3.0
    structlog==26.1.0
    pydantic==2.14.4
    tqdm==4.70.1
    pillow==13.0.0            # listed as uncertain on the GPU machine; a wheel costs little
    # what pydantic needs
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0
    # dev extras of pyproject.toml
    pytest-timeout==2.4.0
    imagezmq==1.2.0
)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two wheels of one package stop the whole install
for spec in "${WHEELS[@]}"; do
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "$spec"
done
ls -l "$DEST"
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
