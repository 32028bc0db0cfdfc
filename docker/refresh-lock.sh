#!/usr/bin/env bash
# Resolve requirements.lock: every dependency of pyproject.toml, all extras, for CPython 3.11 on Linux
# x86_64 (CI, the images), with the pins of docker/lock-pins.txt. CI, both Dockerfiles and the README's
# install use it as pip constraints (-c requirements.lock).
#
#   bash docker/refresh-lock.sh                      # add what pyproject.toml gained; keep every other pin
#   bash docker/refresh-lock.sh --upgrade            # newest versions of everything
#   bash docker/refresh-lock.sh --upgrade-package X  # newest X (and what it needs)
#
# Prints each version it added, removed or changed. Needs uv (the dev extra installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
lock=requirements.lock
before=$(mktemp)
trap 'rm -f "$before"' EXIT
[ -f "$lock" ] && cp "$lock" "$before"
uv pip compile pyproject.toml --all-extras --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --constraint docker/lock-pins.txt --output-file "$lock" --custom-compile-command "bash docker/refresh-lock.sh" \
  --quiet "$@"
python3 - "$before" "$lock" <<'PY'
import re
import sys

def pins(path: str) -> dict[str, str]:
    found = {}
    for line in open(path):
        match = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line)
        if match:
            found[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return found

old, new = pins(sys.argv[1]), pins(sys.argv[2])
changes = [f"  {name}: {old.get(name, '(none)')} -> {new.get(name, '(removed)')}"
           for name in sorted(old.keys() | new.keys()) if old.get(name) != new.get(name)]
print(f"{sys.argv[2]}: {len(new)} pins, {len(changes)} changed" + (":" if changes else ""))
print("\n".join(changes)) if changes else None
PY
