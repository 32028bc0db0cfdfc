"""Loopback load test of the API while workers are busy, with two API keys.

Key B submits generations, polls them, follows them on event streams and uploads adapters; once its
jobs fill the queue, key A submits one low-priority job (it waits behind them) and opens many event
streams of it at once (300 by default), held open for the rest of the run. At the end key A cancels
its job, and every stream it holds must receive the end.

Reports p50/p99 latency per kind of request, every answer that was not a success (429 is the only
refusal allowed: a full queue, a key at its limit), how the accepted jobs ended, Redis memory before
and after, and every job key's time to live. The run fails (exit status 1) when:

- any answer is a 5xx, or another error than 429 (and 404 for a poll of an expired job);
- a job key B's submissions made did not end (finished), or a job key has no expiry or one longer
  than the configured retention (``URAE_RESULT_TTL_S``);
- a stream key A opened did not get its job's end, or they were not all open at the same time;
- a latency percentile is over its bound (``--max-p99-ms``: generous, for a loaded machine).

    python bench/load_test.py                       # starts its own stack (tiny model, CPU)
    python bench/load_test.py --duration 30 --submitters 8 --pollers 8 --streamers 4 --flood-streams 300
    python bench/load_test.py --url http://127.0.0.1:8000 --api-key KEY_B --flood-api-key KEY_A \\
        --redis-url redis://... --result-ttl-s 604800
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
import uuid
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
# What each kind of request may take at the 99th percentile by default (ms): the API's own work is a
# few ms to a few hundred on a busy 2-core machine; these leave room for a loaded one.
DEFAULT_MAX_P99_MS = {"submit": 3000.0, "poll": 2000.0, "upload": 5000.0, "flood open": 10000.0}
# Answers that are no failure: a refusal the client is told to retry (429), a poll of an expired job.
ALLOWED = {"429"}


@dataclass
class LoadReport:
    duration_s: float
    retention_s: int
    latencies: dict[str, list[float]] = field(default_factory=dict)
    answers: dict[str, Counter[str]] = field(default_factory=dict)
    accepted: list[str] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    flood_requested: int = 0
    flood_ended: int = 0  # streams of key A that received their job's end
    flood_open_now: int = 0
    flood_max_open: int = 0  # the most of key A's streams open at the same time
    max_p99_ms: dict[str, float] = field(default_factory=dict)
    redis_memory_before: int = 0
    redis_memory_after: int = 0
    job_keys: int = 0
    job_keys_without_ttl: int = 0
    job_keys_over_retention: int = 0

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
        """Errors other than 429: these fail the run."""
        return {k: v for k, v in self.errors.items() if k.rsplit(" ", 1)[1] not in ALLOWED}

    @property
    def server_errors(self) -> dict[str, int]:
        """5xx answers (a subset of the unexpected ones)."""
        return {k: v for k, v in self.errors.items() if k.rsplit(" ", 1)[1].startswith("5")}

    @property
    def flood_opened(self) -> int:
        return self.answers.get("flood open", Counter())["200"]

    def percentile(self, kind: str, q: float) -> float:
        values = sorted(self.latencies.get(kind, []))
        if not values:
            return float("nan")
        return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]

    @property
    def slow(self) -> dict[str, float]:
        """Kinds whose p99 (ms) is over its bound."""
        out = {}
        for kind, bound in self.max_p99_ms.items():
            p99 = self.percentile(kind, 0.99) * 1000
            if kind in self.latencies and p99 > bound:
                out[kind] = round(p99, 1)
        return out

    @property
    def failures(self) -> list[str]:
        """Why the run fails; empty when it passes."""
        out = []
        if self.unexpected_errors:
            out.append(f"answers other than 2xx and 429: {self.unexpected_errors}")
        if set(self.outcomes) - {"finished"}:
            out.append(f"jobs that did not finish: {dict(self.outcomes)}")
        if self.job_keys_without_ttl or self.job_keys_over_retention:
            out.append(f"{self.job_keys_without_ttl} job keys without expiry, {self.job_keys_over_retention} "
                       f"expiring later than the retention ({self.retention_s} s)")
        if self.flood_ended != self.flood_opened:
            out.append(f"{self.flood_opened - self.flood_ended} of {self.flood_opened} open streams of key A "
                       "never received their job's end")
        if self.flood_requested and self.flood_max_open != self.flood_opened:
            out.append(f"only {self.flood_max_open} of key A's {self.flood_opened} streams were open at the same "
                       "time (its job ended early)")
        if self.slow:
            out.append(f"p99 over its bound (ms): {self.slow} (bounds {self.max_p99_ms})")
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "duration_s": round(self.duration_s, 1),
            "requests": {k: len(v) for k, v in self.latencies.items()},
            "p50_ms": {k: round(self.percentile(k, 0.50) * 1000, 1) for k in self.latencies},
            "p99_ms": {k: round(self.percentile(k, 0.99) * 1000, 1) for k in self.latencies},
            "answers": {k: dict(v) for k, v in self.answers.items()},
            "errors": self.errors,
            "unexpected_errors": self.unexpected_errors,
            "server_errors": self.server_errors,
            "flood_streams": {"requested": self.flood_requested, "opened": self.flood_opened,
                              "open_at_once": self.flood_max_open, "received_the_end": self.flood_ended},
            "accepted_jobs": len(self.accepted),
            "job_outcomes": dict(self.outcomes),
            "redis_used_memory_before": self.redis_memory_before,
            "redis_used_memory_after": self.redis_memory_after,
            "job_keys": self.job_keys,
            "job_keys_without_ttl": self.job_keys_without_ttl,
            "job_keys_over_retention": self.job_keys_over_retention,
            "failures": self.failures,
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


async def _follow(client: httpx.AsyncClient, job_id: str, on_open: Any = None) -> str:
    """Read a job's event stream to its end; the answer ("200" once the job's end arrived).
    ``on_open(answer, seconds)`` is called once: at the first event, or with a refusal."""
    started = time.monotonic()
    opened = False

    def open_(answer: str) -> None:
        nonlocal opened
        if not opened and on_open is not None:
            opened = True
            on_open(answer, time.monotonic() - started)

    try:
        async with client.stream("GET", f"/jobs/{job_id}/events") as response:
            if response.status_code != 200:
                await response.aread()
                open_(str(response.status_code))
                return str(response.status_code)
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    open_("200")
                if line.startswith("data: ") and json.loads(line[6:]).get("status") in TERMINAL:
                    return "200"
        open_("closed")
        return "ended without the job's end"
    except httpx.HTTPError as exc:
        open_(type(exc).__name__)
        return type(exc).__name__


async def _streamer(client: httpx.AsyncClient, report: LoadReport, until: float) -> None:
    while time.monotonic() < until:
        if not report.accepted:
            await asyncio.sleep(0.01)
            continue
        started = time.monotonic()
        answer = await _follow(client, report.accepted[-1])
        # The time from connecting to the job's end: it includes the queueing, by design.
        report.record("stream", time.monotonic() - started, answer)


async def _uploader(client: httpx.AsyncClient, report: LoadReport, until: float, adapter: bytes) -> None:
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            response = await client.post("/adapters", files={"file": ("load.safetensors", adapter)},
                                         data={"name": f"load-{uuid.uuid4().hex[:12]}"})
            answer = str(response.status_code)
            if response.status_code == 202:  # still converting: its job must finish like any other
                report.accepted.append(response.json()["id"])
            elif response.status_code == 429:
                await asyncio.sleep(0.05)
        except httpx.HTTPError as exc:
            answer = type(exc).__name__
        report.record("upload", time.monotonic() - started, answer)


async def _flood(client: httpx.AsyncClient, report: LoadReport, job_id: str, count: int) -> None:
    """``count`` concurrent streams of one job, held until the job ends."""

    def opened(code: str, seconds: float) -> None:
        report.record("flood open", seconds, code)
        if code == "200":
            report.flood_open_now += 1
            report.flood_max_open = max(report.flood_max_open, report.flood_open_now)

    async def one() -> None:
        answer = await _follow(client, job_id, on_open=opened)
        if answer == "200":
            report.flood_ended += 1
            report.flood_open_now -= 1

    report.flood_requested = count
    await asyncio.gather(*(one() for _ in range(count)))


async def _drive(base_url: str, key_b: str, key_a: str | None, report: LoadReport, submitters: int, pollers: int,
                 streamers: int, uploaders: int, flood: int, adapter: bytes | None) -> None:
    limits = httpx.Limits(max_connections=submitters + pollers + streamers + uploaders + 8, max_keepalive_connections=64)
    flood_limits = httpx.Limits(max_connections=flood + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {key_b}"}, limits=limits,
                                 timeout=120) as client, \
            httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {key_a or key_b}"},
                              limits=flood_limits, timeout=300) as flood_client:
        until = time.monotonic() + report.duration_s
        tasks = [_submitter(client, report, until) for _ in range(submitters)]
        tasks += [_poller(client, report, until) for _ in range(pollers)]
        tasks += [_streamer(client, report, until) for _ in range(streamers)]
        if adapter is not None:
            tasks += [_uploader(client, report, until, adapter) for _ in range(uploaders)]
        load = asyncio.gather(*tasks)
        flood_task = None
        watched = None
        if flood and key_a:
            # Once key B's jobs wait in the normal queue, key A's low-priority job waits behind them
            # (the queues are served in priority order) while its streams are held open.
            while len(report.accepted) < 2 and time.monotonic() < until:
                await asyncio.sleep(0.01)
            answer = await flood_client.post("/generate", json={**JOB, "priority": "low", "prompt": "watched by many"})
            answer.raise_for_status()
            watched = answer.json()["id"]
            flood_task = asyncio.create_task(_flood(flood_client, report, watched, flood))
        await load
        if flood_task is not None:
            # The watched job ends: every stream held open must hear of it.
            await flood_client.delete(f"/jobs/{watched}")
            await asyncio.wait_for(flood_task, timeout=120)


def _job_keys(conn: redis.Redis, retention_s: int) -> tuple[int, int, int]:
    total = without_ttl = over = 0
    for key in conn.scan_iter(match="urae:job:*", count=1000):
        total += 1
        ttl = conn.ttl(key)
        if ttl == -1:
            without_ttl += 1
        elif ttl > retention_s:
            over += 1
    return total, without_ttl, over


def tiny_adapter() -> bytes:
    """A LoRA file for the tiny model, as a user would upload it."""
    from urae.adapters import save_lora
    from urae.adapters.builtin import tiny_lora_layers
    from urae.tiny import build_tiny_pipeline

    with tempfile.TemporaryDirectory() as folder:
        path = save_lora(Path(folder) / "load.safetensors", tiny_lora_layers(build_tiny_pipeline("tiny").transformer, 3))
        return Path(path).read_bytes()


def run_load(base_url: str, api_key: str, redis_url: str, duration_s: float = 20.0, submitters: int = 4,
             pollers: int = 4, streamers: int = 2, drain_timeout_s: float = 120.0, *, flood_api_key: str | None = None,
             flood_streams: int = 0, uploaders: int = 0, retention_s: int = 7 * 24 * 3600,
             max_p99_ms: dict[str, float] | None = None) -> LoadReport:
    """Drive the API for ``duration_s`` (key ``api_key``: submissions, polls, streams, uploads; key
    ``flood_api_key``: ``flood_streams`` streams of one job held open), then wait (bounded) for the
    accepted jobs to end."""
    conn = redis.Redis.from_url(redis_url)
    report = LoadReport(duration_s=duration_s, retention_s=retention_s,
                        max_p99_ms=dict(DEFAULT_MAX_P99_MS if max_p99_ms is None else max_p99_ms))
    report.redis_memory_before = int(conn.info("memory")["used_memory"])
    adapter = tiny_adapter() if uploaders else None
    asyncio.run(_drive(base_url, api_key, flood_api_key, report, submitters, pollers, streamers, uploaders,
                       flood_streams, adapter))

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
    report.job_keys, report.job_keys_without_ttl, report.job_keys_over_retention = _job_keys(conn, retention_s)
    conn.close()
    return report


KEY_A, KEY_B = "load-test-key-a", "load-test-key-b"


def _own_stack(args: argparse.Namespace) -> Any:
    from launcher.local_stack import LocalStack, StackOptions

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    os.environ.setdefault("URAE_MAX_QUEUE_DEPTH", str(args.max_queue_depth))
    os.environ.setdefault("URAE_TORCH_THREADS", "1")
    os.environ.setdefault("URAE_RESULT_TTL_S", str(args.result_ttl_s))
    os.environ.setdefault("URAE_ADAPTER_IMPORT_WAIT_S", "0")  # an upload answers as soon as it is stored
    # Key A's streams are all served (not 429) unless the cap is set lower on purpose.
    os.environ.setdefault("URAE_MAX_EVENT_STREAMS_PER_KEY", str(max(200, args.flood_streams + 10)))
    os.environ["URAE_API_KEYS"] = f"{KEY_A},{KEY_B}"
    data = Path(tempfile.mkdtemp(prefix="urae-load-"))
    stack = LocalStack(StackOptions(model="tiny", port=port, workers=args.workers, finetune_workers=0,
                                    data_dir=data), out=sys.stderr)
    stack.start()
    return stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="API to load (default: start a local stack with the tiny model)")
    parser.add_argument("--api-key", help="key B: submits, polls, streams, uploads")
    parser.add_argument("--flood-api-key", help="key A: holds --flood-streams streams of one job open")
    parser.add_argument("--redis-url", help="the stack's Redis, for INFO memory and key expiry")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    parser.add_argument("--submitters", type=int, default=4)
    parser.add_argument("--pollers", type=int, default=4)
    parser.add_argument("--streamers", type=int, default=2)
    parser.add_argument("--uploaders", type=int, default=1)
    parser.add_argument("--flood-streams", type=int, default=300)
    parser.add_argument("--workers", type=int, default=1, help="generation workers of the local stack")
    parser.add_argument("--max-queue-depth", type=int, default=20, help="URAE_MAX_QUEUE_DEPTH of the local stack")
    parser.add_argument("--result-ttl-s", type=int, default=3600,
                        help="the retention every job key's expiry must be within (URAE_RESULT_TTL_S)")
    parser.add_argument("--max-p99-ms", type=json.loads, default=None,
                        help=f'p99 bounds per kind as JSON (default {json.dumps(DEFAULT_MAX_P99_MS)})')
    args = parser.parse_args(argv)

    stack = None
    if args.url:
        if not (args.api_key and args.redis_url):
            parser.error("--url needs --api-key and --redis-url")
        url, key_b, key_a, redis_url = args.url, args.api_key, args.flood_api_key, args.redis_url
    else:
        stack = _own_stack(args)
        url, key_b, key_a, redis_url = f"http://127.0.0.1:{stack.options.port}", KEY_B, KEY_A, stack.redis_url
    try:
        report = run_load(url, key_b, redis_url, args.duration, args.submitters, args.pollers, args.streamers,
                          flood_api_key=key_a, flood_streams=args.flood_streams if key_a else 0,
                          uploaders=args.uploaders, retention_s=args.result_ttl_s, max_p99_ms=args.max_p99_ms)
    finally:
        if stack is not None:
            stack.stop()
    summary = report.summary()
    summary["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}, load average " \
                         f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end"
    print(json.dumps(summary, indent=2))
    return 0 if not report.failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
