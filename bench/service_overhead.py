"""What the service adds on top of a generation: HTTP, Redis, the queue, the worker, the file write.

Starts its own redis-server, the API under uvicorn and one generation worker (tiny model, CPU), all
on loopback, and measures:

1. submit latency (POST /generate -> 202), median / p95 / p99, one client;
2. queue-to-start latency on an idle worker (the job's "queued" timing);
3. end to end (submit -> finished event on SSE -> image downloaded) against the same generation
   called in-process (Generator.generate + save_image); the difference is the service overhead;
4. submit throughput with concurrent clients while the worker is busy (jobs/s, p50 / p99);
5. adapter hot-swap (replace a resident adapter in place) against a cold load (a fresh pipeline
   plus the adapter) and against loading into a new slot.

    python bench/service_overhead.py                # about a minute on 2 CPU cores
    python bench/service_overhead.py --seconds 5 --clients 32 --runs 30

Targets: overhead <= 50 ms median; >= 300 submissions/s with p99 < 100 ms; hot-swap >= 10x faster
than a cold load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
KEY = "bench-key"
SIZE = 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, httpx.HTTPError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout_s} s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summary(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (f"median {statistics.median(ms):7.2f} ms   p95 {percentile(ms, 95):7.2f} ms   "
            f"p99 {percentile(ms, 99):7.2f} ms   (n={len(ms)})")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def stack(workdir: Path, max_queue_depth: int, threads: int) -> Iterator[tuple[str, int]]:
    """redis-server + uvicorn + one worker; yields the API's base URL and the API's process id."""
    redis_port, api_port = free_port(), free_port()
    env = {**os.environ, "URAE_API_KEYS": KEY, "URAE_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
           "URAE_STORAGE_DIR": str(workdir / "storage"), "URAE_MODEL": "tiny", "URAE_DEVICE": "cpu",
           "URAE_DTYPE": "float32", "URAE_MAX_QUEUE_DEPTH": str(max_queue_depth),
           "URAE_ADAPTER_CACHE_DIR": str(workdir / "adapters"), "URAE_HEARTBEAT_INTERVAL_S": "1",
           # Half the cores for the worker's torch, the rest for the API and the clients.
           "URAE_TORCH_THREADS": str(threads)}
    logs = open(workdir / "stack.log", "wb")
    procs = [subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(redis_port),
                               "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait_until(lambda: socket.create_connection(("127.0.0.1", redis_port), 0.2), 10, "redis")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory", "--host", "127.0.0.1",
             "--port", str(api_port), "--log-level", "warning", "--no-access-log"],
            cwd=REPO, env=env, stdout=logs, stderr=subprocess.STDOUT))
        procs.append(subprocess.Popen([sys.executable, "-m", "worker", "--queues", "generate", "--name", "bench"],
                                      cwd=REPO, env=env, stdout=logs, stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{api_port}"
        headers = {"Authorization": f"Bearer {KEY}"}
        wait_until(lambda: httpx.get(f"{url}/ready", headers=headers).status_code == 200, 180, "API and worker")
        yield url, procs[1].pid
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        logs.close()


def body(seed: int, steps: int = 2, **extra: Any) -> dict[str, Any]:
    return {"prompt": "a lighthouse at dawn", "width": SIZE, "height": SIZE, "steps": steps, "seed": seed, **extra}


def wait_finished(client: httpx.Client, job_id: str) -> dict[str, Any]:
    """Follow the job's SSE stream to its end; returns the final job."""
    with client.stream("GET", f"/jobs/{job_id}/events") as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:]).get("status") in ("finished", "failed", "canceled"):
                break
    return dict(client.get(f"/jobs/{job_id}").json())


