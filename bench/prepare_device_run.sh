#!/usr/bin/env bash
# Prepares what the device check carries to the GPU machine, and prints the exact commands to run there.
# Run it where the package index is reachable (not on the GPU machine, which has no network):
#
#   bash bench/prepare_device_run.sh           # download into .whl/, check, print the commands
#   bash bench/prepare_device_run.sh --check   # only check what .whl/ holds and print the commands
#
# The GPU machine (one H100 or H200) has Python 3.12, torch 2.11 with CUDA 13, Triton, transformers,
# accelerate, peft and safetensors, but not diffusers, torchao or sageattention. Their wheels go into
# .whl/ (ignored by git; WHEELHOUSE overrides the folder): the versions of requirements.lock when it
# pins them, else those below (DIFFUSERS_VERSION, TORCHAO_VERSION, SAGEATTENTION_VERSION override),
# built for CPython 3.12 on manylinux x86_64, without dependencies (the machine has diffusers' own:
# huggingface-hub, safetensors, numpy, Pillow, regex, requests, filelock). Checked: each wheel's tags
# fit that Python, one version per package, and the repository plus the wheels stay under the 64 MiB
# a run carries. bench/device_check.sh installs .whl/*.whl into a temporary folder on the machine.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
WHEELHOUSE="${WHEELHOUSE:-$ROOT/.whl}"
CARRY_LIMIT=$((64 * 1024 * 1024))

locked() {  # locked NAME DEFAULT: the version requirements.lock pins, else DEFAULT
    local pinned=""
    if [[ -f requirements.lock ]]; then
        pinned="$(sed -n "s/^$1==\([^ ;]*\).*/\1/p" requirements.lock | head -1)"
    fi
    echo "${pinned:-$2}"
}
DIFFUSERS="${DIFFUSERS_VERSION:-$(locked diffusers 0.42.1)}"
TORCHAO="${TORCHAO_VERSION:-$(locked torchao 0.18.0)}"
SAGEATTENTION="${SAGEATTENTION_VERSION:-$(locked sageattention 1.0.6)}"

if [[ "${1:-}" != "--check" ]]; then
    rm -rf "$WHEELHOUSE"
    mkdir -p "$WHEELHOUSE"
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
        platforms+=(--platform "$p")
    done
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
        -d "$WHEELHOUSE" "diffusers==$DIFFUSERS" "torchao==$TORCHAO" "sageattention==$SAGEATTENTION"
fi

"$PY" - "$WHEELHOUSE" "$CARRY_LIMIT" "diffusers==$DIFFUSERS" "torchao==$TORCHAO" "sageattention==$SAGEATTENTION" <<'EOF'
import re
import subprocess
import sys
from pathlib import Path

folder, limit, wanted = Path(sys.argv[1]), int(sys.argv[2]), dict(w.split("==") for w in sys.argv[3:])
problems = []
found = {}
for wheel in sorted(folder.glob("*.whl")):
    # name-version(-build)?-python-abi-platform.whl
    parts = wheel.name[:-4].split("-")
    name, version, python, abi, platform = parts[0].lower().replace("_", "-"), parts[1], parts[-3], parts[-2], parts[-1]
    pythons, abis, platforms = python.split("."), abi.split("."), platform.split(".")
    fits_python = any(p in ("py3", "cp312") or (abi == "abi3" and re.fullmatch(r"cp3(\d+)", p) and int(p[3:]) <= 12)
                      for p in pythons)
    fits_abi = any(a in ("none", "abi3", "cp312") for a in abis)
    fits_platform = any(p == "any" or re.fullmatch(r"manylinux(1|2010|2014|_2_\d+)_x86_64", p) for p in platforms)
    if not (fits_python and fits_abi and fits_platform):
        problems.append(f"{wheel.name}: not for CPython 3.12 on manylinux x86_64")
    found.setdefault(name, []).append(version)
for name, version in wanted.items():
    versions = found.get(name, [])
    if versions != [version]:
        problems.append(f"{name}: want {version}, found {', '.join(versions) or 'none'}")
tracked = subprocess.run(["git", "ls-files", "-z"], capture_output=True, check=True).stdout.split(b"\0")
size = sum(Path(p.decode()).stat().st_size for p in tracked if p and Path(p.decode()).is_file())
wheels = sum(w.stat().st_size for w in folder.glob("*.whl"))
print(f"wheels in {folder}: " + ", ".join(f"{n} {v[0]}" for n, v in sorted(found.items())) + f" ({wheels / 2**20:.1f} MiB)")
print(f"a run carries ~{(size + wheels) / 2**20:.1f} MiB of {limit / 2**20:.0f} (repository {size / 2**20:.1f} MiB)")
if size + wheels > limit:
    problems.append("the repository and the wheels exceed what a run carries")
if problems:
    print("prepare_device_run: " + "; ".join(problems), file=sys.stderr)
    sys.exit(1)
EOF

cat <<EOF

Ready. On the GPU machine, two calls, the second right after the first (while the machine is warm:
part 2 compares with part 1's rows and images, and reuses its compiled kernels):

  1. command: bash bench/device_check.sh part1     carry: [".whl"]   timeout_s: 450
  2. command: bash bench/device_check.sh part2     carry: [".whl"]   timeout_s: 330

Part 1 ends within 7 minutes, part 2 within 5 (imports and model build included). Each prints a table
to paste into BENCHMARKS.md and returns table.md, rows.json, log.txt and sample sheets from \$OUT.
EOF
