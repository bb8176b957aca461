"""Greedy decoding on the engine thread: the decode cache, prefill and one decode step.

Scoring needs no decoding. On request, the documents that pass a score threshold
are decoded, as steps of the engine loop:
  1. prefill: each prompt's tail (document + template suffix) runs behind the query's
     cached prefix (PrefixCache), capturing every attention layer's K/V and every
     DeltaNet layer's final conv and recurrent states; the last position's logits give
     the first token; the rows join the running decode batch. For ``rank(return_evidence)``
     this is the scoring forward itself (``prefill_forward``, then the yes/no head): only
     the rows kept get a DecodeCache (``build_cache``);
  2. decode: one token for every running row of every generating request per step
     (continuous batching). Attention layers write into and attend over a
     preallocated per-row KV cache ``[n, Hkv, capacity, D]`` (static buffers,
     gpt-fast style); DeltaNet layers step their states. A row leaves the batch at
     ``<|im_end|>`` (or ``<|endoftext|>``) or after ``max_new_tokens``.
The LM head is the full vocabulary at one position per row and step: the tied
embedding, or ``lm_head.weight`` read from the checkpoint on first use.
"""
from typing import List

import torch
import torch.nn.functional as F

import kernels
from engine.context import BatchContext
from engine.models.layers import Attention
from engine.weights import checkpoint_index, read_tensor


class DecodeCache:
    """Per-sequence decoding state, read and written by the layers through ``ctx.cache``."""

    def __init__(self, keys: List[torch.Tensor], values: List[torch.Tensor], lens: torch.Tensor,
                 conv: List[torch.Tensor], recurrent: List[torch.Tensor]):
        self.keys, self.values = keys, values  # per attention layer [n, Hkv, capacity, D]
        self.lens = lens  # [n] int64: filled positions = the next token's position
        self.conv, self.recurrent = conv, recurrent  # per DeltaNet layer [n, C, K-1], [n, Hv, Dk, Dv] fp32
        self._mask = None

    @property
    def num_seqs(self) -> int:
        return self.lens.numel()

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        # q [n, Hq, D]; k, v [n, Hkv, D]: the new token, stored at position lens, then attention over 0..lens.
        rows = torch.arange(q.shape[0], device=q.device)
        kbuf, vbuf = self.keys[layer], self.values[layer]
        kbuf[rows, :, self.lens] = k
        vbuf[rows, :, self.lens] = v
        if self._mask is None:
            cols = torch.arange(kbuf.shape[2], device=q.device)
            self._mask = (cols[None, :] <= self.lens[:, None])[:, None, None, :]  # [n, 1, 1, capacity]
        o = F.scaled_dot_product_attention(q[:, :, None], kbuf, vbuf, attn_mask=self._mask, scale=scale,
                                           enable_gqa=q.shape[1] != kbuf.shape[1])
        return o[:, :, 0]  # [n, Hq, D]

    def linear_state(self, layer: int):
        index = torch.arange(self.num_seqs, dtype=torch.int32, device=self.lens.device)
        return self.conv[layer], self.recurrent[layer], index

    def update_linear(self, layer: int, conv: torch.Tensor, recurrent: torch.Tensor) -> None:
        self.conv[layer], self.recurrent[layer] = conv, recurrent

    def advance(self) -> None:
        self.lens = self.lens + 1
        self._mask = None

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def extend(self, other: "DecodeCache") -> "DecodeCache":
        """Append ``other``'s rows (continuous batching); both padded to the larger capacity."""
        cap = max(self.capacity, other.capacity)

        def pad(t):
            return t if t.shape[2] == cap else F.pad(t, (0, 0, 0, cap - t.shape[2]))

        for mine, theirs in ((self.keys, other.keys), (self.values, other.values)):
            for i in range(len(mine)):
                mine[i] = torch.cat((pad(mine[i]), pad(theirs[i])))
        for mine, theirs in ((self.conv, other.conv), (self.recurrent, other.recurrent)):
            for i in range(len(mine)):
                mine[i] = torch.cat((mine[i], theirs[i]))
        self.lens = torch.cat((self.lens, other.lens))
        self._mask = None
        return self

    def keep(self, rows: torch.Tensor) -> None:
        """Drop finished sequences: keep ``rows`` (in order)."""
        for group in (self.keys, self.values, self.conv, self.recurrent):
            for i, t in enumerate(group):
                group[i] = t.index_select(0, rows)
        self.lens = self.lens.index_select(0, rows)
        self._mask = None


def kv_bytes(model) -> "tuple[int, int]":
    """Decode-cache bytes per cached token (every attention layer's K and V) and per row (DeltaNet states)."""
    per_token = per_seq = 0
    size = model.embed_tokens.weight.element_size()
    for m in model.modules():
        if isinstance(m, Attention):
            per_token += 2 * m.num_kv_heads * m.head_dim * size
        per_seq += getattr(m, "decode_state_bytes", 0)  # recurrent layers (Gated DeltaNet)
    return per_token, per_seq


