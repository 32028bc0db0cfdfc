"""``urae-serve``: Redis, the API and the workers on one machine with one command; Ctrl-C stops them all.

This module only spawns and watches processes: it never imports torch or the library. The workers
load the model in their own processes. Defaults suit a CPU machine: ``mini``, the small trained model
shipped in the package, which draws the world's captions (shapes, colours, counts) in seconds; with a
GPU and the weights, ``--model black-forest-labs/FLUX.1-dev`` serves the real model, one generation
worker per GPU.

Access: a fresh API key is generated and printed at startup (or ``--api-key``, or the keys already in
``URAE_API_KEYS``); ``--open-access`` instead runs the development mode where every request is
accepted, and says so.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import redis

from jobstore.contract import worker_key

# Models that run on the CPU by default: the random tiny ones and the trained mini (the default).
CPU_MODELS = ("tiny", "tiny-schnell", "mini")
DEFAULT_MODEL = "mini"
REDIS_START_TIMEOUT_S = 15.0
API_STOP_TIMEOUT_S = 10.0
WEBHOOKS_STOP_TIMEOUT_S = 15.0
REDIS_STOP_TIMEOUT_S = 10.0
# A worker that got SIGTERM finishes its job within URAE_SHUTDOWN_GRACE_S; this is the slack on top.
WORKER_STOP_SLACK_S = 10.0
POLL_INTERVAL_S = 0.2
STOP_FIRST, STOP_SECOND, STOP_LAST = 0, 1, 2  # workers, API, Redis
PR_SET_PDEATHSIG = 1


class LocalStackError(Exception):
    """The stack cannot start or stopped on its own; the message says what to do."""


@dataclass
class StackOptions:
    """What to run; the command-line flags of ``urae-serve``."""

    model: str = DEFAULT_MODEL
    device: str | None = None  # default: cpu for mini and the tiny models, cuda otherwise
    dtype: str | None = None  # default: float32 on cpu, bfloat16 on a GPU
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    finetune_workers: int = 1
    data_dir: Path = Path("data")
    redis_url: str | None = None  # use this Redis instead of starting one
    api_key: str | None = None
    open_access: bool = False
    ready_timeout_s: float = 900.0

    @property
    def resolved_device(self) -> str:
        return self.device or ("cpu" if self.model in CPU_MODELS else "cuda")

    @property
    def resolved_dtype(self) -> str:
        return self.dtype or ("float32" if self.resolved_device == "cpu" else "bfloat16")


@dataclass
class Child:
    """One process of the stack, with its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    stop_timeout_s: float
    stop_stage: int  # stopped in increasing order: workers, then the API, then Redis
    log: IO[bytes] = field(repr=False)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        self.log.flush()
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])


