"""Training data: dataset folders, aspect buckets, and the embedding/latent cache."""

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
