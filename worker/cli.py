"""``python -m worker`` / ``urae-worker``: run a generation or fine-tune worker.

Generation: one process per GPU; loads the pipeline once and keeps it across jobs (an RQ
SimpleWorker: jobs run in this process, so the model stays resident). RQ gives such a worker no
heartbeat during a job and no way to stop one, so this module adds both: a heartbeat thread that
advertises capabilities and reaps the jobs of dead workers, per-job leases, and a cooperative cancel
flag read at every denoising step.

Fine-tune: RQ's forking Worker: each training job runs in its own child process, so a crash or an
out-of-memory kill ends that job (failed, via its lease) and never a generation worker.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from typing import Any

import redis
from rq import Queue, SimpleWorker, Worker
from rq.exceptions import DequeueTimeout, NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.utils import backend_class

from jobstore.contract import FINETUNE_QUEUE, GENERATE_QUEUES, JobKind
from jobstore.settings import Settings, SettingsError, get_backend_settings
from jobstore.workers import publish_worker, remove_worker
from worker.runtime import Runtime, init_runtime

log = logging.getLogger("urae.worker")

QUEUE_ALIASES = {"generate": list(GENERATE_QUEUES), "finetune": [FINETUNE_QUEUE]}


def load_settings() -> Settings:
    """This worker's settings from the environment (and ./.env); no API keys needed. Raises SettingsError."""
    return get_backend_settings()


# How often an idle worker asks the queues for a job (the longest a new job waits for an idle worker).
DEQUEUE_POLL_S = 0.1


def claiming_queue_class(rt: Runtime) -> type[Queue]:
    """An RQ queue class whose ``dequeue_any`` takes jobs with a recorded claim (``claim_next``), never
    with a blocking pop: Redis answers a blocking pop for a process that is frozen (SIGSTOP) too, and
    the job would sit in its socket, queued, while other workers idle. A claimed job whose worker stops
    heartbeating goes back to the queue (``take_back_claims``). No job is taken while this worker's
    finished images wait for the object store."""

    class ClaimingQueue(Queue):
        @classmethod
        def dequeue_any(cls, queues: Any, timeout: int | None, connection: Any = None, job_class: Any = None,
                        serializer: Any = None, death_penalty_class: Any = None) -> tuple[Job, Queue] | None:
            job_cls = backend_class(cls, "job_class", override=job_class)
            keys = [q.key for q in queues]
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                taken = None if rt.image_writer.stalled else rt.records.claim_next(keys, rt.name)
                if taken is None:
                    if deadline is None:
                        return None
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise DequeueTimeout(timeout, keys)
                    time.sleep(min(DEQUEUE_POLL_S, left))
                    continue
                queue_key, job_id = taken
                queue = cls.from_queue_key(queue_key, connection=connection, job_class=job_cls,
                                           serializer=serializer, death_penalty_class=death_penalty_class)
                try:
                    job = job_cls.fetch(job_id, connection=connection, serializer=serializer)
                except NoSuchJobError:
                    continue  # as RQ does: a job that no longer exists is skipped
                except Exception as exc:
                    exc.job_id = job_id  # type: ignore[attr-defined]  # RQ reports which job failed
                    exc.queue = queue  # type: ignore[attr-defined]
                    raise
                return job, queue

    return ClaimingQueue


class _GracefulStop:
    """RQ's SIGTERM handling (finish the current job, then stop) plus a deadline for that job."""

    runtime: Runtime

    def request_stop(self, signum: Any, frame: Any) -> None:
        rt = self.runtime
        if rt.shutdown_deadline is None:
            rt.shutdown_deadline = time.monotonic() + rt.settings.shutdown_grace_s
            log.info("shutting down: the current job has %.0f s to finish", rt.settings.shutdown_grace_s)
        super().request_stop(signum, frame)  # type: ignore[misc]


    def unsubscribe(self) -> None:
        """RQ's, with a bounded wait: redis-py 8's PubSubWorkerThread.stop() waits for the thread, which
        sits in a read of up to 60 s (RQ's sleep_time), so a stopping worker took up to a minute to exit."""
        thread, pubsub = getattr(self, "pubsub_thread", None), getattr(self, "pubsub", None)
        if thread is not None and pubsub is not None:
            thread.stop(timeout=0.5)
            pubsub.close()  # ends the thread's read; it exits since it was told to stop


class ResidentWorker(_GracefulStop, SimpleWorker):
    """Runs jobs in this process, next to the resident model."""


