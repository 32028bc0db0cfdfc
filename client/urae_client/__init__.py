"""Python client of the urae-serve HTTP API (sync ``Client``, asyncio ``AsyncClient``); needs only httpx.

    from urae_client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as urae:
        job = urae.generate("a lighthouse at dawn", preset="2k").wait()
        job.download(0, "lighthouse.png")
"""

from urae_client.async_client import AsyncClient, AsyncJob
from urae_client.errors import UraeError
from urae_client.models import Adapter, Dataset, Event, JobState, Progress
from urae_client.sync_client import Client, Job

__all__ = ["Adapter", "AsyncClient", "AsyncJob", "Client", "Dataset", "Event", "Job", "JobState", "Progress",
           "UraeError"]
