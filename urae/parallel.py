"""One image across several GPUs: diffusers' context parallelism, driven from one process.

Rank 0 is the caller's process (a worker's job loop); ranks 1..N-1 are processes it spawns that only
follow it. Every rank holds the whole model; each denoising step splits the joint sequence (text +
image tokens) into N equal shards and the attention exchanges them (Ulysses: all-to-all of heads;
ring: key/value blocks passed around), so one image's attention work and activations are divided by N.

Protocol (a gloo "control" group, separate from the tensors' group so that an idle worker can wait
for hours without a collective timing out): rank 0 broadcasts one command at a time, ``generate``
(the spec and the adapter files rank 0 resolved), ``warm_up`` or ``shutdown``; every rank then runs
the same :class:`~urae.generate.Generator` code in lockstep. At every step boundary rank 0 decides
whether to stop (its caller's ``should_cancel``) and broadcasts the decision, so all ranks raise
:class:`~urae.errors.GenerationCanceled` at the same step. Only rank 0 reports progress and previews.

Proportional attention uses the global length: the generator sets the scale from the request's
text + image tokens (urae.attention, ``tensor`` mode), never from the local shard's length.

Library limits found on diffusers 0.42.1 (see the README's multi-GPU section):

- ``enable_parallelism`` derives the rank's device as ``rank % torch.accelerator.device_count()``,
  which divides by zero on a machine without an accelerator; on the CPU the count is presented as 1
  for that call only (the mesh is then a CPU/gloo mesh).
- Ring attention needs a kernel that returns the log-sum-exp (flash, cuDNN, sage); the ``native``
  (SDPA) kernel raises "Native attention does not support return_lse=True". On the CPU only Ulysses runs.
- Each shard must hold whole tokens: the text length and the image tokens must divide by N, and for
  Ulysses the heads too (FLUX.1: 24). diffusers' uneven split (``ulysses_anything``) all-gathers
  unequal parts, which gloo refuses ("ProcessGroupGloo::allgather: invalid tensor size at index 1"),
  so it has no CPU test and is not used.
- The turbo tier's step cache decides on each rank's own shard whether to skip the remaining blocks;
  ranks that decide differently would wait on each other forever, so turbo is not served in a group.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
from PIL import Image

from urae.errors import InvalidSpecError, ModelLoadError, UraeError
from urae.generate import CancelCheck, GenerationResult, Generator, ProgressCallback
from urae.previews import PreviewSink
from urae.spec import GenerationSpec

log = logging.getLogger("urae.parallel")

CP_MODES = ("ulysses", "ring")
# An idle worker waits on the control group between jobs; that wait must never time out.
CONTROL_TIMEOUT = datetime.timedelta(days=365)
# The tensors' collectives during a job: long enough for a 4K step on a slow GPU.
DATA_TIMEOUT = datetime.timedelta(minutes=10)
STARTUP_TIMEOUT = datetime.timedelta(minutes=30)

# Builds a rank's generator on the device it is given (must be picklable: the followers are spawned).
GeneratorFactory = Callable[[torch.device], Generator]


@dataclass(frozen=True)
class GeneratorLoader:
    """A picklable :data:`GeneratorFactory`: :meth:`Generator.load` with these keyword arguments."""

    model_id: str
    options: dict[str, Any]
    torch_threads: int | None = None

    def __call__(self, device: torch.device) -> Generator:
        if self.torch_threads is not None:
            torch.set_num_threads(self.torch_threads)
        generator = Generator.load(self.model_id, device=str(device), **self.options)
        # The adapter slots on every rank from the start, so all ranks run the same layers.
        generator.adapters  # noqa: B018
        return generator


class ParallelGroupError(UraeError):
    """The ranks of a context-parallel group fell out of step (a rank died or one job failed on one
    rank only); the group cannot serve any more work and must be started again."""


def rank_device(device: str | torch.device, rank: int) -> torch.device:
    """The device of ``rank``: GPU ``rank`` on CUDA (one GPU per rank), the CPU otherwise."""
    base = torch.device(device)
    if base.type == "cuda":
        return torch.device("cuda", rank)
    if base.type == "cpu":
        return base
    raise ModelLoadError(f"context parallelism runs on cuda or cpu, not {base.type}")


def check_group(degree: int, mode: str, device: str | torch.device) -> None:
    """Refuse a group that cannot start, before any process is spawned."""
    if degree < 2:
        raise ModelLoadError(f"a context-parallel group needs at least 2 ranks, got {degree}")
    if mode not in CP_MODES:
        raise ModelLoadError(f"context-parallel mode {mode!r} is not one of {', '.join(CP_MODES)}")
    base = torch.device(device)
    if base.type == "cuda" and torch.cuda.device_count() < degree:
        raise ModelLoadError(f"{degree} ranks need {degree} GPUs; {torch.cuda.device_count()} are visible")


def check_shardable(spec: GenerationSpec, degree: int) -> None:
    """Each rank must get whole tokens of both streams (diffusers splits them into equal parts)."""
    if spec.max_sequence_length % degree:
        raise InvalidSpecError(
            "max_sequence_length", f"{spec.max_sequence_length} text tokens do not split over {degree} GPUs"
        )
    if spec.image_tokens % degree:
        raise InvalidSpecError(
            "width",
            f"{spec.width}x{spec.height} has {spec.image_tokens} image tokens ((width/16) x (height/16)), "
            f"which do not split over the {degree} GPUs of this worker; choose a size whose token count divides by {degree}",
        )


@contextlib.contextmanager
def _accelerator_count_on_cpu(device: torch.device) -> Iterator[None]:
    # diffusers 0.42.1 computes `rank % torch.accelerator.device_count()`: zero on a CPU-only machine.
    if device.type == "cpu" and torch.accelerator.device_count() == 0:
        with mock.patch.object(torch.accelerator, "device_count", return_value=1):
            yield
    else:
        yield


def enable_context_parallel(transformer: Any, degree: int, mode: str = "ulysses") -> None:
    """diffusers' context parallelism on ``transformer`` (FLUX's own ``_cp_plan``) over all ranks.

    Call after the generator is built (its attention processors carry the parallel config from then on)
    and before its first forward.
    """
    from diffusers import ContextParallelConfig

    heads = transformer.config.num_attention_heads
    if mode == "ulysses" and heads % degree:
        raise ModelLoadError(f"Ulysses attention splits the {heads} heads over the GPUs: {degree} does not divide {heads}")
    backends = {getattr(m.processor, "_attention_backend", None) for m in transformer.modules() if hasattr(m, "processor")}
    if mode == "ring" and backends & {None, "native"}:
        raise ModelLoadError(
            "ring attention needs an attention kernel that returns the log-sum-exp (flash, _native_cudnn, sage); "
            "PyTorch SDPA (native) does not: use ulysses, or set URAE_ATTENTION_BACKEND"
        )
    config = ContextParallelConfig(ring_degree=degree) if mode == "ring" else ContextParallelConfig(ulysses_degree=degree)
    device = next(transformer.parameters()).device
    diffusers_log = logging.getLogger("diffusers.models.modeling_utils")
    level = diffusers_log.level
    diffusers_log.setLevel(logging.ERROR)  # "experimental feature" warning on every call
    try:
        with _accelerator_count_on_cpu(device):
            transformer.enable_parallelism(config=config)
    finally:
        diffusers_log.setLevel(level)


def serve_without_turbo(generator: Generator) -> None:
    """Drop the turbo tier (its per-rank skip decision would split the group); at least one tier must stay."""
    tiers = tuple(t for t in generator.speed.tiers if t != "turbo")
    if not tiers:
        raise ModelLoadError("a context-parallel worker cannot serve turbo (its step cache decides per GPU); "
                             "serve quality or fast")
    generator.speed.tiers = tiers


@dataclass
class _Group:
    rank: int
    world: int
    control: Any  # the gloo process group of the command channel


def _init_rank(rank: int, world: int, port: int, device: torch.device, store: Any = None) -> _Group:
    if store is None:
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=STARTUP_TIMEOUT)
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=DATA_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return _Group(rank, world, control)


def _prepare(factory: GeneratorFactory, device: torch.device, degree: int, mode: str, group: _Group) -> Generator:
    """Load this rank's generator and agree with the other ranks that every one loaded, then enable CP."""
    generator: Generator | None = None
    error = ""
    try:
        generator = factory(device)
        serve_without_turbo(generator)
        generator.speed.exact_attention_only(generator.pipe.transformer, "the 8-bit kernel has no context parallelism")
    except Exception as exc:  # reported to every rank, then raised on each
        error = f"rank {group.rank}: {type(exc).__name__}: {exc}"
    errors: list[str] = [""] * group.world
    dist.all_gather_object(errors, error, group=group.control)
    failed = [e for e in errors if e]
    if failed:
        raise ModelLoadError("context-parallel group failed to load: " + "; ".join(failed))
    assert generator is not None
    enable_context_parallel(generator.pipe.transformer, degree, mode)
    return generator