class IsolatedWorker(_GracefulStop, Worker):
    """Runs each job in a forked child process."""

    def request_stop(self, signum: Any, frame: Any) -> None:
        first = self.runtime.shutdown_deadline is None
        super().request_stop(signum, frame)
        if first and self.horse_pid:
            # The job runs in the child: tell it when its grace period is over; it checkpoints and is requeued.
            timer = threading.Timer(self.runtime.settings.shutdown_grace_s, self._signal_horse)
            timer.daemon = True
            timer.start()

    def _signal_horse(self) -> None:
        if self.horse_pid:
            try:
                os.kill(self.horse_pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="urae-worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--queues", default="generate",
                        help="comma-separated: 'generate' (the three priority queues), 'finetune', or queue names")
    parser.add_argument("--model", help="model id (default URAE_MODEL); 'tiny' for the offline test model")
    parser.add_argument("--device", help="torch device (default URAE_DEVICE)")
    parser.add_argument("--dtype", help="float32, float16 or bfloat16 (default URAE_DTYPE)")
    parser.add_argument("--max-pixels", type=int, help="largest image this worker accepts (default URAE_WORKER_MAX_PIXELS)")
    parser.add_argument("--name", help="worker name (default host-pid)")
    parser.add_argument("--burst", action="store_true", help="stop when the queues are empty")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def resolve_queues(text: str) -> tuple[list[str], JobKind]:
    names: list[str] = []
    known = (*GENERATE_QUEUES, FINETUNE_QUEUE)
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part not in QUEUE_ALIASES and part not in known:
            raise SystemExit(f"urae-worker: unknown queue {part!r}; use generate, finetune or one of {', '.join(known)}")
        names += QUEUE_ALIASES.get(part, [part])
    if not names:
        raise SystemExit("urae-worker: --queues names no queue")
    kind = JobKind.FINETUNE if names == [FINETUNE_QUEUE] else JobKind.GENERATE
    if FINETUNE_QUEUE in names and kind != JobKind.FINETUNE:
        raise SystemExit("urae-worker: the finetune queue needs its own worker process (it is isolated)")
    return names, kind


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"urae-worker: refusing to start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    overrides = {k: v for k, v in {"model": args.model, "device": args.device, "dtype": args.dtype,
                                   "worker_max_pixels": args.max_pixels}.items() if v is not None}
    settings = settings.model_copy(update=overrides)
    queues, kind = resolve_queues(args.queues)
    name = args.name or f"{socket.gethostname()}-{os.getpid()}"
    rt = init_runtime(name, settings)

    if kind == JobKind.GENERATE:
        if not _load_model(rt):
            raise SystemExit(1)
        try:
            rt.describe_builtin_adapters()
        except Exception as exc:  # a description is a courtesy to GET /adapters, never a reason not to serve
            log.warning("built-in adapters not described (%s: %s)", type(exc).__name__, exc)
    else:
        # Import the training code once here, so every forked job process starts with it loaded.
        # Importing torch does not initialise CUDA, so the children can still use the GPU.
        import urae.train  # noqa: F401
    info = {"model": settings.model, "device": settings.device, "pid": os.getpid(), "queues": queues,
            "kinds": [str(kind)] if kind == JobKind.FINETUNE else [str(JobKind.GENERATE), str(JobKind.ADAPTER_IMPORT)],
            "max_pixels": settings.max_pixels, "started_at": time.time(),
            **(rt.generator.capabilities() if rt.generator is not None else {})}
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(rt, info, stop), name="heartbeat", daemon=True)
    beat.start()
    try:
        _serve(rt, queues, kind, args.burst, args.log_level.upper())
    finally:
        # Jobs whose images are still being written finish (or fail) before the worker goes.
        rt.image_writer.close()
        close_group = getattr(rt.generator, "close", None)  # the follower ranks of a multi-GPU worker
        if close_group is not None:
            close_group()
        stop.set()
        beat.join(timeout=5)
        try:
            remove_worker(rt.conn, name)
        except redis.RedisError:
            pass
    exit_without_teardown(0)


