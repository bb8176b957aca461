"""Qwen3.5 text decoder (Prism-Reranker): Gated DeltaNet and gated full attention, packed varlen.

Layers follow ``layer_types``: ``linear_attention`` (Gated DeltaNet) or
``full_attention``, each followed by a SwiGLU MLP; norms are ``x * (1 + w)``.
Reads top-down: GatedAttention -> GatedDeltaNet -> MLP -> DecoderLayer -> Model.
Like Qwen3Model it returns the last layer's output and the residual stream before
the final norm. Serves ``Qwen3_5ForCausalLM`` checkpoints and the text part of
``Qwen3_5ForConditionalGeneration`` ones (nested ``text_config``; the vision tower
and the MTP head are skipped).

Shared prefixes: attention layers read the prefix K/V as in Qwen3; DeltaNet layers
start every document's scan from the prefix's final conv and recurrent states
(exact: a causal scan's state after the prefix does not depend on what follows).
During decoding (``ctx.cache``, engine/core/decode.py) attention layers attend over the
per-sequence KV cache and DeltaNet layers step their states.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
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
    default_weight_loader,
    head_dim,
    rope_parameters,
    text_config,
)


def rope_settings(cfg) -> Tuple[float, float]:
    """(theta, partial_rotary_factor). Text tokens have equal t/h/w positions, so the
    interleaved M-RoPE sections reduce to plain RoPE over the rotary dims."""
    params = rope_parameters(cfg)
    if params["rope_type"] != "default":
        raise NotImplementedError(f"rope type {params['rope_type']!r} is not supported for Qwen3.5")
    return float(params["rope_theta"]), float(params.get("partial_rotary_factor", 0.25))


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [T, H, D]; cos/sin [T, R/2] fp32: rotate-half over the first R dims, the rest pass through.
    half = cos.shape[-1]
    xr = x[..., : 2 * half].float()
    x1, x2 = xr[..., :half], xr[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat(((x1 * c - x2 * s).to(x.dtype), (x2 * c + x1 * s).to(x.dtype), x[..., 2 * half:]), dim=-1)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x, gate [T, H, D]: w * norm(x) (in x's dtype, as transformers rounds it), then * silu(gate) in fp32.
    xf = x.float()
    y = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (y.float() * F.silu(gate.float())).to(x.dtype)


class Qwen3_5GatedAttention(nn.Module):
    """GQA with q_proj giving [q | gate] per head, (1 + w) q/k norms, partial RoPE, sigmoid(gate) before o_proj."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, rms_norm_eps: float,
                 kv_index: int, attention_bias: bool = False):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.sizes = [num_heads * head_dim * 2, num_kv_heads * head_dim, num_kv_heads * head_dim]
        self.qkv_proj = MergedLinear(hidden_size, dict(zip("qkv", self.sizes)), bias=attention_bias)
        self.o_proj = Linear(num_heads * head_dim, hidden_size, bias=attention_bias)
        self.q_norm = RMSNorm(head_dim, rms_norm_eps, offset=1.0)
        self.k_norm = RMSNorm(head_dim, rms_norm_eps, offset=1.0)
        # kv_index: this layer's slot among the attention layers (prefix K/V, KV cache).
        self.attn = Attention(num_heads, num_kv_heads, head_dim, head_dim ** -0.5, kv_index, causal=True)

    def forward(self, x: torch.Tensor, ctx: BatchContext, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n_tok, d = x.shape[0], self.head_dim
        qg, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        qg = qg.view(n_tok, self.num_heads, 2 * d)
        gate = qg[..., d:].reshape(n_tok, -1)
        q = apply_partial_rope(self.q_norm(qg[..., :d]), cos, sin)  # [T, Hq, D]
        k = apply_partial_rope(self.k_norm(k.view(n_tok, self.num_kv_heads, d)), cos, sin)  # [T, Hkv, D]
        v = v.view(n_tok, self.num_kv_heads, d)
        o = self.attn(q, k, v, ctx)  # [T, Hq, D]
        return self.o_proj(o.reshape(n_tok, -1) * torch.sigmoid(gate))


class DepthwiseConv1d(nn.Module):
    """The checkpoint's ``conv1d.weight [C, 1, K]`` (no bias); run by kernels.causal_conv1d."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader


class GatedRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.weight.weight_loader = default_weight_loader


class Qwen3_5GatedDeltaNet(nn.Module):
    """Gated DeltaNet: fused in_proj -> causal conv1d + SiLU -> gated delta rule -> gated RMSNorm -> out_proj."""

    def __init__(self, hidden_size: int, num_k_heads: int, num_v_heads: int, head_k_dim: int, head_v_dim: int,
                 conv_kernel: int, rms_norm_eps: float, lin_index: int):
        super().__init__()
        assert num_v_heads % num_k_heads == 0, "linear_num_value_heads must be a multiple of linear_num_key_heads"
        self.num_k_heads, self.num_v_heads = num_k_heads, num_v_heads
        self.head_k_dim, self.head_v_dim = head_k_dim, head_v_dim
        self.lin_index = lin_index  # this layer's slot among the DeltaNet layers (prefix states, decode states)
        self.key_dim, self.value_dim = num_k_heads * head_k_dim, num_v_heads * head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.sizes = [self.conv_dim, self.value_dim, num_v_heads, num_v_heads]
        self.in_proj = MergedLinear(hidden_size, dict(zip(("qkv", "z", "b", "a"), self.sizes)))
        self.conv1d = DepthwiseConv1d(self.conv_dim, conv_kernel)
        # Kept in fp32 whatever the model dtype (transformers upcasts them before use anyway).
        self.A_log = nn.Parameter(torch.empty(num_v_heads, dtype=torch.float32), requires_grad=False)
        self.dt_bias = nn.Parameter(torch.empty(num_v_heads, dtype=torch.float32), requires_grad=False)
        for p in (self.A_log, self.dt_bias):
            p.weight_loader = default_weight_loader
        self.norm = GatedRMSNorm(head_v_dim, rms_norm_eps)
        self.out_proj = Linear(self.value_dim, hidden_size)

    @property
    def decode_state_bytes(self) -> int:
        """Bytes of one sequence's decode state: the conv window and the fp32 recurrent state."""
        size = self.conv1d.weight.element_size()
        return (self.conv_dim * (self.conv1d.weight.shape[-1] - 1) * size
                + self.num_v_heads * self.head_k_dim * self.head_v_dim * 4)

    def _initial_states(self, ctx: BatchContext):
        if ctx.cache is not None:
            return ctx.cache.linear_state(self.lin_index)
        conv, ssm = ctx.prefix_state(self.lin_index)
        return conv, ssm, (ctx.prefix_index if conv is not None else None)

    def forward(self, x: torch.Tensor, ctx: BatchContext, plan) -> torch.Tensor:
        n_tok = x.shape[0]
        qkv, z, b, a = self.in_proj(x).split(self.sizes, dim=-1)
        conv_init, ssm_init, index = self._initial_states(ctx)
        keep = ctx.cache is not None or ctx.capture_state is not None
        mixed, conv_final = kernels.causal_conv1d(
            qkv, self.conv1d.weight.view(self.conv_dim, -1), ctx.cu_seqlens, initial_state=conv_init,
            state_index=index, activation="silu", output_final_state=keep, seq_of=plan.get("seq_of"),
        )  # [T, conv_dim]
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        beta = torch.sigmoid(b.float())  # [T, Hv]
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())  # [T, Hv], <= 0
        o, ssm_final = kernels.gated_delta_rule(
            q.view(n_tok, self.num_k_heads, self.head_k_dim), k.view(n_tok, self.num_k_heads, self.head_k_dim),
            v.view(n_tok, self.num_v_heads, self.head_v_dim), g, beta, ctx.cu_seqlens,
            initial_state=ssm_init, state_index=index, output_final_state=keep, use_qk_l2norm=True,
            max_seqlen=ctx.max_seqlen, plan=plan.get("chunks"),
        )  # [T, Hv, Dv]
        if ctx.cache is not None:
            ctx.cache.update_linear(self.lin_index, conv_final, ssm_final)
        elif ctx.capture_state is not None:
            ctx.capture_state.append((conv_final, ssm_final))
        o = gated_rms_norm(o, z.view(n_tok, self.num_v_heads, self.head_v_dim), self.norm.weight, self.norm.eps)
        return self.out_proj(o.reshape(n_tok, self.value_dim))


