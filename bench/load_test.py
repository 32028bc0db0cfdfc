"""Loopback load test of the API while workers are busy: submissions, status polls and event
streams at once, for a bounded time.

Reports p50/p99 latency per kind of request, every answer that was not a success (only 429 is
allowed once the queues are full), how the accepted jobs ended, and Redis memory before and after
(job records must expire: every job key carries a TTL).

    python bench/load_test.py                       # starts its own stack (tiny model, CPU)
    python bench/load_test.py --duration 30 --submitters 8 --pollers 8 --streamers 4
    python bench/load_test.py --url http://127.0.0.1:8000 --api-key KEY --redis-url redis://...

Exit status 1 when an answer other than 429 failed or a job record has no expiry.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

JOB = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2}
TERMINAL = ("finished", "failed", "canceled")


@dataclass
class LoadReport:
    duration_s: float
    latencies: dict[str, list[float]] = field(default_factory=dict)
    answers: dict[str, Counter[str]] = field(default_factory=dict)
    accepted: list[str] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    redis_memory_before: int = 0
    redis_memory_after: int = 0
    job_keys: int = 0
    job_keys_without_ttl: int = 0

    def record(self, kind: str, seconds: float, answer: str) -> None:
        self.latencies.setdefault(kind, []).append(seconds)
        self.answers.setdefault(kind, Counter())[answer] += 1

    @property
    def errors(self) -> dict[str, int]:
        """Answers that count as errors, 429 included (per kind and answer)."""
        out: dict[str, int] = {}
        for kind, counts in self.answers.items():
            for answer, n in counts.items():
                if not answer.startswith("2") and not (kind == "poll" and answer == "404"):
                    out[f"{kind} {answer}"] = n
        return out

    @property
    def unexpected_errors(self) -> dict[str, int]:
        """Errors other than 429 (queue full): these fail the run."""
        return {k: v for k, v in self.errors.items() if not k.endswith(" 429")}

    def percentile(self, kind: str, q: float) -> float:
        values = sorted(self.latencies.get(kind, []))
        if not values:
            return float("nan")
        return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]

    def summary(self) -> dict[str, Any]:
        return {
            "duration_s": round(self.duration_s, 1),
            "requests": {k: len(v) for k, v in self.latencies.items()},
            "p50_ms": {k: round(self.percentile(k, 0.50) * 1000, 1) for k in self.latencies},
            "p99_ms": {k: round(self.percentile(k, 0.99) * 1000, 1) for k in self.latencies},
            "errors": self.errors,
            "unexpected_errors": self.unexpected_errors,
            "accepted_jobs": len(self.accepted),
            "job_outcomes": dict(self.outcomes),
            "redis_used_memory_before": self.redis_memory_before,
            "redis_used_memory_after": self.redis_memory_after,
            "job_keys": self.job_keys,
            "job_keys_without_ttl": self.job_keys_without_ttl,
        }


async def _submitter(client: httpx.AsyncClient, report: LoadReport, until: float) -> None:
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            response = await client.post("/generate", json={**JOB, "seed": random.randrange(1 << 30)})
            answer = str(response.status_code)
            if response.status_code == 202:
                report.accepted.append(response.json()["id"])
            elif response.status_code == 429:
                await asyncio.sleep(0.05)  # a polite client backs off (Retry-After is seconds; keep the pressure on)
        except httpx.HTTPError as exc:
            answer = type(exc).__name__
        report.record("submit", time.monotonic() - started, answer)


async def _poller(client: httpx.AsyncClient, report: LoadReport, until: float) -> None:
    while time.monotonic() < until:
        if not report.accepted:
            await asyncio.sleep(0.01)
            continue
        job_id = random.choice(report.accepted[-50:])
        started = time.monotonic()
        try:
            answer = str((await client.get(f"/jobs/{job_id}")).status_code)
        except httpx.HTTPError as exc:
            answer = type(exc).__name__
        report.record("poll", time.monotonic() - started, answer)


async def _streamer(client: httpx.AsyncClient, report: LoadReport, until: float) -> None:
    while time.monotonic() < until:
        if not report.accepted:
            await asyncio.sleep(0.01)
            continue
        job_id = report.accepted[-1]
        started = time.monotonic()
        answer = "no terminal event"
        try:
            async with client.stream("GET", f"/jobs/{job_id}/events") as response:
                if response.status_code != 200:
                    answer = str(response.status_code)
                else:
                    async for line in response.aiter_lines():
                        if line.startswith("data: ") and json.loads(line[6:]).get("status") in TERMINAL:
                            answer = "200"
                            break
        except httpx.HTTPError as exc:
            answer = type(exc).__name__
        # The time from connecting to the job's end: it includes the queueing, by design.
        report.record("stream", time.monotonic() - started, answer)


async def _drive(base_url: str, api_key: str, report: LoadReport, submitters: int, pollers: int,
                 streamers: int) -> None:
    limits = httpx.Limits(max_connections=submitters + pollers + streamers + 4)
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=60) as client:
        until = time.monotonic() + report.duration_s
        tasks = [_submitter(client, report, until) for _ in range(submitters)]
        tasks += [_poller(client, report, until) for _ in range(pollers)]
        tasks += [_streamer(client, report, until) for _ in range(streamers)]
        await asyncio.gather(*tasks)


def _job_keys(conn: redis.Redis) -> tuple[int, int]:
    total = without_ttl = 0
    for key in conn.scan_iter(match="urae:job:*", count=1000):
        total += 1
        if conn.ttl(key) == -1:
            without_ttl += 1
    return total, without_ttl


def run_load(base_url: str, api_key: str, redis_url: str, duration_s: float = 20.0, submitters: int = 4,
             pollers: int = 4, streamers: int = 2, drain_timeout_s: float = 120.0) -> LoadReport:
    """Drive the API for ``duration_s``, then wait (bounded) for the accepted jobs to end."""
    conn = redis.Redis.from_url(redis_url)
    report = LoadReport(duration_s=duration_s)
    report.redis_memory_before = int(conn.info("memory")["used_memory"])
    asyncio.run(_drive(base_url, api_key, report, submitters, pollers, streamers))

    deadline = time.monotonic() + drain_timeout_s
    pending = list(report.accepted)
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as client:
        while pending and time.monotonic() < deadline:
            still = []
            for job_id in pending:
                status = client.get(f"/jobs/{job_id}").json().get("status")
                if status in TERMINAL:
                    report.outcomes[status] += 1
                else:
                    still.append(job_id)
            pending = still
            if pending:
                time.sleep(0.5)
    report.outcomes["not ended"] += len(pending)
    if not report.outcomes["not ended"]:
        del report.outcomes["not ended"]
    report.redis_memory_after = int(conn.info("memory")["used_memory"])
    report.job_keys, report.job_keys_without_ttl = _job_keys(conn)
    conn.close()
    return report


def _own_stack(args: argparse.Namespace) -> Any:
    from launcher.local_stack import LocalStack, StackOptions

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    os.environ.setdefault("URAE_MAX_QUEUE_DEPTH", str(args.max_queue_depth))
    os.environ.setdefault("URAE_TORCH_THREADS", "1")
    data = Path(tempfile.mkdtemp(prefix="urae-load-"))
    stack = LocalStack(StackOptions(model="tiny", port=port, workers=args.workers, finetune_workers=0,
                                    data_dir=data, api_key="load-test-key"), out=sys.stderr)
    stack.start()
    return stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="API to load (default: start a local stack with the tiny model)")
    parser.add_argument("--api-key")
    parser.add_argument("--redis-url", help="the stack's Redis, for INFO memory and key expiry")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    parser.add_argument("--submitters", type=int, default=4)
    parser.add_argument("--pollers", type=int, default=4)
    parser.add_argument("--streamers", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="generation workers of the local stack")
    parser.add_argument("--max-queue-depth", type=int, default=20, help="URAE_MAX_QUEUE_DEPTH of the local stack")
    args = parser.parse_args(argv)

    stack = None
    if args.url:
        if not (args.api_key and args.redis_url):
            parser.error("--url needs --api-key and --redis-url")
        url, key, redis_url = args.url, args.api_key, args.redis_url
    else:
        stack = _own_stack(args)
        url, key, redis_url = f"http://127.0.0.1:{stack.options.port}", "load-test-key", stack.redis_url
    try:
        report = run_load(url, key, redis_url, args.duration, args.submitters, args.pollers, args.streamers)
    finally:
        if stack is not None:
            stack.stop()
    summary = report.summary()
    summary["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}"
    print(json.dumps(summary, indent=2))
    ok = not report.unexpected_errors and report.job_keys_without_ttl == 0 and "not ended" not in report.outcomes
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
