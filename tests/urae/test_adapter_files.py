"""Writing adapter files and checking them against a base: each refusal's type and whole message, what
a written file's header says, alpha from peft's metadata, and what a fit check reports."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from urae.adapters import (
    inspect_adapter,
    load_adapter_layers,
    load_lora_state_dict,
    read_header,
    save_lora,
    save_minor_components,
)
from urae.adapters.formats import minor_component_key, write_atomically
from urae.errors import (
    AdapterFormatError,
    BaseModelMismatchError,
    HeaderFormatError,
    NonFiniteWeightsError,
    RankMismatchError,
    TensorDtypeError,
    TensorShapeError,
    UnknownKeysError,
)
from urae.tiny import build_tiny_pipeline

WIDTH = 32  # the tiny transformer's inner dimension
Q = "transformer_blocks.0.attn.to_q"
K = "transformer_blocks.0.attn.to_k"


@pytest.fixture(scope="module")
def transformer() -> Any:
    return build_tiny_pipeline("tiny").transformer


def pair(rank: int = 4, out: int = WIDTH, inp: int = WIDTH, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, rank, generator=g), torch.randn(rank, inp, generator=g)


def metadata_of(path: Path) -> dict[str, str]:
    return dict(read_header(path).get("__metadata__", {}))


# (case, layers, error, the message after "<path>: ")
REFUSED = [
    ("nothing to save", {}, AdapterFormatError, "no layers to save"),
    ("not a FLUX linear layer", {"unet.conv_in": pair()}, UnknownKeysError,
     "'unet.conv_in' is not a linear layer of a FLUX transformer"),
    ("a 3-D up", {Q: (torch.zeros(WIDTH, 4, 1), torch.zeros(4, WIDTH))}, TensorShapeError,
     f"{Q}: up ({WIDTH}, 4, 1) and down (4, {WIDTH}) must be matrices"),
    ("a 1-D down", {Q: (torch.zeros(WIDTH, 4), torch.zeros(4))}, TensorShapeError,
     f"{Q}: up ({WIDTH}, 4) and down (4,) must be matrices"),
    # down is 3 x 48: its rank (3) is not its width (48), so the message shows which one is meant.
    ("ranks that differ", {Q: (torch.zeros(WIDTH, 2), torch.zeros(3, 48))}, RankMismatchError,
     f"{Q}: up has rank 2 but down has rank 3"),
    ("float64", {Q: (torch.zeros(WIDTH, 4, dtype=torch.float64), torch.zeros(4, WIDTH))}, TensorDtypeError,
     f"{Q} is torch.float64; only float16, bfloat16, float32"),
    ("an infinity", {Q: (torch.zeros(WIDTH, 4), torch.full((4, WIDTH), float("inf")))}, NonFiniteWeightsError,
     f"{Q} contains NaN or infinity"),
]


@pytest.mark.parametrize(("case", "layers", "error", "message"), REFUSED, ids=[c[0] for c in REFUSED])
def test_save_lora_refuses_with_the_files_name_and_the_reason_and_writes_nothing(
    tmp_path: Path, case: str, layers: dict[str, Any], error: type[Exception], message: str
) -> None:
    path = tmp_path / "out" / "a.safetensors"
    with pytest.raises(error) as raised:
        save_lora(path, layers)
    assert str(raised.value) == f"{path}: {message}", case
    assert not path.parent.exists() or list(path.parent.iterdir()) == []


def test_a_saved_lora_says_what_it_is_and_the_callers_metadata_cannot_say_otherwise(tmp_path: Path) -> None:
    path = save_lora(tmp_path / "a.safetensors", {Q: pair()}, metadata={"note": "x", "urae_format": "other"})
    assert metadata_of(path) == {"format": "pt", "note": "x", "urae_format": "lora"}
    assert metadata_of(save_lora(tmp_path / "b.safetensors", {Q: pair()})) == {"format": "pt", "urae_format": "lora"}


def test_saved_minor_components_say_what_they_are(tmp_path: Path, transformer: Any) -> None:
    path = save_minor_components(tmp_path / "m.safetensors", {Q: pair()})
    assert metadata_of(path) == {"format": "pt", "urae_format": "minor_components"}
    with pytest.raises(AdapterFormatError) as raised:
        load_lora_state_dict(path, transformer)
    assert str(raised.value) == (f"{path}: is a URAE minor-component adapter; convert it to a plain LoRA first "
                                 "(urae convert)")


def test_alpha_folded_at_save_keeps_the_tensors_dtype(tmp_path: Path) -> None:
    up, down = pair(rank=4)
    up = up.to(torch.bfloat16)
    path = save_lora(tmp_path / "a.safetensors", {Q: (up, down)}, alpha={Q: 8.0})
    assert read_header(path)[f"transformer.{Q}.lora_B.weight"]["dtype"] == "BF16"
    folded = load_lora_state_dict(path)[f"transformer.{Q}.lora_B.weight"]
    assert folded.dtype == torch.bfloat16
    torch.testing.assert_close(folded, (up.float() * 2.0).to(torch.bfloat16))
    # An alpha equal to the input width (not the rank) is still folded: rank 4, alpha 32.
    path = save_lora(tmp_path / "b.safetensors", {Q: (up, down)}, alpha={Q: float(WIDTH)})
    torch.testing.assert_close(load_lora_state_dict(path)[f"transformer.{Q}.lora_B.weight"],
                               (up.float() * 8.0).to(torch.bfloat16))


@pytest.mark.parametrize(
    ("module", "part", "key"),
    [
        ("transformer_blocks.3.attn.to_q", "a", "transformer_blocks.3.attn.processor.to_q_a.weight"),
        ("transformer_blocks.3.attn.to_k", "b", "transformer_blocks.3.attn.processor.to_k_b.weight"),
        ("transformer_blocks.0.attn.to_v", "a", "transformer_blocks.0.attn.processor.to_v_a.weight"),
        ("transformer_blocks.18.attn.to_out.0", "b", "transformer_blocks.18.attn.processor.to_out_b.weight"),
        ("single_transformer_blocks.37.attn.to_q", "a", "single_transformer_blocks.37.attn.processor.to_q_a.weight"),
    ],
)
def test_minor_component_keys_are_the_official_layouts(module: str, part: str, key: str) -> None:
    assert minor_component_key(module, part) == key


@pytest.mark.parametrize(
    "module",
    ["single_transformer_blocks.2.attn.to_out.0",  # single blocks have no attention output projection
     "transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.ff.net.2"],
)
def test_modules_outside_the_minor_component_targets_are_refused(module: str) -> None:
    with pytest.raises(UnknownKeysError) as raised:
        minor_component_key(module, "a")
    assert str(raised.value) == f"{module} is not a URAE minor-component target"


def _peft_file(path: Path, config: dict[str, Any], modules: tuple[str, ...] = (Q, K)) -> tuple[Path, dict[str, Any]]:
    ups = {}
    tensors = {}
    for i, module in enumerate(modules):
        up, down = pair(rank=8, seed=i)
        ups[module] = up
        tensors[f"transformer.{module}.lora_A.weight"] = down
        tensors[f"transformer.{module}.lora_B.weight"] = up
    save_file(tensors, path, metadata={"lora_adapter_metadata": json.dumps(config)})
    return path, ups


def test_peft_alpha_pattern_applies_to_its_module_only(tmp_path: Path) -> None:
    # As diffusers writes it: component-prefixed keys; a pattern naming a module by its full path.
    path, ups = _peft_file(tmp_path / "p.safetensors", {"transformer.r": 8, "transformer.lora_alpha": 16,
                                                        "transformer.alpha_pattern": {Q: 4}})
    _, layers = load_adapter_layers(path)
    torch.testing.assert_close(layers[Q][0], ups[Q] * 0.5)  # its pattern's alpha, 4 / 8
    torch.testing.assert_close(layers[K][0], ups[K] * 2.0)  # lora_alpha, 16 / 8


def test_peft_alpha_pattern_matches_a_module_path_suffix_at_a_dot(tmp_path: Path) -> None:
    path, ups = _peft_file(tmp_path / "p.safetensors", {"lora_alpha": 8, "alpha_pattern": {"attn.to_q": 24}})
    _, layers = load_adapter_layers(path)
    torch.testing.assert_close(layers[Q][0], ups[Q] * 3.0)
    torch.testing.assert_close(layers[K][0], ups[K])  # lora_alpha 8 = rank: unchanged
    # "o_q" ends the name too, but not at a dot: not this module's pattern.
    path, ups = _peft_file(tmp_path / "q.safetensors", {"lora_alpha": 8, "alpha_pattern": {"o_q": 24}})
    _, layers = load_adapter_layers(path)
    torch.testing.assert_close(layers[Q][0], ups[Q])


@pytest.mark.parametrize(
    "config",
    [{"lora_alpha": "16"}, {"lora_alpha": None}, {"alpha_pattern": {Q: "16"}}, ["lora_alpha", 16], {}],
    ids=["alpha as text", "alpha null", "pattern alpha as text", "not an object", "no alpha"],
)
def test_peft_metadata_without_a_numeric_alpha_leaves_the_weights_as_they_are(
    tmp_path: Path, config: Any
) -> None:
    path, ups = _peft_file(tmp_path / "p.safetensors", config)
    _, layers = load_adapter_layers(path)
    for module in (Q, K):
        assert torch.equal(layers[module][0], ups[module])


def test_the_sha256_is_of_the_whole_file(tmp_path: Path) -> None:
    # Over 1 MiB: read in more than one piece.
    path = save_lora(tmp_path / "big.safetensors", {"transformer_blocks.0.ff.net.0.proj": pair(rank=2000, out=128)})
    assert path.stat().st_size > 1 << 20
    assert inspect_adapter(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_inspect_without_a_base_reports_no_problems(tmp_path: Path) -> None:
    info = inspect_adapter(save_lora(tmp_path / "a.safetensors", {"transformer_blocks.9.attn.to_q": pair()}))
    assert info.fits_base is None and info.problems == []


class _InFeaturesOnly(nn.Module):
    in_features = WIDTH


def _fake_base() -> nn.Module:
    """transformer_blocks.0.attn: to_q is no linear layer at all, to_k has in_features only, to_v is linear."""
    attn = nn.Module()
    attn.to_q = nn.Identity()
    attn.to_k = _InFeaturesOnly()
    attn.to_v = nn.Linear(WIDTH, WIDTH)
    block = nn.Module()
    block.attn = attn
    base = nn.Module()
    base.transformer_blocks = nn.ModuleList([block])
    return base


def test_every_misfit_is_reported_each_with_its_reason(tmp_path: Path, transformer: Any) -> None:
    layers = {
        "transformer_blocks.7.attn.to_q": pair(),  # tiny has 2 double blocks
        "transformer_blocks.8.attn.to_q": pair(),
        "transformer_blocks.0.attn.to_k": pair(out=48),  # right input width, wrong output width
        "transformer_blocks.1.attn.to_v": pair(inp=48),  # wrong input width, right output width
        "transformer_blocks.0.attn.to_q": pair(),  # fits
    }
    info = inspect_adapter(save_lora(tmp_path / "a.safetensors", layers), transformer)
    assert info.fits_base is False
    assert info.problems == [
        "transformer_blocks.0.attn.to_k: adapter is 48 x 32, the layer is 32 x 32",
        "transformer_blocks.1.attn.to_v: adapter is 32 x 48, the layer is 32 x 32",
        "transformer_blocks.7.attn.to_q does not exist in this transformer",
        "transformer_blocks.8.attn.to_q does not exist in this transformer",
    ]
    layers = {"transformer_blocks.0.attn.to_q": pair(), "transformer_blocks.0.attn.to_k": pair(),
              "transformer_blocks.0.attn.to_v": pair()}
    info = inspect_adapter(save_lora(tmp_path / "b.safetensors", layers), _fake_base())
    assert info.problems == ["transformer_blocks.0.attn.to_k is not a linear layer",
                             "transformer_blocks.0.attn.to_q is not a linear layer"]
    with pytest.raises(BaseModelMismatchError, match="to_k is not a linear layer; transformer_blocks.0.attn.to_q"):
        load_adapter_layers(tmp_path / "b.safetensors", _fake_base())


def test_an_atomic_write_makes_the_folders_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "file.bin"
    seen: list[Path] = []

    def write(tmp: str) -> None:
        seen.append(Path(tmp))
        Path(tmp).write_bytes(b"new")

    write_atomically(target, write)
    assert target.read_bytes() == b"new"
    # The temporary file was a hidden sibling (same folder, so the rename is atomic), and is gone.
    assert seen[0].parent == target.parent and seen[0].name.startswith(".file.bin.") and seen[0].suffix == ".tmp"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]

    def fail(tmp: str) -> None:
        Path(tmp).write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, fail)
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


@pytest.mark.parametrize("names", [["a", "b"], ["alpha.weight", "b"], ["xxxxx", "yy"],
                                   [f"transformer.{Q}.lora_A.weight", f"transformer.{Q}.lora_B.weight"]])
@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_written_bytes_are_the_reference_writers(tmp_path: Path, names: list[str], metadata: Any) -> None:
    # One metadata key at most: the reference writer orders several in no fixed way (ours sorts them).
    from urae.adapters.formats import write_safetensors

    g = torch.Generator().manual_seed(len("".join(names)))
    tensors = {name: torch.randn(3, 4, generator=g) for name in names}
    save_file(tensors, tmp_path / "reference.safetensors", metadata=metadata)
    write_safetensors(tmp_path / "ours.safetensors", tensors, metadata)
    ours = (tmp_path / "ours.safetensors").read_bytes()
    assert ours == (tmp_path / "reference.safetensors").read_bytes()
    assert int.from_bytes(ours[:8], "little") % 8 == 0  # the data section starts 8-byte aligned


@pytest.mark.parametrize("metadata", [{"steps": 5}, {5: "steps"}])
def test_metadata_that_is_not_text_is_refused_naming_the_requested_file(tmp_path: Path, metadata: Any) -> None:
    path = tmp_path / "a.safetensors"
    with pytest.raises(HeaderFormatError) as raised:
        save_lora(path, {Q: pair()}, metadata=metadata)
    assert str(raised.value) == f"{path}: metadata must map strings to strings"
    assert list(tmp_path.iterdir()) == []


def test_a_tensor_type_safetensors_cannot_hold_is_refused_naming_the_requested_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    up, down = pair()
    with pytest.raises(TensorDtypeError) as raised:
        save_minor_components(path, {Q: (up.double(), down)})
    key = "transformer_blocks.0.attn.processor.to_q_b.weight"
    assert str(raised.value) == f"{path}: tensor {key} is torch.float64; only float16, bfloat16, float32"
    assert list(tmp_path.iterdir()) == []


def _with_alpha(path: Path, alpha: float, up: torch.Tensor, down: torch.Tensor) -> Path:
    save_file({f"{Q}.lora_A.weight": down, f"{Q}.lora_B.weight": up, f"{Q}.alpha": torch.tensor(alpha)}, path)
    return path


def test_a_non_finite_alpha_is_refused(tmp_path: Path) -> None:
    path = _with_alpha(tmp_path / "a.safetensors", float("inf"), *pair())
    with pytest.raises(NonFiniteWeightsError) as raised:
        load_adapter_layers(path)
    assert str(raised.value) == f"{path}: {Q} has a non-finite alpha"


def test_alpha_folded_at_load_keeps_the_tensors_dtype(tmp_path: Path) -> None:
    up, down = pair(rank=4)
    path = _with_alpha(tmp_path / "a.safetensors", 2.0, up.half(), down.half())
    _, layers = load_adapter_layers(path)
    assert layers[Q][0].dtype == torch.float16
    torch.testing.assert_close(layers[Q][0], (up.half().float() * 0.5).half())


@pytest.mark.parametrize(("missing", "more"), [(3, ""), (4, " (+1 more)"), (6, " (+3 more)")])
def test_a_misfit_names_its_first_three_problems_and_counts_the_rest(
    tmp_path: Path, transformer: Any, missing: int, more: str
) -> None:
    modules = [f"transformer_blocks.{5 + i}.attn.to_q" for i in range(missing)]  # tiny has 2 double blocks
    path = save_lora(tmp_path / "a.safetensors", {m: pair() for m in modules})
    with pytest.raises(BaseModelMismatchError) as raised:
        load_adapter_layers(path, transformer)
    named = "; ".join(f"{m} does not exist in this transformer" for m in sorted(modules)[:3])
    assert str(raised.value) == f"{path}: does not fit this base model: {named}{more}"


def test_an_unknown_key_found_while_inspecting_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "unet.safetensors"
    save_file({"unet.conv_in.lora_A.weight": torch.zeros(2, 4), "unet.conv_in.lora_B.weight": torch.zeros(4, 2)}, path)
    with pytest.raises(UnknownKeysError) as raised:
        inspect_adapter(path)
    assert str(raised.value).startswith(f"{path}: ")


def test_a_file_the_reader_then_fails_on_is_a_header_error_naming_it(tmp_path: Path, monkeypatch: Any) -> None:
    # As when the file is replaced between the header check and the read: the safetensors reader's own
    # error, whatever its type, becomes the adapter error users are answered with.
    import urae.adapters.formats as formats

    path = save_lora(tmp_path / "a.safetensors", {Q: pair()})

    def replaced(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the file changed")

    monkeypatch.setattr(formats, "safe_open", replaced)
    with pytest.raises(HeaderFormatError) as raised:
        load_adapter_layers(path)
    assert str(raised.value) == f"{path}: could not be read as safetensors (the file changed)"
