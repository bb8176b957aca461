"""T5Gemma2 text encoder-decoder (KaLM-Reranker-V1), packed varlen.

Numerically as transformers' ``models/t5gemma2/modeling_t5gemma2.py``, text
only (vision-tower tensors in a checkpoint are skipped). Reads top-down:
Embedding -> Attention -> MLP -> Layer -> Stack -> Model.

- RMSNorm ``x * rsqrt(mean(x^2) + eps) * (1 + w)`` in fp32; sandwich norms
  ``x + post_norm(f(pre_norm(x)))`` around attention and MLP.
- Embeddings scaled by sqrt(hidden) (the scale cast to the weight dtype); the
  end-of-image token takes its own vector.
- q/k norms, then RoPE per layer type (full: theta 1e6, linear factor 8 in
  KaLM's config; sliding: theta 1e4); attention scale query_pre_attn_scalar^-0.5.
- Encoder: bidirectional; sliding layers see keys at offset d = q - k with
  0 <= d < (W+1)//2 or 0 < -d < W//2 + 1.
- Decoder merged attention: own keys (causal, window W on sliding layers) and
  cross keys ``k_norm(k_proj(H_enc))`` / ``v_proj(H_enc)`` (same weights, no
  RoPE), ONE softmax over both. Cross K/V come from a ``cross`` object holding
  the batch's block tables into a paged pool (see engine/core/passages.py).

Stacks return the last layer's output and the residual stream before the final
norm; the encoder applies its final norm, the decoder leaves it to the head.
"""
import math
from types import SimpleNamespace
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from engine.context import BatchContext
from kernels.host import to_device
from engine.models.base import EngineModel
from engine.models.layers import (
    Attention,
    GatedMLP,
    Linear,
    MergedLinear,
    RMSNorm,
    RotaryEmbedding,
    VocabEmbedding,
    rope_parameters,
)

# transformers' T5Gemma2TextConfig defaults, for keys a config.json leaves out.
_TEXT_DEFAULTS = dict(
    head_dim=256, query_pre_attn_scalar=256, sliding_window=4096, rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh", attention_bias=False, layer_types=None, rope_parameters=None,
    final_logit_softcapping=None, attn_logit_softcapping=None, tie_word_embeddings=True,
)
_DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}


def text_config(d: dict) -> SimpleNamespace:
    """An encoder's ``text_config`` or the decoder's dict, with transformers' defaults filled in."""
    cfg = SimpleNamespace(**{**_TEXT_DEFAULTS, **d})
    if cfg.layer_types is None:
        pattern = d.get("sliding_window_pattern", 6)
        cfg.layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                           for i in range(cfg.num_hidden_layers)]
    if cfg.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise NotImplementedError(f"T5Gemma2 activation {cfg.hidden_activation!r} is not supported")
    if cfg.attn_logit_softcapping is not None or cfg.final_logit_softcapping is not None:
        raise NotImplementedError("T5Gemma2 logit softcapping is not supported")
    return cfg


def rope_settings(cfg, layer_type: str) -> Tuple[float, float]:
    """(theta, linear factor) of a layer type; the sliding layers' older flat theta is
    ``rope_local_base_freq``."""
    field = "rope_theta" if layer_type == "full_attention" else "rope_local_base_freq"
    params = rope_parameters(cfg, layer_type, theta_field=field, default_theta=_DEFAULT_THETA[layer_type])
    theta, rope_type = float(params["rope_theta"]), params["rope_type"]
    if rope_type == "default":
        return theta, 1.0
    if rope_type == "linear":
        return theta, float(params["factor"])
    raise NotImplementedError(f"RoPE type {rope_type!r} ({layer_type}) is not supported for T5Gemma2")


class T5Gemma2Embedding(VocabEmbedding):
    def __init__(self, vocab_size: int, hidden_size: int, eoi_token_index: int):
        super().__init__(vocab_size, hidden_size)
        self.eoi_embedding = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.eoi_embedding.weight_loader = self.weight.weight_loader
        self.eoi_token_index = eoi_token_index
        self.register_buffer("scale", torch.tensor(math.sqrt(hidden_size), dtype=torch.float32), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.weight) * self.scale.to(self.weight.dtype)  # [T, H]
        return torch.where((ids == self.eoi_token_index)[:, None], self.eoi_embedding.to(x.dtype), x)


