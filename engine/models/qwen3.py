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
from engine.models.base import EngineModel
from engine.models.layers import (
    Attention,
    GatedMLP,
    Linear,
    MergedLinear,
    RMSNorm,
    RotaryEmbedding,
    VocabEmbedding,
    head_dim,
    rope_parameters,
)


class Qwen3Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rms_norm_eps: float, attention_bias: bool = False, layer_idx: int = 0, last_layer: bool = False):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.eps = rms_norm_eps
        self.qkv_proj = MergedLinear(
            hidden_size, {"q": num_heads * head_dim, "k": num_kv_heads * head_dim, "v": num_kv_heads * head_dim},
            bias=attention_bias,
        )
        self.o_proj = Linear(num_heads * head_dim, hidden_size, bias=False)
        self.q_norm = RMSNorm(head_dim, rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, rms_norm_eps)
        self.attn = Attention(num_heads, num_kv_heads, head_dim, head_dim ** -0.5, layer_idx, causal=True,
                              last_layer=last_layer)

    def forward(self, x: torch.Tensor, ctx: BatchContext, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # Returns [T, H], or [n, H] for the last token of each sequence on a last-token-only last layer.
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) D]
        q, k, v = kernels.qk_norm_rope(
            qkv, self.q_norm.weight, self.k_norm.weight, cos, sin,
            self.num_heads, self.num_kv_heads, self.head_dim, self.eps,
        )
        o = self.attn(q, k, v, ctx)  # [T or n, Hq, D]
        return self.o_proj(o.reshape(o.shape[0], -1))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.self_attn = Qwen3Attention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim(cfg),
            cfg.rms_norm_eps, getattr(cfg, "attention_bias", False), layer_idx,
            last_layer=layer_idx == cfg.num_hidden_layers - 1,
        )
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, "silu")
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, ctx, cos, sin):
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, ctx, cos, sin)
        if x.shape[0] != residual.shape[0]:  # a last-token-only layer: only those rows go on, [n, H]
            residual = residual[ctx.last_index]
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


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
        rope = rope_parameters(cfg)
        if rope["rope_type"] != "default":
            raise NotImplementedError(f"rope type {rope['rope_type']!r} is not supported for Qwen3 yet")
        self.hidden_size = cfg.hidden_size
        self.rotary = RotaryEmbedding(head_dim(cfg), rope["rope_theta"])
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Qwen3DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, ctx: BatchContext) -> Tuple[torch.Tensor, torch.Tensor]:
        # input_ids: [T]; returns (last layer output [T, H], residual [T, H]); final norm(x + residual).
        # With ctx.last_only (heads that read the last token), the last layer computes attention output,
        # MLP and residual for those rows alone (every layer's K/V still covers all tokens): exact.
        cos, sin = self.rotary(ctx.positions)
        x = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, ctx, cos, sin)
        return x, residual
