#!/usr/bin/env bash
# gpu_check.sh OUTDIR: on a machine with an NVIDIA GPU and no network, build tunefast in place, run the
# GPU tests and the benchmarks, and write what happened to OUTDIR, in under 8 minutes:
#
#   OUTDIR/log.txt                everything printed, by every step
#   OUTDIR/summary.md             the steps (exit code, seconds), then the benchmark tables
#   OUTDIR/results.jsonl, .csv    one row per benchmark variant (benchmarks/README.md: columns)
#   OUTDIR/pytest_benchmark.json  pytest-benchmark's own report of the same samples
#   OUTDIR/cache/lora_path.json   the LoRA path chosen per shape class, with both measured times
#
# Exit status: 0 when the build, the GPU tests and the benchmarks all passed; 1 otherwise (OUTDIR still
# holds whatever was measured); 2 when no GPU is visible (set GPU_CHECK_ALLOW_CPU=1 for a CPU dry run).
#
# Environment (all optional):
#   PYTHON                interpreter to build and test with (default: python3)
#   GPU_CHECK_ALLOW_CPU=1 dry run without a GPU: CPU-sized benchmarks (the script's logic, not the GPU)
#   GPU_CHECK_QUICK=1     benchmarks as a smoke run (one step per variant, nothing timed)
#   GPU_CHECK_SKIP_BUILD=1  use the tunefast already importable (no pip install)
#   GPU_CHECK_BUDGET_S    wall-clock budget for all steps (default 450); each step's timeout is cut to fit
#   GPU_CHECK_BENCH       what pytest runs as benchmarks (default: benchmarks), e.g. benchmarks/bench_lora.py
#   GPU_CHECK_BENCH_ARGS  more pytest arguments for the benchmarks, e.g. "-k layer --bench-time 1"
#   TUNEFAST_COMMIT       commit recorded in the results when the tree has no .git (a copied tree)
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 64
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
START=$(date +%s)
DEADLINE=$((START + BUDGET))

exec > >(tee -a "$OUT/log.txt") 2>&1

# Nothing may reach for the network; Triton must compile for the GPU, never interpret (tests/conftest.py
# only setdefault()s TRITON_INTERPRET=1, so this 0 stands; Triton reads "0" as off).
export TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [[ -z ${TUNEFAST_COMMIT:-} ]] && git -C "$ROOT" rev-parse HEAD >/dev/null 2>&1; then
    TUNEFAST_COMMIT=$(git -C "$ROOT" rev-parse --short=12 HEAD)
fi
export TUNEFAST_COMMIT=${TUNEFAST_COMMIT:-unknown}
# The LoRA op's GPU path (fused Triton GEMM or cuBLAS + low-rank epilogue) is timed per shape class on
# first use and cached on disk (tunefast/ops/lora_path.py): a cache private to this run, so every
# shape is measured here, and the lora-paths step below prints each choice with both times.
export TUNEFAST_CACHE_DIR=${TUNEFAST_CACHE_DIR:-$OUT/cache}

STATUS=0
STEPS=()

# step [--allow-empty] NAME MAX_SECONDS CMD...: run CMD under a timeout of min(MAX_SECONDS, time
# left), log its exit code and duration; a failure sets STATUS=1 but never stops the script.
# --allow-empty: pytest's exit code 5 (no test selected, e.g. nothing is marked gpu yet) is a pass.
step() {
    local allow_empty=0 name max rc=0 t0 took left limit
    if [[ $1 == --allow-empty ]]; then allow_empty=1; shift; fi
    name=$1 max=$2
    shift 2
    left=$((DEADLINE - $(date +%s)))
    limit=$((max < left ? max : left))
    if ((limit < 10)); then
        echo "=== $name: skipped, ${left}s of the ${BUDGET}s budget left"
        STEPS+=("| $name | skipped (out of time) | 0 |")
        STATUS=1
        return 0
    fi
    echo "=== $name (timeout ${limit}s): $*"
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" || rc=$?
    took=$(($(date +%s) - t0))
    if ((rc == 5 && allow_empty)); then
        STEPS+=("| $name | ok (no test selected) | $took |")
    elif ((rc == 0)); then
        STEPS+=("| $name | ok | $took |")
    elif ((rc == 124 || rc == 137)); then
        STEPS+=("| $name | timed out after ${limit}s | $took |")
        STATUS=1
    else
        STEPS+=("| $name | failed (exit $rc) | $took |")
        STATUS=1
    fi
    echo "=== $name: exit $rc after ${took}s"
    return 0
}