def _lockstep_cancel(group: _Group, decide: CancelCheck | None) -> CancelCheck:
    """Rank 0 decides (``decide``), every rank receives the same answer at the same call."""

    def check() -> bool:
        flag = torch.zeros(1, dtype=torch.int32)
        if group.rank == 0 and decide is not None and decide():
            flag[0] = 1
        dist.broadcast(flag, src=0, group=group.control)
        return bool(flag.item())

    return check


def _broadcast(group: _Group, command: dict[str, Any] | None) -> dict[str, Any]:
    box = [command]
    dist.broadcast_object_list(box, src=0, group=group.control)
    assert box[0] is not None
    return box[0]


def _table_resolver(table: dict[str, tuple[str, str | None]]) -> Callable[[str], Path | tuple[Path, str]]:
    """Adapter name -> the file rank 0 resolved (every rank of the host loads the same file)."""

    def resolve(name: str) -> Path | tuple[Path, str]:
        path, sha = table[name]
        return (Path(path), sha) if sha else Path(path)

    return resolve


def _run_command(generator: Generator, group: _Group, command: dict[str, Any], **rank0: Any) -> Any:
    """What every rank does for one command (rank 0 passes its caller's callbacks in ``rank0``)."""
    # The files rank 0 resolved, on every rank (rank 0 included): all load the very same adapter version.
    generator._adapter_resolver = _table_resolver(command["adapters"])
    if command["kind"] == "call":
        return command["fn"](generator, *command["args"])
    if command["kind"] == "warm_up":
        return generator.warm_up([GenerationSpec.from_dict(d) for d in command["specs"]], on_each=rank0.get("on_each"))
    spec = GenerationSpec.from_dict(command["spec"])
    return generator.generate(
        spec,
        on_progress=rank0.get("on_progress"),
        should_cancel=_lockstep_cancel(group, rank0.get("should_cancel")),
        on_preview=rank0.get("on_preview"),
        preview_every=rank0.get("preview_every", 0),
        image=command.get("image"),
    )


