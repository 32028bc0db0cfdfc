#!/usr/bin/env bash
# Fill docker/wheelhouse with every wheel the API and worker images install, at the versions of
# requirements.lock, torch as its CPU build. Image builds use these wheels first; with the build
# argument PIP_NO_INDEX=1 they reach no package index at all (CI: the index is not reachable from a
# build there). PYTHON: the interpreter whose environment markers decide which wheels are needed, the
# images' Python: CPython 3.11 on Linux x86_64; for the stand-in base (docker/standins), Debian's
# /usr/bin/python3.11 (3.11.2, which needs async-timeout where a newer 3.11 does not).
#
#   PYTHON=/usr/bin/python3.11 bash docker/prepare-wheelhouse.sh
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash docker/prepare-wheelhouse.sh  # where pip
#       is not already configured with a source of torch's CPU wheel
set -euo pipefail
cd "$(dirname "$0")/.."
dest=docker/wheelhouse
python=${PYTHON:-python3}
torch=$(grep -E '^torch==' requirements.lock)
torch_index=()
[ -n "${TORCH_INDEX_URL:-}" ] && torch_index=(--extra-index-url "$TORCH_INDEX_URL")
download() { "$python" -m pip download --quiet --only-binary=:all: --dest "$dest" --find-links "$dest" -c requirements.lock "$@"; }
# torch first: its CPU wheel in the folder is then what the other downloads resolve torch to.
download "${torch_index[@]}" "$torch"
download -r docker/requirements-api.txt
# The project's build backend (pip builds /src in the images).
download "setuptools>=69"
"$python" -m pip download --quiet --dest "$dest" --find-links "$dest" -c requirements.lock ".[train,gpu]"
# pip download saves the project itself as an archive: the images build it from /src instead.
rm -f "$dest"/urae_serve-* "$dest"/urae-serve-*
echo "$dest: $(find "$dest" -name '*.whl' | wc -l) wheels, $(du -sh "$dest" | cut -f1)"
