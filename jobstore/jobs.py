"""Job records in Redis: the one place that reads and changes a job's state.

Used by the API (create, read, cancel) and by the workers (start, progress, finish). A job is a Redis
hash (status, payload, progress, timings, result, error), a replayable stream of events for SSE, a
cancel flag, and, while it runs, a lease that the running process refreshes. Status changes go through
one Lua script, so two actors (a worker finishing, a client canceling, a reaper failing a dead job)
can never both win.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis

from jobstore.codec import dumps as _dumps
from jobstore.codec import text as _text
from jobstore.contract import (
    GENERATE_QUEUES,
    JOB_COUNTS_KEY,
    JOB_FUNCTIONS,
    KEY_PREFIX,
    RUNNING_JOBS_KEY,
    STATUS_WEBHOOK_EVENTS,
    TERMINAL_STATUSES,
    JobKind,
    JobStatus,
    job_cancel_key,
    job_events_key,
    job_key,
    job_lease_key,
    job_preview_key,
    job_webhook_throttle_key,
    worker_key,
)
from jobstore.metrics import observe_stage
from jobstore.queues import rq_queue, rq_queue_key
from jobstore.webhook_deliveries import enqueue_delivery
from jobstore.webhook_targets import MAX_RECORDED_ATTEMPTS

log = logging.getLogger("urae.jobstore")

# Stops a runaway stream; the replay an SSE client gets is bounded by it.
EVENTS_MAXLEN = 2000

_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return false end
local allowed = false
for s in string.gmatch(ARGV[1], '[^,]+') do
  if s == cur then allowed = true end
end
if not allowed then return cur end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
for i = 5, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'data', ARGV[3])
redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
return 1
"""

# Appends one delivery attempt to the record's JSON list (bounded), only while the record exists.
_APPEND_WEBHOOK_ATTEMPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local cur = redis.call('HGET', KEYS[1], 'webhooks')
if (not cur) or cur == '[]' then
  cur = '[' .. ARGV[1] .. ']'
else
  local n = select(2, string.gsub(cur, '"attempt":', ''))
  if n >= tonumber(ARGV[2]) then return 0 end
  cur = string.sub(cur, 1, -2) .. ',' .. ARGV[1] .. ']'
end
redis.call('HSET', KEYS[1], 'webhooks', cur)
return 1
"""


# Counts an owner's waiting jobs and, below the limit, holds a place for a new one (a record with
# only its status, expiring unless the job is then written), in one step: concurrent submissions of
# one key can never pass the limit together.
_RESERVE_QUEUED = """
local queued = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local status = redis.call('HGET', ARGV[3] .. id, 'status')
  if status == 'queued' then
    queued = queued + 1
  elseif (not status) or string.find(ARGV[6], ',' .. status .. ',', 1, true) then
    redis.call('SREM', KEYS[1], id)
  end
