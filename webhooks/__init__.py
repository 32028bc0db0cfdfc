"""Webhook delivery: a small asyncio worker (no torch, no web framework) that sends jobs' events.

``python -m webhooks`` takes due deliveries from Redis, fairly across API keys: each is signed the
Standard Webhooks way, sent to an address checked again at delivery time within one time limit,
retried with exponential backoff for a bounded time, and every attempt is recorded in the job's record.
"""
