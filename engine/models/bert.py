"""BERT / XLM-RoBERTa encoder (cross-encoders and embedders), packed varlen.

One implementation for BertModel, BertForSequenceClassification,
XLMRobertaModel and XLMRobertaForSequenceClassification (the registry maps the
aliases here). Post-LayerNorm layers, learned absolute positions, token types,
bidirectional attention over packed sequences: no padding anywhere.

Reads top-down: Embeddings -> SelfAttention -> AddNorm -> Attention ->
Intermediate -> Layer -> Model. Module names mirror the checkpoints
(``encoder.layer.N.attention.self.query`` ...), so the only mapping is the qkv
fusion. Classification and pooling weights (``pooler.*``, ``classifier.*``)
belong to the heads (engine/models/heads.py), which read them from the checkpoint.
"""
import dataclasses
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from engine.context import BatchContext
from engine.models.base import EngineModel
from engine.models.layers import (
    Attention,
    LayerNorm,
    Linear,
    MergedLinear,
    VocabEmbedding,
)

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),  # erf, as in the original BERT
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


class BertEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, max_positions: int, type_vocab_size: int, eps: float):
        super().__init__()
        self.word_embeddings = VocabEmbedding(vocab_size, hidden_size)
        self.position_embeddings = VocabEmbedding(max_positions, hidden_size)
        self.token_type_embeddings = VocabEmbedding(type_vocab_size, hidden_size)
        self.LayerNorm = LayerNorm(hidden_size, eps)

    def forward(self, input_ids, positions, token_type_ids: Optional[torch.Tensor]) -> torch.Tensor:
        # input_ids, positions, token_type_ids: [T]; the sum order follows transformers.
        x = self.word_embeddings(input_ids)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]  # all segment 0: no gather
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(positions)
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    """Fused qkv projection and bidirectional varlen attention (checkpoint: ``attention.self``)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_heads})")
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = MergedLinear(hidden_size, {"q": hidden_size, "k": hidden_size, "v": hidden_size}, bias=True)
        self.attn = Attention(num_heads, num_heads, self.head_dim, self.scale, causal=False)

    def forward(self, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).view(t, 3, self.num_heads, self.head_dim).unbind(1)  # each [T, nh, hd]
        o = self.attn(q, k, v, ctx)  # [T, nh, hd]
        return o.reshape(t, -1)


class BertAddNorm(nn.Module):
    """LayerNorm(dense(x) + residual): BERT's post-norm (``attention.output`` and ``output``)."""

    def __init__(self, in_features: int, hidden_size: int, eps: float):
        super().__init__()
        self.dense = Linear(in_features, hidden_size, bias=True)
        self.LayerNorm = LayerNorm(hidden_size, eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x), residual)


class BertAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, eps: float):
        super().__init__()
        self.self = BertSelfAttention(hidden_size, num_heads)
        self.output = BertAddNorm(hidden_size, hidden_size, eps)

    def forward(self, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        return self.output(self.self(x, ctx), x)


class BertIntermediate(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str):
        super().__init__()
        if act not in _ACTIVATIONS:
            raise NotImplementedError(f"hidden_act {act!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
        self.dense = Linear(hidden_size, intermediate_size, bias=True)
        self.act = _ACTIVATIONS[act]
        self.fusable_activation = act  # engine/models/cpu_linear.py's packed CPU linear fuses it into the GEMM
        self.feeds_ffn_down = True  # its output is read by the FFN's down-projection alone (int8: bf16 rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        eps = cfg.layer_norm_eps
        self.attention = BertAttention(cfg.hidden_size, cfg.num_attention_heads, eps)
        self.intermediate = BertIntermediate(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.output = BertAddNorm(cfg.intermediate_size, cfg.hidden_size, eps)
        self.output.dense.ffn_down = True  # the FFN's down-projection (int8 keeps it in float: cpu_linear.py)

    def forward(self, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        x = self.attention(x, ctx)
        return self.output(self.intermediate(x), x)


PAD_CHUNK = 64  # padding rows attend in chunks of this many (linear cost)


def pad_rows(input_ids, positions, types, ctx: BatchContext, m: int):
    """The batch padded to ``m`` token rows, for the layers: pad rows are token 0 at position 0 and form
    extra sequences of at most PAD_CHUNK rows that only attend to each other, so every row of the real
    sequences comes out bitwise as without them (each op is per row or per sequence, and the packed
    GEMMs' rows do not depend on the row count: cpu_linear.bucket_rows); the caller drops them."""
    t = input_ids.shape[0]
    ends = torch.tensor([*range(t + PAD_CHUNK, m, PAD_CHUNK), m], dtype=ctx.cu_seqlens.dtype)
    padded = dataclasses.replace(ctx, cu_seqlens=torch.cat((ctx.cu_seqlens, ends.to(ctx.cu_seqlens.device))),
                                 max_seqlen=max(ctx.max_seqlen, min(PAD_CHUNK, m - t)), _packed={})
    zeros = input_ids.new_zeros(m - t)
    input_ids = torch.cat((input_ids, zeros))
    positions = torch.cat((positions, zeros.to(positions.dtype)))
    if types is not None:
        types = torch.cat((types, zeros.to(types.dtype)))
    return input_ids, positions, types, padded


def _is_roberta(cfg) -> bool:
    return getattr(cfg, "model_type", "bert") in ("roberta", "xlm-roberta", "camembert")


class BertModel(EngineModel):
    """BERT and XLM-RoBERTa encoders: ``forward(input_ids [T], ctx) -> (hidden [T, H], None)``.

    The output is the last layer's (already normed) hidden states; there is no
    residual stream to hand to the heads.
    """

    # checkpoint name -> (our fused parameter, shard id)
    packed_modules_mapping = {
        "query": ("qkv_proj", "q"),
        "key": ("qkv_proj", "k"),
        "value": ("qkv_proj", "v"),
    }
    # BertForSequenceClassification saves "bert.*", XLMRobertaFor* "roberta.*", the bare models neither.
    checkpoint_prefixes = ("bert.", "roberta.")
    pads_rows = True  # on CPU the forward pads its rows to a GEMM bucket once (pad_rows)
    # Buffers some checkpoints carry (old transformers saved them); nothing to load.
    ignored_checkpoint_names = ("embeddings.position_ids", "embeddings.token_type_ids")

    @classmethod
    def max_input_length(cls, cfg) -> int:
        """The longest sequence the learned positions allow (RoBERTa reserves padding_idx + 1 of them)."""
        n = int(cfg.max_position_embeddings)
        if _is_roberta(cfg):
            n -= int(getattr(cfg, "pad_token_id", 1)) + 1
        return n

    def __init__(self, cfg):
        super().__init__()
        kind = getattr(cfg, "position_embedding_type", "absolute") or "absolute"
        if kind != "absolute":
            raise NotImplementedError(f"position_embedding_type {kind!r} is not supported (only 'absolute')")
        if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
            raise NotImplementedError("BERT decoders / cross-attention are not supported")
        # RoBERTa numbers positions from padding_idx + 1 and gives pad tokens position padding_idx.
        self.pad_token_id = getattr(cfg, "pad_token_id", None) if _is_roberta(cfg) else None
        self.max_positions = self.max_input_length(cfg)
        self.hidden_size = cfg.hidden_size
        self.embeddings = BertEmbeddings(cfg.vocab_size, cfg.hidden_size, cfg.max_position_embeddings,
                                         getattr(cfg, "type_vocab_size", 2), cfg.layer_norm_eps)
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList([BertLayer(cfg) for _ in range(cfg.num_hidden_layers)])})

    def positions(self, input_ids: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        if self.pad_token_id is None:
            return ctx.positions
        # transformers' create_position_ids_from_input_ids, per packed sequence and without a
        # host sync: pad + (number of non-pad tokens up to and including this one), pad for pads.
        pad = self.pad_token_id
        real = (input_ids != pad).long()
        seen = torch.cumsum(real, 0)  # [T], global count
        start = torch.arange(input_ids.shape[0], device=input_ids.device) - ctx.positions  # first token of my sequence
        before = seen[start] - real[start]  # count before my sequence began
        return (seen - before) * real + pad

    def forward(self, input_ids: torch.Tensor, ctx: BatchContext) -> Tuple[torch.Tensor, None]:
        # input_ids: [T] -> hidden [T, H]
        if ctx.max_seqlen > self.max_positions:
            raise ValueError(f"a sequence of {ctx.max_seqlen} tokens exceeds this model's "
                             f"{self.max_positions} positions; truncate the input")
        positions, types = self.positions(input_ids, ctx), ctx.token_type_ids
        t = input_ids.shape[0]
        m = t if self.row_bucket is None else self.row_bucket(t)
        if m != t:  # CPU packed linears: pad once here, not at every linear (see pad_rows)
            input_ids, positions, types, ctx = pad_rows(input_ids, positions, types, ctx, m)
        x = self.embeddings(input_ids, positions, types)
        for layer in self.encoder["layer"]:
            x = layer(x, ctx)
        return x[:t], None