def _follow(generator: Generator, group: _Group) -> None:
    """A follower's loop: run rank 0's commands until ``shutdown``."""
    while True:
        command = _broadcast(group, None)
        if command["kind"] == "shutdown":
            return
        try:
            _run_command(generator, group, command)
        except UraeError as exc:
            # Deterministic (same spec, same files on every rank): rank 0 raised the same and reports it.
            log.debug("rank %d: %s", group.rank, exc)


def _exit_with_parent(parent: int) -> None:
    # A follower outliving its rank 0 would hold a GPU forever.
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _follower_main(
    rank: int, world: int, port: int, device: str, factory: GeneratorFactory, mode: str, parent: int
) -> None:
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="parent-watch").start()
    # Ctrl-C reaches the whole process group: only rank 0 decides when the group stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    own = rank_device(device, rank)
    group = _init_rank(rank, world, port, own)
    try:
        generator = _prepare(factory, own, world, mode, group)
    except ModelLoadError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
    _follow(generator, group)
    dist.destroy_process_group()


class ParallelGenerator:
    """Rank 0 of a context-parallel group, with :class:`~urae.generate.Generator`'s interface.

    ``generate``/``warm_up`` run on every rank together; progress, previews and ``should_cancel`` are
    this process's. Attributes not defined here (``pipe``, ``schnell``, ``adapters``, ``device`` ...)
    are rank 0's generator's. ``on_failure`` is called (from a monitor thread) with the reason when a
    follower dies unexpectedly or the ranks fall out of step; the group then serves nothing more.
    """

    def __init__(self, generator: Generator, group: _Group, processes: list[Any], mode: str,
                 on_failure: Callable[[str], None] | None = None):
        self.generator = generator
        self.world = group.world
        self.mode = mode
        self.on_failure = on_failure
        self._group = group
        self._processes = processes
        self._closing = False
        self.broken: str | None = None
        self._lock = threading.Lock()
        self._monitor = threading.Thread(target=self._watch, daemon=True, name="cp-monitor")
        self._monitor.start()

    @classmethod
    def start(
        cls, factory: GeneratorFactory, world: int, device: str = "cuda", mode: str = "ulysses",
        on_failure: Callable[[str], None] | None = None,
        adapter_resolver: Callable[[str], Path | tuple[Path, str]] | None = None,
    ) -> ParallelGenerator:
        """Spawn ranks 1..world-1, build rank 0's generator here, and enable context parallelism on all.

        ``adapter_resolver``: how rank 0 finds adapter files (the followers load what it found).
        """
        check_group(world, mode, device)
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=STARTUP_TIMEOUT, wait_for_workers=False)
        context = multiprocessing.get_context("spawn")
        processes = []
        for rank in range(1, world):
            process = context.Process(
                target=_follower_main, name=f"urae-cp-rank{rank}",
                args=(rank, world, store.port, str(device), factory, mode, os.getpid()),
            )
            process.start()
            processes.append(process)
        try:
            own = rank_device(device, 0)
            group = _init_rank(0, world, store.port, own, store=store)
            generator = _prepare(factory, own, world, mode, group)
            if adapter_resolver is not None:
                generator._adapter_resolver = adapter_resolver
        except BaseException:
            _stop(processes)
            if dist.is_initialized():
                dist.destroy_process_group()
            raise
        return cls(generator, group, processes, mode, on_failure)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.generator, name)

    def capabilities(self) -> dict[str, Any]:
        return {**self.generator.capabilities(), "context_parallel": self.world, "context_parallel_mode": self.mode}

    def generate(
        self,
        spec: GenerationSpec,
        on_progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
        on_preview: PreviewSink | None = None,
        preview_every: int = 0,
        image: Image.Image | None = None,
    ) -> GenerationResult:
        """:meth:`Generator.generate` on every rank; the image comes back here. ``image`` (image to
        image) travels to every rank with the command: each encodes the same input."""
        spec.validate()
        self.generator.speed.check_tier(spec.tier)
        check_shardable(spec, self.world)
        command = {"kind": "generate", "spec": spec.to_dict(), "adapters": self._resolve(spec.adapters), "image": image}
        result = self._send(command, on_progress=on_progress, should_cancel=should_cancel,
                            on_preview=on_preview, preview_every=preview_every)
        assert isinstance(result, GenerationResult)
        return result

    def warm_up(
        self, specs: Sequence[GenerationSpec], on_each: Callable[[GenerationSpec, float], None] | None = None
    ) -> int:
        for spec in specs:
            spec.validate()
            self.generator.speed.check_tier(spec.tier)
        # A size this group refuses needs no warm-up.
        specs = [s for s in specs if not (s.image_tokens % self.world or s.max_sequence_length % self.world)]
        adapters = {name: source for spec in specs for name, source in self._resolve(spec.adapters).items()}
        result = self._send({"kind": "warm_up", "specs": [s.to_dict() for s in specs], "adapters": adapters},
                            on_each=on_each)
        assert isinstance(result, int)
        return result

    def run_on_all_ranks(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(generator, *args)`` on every rank together (``fn`` importable by name, ``args``
        picklable); returns rank 0's result. For work that must see the whole group, e.g. a direct
        transformer call."""
        return self._send({"kind": "call", "fn": fn, "args": args, "adapters": {}})

    def close(self) -> None:
        """Stop the followers (they finish the command they run) and leave the process group."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            if self.broken is None:
                with contextlib.suppress(Exception):
                    _broadcast(self._group, {"kind": "shutdown"})
        _stop(self._processes, grace_s=30.0 if self.broken is None else 0.0)
        if dist.is_initialized():
            dist.destroy_process_group()

    def _resolve(self, adapters: Sequence[Any]) -> dict[str, tuple[str, str | None]]:
        """Resolve on rank 0 only (registry, downloads); the others get the files' paths."""
        table: dict[str, tuple[str, str | None]] = {}
        for ref in adapters:
            source = self.generator.resolve_adapter(ref.name)
            path, sha = source if isinstance(source, tuple) else (source, None)
            table[ref.name] = (str(path), sha)
        return table

    def _send(self, command: dict[str, Any], **callbacks: Any) -> Any:
        with self._lock:
            if self.broken is not None or self._closing:
                raise ParallelGroupError(f"the context-parallel group is not serving: {self.broken or 'closed'}")
            resolver = self.generator._adapter_resolver
            _broadcast(self._group, command)
            try:
                return _run_command(self.generator, self._group, command, **callbacks)
            except UraeError:
                raise  # same point, same error on every rank (cancel included): the group stays in step
            except BaseException as exc:
                # Raised here only (a job timeout, out of memory ...): the followers are inside a
                # collective this rank has left. Stop them; the group cannot serve again.
                self._break(f"rank 0 left a job mid-way ({type(exc).__name__}: {exc})")
                raise
            finally:
                self.generator._adapter_resolver = resolver

    def _break(self, reason: str) -> None:
        if self.broken is not None:
            return
        self.broken = reason
        log.error("context-parallel group broken: %s", reason)
        _stop(self._processes, grace_s=0.0)
        if self.on_failure is not None:
            self.on_failure(reason)

    def _watch(self) -> None:
        sentinels = {p.sentinel: p for p in self._processes}
        from multiprocessing.connection import wait

        ready = wait(list(sentinels))
        if self._closing or self.broken is not None:
            return
        process = sentinels[ready[0]]  # type: ignore[index]
        process.join(timeout=1.0)
        self._break(f"{process.name} exited with code {process.exitcode}")


def _stop(processes: list[Any], grace_s: float = 0.0) -> None:
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join(timeout=10.0)


__all__ = [
    "CP_MODES",
    "GeneratorLoader",
    "ParallelGenerator",
    "ParallelGroupError",
    "check_shardable",
    "enable_context_parallel",
    "rank_device",
]
