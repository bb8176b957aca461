"""KaLM-Reranker-V1 scoring: passages encoded once into a paged cache, prompts decoded against them.

The encoder sees only the passage, so its (Matryoshka-pooled) output depends on
(model, passage tokens, ratio r) alone and is cached in a PassageCache. A call:
  1. tokenizes the passages and each distinct decoder prompt;
  2. per chunk of pairs (decoder tokens within the batch budget, its passages
     within the pool): pins the chunk's cached passages, encodes the missing ones
     (packed varlen encoder, mean pooling over groups of r tokens) into the pool,
     runs the decoder on the prompts with paged cross-attention through the
     passages' block tables, and reads sigmoid(l_yes - l_no) at each last token.
A warm call (every passage cached) runs no encoder work at all.

What the pool holds (``cache_kv``):
  False: pooled encoder states, a block is [page, H]. Each batch projects the
         states of its passages to every decoder layer's cross K/V once per layer.
  True:  every decoder layer's cross K/V, a block is [layers, 2, page, Hkv, D]
         (layers*2*kv_dim/H times the bytes); the decoder reads them in place.
bench/e2e_kalm.py measures both.

Concurrency: one lock per scorer serializes the model work and the pool writes
(calls from several threads queue on it, chunk by chunk); tokenizing happens
before taking it (the tokenizer serializes itself), so one call tokenizes while
another runs the model.
"""
import threading
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

import kernels
from engine.cache import PassageCache, PassageEntry
from engine.context import build_context
from engine.scheduler import Cancelled

RATIOS = (1, 2, 4, 8, 16, 32)
DEFAULT_RATIO = 4


def check_ratio(ratio) -> int:
    if ratio is None:
        return DEFAULT_RATIO
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio not in RATIOS:
        raise ValueError(f"compression_ratio must be one of {RATIOS}, got {ratio!r}")
    return ratio


