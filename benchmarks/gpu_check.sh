#!/usr/bin/env bash
# GPU check: one prepared run for a borrowed GPU machine (one H100/H200, no network), within 6 minutes.
#
#     bash benchmarks/gpu_check.sh [--dry-run] OUT_DIR [WHEEL_DIR]
#
# WHEEL_DIR (default <repo>/.whl, git-ignored) holds the wheels the GPU image lacks, fetched beforehand on a
# machine with the package registry by `bash benchmarks/fetch_gpu_wheels.sh`. They are installed with
# `pip install --no-index --no-deps --target $GPU_CHECK_SITE` (default /tmp/site), and
# PYTHONPATH=$GPU_CHECK_SITE:<repo> runs this checkout without `pip install -e`.
# With the device tool: carry [".whl"], command `bash benchmarks/gpu_check.sh $OUT .whl`, timeout_s 420.
# --dry-run: every step on the CPU at tiny sizes (tiny random models, 128 px frames, a 2 x 2 grid): the
# rehearsal that benchmarks/simulated_gpu_image.sh runs in a venv holding only the GPU image's packages.
#
# Steps in order of value, each under its own `timeout` (then 10 s to die), together within
# GPU_CHECK_BUDGET_S (default 345 s; 1500 with --dry-run): a step gets at most what is left, and one that
# would get under 15 s is not run. A failing step does not stop the next one; a failing preflight stops all.
#   install           the wheels into $GPU_CHECK_SITE                                                 <= 30 s
#   preflight         benchmarks/gpu_preflight.py: every module the steps import, the wheels' own
#                     requirements, every linewatch module, CUDA + bf16 + Triton, the CUDA-marked tests
#                     collected; names everything missing at once; stops the check if anything is  <= 30 s
#                     (--dry-run: 90 s)
#   e2e               benchmarks/gpu_e2e.py in the target configuration: random-weight checkpoints in the
#                     official layouts, 1024 x 1024 frames, bf16, k=2, reference-seeded prompts, serve
#                     compiled (detector.compile; the bank build is not), fed at 30 and 240 frames/s for
#                     15 s each, then a restart timed to ready                                        <= 170 s
#   cuda_tests        pytest -m cuda on the modules holding CUDA-marked tests                          <= 60 s
#   bench_precision   detector_bench: fp32 vs bf16, batched generator, reference-seeded, batch 8       <= 60 s
#   bench_generators  detector_bench: segment-anything's generator vs the batched one, fp32, 16 x 16
#                     grid, batch 1 (segment-anything's costs a host sync per mask)                   <= 60 s
#   bench_grid        detector_bench: the full 32 x 32 grid, bf16, batch 1, 8 and 16                  <= 60 s
# OUT_DIR receives, each as soon as its step ends (a run stopped midway returns what finished; the bench
# and e2e JSON also grow during their step): summary.json (each step's exit status, wall and timeout
# seconds; 124 = killed by its timeout, 125 = not run), preflight.json (versions, device, what is missing),
# e2e.json, cuda_tests.xml, bench_precision.json, bench_generators.json, bench_grid.json, and logs.tgz
# (every step's output and the daemon's log, re-packed after each step): 8 files, the device tool's limit.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
DRY_RUN=0
ARGS=()
for a in "$@"; do
    case "$a" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) usage; exit 0 ;;
        *) ARGS+=("$a") ;;
    esac