def latencies(url: str, runs: int, threads: int, workdir: Path) -> dict[str, list[float]]:
    """Sequential jobs through the service, each followed by the same generation in this process.

    Alternating the two spreads any change in machine load evenly over both; this process uses as
    many torch threads as the worker.
    """
    import torch

    from urae.generate import Generator
    from urae.output import save_image
    from urae.presets import resolve_spec

    torch.set_num_threads(threads)
    generator = Generator.load("tiny", device="cpu", dtype="float32")
    out: dict[str, list[float]] = {"submit": [], "queued": [], "end_to_end": [], "in_process": []}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        wait_finished(client, client.post("/generate", json=body(0)).json()["id"])  # warm-up
        spec = resolve_spec("a lighthouse at dawn", "1k", schnell=generator.schnell, width=SIZE, height=SIZE,
                            steps=2, seed=0)
        generator.generate(spec)  # warm-up
        for i in range(runs):
            t0 = time.perf_counter()
            response = client.post("/generate", json=body(i))
            out["submit"].append(time.perf_counter() - t0)
            job = wait_finished(client, response.json()["id"])
            image = client.get(job["links"]["images"][0])
            out["end_to_end"].append(time.perf_counter() - t0)
            assert job["status"] == "finished" and image.status_code == 200, job
            out["queued"].append(job["timings"]["queued"])

            t0 = time.perf_counter()
            result = generator.generate(spec)
            save_image(result.images[0], result.metadata[0], workdir / f"in-process-{i}.png", "png")
            out["in_process"].append(time.perf_counter() - t0)
    return out


async def _client(url: str, deadline: float, latencies: list[float], statuses: dict[int, int], offset: int) -> None:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
        i = 0
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            response = await client.post("/generate", json=body(offset + i, priority="low"))
            latencies.append(time.perf_counter() - t0)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            i += 1


def throughput(url: str, api_pid: int, clients: int, seconds: float) -> tuple[float, list[float], dict[int, int], float]:
    headers = {"Authorization": f"Bearer {KEY}"}
    blocker = httpx.post(f"{url}/generate", json=body(1, steps=100), headers=headers).json()["id"]
    wait_until(lambda: httpx.get(f"{url}/jobs/{blocker}", headers=headers).json()["status"] == "started", 30, "busy")
    latencies: list[float] = []
    statuses: dict[int, int] = {}

    async def run() -> None:
        deadline = time.perf_counter() + seconds
        await asyncio.gather(*(_client(url, deadline, latencies, statuses, 10_000 * c) for c in range(clients)))

    cpu0 = process_cpu_s(api_pid)
    t0 = time.perf_counter()
    asyncio.run(run())
    elapsed = time.perf_counter() - t0
    api_cpu_per_request = (process_cpu_s(api_pid) - cpu0) / max(1, len(latencies))
    return statuses.get(202, 0) / elapsed, latencies, statuses, api_cpu_per_request


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
wrk.body = '%s'
"""


def throughput_wrk(url: str, clients: int, seconds: float) -> dict[str, float] | None:
    """The same run driven by wrk (a C load generator), so the client's own CPU does not compete with
    the API for the one core the busy worker leaves. None when wrk is not installed."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % (KEY, json.dumps(body(7, priority="low"))))
    try:
        proc = subprocess.run(
            [wrk, "-t1", f"-c{clients}", f"-d{max(1, int(seconds))}s", "--latency", "-s", script.name, f"{url}/generate"],
            capture_output=True, text=True, check=True,
        )
    finally:
        os.unlink(script.name)
    out = proc.stdout

    def ms(text: str) -> float:
        value = float(text.rstrip("musn"))
        return value * {"us": 1e-3, "ms": 1.0, "s": 1e3}[text.lstrip("0123456789.")]

    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rate": rate,
        "requests": requests,
        "non_2xx": int(bad.group(1)) if bad else 0,
        "p50": ms(re.search(r"50%\s+(\S+)", out).group(1)),  # type: ignore[union-attr]
        "p99": ms(re.search(r"99%\s+(\S+)", out).group(1)),  # type: ignore[union-attr]
        "socket_errors": 0 if errors is None else 1,
    }