def matryoshka_pool(states: torch.Tensor, positions: torch.Tensor, seq_lens: Sequence[int], ratio: int):
    """Mean of each consecutive group of ``ratio`` tokens per sequence (a trailing partial group
    averages its real tokens only), summed in fp32. states ``[T, H]`` -> ``[sum ceil(n / r), H]``."""
    if ratio == 1:
        return states
    dev = states.device
    lens = torch.tensor(list(seq_lens), device=dev)
    groups = (lens + ratio - 1) // ratio
    first = torch.cumsum(groups, 0) - groups  # first group of each sequence
    seq = torch.repeat_interleave(torch.arange(len(seq_lens), device=dev), lens, output_size=states.shape[0])
    gid = first[seq] + positions // ratio  # [T]
    n_groups = int(sum(-(-n // ratio) for n in seq_lens))
    sums = torch.zeros(n_groups, states.shape[1], dtype=torch.float32, device=dev).index_add_(0, gid, states.float())
    counts = torch.bincount(gid, minlength=n_groups).to(torch.float32)
    return (sums / counts[:, None]).to(states.dtype)


class _CrossKV:
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


class KaLMScorer:
    """Scores pairs of an encoder-decoder reranker (``runner.model`` a T5Gemma2Model) through a
    PassageCache of ``cache_bytes`` (blocks of ``block_size`` pooled positions)."""

    def __init__(self, runner, cache_bytes: Optional[int] = None, cache_kv: bool = False, block_size: int = 16):
        self.runner, self.model, self.head, self.template = runner, runner.model, runner.head, runner.template
        self.device, self.dtype = runner.device, runner.dtype
        assert hasattr(self.head, "w"), "KaLM scores with the folded yes/no row (engine.heads.YesNoHead)"
        self.cache_kv = bool(cache_kv)
        if cache_bytes is None:
            cache_bytes = (1 << 30) if self.device.type == "cuda" else (256 << 20)
        attn = self.model.decoder.layers[0].self_attn
        n_layers = len(self.model.decoder.layers)
        if self.cache_kv:
            shape = (n_layers, 2, block_size, attn.num_kv_heads, attn.head_dim)
        else:
            shape = (block_size, self.model.hidden_size)
        # Never smaller than one longest passage at r = 1, so every chunk fits.
        min_blocks = -(-self.template.document_max_length // block_size)
        self.cache = PassageCache(cache_bytes, block_size, shape, self.dtype, self.device, min_blocks=min_blocks)
        self.model_id = f"{runner.folder.resolve()}|{self.dtype}|{'kv' if self.cache_kv else 'states'}"
        self._lock = threading.Lock()  # model work and pool writes

    # -- public -----------------------------------------------------------------------------
    def scores(self, queries: Sequence[str], docs: Sequence[str], instruction: Optional[str] = None,
               ratio: Optional[int] = None, cancel=None, stats: Optional[dict] = None,
               margins: bool = False) -> np.ndarray:
        """sigmoid(l_yes - l_no) of each (query, document) pair (``margins``: l_yes - l_no), fp32, in order."""
        ratio = check_ratio(ratio)
        st = {"sequences": len(queries), "passages_encoded": 0, "passage_cache_hits": 0, "encoder_tokens": 0,
              "decoder_tokens": 0, "batches": 0, "tokenize_s": 0.0, "encode_s": 0.0, "forward_s": 0.0}
        t0 = time.perf_counter()
        uq = list(dict.fromkeys(queries))
        udocs = list(dict.fromkeys(docs))
        prompts = [self.template.encode_query(q, instruction) for q in uq]
        doc_ids = self.template.encode_documents(udocs)
        st["tokenize_s"] += time.perf_counter() - t0
        qpos = {q: i for i, q in enumerate(uq)}
        dpos = {d: i for i, d in enumerate(udocs)}
        pairs = [(qpos[q], dpos[d]) for q, d in zip(queries, docs)]
        keys = [PassageCache.passage_key(self.model_id, ratio, ids) for ids in doc_ids]
        out = np.zeros(len(pairs), dtype=np.float32)
        for chunk in self._chunks(pairs, prompts, doc_ids, ratio):
            if cancel is not None and cancel.is_set():
                raise Cancelled("request cancelled")
            with self._lock:
                score_margin = self._run_chunk([pairs[i] for i in chunk], prompts, doc_ids, keys, ratio, st)
            out[chunk] = score_margin[1 if margins else 0]
        _merge(stats, st)
        return out

    def index(self, docs: Sequence[str], ratio: Optional[int] = None, stats: Optional[dict] = None) -> dict:
        """Encode and cache the passages not cached yet (no decoder work)."""
        ratio = check_ratio(ratio)
        st = {"passages_encoded": 0, "passage_cache_hits": 0, "encoder_tokens": 0, "encode_s": 0.0}
        udocs = list(dict.fromkeys(docs))
        doc_ids = self.template.encode_documents(udocs)
        keys = [PassageCache.passage_key(self.model_id, ratio, ids) for ids in doc_ids]
        budget, capacity = self.runner.max_batch_tokens, self.cache.num_blocks
        group, tokens, blocks = [], 0, 0
        for d in list(range(len(udocs))) + [None]:  # groups within the batch budget and the pool
            if d is not None and (not group or (tokens + len(doc_ids[d]) <= budget
                                                and blocks + self._blocks(doc_ids[d], ratio) <= capacity)):
                group.append(d)
                tokens += len(doc_ids[d])
                blocks += self._blocks(doc_ids[d], ratio)
                continue
            with self._lock:
                self.cache.release(self._acquire(group, doc_ids, keys, ratio, st).values())
            if d is not None:
                group, tokens, blocks = [d], len(doc_ids[d]), self._blocks(doc_ids[d], ratio)
        _merge(stats, st)
        return {"passages": len(udocs), "encoded": st["passages_encoded"], "already_cached": st["passage_cache_hits"]}

    # -- planning ---------------------------------------------------------------------------
    def _blocks(self, ids: List[int], ratio: int) -> int:
        return self.cache.blocks_for(-(-len(ids) // ratio))

    def _chunks(self, pairs, prompts, doc_ids, ratio):
        """Runs of pair indices whose decoder tokens fit the batch budget and whose distinct
        passages fit the pool together (so pinning them never fails)."""
        budget, capacity = self.runner.max_batch_tokens, self.cache.num_blocks
        chunk, tokens, blocks, seen = [], 0, 0, set()
        for i, (q, d) in enumerate(pairs):
            need = 0 if d in seen else self._blocks(doc_ids[d], ratio)
            if chunk and (tokens + len(prompts[q]) > budget or blocks + need > capacity):
                yield chunk
                chunk, tokens, blocks, seen = [], 0, 0, set()
                need = self._blocks(doc_ids[d], ratio)
            chunk.append(i)
            tokens += len(prompts[q])
            blocks += need
            seen.add(d)
        if chunk:
            yield chunk

    # -- model work (under self._lock) ------------------------------------------------------
    def _acquire(self, docs, doc_ids, keys, ratio, st) -> Dict[int, PassageEntry]:
        """Pinned cache entries of ``docs`` (passage indices), encoding the missing ones."""
        entries, missing = {}, []
        for d in docs:
            if d in entries or d in missing:
                continue
            e = self.cache.get(keys[d])
            if e is None:
                missing.append(d)
            else:
                entries[d] = e
                st["passage_cache_hits"] += 1
        try:
            if missing:
                entries.update(self._encode(missing, doc_ids, keys, ratio, st))
        except BaseException:
            self.cache.release(entries.values())
            raise
        return entries

    @torch.inference_mode()
    def _encode(self, missing, doc_ids, keys, ratio, st) -> Dict[int, PassageEntry]:
        t0 = time.perf_counter()
        out: Dict[int, PassageEntry] = {}
        order = sorted(missing, key=lambda d: -len(doc_ids[d]))  # similar lengths share a batch
        budget, i = self.runner.max_batch_tokens, 0
        try:
            while i < len(order):
                batch, tokens = [], 0
                while i < len(order) and (not batch or tokens + len(doc_ids[order[i]]) <= budget):
                    tokens += len(doc_ids[order[i]])
                    batch.append(order[i])
                    i += 1
                seqs = [doc_ids[d] for d in batch]
                ids, ctx = build_context(seqs, self.device)
                pooled = matryoshka_pool(self.model.encode(ids, ctx), ctx.positions, ctx.seq_lens, ratio)
                lens = [-(-len(s) // ratio) for s in seqs]
                new = []
                for d, n in zip(batch, lens):
                    e = self.cache.put(keys[d], n)
                    if e is None:
                        raise RuntimeError("passage cache has no room for a pinned chunk (planning bug)")
                    out[d] = e
                    new.append(e)
                self._write(new, pooled)
                st["encoder_tokens"] += tokens
                st["passages_encoded"] += len(batch)
                st["batches"] = st.get("batches", 0) + 1
        except BaseException:
            self.cache.release(out.values())
            raise
        st["encode_s"] += time.perf_counter() - t0
        return out

    def _rows(self, entries: Sequence[PassageEntry]):
        bs = self.cache.block_size
        blk = [e.blocks[r // bs] for e in entries for r in range(e.num_tokens)]
        slot = [r % bs for e in entries for r in range(e.num_tokens)]
        return tuple(torch.tensor(x, dtype=torch.int64).to(self.device) for x in (blk, slot))

    def _write(self, entries: Sequence[PassageEntry], pooled: torch.Tensor) -> None:
        blk, slot = self._rows(entries)  # pooled rows are the entries' rows, in order
        pool = self.cache.pool
        if not self.cache_kv:
            pool[blk, slot] = pooled
            return
        for i, layer in enumerate(self.model.decoder.layers):
            k, v = layer.self_attn.cross_kv(pooled)  # [N, Hkv, D]
            pool[:, i, 0][blk, slot] = k
            pool[:, i, 1][blk, slot] = v

    @torch.inference_mode()
    def _run_chunk(self, pairs, prompts, doc_ids, keys, ratio, st) -> np.ndarray:  # [2, n]: score, margin
        entries = self._acquire([d for _, d in pairs], doc_ids, keys, ratio, st)
        try:
            t0 = time.perf_counter()
            cross = self._cross([entries[d] for _, d in pairs])
            seqs = [prompts[q] for q, _ in pairs]
            ids, ctx = build_context(seqs, self.device)
            hidden, residual = self.model.decode(ids, ctx, cross)
            # The yes/no head's fused kernel: final norm of the last rows, fp32 dot with W[yes] - W[no].
            norm = self.model.norm
            margin, score = kernels.yes_no_head(hidden, ctx.last_index, norm.weight, self.head.w, norm.eps,
                                                residual=residual, offset=norm.offset)
            out = torch.stack((score, margin)).float().cpu().numpy()  # [2, n]; syncs the device
            st["forward_s"] += time.perf_counter() - t0
            st["decoder_tokens"] += ctx.num_tokens
            st["batches"] += 1
        finally:
            self.cache.release(entries.values())
        return out

    def _cross(self, per_pair: Sequence[PassageEntry]) -> _CrossKV:
        width = max(len(e.blocks) for e in per_pair)
        lens = torch.tensor([e.num_tokens for e in per_pair], dtype=torch.int32)
        if self.cache_kv:
            table = [e.blocks + [0] * (width - len(e.blocks)) for e in per_pair]
            return _CrossKV(torch.tensor(table, dtype=torch.int32).to(self.device), lens.to(self.device), None,
                            kv_pool=self.cache.pool)
        # States mode: gather the batch's distinct blocks once; tables index that gathered set.
        local: Dict[int, int] = {}
        for e in per_pair:
            for b in e.blocks:
                local.setdefault(b, len(local))
        table = [[local[b] for b in e.blocks] + [0] * (width - len(e.blocks)) for e in per_pair]
        pages = self.cache.pool[torch.tensor(list(local), dtype=torch.int64).to(self.device)]  # [nb, page, H]
        return _CrossKV(torch.tensor(table, dtype=torch.int32).to(self.device), lens.to(self.device), pages)

    def stats(self) -> dict:
        return self.cache.stats()


def _merge(into: Optional[dict], stats: dict) -> None:
    if into is None:
        return
    for k, v in stats.items():
        into[k] = into.get(k, 0) + v