done
if [[ ${#ARGS[@]} -lt 1 ]]; then
    usage
    exit 2
fi

REPO="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "${ARGS[0]}"
OUT="$(cd "${ARGS[0]}" && pwd)"
WHEELS="${ARGS[1]:-$REPO/.whl}"
[[ -d "$WHEELS" ]] && WHEELS="$(cd "$WHEELS" && pwd)"  # a relative WHEEL_DIR names the caller's folder
PY="${PYTHON:-python3}"
SITE="${GPU_CHECK_SITE:-/tmp/site}"
if (( DRY_RUN )); then BUDGET_S="${GPU_CHECK_BUDGET_S:-1500}"; else BUDGET_S="${GPU_CHECK_BUDGET_S:-345}"; fi
LOGS="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-logs.XXXXXX")"  # packed into OUT_DIR/logs.tgz after every step
trap 'rm -rf "$LOGS"' EXIT
T_START="$(date +%s.%N)"
STEPS=()
cd "$REPO"

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

write_summary() {
    local IFS=,
    local ok=true
    for s in "${STEPS[@]}"; do [[ "$s" == *'"ok": false'* ]] && ok=false; done
    printf '{\n  "created": "%s",\n  "dry_run": %s,\n  "budget_s": %s,\n  "total_s": %s,\n  "ok": %s,\n  "exit_codes": "%s",\n' \
        "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$([[ $DRY_RUN == 1 ]] && echo true || echo false)" "$BUDGET_S" \
        "$(elapsed "$T_START")" "$ok" \
        "0 ok; 124 killed by its timeout; 125 not run (budget spent, or the preflight failed)" > "$OUT/summary.json.tmp"
    printf '  "steps": {%s\n  }\n}\n' "${STEPS[*]}" >> "$OUT/summary.json.tmp"
    mv "$OUT/summary.json.tmp" "$OUT/summary.json"
    tar -czf "$OUT/logs.tgz.tmp" -C "$LOGS" . && mv "$OUT/logs.tgz.tmp" "$OUT/logs.tgz"
}

record() {  # record NAME RC WALL_S LIMIT_S
    STEPS+=("$(printf '\n    "%s": {"ok": %s, "exit": %d, "wall_s": %s, "timeout_s": %d}' \
        "$1" "$([[ $2 == 0 ]] && echo true || echo false)" "$2" "$3" "$4")")
    write_summary
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
        echo "not run: the budget of ${BUDGET_S} s is spent" > "$LOGS/$name.log"
        rc=125
    else
        echo "==> $name (timeout ${limit} s): $*"
        set +e
        timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
        rc=$?
        set -e
    fi
    echo "<== $name: exit $rc after $(elapsed "$t0") s; end of its log:"
    tail -n 12 "$LOGS/$name.log" | sed 's/^/    /'
    record "$name" "$rc" "$(elapsed "$t0")" "$limit"
    return 0
}

skip() {  # skip NAME WHY: a step not run
    echo "not run: $2" > "$LOGS/$1.log"
    record "$1" 125 0.0 0
}

install_wheels() {
    shopt -s nullglob
    local wheels=("$WHEELS"/*.whl)
    if (( ${#wheels[@]} == 0 )); then
        echo "no wheels in $WHEELS: nothing installed (the preflight says what is missing)"
        return 0
    fi
    rm -rf "$SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
    echo "installed ${#wheels[@]} wheels into $SITE"
}

export -f install_wheels
export WHEELS SITE PY
step install 30 bash -c install_wheels
export PYTHONPATH="$SITE:$REPO"
export PYTHONUNBUFFERED=1

DRY=()
(( DRY_RUN )) && DRY=(--dry-run)
# 30 s on the GPU machine; a dry run's 2 busy cores import torch and the test modules slower
CAP_PREFLIGHT=30
(( DRY_RUN )) && CAP_PREFLIGHT=90
step preflight "$CAP_PREFLIGHT" "$PY" benchmarks/gpu_preflight.py --out "$OUT/preflight.json" --site "$SITE" "${DRY[@]}"
if [[ "${STEPS[-1]}" != *'"ok": true'* ]]; then
    for name in e2e cuda_tests bench_precision bench_generators bench_grid; do
        skip "$name" "the preflight failed (preflight.json, logs/preflight.log say what is missing)"
    done
    echo "summary: $(tr -d '\n' < "$OUT/summary.json")"
    exit 1
fi

# The target configuration (issue #20): bf16, k=2, reference-seeded prompts, serve compiled.
TARGET=(--set detector.precision=bf16 --set detector.k_references=2 --set detector.samlad.sam.prompts=reference_seeded
        --serve-set detector.compile=true --restart)
if (( DRY_RUN )); then
    E2E=(--device cpu --tiny --size 128 --duration 3 --rates 2 4 --good 3 --validation 2 --test-per-kind 1
         --warmup-frames 1 --ready-timeout 400)
    BENCH=(--backends samlad-tiny --devices cpu --source-size 128 --image-size 112 --k 2 --good 3 --repeats 1
           --no-naive --sam-points 2 --coarse-points 1)
    BATCH=(--batch-sizes 2); BATCH_GRID=(--batch-sizes 1 2); GEN_POINTS=(--sam-points 2); GEN_GOOD=(--good 3)
    CAP_E2E=600; CAP_TESTS=240; CAP_BENCH=200
else
    E2E=(--device cuda --size 1024 --duration 15 --rates 30 240 --good 10 --validation 5 --test-per-kind 4
         --ready-timeout 150)
    BENCH=(--backends samlad-random --devices cuda --source-size 1024 --image-size 224 --k 2 --good 4 --repeats 3
           --no-naive --sam-points 32)
    BATCH=(--batch-sizes 8); BATCH_GRID=(--batch-sizes 1 8 16); GEN_POINTS=(--sam-points 16); GEN_GOOD=(--good 3)
    CAP_E2E=170; CAP_TESTS=60; CAP_BENCH=60
fi

step e2e "$CAP_E2E" "$PY" benchmarks/gpu_e2e.py --out "$OUT/e2e.json" --logs "$LOGS/e2e" "${E2E[@]}" "${TARGET[@]}"

mapfile -t CUDA_FILES < <(grep -rl --include='test_*.py' 'pytest.mark.cuda' tests | sort)
step cuda_tests "$CAP_TESTS" "$PY" -m pytest -m cuda -q -p no:cacheprovider -rA --junitxml "$OUT/cuda_tests.xml" \
    "${CUDA_FILES[@]}"

step bench_precision "$CAP_BENCH" "$PY" benchmarks/detector_bench.py "${BENCH[@]}" "${BATCH[@]}" \
    --precisions fp32 bf16 --generators batched --prompts reference_seeded --out "$OUT/bench_precision.json"

step bench_generators "$CAP_BENCH" "$PY" benchmarks/detector_bench.py "${BENCH[@]}" "${GEN_POINTS[@]}" "${GEN_GOOD[@]}" \
    --batch-sizes 1 --repeats 2 --precisions fp32 --generators batched segment_anything --prompts full_grid \
    --out "$OUT/bench_generators.json"

step bench_grid "$CAP_BENCH" "$PY" benchmarks/detector_bench.py "${BENCH[@]}" "${BATCH_GRID[@]}" \
    --precisions bf16 --generators batched --prompts full_grid --out "$OUT/bench_grid.json"

write_summary
echo "summary: $(tr -d '\n' < "$OUT/summary.json")"
grep -q '"ok": false' "$OUT/summary.json" && exit 1 || exit 0
