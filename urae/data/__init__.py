"""Training data: dataset folders, aspect buckets, and the embedding/latent cache.

The names are imported on first use, so that ``urae.data.cli`` (built into every ``urae`` command
line) does not pay for loading diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from urae.data.buckets import bucket_sizes, fit_to_bucket, nearest_bucket
    from urae.data.cache import (
        CachedItem,
        CacheReport,
        cache_dataset,
        encode_posterior,
        encode_prompt,
        load_cached,
    )
    from urae.data.dataset import DatasetItem, dataset_hash, scan_dataset

_HOMES = {
    "CacheReport": "urae.data.cache",
    "CachedItem": "urae.data.cache",
    "DatasetItem": "urae.data.dataset",
    "bucket_sizes": "urae.data.buckets",
    "cache_dataset": "urae.data.cache",
    "dataset_hash": "urae.data.dataset",
    "encode_posterior": "urae.data.cache",
    "encode_prompt": "urae.data.cache",
    "fit_to_bucket": "urae.data.buckets",
    "load_cached": "urae.data.cache",
    "nearest_bucket": "urae.data.buckets",
    "scan_dataset": "urae.data.dataset",
}

__all__ = [
    "CacheReport",
    "CachedItem",
    "DatasetItem",
    "bucket_sizes",
    "cache_dataset",
    "dataset_hash",
    "encode_posterior",
    "encode_prompt",
    "fit_to_bucket",
    "load_cached",
    "nearest_bucket",
    "scan_dataset",
]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'urae.data' has no attribute {name!r}")