def adapter_swap_times(workdir: Path, repeats: int) -> dict[str, float]:
    from urae.adapters import AdapterManager, save_lora
    from urae.adapters.builtin import tiny_lora_layers
    from urae.generate import Generator

    transformer = Generator.load("tiny", device="cpu", dtype="float32").pipe.transformer
    paths = [save_lora(workdir / f"lora-{i}.safetensors", tiny_lora_layers(transformer, 100 + i)) for i in range(2)]

    from urae.spec import AdapterRef

    hot = Generator.load("tiny", device="cpu", dtype="float32")
    # One slot, cache of two: each swap copies the other adapter's cached tensors into the slot.
    manager = AdapterManager(hot.pipe, capacity=2, rank=16, slots=1)
    manager.ensure("a", paths[0])
    manager.ensure("b", paths[1])
    swaps = []
    for i in range(repeats):
        name, path = ("b", paths[1]) if i % 2 == 0 else ("a", paths[0])
        t0 = time.perf_counter()
        manager.ensure(name, path)
        manager.activate([AdapterRef(name, 1.0)])
        swaps.append(time.perf_counter() - t0)

    new_slot = []  # a file not cached yet: read, validated and laid out, then copied in
    for _ in range(repeats):
        fresh = AdapterManager(Generator.load("tiny", device="cpu", dtype="float32").pipe, capacity=1, rank=16)
        t0 = time.perf_counter()
        fresh.ensure("b", paths[1])
        fresh.activate([AdapterRef("b", 1.0)])
        new_slot.append(time.perf_counter() - t0)

    cold = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fresh = Generator.load("tiny", device="cpu", dtype="float32")
        AdapterManager(fresh.pipe, capacity=1, rank=16).ensure("b", paths[1])
        cold.append(time.perf_counter() - t0)
    cold_process = []
    script = ("from urae.generate import Generator; import sys; "
              "g = Generator.load('tiny', device='cpu', dtype='float32'); g.adapters.ensure('b', sys.argv[1])")
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", script, str(paths[1])], check=True, capture_output=True)
        cold_process.append(time.perf_counter() - t0)
    return {"hot_swap": statistics.median(swaps), "new_slot": statistics.median(new_slot),
            "cold_load": statistics.median(cold), "cold_process": statistics.median(cold_process)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="sequential jobs for latency and end to end")
    parser.add_argument("--clients", type=int, default=16, help="concurrent submitters for the throughput run")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the throughput run")
    args = parser.parse_args()

    threads = max(1, (os.cpu_count() or 2) // 2)
    with tempfile.TemporaryDirectory(prefix="urae-bench-") as tmp:
        workdir = Path(tmp)
        print(f"tiny model, {SIZE} px, 2 steps, CPU ({os.cpu_count()} cores, {threads} torch threads), loopback\n")
        with stack(workdir, max_queue_depth=1_000_000, threads=threads) as (url, api_pid):
            times = latencies(url, args.runs, threads, workdir)
            rate, under_load, statuses, api_cpu = throughput(url, api_pid, args.clients, args.seconds)
            by_wrk = throughput_wrk(url, args.clients, args.seconds)
        swap = adapter_swap_times(workdir, repeats=10)

    overhead = statistics.median(times["end_to_end"]) - statistics.median(times["in_process"])
    print(f"submit latency (POST /generate, idle)   {summary(times['submit'])}")
    print(f"queue-to-start (idle worker)            {summary(times['queued'])}")
    print(f"end to end via the service              {summary(times['end_to_end'])}")
    print(f"same generation in-process              {summary(times['in_process'])}")
    print(f"service overhead (median difference)    {overhead * 1000:7.2f} ms   target <= 50 ms")
    print(f"submit throughput, {args.clients} clients, worker busy  {rate:7.1f} jobs/s   target >= 300/s")
    print(f"  latency under load                    {summary(under_load)}   target p99 < 100 ms")
    print(f"  answers                               {statuses}")
    print(f"  API process CPU per submission        {api_cpu * 1000:7.2f} ms   (one free core: ~{1 / api_cpu:.0f}/s)")
    if by_wrk is None:
        print("  (install wrk to also measure with a C load generator)")
    else:
        print(f"submit throughput, {args.clients} connections (wrk), worker busy  {by_wrk['rate']:7.1f} req/s   "
              f"p50 {by_wrk['p50']:.2f} ms   p99 {by_wrk['p99']:.2f} ms   non-202 {by_wrk['non_2xx']:.0f}   "
              f"target >= 300/s, p99 < 100 ms")
    print(f"adapter hot-swap (in place)             {swap['hot_swap'] * 1000:7.2f} ms")
    print(f"adapter first use (read, validate, copy) {swap['new_slot'] * 1000:7.2f} ms")
    print(f"cold load in-process (pipeline+adapter) {swap['cold_load'] * 1000:7.2f} ms   "
          f"ratio {swap['cold_load'] / swap['hot_swap']:.1f}x")
    print(f"cold worker (process, imports, model, adapter) {swap['cold_process'] * 1000:7.0f} ms   "
          f"ratio {swap['cold_process'] / swap['hot_swap']:.0f}x   target >= 10x")


if __name__ == "__main__":
    main()