class Qwen3_5DecoderLayer(nn.Module):
    def __init__(self, cfg, layer_type: str, index: int):
        super().__init__()
        self.is_linear = layer_type == "linear_attention"
        if self.is_linear:
            self.linear_attn = Qwen3_5GatedDeltaNet(
                cfg.hidden_size, cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                cfg.linear_value_head_dim, getattr(cfg, "linear_conv_kernel_dim", 4), cfg.rms_norm_eps, index,
            )
        elif layer_type == "full_attention":
            self.self_attn = Qwen3_5GatedAttention(
                cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim(cfg), cfg.rms_norm_eps,
                index, getattr(cfg, "attention_bias", False),
            )
        else:
            raise NotImplementedError(f"Qwen3.5 layer type {layer_type!r} is not supported")
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, "silu")
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=1.0)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=1.0)

    def forward(self, x, residual, ctx, cos, sin, plan):
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.linear_attn(x, ctx, plan) if self.is_linear else self.self_attn(x, ctx, cos, sin)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


def layer_types(cfg):
    types = getattr(cfg, "layer_types", None)
    if types is None:  # transformers' default: every full_attention_interval-th layer is full attention
        every = getattr(cfg, "full_attention_interval", 4)
        types = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(cfg.num_hidden_layers)]
    return list(types)[: cfg.num_hidden_layers]


