"""Fixed adapter slots and the adapter cache: failed loads change nothing, mixing, swaps in place, LRU."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.urae.probe import transformer_output
from urae.adapters import AdapterManager, load_adapter_layers, save_lora
from urae.adapters import manager as manager_module
from urae.adapters.builtin import tiny_adapter_path, tiny_lora_layers
from urae.adapters.manager import ATTENTION_TARGETS
from urae.errors import (
    AdapterError,
    AdapterLoadError,
    AdapterNotLoadedError,
    BaseModelMismatchError,
    HotswapRankError,
    InvalidSpecError,
    NotSafetensorsError,
    RankMismatchError,
    TruncatedAdapterError,
)
from urae.spec import AdapterRef
from urae.tiny import build_tiny_pipeline


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three plain LoRAs of ranks 16, 8, 48 (the last one the tiny converted URAE 4K) and broken files."""
    folder = tmp_path_factory.mktemp("manager")
    transformer = build_tiny_pipeline("tiny").transformer
    files = {
        "a": save_lora(folder / "a.safetensors", tiny_lora_layers(transformer, seed=1)),
        "b": save_lora(folder / "b.safetensors", tiny_lora_layers(transformer, seed=2, rank=8)),
        "c": save_lora(folder / "c.safetensors", tiny_lora_layers(transformer, seed=3, rank=4)),
        "4k": tiny_adapter_path("urae-4k", "tiny", folder / "cache"),
    }
    truncated = folder / "truncated.safetensors"
    truncated.write_bytes(files["a"].read_bytes()[:-100])
    files["truncated"] = truncated
    files["foreign"] = save_lora(
        folder / "foreign.safetensors",
        {"transformer_blocks.0.attn.to_q": (torch.zeros(3072, 2), torch.zeros(2, 3072))},
    )
    files["pickle"] = folder / "model.bin"
    torch.save({"x": torch.zeros(2)}, files["pickle"])
    return files


@pytest.fixture
def pipe() -> Any:
    return build_tiny_pipeline("tiny")


_PRISTINE: list[Any] = []


def merged_output(adapters: dict[str, Path], weights: dict[str, float]) -> torch.Tensor:
    """Reference without diffusers: the weighted deltas merged into a fresh transformer's weights."""
    if not _PRISTINE:
        _PRISTINE.append(build_tiny_pipeline("tiny").transformer)
    transformer = copy.deepcopy(_PRISTINE[0])
    with torch.no_grad():
        for name, weight in weights.items():
            _, layers = load_adapter_layers(adapters[name])
            for module, (up, down) in layers.items():
                transformer.get_submodule(module).weight += weight * (up @ down)
    return transformer_output(transformer)


SLOTS = {"slot_0", "slot_1"}


def test_mix_with_weights_matches_merged_weights(pipe: Any, adapters: dict[str, Path]) -> None:
    base = transformer_output(pipe.transformer)
    manager = AdapterManager(pipe, rank=48)
    # Empty slots (scaling 0) leave the base output bit for bit.
    assert torch.equal(transformer_output(pipe.transformer), base)
    assert manager.ensure("a", adapters["a"]) is False
    assert manager.ensure("b", adapters["b"]) is False
    manager.activate([AdapterRef("a", 0.7), AdapterRef("b", -0.5)])
    mixed = transformer_output(pipe.transformer)
    assert (mixed - base).abs().max() > 1e-3
    torch.testing.assert_close(mixed, merged_output(adapters, {"a": 0.7, "b": -0.5}), atol=1e-5, rtol=0)
    manager.activate([AdapterRef("b", 1.0)])
    torch.testing.assert_close(
        transformer_output(pipe.transformer), merged_output(adapters, {"b": 1.0}), atol=1e-5, rtol=0
    )


