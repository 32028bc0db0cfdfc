"""What a worker process holds: settings, Redis, storage, and (generation workers) the resident model."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from jobstore.adapters import describe_builtin_adapter, get_adapter
from jobstore.contract import BUILTIN_ADAPTERS
from jobstore.jobs import JobRecords
from jobstore.queues import connect
from jobstore.settings import Settings, get_settings
from jobstore.storage import Storage, open_storage
from worker.image_writer import ImageWriter

if TYPE_CHECKING:
    from urae.generate import Generator
    from urae.parallel import ParallelGenerator


@dataclass
class Runtime:
    settings: Settings
    name: str
    conn: redis.Redis
    records: JobRecords
    storage: Storage
    pid: int = field(default_factory=os.getpid)
    # One GPU, or rank 0 of a group driving several for each image (URAE_CONTEXT_PARALLEL).
    generator: Generator | ParallelGenerator | None = None
    current_job: str | None = None
    # Set by SIGTERM: past this monotonic time the running job is stopped and put back in the queue.
    shutdown_deadline: float | None = None
    # Adapter name -> version the running job was submitted with (see resolve_adapter).
    pinned_versions: dict[str, str] = field(default_factory=dict)
    # Encodes and stores finished jobs' images while the next job runs (see worker.image_writer).
    image_writer: ImageWriter = field(default_factory=ImageWriter)
    # Built-in adapters whose files this process has described in Redis (for GET /adapters).
    described_builtins: set[str] = field(default_factory=set)

    def shutdown_overdue(self) -> bool:
        return self.shutdown_deadline is not None and time.monotonic() >= self.shutdown_deadline

    def resolve_adapter(self, name: str) -> Path:
        """Adapter name -> local file: built-ins from the library, the rest from the registry."""
        from urae.adapters import resolve_adapter
        from urae.errors import AdapterNotFoundError

        if name in BUILTIN_ADAPTERS:
            path = resolve_adapter(name, self.settings.model, self.settings.adapter_cache_dir)
            self.describe_builtin(name, path)
            return path
        record = get_adapter(self.conn, name)
        if record is None:
            raise AdapterNotFoundError(f"adapter {name!r} was deleted or was never registered")
        pinned = self.pinned_versions.get(name)
        if pinned is not None and record.get("version") != pinned:
            raise AdapterNotFoundError(
                f"adapter {name!r} changed since the job was submitted (it was replaced); submit the job again "
                "to use the new version"
            )
        return self.storage.local_file(record["object"])

    def describe_builtin_adapters(self) -> None:
        """Describe every built-in adapter of the served model that is here without a download (the
        others are described when first used)."""
        from urae.adapters.builtin import local_builtin_adapter

        for name in BUILTIN_ADAPTERS:
            path = local_builtin_adapter(name, self.settings.model, self.settings.adapter_cache_dir)
            if path is not None:
                self.describe_builtin(name, path)

    def describe_builtin(self, name: str, path: Path) -> None:
        """Record a built-in adapter's version (its content hash), ranks and size, once per process."""
        if name in self.described_builtins:
            return
        from urae.adapters import inspect_adapter

        info = inspect_adapter(path)
        describe_builtin_adapter(self.conn, self.settings.model, {
            "name": name, "version": info.sha256[:12], "rank": info.trained_rank, "export_rank": info.rank,
            "size_bytes": path.stat().st_size, "sha256": info.sha256,
        })
        self.described_builtins.add(name)

    def adapter_source(self, name: str) -> Path | tuple[Path, str]:
        """What the generator loads: the file, with the SHA-256 the registry recorded when the adapter
        was registered (so a worker never hashes a registered file again)."""
        path = self.resolve_adapter(name)
        if name in BUILTIN_ADAPTERS:
            return path
        record = get_adapter(self.conn, name)
        sha = record.get("sha256") if record is not None else None
        return (path, sha) if isinstance(sha, str) and sha else path


_runtime: Runtime | None = None


def init_runtime(name: str, settings: Settings | None = None) -> Runtime:
    """Create the process's runtime (once per process: a forked job process makes its own)."""
    global _runtime
    settings = settings or get_settings()
    conn = connect(settings.redis_url, settings.redis_socket_timeout_s)
    _runtime = Runtime(
        settings=settings,
        name=name,
        conn=conn,
        records=JobRecords(conn, settings.result_ttl_s),
        storage=open_storage(settings),
    )
    return _runtime


def runtime() -> Runtime:
    """This process's runtime; a forked job process replaces the parent's Redis connection."""
    global _runtime
    if _runtime is None:
        return init_runtime(f"{os.uname().nodename}-{os.getpid()}")
    if _runtime.pid != os.getpid():
        parent = _runtime
        _runtime = init_runtime(parent.name, parent.settings)
    return _runtime
