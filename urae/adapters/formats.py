"""Adapter files: safetensors only, header parsed and checked before any tensor is read.

Two layouts are recognised:

- a plain LoRA in diffusers form, ``transformer.<module>.lora_{A|B}.weight`` (also without the
  ``transformer.`` prefix or with peft's ``base_model.model.`` prefix), on any linear layer of a FLUX
  transformer, optionally with a scalar ``<module>.alpha``;
- URAE's minor-component file, ``<block>.<i>.attn.processor.to_{q|k|v|out}_{a|b}.weight``
  (a = A, r x in; b = B, out x r; ``out`` only in double blocks).

Every problem raises a specific :class:`~urae.errors.AdapterError` whose message names the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from urae.errors import (
    AdapterError,
    AdapterFormatError,
    AdapterNotFoundError,
    BaseModelMismatchError,
    HeaderFormatError,
    HeaderSizeError,
    NonFiniteWeightsError,
    NotSafetensorsError,
    RankMismatchError,
    TensorDtypeError,
    TensorShapeError,
    TruncatedAdapterError,
    UnknownKeysError,
)
from urae.file_modes import apply_umask

# A rank-48 LoRA on every linear layer of FLUX.1's 57 blocks (988 tensors) has a 135 KB header; 8 MiB
# leaves room for training metadata. A longer header is refused before it is read (the API uses the same).
MAX_HEADER_BYTES = 8 * 1024 * 1024
ALLOWED_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
# Sizes of every dtype safetensors defines, to check data offsets even for dtypes we then refuse.
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_TORCH_TO_SAFETENSORS = {v: k for k, v in ALLOWED_DTYPES.items()}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Where diffusers keeps peft's LoraConfig in the safetensors metadata.
_PEFT_METADATA_KEY = "lora_adapter_metadata"

_DOUBLE_MODULES = (
    r"attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|norm1\.linear|norm1_context\.linear|ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2"
)
_SINGLE_MODULES = r"attn\.(?:to_q|to_k|to_v)|norm\.linear|proj_mlp|proj_out"
_TOP_MODULES = (
    r"x_embedder|context_embedder|proj_out|norm_out\.linear"
    r"|time_text_embed\.(?:timestep_embedder|guidance_embedder|text_embedder)\.linear_[12]"
)
FLUX_LINEAR_RE = re.compile(
    rf"(?:transformer_blocks\.\d+\.(?:{_DOUBLE_MODULES})"
    rf"|single_transformer_blocks\.\d+\.(?:{_SINGLE_MODULES})"
    rf"|{_TOP_MODULES})"
)
_LORA_KEY_RE = re.compile(
    rf"(?:base_model\.model\.)?(?:transformer\.)?(?P<module>{FLUX_LINEAR_RE.pattern})"
    r"\.(?:lora_(?P<part>A|B)\.weight|(?P<alpha>alpha))"
)
_MINOR_KEY_RE = re.compile(
    r"(?:transformer\.)?(?:(?P<double>transformer_blocks)\.(?P<di>\d+)\.attn\.processor\.to_(?P<dname>q|k|v|out)"
    r"|(?P<single>single_transformer_blocks)\.(?P<si>\d+)\.attn\.processor\.to_(?P<sname>q|k|v))"
    r"_(?P<part>a|b)\.weight"
)


class AdapterFormat(StrEnum):
    LORA = "lora"
    MINOR_COMPONENTS = "minor_components"


@dataclass
class AdapterInfo:
    """What :func:`inspect_adapter` finds in a file. ``fits_base`` is None when no model was given."""

    path: Path
    format: AdapterFormat
    rank: int  # the largest rank over modules
    targets: list[str]  # module paths, e.g. "transformer_blocks.0.attn.to_q"
    num_parameters: int
    fits_base: bool | None
    problems: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    sha256: str = ""

    @property
    def trained_rank(self) -> int:
        """The rank the adapter was trained at, as its user asked for it.

        ``urae train`` and ``urae convert`` record it (``rank`` in the metadata): a minor-component
        adapter of rank r is served as a plain LoRA of rank 2r (+ the rank of a fused base adapter),
        which is ``rank``. Without the record, the file's rank.
        """
        recorded = self.metadata.get("rank", "")
        if recorded.isdigit() and 0 < int(recorded) <= self.rank:
            return int(recorded)
        return self.rank


@dataclass
class _ModuleKeys:
    down: str | None = None  # A, r x in
    up: str | None = None  # B, out x r
    alpha: str | None = None


def _fail(cls: type[AdapterError], path: Path, problem: str) -> AdapterError:
    return cls(f"{path}: {problem}")


def _check_not_pickle(path: Path, head: bytes) -> None:
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise _fail(
            NotSafetensorsError,
            path,
            f"{path.suffix} checkpoints are pickles and are never loaded; use a .safetensors file",
        )
    # torch.save writes a zip archive; plain pickles start with the PROTO opcode 0x80. A safetensors
    # length field can start with the same bytes, but its JSON header then begins at byte 8.
    looks_pickled = head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"
    if looks_pickled and head[8:9] != b"{":
        raise _fail(
            NotSafetensorsError,
            path,
            "this is a pickle or torch.save archive, not safetensors; it is never unpickled",
        )


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated safetensors header (tensor entries plus ``__metadata__``), without loading tensors."""
    path = Path(path)
    if not path.is_file():
        raise _fail(AdapterNotFoundError, path, "no such file")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(9)
        _check_not_pickle(path, head)
        f.seek(8)
        head = head[:8]
        if size < 8:
            raise _fail(
                TruncatedAdapterError, path, f"file is {size} bytes, too short to hold a safetensors header"
            )
        length = int.from_bytes(head, "little")
        if length > MAX_HEADER_BYTES:
            raise _fail(
                HeaderSizeError, path, f"header length {length} bytes is absurd (limit {MAX_HEADER_BYTES})"
            )
        if 8 + length > size:
            raise _fail(
                HeaderSizeError,
                path,
                f"header length {length} bytes goes beyond the end of the {size}-byte file",
            )
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    # ValueError: not UTF-8, not JSON, or an integer longer than Python converts.
    except (ValueError, RecursionError) as exc:
        raise _fail(HeaderFormatError, path, f"header is not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(header, dict):
        raise _fail(HeaderFormatError, path, "header is not a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(HeaderFormatError, path, "__metadata__ must map strings to strings")
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        spans.append(_check_entry(path, name, entry))
    data_len = size - 8 - length
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            raise _fail(HeaderFormatError, path, f"tensor {name} does not start where the previous one ends")
        position = end
    if position > data_len:
        raise _fail(
            TruncatedAdapterError,
            path,
            f"file is truncated: the header describes {position} data bytes, {data_len} present",
        )
    if position < data_len:
        raise _fail(
            HeaderFormatError, path, f"{data_len - position} bytes after the last tensor are not described"
        )
    return header


def _check_entry(path: Path, name: str, entry: Any) -> tuple[int, int, str]:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise _fail(HeaderFormatError, path, f"entry {name!r} lacks dtype, shape or data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
        raise _fail(HeaderFormatError, path, f"tensor {name} has an unknown dtype {dtype!r}")
    if dtype not in ALLOWED_DTYPES:
        raise _fail(TensorDtypeError, path, f"tensor {name} is {dtype}; only F16, BF16 and F32 are accepted")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise _fail(HeaderFormatError, path, f"tensor {name} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _fail(HeaderFormatError, path, f"tensor {name} has invalid data_offsets {offsets!r}")
    expected = math.prod(shape) * _DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise _fail(
            TensorShapeError,
            path,
            f"tensor {name} of shape {shape} needs {expected} bytes, its offsets span {offsets[1] - offsets[0]}",
        )
    return offsets[0], offsets[1], name


def _module_of_minor_key(match: re.Match[str]) -> tuple[str, str]:
    if match["double"]:
        name = "to_out.0" if match["dname"] == "out" else f"to_{match['dname']}"
        module = f"transformer_blocks.{int(match['di'])}.attn.{name}"
    else:
        module = f"single_transformer_blocks.{int(match['si'])}.attn.to_{match['sname']}"
    return module, "down" if match["part"] == "a" else "up"


def _classify(path: Path, header: Mapping[str, Any]) -> tuple[AdapterFormat, dict[str, _ModuleKeys]]:
    """Which layout the keys follow, and the keys of each target module; checks pairs and ranks."""
    modules: dict[str, _ModuleKeys] = {}
    formats: set[AdapterFormat] = set()
    unknown: list[str] = []
    for key in header:
        if key == "__metadata__":
            continue
        if (m := _LORA_KEY_RE.fullmatch(key)) is not None:
            formats.add(AdapterFormat.LORA)
            module = m["module"]
            part = "alpha" if m["alpha"] else ("down" if m["part"] == "A" else "up")
        elif (m := _MINOR_KEY_RE.fullmatch(key)) is not None:
            formats.add(AdapterFormat.MINOR_COMPONENTS)
            module, part = _module_of_minor_key(m)
        else:
            unknown.append(key)
            continue
        keys = modules.setdefault(module, _ModuleKeys())
        if getattr(keys, part) is not None:
            raise _fail(HeaderFormatError, path, f"{key} and {getattr(keys, part)} name the same tensor")
        setattr(keys, part, key)
    if unknown:
        shown = ", ".join(sorted(unknown)[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise _fail(
            UnknownKeysError,
            path,
            f"{len(unknown)} keys are not LoRA or URAE keys of a FLUX transformer: {shown}",
        )
    if not modules:
        raise _fail(AdapterFormatError, path, "contains no adapter tensors")
    if len(formats) > 1:
        raise _fail(UnknownKeysError, path, "mixes plain LoRA keys and URAE minor-component keys")
    for module, keys in modules.items():
        if keys.down is None or keys.up is None:
            missing = "A (down)" if keys.down is None else "B (up)"
            raise _fail(RankMismatchError, path, f"{module} has no {missing} matrix")
        down, up = header[keys.down]["shape"], header[keys.up]["shape"]
        if len(down) != 2 or len(up) != 2:
            raise _fail(TensorShapeError, path, f"{module}: A {down} and B {up} must both be matrices")
        if down[0] != up[1]:
            raise _fail(RankMismatchError, path, f"{module}: A has rank {down[0]} but B has rank {up[1]}")
        if down[0] == 0:
            raise _fail(TensorShapeError, path, f"{module} has rank 0")
        if keys.alpha is not None and math.prod(header[keys.alpha]["shape"]) != 1:
            raise _fail(
                TensorShapeError,
                path,
                f"{module}: alpha must be a scalar, got shape {header[keys.alpha]['shape']}",
            )
    return formats.pop(), modules


def _fit_problems(
    header: Mapping[str, Any], modules: Mapping[str, _ModuleKeys], transformer: nn.Module
) -> list[str]:
    problems: list[str] = []
    for module_path, keys in sorted(modules.items()):
        try:
            module = transformer.get_submodule(module_path)
        except AttributeError:
            problems.append(f"{module_path} does not exist in this transformer")
            continue
        in_features = getattr(module, "in_features", None)
        out_features = getattr(module, "out_features", None)
        if not isinstance(in_features, int) or not isinstance(out_features, int):
            problems.append(f"{module_path} is not a linear layer")
            continue
        assert keys.down is not None and keys.up is not None
        down, up = header[keys.down]["shape"], header[keys.up]["shape"]
        if down[1] != in_features or up[0] != out_features:
            problems.append(
                f"{module_path}: adapter is {up[0]} x {down[1]}, the layer is {out_features} x {in_features}"
            )
    return problems


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def inspect_adapter(path: str | os.PathLike[str], transformer: nn.Module | None = None) -> AdapterInfo:
    """Describe an adapter file without loading its tensors; with ``transformer``, check that it fits."""
    path = Path(path)
    header = read_header(path)
    adapter_format, modules = _classify(path, header)
    rank = max(header[k.down]["shape"][0] for k in modules.values() if k.down)
    num_parameters = sum(
        math.prod(header[key]["shape"]) for k in modules.values() for key in (k.down, k.up) if key is not None
    )
    problems = _fit_problems(header, modules, transformer) if transformer is not None else []
    return AdapterInfo(
        path=path,
        format=adapter_format,
        rank=rank,
        targets=sorted(modules),
        num_parameters=num_parameters,
        fits_base=None if transformer is None else not problems,
        problems=problems,
        metadata=dict(header.get("__metadata__", {})),
        sha256=file_sha256(path),
    )


def _peft_alpha(metadata: Mapping[str, str], module: str, rank: int) -> float | None:
    """lora_alpha that diffusers/peft recorded for ``module``, if any."""
    text = metadata.get(_PEFT_METADATA_KEY)
    if not text:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(config, dict):
        return None
    # diffusers prefixes the config keys with the component name ("transformer.lora_alpha").
    config = {k.removeprefix("transformer."): v for k, v in config.items()}
    patterns = config.get("alpha_pattern") or {}
    if isinstance(patterns, dict):
        for pattern, alpha in patterns.items():
            if (module == pattern or module.endswith("." + pattern)) and isinstance(alpha, int | float):
                return float(alpha)
    alpha = config.get("lora_alpha")
    return float(alpha) if isinstance(alpha, int | float) else None


def load_adapter_layers(
    path: str | os.PathLike[str], transformer: nn.Module | None = None
) -> tuple[AdapterFormat, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Validated layers of any adapter file: module path -> (B/up, A/down), LoRA alpha folded into B.

    With ``transformer``, a file that does not fit it raises :class:`BaseModelMismatchError`.
    """
    path = Path(path)
    header = read_header(path)
    adapter_format, modules = _classify(path, header)
    if transformer is not None:
        problems = _fit_problems(header, modules, transformer)
        if problems:
            more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
            raise _fail(
                BaseModelMismatchError,
                path,
                "does not fit this base model: " + "; ".join(problems[:3]) + more,
            )
    metadata = header.get("__metadata__", {})
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for module, keys in sorted(modules.items()):
                assert keys.down is not None and keys.up is not None
                down, up = f.get_tensor(keys.down), f.get_tensor(keys.up)
                for key, tensor in ((keys.down, down), (keys.up, up)):
                    if not torch.isfinite(tensor).all():
                        raise _fail(NonFiniteWeightsError, path, f"tensor {key} contains NaN or infinity")
                rank = down.shape[0]
                alpha = (
                    float(f.get_tensor(keys.alpha).item())
                    if keys.alpha
                    else _peft_alpha(metadata, module, rank)
                )
                if alpha is not None and not math.isfinite(alpha):
                    raise _fail(NonFiniteWeightsError, path, f"{module} has a non-finite alpha")
                if alpha is not None and alpha != rank:
                    up = (up.to(torch.float32) * (alpha / rank)).to(up.dtype)
                layers[module] = (up, down)
    except AdapterError:
        raise
    except Exception as exc:  # the safetensors reader's own errors on a file that changed under us
        raise _fail(HeaderFormatError, path, f"could not be read as safetensors ({exc})") from None
    return adapter_format, layers


def load_lora_state_dict(
    path: str | os.PathLike[str], transformer: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """A validated plain-LoRA state dict with keys in diffusers form (``transformer.<module>.lora_A.weight``).

    Alpha is folded into B, so the result has scale 1 on every module. A minor-component file raises
    :class:`AdapterFormatError`: it must be converted first (``urae convert``).
    """
    adapter_format, layers = load_adapter_layers(path, transformer)
    if adapter_format is not AdapterFormat.LORA:
        raise _fail(
            AdapterFormatError,
            Path(path),
            "is a URAE minor-component adapter; convert it to a plain LoRA first (urae convert)",
        )
    return _diffusers_state_dict(layers)


def _diffusers_state_dict(layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for module, (up, down) in sorted(layers.items()):
        state[f"transformer.{module}.lora_A.weight"] = down
        state[f"transformer.{module}.lora_B.weight"] = up
    return state


def save_lora(
    path: str | os.PathLike[str],
    layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    metadata: Mapping[str, str] | None = None,
    alpha: Mapping[str, float] | None = None,
) -> Path:
    """Write a plain LoRA (module path -> (up/B, down/A)) in diffusers form, atomically.

    ``alpha`` (module path -> lora_alpha) is folded into B, so the file always has scale 1.
    ``metadata`` is stored in the safetensors header.
    """
    path = Path(path)
    if not layers:
        raise _fail(AdapterFormatError, path, "no layers to save")
    alpha = alpha or {}
    prepared: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, (up, down) in layers.items():
        if not FLUX_LINEAR_RE.fullmatch(module):
            raise _fail(UnknownKeysError, path, f"{module!r} is not a linear layer of a FLUX transformer")
        if up.dim() != 2 or down.dim() != 2:
            raise _fail(
                TensorShapeError,
                path,
                f"{module}: up {tuple(up.shape)} and down {tuple(down.shape)} must be matrices",
            )
        if up.shape[1] != down.shape[0]:
            raise _fail(
                RankMismatchError,
                path,
                f"{module}: up has rank {up.shape[1]} but down has rank {down.shape[0]}",
            )
        for tensor in (up, down):
            if tensor.dtype not in _TORCH_TO_SAFETENSORS:
                raise _fail(
                    TensorDtypeError, path, f"{module} is {tensor.dtype}; only float16, bfloat16, float32"
                )
            if not torch.isfinite(tensor).all():
                raise _fail(NonFiniteWeightsError, path, f"{module} contains NaN or infinity")
        if module in alpha and alpha[module] != down.shape[0]:
            up = (up.to(torch.float32) * (alpha[module] / down.shape[0])).to(up.dtype)
        prepared[module] = (up, down)
    tensors = {
        k: v.detach().to("cpu").contiguous().clone() for k, v in _diffusers_state_dict(prepared).items()
    }
    header_metadata = {"format": "pt", **dict(metadata or {}), "urae_format": AdapterFormat.LORA.value}
    return write_atomically(path, lambda tmp: write_safetensors(tmp, tensors, header_metadata, shown_as=path))


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    shown_as: str | os.PathLike[str] | None = None,
) -> None:
    """Write a safetensors file whose bytes depend only on its content.

    The safetensors library writes ``__metadata__`` in hash-map order, which changes from process to
    process; the registry and the built-in adapters identify files by SHA-256, so keys are sorted here.
    Otherwise the bytes are the reference writer's. Errors name ``shown_as`` (default ``path``): the
    file the caller asked for, when ``path`` is the temporary file of an atomic write.
    """
    shown = Path(shown_as if shown_as is not None else path)
    if metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(HeaderFormatError, shown, "metadata must map strings to strings")
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        if tensor.dtype not in _TORCH_TO_SAFETENSORS:
            raise _fail(TensorDtypeError, shown, f"tensor {name} is {tensor.dtype}; only float16, bfloat16, float32")
        # Reinterpreting as bytes gives the machine's byte order: little-endian, as safetensors requires,
        # on every platform torch serves FLUX from.
        blob = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": _TORCH_TO_SAFETENSORS[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


def write_atomically(path: Path, write: Any) -> Path:
    """Call ``write(temp_path)`` next to ``path``, then rename over it; nothing partial is left behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    apply_umask(tmp)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def minor_component_key(module: str, part: str) -> str:
    """The official URAE 4K key of ``module``'s A (``part="a"``) or B (``part="b"``)."""
    block, _, name = module.rpartition(".attn.")
    short = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out"}.get(name)
    if short is None or (short == "out" and block.startswith("single_")):
        raise UnknownKeysError(f"{module} is not a URAE minor-component target")
    return f"{block}.attn.processor.to_{short}_{part}.weight"


def save_minor_components(
    path: str | os.PathLike[str], layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
) -> Path:
    """Write minor components (module -> (B, A)) in the official URAE 4K layout, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    for module, (b, a) in sorted(layers.items()):
        tensors[minor_component_key(module, "a")] = a.detach().contiguous().clone()
        tensors[minor_component_key(module, "b")] = b.detach().contiguous().clone()
    metadata = {"format": "pt", "urae_format": "minor_components"}
    return write_atomically(Path(path), lambda tmp: write_safetensors(tmp, tensors, metadata, shown_as=path))