def load_lm_head(model, folder) -> torch.Tensor:
    """``[V, H]``: the checkpoint's lm_head, or the tied input embedding."""
    index = checkpoint_index(folder)
    name = next((n for n in ("lm_head.weight", "model.lm_head.weight") if n in index), None)
    w = model.embed_tokens.weight
    if name is None:  # tied (the yes/no head already checked that the config says so)
        return w
    return read_tensor(index[name], name).to(device=w.device, dtype=w.dtype)


def next_tokens(model, lm_head: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor,
                rows: torch.Tensor) -> torch.Tensor:
    """Greedy next token at ``rows`` (final norm, full-vocabulary logits, argmax): ``[n]`` int64."""
    norm = model.norm
    h, _ = kernels.rms_norm(hidden[rows], norm.weight, norm.eps, residual=residual[rows], offset=norm.offset)
    return F.linear(h, lm_head).float().argmax(-1)


def prefill_forward(model, seqs, prefix, device: torch.device, last_only: bool = False):
    """Run the prompts' tails behind ``prefix`` (a PrefixKV or None), capturing every attention layer's K/V
    and every DeltaNet layer's final states: ``(hidden, residual, ctx)``. ``last_only``: the last layer
    for the last rows alone, as scoring runs it (the K/V still cover every token)."""
    n = len(seqs)
    ids, ctx = model.plan(list(seqs), device, [prefix] if prefix is not None else None,
                          [0] * n if prefix is not None else None)
    ctx.capture_kv, ctx.capture_state = [], []
    if last_only:
        ctx.last_only = True
        ctx.cu_last = torch.arange(n + 1, dtype=torch.int32, device=device)
    hidden, residual = model(ids, ctx)
    if last_only:  # the model returned the last rows only
        ctx.last_index = torch.arange(n, device=device)
    return hidden, residual, ctx


def build_cache(ctx, prefix, capacity: int, device: torch.device, rows=None) -> DecodeCache:
    """The DecodeCache of a prefill's sequences ``rows`` (all when None), in that order, from the K/V and
    states ``prefill_forward`` captured; the other sequences' are not kept."""
    n = ctx.num_seqs
    rows = list(range(n)) if rows is None else list(rows)
    p = prefix.num_tokens if prefix is not None else 0
    lens = kernels.to_device(ctx.seq_lens, torch.int64, device)
    seq_of = torch.repeat_interleave(torch.arange(n, device=device), lens)
    cols = ctx.positions  # a token's slot in the cache is its position (after the prefix)
    sel = None
    if len(rows) != n:  # the kept sequences' tokens, renumbered 0..len(rows)-1
        new = torch.full((n,), -1, dtype=torch.int64, device=device)
        new[kernels.to_device(rows, torch.int64, device)] = torch.arange(len(rows), device=device)
        seq_of = new[seq_of]
        sel = seq_of >= 0
        seq_of, cols = seq_of[sel], cols[sel]
    index = kernels.to_device(rows, torch.int64, device)
    m = len(rows)
    keys, values = [], []
    for layer, (k, v) in enumerate(ctx.capture_kv):  # k, v [T, Hkv, D]
        if sel is not None:
            k, v = k[sel], v[sel]
        kb = k.new_zeros(m, k.shape[1], capacity, k.shape[2])
        vb = torch.zeros_like(kb)
        if prefix is not None:
            kb[:, :, :p] = prefix.k[layer].transpose(0, 1)[None]
            vb[:, :, :p] = prefix.v[layer].transpose(0, 1)[None]
        kb[seq_of, :, cols] = k
        vb[seq_of, :, cols] = v
        keys.append(kb)
        values.append(vb)
    conv = [c if m == n else c.index_select(0, index) for c, _ in ctx.capture_state]
    recurrent = [s if m == n else s.index_select(0, index) for _, s in ctx.capture_state]
    return DecodeCache(keys, values, lens.index_select(0, index) + p, conv, recurrent)


def prefill(model, lm_head: torch.Tensor, seqs, prefix, capacity: int, device: torch.device):
    """Run the prompts' tails behind ``prefix`` (a PrefixKV or None): first tokens and their DecodeCache."""
    hidden, residual, ctx = prefill_forward(model, seqs, prefix, device)
    first = next_tokens(model, lm_head, hidden, residual, ctx.last_index)
    return first, build_cache(ctx, prefix, capacity, device)


def decode_step(model, lm_head: torch.Tensor, cache: DecodeCache, tokens: torch.Tensor) -> torch.Tensor:
    """One token for each row of ``cache`` after ``tokens`` [n]: the next tokens [n]."""
    m = tokens.numel()
    cu = torch.arange(m + 1, dtype=torch.int32, device=tokens.device)
    ctx = BatchContext(cu_seqlens=cu, max_seqlen=1, positions=cache.lens.clone(),
                       last_index=torch.arange(m, device=tokens.device), seq_lens=[1] * m, cache=cache)
    hidden, residual = model(tokens, ctx)
    cache.advance()
    return next_tokens(model, lm_head, hidden, residual, ctx.last_index)