write_summary() {
    local bench
    bench=$(cat "$OUT/summary.md" 2>/dev/null || true)
    # The harness writes OUT/summary.md as it goes; keep its tables below the steps.
    [[ $bench == "# tunefast gpu_check"* ]] && bench=$(sed -n '/^# tunefast benchmarks/,$p' "$OUT/summary.md")
    {
        echo "# tunefast gpu_check"
        echo
        echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), commit $TUNEFAST_COMMIT, device: ${DEVICE_NAME:-unknown};" \
            "exit status $STATUS, $(($(date +%s) - START))s in all"
        echo
        echo "| step | result | seconds |"
        echo "|---|---|---|"
        printf '%s\n' "${STEPS[@]}"
        echo
        if [[ -n $bench ]]; then echo "$bench"; else echo "No benchmark results."; fi
    } >"$OUT/summary.md.tmp"
    mv "$OUT/summary.md.tmp" "$OUT/summary.md"
}
trap write_summary EXIT

echo "=== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) in $ROOT, commit $TUNEFAST_COMMIT, output $OUT"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem \
    --format=csv || echo "(no nvidia-smi)"
"$PY" - <<'EOF' || true
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
for name in ("triton", "transformers", "peft", "pytest_benchmark"):
    try:
        print(name, __import__(name).__version__)
    except Exception as e:
        print(name, "unavailable:", e)
EOF

DEVICE_NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
    2>/dev/null || echo unknown)
BENCH_ARGS=()
if [[ $DEVICE_NAME == cpu || $DEVICE_NAME == unknown ]]; then
    if [[ ${GPU_CHECK_ALLOW_CPU:-0} != 1 ]]; then
        echo "no CUDA device visible to $PY (set GPU_CHECK_ALLOW_CPU=1 for a CPU dry run)"
        STATUS=2
        exit 2
    fi
    echo "=== dry run on CPU (GPU_CHECK_ALLOW_CPU=1): CPU-sized benchmarks, GPU tests skip themselves"
    BENCH_ARGS+=(--bench-device cpu)
fi

if [[ ${GPU_CHECK_SKIP_BUILD:-0} != 1 ]]; then
    # Editable: the CMake build (tunefast._C, tunefast._C_cuda when nvcc is found) lands in build/ and
    # the package imports from this tree, kernels/ as tunefast.kernels. No index: deps are preinstalled.
    step build 240 "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .
fi

"$PY" -m tunefast info 2>/dev/null \
    || "$PY" -c "import json, tunefast._native as n; print(json.dumps(n.status(), indent=1))" \
    || echo "(tunefast does not import)"

# Correctness over many shapes and dtypes: one fixed config per kernel (kernels/launch.py), not a search.
step --allow-empty gpu-tests 150 env TUNEFAST_AUTOTUNE=0 "$PY" -m pytest tests -m gpu -q -p no:cacheprovider -rs

# The AOT check's GPU twin (benchmarks/aot.py --device): every fixed config the launchers choose on this
# device, for every dtype and shape class, compiled and launched once on zero-filled inputs.
step aot-twin 120 "$PY" -m benchmarks.aot --device

if [[ ${GPU_CHECK_QUICK:-0} == 1 ]]; then
    BENCH_ARGS+=(--benchmark-disable)
else
    BENCH_ARGS+=(--benchmark-enable --benchmark-json "$OUT/pytest_benchmark.json")
fi
# shellcheck disable=SC2086  # GPU_CHECK_BENCH(_ARGS) are word lists
step benchmarks 300 "$PY" -m pytest ${GPU_CHECK_BENCH:-benchmarks} -q -p no:cacheprovider -rs --bench-out "$OUT" \
    "${BENCH_ARGS[@]}" ${GPU_CHECK_BENCH_ARGS:-}

# Which LoRA path each benchmarked shape ran, with both measured times (the rows' info has them too).
# Informational: never changes the exit status.
echo "=== LoRA GPU path per shape class (tunefast/ops/lora_path.py)"
timeout 30 "$PY" -c "from tunefast.ops import lora_path; print(*lora_path.describe(), sep='\n')" \
    || echo "(the LoRA path choices could not be read)"

echo "=== gpu_check done: exit status $STATUS after $(($(date +%s) - START))s; results in $OUT"
exit "$STATUS"
