#!/usr/bin/env bash
# The device check: FLUX.1-dev's real architecture with random weights (no hub access needed), the
# whole pipeline resident (transformer, VAE, CLIP-L, T5-XXL, real-size adapters), on one GPU, in two
# parts that each end within a fixed time, imports and model build included:
#
#   bash bench/device_check.sh part1    # <= 7 min (H100): bf16; quality 2K, quality 4K, hot-swap,
#                                       # turbo 4K, attention alone per backend, the adapter slots' share
#   bash bench/device_check.sh part2    # <= 5 min: the 24gb profile (fp8 weights; fast with 8-bit
#                                       # attention) capped at 24 GB; speeds and images against part 1
#   bash bench/device_check.sh --quick  # both parts on the CPU, tiny model, seconds (tests/bench runs it)
#
# Extra arguments go to bench/gpu_generate.py (e.g. `part1 --sizes 2048`). Each part prints a table
# that pastes into BENCHMARKS.md as it is, and writes table.md, rows.json, log.txt and sample sheets
# under $OUT. Part 1 keeps its quality images and rows in outputs/device_reference/ (ignored by git,
# kept between runs on the same machine) for part 2 to compare with.
#
# Nothing is downloaded here: the device's Python has torch, transformers, accelerate, peft and
# safetensors, not diffusers, torchao or sageattention. `bash bench/prepare_device_run.sh`, run where
# the package index is reachable, puts their wheels (for the device's Python) in .whl/ and prints the
# exact commands to run; this script installs .whl/*.whl into a temporary folder, without network.
# Environment: OUT (default outputs/device_check), PYTHON (default python3), DEVICE (default cuda:0).
set -euo pipefail
STARTED=$(date +%s)

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/outputs/device_check}"
PY="${PYTHON:-python3}"
REFERENCE="$ROOT/outputs/device_reference"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Compiled kernels kept in the repository copy (ignored by git): part 2 and any rerun on the same
# machine reuse what part 1 compiled.
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$ROOT/outputs/inductor_cache}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$ROOT/outputs/triton_cache}"

MODE="${1:-}"
case "$MODE" in
    part1|part2|--quick) shift ;;
    *) echo "usage: bash bench/device_check.sh part1|part2|--quick [bench/gpu_generate.py options]" >&2; exit 2 ;;
esac

if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
    SITE="$(mktemp -d /tmp/urae-site.XXXXXX)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$ROOT"/.whl/*.whl
    export PYTHONPATH="$PYTHONPATH:$SITE"
fi
if ! "$PY" -c "import diffusers" >/dev/null 2>&1; then
    echo "device_check: diffusers is not importable and .whl/ holds no wheel of it (bash bench/prepare_device_run.sh)" >&2
    exit 2
fi

{
    echo "== device_check $MODE $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    if [[ "$MODE" != "--quick" ]] && command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true
    fi
    "$PY" - <<'EOF'
import importlib.metadata as m, sys, torch
names = ("diffusers", "transformers", "peft", "accelerate", "torchao", "sageattention", "triton")
found = []
for name in names:
    try:
        found.append(f"{name} {m.version(name)}")
    except m.PackageNotFoundError:
        found.append(f"{name} -")
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, ";", ", ".join(found))
EOF
} 2>&1 | tee "$OUT/log.txt"

# run PART SECONDS ARGS...: bench/gpu_generate.py with a deadline 25 s short of SECONDS after this
# script started (rows start only if they fit before it), stopped hard 15 s after the deadline (the
# table of the rows finished is still written) and killed 5 s after that.
run() {
    local part=$1 seconds=$2
    shift 2
    local deadline=$((STARTED + seconds - 25))
    local limit=$((deadline - $(date +%s) + 15))
    set +e
    timeout --signal=TERM --kill-after=5 "$limit" "$PY" bench/gpu_generate.py --part "$part" --deadline "$deadline" \
        --out "$OUT" --reference-dir "$REFERENCE" "$@" 2>&1 | tee -a "$OUT/log.txt"
    local status=${PIPESTATUS[0]}
    set -e
    if [[ $status -eq 124 ]]; then
        echo "device_check: part $part stopped at its time limit; rows finished so far are in $OUT/rows.json" | tee -a "$OUT/log.txt"
    fi
    return "$status"
}

status=0
case "$MODE" in
    part1) run 1 420 "$@" || status=$? ;;
    part2) run 2 300 "$@" || status=$? ;;
    --quick)
        REFERENCE="$(mktemp -d /tmp/urae-reference.XXXXXX)"
        STARTED=$(date +%s)
        run 1 150 --tiny "$@" || status=$?
        cp "$OUT/table.md" "$OUT/table_part1.md" && cp "$OUT/rows.json" "$OUT/rows_part1.json"
        STARTED=$(date +%s)
        run 2 150 --tiny "$@" || status=$?
        ;;
esac
echo "device_check: exit $status; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$status"
