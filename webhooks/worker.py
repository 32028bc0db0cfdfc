"""``python -m webhooks``: the webhook delivery worker (no torch, no web framework).

It sends up to ``URAE_WEBHOOK_CONCURRENCY`` deliveries at once, at most
``URAE_WEBHOOK_CONCURRENCY_PER_KEY`` of one API key's, taking the next due delivery of the key served
longest ago (``jobstore.webhook_deliveries``): one key's slow receivers hold a few senders, never the
others' deliveries. Retries wait in Redis as deliveries due later, so nothing stalls when Redis
restarts: the worker retries its reads until Redis is back. On SIGTERM attempts in flight are
abandoned (due again at once, for the next worker) and the process exits within seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

import redis.asyncio as aioredis

from jobstore.codec import dumps as _dumps
from jobstore.contract import WORKERS_KEY, job_key, worker_key
from jobstore.settings import Settings, SettingsError, get_backend_settings
from jobstore.webhook_deliveries import (
    CLAIM_SCRIPT,
    COMPLETE_SCRIPT,
    WEBHOOK_OWNERS_KEY,
    WEBHOOKS_PREFIX,
    completion_keys,
    now_ms,
)
from jobstore.webhook_targets import MAX_RECORDED_ATTEMPTS, redact_url
from webhooks.delivery import AttemptOutcome, attempt, judge

log = logging.getLogger("urae.webhooks")

# How often an idle worker looks for due deliveries (a new one waits at most this long).
POLL_S = 0.2
# A delivery taken by a worker that then stops is due again this long after its attempt's deadline.
LEASE_SLACK_S = 30.0
# Waits between tries while Redis is unreachable.
REDIS_RETRY_S = (0.5, 5.0)
# On SIGTERM: how long handing the abandoned deliveries back may take.
RELEASE_TIMEOUT_S = 2.0


class DeliveryWorker:
    """Takes due deliveries and sends them, concurrently, until told to stop."""

    def __init__(self, settings: Settings, name: str):
        self.settings = settings
        self.name = name
        self.conn = aioredis.Redis.from_url(
            settings.redis_url, socket_timeout=settings.redis_socket_timeout_s,
            socket_connect_timeout=settings.redis_socket_timeout_s,
        )
        self._claim = self.conn.register_script(CLAIM_SCRIPT)
        self._complete = self.conn.register_script(COMPLETE_SCRIPT)
        self.running: dict[asyncio.Task[None], dict[str, Any]] = {}
        self.lease_ms = int((settings.webhook_timeout_s + LEASE_SLACK_S) * 1000)

    async def _heartbeat(self) -> None:
        """Say this worker is alive (``urae:worker:<name>``, the key the container healthcheck reads),
        with what it is sending; a worker that stops beating is gone after the TTL."""
        s = self.settings
        ttl_ms = int(max(s.lease_ttl_s, 3 * s.heartbeat_interval_s) * 1000)
        while True:
            info = {"name": self.name, "kinds": ["webhooks"], "pid": os.getpid(), "seen_at": time.time(),
                    "in_flight": len(self.running)}
            try:
                pipe = self.conn.pipeline(transaction=False)
                pipe.set(worker_key(self.name), _dumps(info), px=ttl_ms)
                pipe.sadd(WORKERS_KEY, self.name)
                await pipe.execute()
            except aioredis.RedisError:
                pass  # the delivery loop reports Redis being away
            await asyncio.sleep(s.heartbeat_interval_s)

    async def run(self, stop: asyncio.Event) -> None:
        stopping = asyncio.ensure_future(stop.wait())
        beating = asyncio.ensure_future(self._heartbeat())
        backoff = REDIS_RETRY_S[0]
        try:
            while not stop.is_set():
                try:
                    next_due_ms = await self._take_due()
                    backoff = REDIS_RETRY_S[0]
                except aioredis.RedisError as exc:
                    log.warning("Redis unavailable (%s); trying again in %.1f s", type(exc).__name__, backoff)
                    await asyncio.wait([stopping], timeout=backoff)
                    backoff = min(backoff * 2, REDIS_RETRY_S[1])
                    continue
                wait_s = POLL_S
                if next_due_ms is not None:
                    wait_s = min(POLL_S, max(0.01, (next_due_ms - now_ms()) / 1000))
                await asyncio.wait({stopping, *self.running}, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            beating.cancel()
            await self._abandon_running()
            try:
                async with asyncio.timeout(RELEASE_TIMEOUT_S):
                    await self.conn.delete(worker_key(self.name))
                    await self.conn.srem(WORKERS_KEY, self.name)
            except (aioredis.RedisError, TimeoutError):
                pass  # the heartbeat key expires by itself
            await self.conn.aclose()

    async def _take_due(self) -> int | None:
        """Start attempts while there are free senders and due deliveries; when a key is waiting for a
        retry, the time (ms) the earliest one is due."""
        s = self.settings
        while len(self.running) < s.webhook_concurrency:
            taken: Any = await self._claim(
                keys=[WEBHOOK_OWNERS_KEY], args=[now_ms(), s.webhook_concurrency_per_key, self.lease_ms, WEBHOOKS_PREFIX])
            if not isinstance(taken, list):
                return int(taken) if taken else None
            delivery = json.loads(taken[1])
            task = asyncio.get_running_loop().create_task(self._deliver(delivery))
            self.running[task] = delivery
            task.add_done_callback(lambda t: self.running.pop(t, None))
        return None

    async def _deliver(self, delivery: dict[str, Any]) -> None:
        outcome = await attempt(self.settings, delivery["url"], delivery["message_id"], delivery["body"])
        await self._record(delivery, outcome)

    async def _record(self, delivery: dict[str, Any], outcome: AttemptOutcome) -> None:
        """Record the attempt in the job and retire or reschedule the delivery, in one step; retried
        while Redis is away (until the lease ends: then another worker sends it again, same id)."""
        result = judge(self.settings, delivery, outcome, time.time())
        if result.outcome == "retrying":
            assert result.delay_s is not None
            action, due = "retry", now_ms() + int(result.delay_s * 1000)
        else:
            action, due = "done", 0
        retried = {**delivery, "attempt": int(delivery["attempt"]) + 1}
        deadline = time.monotonic() + self.lease_ms / 1000
        pause = REDIS_RETRY_S[0]
        while True:
            try:
                await self._complete(
                    keys=completion_keys(delivery["owner"], delivery["message_id"], job_key(delivery["job_id"])),
                    args=[delivery["message_id"], action, due, _dumps(retried), _dumps(result.entry),
                          MAX_RECORDED_ATTEMPTS, delivery["owner"]],
                )
                break
            except aioredis.RedisError:
                if time.monotonic() + pause > deadline:
                    log.warning("webhook %s of job %s: attempt %d not recorded (Redis unavailable); it is sent again",
                                delivery["event"], delivery["job_id"], delivery["attempt"])
                    return
                await asyncio.sleep(pause)
                pause = min(pause * 2, REDIS_RETRY_S[1])
        log.info("webhook %s of job %s to %s, attempt %d: %s%s", delivery["event"], delivery["job_id"],
                 redact_url(delivery["url"]), delivery["attempt"], result.outcome,
                 f" ({outcome.error})" if outcome.error else "")

    async def _abandon_running(self) -> None:
        """Stop the attempts in flight and make their deliveries due again at once (not counted as
        attempts), so the next worker sends them without waiting for their leases."""
        tasks = dict(self.running)
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        await asyncio.gather(*tasks, return_exceptions=True)
        abandoned = [d for t, d in tasks.items() if t.cancelled()]
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT_S):
                for delivery in abandoned:
                    await self._complete(
                        keys=completion_keys(delivery["owner"], delivery["message_id"], job_key(delivery["job_id"])),
                        args=[delivery["message_id"], "release", now_ms(), "", "", MAX_RECORDED_ATTEMPTS,
                              delivery["owner"]],
                    )
        except (aioredis.RedisError, TimeoutError):
            log.warning("%d delivery(ies) in flight are sent again once their lease ends", len(abandoned))


async def serve(settings: Settings, name: str, stop: asyncio.Event | None = None) -> None:
    """Deliver until ``stop`` is set (by default: SIGTERM or SIGINT)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("webhook worker %s: up to %d deliveries at once, %d per API key", name, settings.webhook_concurrency,
             settings.webhook_concurrency_per_key)
    await DeliveryWorker(settings, name).run(stop)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m webhooks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default=f"webhooks-{socket.gethostname()}-{os.getpid()}", help="worker name")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # httpx logs every request's full URL at INFO: a webhook URL's credentials would be in the log.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        settings = get_backend_settings()
    except SettingsError as exc:
        print(f"urae-webhooks: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if not settings.webhook_secret:
        log.warning("URAE_WEBHOOK_SECRET is not set: the API refuses webhooks, so there will be nothing to send")
    asyncio.run(serve(settings, args.name))


if __name__ == "__main__":
    main()