end
if queued >= tonumber(ARGV[1]) then return queued end
redis.call('HSET', KEYS[2], 'status', 'queued')
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('SADD', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return -1
"""

# Gives a held place back, unless the job was written after all (then it has its kind).
_RELEASE_RESERVATION = """
if redis.call('HEXISTS', KEYS[2], 'kind') == 1 then return 0 end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[1], ARGV[1])
return 1
"""

# How long a held place lasts when the API dies between holding it and writing the job.
RESERVATION_TTL_S = 60

# Jobs a worker took from a queue and has not started yet: RQ job id -> "worker\nqueue key\nms".
# Taking is a non-blocking pop recorded here in the same step (never a blocking pop, which Redis
# would answer for a frozen process too); a worker that stops heartbeating before it starts a job
# has the job taken back (see take_back_claims).
CLAIMS_KEY = f"{KEY_PREFIX}:claims"
_CLAIM_NEXT = """
for i = 1, #KEYS - 1 do
  local id = redis.call('LPOP', KEYS[i])
  if id then
    redis.call('HSET', KEYS[#KEYS], id, ARGV[1] .. '\\n' .. KEYS[i] .. '\\n' .. ARGV[2])
    return {KEYS[i], id}
  end
end
return false
"""
# The worker starting a job must hold its claim (1), else it was taken back (0).
_START_CLAIMED = """
local claim = redis.call('HGET', KEYS[1], ARGV[1])
if (not claim) or string.sub(claim, 1, string.len(ARGV[2]) + 1) ~= ARGV[2] .. '\\n' then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""
# Undo a claim that is still the one seen, and put a job that still waits back at the queue's front.
_TAKE_BACK = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('HGET', KEYS[3], 'status') ~= 'queued' then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[1])
return 1
"""


class JobNotFound(KeyError):
    """No record for this job id (never existed, or expired)."""


class QueuedLimitReached(Exception):
    """The owner already has its maximum of jobs waiting; nothing was written."""

    def __init__(self, limit: int):
        super().__init__(f"already {limit} jobs waiting")
        self.limit = limit


def new_job_id() -> str:
    return uuid.uuid4().hex


def owner_jobs_key(owner: str) -> str:
    """Set of the ids of an owner's jobs that have not ended (an ending job leaves it)."""
    return f"{KEY_PREFIX}:owner:{owner}:jobs"


# An absolute file path (two or more components); "http://host/x" is left alone.
_ABS_PATH_RE = re.compile(r"(?<![\w.:/~-])/(?:[^\s'\"/:,;()\[\]]+/)+([^\s'\"/:,;()\[\]]*)")


def redact_paths(message: str) -> str:
    """A job error as clients may see it: every absolute server path reduced to its file name."""
    return _ABS_PATH_RE.sub(lambda m: m.group(1) or "(a server folder)", message)


_QUEUED_EVENT = json.dumps({"type": "status", "status": "queued"}, separators=(",", ":"))


class JobRecords:
    """Operations on job records over one Redis connection."""

    JSON_FIELDS = ("payload", "progress", "timings", "result", "webhook", "webhooks")

    def __init__(self, conn: redis.Redis, result_ttl_s: int = 7 * 24 * 3600):
        self.conn = conn
        self.result_ttl_s = result_ttl_s
        self._transition = conn.register_script(_TRANSITION)
        self._append_webhook_attempt = conn.register_script(_APPEND_WEBHOOK_ATTEMPT)
        self._reserve_queued = conn.register_script(_RESERVE_QUEUED)
        self._release_reservation = conn.register_script(_RELEASE_RESERVATION)
        self._claim_next = conn.register_script(_CLAIM_NEXT)
        self._start_claimed = conn.register_script(_START_CLAIMED)
        self._take_back = conn.register_script(_TAKE_BACK)

    # -- create and read ---------------------------------------------------------------------------
    def create_and_enqueue(
        self,
        job_id: str,
        kind: JobKind,
        queue: str,
        payload: dict[str, Any],
        *,
        priority: str = "normal",
        owner: str = "",
        timeout_s: int = 3600,
        webhook: dict[str, Any] | None = None,
        max_queued: int = 0,
        also: Callable[[Any], None] | None = None,
    ) -> dict[str, Any]:
        """Write a queued record and put the job on its RQ queue, in one transaction (one round trip).

        ``max_queued`` (> 0): the owner may have at most this many jobs waiting, this one included;
        checked and held atomically first (QueuedLimitReached, nothing written). ``also`` adds commands
        of the caller's to the same transaction. Returns the record, with ``queue_length`` (the
        queue's length right after the push) added.
        """
        if max_queued > 0:
            held = self._reserve_queued(
                keys=[owner_jobs_key(owner), job_key(job_id)],
                args=[max_queued, job_id, job_key(""), self.result_ttl_s, RESERVATION_TTL_S * 1000,
                      "," + ",".join(str(s) for s in TERMINAL_STATUSES) + ","],
            )
            if int(held) >= 0:
                raise QueuedLimitReached(max_queued)
        try:
            return self._create(job_id, kind, queue, payload, priority, owner, timeout_s, webhook, also)
        except BaseException:
            if max_queued > 0:
                try:
                    self._release_reservation(keys=[owner_jobs_key(owner), job_key(job_id)], args=[job_id])
                except redis.RedisError:
                    pass  # the held place expires by itself
            raise

    def _create(
        self, job_id: str, kind: JobKind, queue: str, payload: dict[str, Any], priority: str, owner: str,
        timeout_s: int, webhook: dict[str, Any] | None, also: Callable[[Any], None] | None,
    ) -> dict[str, Any]:
        # Only what a new job has; progress, timings, result and error appear as the job runs. The
        # record expires when the job ends (see transition).
        stored: dict[str, Any] = {
            "kind": str(kind),
            "status": str(JobStatus.QUEUED),
            "priority": priority,
            "queue": queue,
            "owner": owner,
            "created_at": time.time(),
            "timeout_s": timeout_s,
            "payload": payload,
        }
        if webhook is not None:
            stored["webhook"] = webhook  # see jobstore.webhook_targets.webhook_target
        pipe = self.conn.pipeline()
        pipe.multi()
        pipe.hset(job_key(job_id), mapping=self._encode(stored))  # type: ignore[arg-type]
        pipe.persist(job_key(job_id))  # a held place expires; the job does not until it ends
        pipe.xadd(job_events_key(job_id), {"data": _QUEUED_EVENT})
        pipe.hincrby(JOB_COUNTS_KEY, str(JobStatus.QUEUED), 1)
        self._enqueue(job_id, job_id, kind, queue, payload, timeout_s, pipe)
        pipe.sadd(owner_jobs_key(owner), job_id)
        pipe.expire(owner_jobs_key(owner), self.result_ttl_s)
        if also is not None:
            also(pipe)
        pipe.llen(rq_queue_key(queue))
        queue_length = int(pipe.execute()[-1])
        return {**self._with_defaults({"id": job_id, **stored}), "queue_length": queue_length}

    def _enqueue(
        self, rq_id: str, job_id: str, kind: JobKind | str, queue: str, payload: dict[str, Any], timeout_s: int,
        pipeline: Any = None,
    ) -> None:
        rq_queue(self.conn, queue).enqueue_call(
            JOB_FUNCTIONS[JobKind(kind)],
            args=(payload,),
            job_id=rq_id,
            timeout=timeout_s,
            result_ttl=3600,
            failure_ttl=self.result_ttl_s,
            description=f"{kind} {job_id}",
            pipeline=pipeline,
        )

    def get(self, job_id: str) -> dict[str, Any]:
        """The decoded record; JobNotFound when absent."""
        raw = self.conn.hgetall(job_key(job_id))
        if not raw:
            raise JobNotFound(job_id)
        return self._decode({b"id": job_id.encode(), **raw})

    def queued_count(self, owner: str) -> int:
        """How many of ``owner``'s jobs wait in a queue now; ended or expired jobs are forgotten."""
        key = owner_jobs_key(owner)
        members = [_text(m) for m in self.conn.smembers(key)]
        if not members:
            return 0
        pipe = self.conn.pipeline(transaction=False)
        for job_id in members:
            pipe.hget(job_key(job_id), "status")
        statuses = [None if s is None else _text(s) for s in pipe.execute()]
        ended = [j for j, s in zip(members, statuses, strict=True) if s is None or s in TERMINAL_STATUSES]
        if ended:
            self.conn.srem(key, *ended)
        return sum(1 for s in statuses if s == JobStatus.QUEUED)

    def status(self, job_id: str) -> str | None:
        value = self.conn.hget(job_key(job_id), "status")
        return _text(value) if value is not None else None

    def queue_position(self, record: dict[str, Any]) -> int | None:
        """0 = next to run. Jobs in higher-priority queues count as ahead of this one. A job a worker
        has taken from its queue but not started yet (a fine-tune worker forks its training process
        first) is 0 too: it is out of the queue and still queued."""
        if record["status"] != JobStatus.QUEUED:
            return None
        queue = record["queue"]
        ahead = GENERATE_QUEUES[: GENERATE_QUEUES.index(queue)] if queue in GENERATE_QUEUES else ()
        pipe = self.conn.pipeline()
        for name in ahead:
            pipe.llen(rq_queue_key(name))
        pipe.lpos(rq_queue_key(queue), record["rq_id"])
        pipe.hexists(CLAIMS_KEY, record["rq_id"])
        *lengths, position, claimed = pipe.execute()
        if position is None:
            return 0 if claimed else None
        return int(sum(lengths) + position)

    # -- status changes ----------------------------------------------------------------------------
    def transition(self, job_id: str, allowed: tuple[str, ...], new: JobStatus, event: dict[str, Any] | None = None, **fields: Any) -> bool:
        """Move a job from one of ``allowed`` to ``new``, atomically; False if it was elsewhere."""
        flat: list[str] = []
        for name, value in fields.items():
            flat += [name, _dumps(value) if name in self.JSON_FIELDS else str(value)]
        data = {"type": "status", "status": str(new), **(event or {})}
        result = self._transition(
            keys=[job_key(job_id), job_events_key(job_id), JOB_COUNTS_KEY],
            args=[",".join(allowed), str(new), _dumps(data), EVENTS_MAXLEN, *flat],
        )
        ok = result == 1
        if ok and new in TERMINAL_STATUSES:
            owner = self.conn.hget(job_key(job_id), "owner")
            pipe = self.conn.pipeline()
            if owner is not None:
                # An ended job no longer counts against its owner's waiting jobs.
                pipe.srem(owner_jobs_key(_text(owner)), job_id)
            pipe.expire(job_key(job_id), self.result_ttl_s)
            pipe.expire(job_events_key(job_id), self.result_ttl_s)
            pipe.delete(job_cancel_key(job_id))
            pipe.expire(job_preview_key(job_id), self.result_ttl_s)
            pipe.execute()
        if ok and str(new) in STATUS_WEBHOOK_EVENTS:
            details = {k: v for k, v in (event or {}).items() if k in ("result", "error", "worker")}
            self._notify_webhook(job_id, STATUS_WEBHOOK_EVENTS[str(new)], {"status": str(new), **details})
        return ok

    def claim_next(self, queue_keys: list[str], worker: str) -> tuple[str, str] | None:
        """Take the first job of the first non-empty queue for ``worker`` (queue key, RQ job id), and
        record the claim in the same step; None when every queue is empty. Never blocks."""
        taken: Any = self._claim_next(keys=[*queue_keys, CLAIMS_KEY], args=[worker, int(time.time() * 1000)])
        return (_text(taken[0]), _text(taken[1])) if taken else None

    def start(self, job_id: str, worker: str, rq_id: str | None = None) -> dict[str, Any] | None:
        """queued -> started; returns the started record, or None when the job was canceled (or taken)
        meanwhile: then it must not run. With ``rq_id`` (a job taken by claim_next) the worker must
        still hold its claim: a job taken back from a worker that stopped heartbeating runs elsewhere."""
        if rq_id is not None and not self._start_claimed(keys=[CLAIMS_KEY], args=[rq_id, worker]):
            log.warning("job %s was taken back from %s before it started; it runs on another worker", job_id, worker)
            return None
        record = self.get(job_id)
        now = time.time()
        timings = dict(record.get("timings") or {})
        timings["queued"] = round(now - float(record.get("enqueued_at") or record["created_at"]), 4)
        attempts = int(record.get("attempts", 0)) + 1
        ok = self.transition(
            job_id, (JobStatus.QUEUED,), JobStatus.STARTED, {"worker": worker},
            started_at=now, worker=worker, timings=timings, attempts=attempts,
        )
        if not ok:
            return None
        self.conn.hset(RUNNING_JOBS_KEY, job_id, worker)
        observe_stage(self.conn, "queued", timings["queued"])
        return {**record, "status": str(JobStatus.STARTED), "started_at": now, "worker": worker,
                "timings": timings, "attempts": attempts}

    def finish(self, job_id: str, result: dict[str, Any], timings: dict[str, float]) -> bool:
        self.conn.hdel(RUNNING_JOBS_KEY, job_id)
        return self.transition(
            job_id, (JobStatus.STARTED,), JobStatus.FINISHED, {"result": result},
            ended_at=time.time(), result=result, timings=timings,
        )

    def fail(self, job_id: str, error: str, timings: dict[str, float] | None = None) -> bool:
        """Any status but an end one -> failed, with a reason that names no server path."""
        self.conn.hdel(RUNNING_JOBS_KEY, job_id)
        error = redact_paths(error)
        fields: dict[str, Any] = {"ended_at": time.time(), "error": error}
        if timings is not None:
            fields["timings"] = timings
        return self.transition(
            job_id, (JobStatus.QUEUED, JobStatus.STARTED), JobStatus.FAILED, {"error": error}, **fields
        )

    def cancel_done(self, job_id: str, message: str, timings: dict[str, float] | None = None) -> bool:
        """started -> canceled, after the runner stopped on a cancel request."""
        self.conn.hdel(RUNNING_JOBS_KEY, job_id)
        message = redact_paths(message)
        fields: dict[str, Any] = {"ended_at": time.time(), "error": message}
        if timings is not None:
            fields["timings"] = timings
        return self.transition(job_id, (JobStatus.STARTED,), JobStatus.CANCELED, {"error": message}, **fields)

    def requeue(self, job_id: str, reason: str) -> bool:
        """started -> queued again (a new RQ job, same record), e.g. after a worker shut down."""
        record = self.get(job_id)
        self.conn.hdel(RUNNING_JOBS_KEY, job_id)
        rq_id = f"{job_id}-{int(record.get('attempts', 1)) + 1}"
        ok = self.transition(
            job_id, (JobStatus.STARTED,), JobStatus.QUEUED, {"reason": reason},
            rq_id=rq_id, enqueued_at=time.time(), progress=None,
        )
        if ok:
            self._enqueue(rq_id, job_id, record["kind"], record["queue"], record["payload"], int(record["timeout_s"]))
        return ok

    def request_cancel(self, job_id: str) -> str:
        """Ask a job to stop. Returns the status it ends in now: canceled (it was queued), started
        (it stops at its next step), or its terminal status (nothing to do)."""
        record = self.get(job_id)
        status = record["status"]
        if status in TERMINAL_STATUSES:
            return status
        # A waiting job is canceled in one step (a worker that takes it later is refused the start); a
        # failure before that step leaves the job as it was, so an error answer means nothing changed.
        if status == JobStatus.QUEUED and self.transition(
            job_id, (JobStatus.QUEUED,), JobStatus.CANCELED, {"error": "canceled before it started"},
            ended_at=time.time(), error="canceled before it started",
        ):
            try:
                rq_queue(self.conn, record["queue"]).remove(record["rq_id"])
            except redis.RedisError:
                pass  # left in the queue, it is skipped when taken
            return JobStatus.CANCELED
        # Running (or started meanwhile): it stops at its next step.
        self.conn.set(job_cancel_key(job_id), b"1", ex=self.result_ttl_s)
        return self.status(job_id) or status

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.conn.exists(job_cancel_key(job_id)))

    # -- progress ----------------------------------------------------------------------------------
    def set_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        """Record and publish a progress change (one round trip)."""
        pipe = self.conn.pipeline(transaction=False)
        pipe.hset(job_key(job_id), "progress", _dumps(progress))
        pipe.xadd(job_events_key(job_id), {"data": _dumps({"type": "progress", **progress})},
                  maxlen=EVENTS_MAXLEN, approximate=True)
        pipe.hget(job_key(job_id), "webhook")
        target = pipe.execute()[-1]
        if target is not None:
            self._notify_webhook(job_id, "progress", {"status": str(JobStatus.STARTED), "progress": progress}, target)

    def set_preview(self, job_id: str, preview: dict[str, Any]) -> None:
        """Keep only the latest preview (its own key, a few KB) and announce it on the event stream
        with a small marker; a replay of the stream therefore never holds more than one image."""
        pipe = self.conn.pipeline(transaction=False)
        pipe.set(job_preview_key(job_id), _dumps(preview), ex=self.result_ttl_s)
        marker = {"type": "preview", "step": preview["step"], "total": preview["total"]}
        pipe.xadd(job_events_key(job_id), {"data": _dumps(marker)}, maxlen=EVENTS_MAXLEN, approximate=True)
        pipe.execute()

    def latest_preview(self, job_id: str) -> dict[str, Any] | None:
        raw = self.conn.get(job_preview_key(job_id))
        return json.loads(raw) if raw is not None else None

    # -- webhooks ----------------------------------------------------------------------------------
    def _notify_webhook(self, job_id: str, event: str, data: dict[str, Any], raw_target: Any = None) -> None:
        """Queue a delivery of ``event`` when the job has a webhook that wants it (progress: throttled).
        Never raises: a job's state change must not fail because its webhook could not be queued."""
        try:
            if raw_target is None:
                raw_target = self.conn.hget(job_key(job_id), "webhook")
                if raw_target is None:
                    return
            target = json.loads(raw_target)
            if event not in target.get("events", ()):
                return
            if event == "progress":
                interval_ms = max(1, int(float(target.get("progress_interval_s", 5.0)) * 1000))
                if not self.conn.set(job_webhook_throttle_key(job_id), b"1", nx=True, px=interval_ms):
                    return
            kind, owner = (_text(v or b"") for v in self.conn.hmget(job_key(job_id), ["kind", "owner"]))
            enqueue_delivery(self.conn, job_id, kind, owner, target, event, data, self.result_ttl_s)
        except (redis.RedisError, ValueError, TypeError, KeyError):
            log.warning("job %s: webhook %s not queued", job_id, event, exc_info=True)

    def record_webhook_attempt(self, job_id: str, attempt: dict[str, Any]) -> bool:
        """Append one delivery attempt ({event, attempt, status_code, error, at}) to the job record."""
        result = self._append_webhook_attempt(
            keys=[job_key(job_id)], args=[_dumps(attempt), MAX_RECORDED_ATTEMPTS]
        )
        return bool(result == 1)

    # -- leases and dead runners ---------------------------------------------------------------------
    @contextmanager
    def lease(self, job_id: str, ttl_s: float, interval_s: float) -> Iterator[None]:
        """Keep the job's lease alive from a thread while the body runs (heartbeat during a job)."""
        key = job_lease_key(job_id)
        ttl_ms = max(1, int(ttl_s * 1000))
        self.conn.set(key, b"1", px=ttl_ms)
        stop = threading.Event()

        def refresh() -> None:
            while not stop.wait(interval_s):
                try:
                    self.conn.set(key, b"1", px=ttl_ms)
                except redis.RedisError:
                    pass  # transient; the next refresh retries before the lease runs out

        thread = threading.Thread(target=refresh, name=f"lease-{job_id[:8]}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)
            self.conn.delete(key)

    def take_back_claims(self, lease_ttl_s: float) -> list[str]:
        """Put back at the front of its queue every job whose worker took it but has not heartbeaten for
        ``lease_ttl_s`` (frozen, or dead) before starting it; forget claims of jobs no longer waiting.
        Returns the ids of the jobs put back. Safe to run anywhere, any number of times."""
        now_ms = time.time() * 1000
        put_back: list[str] = []
        for raw_id, raw_claim in self.conn.hgetall(CLAIMS_KEY).items():
            rq_id, claim = _text(raw_id), _text(raw_claim)
            worker, queue_key, taken_at = (claim.split("\n") + ["", "", "0"])[:3]
            if now_ms - float(taken_at or 0) < lease_ttl_s * 1000:
                continue
            job_id = rq_id[:32]
            if self.status(job_id) == JobStatus.QUEUED and self.conn.exists(worker_key(worker)):
                continue  # a live worker about to start it
            if self._take_back(keys=[CLAIMS_KEY, queue_key, job_key(job_id)], args=[rq_id, claim]) == 1:
                log.warning("job %s went back to its queue: worker %s took it and stopped responding", job_id, worker)
                put_back.append(job_id)
        return put_back

    def reap_orphans(self, lease_ttl_s: float, retry: bool) -> list[str]:
        """Fail (or retry once) every started job whose runner's lease expired. Safe to run anywhere,
        any number of times: HDEL decides which caller handles a job."""
        reaped: list[str] = []
        for raw_id, raw_worker in self.conn.hgetall(RUNNING_JOBS_KEY).items():
            job_id, worker = _text(raw_id), _text(raw_worker)
            if self.conn.exists(job_lease_key(job_id)):
                continue
            if self.conn.hdel(RUNNING_JOBS_KEY, job_id) != 1:
                continue
            try:
                record = self.get(job_id)
            except JobNotFound:
                continue
            if record["status"] != JobStatus.STARTED:
                continue
            reason = f"worker {worker} stopped responding (no heartbeat for {lease_ttl_s:g} s)"
            if retry and int(record.get("attempts", 1)) < 2:
                self.requeue(job_id, reason + "; retrying once")
            else:
                self.fail(job_id, reason)
            reaped.append(job_id)
        return reaped

    # -- encoding ----------------------------------------------------------------------------------
    def _encode(self, record: dict[str, Any]) -> dict[str, str]:
        return {k: _dumps(v) if k in self.JSON_FIELDS else str(v) for k, v in record.items()}

    def _decode(self, raw: Any) -> dict[str, Any]:
        record: dict[str, Any] = {}
        for k, v in raw.items():
            key, text = _text(k), _text(v)
            record[key] = json.loads(text) if key in self.JSON_FIELDS else text
        for key in ("created_at", "started_at", "ended_at", "enqueued_at"):
            if record.get(key):
                record[key] = float(record[key])
        return self._with_defaults(record)

    @staticmethod
    def _with_defaults(record: dict[str, Any]) -> dict[str, Any]:
        record.setdefault("rq_id", record["id"])
        record.setdefault("attempts", 0)
        for key, empty in (("progress", None), ("timings", {}), ("result", None), ("error", ""), ("webhooks", [])):
            record.setdefault(key, empty)
        return record