def test_weight_zero_empty_activation_and_unload_give_the_base_output(pipe: Any, adapters: dict[str, Path]) -> None:
    base = transformer_output(pipe.transformer)
    manager = AdapterManager(pipe, rank=48)
    manager.ensure("a", adapters["a"])
    manager.ensure("4k", adapters["4k"])
    manager.activate([AdapterRef("a", 0.0), AdapterRef("4k", 0.0)])
    assert torch.equal(transformer_output(pipe.transformer), base)
    manager.activate([AdapterRef("4k", 1.0)])
    assert not torch.equal(transformer_output(pipe.transformer), base)
    manager.activate([])
    assert torch.equal(transformer_output(pipe.transformer), base)
    manager.activate([AdapterRef("a", 1.0), AdapterRef("4k", 1.0)])
    manager.unload("a")
    assert manager.loaded() == ["4k"]
    torch.testing.assert_close(
        transformer_output(pipe.transformer), merged_output(adapters, {"4k": 1.0}), atol=1e-5, rtol=0
    )
    manager.unload("4k")
    assert manager.loaded() == []
    assert torch.equal(transformer_output(pipe.transformer), base)
    with pytest.raises(AdapterNotLoadedError, match="a: adapter is not loaded"):
        manager.activate([AdapterRef("a", 1.0)])
    with pytest.raises(AdapterNotLoadedError):
        manager.unload("a")


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ("truncated", TruncatedAdapterError),
        ("foreign", BaseModelMismatchError),
        ("pickle", NotSafetensorsError),
    ],
)
def test_failed_load_leaves_the_model_bitwise_unchanged(
    pipe: Any, adapters: dict[str, Path], bad: str, error: type[AdapterError]
) -> None:
    manager = AdapterManager(pipe, capacity=2, rank=48)
    base = transformer_output(pipe.transformer)
    with pytest.raises(error):
        manager.ensure("bad", adapters[bad])
    assert torch.equal(transformer_output(pipe.transformer), base)
    manager.ensure("a", adapters["a"])
    manager.ensure("b", adapters["b"])
    manager.activate([AdapterRef("a", 0.8), AdapterRef("b", 0.3)])
    before = transformer_output(pipe.transformer)
    with pytest.raises(error) as caught:
        manager.ensure("bad", adapters[bad])
    assert str(adapters[bad]) in str(caught.value)
    assert torch.equal(transformer_output(pipe.transformer), before)
    assert manager.loaded() == ["a", "b"]
    # Same name, file replaced by a broken one: the cached version stays.
    with pytest.raises(error):
        manager.ensure("a", adapters[bad])
    assert torch.equal(transformer_output(pipe.transformer), before)
    assert manager.loaded() == ["a", "b"]


def test_swaps_equal_a_fresh_load_and_never_change_the_model_structure(pipe: Any, adapters: dict[str, Path]) -> None:
    manager = AdapterManager(pipe, capacity=1, rank=48, slots=1)
    layer = pipe.transformer.get_submodule("transformer_blocks.0.attn.to_q")
    tensors = (layer.lora_A["slot_0"].weight, layer.lora_B["slot_0"].weight, layer.scaling["slot_0"])
    outputs = {}
    for name in ["a", "4k", "b", "a"]:
        assert manager.ensure(name, adapters[name]) is False
        manager.activate([AdapterRef(name, 1.0)])
        outputs[name] = transformer_output(pipe.transformer)
        assert set(pipe.transformer.peft_config) == {"slot_0"}
        assert manager.loaded() == [name]
    # Same tensors, same shapes (padded to the slot rank), written in place.
    assert (layer.lora_A["slot_0"].weight, layer.lora_B["slot_0"].weight, layer.scaling["slot_0"]) == tensors
    assert layer.lora_A["slot_0"].weight.shape[0] == 48
    base = transformer_output(build_tiny_pipeline("tiny").transformer)
    for name in ["a", "4k", "b"]:
        fresh = build_tiny_pipeline("tiny")
        fresh.load_lora_weights(str(adapters[name]), adapter_name="fresh")
        expected = transformer_output(fresh.transformer)
        assert (expected - base).abs().max() > 1e-3
        torch.testing.assert_close(outputs[name], expected, atol=1e-6, rtol=0)
    assert manager.misses == 4 and manager.hits == 0


def test_an_adapter_already_in_a_slot_is_not_copied_again(pipe: Any, adapters: dict[str, Path]) -> None:
    manager = AdapterManager(pipe, rank=48)
    for name in ("a", "b", "4k"):
        manager.ensure(name, adapters[name])
    manager.activate([AdapterRef("4k", 1.0), AdapterRef("a", 0.5)])
    assert manager.copies == 2
    # Weights and order change, the adapters do not: no copy, only the scaling values.
    manager.activate([AdapterRef("a", 1.0), AdapterRef("4k", 0.3)])
    manager.activate([AdapterRef("4k", 1.0)])
    assert manager.copies == 2
    # "b" replaces the adapter the request does not use; "4k" stays where it is.
    manager.activate([AdapterRef("4k", 1.0), AdapterRef("b", 1.0)])
    assert manager.copies == 3
    assert set(pipe.transformer.peft_config) == SLOTS
    torch.testing.assert_close(
        transformer_output(pipe.transformer), merged_output(adapters, {"4k": 1.0, "b": 1.0}), atol=1e-5, rtol=0
    )
    # One scaling tensor per slot, shared by every layer: a weight change is one write.
    scalings = {id(m.scaling["slot_0"]) for m in pipe.transformer.modules() if hasattr(m, "lora_A") and "slot_0" in m.lora_A}
    assert len(scalings) == 1


