"""URAE's high-resolution attention settings on stock diffusers FLUX: RoPE NTK scaling and
proportional attention.

diffusers has no option for either. NTK scaling multiplies the rotary base ``theta`` of
``transformer.pos_embed`` (10,000 -> 100,000 at factor 10, on every axis). Proportional attention
replaces the softmax scale 1/sqrt(d) by sqrt(log_base(N) / d), N = text + image tokens, base = 4608
(512 text + 64x64 image tokens: FLUX's 1024 px training length), so the attention entropy at N tokens
matches the trained length. At N == base it equals the stock scale, and the processor reproduces the
stock output exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import (
    FluxAttention,
    FluxAttnProcessor,
    FluxTransformer2DModel,
    _get_qkv_projections,
)

BASE_THETA = 10_000
BASE_SEQUENCE_LENGTH = 4608


def proportional_scale(num_tokens: int, head_dim: int, base: int = BASE_SEQUENCE_LENGTH) -> float:
    """Softmax scale sqrt(log_base(N) / head_dim).

    Written as sqrt(log_base N) / sqrt(head_dim) so that N == base gives exactly the stock
    1 / sqrt(head_dim) (bit-identical attention at the trained length).
    """
    return math.sqrt(math.log(num_tokens) / math.log(base)) / math.sqrt(head_dim)


class ProportionalAttnProcessor(FluxAttnProcessor):
    """FLUX attention with the softmax scale chosen from the joint sequence length.

    Same projections, norms and rotary embedding as the stock processor; only the logit scale
    differs. Three modes, switched in place (never by replacing the processor, which would drop the
    attention backend and any parallel config set on it):

    - ``stock``: the stock scale 1/sqrt(d);
    - ``length``: the scale of this call's sequence length (eager use, e.g. training);
    - ``tensor``: the query is multiplied by ``logit_ratio``, a 0-dim tensor on the model's device that
      the caller fills with sqrt(log_base N) for the request's N. A compiled graph reads it as an input,
      so it is not specialised per sequence length, and under context parallelism N is the global
      length the caller knows, not the local shard's.
    """

    MODES = ("stock", "length", "tensor")

    def __init__(self, base: int = BASE_SEQUENCE_LENGTH, mode: str = "length"):
        super().__init__()
        self.base = base
        self.mode = mode
        self.logit_ratio: torch.Tensor | None = None

    def __call__(
        self,
        attn: FluxAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))

        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        scale: float | None = None
        if self.mode == "tensor" and self.logit_ratio is not None:
            # Scaling q by r scales every logit by r: the same as passing scale=r/sqrt(d).
            query = query * self.logit_ratio.to(query.dtype)
        elif self.mode == "length":
            # Single-stream blocks receive text + image already concatenated; double-stream blocks
            # were concatenated above. Either way dim 1 is the joint length N, or under context
            # parallelism this rank's equal share of it.
            num_tokens = query.shape[1] * context_parallel_shards(self._parallel_config)
            scale = proportional_scale(num_tokens, attn.head_dim, self.base)
        hidden_states = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            scale=scale,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]],
                dim=1,
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


def context_parallel_shards(parallel_config: object | None) -> int:
    """How many equal parts of the sequence the ranks hold (1 without context parallelism)."""
    cp = getattr(parallel_config, "context_parallel_config", None)
    return 1 if cp is None else int(cp.ring_degree) * int(cp.ulysses_degree)


def set_ntk_factor(transformer: FluxTransformer2DModel, factor: float) -> None:
    """Scale the rotary base of every axis: theta = 10,000 * factor."""
    transformer.pos_embed.theta = BASE_THETA * factor


def logit_ratio(num_tokens: int, base: int = BASE_SEQUENCE_LENGTH) -> float:
    """sqrt(log_base N): the proportional scale divided by the stock one (exactly 1.0 at N == base)."""
    return math.sqrt(math.log(num_tokens) / math.log(base))


def proportional_processors(transformer: FluxTransformer2DModel) -> list[ProportionalAttnProcessor]:
    """The proportional processor of every attention module, installed once where missing.

    A stock processor is converted by copying its attention backend and parallel config, so nothing
    chosen earlier is lost; afterwards the processors are only ever switched in place.
    """
    processors = []
    for module in transformer.modules():
        if not isinstance(module, FluxAttention):
            continue
        processor = module.processor
        if not isinstance(processor, ProportionalAttnProcessor):
            replacement = ProportionalAttnProcessor(mode="stock")
            replacement._attention_backend = getattr(processor, "_attention_backend", None)
            replacement._parallel_config = getattr(processor, "_parallel_config", None)
            module.set_processor(replacement)
            processor = replacement
        processors.append(processor)
    return processors


def set_proportional_attention(
    transformer: FluxTransformer2DModel, enabled: bool, num_tokens: int | None = None
) -> None:
    """Switch proportional attention on the existing processors.

    Without ``num_tokens`` the scale comes from each call's sequence length (eager use). With it, every
    processor reads one shared 0-dim tensor holding sqrt(log_base N) (1.0 when disabled): switching
    presets, sizes or on/off only writes that value, so a compiled transformer never recompiles.
    """
    processors = proportional_processors(transformer)
    if num_tokens is None:
        for processor in processors:
            processor.mode = "length" if enabled else "stock"
        return
    ratio = processors[0].logit_ratio if processors else None
    if ratio is None:
        device = next(transformer.parameters()).device
        ratio = torch.ones((), dtype=torch.float32, device=device)
    ratio.fill_(logit_ratio(num_tokens, processors[0].base) if enabled else 1.0)
    for processor in processors:
        processor.mode = "tensor"
        processor.logit_ratio = ratio


def apply_high_res_settings(
    transformer: FluxTransformer2DModel,
    ntk_factor: float = 1.0,
    proportional_attention: bool = False,
    num_tokens: int | None = None,
) -> None:
    """Apply both URAE attention settings (used for generation and for 4K training).

    ``num_tokens`` (text + image tokens of the request) selects the graph-stable tensor mode.
    """
    set_ntk_factor(transformer, ntk_factor)
    set_proportional_attention(transformer, proportional_attention, num_tokens)


# -- Attention backends of our own, registered with diffusers' dispatcher ---------------------------
#
# diffusers' ``sage`` backends need sageattention >= 2.1.1 (CUDA extensions built from source). The
# package index has sageattention 1.0.6: Triton kernels, INT8 Q/K with per-block scales and FP16 P.V,
# whose ``sageattn`` takes ``sm_scale``. ``INT8_BACKEND`` runs it behind diffusers' dispatcher.
#
# The backend calls one custom op, opaque to torch.compile, that runs the 8-bit kernel or an exact one
# (the load's own backend) as :data:`INT8_ATTENTION` says. Switching between them per request (the
# ``fast`` tier, and the exact tiers served by the same load) is a value read when the op runs, never
# a new compiled graph. The processors keep passing URAE's proportional scale (as ``scale`` or folded
# into the query); a backend that would drop it is refused (:func:`attention_scale_problem`).

INT8_BACKEND = "urae_int8"
# Relative error of an 8-bit attention output against the exact kernel's at FLUX's shape above which
# the 8-bit kernel is refused (SageAttention's INT8 QK measures ~1e-2 on real activations).
INT8_MAX_RELATIVE_ERROR = 0.05
# 2K's joint sequence (512 text + 128 x 128 image tokens), FLUX's 24 heads of 128: where kernels are probed.
FLUX_2K_ATTENTION_SHAPE = (1, 512 + 128 * 128, 24, 128)


def register_attention_backend(name: str, fn: Callable[..., torch.Tensor], constraints: list[Callable] | None = None) -> Any:
    """Add ``name`` to diffusers' ``AttentionBackendName`` and register ``fn`` for it; idempotent.

    Returns the enum member: ``transformer.set_attention_backend(name)`` and
    ``dispatch_attention_fn(..., backend=name)`` then find ``fn`` like any built-in backend.
    """
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    member = AttentionBackendName._value2member_map_.get(name)
    if member is None:
        # The enum is closed; a member is added the way Enum's own metaclass adds them.
        member = str.__new__(AttentionBackendName, name)
        member._name_ = name.upper()
        member._value_ = name
        member.__objclass__ = AttentionBackendName
        AttentionBackendName._value2member_map_[name] = member
        AttentionBackendName._member_map_[member._name_] = member
        AttentionBackendName._member_names_.append(member._name_)
    _AttentionBackendRegistry.register(member, constraints=constraints)(fn)
    return member


@dataclass
class Int8AttentionState:
    """What the 8-bit backend's op runs: ``kernel`` when ``enabled``, else the exact ``exact_backend``.

    Process-wide (the op is global): a generator sets both before each request (see
    ``urae.tiers.SpeedSetup.set_tier``), and a process serves one request at a time.
    """

    kernel: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None
    exact_backend: str = "native"
    enabled: bool = False

    def select(self, int8: bool, exact_backend: str) -> None:
        if str(exact_backend) == INT8_BACKEND:
            raise ValueError(f"the exact fallback of {INT8_BACKEND} must be another backend")
        if int8 and self.kernel is None:
            raise RuntimeError("no 8-bit attention kernel is installed (see urae.attention.install_int8_kernel)")
        self.enabled = int8
        self.exact_backend = exact_backend


INT8_ATTENTION = Int8AttentionState()


@torch.library.custom_op("urae::switchable_attention", mutates_args=())
def switchable_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention over (batch, tokens, heads, head_dim) inputs with the kernel :data:`INT8_ATTENTION` selects."""
    state = INT8_ATTENTION
    if state.enabled and state.kernel is not None:
        out = state.kernel(query, key, value, scale)
    else:
        out = dispatch_attention_fn(query, key, value, scale=scale, backend=state.exact_backend)
    # Contiguous whichever kernel ran, as the fake below says (compiled code relies on the strides).
    return out.to(query.dtype).contiguous()