class Qwen3_5Model(EngineModel):
    supports_prefix = True
    supports_decode = True

    # checkpoint name -> (our fused parameter, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "in_proj_qkv": ("in_proj", "qkv"),
        "in_proj_z": ("in_proj", "z"),
        "in_proj_b": ("in_proj", "b"),
        "in_proj_a": ("in_proj", "a"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    # Qwen3_5ForConditionalGeneration nests the decoder under model.language_model.
    checkpoint_prefixes = ("model.language_model.", "model.")
    # The vision tower (model.visual.*) and the multi-token-prediction head are not used for text.
    ignored_checkpoint_prefixes = ("visual.", "mtp.")

    def __init__(self, cfg):
        super().__init__()
        cfg = text_config(cfg)
        theta, factor = rope_settings(cfg)
        self.rotary = RotaryEmbedding(int(head_dim(cfg) * factor), theta)
        self.hidden_size = cfg.hidden_size
        self.layer_types = layer_types(cfg)
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        counters = {"linear_attention": 0, "full_attention": 0}
        layers = []
        for t in self.layer_types:
            layers.append(Qwen3_5DecoderLayer(cfg, t, counters.get(t, 0)))
            counters[t] = counters.get(t, 0) + 1
        self.layers = nn.ModuleList(layers)
        self.num_attention_layers = counters["full_attention"]
        self.num_linear_layers = counters["linear_attention"]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=1.0)

    def forward(self, input_ids: torch.Tensor, ctx: BatchContext) -> Tuple[torch.Tensor, torch.Tensor]:
        # input_ids: [T]; returns (last layer output [T, H], residual [T, H]); final norm(x + residual).
        cos, sin = self.rotary(ctx.positions)
        x = self.embed_tokens(input_ids)
        plan = ctx.linear_plan if ctx.linear_plan is not None else self.linear_plan(ctx, x.device)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, ctx, cos, sin, plan)
        return x, residual

    def plan(self, seqs, device, prefixes=None, prefix_index=None, **extra):
        # Host work before the forward, so a compiled forward sees tensors, not Python lists.
        ids, ctx = super().plan(seqs, device, prefixes, prefix_index, **extra)
        ctx.linear_plan = self.linear_plan(ctx, device)
        return ids, ctx

    @staticmethod
    def linear_plan(ctx: BatchContext, device) -> dict:
        """Per-batch metadata of the Triton DeltaNet kernels, built once for all layers (none for
        the torch references)."""
        if not kernels.use_triton(device):
            return {}
        lens = kernels.to_device(ctx.seq_lens, torch.int64, device)
        seq_of = torch.repeat_interleave(torch.arange(len(ctx.seq_lens), dtype=torch.int32, device=device), lens,
                                         output_size=ctx.num_tokens)
        return {"chunks": kernels.chunk_plan(ctx.seq_lens, device), "seq_of": seq_of}