def test_more_adapters_than_slots_is_refused(pipe: Any, adapters: dict[str, Path]) -> None:
    manager = AdapterManager(pipe, rank=48)
    for name in ("a", "b", "c"):
        manager.ensure(name, adapters[name])
    with pytest.raises(InvalidSpecError, match="at most 2 at once"):
        manager.activate([AdapterRef("a", 1.0), AdapterRef("b", 1.0), AdapterRef("c", 1.0)])


def test_rank_above_the_slot_rank_is_refused_before_touching_the_model(
    pipe: Any, adapters: dict[str, Path]
) -> None:
    manager = AdapterManager(pipe, capacity=1, rank=16)
    manager.ensure("a", adapters["a"])
    manager.activate([AdapterRef("a", 1.0)])
    before = transformer_output(pipe.transformer)
    with pytest.raises(HotswapRankError, match="rank 48 exceeds the adapter slot rank 16"):
        manager.ensure("4k", adapters["4k"])
    assert torch.equal(transformer_output(pipe.transformer), before)
    assert manager.loaded() == ["a"]


def test_slots_must_be_created_before_any_other_adapter(pipe: Any) -> None:
    AdapterManager(pipe)
    with pytest.raises(AdapterError, match="slots must be created first"):
        AdapterManager(pipe)


def test_lru_eviction_hits_and_misses(pipe: Any, adapters: dict[str, Path]) -> None:
    manager = AdapterManager(pipe, capacity=2, rank=48)
    assert manager.ensure("a", adapters["a"]) is False
    assert manager.ensure("b", adapters["b"]) is False
    assert manager.ensure("a", adapters["a"]) is True  # "b" is now the least recently used
    assert manager.ensure("c", adapters["c"]) is False
    assert manager.loaded() == ["a", "c"]
    assert (manager.hits, manager.misses) == (1, 3)
    manager.activate([AdapterRef("a", 1.0)])  # now "c" is the least recently used
    manager.ensure("b", adapters["b"])
    assert manager.loaded() == ["a", "b"]
    manager.activate([AdapterRef("a", 1.0), AdapterRef("b", 1.0)])
    torch.testing.assert_close(
        transformer_output(pipe.transformer), merged_output(adapters, {"a": 1.0, "b": 1.0}), atol=1e-5, rtol=0
    )
    assert set(pipe.transformer.peft_config) == SLOTS


def test_changed_file_under_the_same_name_is_reloaded(
    pipe: Any, adapters: dict[str, Path], tmp_path: Path
) -> None:
    path = tmp_path / "mine.safetensors"
    path.write_bytes(adapters["a"].read_bytes())
    manager = AdapterManager(pipe)
    manager.ensure("mine", path)
    manager.activate([AdapterRef("mine", 1.0)])
    first_sha = manager.sha256("mine")
    assert manager.ensure("mine", path) is True
    path.write_bytes(adapters["b"].read_bytes())
    assert manager.ensure("mine", path) is False
    assert manager.sha256("mine") != first_sha
    manager.activate([AdapterRef("mine", 1.0)])
    torch.testing.assert_close(
        transformer_output(pipe.transformer), merged_output(adapters, {"b": 1.0}), atol=1e-5, rtol=0
    )