def _die_with_parent() -> None:
    # The children run in their own session (the terminal's Ctrl-C reaches only this process, which
    # stops them in order); if this process is killed outright, the kernel still sends them SIGTERM.
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalStack:
    """Starts Redis (unless given one), the API and the workers; stops them in reverse order."""

    def __init__(self, options: StackOptions, out: IO[str] = sys.stdout):
        self.options = options
        self.out = out
        self.children: list[Child] = []
        self.stop_requested = threading.Event()
        self.force = threading.Event()
        self.api_key: str | None = None
        self.webhook_secret: str | None = None  # set when generated here (then printed)
        self.redis_url = ""
        self.owns_redis = False
        self.data_dir = options.data_dir.resolve()
        self.log_dir = self.data_dir / "logs"

    # -- starting --------------------------------------------------------------------------------
    def start(self) -> None:
        """Start everything and wait until a generation worker serves the model; raise on failure."""
        o = self.options
        if o.workers < 1:
            raise LocalStackError("--workers must be at least 1")
        if o.finetune_workers < 0:
            raise LocalStackError("--finetune-workers must be 0 or more")
        if not _port_free(o.host, o.port):
            raise LocalStackError(f"port {o.port} on {o.host} is in use: stop what uses it or pass --port")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = self._service_env()
        self._check_settings(env)
        gpus = self._gpu_ids(env)
        self._start_redis(env)
        env["URAE_REDIS_URL"] = self.redis_url
        api_env = {**env, "URAE_API_HOST": o.host, "URAE_API_PORT": str(o.port)}
        self._spawn("api", [sys.executable, "-c", "from service.app import main; main()"], api_env,
                    API_STOP_TIMEOUT_S, STOP_SECOND)
        worker_stop = float(env.get("URAE_SHUTDOWN_GRACE_S", "30")) + WORKER_STOP_SLACK_S
        model_args = ["--model", o.model, "--device", o.resolved_device, "--dtype", o.resolved_dtype]
        generation = []
        for i in range(o.workers):
            name = f"local-gen-{i}"
            worker_env = dict(env)
            if gpus:
                worker_env["CUDA_VISIBLE_DEVICES"] = gpus[i]  # one generation worker per GPU
            self._spawn(name, [sys.executable, "-m", "worker", "--queues", "generate", "--name", name, *model_args],
                        worker_env, worker_stop, STOP_FIRST)
            generation.append(name)
        for i in range(o.finetune_workers):
            name = f"local-finetune-{i}"
            self._spawn(name, [sys.executable, "-m", "worker", "--queues", "finetune", "--name", name, *model_args],
                        env, worker_stop, STOP_FIRST)
        # Webhook deliveries: their own small process, so a slow receiver never holds up a worker.
        self._spawn("webhooks", [sys.executable, "-m", "webhooks", "--name", "local-webhooks"], env,
                    WEBHOOKS_STOP_TIMEOUT_S, STOP_FIRST)
        self._wait_ready(generation)

    def _gpu_ids(self, env: dict[str, str]) -> list[str]:
        """The GPU of each generation worker: the i-th of CUDA_VISIBLE_DEVICES (default 0, 1, ...)."""
        o = self.options
        if not o.resolved_device.startswith("cuda"):
            return []
        visible = [g.strip() for g in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
        if not visible:
            return [str(i) for i in range(o.workers)]
        if len(visible) < o.workers:
            raise LocalStackError(f"--workers {o.workers} needs {o.workers} GPUs; CUDA_VISIBLE_DEVICES lists {len(visible)}")
        return visible[: o.workers]

    def _service_env(self) -> dict[str, str]:
        o = self.options
        env = {k: v for k, v in os.environ.items()}
        env.update({
            "PYTHONUNBUFFERED": "1",
            "URAE_MODEL": o.model,
            "URAE_DEVICE": o.resolved_device,
            "URAE_DTYPE": o.resolved_dtype,
            "URAE_STORAGE_DIR": str(self.data_dir / "storage"),
        })
        env.setdefault("URAE_SHUTDOWN_GRACE_S", "10")
        if not env.get("URAE_WEBHOOK_SECRET"):
            # Standard Webhooks form: "whsec_" + base64 of random bytes; printed so receivers can verify.
            self.webhook_secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
            env["URAE_WEBHOOK_SECRET"] = self.webhook_secret
        if o.open_access:
            env.update({"URAE_ENV": "development", "URAE_DEV_OPEN_ACCESS": "true", "URAE_API_KEYS": "",
                        "URAE_API_KEY_HASHES": ""})
        elif o.api_key is not None:
            self.api_key = o.api_key
            env["URAE_API_KEYS"] = o.api_key
        elif not (env.get("URAE_API_KEYS") or env.get("URAE_API_KEY_HASHES")):
            self.api_key = "urae-" + secrets.token_urlsafe(24)
            env["URAE_API_KEYS"] = self.api_key
        return env

    def _check_settings(self, env: dict[str, str]) -> None:
        # Refuse here, in one line, rather than let every child fail with the same message.
        from pydantic import ValidationError

        from jobstore.settings import Settings

        values: dict[str, Any] = {k.removeprefix("URAE_").lower(): v for k, v in env.items() if k.startswith("URAE_")}
        try:
            Settings(**{k: v for k, v in values.items() if k in Settings.model_fields})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            reason = str(first["msg"]).removeprefix("Value error, ")
            raise LocalStackError(f"invalid setting URAE_{where.upper()}: {reason}" if where else reason) from None

    def _start_redis(self, env: dict[str, str]) -> None:
        url = self.options.redis_url or os.environ.get("URAE_REDIS_URL")
        if url:
            self.redis_url = url
            self._wait_redis(url, None)
            return
        server = shutil.which("redis-server")
        if server is None:
            raise LocalStackError("redis-server not found: install it (apt-get install redis-server) or set URAE_REDIS_URL")
        redis_dir = self.data_dir / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        password = secrets.token_hex(16)
        port = _free_port()
        # Production-like: AOF (fsync every second) so a restart keeps acknowledged jobs, no eviction,
        # a password, loopback only. The password goes in a config on stdin, not on the command line.
        config = (
            f"port {port}\nbind 127.0.0.1\nprotected-mode yes\ndir {redis_dir}\nappendonly yes\n"
            f"appendfsync everysec\nsave \"\"\nmaxmemory-policy noeviction\nrequirepass {password}\n"
        )
        child = self._spawn("redis", [server, "-"], env, REDIS_STOP_TIMEOUT_S, STOP_LAST, stdin=config)
        self.owns_redis = True
        self.redis_url = f"redis://:{password}@127.0.0.1:{port}/0"
        self._wait_redis(self.redis_url, child)

    def _wait_redis(self, url: str, child: Child | None) -> None:
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        last: Exception | None = None
        while time.monotonic() < deadline and not self.stop_requested.is_set():
            if child is not None and not child.alive():
                raise LocalStackError(f"redis-server exited with code {child.proc.returncode}:\n{child.log_tail()}")
            try:
                conn = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
                conn.ping()
                conn.close()
                return
            except redis.RedisError as exc:
                last = exc
                time.sleep(POLL_INTERVAL_S)
        if self.stop_requested.is_set():
            return
        raise LocalStackError(f"Redis at {_safe_url(url)} does not answer: {last}")

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], stop_timeout_s: float, stop_stage: int,
               stdin: str | None = None) -> Child:
        log_path = self.log_dir / f"{name}.log"
        log = open(log_path, "ab")
        proc = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        if stdin is not None and proc.stdin is not None:
            proc.stdin.write(stdin.encode())
            proc.stdin.close()
        child = Child(name, proc, log_path, stop_timeout_s, stop_stage, log)
        self.children.append(child)
        return child

    def _wait_ready(self, generation_workers: list[str]) -> None:
        o = self.options
        conn = redis.Redis.from_url(self.redis_url, socket_timeout=2, socket_connect_timeout=2)
        deadline = time.monotonic() + o.ready_timeout_s
        api_up = False
        try:
            while not self.stop_requested.is_set():
                self.check_children()
                if not api_up:
                    api_up = _http_ok(f"http://{_connect_host(o.host)}:{o.port}/health")
                ready = [n for n in generation_workers if conn.exists(worker_key(n))]
                if api_up and len(ready) == len(generation_workers):
                    return
                if time.monotonic() > deadline:
                    raise LocalStackError(
                        f"not ready after {o.ready_timeout_s:.0f} s (API {'up' if api_up else 'down'}, "
                        f"{len(ready)}/{len(generation_workers)} generation workers); see the logs in {self.log_dir}"
                    )
                time.sleep(POLL_INTERVAL_S)
        finally:
            conn.close()

    def check_children(self) -> None:
        """Raise when a process of the stack exited on its own."""
        for child in self.children:
            if not child.alive():
                raise LocalStackError(
                    f"{child.name} exited with code {child.proc.returncode} (log {child.log_path}):\n{child.log_tail()}"
                )

    # -- stopping --------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every child: all workers at once (each finishes or requeues its job), then the API, then Redis."""
        for stage in sorted({c.stop_stage for c in self.children}):
            group = [c for c in self.children if c.stop_stage == stage]
            for child in group:
                if child.alive():
                    child.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + max(c.stop_timeout_s for c in group)
            while any(c.alive() for c in group) and time.monotonic() < deadline and not self.force.is_set():
                time.sleep(0.05)
            for child in group:
                if child.alive():
                    child.proc.kill()
                child.proc.wait()
                child.log.close()
        self.children.clear()

    def announce(self, elapsed_s: float) -> None:
        o = self.options
        base = f"http://{_connect_host(o.host)}:{o.port}"
        lines = [f"urae-serve: ready in {elapsed_s:.1f} s"]
        if o.open_access:
            lines += [f"  playground  {base}/",
                      "  access      OPEN DEVELOPMENT MODE: no API key, every request is accepted"]
        elif self.api_key is not None:
            lines += [f"  playground  {base}/#key={self.api_key}",
                      f"  API key     {self.api_key}   (send 'Authorization: Bearer {self.api_key}')"]
        else:
            lines += [f"  playground  {base}/", "  API key     one of the keys configured in URAE_API_KEYS"]
        redis_note = f"owned by this command, data in {self.data_dir / 'redis'}" if self.owns_redis else "external"
        lines += [
            f"  API         {base}   (OpenAPI docs at {base}/docs)",
            f"  model       {o.model} on {o.resolved_device}, {o.workers} generation worker(s), "
            f"{o.finetune_workers} fine-tune worker(s)",
            f"  Redis       {_safe_url(self.redis_url)} ({redis_note})",
            f"  webhooks    signed with {self.webhook_secret or 'URAE_WEBHOOK_SECRET'}"
            + (" (new; set URAE_WEBHOOK_SECRET to keep one)" if self.webhook_secret else ""),
            f"  outputs     {self.data_dir / 'storage'}",
            f"  logs        {self.log_dir}",
            "Press Ctrl-C to stop.",
        ]
        print("\n".join(lines), file=self.out, flush=True)

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        if self.stop_requested.is_set():
            self.force.set()  # a second Ctrl-C: do not wait for running jobs
        self.stop_requested.set()


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def _safe_url(url: str) -> str:
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def parse_args(argv: list[str] | None) -> StackOptions:
    parser = argparse.ArgumentParser(
        prog="urae-serve",
        description="Run Redis, the API and workers on this machine; open the playground in a browser; Ctrl-C stops all.",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="model id: 'mini' (default: small, trained, offline, CPU), 'tiny' (random weights) "
                             "or e.g. black-forest-labs/FLUX.1-dev on a GPU")
    parser.add_argument("--device", help="torch device (default: cpu for mini and the tiny models, cuda otherwise)")
    parser.add_argument("--dtype", help="float32, float16 or bfloat16 (default: float32 on cpu, bfloat16 on a GPU)")
    parser.add_argument("--host", default="127.0.0.1", help="address the API listens on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="API port (default 8000)")
    parser.add_argument("--workers", type=int, default=1, help="generation workers, one per GPU (default 1)")
    parser.add_argument("--finetune-workers", type=int, default=1, help="fine-tune workers (default 1; 0 for none)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"),
                        help="outputs, adapters, Redis data and logs (default ./data)")
    parser.add_argument("--redis-url", help="use this Redis instead of starting one (default: URAE_REDIS_URL if set)")
    access = parser.add_mutually_exclusive_group()
    access.add_argument("--api-key", help="the API key to accept (default: a new one, printed at startup)")
    access.add_argument("--open-access", action="store_true",
                        help="development mode: no API key, every request accepted (never on a shared network)")
    parser.add_argument("--ready-timeout", type=float, default=900.0,
                        help="seconds to wait for the model to load (default 900)")
    args = parser.parse_args(argv)
    return StackOptions(
        model=args.model, device=args.device, dtype=args.dtype, host=args.host, port=args.port,
        workers=args.workers, finetune_workers=args.finetune_workers, data_dir=args.data_dir,
        redis_url=args.redis_url, api_key=args.api_key, open_access=args.open_access,
        ready_timeout_s=args.ready_timeout,
    )


def run(options: StackOptions) -> int:
    """Start the stack, serve until SIGINT/SIGTERM, stop everything; the process exit code."""
    stack = LocalStack(options)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stack.request_stop)
    started = time.monotonic()
    code = 0
    try:
        print(f"urae-serve: starting Redis, the API and workers (model {options.model}); logs in {stack.log_dir}",
              flush=True)
        stack.start()
        if not stack.stop_requested.is_set():
            stack.announce(time.monotonic() - started)
        while not stack.stop_requested.wait(POLL_INTERVAL_S):
            stack.check_children()
    except LocalStackError as exc:
        print(f"urae-serve: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        print("urae-serve: stopping (Ctrl-C again to stop without waiting for running jobs)", flush=True)
        stack.stop()
        print("urae-serve: stopped", flush=True)
    return code


def main(argv: list[str] | None = None) -> None:
    """Console script ``urae-serve``."""
    raise SystemExit(run(parse_args(argv)))


if __name__ == "__main__":
    main()
