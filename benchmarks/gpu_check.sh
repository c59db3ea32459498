#!/usr/bin/env bash
# GPU check: one prepared run for a borrowed GPU machine (one H100/H200, no network), under 8 minutes.
#
#     bash benchmarks/gpu_check.sh OUT_DIR [WHEEL_DIR]
#
# WHEEL_DIR (default <repo>/.whl, git-ignored) holds the wheels the GPU machine lacks, fetched beforehand on a
# machine with the package registry by `bash benchmarks/fetch_gpu_wheels.sh`. They are installed into /tmp/site,
# and PYTHONPATH=/tmp/site:<repo> runs this checkout without `pip install -e`.
# With the device tool: carry [".whl"], command `bash benchmarks/gpu_check.sh $OUT`, timeout_s 540.
#
# Steps, each under its own `timeout` (plus 15 s to die), together within GPU_CHECK_BUDGET_S (default 450 s: a step
# gets at most what is left); a failing step does not stop the next one:
#   cuda_tests           pytest -m cuda (tests marked `cuda`; pytest exits 5 when none is marked)      <= 120 s
#   detector_bench       benchmarks/detector_bench.py, samlad-random on cuda, 1024x1024 frames, 32x32 SAM grid,
#                        batch 1-16, fp32 + bf16, the batched mask generator, full_grid and
#                        reference_seeded prompts                                                      <= 150 s
#   detector_bench_sam   the same with segment-anything's generator (fp32 only: it hands its tensors to
#                        numpy), batch 1 and 4, full_grid only (its cost per image keeps larger batches
#                        out of the time budget)                                                       <= 80 s
#   e2e                  benchmarks/gpu_e2e.py: bank build + `linewatch serve` + replay at 30 and 100
#                        frames/s, 30 s each, verdicts/latency/GPU memory                                <= 200 s
# OUT_DIR receives env.txt (nvidia-smi, versions), summary.json (each step's exit status, wall and timeout
# seconds; 124 = killed by its timeout), cuda_tests.xml, detector_bench.json, detector_bench_sam.json, e2e.json
# and logs.tgz (every step's output and the daemon's log): 7 files, within the 8 the device tool returns.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    usage
    [[ $# -ge 1 ]] && exit 0 || exit 2
fi

REPO="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
WHEELS="${2:-$REPO/.whl}"
PY="${PYTHON:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-450}"
T_START="$(date +%s.%N)"
STEPS=()
mkdir -p "$OUT/logs"
cd "$REPO"

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

write_summary() {
    local IFS=,
    printf '{\n  "created": "%s",\n  "budget_s": %s,\n  "total_s": %s,\n  "exit_codes": "%s",\n' \
        "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$BUDGET_S" "$(elapsed "$T_START")" \
        "0 ok; 124 killed by its timeout; 125 not run (budget spent); pytest 5 = no test selected" > "$OUT/summary.json"
    printf '  "steps": {%s\n  }\n}\n' "${STEPS[*]}" >> "$OUT/summary.json"
}

# step NAME CAP_S COMMAND...: run COMMAND under min(CAP_S, budget left) seconds, output in logs/NAME.log.
step() {
    local name="$1" cap="$2"
    shift 2
    local used left limit rc t0
    used="$(elapsed "$T_START")"
    left="$(awk -v b="$BUDGET_S" -v u="$used" 'BEGIN { printf "%d", b - u }')"
    limit=$(( cap < left ? cap : left ))
    t0="$(date +%s.%N)"
    if (( limit < 15 )); then
        echo "not run: the budget of ${BUDGET_S} s is spent" > "$OUT/logs/$name.log"
        rc=125
    else
        echo "==> $name (timeout ${limit} s): $*"
        set +e
        timeout --kill-after=15 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
        rc=$?
        set -e
    fi
    echo "<== $name: exit $rc after $(elapsed "$t0") s; end of its log:"
    tail -n 25 "$OUT/logs/$name.log" | sed 's/^/    /'
    STEPS+=("$(printf '\n    "%s": {"exit": %d, "wall_s": %s, "timeout_s": %d}' \
        "$name" "$rc" "$(elapsed "$t0")" "$limit")")
    write_summary
}

step install 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl
export PYTHONPATH="/tmp/site:$REPO"
export PYTHONUNBUFFERED=1

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "repo: $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
    nvidia-smi || echo "nvidia-smi failed"
    "$PY" - <<'EOF' || echo "python version report failed"
import importlib.metadata as md
import platform

import torch

print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version(), "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs")
for dist in ("torchvision", "timm", "numpy", "opencv-python-headless", "pillow", "segment-anything", "pyzmq",
             "pydantic", "structlog", "safetensors", "pytest", "pytest-timeout", "scikit-learn"):
    try:
        print(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist} MISSING")
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step cuda_tests 120 "$PY" -m pytest -m cuda -q -p no:cacheprovider --junitxml "$OUT/cuda_tests.xml" tests

step detector_bench 150 "$PY" benchmarks/detector_bench.py --backends samlad-random --devices cuda \
    --source-size 1024 --image-size 224 --sam-points 32 --batch-sizes 1 4 8 16 --repeats 5 --no-naive \
    --precisions fp32 bf16 --generators batched --prompts full_grid reference_seeded --out "$OUT/detector_bench.json"

step detector_bench_sam 80 "$PY" benchmarks/detector_bench.py --backends samlad-random --devices cuda \
    --source-size 1024 --image-size 224 --sam-points 32 --batch-sizes 1 4 --repeats 5 --no-naive \
    --precisions fp32 --generators segment_anything --prompts full_grid --out "$OUT/detector_bench_sam.json"

step e2e 200 "$PY" benchmarks/gpu_e2e.py --out "$OUT/e2e.json" --duration 30 --rates 30 100 --logs "$OUT/logs/e2e"

write_summary
tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -r "$OUT/logs"
echo "summary: $(tr -d '\n' < "$OUT/summary.json")"
grep -q '"exit": [1-9]' "$OUT/summary.json" && exit 1 || exit 0
