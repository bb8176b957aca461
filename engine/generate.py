"""Greedy decoding for yes/no causal rerankers: Prism-Reranker's contribution and evidence.

Scoring needs no decoding. On request, the documents that pass a score threshold
are decoded together, in groups sized to a memory budget:
  1. prefill: each prompt's tail (document + template suffix) runs once more behind
     the query's cached prefix (PrefixCache), capturing every attention layer's K/V
     and every DeltaNet layer's final conv and recurrent states; the last
     position's logits give the first token;
  2. decode: one token per sequence per step. Attention layers write into and
     attend over a preallocated per-sequence KV cache ``[n, Hkv, capacity, D]``
     (static buffers, gpt-fast style); DeltaNet layers step their states.
     A sequence stops at ``<|im_end|>`` (or ``<|endoftext|>``) or after
     ``max_new_tokens``, and leaves the batch.
The LM head is the full vocabulary at one position per sequence and step: the tied
embedding, or ``lm_head.weight`` read from the checkpoint on first use.
"""
import re
import threading
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import kernels
from engine.context import BatchContext, build_context
from engine.weights import checkpoint_index, read_tensor

EVIDENCE_TAGS = ("contribution", "evidence")
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def parse_evidence(text: str) -> Dict[str, Optional[str]]:
    """``{contribution, evidence}`` from the generated text; a missing or unclosed
    (truncated) tag gives None."""
    out = {}
    for tag in EVIDENCE_TAGS:
        m = re.search(rf"<{tag}>(.*?)</{tag}>", text, flags=re.S)
        out[tag] = m.group(1).strip() if m else None
    return out


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

    def keep(self, rows: torch.Tensor) -> None:
        """Drop finished sequences: keep ``rows`` (in order)."""
        for group in (self.keys, self.values, self.conv, self.recurrent):
            for i, t in enumerate(group):
                group[i] = t.index_select(0, rows)
        self.lens = self.lens.index_select(0, rows)
        self._mask = None