@switchable_attention.register_fake
def _switchable_attention_fake(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    return query.new_empty(query.shape)


def _int8_backend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    _parallel_config: Any = None,
) -> torch.Tensor:
    if attn_mask is not None or dropout_p or is_causal or _parallel_config is not None:
        raise ValueError(f"the {INT8_BACKEND} attention backend takes no mask, dropout, causal mask or context parallelism")
    if scale is None:
        scale = query.shape[-1] ** -0.5
    return torch.ops.urae.switchable_attention(query, key, value, float(scale))


def register_int8_backend() -> Any:
    """Register :data:`INT8_BACKEND` with diffusers (idempotent); returns its enum member."""
    return register_attention_backend(INT8_BACKEND, _int8_backend)


def sage_int8_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """sageattention 1.0.6's ``sageattn`` (INT8 Q/K per block, FP16 P.V) on (batch, tokens, heads, dim).

    K is smoothed here, out of place (``smooth_k=True`` would subtract its mean from the caller's
    tensor): subtracting one vector from every key shifts each query's logits by a constant, which
    the softmax ignores.
    """
    from sageattention import sageattn

    key = key - key.mean(dim=1, keepdim=True)
    return sageattn(query.contiguous(), key.contiguous(), value.contiguous(), tensor_layout="NHD",
                    is_causal=False, sm_scale=scale, smooth_k=False)


