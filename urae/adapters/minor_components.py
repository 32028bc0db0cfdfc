"""URAE minor-component adaptation: SVD split of a weight and its exact export as a plain LoRA.

URAE's 4K adapter tunes the r smallest singular components of each target weight. With
W = U S V^T, the frozen base keeps W minus those components and the trainable pair starts at
B0 = U[:, -r:] sqrt(S_min), A0 = sqrt(S_min) V^T[-r:], so that base + B0 A0 == W at init. After
training, the effective weight is W - B0 A0 + B A; on the ORIGINAL weights that is the plain LoRA
delta B A - B0 A0 = [B | -B0] [A; A0] (plus any LoRA fused into W before the split).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from urae.errors import BaseModelMismatchError, InvalidSpecError, RankMismatchError

# FLUX.1 [dev] and [schnell]: 19 double-stream and 38 single-stream blocks.
FLUX_DOUBLE_BLOCKS = 19
FLUX_SINGLE_BLOCKS = 38


def flux_minor_component_targets(num_double: int, num_single: int) -> list[str]:
    """Module paths URAE tunes: image-stream to_q/k/v of every block, to_out.0 of the double blocks."""
    targets = [
        f"transformer_blocks.{i}.attn.{name}"
        for i in range(num_double)
        for name in ("to_q", "to_k", "to_v", "to_out.0")
    ]
    targets += [
        f"single_transformer_blocks.{i}.attn.{name}"
        for i in range(num_single)
        for name in ("to_q", "to_k", "to_v")
    ]
    return targets


# The 190 matrices of the real model (19 x 4 + 38 x 3).
URAE_4K_TARGETS: list[str] = flux_minor_component_targets(FLUX_DOUBLE_BLOCKS, FLUX_SINGLE_BLOCKS)


def minor_component_targets(transformer: nn.Module) -> list[str]:
    """The URAE target module paths of this FLUX transformer (any depth)."""
    num_double = len(getattr(transformer, "transformer_blocks", ()))
    num_single = len(getattr(transformer, "single_transformer_blocks", ()))
    return flux_minor_component_targets(num_double, num_single)


def svd_split(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split W (out x in) into (major, B, A) with major + B @ A == W.

    B @ A holds the ``rank`` smallest singular components: B = U[:, -r:] * sqrt(S_min) (out x r),
    A = sqrt(S_min)[:, None] * Vh[-r:] (r x in). The SVD runs in float64; results have W's dtype.
    """
    if weight.dim() != 2:
        raise InvalidSpecError("weight", f"must be a matrix, got shape {tuple(weight.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= min(weight.shape):
        raise InvalidSpecError(
            "rank", f"{rank!r} is outside 1..{min(weight.shape)} for shape {tuple(weight.shape)}"
        )
    w64 = weight.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(w64, full_matrices=False)
    root = s[-rank:].sqrt()
    b = u[:, -rank:] * root
    a = root[:, None] * vh[-rank:]
    major = w64 - b @ a
    return major.to(weight.dtype), b.to(weight.dtype), a.to(weight.dtype)


def difference_lora(
    B: torch.Tensor,
    A: torch.Tensor,
    B0: torch.Tensor,
    A0: torch.Tensor,
    extra: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with up @ down == B @ A - B0 @ A0 (+ extra_up @ extra_down); rank 2r (+ r_extra).

    Stacking the factors instead of multiplying them out keeps the result exact and low-rank.
    """
    ups = [B, -B0]
    downs = [A, A0]
    if extra is not None:
        ups.append(extra[0])
        downs.append(extra[1])
    for up, down in zip(ups, downs, strict=True):
        if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0]:
            raise RankMismatchError(
                f"factor shapes {tuple(up.shape)} and {tuple(down.shape)} do not multiply (up is out x r, down r x in)"
            )
        if up.shape[0] != B.shape[0] or down.shape[1] != A.shape[1]:
            raise RankMismatchError(
                f"factors of shape {tuple(up.shape)} x {tuple(down.shape)} do not match the "
                f"{B.shape[0]} x {A.shape[1]} weight"
            )
    dtype = ups[0].dtype
    for t in ups + downs:
        dtype = torch.promote_types(dtype, t.dtype)
    up = torch.cat([u.to(dtype) for u in ups], dim=1)
    down = torch.cat([d.to(dtype) for d in downs], dim=0)
    return up, down


def linear_weight(transformer: nn.Module, module_path: str) -> torch.Tensor:
    """The base weight of a linear layer, looking through a LoRA wrapper if one is installed."""
    try:
        module = transformer.get_submodule(module_path)
    except AttributeError:
        raise BaseModelMismatchError(f"the transformer has no module {module_path}") from None
    module = getattr(module, "base_layer", module)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise BaseModelMismatchError(f"{module_path} is not a linear layer")
    return weight


@torch.no_grad()
def apply_minor_components(
    transformer: nn.Module,
    layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    base_lora: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> None:
    """Turn ``transformer`` IN PLACE into the URAE minor-component model.

    ``base_lora`` (module -> (B, A)) is fused first, as URAE's 4K adapter was trained on top of
    the fused 2K LoRA; then each target's r smallest components are replaced by the given (B, A).
    This is the reference form; serving uses the exact plain-LoRA export instead.
    """
    base_lora = base_lora or {}
    for module_path in sorted(set(layers) | set(base_lora)):
        weight = linear_weight(transformer, module_path)
        w64 = weight.to(torch.float64)
        if module_path in base_lora:
            up, down = base_lora[module_path]
            w64 = w64 + up.to(torch.float64) @ down.to(torch.float64)
        if module_path in layers:
            b, a = layers[module_path]
            major, _, _ = svd_split(w64, a.shape[0])
            w64 = major + b.to(torch.float64) @ a.to(torch.float64)
        weight.copy_(w64.to(weight.dtype))
