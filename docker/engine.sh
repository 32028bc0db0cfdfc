#!/usr/bin/env bash
# A private Docker engine for the container tests (CI starts it; so can a developer), as root: Debian's
# docker.io, no bridge and no iptables (build containers use the host's network, BUILD_NETWORK=host;
# compose's own networks work), its own data root, so it touches no other engine on the machine.
#
#   bash docker/engine.sh start   # prints the DOCKER_HOST to use; exits non-zero, saying why, if it cannot
#   bash docker/engine.sh stop
set -euo pipefail
root=${URAE_ENGINE_ROOT:-/var/lib/urae-docker}
run=${URAE_ENGINE_RUN:-/run/urae-docker}
socket="unix://$run/docker.sock"

case "${1:-}" in
  start)
    if DOCKER_HOST=$socket docker version >/dev/null 2>&1; then
      echo "$socket"
      exit 0
    fi
    [ "$(id -u)" = 0 ] || { echo "engine: dockerd needs root" >&2; exit 1; }
    command -v dockerd >/dev/null || { echo "engine: no dockerd (apt-get install docker.io)" >&2; exit 1; }
    mkdir -p "$root" "$run"
    setsid dockerd --data-root "$root" --exec-root "$run" --host "$socket" --pidfile "$run/dockerd.pid" \
      --iptables=false --bridge=none >"$run/dockerd.log" 2>&1 < /dev/null &
    for _ in $(seq 60); do
      if DOCKER_HOST=$socket docker version >/dev/null 2>&1; then
        echo "$socket"
        exit 0
      fi
      sleep 1
    done
    echo "engine: dockerd did not answer within 60 s; its log ($run/dockerd.log) ends:" >&2
    tail -20 "$run/dockerd.log" >&2
    exit 1
    ;;
  stop)
    if [ -f "$run/dockerd.pid" ]; then
      pid=$(cat "$run/dockerd.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 1; done
      echo "engine: dockerd $pid still running after 30 s" >&2
      exit 1
    fi
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
