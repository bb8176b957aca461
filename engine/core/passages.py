"""KaLM-Reranker-V1: passages encoded once into a paged cache, prompts decoded against them.

The encoder sees only the passage, so its (Matryoshka-pooled) output depends on
(model, passage tokens, ratio r) alone and is cached in a PassageCache. The
scheduler packs pairs into PassageSteps (decoder tokens within the batch budget,
their passages pinned in the pool); the runner, on the engine thread:
  1. encodes the step's missing passages (packed varlen encoder, mean pooling over
     groups of r tokens) into the blocks the scheduler allocated for them;
  2. runs the decoder on the prompts with paged cross-attention through the
     passages' block tables (T5Gemma2Model.plan builds them) and reads
     sigmoid(l_yes - l_no) at each last token.
A warm call (every passage cached) runs no encoder work at all.

What the pool holds (``cache_kv``):
  False: pooled encoder states, a block is [page, H]. Each batch projects the
         states of its passages to every decoder layer's cross K/V once per layer.
  True:  every decoder layer's cross K/V, a block is [layers, 2, page, Hkv, D]
         (layers*2*kv_dim/H times the bytes); the decoder reads them in place.
bench/e2e_kalm.py measures both.
"""
from typing import Dict, List, Sequence, Tuple

import torch

from engine.context import build_context
from engine.core.cache import PassageCache, PassageEntry
from kernels.host import to_device

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
    lens = to_device(list(seq_lens), torch.int64, dev)
    groups = (lens + ratio - 1) // ratio
    first = torch.cumsum(groups, 0) - groups  # first group of each sequence
    seq = torch.repeat_interleave(torch.arange(len(seq_lens), device=dev), lens, output_size=states.shape[0])
    gid = first[seq] + positions // ratio  # [T]
    n_groups = int(sum(-(-n // ratio) for n in seq_lens))
    sums = torch.zeros(n_groups, states.shape[1], dtype=torch.float32, device=dev).index_add_(0, gid, states.float())
    counts = torch.bincount(gid, minlength=n_groups).to(torch.float32)
    return (sums / counts[:, None]).to(states.dtype)


def passage_pool(model, cache_bytes: int, cache_kv: bool, dtype, device, document_max_length: int,
                 block_size: int = 16) -> PassageCache:
    """The paged pool of ``model`` (a T5Gemma2Model), never smaller than one longest passage at r = 1."""
    attn = model.decoder.layers[0].self_attn
    if cache_kv:
        shape = (len(model.decoder.layers), 2, block_size, attn.num_kv_heads, attn.head_dim)
    else:
        shape = (block_size, model.hidden_size)
    return PassageCache(cache_bytes, block_size, shape, dtype, device, min_blocks=-(-document_max_length // block_size))


def encode_passages(model, cache: PassageCache, todo: Sequence[Tuple[PassageEntry, List[int], int]],
                    device: torch.device, cache_kv: bool) -> None:
    """Encode ``(entry, encoder ids, ratio)`` passages (one packed batch per ratio) into their entries' blocks."""
    by_ratio: Dict[int, list] = {}
    for entry, ids, ratio in todo:
        by_ratio.setdefault(ratio, []).append((entry, ids))
    for ratio, group in by_ratio.items():
        seqs = [ids for _, ids in group]
        ids, ctx = build_context(seqs, device)
        pooled = matryoshka_pool(model.encode(ids, ctx), ctx.positions, ctx.seq_lens, ratio)
        _write(model, cache, [e for e, _ in group], pooled, cache_kv)


def _rows(cache: PassageCache, entries: Sequence[PassageEntry], device):
    bs = cache.block_size
    blk = [e.blocks[r // bs] for e in entries for r in range(e.num_tokens)]
    slot = [r % bs for e in entries for r in range(e.num_tokens)]
    return tuple(to_device(x, torch.int64, device) for x in (blk, slot))


def _write(model, cache: PassageCache, entries: Sequence[PassageEntry], pooled: torch.Tensor, cache_kv: bool) -> None:
    blk, slot = _rows(cache, entries, pooled.device)  # pooled rows are the entries' rows, in order
    pool = cache.pool
    if not cache_kv:
        pool[blk, slot] = pooled
        return
    for i, layer in enumerate(model.decoder.layers):
        k, v = layer.self_attn.cross_kv(pooled)  # [N, Hkv, D]
        pool[:, i, 0][blk, slot] = k
        pool[:, i, 1][blk, slot] = v
