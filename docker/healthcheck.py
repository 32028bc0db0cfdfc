"""Container healthchecks, run by Docker inside the container.

    python healthcheck.py api [URL]         the API answers GET /health (default http://127.0.0.1:8000/health)
    python healthcheck.py worker [PREFIX]   a worker whose name starts with PREFIX (default: this host's
                                            name, as workers name themselves <host>-<pid>) has a live
                                            heartbeat in Redis (URAE_REDIS_URL)
    python healthcheck.py webhooks          this host's webhook worker (webhooks-<host>-<pid>) has a
                                            live heartbeat in Redis (its key expires without heartbeats)

Exit 0 when healthy, 1 with one line on stderr when not, 2 on a usage error.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.error
import urllib.request


def check_api(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return None if response.status == 200 else f"{url} answered {response.status}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{url}: {exc}"


def check_worker(prefix: str) -> str | None:
    import redis

    from jobstore.contract import worker_key

    url = os.environ.get("URAE_REDIS_URL", "redis://localhost:6379/0")
    try:
        conn = redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)
        # Heartbeat keys expire when the worker stops beating: one that exists is a live worker.
        live = next(iter(conn.scan_iter(match=worker_key(prefix) + "*", count=1000)), None)
    except redis.RedisError as exc:
        return f"Redis unavailable: {exc}"
    return None if live is not None else f"no live worker named {prefix}*"


def check_webhooks(prefix: str) -> str | None:
    problem = check_worker(prefix)  # the webhook worker heartbeats like the others
    return problem.replace("no live worker", "no live webhook worker") if problem else None


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("api", "worker", "webhooks") or len(argv) > 2:
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "api":
        problem = check_api(argv[1] if len(argv) > 1 else "http://127.0.0.1:8000/health")
    elif argv[0] == "webhooks":
        problem = check_webhooks(argv[1] if len(argv) > 1 else f"webhooks-{socket.gethostname()}-")
    else:
        problem = check_worker(argv[1] if len(argv) > 1 else f"{socket.gethostname()}-")
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