class T5Gemma2Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, eps: float,
                 scale: float, window: Tuple[Optional[int], Optional[int]], bias: bool = False, layer_idx: int = 0):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.eps, self.layer_idx = eps, layer_idx
        self.qkv_proj = MergedLinear(
            hidden_size, {"q": num_heads * head_dim, "k": num_kv_heads * head_dim, "v": num_kv_heads * head_dim},
            bias=bias,
        )
        self.qkv_proj.swappable = False  # cross_kv reads its weight rows: CPU packing/int8 leave it as is
        self.o_proj = Linear(num_heads * head_dim, hidden_size, bias=bias)
        self.q_norm = RMSNorm(head_dim, eps, offset=1.0)
        self.k_norm = RMSNorm(head_dim, eps, offset=1.0)
        # Windows and cross K/V go through the paged kernel; cross_kv projects cached encoder states.
        self.attn = Attention(num_heads, num_kv_heads, head_dim, scale, layer_idx, window=window,
                              cross_kv=self.cross_kv)

    def forward(self, x: torch.Tensor, ctx: BatchContext, cos, sin) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) D]
        # qk_norm_rope scales by w: hand it (1 + w) in fp32, the Gemma norm's factor.
        q, k, v = kernels.qk_norm_rope(
            qkv, self.q_norm.weight.float() + 1.0, self.k_norm.weight.float() + 1.0, cos, sin,
            self.num_heads, self.num_kv_heads, self.head_dim, self.eps,
        )
        o = self.attn(q, k, v, ctx)  # [T, Hq, D]; decoder: [self ; cross] keys, one softmax
        return self.o_proj(o.reshape(o.shape[0], -1))

    def cross_kv(self, states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Cross K/V of encoder states ``[N, H]``: k_norm(k_proj(x)) and v_proj(x), no RoPE;
        each ``[N, Hkv, D]``."""
        q_size = self.num_heads * self.head_dim
        bias = None if self.qkv_proj.bias is None else self.qkv_proj.bias[q_size:]
        kv = F.linear(states, self.qkv_proj.weight[q_size:], bias).view(-1, 2, self.num_kv_heads, self.head_dim)
        k, _ = kernels.rms_norm(kv[:, 0], self.k_norm.weight, self.eps, offset=1.0)
        return k, kv[:, 1]


class T5Gemma2Layer(nn.Module):
    def __init__(self, cfg, layer_idx: int, bidirectional: bool):
        super().__init__()
        self.layer_type = cfg.layer_types[layer_idx]
        w = cfg.sliding_window
        if self.layer_type == "sliding_attention":
            window = ((w + 1) // 2, w // 2 + 1) if bidirectional else (w, 1)
        else:
            window = (None, None) if bidirectional else (None, 1)
        self.self_attn = T5Gemma2Attention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps,
            cfg.query_pre_attn_scalar ** -0.5, window, cfg.attention_bias, layer_idx,
        )
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, "gelu_tanh")
        for name in ("pre_self_attn_layernorm", "post_self_attn_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=1.0))

    def forward(self, x, residual, ctx, cos, sin):
        # Returns (post-MLP branch, residual stream): the caller's next norm adds them.
        if residual is None:
            residual, h = x, self.pre_self_attn_layernorm(x)
        else:
            h, residual = self.pre_self_attn_layernorm(x, residual)
        h = self.post_self_attn_layernorm(self.self_attn(h, ctx, cos, sin))
        h, residual = self.pre_feedforward_layernorm(h, residual)
        return self.post_feedforward_layernorm(self.mlp(h)), residual


class T5Gemma2Stack(nn.Module):
    """The encoder or the decoder: embedding, layers, final norm."""

    def __init__(self, cfg, bidirectional: bool, embed_tokens: T5Gemma2Embedding):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.embed_tokens = embed_tokens
        self.layers = nn.ModuleList([T5Gemma2Layer(cfg, i, bidirectional) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=1.0)
        self.rotary = nn.ModuleDict({t: RotaryEmbedding(cfg.head_dim, *rope_settings(cfg, t))
                                     for t in sorted(set(cfg.layer_types))})

    def forward(self, input_ids: torch.Tensor, ctx: BatchContext):
        # input_ids: [T]; returns (last layer branch [T, H], residual [T, H]) before the final norm.
        # The decoder reads its prompts' cross K/V through ctx.cross (the Attention layer does).
        rope = {t: rot(ctx.positions) for t, rot in self.rotary.items()}
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, ctx, *rope[layer.layer_type])
        return x, residual


class T5Gemma2Model(EngineModel):
    """``encode`` passages (final-normed states) and ``decode`` prompts against their cross K/V."""

    is_encoder_decoder = True
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    checkpoint_prefixes = ("model.",)
    # Tied copies of the shared embedding, and the LM head (the yes/no head reads its rows).
    ignored_checkpoint_names = ("decoder.embed_tokens.weight", "decoder.embed_tokens.eoi_embedding",
                                "lm_head.out_proj.weight")
    ignored_checkpoint_prefixes = ("encoder.vision_tower.", "encoder.multi_modal_projector.")  # text only

    def __init__(self, cfg):
        super().__init__()
        enc = cfg.encoder.get("text_config", cfg.encoder) if isinstance(cfg.encoder, dict) else cfg.encoder
        enc, dec = text_config(dict(enc)), text_config(dict(cfg.decoder))
        if getattr(cfg, "tie_word_embeddings", True) is False:  # the decoder.embed_tokens copy would be ignored
            raise NotImplementedError("T5Gemma2 with untied embeddings is not supported")
        if enc.hidden_size != dec.hidden_size or enc.vocab_size != dec.vocab_size:
            raise ValueError("T5Gemma2 needs encoder and decoder of the same hidden and vocabulary size")
        eoi = getattr(cfg, "eoi_token_index", None)
        if eoi is None:
            eoi = (cfg.encoder or {}).get("eoi_token_index", 256_000)
        embed = T5Gemma2Embedding(enc.vocab_size, enc.hidden_size, eoi)
        self.encoder = T5Gemma2Stack(enc, bidirectional=True, embed_tokens=embed)
        self.decoder = T5Gemma2Stack(dec, bidirectional=False, embed_tokens=embed)  # shared, as transformers ties
        self.hidden_size = dec.hidden_size

    @property
    def norm(self) -> RMSNorm:
        """The decoder's final norm: what a head applies to the rows it reads."""
        return self.decoder.norm

    def encode(self, input_ids: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        """Final-normed encoder states ``[T, H]`` of packed passages."""
        x, residual = self.encoder(input_ids, ctx)
        out, _ = self.encoder.norm(x, residual)
        return out

    def plan(self, seqs, device, prefixes=None, prefix_index=None, passages=None, passage_cache=None,
             cache_kv: bool = False):
        """The default plan, plus the cross K/V of each prompt's passage: block tables into the pool."""
        ids, ctx = super().plan(seqs, device, prefixes, prefix_index)
        if passages is not None:
            ctx.cross = cross_plan(passages, passage_cache, cache_kv, device)
        return ids, ctx

    def forward(self, input_ids: torch.Tensor, ctx: BatchContext) -> Tuple[torch.Tensor, torch.Tensor]:
        """Packed decoder prompts attending to their passages' cross K/V (``ctx.cross``);
        (branch, residual) before the final norm."""
        return self.decoder(input_ids, ctx)


# -- the paged passage pool (engine.core.cache.PassageCache) as the decoder reads it --------------
class CrossKV:
    """The cross K/V a decoder batch reads: per-pair block tables into pages of cross rows."""

    def __init__(self, block_tables: torch.Tensor, cross_lens: torch.Tensor, pages, kv_pool=None):
        self.block_tables, self.cross_lens = block_tables, cross_lens  # [n, max_blocks] int32, [n] int32
        self._pages = pages  # states mode: [blocks, page, H] of the batch's passages
        self._kv_pool = kv_pool  # K/V mode: the whole pool [blocks, layers, 2, page, Hkv, D]

    def kv(self, attn):
        if self._kv_pool is not None:
            layer = self._kv_pool[:, attn.layer_idx]
            return layer[:, 0], layer[:, 1]  # [blocks, page, Hkv, D] views, no copy
        nb, page, hidden = self._pages.shape
        k, v = attn.cross_kv(self._pages.view(nb * page, hidden))
        return k.view(nb, page, *k.shape[1:]), v.view(nb, page, *v.shape[1:])


def cross_plan(per_pair: Sequence, cache, cache_kv: bool, device) -> CrossKV:
    """The cross K/V a decoder batch reads: each pair's block table into the pool. ``per_pair``: the
    PassageEntry of each pair; ``cache``: the PassageCache (its pool and block size)."""
    width = max(len(e.blocks) for e in per_pair)
    lens = to_device([e.num_tokens for e in per_pair], torch.int32, device)
    if cache_kv:
        table = [e.blocks + [0] * (width - len(e.blocks)) for e in per_pair]
        return CrossKV(to_device(table, torch.int32, device), lens, None, kv_pool=cache.pool)
    # States mode: gather the batch's distinct blocks once; tables index that gathered set.
    local: Dict[int, int] = {}
    for e in per_pair:
        for b in e.blocks:
            local.setdefault(b, len(local))
    table = [[local[b] for b in e.blocks] + [0] * (width - len(e.blocks)) for e in per_pair]
    pages = cache.pool[to_device(list(local), torch.int64, device)]  # [nb, page, H]
    return CrossKV(to_device(table, torch.int32, device), lens, pages)
