"""Webhook delivery: a small RQ worker (no torch, no web framework) that sends jobs' events.

``python -m webhooks`` serves the ``urae-webhooks`` queue: each delivery is signed the Standard
Webhooks way, sent to an address checked again at delivery time, retried with exponential backoff
for a bounded time, and every attempt is recorded in the job's record.
"""
