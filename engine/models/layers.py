"""Leaf layers shared by the model files. They take plain scalars, never a config.

Fused projections (qkv, gate_up) are one weight whose shards are filled by the
loader through ``weight_loader(param, tensor, shard_id)``.
"""
from types import SimpleNamespace
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from engine.context import BatchContext


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    assert shard_id is None
    if param.shape != loaded.shape:
        raise ValueError(f"shape {tuple(loaded.shape)} != expected {tuple(param.shape)}")
    param.data.copy_(loaded)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = default_weight_loader
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim.

    ``shards`` maps a shard id (e.g. "q", "k", "v" or 0, 1) to its output size,
    in storage order.
    """

    def __init__(self, in_features: int, shards: Dict, bias: bool = False):
        super().__init__(in_features, sum(shards.values()), bias)
        self.shard_slices = {}
        off = 0
        for sid, size in shards.items():
            self.shard_slices[sid] = (off, size)
            off += size
        self.weight.weight_loader = self._load_shard
        if self.bias is not None:
            self.bias.weight_loader = self._load_shard
        self.weight.shard_ids = tuple(shards)
        if self.bias is not None:
            self.bias.shard_ids = tuple(shards)

    def _load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id) -> None:
        off, size = self.shard_slices[shard_id]
        dst = param.data.narrow(0, off, size)
        if dst.shape != loaded.shape:
            raise ValueError(f"shape {tuple(loaded.shape)} != expected {tuple(dst.shape)} (shard {shard_id!r})")
        dst.copy_(loaded)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * (offset + w), fp32 math; fused residual add."""

    def __init__(self, hidden_size: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        out, res = kernels.rms_norm(x, self.weight, self.eps, residual=residual, offset=self.offset)
        return out if residual is None else (out, res)


class LayerNorm(nn.Module):
    """LayerNorm(x [+ residual]) * weight + bias (BERT/XLM-R post-norm, Qwen3-VL's vision tower): one
    fused kernel on CPU (csrc/), statistics in fp32. x ``[..., H]``."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.weight.weight_loader = self.bias.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() == 2:
            return kernels.layer_norm(x, self.weight, self.bias, self.eps, residual=residual)
        rows = x.reshape(-1, x.shape[-1])  # the kernel takes rows [T, H]
        res = None if residual is None else residual.reshape(-1, x.shape[-1])
        return kernels.layer_norm(rows, self.weight, self.bias, self.eps, residual=res).view(x.shape)


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


# --- config helpers ------------------------------------------------------------------------------

def text_config(cfg):
    """The text decoder's config: ``cfg.text_config`` for multimodal checkpoints, else ``cfg``."""
    nested = getattr(cfg, "text_config", None)
    if nested is None:
        return cfg
    return SimpleNamespace(**nested) if isinstance(nested, dict) else nested


def head_dim(cfg) -> int:
    """``head_dim``, or hidden_size / num_attention_heads where the config leaves it out."""
    given = getattr(cfg, "head_dim", None)
    if given:
        return given
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"hidden_size ({cfg.hidden_size}) is not a multiple of num_attention_heads "
                         f"({cfg.num_attention_heads}) and the config gives no head_dim")
    return cfg.hidden_size // cfg.num_attention_heads


def rope_parameters(cfg, layer_type: Optional[str] = None, theta_field: str = "rope_theta",
                    default_theta: float = 10000.0) -> dict:
    """The rope settings of a config (every family reads them here): transformers 5's
    ``rope_parameters``, else the older ``rope_scaling`` + the flat ``rope_theta`` /
    ``partial_rotary_factor``. ``rope_type`` is always set ("default" when none is given).

    ``layer_type``: configs with one rope per attention type (T5Gemma2's full and sliding layers),
    whose ``rope_parameters`` maps each type to its settings; the older layout keeps the full layers'
    scaling in ``rope_scaling`` and each type's theta in its own flat field (``theta_field``)."""
    params = getattr(cfg, "rope_parameters", None)
    if layer_type is not None:
        params = params.get(layer_type) if isinstance(params, dict) else None
        if params is None and layer_type != "full_attention":
            params = {}  # rope_scaling is the full-attention layers'
    if not isinstance(params, dict):
        params = getattr(cfg, "rope_scaling", None) or {}
    params = dict(params)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", float(getattr(cfg, theta_field, None) or default_theta))
    if getattr(cfg, "partial_rotary_factor", None) is not None:
        params.setdefault("partial_rotary_factor", cfg.partial_rotary_factor)
    return params


