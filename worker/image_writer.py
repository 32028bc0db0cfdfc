"""Encoding and storing a job's images off the GPU's critical path.

A generation job hands its decoded images to this writer and returns, so the worker takes the next
job and denoises on the GPU while the previous images are PNG-encoded and stored (a 4096 px PNG
takes seconds on one core). Tasks run in submission order on one thread; at most ``max_pending``
wait, so a slow store pushes back on the GPU instead of filling memory with images; a store that is
down stops the worker taking jobs (``stalled``) until the images it holds are stored.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("urae.worker")

Task = Callable[[], None]


class ImageWriter:
    """One background thread running write tasks in order."""

    def __init__(self, max_pending: int = 2):
        self._queue: queue.Queue[Task | None] = queue.Queue(maxsize=max_pending)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # True while a task keeps finished images because the object store is unavailable: the
        # worker takes no new job meanwhile (it would only add to what waits).
        self.stalled = False

    def submit(self, task: Task) -> None:
        """Queue ``task``; blocks while ``max_pending`` tasks wait. The task must handle its own errors."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="image-writer", daemon=True)
                self._thread.start()
        self._queue.put(task)

    def drain(self) -> None:
        """Wait until every submitted task has run."""
        self._queue.join()

    def close(self) -> None:
        """Run what is queued, then stop the thread (a later submit starts a new one)."""
        with self._lock:
            thread = self._thread
            self._thread = None
        if thread is None:
            return
        self._queue.put(None)
        thread.join()

    def _run(self) -> None:
        while True:
            task = self._queue.get()
            try:
                if task is None:
                    return
                task()
            except Exception:  # a task reports its own failures; this keeps the thread serving
                log.exception("image write task failed")
            finally:
                self._queue.task_done()