def test_a_known_hash_is_trusted_and_a_file_is_hashed_once(
    pipe: Any, adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[Path] = []
    real = manager_module.file_sha256
    monkeypatch.setattr(manager_module, "file_sha256", lambda p: hashed.append(Path(p)) or real(p))
    manager = AdapterManager(pipe, capacity=1)
    manager.ensure("registered", adapters["a"], sha256="ab" * 32)
    assert manager.sha256("registered") == "ab" * 32 and hashed == []
    manager.ensure("builtin", adapters["b"])  # evicts "registered" (capacity 1)
    manager.ensure("registered", adapters["a"], sha256="ab" * 32)
    manager.ensure("builtin", adapters["b"])
    manager.ensure("builtin", adapters["b"])
    assert hashed == [adapters["b"]]


def test_names_peft_would_refuse_are_fine(pipe: Any, adapters: dict[str, Path]) -> None:
    manager = AdapterManager(pipe)
    manager.ensure("user.fine-tune v2", adapters["a"])
    manager.activate([AdapterRef("user.fine-tune v2", 1.0)])
    torch.testing.assert_close(
        transformer_output(pipe.transformer), merged_output(adapters, {"a": 1.0}), atol=1e-5, rtol=0
    )


def test_rank_mismatch_in_file_is_reported(pipe: Any, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    bad = tmp_path / "ranks.safetensors"
    module = "transformer_blocks.0.attn.to_q"
    save_file(
        {f"{module}.lora_A.weight": torch.zeros(4, 32), f"{module}.lora_B.weight": torch.zeros(32, 3)}, bad
    )
    with pytest.raises(RankMismatchError, match="ranks.safetensors"):
        AdapterManager(pipe).ensure("ranks", bad)


def test_adapters_with_different_ranks_per_module_and_layers_outside_the_slots(
    adapters: dict[str, Path], tmp_path: Path
) -> None:
    # Ranks differ per module, and a double-block module path is the tail of a single-block one.
    pipe = build_tiny_pipeline("tiny")
    g = torch.Generator().manual_seed(7)
    ranks = {
        "transformer_blocks.0.attn.to_q": 8,
        "transformer_blocks.1.attn.to_q": 8,
        "single_transformer_blocks.0.attn.to_q": 2,
        "transformer_blocks.0.ff.net.2": 5,
    }
    layers = {}
    for module, rank in ranks.items():
        weight = pipe.transformer.get_submodule(module).weight
        layers[module] = (
            torch.randn(weight.shape[0], rank, generator=g) * 0.05,
            torch.randn(rank, weight.shape[1], generator=g) * 0.05,
        )
    attention_only = {m: pair for m, pair in layers.items() if ".attn." in m}
    adapters = {
        **adapters,
        "attention": save_lora(tmp_path / "attention.safetensors", attention_only),
        "with_ff": save_lora(tmp_path / "with_ff.safetensors", layers),
    }
    manager = AdapterManager(pipe, capacity=1)
    manager.ensure("attention", adapters["attention"])
    manager.activate([AdapterRef("attention", 1.0)])
    torch.testing.assert_close(
        transformer_output(pipe.transformer), merged_output(adapters, {"attention": 1.0}), atol=1e-5, rtol=0
    )
    before = transformer_output(pipe.transformer)
    with pytest.raises(AdapterLoadError, match=r"do not cover \(first: transformer_blocks.0.ff.net.2\)"):
        manager.ensure("with_ff", adapters["with_ff"])
    assert torch.equal(transformer_output(pipe.transformer), before)
    # Slots that cover the feed-forward layers too serve it.
    wide = build_tiny_pipeline("tiny")
    manager = AdapterManager(wide, targets=(*ATTENTION_TARGETS, "ff.net.2"))
    manager.ensure("with_ff", adapters["with_ff"])
    manager.activate([AdapterRef("with_ff", 1.0)])
    torch.testing.assert_close(
        transformer_output(wide.transformer), merged_output(adapters, {"with_ff": 1.0}), atol=1e-5, rtol=0
    )


def test_layers_outside_the_slots_are_named_before_registration(pipe: Any, adapters: dict[str, Path]) -> None:
    from urae.adapters import inspect_adapter
    from urae.adapters.manager import uncovered_layers

    # What the worker checks when an adapter is registered: the same rule the slots are built with.
    assert uncovered_layers(inspect_adapter(adapters["4k"]).targets) == []
    assert uncovered_layers(["transformer_blocks.3.attn.add_k_proj", "single_transformer_blocks.0.proj_mlp",
                             "transformer_blocks.0.ff.net.2", "x_embedder"]) == [
        "single_transformer_blocks.0.proj_mlp", "transformer_blocks.0.ff.net.2", "x_embedder"]
    manager = AdapterManager(pipe)
    assert all(uncovered_layers([layer]) == [] for layer in manager.target_layers())
    assert len(manager.target_layers()) == 2 * 8 + 2 * 3  # double blocks: 8 projections; single: q, k, v