# --- rotary embedding, MLP, attention ------------------------------------------------------------

class RotaryEmbedding(nn.Module):
    """cos/sin ``[T, dim // 2]`` fp32 of integer positions, rotate-half convention; a linear
    ``factor`` divides the frequencies (transformers' "linear" rope type)."""

    def __init__(self, dim: int, theta: float, factor: float = 1.0):
        super().__init__()
        self.dim, self.theta, self.factor = dim, float(theta), float(factor)

    def forward(self, positions: torch.Tensor):
        if self.factor == 1.0:
            return kernels.rope_cos_sin(positions, self.dim, self.theta)
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=positions.device).float() / self.dim
        inv_freq = 1.0 / (self.theta ** exponents) / self.factor  # as transformers scales it
        freqs = positions.float()[:, None] * inv_freq[None, :]
        return freqs.cos(), freqs.sin()


_GATE_ACTIVATIONS = ("silu", "gelu_tanh")


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with one fused gate_up projection; ``act`` is silu (SwiGLU,
    one fused kernel) or gelu_tanh (GeGLU)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu", bias: bool = False):
        super().__init__()
        if act not in _GATE_ACTIVATIONS:
            raise NotImplementedError(f"gated MLP activation {act!r} is not supported; supported: {_GATE_ACTIVATIONS}")
        self.act = act
        self.gate_up_proj = MergedLinear(hidden_size, {0: intermediate_size, 1: intermediate_size}, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act == "silu":
            return self.down_proj(kernels.swiglu(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Attention(nn.Module):
    """Attention of packed queries over their keys: the only code that reads the batch context's modes.

    - decode (``ctx.cache``): one new token per sequence, attending over its KV cache;
    - capture (``ctx.capture_kv``): a shared prefix (or a decode prefill) keeps this layer's K/V;
    - prefix (``ctx.prefixes``): each sequence also attends to its shared prefix's cached K/V;
    - last-token-only (``ctx.last_only``, on the model's last layer): queries are the last rows;
    - window / cross (``window`` set; ``ctx.cross``): sliding windows and paged cross K/V
      (encoder-decoder), through the paged kernel; ``cross_kv`` projects cached states.
    Takes q ``[T, Hq, D]`` and k, v ``[T, Hkv, D]``; returns ``[T or n, Hq, D]``.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, layer_idx: int = 0,
                 causal: bool = True, window: Optional[Tuple[Optional[int], Optional[int]]] = None,
                 last_layer: bool = False, cross_kv=None):
        super().__init__()
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads "
                             f"({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.layer_idx, self.causal = scale, layer_idx, causal
        self.window, self.last_layer = window, last_layer
        self._cross_kv = cross_kv

    def cross_kv(self, states: torch.Tensor):
        return self._cross_kv(states)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        if ctx.cache is not None:  # decoding: attend over the per-sequence KV cache
            return ctx.cache.attend(self.layer_idx, q, k, v, self.scale)
        if ctx.capture_kv is not None:  # computing a shared prefix (or a decode prefill): keep K/V
            ctx.capture_kv.append((k, v))
        if self.window is not None:
            extra = {}
            if ctx.cross is not None:
                k_cache, v_cache = ctx.cross.kv(self)  # [blocks, page, Hkv, D] each
                extra = dict(k_cache=k_cache, v_cache=v_cache, block_tables=ctx.cross.block_tables,
                             cross_lens=ctx.cross.cross_lens)
            left, right = self.window
            return kernels.paged_attention(q, k, v, ctx.cu_seqlens, scale=self.scale, window_left=left,
                                           window_right=right, max_seqlen=ctx.max_seqlen, **extra)
        prefix_k, prefix_v = ctx.prefix_kv(self.layer_idx)
        cu_q, max_q = ctx.cu_seqlens, ctx.max_seqlen
        if self.last_layer and ctx.last_only:  # one query per sequence (its last token): bottom-right causal
            q = q[ctx.last_index]
            cu_q, max_q = ctx.cu_last, 1
        return kernels.varlen_attention(
            q, k, v, cu_q, ctx.cu_seqlens, causal=self.causal, scale=self.scale,
            prefix_k=prefix_k, prefix_v=prefix_v, cu_seqlens_p=ctx.cu_seqlens_p, prefix_index=ctx.prefix_index,
            max_seqlen_q=max_q, max_seqlen_k=ctx.max_seqlen,
        )
