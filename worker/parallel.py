"""A generation worker that drives several GPUs for each image (``URAE_CONTEXT_PARALLEL`` > 1).

This process is rank 0: it takes jobs from RQ as a one-GPU worker does and hands each one to the
follower processes it started (see urae.parallel). If a follower dies, or the ranks fall out of step,
the worker stops the way SIGTERM stops it (the running job ends by its deadline or its lease) so that
its supervisor starts the whole group again.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import TYPE_CHECKING

from worker.runtime import Runtime

if TYPE_CHECKING:
    from urae.parallel import ParallelGenerator

log = logging.getLogger("urae.worker")


def load_parallel_generator(rt: Runtime) -> ParallelGenerator:
    """Start the group: rank 0 here, ranks 1..N-1 spawned, each on its own GPU with the whole model."""
    from urae.parallel import GeneratorLoader, ParallelGenerator

    s = rt.settings
    loader = GeneratorLoader(
        s.model,
        {
            "dtype": s.dtype, "offload": s.offload, "adapter_capacity": s.adapter_capacity,
            "hotswap_rank": s.hotswap_rank, "text_encoder_offload": s.text_encoder_offload,
            "prompt_cache_size": s.prompt_cache_size, "adapter_slots": s.adapter_slots,
            "tiers": [t.strip() for t in s.tiers.split(",") if t.strip()], "compile": s.compile,
            "attention_backend": s.attention_backend, "memory_profile": s.memory_profile,
            "idle_adapter_slots": s.idle_adapter_slots,
        },
        torch_threads=s.torch_threads,
    )
    generator = ParallelGenerator.start(
        loader, s.context_parallel, s.device, s.context_parallel_mode, on_failure=_stop_worker,
        adapter_resolver=rt.adapter_source,
    )
    # Previews are rendered by rank 0 only.
    generator.generator.preview_autoencoder = s.preview_autoencoder
    generator.generator.preview_max_side = s.preview_max_side
    return generator


def _stop_worker(reason: str) -> None:
    log.critical("the GPU group cannot serve any more (%s); stopping the worker", reason)
    os.kill(os.getpid(), signal.SIGTERM)
