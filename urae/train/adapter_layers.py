"""Trainable low-rank layers installed on the FLUX transformer, and their exact export.

A small own module rather than peft: the minor-component init replaces the base weight by its major
part, and the export must know the initial factors exactly; both are plain tensors here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from urae.adapters.minor_components import difference_lora, minor_component_targets, svd_split
from urae.errors import InvalidSpecError

LoraFactors = tuple[torch.Tensor, torch.Tensor]  # (up, down): delta W = up @ down


class LowRankLinear(nn.Module):
    """``base_layer(x) + scale * B A x`` with B (out x r) and A (r x in) trainable, in float32.

    For minor components ``base_layer`` holds the major part of W and (B0, A0) the initial minor
    factors, kept for the export. The attribute name ``base_layer`` follows peft, so tools that look
    through LoRA wrappers find the base weight.
    """

    initial_A: torch.Tensor | None
    initial_B: torch.Tensor | None

    def __init__(self, base_layer: nn.Linear, rank: int, scale: float):
        super().__init__()
        self.base_layer = base_layer
        self.scale = scale
        out_features, in_features = base_layer.weight.shape
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.zeros(rank, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device))
        self.register_buffer("initial_A", None, persistent=False)
        self.register_buffer("initial_B", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return self.base_layer(x) + (delta * self.scale).to(x.dtype)

    def factors(self) -> LoraFactors:
        """(up, down) of this layer's change to the ORIGINAL weight it was installed on."""
        up = self.lora_B.detach() * self.scale
        down = self.lora_A.detach()
        if self.initial_A is None or self.initial_B is None:
            return up, down
        return difference_lora(up, down, self.initial_B, self.initial_A)


def resolve_targets(transformer: nn.Module, targets: list[str] | str) -> list[str]:
    """Module paths of the layers to adapt. ``"urae"`` is URAE's 190-matrix set on FLUX.1;
    otherwise each entry is a full module path or a layer name matched in every block's attention."""
    if isinstance(targets, str):
        if targets == "urae":
            return minor_component_targets(transformer)
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    linear_paths = [
        name
        for name, module in transformer.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(("transformer_blocks.", "single_transformer_blocks."))
    ]
    selected: list[str] = []
    for target in targets:
        matches = [p for p in linear_paths if p == target or p.endswith(f".attn.{target}")]
        if not matches:
            raise InvalidSpecError("targets", f"{target!r} matches no linear layer of the transformer's blocks")
        selected += [p for p in matches if p not in selected]
    return selected


@torch.no_grad()
def fuse_lora(transformer: nn.Module, layers: Mapping[str, LoraFactors]) -> None:
    """Add up @ down to each named linear layer's weight (in float64, stored in the weight's dtype)."""
    for path, (up, down) in layers.items():
        try:
            module = transformer.get_submodule(path)
        except AttributeError:
            raise InvalidSpecError("base_adapter", f"has a layer {path} that the transformer does not have") from None
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        if (up.shape[0], down.shape[1]) != tuple(weight.shape):
            raise InvalidSpecError("base_adapter", f"layer {path} does not match the weight shape {tuple(weight.shape)}")
        fused = weight.to(torch.float64) + up.to(weight.device, torch.float64) @ down.to(weight.device, torch.float64)
        weight.copy_(fused.to(weight.dtype))