def reference_int8_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """The arithmetic of :func:`sage_int8_kernel` in plain PyTorch (any device; holds the whole
    attention matrix, so small shapes only): Q x scale and smoothed K rounded to int8 per block of
    128 / 64 tokens, QK^T exact on those, softmax, P and V in float16."""

    def int8_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
        b, n, h, d = x.shape
        pad = (-n) % block
        blocks = torch.nn.functional.pad(x.float(), (0, 0, 0, 0, 0, pad)).reshape(b, -1, block, h, d)
        step = blocks.abs().amax(dim=(2, 4), keepdim=True).clamp_min(1e-12) / 127
        return ((blocks / step).round().clamp(-127, 127) * step).reshape(b, -1, h, d)[:, :n]

    q = int8_blocks(query.float() * scale, 128)
    k = int8_blocks(key.float() - key.float().mean(dim=1, keepdim=True), 64)
    probs = torch.einsum("bqhd,bkhd->bhqk", q, k).softmax(dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", probs.half().float(), value.half().float())
    return out.to(query.dtype)


def install_int8_kernel(kernel: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]) -> None:
    """The 8-bit kernel :data:`INT8_BACKEND` runs (registers the backend too)."""
    register_int8_backend()
    INT8_ATTENTION.kernel = kernel


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12))


