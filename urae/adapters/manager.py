"""Resident adapters of one pipeline: load by name, LRU-evict, hot-swap, activate with weights.

Every adapter is validated (:func:`load_lora_state_dict`) before the pipeline is touched, so a bad
file leaves the resident model and the other adapters exactly as they were.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from urae.adapters.formats import file_sha256, load_lora_state_dict
from urae.errors import (
    AdapterError,
    AdapterLoadError,
    AdapterNotFoundError,
    AdapterNotLoadedError,
    HotswapRankError,
    InvalidSpecError,
)
from urae.spec import AdapterRef


@dataclass
class _Resident:
    slot: str  # the adapter name inside diffusers/peft; user names may contain characters peft refuses
    sha256: str
    path: Path
    targets: frozenset[str]
    rank: int


class AdapterManager:
    """Keeps up to ``capacity`` LoRA adapters resident in ``pipe`` and activates them per request.

    With ``hotswap_rank`` set, the pipeline is prepared for hot-swapping (``enable_lora_hotswap``)
    before any load; every slot is padded to that rank, and a new adapter replaces the least recently
    used one in place (no recompilation of a compiled transformer). ``hotswap_rank`` must cover the
    largest adapter served: URAE's converted 4K adapters are rank 48, the 2K one rank 16. An adapter
    that targets a layer its slot does not cover is loaded fresh instead (correct, but a compiled
    transformer then recompiles).
    """

    def __init__(self, pipe: Any, capacity: int = 8, hotswap_rank: int | None = None):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise InvalidSpecError("capacity", f"must be a positive integer, got {capacity!r}")
        if hotswap_rank is not None and (
            isinstance(hotswap_rank, bool) or not isinstance(hotswap_rank, int) or hotswap_rank < 1
        ):
            raise InvalidSpecError("hotswap_rank", f"must be a positive integer, got {hotswap_rank!r}")
        self.pipe = pipe
        self.capacity = capacity
        self.hotswap_rank = hotswap_rank
        self.hits = 0
        self.misses = 0
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # least recently used first
        self._active: list[tuple[str, float]] = []  # (name, weight) of the last activate()
        self._next_slot = 0
        self._hash_cache: dict[Path, tuple[tuple[int, int, int], str]] = {}
        if hotswap_rank is not None:
            if getattr(pipe.transformer, "peft_config", None):
                raise AdapterError(
                    "hot-swap must be enabled before the first adapter is loaded into this pipeline"
                )
            pipe.enable_lora_hotswap(target_rank=hotswap_rank)

    # -- queries ----------------------------------------------------------------------------------
    def loaded(self) -> list[str]:
        """Names of the resident adapters, least recently used first."""
        return list(self._resident)

    def sha256(self, name: str) -> str:
        """SHA-256 of the file the resident adapter ``name`` was loaded from."""
        return self._get(name).sha256

    # -- loading ----------------------------------------------------------------------------------
    def ensure(self, name: str, path: Path) -> bool:
        """Make ``name`` resident from ``path``; True when it already was (same file content).

        A changed file under a resident name is reloaded. Beyond ``capacity`` the least recently
        used adapter is evicted (keep capacity >= the number of adapters one request mixes).
        """
        path = Path(path)
        sha = self._file_sha(path)
        current = self._resident.get(name)
        if current is not None and current.sha256 == sha:
            self._resident.move_to_end(name)
            self.hits += 1
            return True
        self.misses += 1
        state = load_lora_state_dict(path, self.pipe.transformer)
        targets = frozenset(
            k.removeprefix("transformer.").removesuffix(".lora_A.weight")
            for k in state
            if k.endswith(".lora_A.weight")
        )
        rank = max(v.shape[0] for k, v in state.items() if k.endswith(".lora_A.weight"))
        if self.hotswap_rank is not None and rank > self.hotswap_rank:
            raise HotswapRankError(
                f"{path}: rank {rank} exceeds the hot-swap target rank {self.hotswap_rank}"
            )

        # The slot: the name's own (changed file) or the least recently used one is replaced.
        victim_name = name if current is not None else None
        if victim_name is None and len(self._resident) >= self.capacity:
            victim_name = next(iter(self._resident))
        victim = self._resident.get(victim_name) if victim_name is not None else None
        hotswap = victim is not None and self.hotswap_rank is not None and targets <= victim.targets
        if victim is not None and hotswap:
            slot, slot_targets = victim.slot, victim.targets
        else:
            slot, slot_targets = self._new_slot(), targets
        try:
            self._load(state, slot, hotswap=hotswap)
        except Exception as exc:
            self._discard(slot)
            if hotswap and victim_name is not None:
                self._forget(victim_name)
            self._apply_active()
            raise AdapterLoadError(
                f"{path}: could not be loaded into the pipeline ({type(exc).__name__}: {exc})"
            ) from exc
        if victim_name is not None and victim is not None:
            if not hotswap:
                # Loaded first, removed after: a failed load above leaves the victim in place.
                self.pipe.delete_adapters([victim.slot])
            if victim_name != name:
                self._forget(victim_name)
        self._resident[name] = _Resident(slot, sha, path, slot_targets, rank)
        self._resident.move_to_end(name)
        self._apply_active()
        return False

    def unload(self, name: str) -> None:
        """Remove ``name`` from the pipeline; with no adapter left the output is the base model's."""
        resident = self._get(name)
        self.pipe.delete_adapters([resident.slot])
        self._forget(name)
        self._apply_active()

    # -- activation -------------------------------------------------------------------------------
    def activate(self, refs: Sequence[AdapterRef]) -> None:
        """Use exactly these adapters with these weights; an empty list gives the base model."""
        for ref in refs:
            self._get(ref.name)
        self._active = [(ref.name, float(ref.weight)) for ref in refs]
        for ref in refs:
            self._resident.move_to_end(ref.name)
        self._apply_active()

    # -- internals --------------------------------------------------------------------------------
    def _get(self, name: str) -> _Resident:
        resident = self._resident.get(name)
        if resident is None:
            loaded = ", ".join(self._resident) or "none"
            raise AdapterNotLoadedError(f"{name}: adapter is not loaded (loaded: {loaded})")
        return resident

    def _forget(self, name: str) -> None:
        self._resident.pop(name, None)
        self._active = [(n, w) for n, w in self._active if n != name]

    def _new_slot(self) -> str:
        slot = f"adapter_{self._next_slot}"
        self._next_slot += 1
        return slot

    def _file_sha(self, path: Path) -> str:
        # Hashing a 100 MB adapter per request would cost more than the swap: rehash on change only.
        try:
            st = path.stat()
        except OSError:
            raise AdapterNotFoundError(f"{path}: no such adapter file") from None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        cached = self._hash_cache.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        sha = file_sha256(path)
        if len(self._hash_cache) >= 4 * self.capacity:
            # Registry versions come and go: keep only the files of resident adapters.
            resident = {r.path for r in self._resident.values()}
            self._hash_cache = {p: v for p, v in self._hash_cache.items() if p in resident}
        self._hash_cache[path] = (stamp, sha)
        return sha

    def _load(self, state: dict[str, torch.Tensor], slot: str, hotswap: bool) -> None:
        if hotswap:
            self._swap_in_place(state, slot)
            return
        if self.hotswap_rank is not None:
            state = uniform_rank(state)
        if (
            self.hotswap_rank is not None
            and not hotswap
            and getattr(self.pipe.transformer, "peft_config", None)
        ):
            # diffusers pads only the first adapter to the target rank; pad each new slot too.
            self.pipe.transformer.enable_lora_hotswap(target_rank=self.hotswap_rank, check_compiled="ignore")
        # diffusers pops keys from the dict it is given: pass a copy. Its loader warns on every load
        # that the text encoders get no LoRA keys; adapters here are transformer-only by design.
        loader_log = logging.getLogger("diffusers.loaders.lora_base")
        level = loader_log.level
        loader_log.setLevel(logging.ERROR)
        try:
            self.pipe.load_lora_weights(dict(state), adapter_name=slot, hotswap=hotswap)
        finally:
            loader_log.setLevel(level)

    def _swap_in_place(self, state: dict[str, torch.Tensor], slot: str) -> None:
        """Copy a validated adapter into an existing slot's LoRA weights (what peft's hot-swap does).

        The slot's layers keep their tensors, shapes (padded to ``hotswap_rank``) and scaling, so a
        compiled transformer sees no change but the values; layers the new adapter does not target
        are zeroed. Every adapter here has its alpha folded into B (scale 1), like the slot's previous
        one. Doing the copy directly skips diffusers' per-load walks over the whole model, which cost
        more than the copy itself.
        """
        layers: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            path = key.removeprefix("transformer.")
            for part in ("A", "B"):
                suffix = f".lora_{part}.weight"
                if path.endswith(suffix):
                    layers.setdefault(path.removesuffix(suffix), {})[part] = value
        from peft.tuners.lora import LoraLayer

        covered = 0
        with torch.no_grad():
            for name, module in self.pipe.transformer.named_modules():
                if not isinstance(module, LoraLayer) or slot not in module.lora_A:
                    continue
                down, up = module.lora_A[slot].weight, module.lora_B[slot].weight
                down.zero_()
                up.zero_()
                pair = layers.get(name)
                if pair is None:
                    continue
                rank = pair["A"].shape[0]
                down[:rank].copy_(pair["A"])
                up[:, :rank].copy_(pair["B"])
                covered += 1
        if covered != len(layers):
            raise AdapterLoadError(f"slot {slot} covers {covered} of the adapter's {len(layers)} layers")

    def _discard(self, slot: str | None) -> None:
        """Remove a slot whose load failed, so no half-loaded weights stay in the model."""
        if slot is None:
            return
        existing = getattr(self.pipe.transformer, "peft_config", {}) or {}
        if slot in existing:
            self.pipe.delete_adapters([slot])

    def _apply_active(self) -> None:
        if not getattr(self.pipe.transformer, "peft_config", None):
            return
        if not self._active:
            self.pipe.disable_lora()
            return
        scalings = self._scaling_tensors() if self.hotswap_rank is not None else {}
        self.pipe.enable_lora()
        self.pipe.set_adapters(
            [self._resident[n].slot for n, _ in self._active], adapter_weights=[w for _, w in self._active]
        )
        if self.hotswap_rank is not None:
            self._restore_scaling_tensors(scalings)

    def _lora_layers(self) -> list[Any]:
        # peft is imported here, not at module level: it pulls in transformers, and the CLI's
        # inspect/convert commands should start without it.
        from peft.tuners.lora import LoraLayer

        return [m for m in self.pipe.transformer.modules() if isinstance(m, LoraLayer)]

    def _scaling_tensors(self) -> dict[tuple[int, str], torch.Tensor]:
        return {
            (id(module), slot): value
            for module in self._lora_layers()
            for slot, value in module.scaling.items()
            if isinstance(value, torch.Tensor)
        }

    def _restore_scaling_tensors(self, previous: dict[tuple[int, str], torch.Tensor]) -> None:
        # Hot-swap preparation turns LoRA scalings into tensors so that a compiled transformer reads
        # them as inputs; set_adapters writes plain floats back, which torch.compile would bake in as
        # constants (one recompilation per new weight). Write the new values into the same tensors.
        for module in self._lora_layers():
            for slot, value in module.scaling.items():
                if isinstance(value, torch.Tensor):
                    continue
                tensor = previous.get((id(module), slot))
                if tensor is None:
                    tensor = torch.tensor(float(value), device=module.weight.device)
                else:
                    tensor.fill_(float(value))
                module.scaling[slot] = tensor


def uniform_rank(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same LoRA with every module zero-padded to the largest rank (B @ A is unchanged).

    Mixed ranks make diffusers record a per-module alpha pattern, and peft refuses to hot-swap
    between adapters whose alpha patterns differ; in hot-swap mode every slot is padded anyway.
    """
    rank = max(v.shape[0] for k, v in state.items() if k.endswith(".lora_A.weight"))
    padded: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith(".lora_A.weight") and tensor.shape[0] < rank:
            tensor = torch.cat([tensor, tensor.new_zeros(rank - tensor.shape[0], tensor.shape[1])], dim=0)
        elif key.endswith(".lora_B.weight") and tensor.shape[1] < rank:
            tensor = torch.cat([tensor, tensor.new_zeros(tensor.shape[0], rank - tensor.shape[1])], dim=1)
        padded[key] = tensor
    return padded
