"""Resident adapters of one pipeline: a fixed set of LoRA slots, and a cache of validated adapters.

The transformer always carries the same ``slots`` LoRA adapters (peft layers of rank ``rank`` on the
same target layers), created once, before any compilation. Using an adapter never adds, removes or
reshapes a layer: its tensors are copied into a slot in place, and its blend weight is written into
the slot's scaling tensor, which every layer of the slot shares. An unused slot has scaling 0. So a
compiled transformer sees only new values, never a new graph, whatever the request mixes.

An adapter file is read, validated and hashed once (:meth:`AdapterManager.ensure`); its tensors are
kept on the CPU (pinned when the model is on CUDA) in the slot's layout, padded to the slot rank, so a
swap is one batched copy (``torch._foreach_copy_``). Nothing is copied when a slot already holds the
adapter. A file that fails validation never reaches the model.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from urae.adapters.formats import AdapterFormat, file_sha256, load_adapter_layers
from urae.errors import (
    AdapterFormatError,
    AdapterLoadError,
    AdapterNotFoundError,
    AdapterNotLoadedError,
    HotswapRankError,
    InvalidSpecError,
)
from urae.spec import AdapterRef

# The attention projections of every double- and single-stream block: URAE's 2K and 4K adapters and
# attention LoRAs in general. Layers outside the slots cannot be served (refused when validated).
ATTENTION_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
)
SLOT_PREFIX = "slot_"


def in_slot_targets(layer: str, targets: Sequence[str] = ATTENTION_TARGETS) -> bool:
    """Whether the module path ``layer`` is a layer adapter slots of these target names cover."""
    inside_block = layer.startswith(("transformer_blocks.", "single_transformer_blocks."))
    return inside_block and any(layer.endswith(f".{t}") for t in targets)


def uncovered_layers(layers: Iterable[str], targets: Sequence[str] = ATTENTION_TARGETS) -> list[str]:
    """The module paths of an adapter that slots of these target names cannot serve (checked when an
    adapter is registered, so that it is refused then rather than at its first use)."""
    return sorted(layer for layer in layers if not in_slot_targets(layer, targets))


@dataclass
class _Cached:
    """A validated adapter in the slots' layout: one (A, B) pair per slot layer, padded to the rank."""

    sha256: str
    path: Path
    stamp: tuple[int, int, int]
    rank: int
    tensors: list[torch.Tensor]  # A0, B0, A1, B1, ... in the order of AdapterManager._params(slot)


@dataclass
class _Slot:
    name: str  # the peft adapter name
    scaling: torch.Tensor  # 0-dim, shared by every layer of the slot: the blend weight
    weight: float = 0.0
    holds: tuple[str, str] | None = None  # (adapter name, sha256) whose tensors are in the slot


