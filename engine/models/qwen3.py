"""Qwen3 decoder (Qwen3-Reranker, Qwen3-Embedding and descendants), packed varlen.

Reads top-down: Attention -> MLP -> DecoderLayer -> Model. The model returns
the last layer's output and the residual stream *before* the final norm: heads
read a few rows (the last token of each sequence) and norm only those.
"""
from typing import Tuple

import torch
from torch import nn

import kernels
from engine.context import BatchContext
from engine.layers import Linear, MergedLinear, RMSNorm, VocabEmbedding
from engine.models.base import EngineModel


class Qwen3Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rms_norm_eps: float, rope_theta: float, attention_bias: bool = False, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        assert num_heads % num_kv_heads == 0, "GQA needs num_heads to be a multiple of num_kv_heads"
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.scale = head_dim ** -0.5
        self.qkv_proj = MergedLinear(
            hidden_size, {"q": num_heads * head_dim, "k": num_kv_heads * head_dim, "v": num_kv_heads * head_dim},
            bias=attention_bias,
        )
        self.o_proj = Linear(num_heads * head_dim, hidden_size, bias=False)
        self.q_norm = RMSNorm(head_dim, rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: BatchContext, cos: torch.Tensor, sin: torch.Tensor,
                last_only: bool = False) -> torch.Tensor:
        # Returns [T, H], or [n, H] for the last token of each sequence when last_only.
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) D]
        q, k, v = kernels.qk_norm_rope(
            qkv, self.q_norm.weight, self.k_norm.weight, cos, sin,
            self.num_heads, self.num_kv_heads, self.head_dim, self.eps,
        )
        if ctx.cache is not None:  # decoding (engine/generate.py): attend over the per-sequence KV cache
            return self.o_proj(ctx.cache.attend(self.layer_idx, q, k, v, self.scale).reshape(q.shape[0], -1))
        if ctx.capture_kv is not None:  # computing a shared prefix: keep its K/V
            ctx.capture_kv.append((k.clone(), v.clone()))
        prefix_k, prefix_v = ctx.prefix_kv(self.layer_idx)
        cu_q, max_q = ctx.cu_seqlens, ctx.max_seqlen
        if last_only:  # one query per sequence (its last token) over all its keys: bottom-right causal
            q = q[ctx.last_index]
            cu_q, max_q = ctx.cu_last, 1
        o = kernels.varlen_attention(
            q, k, v, cu_q, ctx.cu_seqlens, causal=True, scale=self.scale,
            prefix_k=prefix_k, prefix_v=prefix_v, cu_seqlens_p=ctx.cu_seqlens_p, prefix_index=ctx.prefix_index,
            max_seqlen_q=max_q, max_seqlen_k=ctx.max_seqlen,
        )  # [T or n, Hq, D]
        return self.o_proj(o.reshape(o.shape[0], -1))


class Qwen3MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, {0: intermediate_size, 1: intermediate_size})
        self.down_proj = Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.swiglu(self.gate_up_proj(x)))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.self_attn = Qwen3Attention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim,
            cfg.rms_norm_eps, rope_theta(cfg), getattr(cfg, "attention_bias", False), layer_idx,
        )
        self.mlp = Qwen3MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, ctx, cos, sin, last_only: bool = False):
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, ctx, cos, sin, last_only)
        if last_only:  # only the last token of each sequence goes on: [n, H]
            residual = residual[ctx.last_index]
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


def rope_theta(cfg) -> float:
    # transformers 5 moved rope_theta into rope_parameters; older configs keep it top-level.
    params = getattr(cfg, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(cfg, "rope_theta", 10000.0))


class Qwen3Model(EngineModel):
    supports_prefix = True
    supports_last_only = True  # forward(..) honours ctx.last_only
    supports_decode = True

    # checkpoint name -> (our fused parameter, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg):
        super().__init__()
        for key in ("rope_scaling", "rope_parameters"):
            scaling = getattr(cfg, key, None) or {}
            rope_type = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
            if rope_type not in ("default", None):
                raise NotImplementedError(f"{key} type {rope_type!r} is not supported for Qwen3 yet")
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.rope_theta = rope_theta(cfg)
        self.hidden_size = cfg.hidden_size
        self.rms_norm_eps = cfg.rms_norm_eps
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Qwen3DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, ctx: BatchContext) -> Tuple[torch.Tensor, torch.Tensor]:
        # input_ids: [T]; returns (last layer output [T, H], residual [T, H]); final norm(x + residual).
        cos, sin = kernels.rope_cos_sin(ctx.positions, self.head_dim, self.rope_theta)
        x = self.embed_tokens(input_ids)
        residual = None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            # Heads that read only the last token need the last layer's attention output, MLP and
            # residual for those rows alone (every layer's K/V still covers all tokens): exact.
            x, residual = layer(x, residual, ctx, cos, sin, last_only=ctx.last_only and i == last)
        return x, residual
