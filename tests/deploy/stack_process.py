"""``urae-serve`` as a real process for the deploy tests: its printed lines, its key, its children."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import REPO_ROOT


def child_pids(pid: int) -> set[int]:
    """Every living descendant of ``pid`` (read from /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may contain spaces: the fields after it start past the last ')'.
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def process_exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class StackProcess:
    """Runs ``python -m launcher.local_stack ARGS`` and collects its output lines."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, cwd: Path = REPO_ROOT):
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("URAE_")}
        full_env.update({"PYTHONUNBUFFERED": "1", "URAE_SHUTDOWN_GRACE_S": "2", **(env or {})})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "launcher.local_stack", *args], cwd=cwd, env=full_env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, prefix: str, timeout_s: float = 180.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if line.strip().startswith(prefix):
                    return line.strip()
            if self.proc.poll() is not None:
                self._reader.join(timeout=5)
                raise RuntimeError(f"urae-serve exited with {self.proc.returncode}:\n{self.output}")
            time.sleep(0.1)
        raise TimeoutError(f"no line starting with {prefix!r} after {timeout_s} s:\n{self.output}")

    def api_key(self) -> str:
        return self.wait_for_line("API key").split()[2]

    def interrupt(self, timeout_s: float = 60.0) -> int:
        """Ctrl-C: SIGINT, then wait for the process to exit; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=timeout_s)
        self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wait_ready(base: str, key: str, timeout_s: float = 120.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    body: dict[str, object] = {}
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{base}/ready", headers={"Authorization": f"Bearer {key}"}, timeout=5)
            body = response.json()
            if response.status_code == 200:
                return body
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"/ready not 200 after {timeout_s} s: {body}")