class AdapterManager:
    """Fixed LoRA slots in ``pipe.transformer`` plus an LRU cache of up to ``capacity`` adapters.

    ``rank`` must cover the largest adapter served (URAE's converted 4K adapters are rank 48, the 2K
    one 16); ``slots`` is the most adapters one request can mix (default 2: the preset's URAE adapter
    and one of the user's). ``targets`` are the layer names (suffixes inside the blocks) the slots cover.
    """

    def __init__(
        self,
        pipe: Any,
        capacity: int = 8,
        rank: int = 64,
        slots: int = 2,
        targets: Sequence[str] = ATTENTION_TARGETS,
    ):
        for name, value in (("capacity", capacity), ("rank", rank), ("slots", slots)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidSpecError(name, f"must be a positive integer, got {value!r}")
        self.pipe = pipe
        self.capacity = capacity
        self.rank = rank
        self.hits = 0
        self.misses = 0
        self.copies = 0  # slot loads that copied tensors (a swap); activations that found them in place don't count
        self._cache: OrderedDict[str, _Cached] = OrderedDict()  # least recently used first
        self._hash_cache: dict[Path, tuple[tuple[int, int, int], str]] = {}
        self._layers = self._create_slots(slots, list(targets))
        self._slots = [self._make_slot(f"{SLOT_PREFIX}{i}") for i in range(slots)]
        self._params = {slot.name: self._slot_params(slot.name) for slot in self._slots}
        self._zeros: dict[tuple[torch.Size, torch.dtype], torch.Tensor] = {}

    # -- queries ----------------------------------------------------------------------------------
    @property
    def slot_count(self) -> int:
        return len(self._slots)

    def loaded(self) -> list[str]:
        """Names of the cached (validated, ready to swap in) adapters, least recently used first."""
        return list(self._cache)

    def sha256(self, name: str) -> str:
        """SHA-256 of the file the cached adapter ``name`` was read from."""
        return self._get(name).sha256

    def active(self) -> list[tuple[str, float]]:
        """(adapter, weight) of each slot in use."""
        return [(slot.holds[0], slot.weight) for slot in self._slots if slot.holds and slot.weight != 0.0]

    def target_layers(self) -> list[str]:
        """The module paths the slots cover."""
        return list(self._layers)

    # -- loading ----------------------------------------------------------------------------------
    def ensure(self, name: str, path: Path, sha256: str | None = None) -> bool:
        """Make ``name`` ready to swap in from ``path``; True when it already was (same file).

        ``sha256``: the file's hash when the caller already knows it (a registry record); otherwise it
        is computed once per file version. The model is not touched: an invalid file changes nothing.
        Beyond ``capacity`` the least recently used adapter that no slot holds is dropped.
        """
        path = Path(path)
        stamp = _stamp(path)
        current = self._cache.get(name)
        if current is not None and current.path == path and current.stamp == stamp:
            self._cache.move_to_end(name)
            self.hits += 1
            return True
        sha = sha256 or self._file_sha(path, stamp)
        if current is not None and current.sha256 == sha:
            current.path, current.stamp = path, stamp
            self._cache.move_to_end(name)
            self.hits += 1
            return True
        self.misses += 1
        cached = self._prepare(path, stamp, sha)
        self._cache[name] = cached
        self._cache.move_to_end(name)
        self._evict(keep=name)
        return False

    def unload(self, name: str) -> None:
        """Forget ``name``; a slot holding it is switched off (its output is the base model's)."""
        self._get(name)
        del self._cache[name]
        for slot in self._slots:
            if slot.holds is not None and slot.holds[0] == name:
                slot.holds = None
                self._set_weight(slot, 0.0)

    # -- activation -------------------------------------------------------------------------------
    def activate(self, refs: Sequence[AdapterRef]) -> None:
        """Use exactly these adapters with these weights; an empty list gives the base model.

        A slot keeps the adapter it holds when the request uses it again (no copy); others are filled
        with one batched copy each. Weights are written into the slots' scaling tensors.
        """
        if len(refs) > len(self._slots):
            raise InvalidSpecError(
                "adapters", f"{len(refs)} adapters requested; this worker mixes at most {len(self._slots)} at once"
            )
        wanted = {ref.name: (self._get(ref.name), float(ref.weight)) for ref in refs}
        placed: dict[str, _Slot] = {}
        for slot in self._slots:
            if slot.holds is not None and slot.holds[0] in wanted and wanted[slot.holds[0]][0].sha256 == slot.holds[1]:
                placed[slot.holds[0]] = slot
        free = [slot for slot in self._slots if slot not in placed.values()]
        for name, (cached, _) in wanted.items():
            if name not in placed:
                slot = free.pop(0)
                self._copy_in(slot, name, cached)
                placed[name] = slot
        for slot in self._slots:
            held = slot.holds[0] if slot.holds is not None else None
            self._set_weight(slot, wanted[held][1] if held in wanted and placed.get(held) is slot else 0.0)
        for name in wanted:
            self._cache.move_to_end(name)
        self._evict(keep=None)

    # -- internals --------------------------------------------------------------------------------
    def _create_slots(self, count: int, targets: list[str]) -> list[str]:
        from peft import LoraConfig

        transformer = self.pipe.transformer
        if getattr(transformer, "peft_config", None):
            raise AdapterLoadError("the transformer already has LoRA layers; adapter slots must be created first")
        layers = [
            name
            for name, module in transformer.named_modules()
            if isinstance(module, torch.nn.Linear) and in_slot_targets(name, targets)
        ]
        if not layers:
            raise AdapterLoadError(f"no layer of the transformer matches the slot targets {targets}")
        config = LoraConfig(r=self.rank, lora_alpha=self.rank, target_modules=layers, init_lora_weights=False)
        with warnings.catch_warnings():
            # peft warns that a model with an adapter gets another one: several slots are the point.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            for i in range(count):
                transformer.add_adapter(config, adapter_name=f"{SLOT_PREFIX}{i}")
        transformer.set_adapters([f"{SLOT_PREFIX}{i}" for i in range(count)])
        return layers

    def _make_slot(self, name: str) -> _Slot:
        from peft.tuners.lora import LoraLayer

        device = next(self.pipe.transformer.parameters()).device
        scaling = torch.zeros((), dtype=torch.float32, device=device)
        with torch.no_grad():
            for module in self.pipe.transformer.modules():
                if isinstance(module, LoraLayer) and name in module.lora_A:
                    module.lora_A[name].weight.zero_()
                    module.lora_B[name].weight.zero_()
                    # One tensor for the whole slot: a weight change is one write, and a compiled graph
                    # reads it as an input instead of baking the value in.
                    module.scaling[name] = scaling
        return _Slot(name, scaling)

    def _slot_params(self, slot: str) -> list[torch.Tensor]:
        transformer = self.pipe.transformer
        params = []
        for layer in self._layers:
            module = transformer.get_submodule(layer)
            params += [module.lora_A[slot].weight, module.lora_B[slot].weight]
        return params

    def _prepare(self, path: Path, stamp: tuple[int, int, int], sha: str) -> _Cached:
        """Read and validate ``path`` and lay it out as the slots' tensors (CPU, pinned on CUDA)."""
        try:
            adapter_format, layers = load_adapter_layers(path, self.pipe.transformer)
        except FileNotFoundError:
            raise AdapterNotFoundError(f"{path}: no such adapter file") from None
        if adapter_format is not AdapterFormat.LORA:
            raise AdapterFormatError(f"{path}: a {adapter_format.value} adapter must be converted first (urae convert)")
        outside = sorted(set(layers) - set(self._layers))
        if outside:
            raise AdapterLoadError(
                f"{path}: targets {len(outside)} layer(s) the adapter slots do not cover (first: {outside[0]}); "
                f"the slots cover {', '.join(sorted({n.rsplit('.attn.', 1)[-1] for n in self._layers}))}"
            )
        rank = max(down.shape[0] for _, down in layers.values())
        if rank > self.rank:
            raise HotswapRankError(f"{path}: rank {rank} exceeds the adapter slot rank {self.rank} (URAE_HOTSWAP_RANK)")
        reference = self._params[self._slots[0].name]
        pin = reference[0].device.type == "cuda"
        tensors: list[torch.Tensor] = []
        for index, layer in enumerate(self._layers):
            a_param, b_param = reference[2 * index], reference[2 * index + 1]
            pair = layers.get(layer)
            if pair is None:
                tensors += [self._zero(a_param, pin), self._zero(b_param, pin)]
                continue
            up, down = pair
            a = torch.zeros(a_param.shape, dtype=a_param.dtype)
            b = torch.zeros(b_param.shape, dtype=b_param.dtype)
            a[: down.shape[0]].copy_(down)
            b[:, : up.shape[1]].copy_(up)
            tensors += [a.pin_memory() if pin else a, b.pin_memory() if pin else b]
        return _Cached(sha, path, stamp, rank, tensors)

    def _zero(self, like: torch.Tensor, pin: bool) -> torch.Tensor:
        key = (like.shape, like.dtype)
        if key not in self._zeros:
            zero = torch.zeros(like.shape, dtype=like.dtype)
            self._zeros[key] = zero.pin_memory() if pin else zero
        return self._zeros[key]

    def _copy_in(self, slot: _Slot, name: str, cached: _Cached) -> None:
        params = self._params[slot.name]
        with torch.no_grad():
            torch._foreach_copy_(params, cached.tensors, non_blocking=True)
        slot.holds = (name, cached.sha256)
        self.copies += 1

    def _set_weight(self, slot: _Slot, weight: float) -> None:
        if slot.weight != weight:
            slot.scaling.fill_(weight)
            slot.weight = weight

    def _evict(self, keep: str | None) -> None:
        # Adapters a slot holds stay (their slot may be reused without a copy), as does the new one;
        # the cache may then exceed capacity by at most the number of slots.
        held = {slot.holds[0] for slot in self._slots if slot.holds is not None and slot.weight != 0.0} | {keep}
        for name in list(self._cache):
            if len(self._cache) <= self.capacity:
                return
            if name not in held:
                del self._cache[name]

    def _get(self, name: str) -> _Cached:
        cached = self._cache.get(name)
        if cached is None:
            loaded = ", ".join(self._cache) or "none"
            raise AdapterNotLoadedError(f"{name}: adapter is not loaded (loaded: {loaded})")
        return cached

    def _file_sha(self, path: Path, stamp: tuple[int, int, int]) -> str:
        cached = self._hash_cache.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        sha = file_sha256(path)
        if len(self._hash_cache) >= 4 * self.capacity:
            keep = {c.path for c in self._cache.values()}
            self._hash_cache = {p: v for p, v in self._hash_cache.items() if p in keep}
        self._hash_cache[path] = (stamp, sha)
        return sha


def _stamp(path: Path) -> tuple[int, int, int]:
    try:
        st = path.stat()
    except OSError:
        raise AdapterNotFoundError(f"{path}: no such adapter file") from None
    return (st.st_mtime_ns, st.st_size, st.st_ino)