def exit_without_teardown(code: int) -> None:
    """Leave now that every job is finished, put back or released and the worker is unregistered.

    The interpreter's own teardown of torch, the model and their modules takes seconds on an idle CPU
    (measured 2.2 s with the tiny model; 0.1 s without it) and tens of seconds on a loaded one, while
    whoever stops the worker (docker stop, urae-serve, a deploy) waits for the process to end.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _load_model(rt: Runtime) -> bool:
    from urae.errors import UraeError
    from urae.generate import Generator

    s = rt.settings
    started = time.monotonic()
    if s.torch_threads is not None:
        import torch

        torch.set_num_threads(s.torch_threads)
    if s.context_parallel > 1:
        return _load_parallel(rt)
    try:
        rt.generator = Generator.load(
            s.model, device=s.device, dtype=s.dtype, offload=s.offload, adapter_resolver=rt.adapter_source,
            adapter_capacity=s.adapter_capacity, hotswap_rank=s.hotswap_rank,
            text_encoder_offload=s.text_encoder_offload, prompt_cache_size=s.prompt_cache_size,
            adapter_slots=s.adapter_slots, tiers=[t.strip() for t in s.tiers.split(",") if t.strip()],
            compile=s.compile, attention_backend=s.attention_backend, memory_profile=s.memory_profile,
            idle_adapter_slots=s.idle_adapter_slots,
        )
        rt.generator.preview_autoencoder = s.preview_autoencoder
        rt.generator.preview_max_side = s.preview_max_side
        # The adapter slots exist from the start: they are part of every compiled graph.
        rt.generator.adapters  # noqa: B018
    except UraeError as exc:
        print(f"urae-worker: cannot load model {s.model}: {exc}", file=sys.stderr)
        return False
    log.info("model %s loaded on %s in %.1f s (%s)", s.model, s.device, time.monotonic() - started,
             rt.generator.capabilities())
    return _warm_up(rt)


def _load_parallel(rt: Runtime) -> bool:
    """URAE_CONTEXT_PARALLEL > 1: this process and N-1 followers, one image across N GPUs."""
    from urae.errors import UraeError
    from worker.parallel import load_parallel_generator

    s = rt.settings
    started = time.monotonic()
    try:
        rt.generator = load_parallel_generator(rt)
    except UraeError as exc:
        print(f"urae-worker: cannot start {s.context_parallel} ranks of {s.model}: {exc}", file=sys.stderr)
        return False
    assert rt.generator is not None
    log.info("model %s loaded on %d ranks (%s) in %.1f s (%s)", s.model, s.context_parallel,
             s.context_parallel_mode, time.monotonic() - started, rt.generator.capabilities())
    return _warm_up(rt)


def _warm_up(rt: Runtime) -> bool:
    """Run every served (preset, aspect ratio, tier) once before the first heartbeat, so the worker is
    only seen (and /ready only answers ready) once no request will compile or fetch a built-in adapter."""
    from urae.errors import UraeError
    from urae.tiers import warmup_specs

    s = rt.settings
    generator = rt.generator
    assert generator is not None
    mode = s.warmup if s.warmup != "auto" else ("presets" if str(generator.device).startswith("cuda") else "none")
    specs = warmup_specs(mode, generator.schnell, generator.capabilities()["tiers"], s.max_pixels, generator.model_id)
    if not specs:
        return True
    started = time.monotonic()

    def each(spec: Any, seconds: float) -> None:
        log.info("warm-up %s %dx%d %s: %.1f s", spec.preset, spec.width, spec.height, spec.tier, seconds)

    try:
        generator.warm_up(specs, on_each=each)
    except UraeError as exc:
        print(f"urae-worker: warm-up failed: {exc}", file=sys.stderr)
        return False
    log.info("warm-up: %d runs in %.1f s", len(specs), time.monotonic() - started)
    return True
    return True


def _heartbeat(rt: Runtime, info: dict[str, Any], stop: threading.Event) -> None:
    s = rt.settings
    # Its own connection: a slow reply to the job thread must not delay the heartbeat, and vice versa.
    from jobstore.jobs import JobRecords
    from jobstore.queues import connect

    conn = connect(s.redis_url, s.redis_socket_timeout_s)
    records = JobRecords(conn, s.result_ttl_s)
    next_reap = 0.0
    while True:
        try:
            adapters = rt.generator._adapters if rt.generator is not None else None
            publish_worker(conn, rt.name, {
                **info, "current_job": rt.current_job,
                "adapter_hits": adapters.hits if adapters is not None else 0,
                "adapter_misses": adapters.misses if adapters is not None else 0,
            }, ttl_s=max(s.lease_ttl_s, 3 * s.heartbeat_interval_s))
            if time.monotonic() >= next_reap:
                next_reap = time.monotonic() + s.reaper_interval_s
                for job_id in records.reap_orphans(s.lease_ttl_s, s.retry_orphaned_jobs):
                    log.warning("job %s lost its worker", job_id)
                records.take_back_claims(s.lease_ttl_s)
        except redis.RedisError as exc:
            log.warning("heartbeat: Redis unavailable (%s); retrying", type(exc).__name__)
        if stop.wait(s.heartbeat_interval_s):
            return


def _serve(rt: Runtime, queues: list[str], kind: JobKind, burst: bool, log_level: str) -> None:
    """Run the RQ loop; reconnect by itself when Redis goes away, stop on SIGTERM/SIGINT."""
    worker_class = IsolatedWorker if kind == JobKind.FINETUNE else ResidentWorker
    backoff = 0.5
    while True:
        try:
            rt.conn.ping()
            # A fresh RQ name per attempt: a registration left behind by a lost connection must not block.
            worker = worker_class(queues, connection=rt.conn, serializer=JSONSerializer,
                                  name=f"{rt.name}.{uuid.uuid4().hex[:6]}", queue_class=claiming_queue_class(rt))
            worker.runtime = rt  # type: ignore[attr-defined]
            worker.work(burst=burst, logging_level=log_level, with_scheduler=False)
            backoff = 0.5
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("Redis unavailable (%s); reconnecting in %.1f s", type(exc).__name__, backoff)
        if burst or rt.shutdown_deadline is not None:
            return
        # work() returns on its own only when Redis failed under it: wait, then start again.
        if _sleep_interruptible(backoff, rt):
            return
        backoff = min(backoff * 2, 10.0)


def _sleep_interruptible(seconds: float, rt: Runtime) -> bool:
    stopped = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        rt.shutdown_deadline = time.monotonic()
        stopped.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        stopped.wait(seconds)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return stopped.is_set()

