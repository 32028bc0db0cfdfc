"""Where results, adapters and datasets live: one small interface, one backend per deployment."""

from jobstore.storage.local import LocalStorage, StorageKeyError

__all__ = ["LocalStorage", "StorageKeyError"]
