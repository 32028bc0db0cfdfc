#!/usr/bin/env bash
# The one device check: FLUX.1-dev's real architecture with random weights (no hub access needed),
# the whole pipeline resident (transformer, VAE, CLIP-L, T5-XXL, real-size adapters), on one GPU.
# Prints and writes under $OUT: one row per (tier, size) with s/step, TFLOP/s, text/denoise/decode/
# PNG seconds, end-to-end and 28-step estimate, peak GPU memory, attention backend and kernel,
# compilations during the timed run, PSNR against the quality tier; the adapter hot-swap time and
# the compilations it causes; one sample sheet per size (the tiers side by side, and full-resolution
# centre crops of each).
# It keeps to ~7 minutes (--budget-s, default 400 s for the Python part, hard stop at 450 s) and says
# which rows did not fit.
#
#   bash bench/device_check.sh                 # GPU (cuda:0), 2048 and 4096 px, 4 timed steps per row
#   bash bench/device_check.sh --quick         # CPU, tiny model, seconds (tests/bench runs this)
#   bash bench/device_check.sh --sizes 2048 --tiers quality turbo   # any bench/gpu_generate.py option
#
# Nothing is downloaded. A package missing from the machine's Python (its image has torch,
# transformers, accelerate, peft, safetensors but not diffusers) is installed from wheels in .whl/
# of the repository copy, prepared on a machine with a registry:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1
# (add torchao for the fast tier: a wheel matching that machine's torch). Then run with .whl carried.
# Environment: OUT (default outputs/device_check), PYTHON (default python3), DEVICE (default cuda:0).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/outputs/device_check}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

QUICK=0
if [[ "${1:-}" == "--quick" ]]; then
    QUICK=1
    shift
fi

if ! "$PY" -c "import diffusers" >/dev/null 2>&1; then
    if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
        SITE="$(mktemp -d /tmp/urae-site.XXXXXX)"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$ROOT"/.whl/*.whl
        export PYTHONPATH="$PYTHONPATH:$SITE"
    else
        echo "device_check: diffusers is not importable and .whl/ holds no wheels (see this script's header)" >&2
        exit 2
    fi
fi

{
    echo "== device_check $(date -u +%Y-%m-%dT%H:%M:%SZ) quick=$QUICK"
    if [[ $QUICK -eq 0 ]] && command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true
    fi
    "$PY" -c "import sys, torch, diffusers, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/log.txt"

if [[ $QUICK -eq 1 ]]; then
    ARGS=(--tiny --sizes 64 128 --steps 2 --budget-s 90)
    LIMIT=150
else
    ARGS=(--device "${DEVICE:-cuda:0}" --sizes 2048 4096 --steps 4 --budget-s 400)
    LIMIT=450
fi

set +e
timeout --signal=TERM --kill-after=20 "$LIMIT" "$PY" bench/gpu_generate.py "${ARGS[@]}" --out "$OUT" "$@" 2>&1 | tee -a "$OUT/log.txt"
status=${PIPESTATUS[0]}
set -e
if [[ $status -eq 124 ]]; then
    echo "device_check: stopped at the ${LIMIT} s limit; rows finished so far are in $OUT/rows.json" | tee -a "$OUT/log.txt"
fi
echo "device_check: exit $status; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$status"