@torch.no_grad()
def install_adapters(
    transformer: nn.Module,
    kind: str,
    paths: list[str],
    rank: int,
    scale: float = 1.0,
    seed: int = 0,
    fused: Mapping[str, LoraFactors] | None = None,
    stored: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, LowRankLinear]:
    """Replace each target linear layer by a :class:`LowRankLinear`; return them by module path.

    ``fused`` (module path -> (up, down)) is a LoRA added to the target weights first (URAE's 4K run
    starts from dev + the 2K LoRA); its other layers are the caller's to fuse (:func:`fuse_lora`).
    ``lora``: A ~ N(0, 1/r^2) (seeded), B = 0, so the model starts unchanged.
    ``minor_components``: SVD split of the (fused) weight; base <- major part, (B, A) <- the r
    smallest singular components split by sqrt(S); scale is 1 and base + B A equals W at init. Fuse
    and split are ONE float64 computation on the unrounded sum: only the major part is rounded, to
    the weight's dtype; B and A are float32. ``stored`` (module path -> weight) gives a target's
    weight at the precision it is stored in, when the model was loaded rounded (a float32 base
    trained in bf16): the split then starts from it.
    """
    fused = fused or {}
    stored = stored or {}
    generator = torch.Generator().manual_seed(seed)
    layers: dict[str, LowRankLinear] = {}
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = transformer.get_submodule(parent_path)
        base = getattr(parent, child)
        if not isinstance(base, nn.Linear):
            raise InvalidSpecError("targets", f"{path} is not a linear layer")
        if rank > min(base.weight.shape):
            raise InvalidSpecError("rank", f"{rank} exceeds the size of {path} {tuple(base.weight.shape)}")
        layer = LowRankLinear(base, rank, scale if kind == "lora" else 1.0)
        w64 = base.weight.to(torch.float64)
        if path in stored:
            if tuple(stored[path].shape) != tuple(w64.shape):
                raise InvalidSpecError("model_id", f"the stored weight of {path} does not match the loaded model")
            w64 = stored[path].to(w64.device, torch.float64)
        if path in fused:
            up, down = fused[path]
            if (up.shape[0], down.shape[1]) != tuple(w64.shape):
                raise InvalidSpecError("base_adapter", f"layer {path} does not match the weight shape {tuple(w64.shape)}")
            w64 = w64 + up.to(w64.device, torch.float64) @ down.to(w64.device, torch.float64)
        if kind == "lora":
            if path in fused:
                base.weight.copy_(w64.to(base.weight.dtype))
            init = torch.randn(layer.lora_A.shape, generator=generator) / rank
            layer.lora_A.copy_(init.to(layer.lora_A.device))
        else:
            major, b, a = svd_split(w64, rank)
            base.weight.copy_(major.to(base.weight.dtype))
            b, a = b.float(), a.float()
            layer.lora_B.copy_(b)
            layer.lora_A.copy_(a)
            layer.initial_B = b.clone()
            layer.initial_A = a.clone()
        base.requires_grad_(False)
        setattr(parent, child, layer)
        layers[path] = layer
    return layers


def trainable_state(layers: Mapping[str, LowRankLinear]) -> dict[str, torch.Tensor]:
    """The trainable tensors by name ``{path}.lora_A`` / ``{path}.lora_B`` (for checkpoints)."""
    state = {}
    for path, layer in layers.items():
        state[f"{path}.lora_A"] = layer.lora_A.detach().to("cpu").contiguous()
        state[f"{path}.lora_B"] = layer.lora_B.detach().to("cpu").contiguous()
    return state


@torch.no_grad()
def load_trainable_state(layers: Mapping[str, LowRankLinear], state: Mapping[str, torch.Tensor]) -> None:
    for path, layer in layers.items():
        layer.lora_A.copy_(state[f"{path}.lora_A"])
        layer.lora_B.copy_(state[f"{path}.lora_B"])


def export_factors(
    layers: Mapping[str, LowRankLinear], base_adapter: Mapping[str, LoraFactors] | None = None
) -> dict[str, LoraFactors]:
    """The whole adaptation as (up, down) per layer on the ORIGINAL base weights, in float32.

    A fused base adapter is part of it: trained layers stack it as extra rank, other layers keep it.
    """
    base_adapter = base_adapter or {}
    result: dict[str, LoraFactors] = {}
    for path, layer in layers.items():
        up, down = layer.factors()
        if path in base_adapter:
            extra_up, extra_down = base_adapter[path]
            up = torch.cat([up, extra_up.to(up.device, up.dtype)], dim=1)
            down = torch.cat([down, extra_down.to(down.device, down.dtype)], dim=0)
        result[path] = (up.float().cpu().contiguous(), down.float().cpu().contiguous())
    for path, (up, down) in base_adapter.items():
        if path not in result:
            result[path] = (up.float().cpu().contiguous(), down.float().cpu().contiguous())
    return result
