"""Where results, adapters and datasets live: one small interface, one backend per deployment.

``open_storage(settings)`` picks the backend from ``URAE_STORAGE_URL``; nothing else in the code
knows which one is in use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jobstore.storage.base import (
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    Storage,
    StorageKeyError,
    StorageUnavailable,
)
from jobstore.storage.local import LocalStorage

if TYPE_CHECKING:
    from jobstore.settings import Settings

__all__ = [
    "LocalStorage",
    "ObjectExists",
    "ObjectInfo",
    "ObjectNotFound",
    "Storage",
    "StorageKeyError",
    "StorageUnavailable",
    "open_storage",
]


def open_storage(settings: Settings) -> Storage:
    """The storage backend the settings name: a local directory, or ``s3://bucket/prefix``."""
    url = settings.storage_location
    if url.startswith("s3://"):
        from jobstore.storage.s3 import S3Storage  # boto3 only where S3 is used

        return S3Storage(
            url,
            cache_dir=settings.local_cache_dir,
            # Compose files pass unset variables as empty strings: empty means "not set".
            endpoint_url=settings.s3_endpoint_url or None,
            public_endpoint_url=settings.s3_public_endpoint_url or None,
            presigned_ttl_s=settings.s3_presigned_ttl_s if settings.s3_presigned_downloads else None,
            cache_max_bytes=settings.cache_max_bytes or None,
        )
    return LocalStorage(url)
