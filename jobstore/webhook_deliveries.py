"""Webhook deliveries waiting in Redis, taken fairly across API keys.

Each delivery (one event of one job, with its fixed body) is a JSON value under its message id and
sits in one of two sorted sets of the key that owns the job: ``due`` (score: when its next attempt may
start) or ``inflight`` (score: when the lease of the worker sending it runs out). Workers take the
next due delivery of the key served longest ago that has fewer than its maximum in flight, so one key's
slow receivers occupy at most that many senders and every other key's deliveries go on. A delivery
whose worker stopped (lease over) is due again; retries are due deliveries with a later score: no
scheduler process to lose when Redis restarts.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import redis

from jobstore.codec import dumps as _dumps
from jobstore.contract import KEY_PREFIX

WEBHOOKS_PREFIX = f"{KEY_PREFIX}:webhooks:"
# Keys (owners) with deliveries due or in flight, scored by when one of theirs was last taken.
WEBHOOK_OWNERS_KEY = f"{WEBHOOKS_PREFIX}owners"
# The owner recorded for jobs of the open development mode (no key).
ANONYMOUS_OWNER = "-"


def delivery_key(message_id: str) -> str:
    return f"{WEBHOOKS_PREFIX}delivery:{message_id}"


def due_key(owner: str) -> str:
    return f"{WEBHOOKS_PREFIX}due:{owner or ANONYMOUS_OWNER}"


def inflight_key(owner: str) -> str:
    return f"{WEBHOOKS_PREFIX}inflight:{owner or ANONYMOUS_OWNER}"


def now_ms() -> int:
    return int(time.time() * 1000)


def enqueue_delivery(
    conn: redis.Redis, job_id: str, kind: str, owner: str, target: dict[str, Any], event: str,
    data: dict[str, Any], ttl_s: int,
) -> str:
    """Queue the delivery of one event to the job's webhook, due now; the message id.

    The body is fixed here, once: every attempt sends the same bytes under the same ``webhook-id``, so
    a receiver can drop duplicates. The delivery expires after ``ttl_s`` whatever happens to it.
    """
    import uuid

    message_id = f"msg_{uuid.uuid4().hex}"
    body = json.dumps(
        {"type": f"job.{event}", "timestamp": datetime.now(UTC).isoformat(),
         "data": {"id": job_id, "kind": kind, **data}},
        separators=(",", ":"), default=str,
    )
    delivery = {"job_id": job_id, "owner": owner or ANONYMOUS_OWNER, "event": event, "url": target["url"],
                "message_id": message_id, "body": body, "attempt": 1, "first_attempt_at": time.time()}
    pipe = conn.pipeline()
    pipe.set(delivery_key(message_id), _dumps(delivery), ex=max(60, ttl_s))
    pipe.zadd(due_key(owner), {message_id: now_ms()})
    pipe.zadd(WEBHOOK_OWNERS_KEY, {owner or ANONYMOUS_OWNER: 0}, nx=True)  # a new key is served first
    pipe.execute()
    return message_id


# KEYS[1]: the owners. ARGV: now (ms), most in flight per owner, lease (ms), key prefix.
# Returns {id, delivery} for the delivery taken, else the earliest time (ms) one will be due, or nil.
CLAIM_SCRIPT = """
local now = tonumber(ARGV[1])
local next_due = false
for _, owner in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local due = ARGV[4] .. 'due:' .. owner
  local inflight = ARGV[4] .. 'inflight:' .. owner
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', inflight, '-inf', now)) do
    redis.call('ZREM', inflight, id)
    redis.call('ZADD', due, now, id)
  end
  local waiting = redis.call('ZCARD', due)
  local running = redis.call('ZCARD', inflight)
  if waiting == 0 and running == 0 then
    redis.call('ZREM', KEYS[1], owner)
  elseif waiting > 0 and running < tonumber(ARGV[2]) then
    local first = redis.call('ZRANGE', due, 0, 0, 'WITHSCORES')
    local at = tonumber(first[2])
    if at <= now then
      redis.call('ZREM', due, first[1])
      local delivery = redis.call('GET', ARGV[4] .. 'delivery:' .. first[1])
      if delivery then
        redis.call('ZADD', inflight, now + tonumber(ARGV[3]), first[1])
        redis.call('ZADD', KEYS[1], now, owner)
        return {first[1], delivery}
      end
    elseif (not next_due) or at < next_due then
      next_due = at
    end
  end
end
return next_due
"""

# KEYS: owners, due, inflight, delivery, job record. ARGV: id, outcome (done | retry | release), when
# the delivery is due again (ms), the delivery as it is retried, the attempt to record ('' for none),
# the most attempts a job records, the owner. Does nothing (0) when the delivery is no longer this
# worker's (its lease ran out and it was taken again).
COMPLETE_SCRIPT = """
if redis.call('ZREM', KEYS[3], ARGV[1]) == 0 then return 0 end
if ARGV[2] == 'done' then
  redis.call('DEL', KEYS[4])
else
  if ARGV[2] == 'retry' then redis.call('SET', KEYS[4], ARGV[4], 'KEEPTTL') end
  redis.call('ZADD', KEYS[2], tonumber(ARGV[3]), ARGV[1])
  redis.call('ZADD', KEYS[1], 'NX', 0, ARGV[7])
end
if ARGV[5] ~= '' and redis.call('EXISTS', KEYS[5]) == 1 then
  local cur = redis.call('HGET', KEYS[5], 'webhooks')
  if (not cur) or cur == '[]' then
    redis.call('HSET', KEYS[5], 'webhooks', '[' .. ARGV[5] .. ']')
  else
    local n = select(2, string.gsub(cur, '"attempt":', ''))
    if n < tonumber(ARGV[6]) then
      redis.call('HSET', KEYS[5], 'webhooks', string.sub(cur, 1, -2) .. ',' .. ARGV[5] .. ']')
    end
  end
end
return 1
"""


def completion_keys(owner: str, message_id: str, job_key: str) -> list[str]:
    return [WEBHOOK_OWNERS_KEY, due_key(owner), inflight_key(owner), delivery_key(message_id), job_key]