def attention_scale_problem(backend: str, device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """Why ``backend`` would not apply URAE's proportional-attention scale, or None when it does.

    diffusers' dispatcher silently drops arguments a backend's function does not declare: a backend
    without ``scale`` is refused. One that declares it is run with a non-default scale and must land
    nearer the exact attention at that scale than at the default one.
    """
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    member = AttentionBackendName(backend)
    if "scale" not in _AttentionBackendRegistry._supported_arg_names.get(member, set()):
        return f"attention backend {backend!r} takes no scale: the proportional-attention scale would be dropped"
    gen = torch.Generator(device="cpu").manual_seed(0)
    # Peaked logits (std 2 inputs), so that the scale changes the output clearly.
    q, k, v = (2 * torch.randn(1, 256, 2, 128, generator=gen) for _ in range(3))
    wanted = 1.3 / math.sqrt(128)
    q_dev, k_dev, v_dev = (x.to(device=device, dtype=dtype) for x in (q, k, v))
    got = dispatch_attention_fn(q_dev, k_dev, v_dev, scale=wanted, backend=member).float().cpu()

    def exact(scale: float | None) -> torch.Tensor:
        q32, k32, v32 = (x.to(dtype).float().transpose(1, 2) for x in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(q32, k32, v32, scale=scale).transpose(1, 2)

    to_wanted, to_default = _relative_error(got, exact(wanted)), _relative_error(got, exact(None))
    if not to_wanted < 0.5 * to_default:
        return (f"attention backend {backend!r} ignores its scale argument (error {to_wanted:.3f} against "
                f"the requested scale, {to_default:.3f} against the default)")
    return None


def _cuda_seconds(fn: Callable[[], Any], repeat: int = 5) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / repeat


def int8_attention_problem(device: torch.device | str, exact_backend: str) -> str | None:
    """Why the 8-bit attention cannot serve on ``device``, or None when it can.

    Needs CUDA and sageattention (Triton); at FLUX's 2K attention shape the kernel must run, stay
    within :data:`INT8_MAX_RELATIVE_ERROR` of ``exact_backend``, and be faster than it (timed here, on
    this GPU); and it must honour the scale. Installs the kernel when it passes.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return f"8-bit attention (sageattention's Triton kernels) needs a CUDA GPU; this device is {device}"
    try:
        import sageattention  # noqa: F401
    except Exception as exc:  # ImportError, or triton failing to load
        return f"8-bit attention needs sageattention (pip install urae-serve[gpu]): {type(exc).__name__}: {exc}"
    try:
        install_int8_kernel(sage_int8_kernel)
        INT8_ATTENTION.select(int8=True, exact_backend=exact_backend)
        gen = torch.Generator(device="cpu").manual_seed(1)
        q, k, v = (torch.randn(FLUX_2K_ATTENTION_SHAPE, generator=gen).to(device, torch.bfloat16) for _ in range(3))
        got = dispatch_attention_fn(q, k, v, backend=INT8_BACKEND)
        expected = dispatch_attention_fn(q, k, v, backend=exact_backend)
        error = _relative_error(got, expected)
        if not error <= INT8_MAX_RELATIVE_ERROR:
            return f"8-bit attention is {error:.3f} from {exact_backend} at FLUX's 2K shape (limit {INT8_MAX_RELATIVE_ERROR})"
        int8_s = _cuda_seconds(lambda: dispatch_attention_fn(q, k, v, backend=INT8_BACKEND))
        exact_s = _cuda_seconds(lambda: dispatch_attention_fn(q, k, v, backend=exact_backend))
        if int8_s >= exact_s:
            return (f"8-bit attention is not faster than {exact_backend} here at FLUX's 2K shape "
                    f"({int8_s * 1000:.2f} ms vs {exact_s * 1000:.2f} ms)")
        problem = attention_scale_problem(INT8_BACKEND, device)
        if problem is not None:
            return problem
    except Exception as exc:  # a Triton compile or launch failure: serve exact attention instead
        return f"8-bit attention failed at FLUX's 2K shape: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    finally:
        INT8_ATTENTION.select(int8=False, exact_backend=exact_backend)
    return None