class Generator:
    """Greedy decoding on a ModelRunner's causal LM (Qwen3, Qwen3.5)."""

    def __init__(self, runner, cache_bytes: int = 2 << 30):
        model = runner.model
        if not hasattr(model, "embed_tokens") or not hasattr(model, "norm"):
            raise ValueError(f"{runner.arch} is not a causal LM; it cannot generate")
        self.runner, self.model = runner, model
        self.cache_bytes = cache_bytes
        vocab = runner.tokenizer.get_vocab()
        self.stop_ids = [vocab[t] for t in STOP_TOKENS if t in vocab]
        self._lm_head: Optional[torch.Tensor] = None
        self._lock = threading.Lock()

    # -- pieces ----------------------------------------------------------------------
    def lm_head(self) -> torch.Tensor:
        """``[V, H]``: the checkpoint's lm_head, or the tied input embedding."""
        if self._lm_head is None:
            index = checkpoint_index(self.runner.folder)
            name = next((n for n in ("lm_head.weight", "model.lm_head.weight") if n in index), None)
            if name is None:  # tied (the yes/no head already checked that the config says so)
                self._lm_head = self.model.embed_tokens.weight
            else:
                w = self.model.embed_tokens.weight
                self._lm_head = read_tensor(index[name], name).to(device=w.device, dtype=w.dtype)
        return self._lm_head

    def next_tokens(self, hidden: torch.Tensor, residual: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Greedy next token at ``rows`` (final norm, full-vocabulary logits, argmax): ``[n]`` int64."""
        norm = self.model.norm
        h, _ = kernels.rms_norm(hidden[rows], norm.weight, norm.eps, residual=residual[rows], offset=norm.offset)
        return F.linear(h, self.lm_head()).float().argmax(-1)

    def _kv_geometry(self):
        """Bytes per cached token (all attention layers, K and V) and per sequence (DeltaNet states)."""
        per_token = per_seq = 0
        size = self.model.embed_tokens.weight.element_size()
        for m in self.model.modules():
            if hasattr(m, "num_kv_heads") and hasattr(m, "head_dim"):
                per_token += 2 * m.num_kv_heads * m.head_dim * size
            elif hasattr(m, "conv_dim") and hasattr(m, "num_v_heads"):
                per_seq += m.conv_dim * (m.conv1d.weight.shape[-1] - 1) * size
                per_seq += m.num_v_heads * m.head_k_dim * m.head_v_dim * 4
        return per_token, per_seq

    def _prefill(self, tails: List[List[int]], prefix, capacity: int):
        """Run the prompts' tails behind ``prefix`` (a PrefixKV or None); first tokens and the cache."""
        dev = self.runner.device
        n = len(tails)
        ids, ctx = build_context(tails, dev, prefixes=[prefix] if prefix is not None else None,
                                 prefix_index=[0] * n if prefix is not None else None)
        ctx.capture_kv, ctx.capture_state = [], []
        hidden, residual = self.model(ids, ctx)
        first = self.next_tokens(hidden, residual, ctx.last_index)
        p = prefix.num_tokens if prefix is not None else 0
        lens = torch.tensor(ctx.seq_lens, dtype=torch.int64, device=dev)
        seq_of = torch.repeat_interleave(torch.arange(n, device=dev), lens)
        cols = ctx.positions  # a token's slot in the cache is its position (after the prefix)
        keys, values = [], []
        for layer, (k, v) in enumerate(ctx.capture_kv):  # k, v [T, Hkv, D]
            kb = k.new_zeros(n, k.shape[1], capacity, k.shape[2])
            vb = torch.zeros_like(kb)
            if prefix is not None:
                kb[:, :, :p] = prefix.k[layer].transpose(0, 1)[None]
                vb[:, :, :p] = prefix.v[layer].transpose(0, 1)[None]
            kb[seq_of, :, cols] = k
            vb[seq_of, :, cols] = v
            keys.append(kb)
            values.append(vb)
        conv = [c for c, _ in ctx.capture_state]
        recurrent = [s for _, s in ctx.capture_state]
        return first, DecodeCache(keys, values, lens + p, conv, recurrent)

    # -- public ----------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, tails: Sequence[List[int]], head: Optional[List[int]] = None, max_new_tokens: int = 512,
                 stop_ids: Optional[Sequence[int]] = None) -> List[List[int]]:
        """Greedy continuations of ``head + tail`` for each tail (the stop token included when reached).

        With ``head``, its K/V and states come from (or go to) the runner's PrefixCache.
        """
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        tails = [list(t) for t in tails]
        if not tails:
            return []
        stop = torch.tensor(list(self.stop_ids if stop_ids is None else stop_ids), dtype=torch.int64,
                            device=self.runner.device)
        prefix = None
        if head:
            cache = self.runner.prefix_cache
            prefix = cache.get(tuple(head))
            if prefix is None:
                prefix = self.runner.compute_prefixes([list(head)])[0]
                cache.put(tuple(head), prefix)
        plen = len(head) if head else 0
        per_token, per_seq = self._kv_geometry()
        out: List[Optional[List[int]]] = [None] * len(tails)
        order = sorted(range(len(tails)), key=lambda i: -len(tails[i]))  # similar lengths decode together
        with self._lock:
            start = 0
            while start < len(order):
                capacity = plen + len(tails[order[start]]) + max_new_tokens
                group = max(1, self.cache_bytes // max(1, capacity * per_token + per_seq))
                idx = order[start : start + group]
                while len(idx) > 1 and sum(len(tails[i]) for i in idx) > self.runner.max_batch_tokens:
                    idx = idx[: len(idx) // 2]  # the prefill is one packed batch: keep it in the token budget
                start += len(idx)
                for i, seq in zip(idx, self._decode([tails[i] for i in idx], prefix, capacity, max_new_tokens, stop)):
                    out[i] = seq
        return out

    def _decode(self, tails, prefix, capacity: int, max_new_tokens: int, stop: torch.Tensor) -> List[List[int]]:
        dev = self.runner.device
        tokens, cache = self._prefill(tails, prefix, capacity)
        n = len(tails)
        outs: List[List[int]] = [[] for _ in range(n)]
        alive = torch.arange(n, device=dev)
        for step in range(max_new_tokens):
            for i, t in zip(alive.tolist(), tokens.tolist()):
                outs[i].append(t)
            if step == max_new_tokens - 1:
                break
            running = ~torch.isin(tokens, stop)
            if not bool(running.all()):
                rows = running.nonzero().squeeze(1)
                if rows.numel() == 0:
                    break
                cache.keep(rows)
                tokens, alive = tokens[rows], alive[rows]
            m = tokens.numel()
            cu = torch.arange(m + 1, dtype=torch.int32, device=dev)
            ctx = BatchContext(cu_seqlens=cu, max_seqlen=1, positions=cache.lens.clone(),
                               last_index=torch.arange(m, device=dev), seq_lens=[1] * m, cache=cache)
            hidden, residual = self.model(tokens, ctx)
            cache.advance()
            tokens = self.next_tokens(hidden, residual, ctx.last_index)
        return outs

    def evidence(self, template, query: str, docs: Sequence[str], instruction: Optional[str] = None,
                 max_new_tokens: int = 512, share_prefix: bool = True) -> List[Dict[str, object]]:
        """Decode each document's answer; ``[{raw_output, contribution, evidence, tokens}]``."""
        head = template.encode_head(query, instruction) if share_prefix and getattr(template, "supports_prefix",
                                                                                    False) else None
        if head is not None:
            tails = template.encode_tails(head, list(docs)).ids
        else:
            tails = template.encode([query] * len(docs), list(docs), instruction).ids
        seqs = self.generate(tails, head, max_new_tokens)
        stop = set(self.stop_ids)
        out = []
        for ids in seqs:
            body = ids[:-1] if ids and ids[-1] in stop else ids
            text = self.runner.tokenizer.decode(body, skip_special_tokens=False)
            out.append({"raw_output": text, **parse_evidence(text), "tokens": len(ids)})
        return out
