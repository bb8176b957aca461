"""Caches of computed states, keyed by the tokens that produced them.

PrefixCache keeps the per-layer K/V of shared query prefixes (system +
instruction + query) so that every document of a request, and later requests
with the same prefix, attend to them without recomputing them. Entries are
LRU-evicted under a byte budget; hits, misses and evictions are counted.

PassageCache (KaLM-Reranker) keeps each passage's encoding in fixed-size
blocks of one preallocated pool, with a block table per passage, so that the
decoder's paged cross-attention reads it in place.
"""
import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch


@dataclass
class PrefixKV:
    k: torch.Tensor  # [layers, P, Hkv, D]
    v: torch.Tensor  # [layers, P, Hkv, D]
    # Linear-attention layers (Qwen3.5 Gated DeltaNet): the prefix's final states, from
    # which every document's scan starts. None for pure-attention models.
    conv_state: Optional[torch.Tensor] = None  # [linear layers, C, K - 1]
    recurrent_state: Optional[torch.Tensor] = None  # [linear layers, Hv, Dk, Dv] fp32

    @property
    def num_tokens(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        extra = sum(t.numel() * t.element_size() for t in (self.conv_state, self.recurrent_state) if t is not None)
        return self.k.numel() * self.k.element_size() * 2 + extra


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: "OrderedDict[Hashable, PrefixKV]" = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, key: Hashable) -> Optional[PrefixKV]:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: Hashable, entry: PrefixKV) -> None:
        if key in self._entries:
            self._bytes -= self._entries.pop(key).nbytes
        if entry.nbytes > self.max_bytes:
            return  # larger than the whole budget: used once, never kept
        self._entries[key] = entry
        self._bytes += entry.nbytes
        while self._bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.nbytes
            self.evictions += 1

    def stats(self) -> Dict[str, int]:
        return {"prefix_cache_entries": len(self._entries), "prefix_cache_bytes": self._bytes,
                "prefix_cache_hits": self.hits, "prefix_cache_misses": self.misses,
                "prefix_cache_evictions": self.evictions}


# --- KaLM-Reranker: paged cache of passage encodings ----------------------------------------

@dataclass
class PassageEntry:
    """One cached passage: row r of its ``num_tokens`` vectors lives in pool block
    ``blocks[r // block_size]`` at slot ``r % block_size`` (its block table)."""

    key: bytes
    blocks: List[int]
    num_tokens: int
    pins: int = 0


class PassageCache:
    """Paged pool of per-passage vectors (pooled encoder states or per-layer cross K/V).

    The pool is one preallocated tensor ``[num_blocks, *block_shape]`` (allocated on first
    use), sized by ``max_bytes`` but never below ``min_blocks``. A passage owns
    ceil(n / block_size) blocks anywhere in the pool. Entries are keyed by
    ``passage_key(model, ratio, tokens)``, LRU-evicted to make room, and pinned while a
    batch reads them: a pinned entry is never evicted. Only the engine thread touches it.
    """

    def __init__(self, max_bytes: int, block_size: int, block_shape: Tuple[int, ...], dtype: torch.dtype,
                 device, min_blocks: int = 1):
        self.block_size = block_size
        self.block_shape = tuple(block_shape)
        self.dtype, self.device = dtype, torch.device(device)
        numel = 1
        for s in self.block_shape:
            numel *= s
        self.block_bytes = numel * torch.empty((), dtype=dtype).element_size()
        self.num_blocks = max(int(min_blocks), int(max_bytes) // self.block_bytes)
        self._pool: Optional[torch.Tensor] = None
        self._free: List[int] = list(range(self.num_blocks - 1, -1, -1))
        self._entries: "OrderedDict[bytes, PassageEntry]" = OrderedDict()
        self.hits = self.misses = self.evictions = 0

    @staticmethod
    def passage_key(model: str, ratio: int, tokens: Sequence[int]) -> bytes:
        h = hashlib.blake2b(digest_size=20)
        h.update(f"{model}\0{ratio}\0".encode())
        h.update(array("q", tokens).tobytes())
        return h.digest()

    @property
    def pool(self) -> torch.Tensor:
        """``[num_blocks, *block_shape]``; zero-filled once, so unwritten slots are finite."""
        if self._pool is None:
            self._pool = torch.zeros((self.num_blocks,) + self.block_shape, dtype=self.dtype, device=self.device)
        return self._pool

    def blocks_for(self, num_tokens: int) -> int:
        return max(1, -(-num_tokens // self.block_size))

    def contains(self, key: bytes) -> bool:
        return key in self._entries

    def get(self, key: bytes) -> Optional[PassageEntry]:
        """The entry for ``key`` (pinned, most recently used), or None (a miss)."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        entry.pins += 1
        self.hits += 1
        return entry

    def put(self, key: bytes, num_tokens: int) -> Optional[PassageEntry]:
        """Allocate blocks for a new passage (pinned), evicting least recently used unpinned
        entries; None, evicting nothing, when pinned entries leave too little room."""
        need = self.blocks_for(num_tokens)
        entry = self._entries.get(key)
        if entry is not None:  # another request stored it meanwhile
            self._entries.move_to_end(key)
            entry.pins += 1
            return entry
        evictable = sum(len(e.blocks) for e in self._entries.values() if e.pins == 0)
        if len(self._free) + evictable < need:
            return None
        for old in [e for e in self._entries.values() if e.pins == 0]:  # oldest first
            if len(self._free) >= need:
                break
            del self._entries[old.key]
            self._free.extend(old.blocks)
            self.evictions += 1
        entry = PassageEntry(key, [self._free.pop() for _ in range(need)], num_tokens, pins=1)
        self._entries[key] = entry
        return entry

    def release(self, entries) -> None:
        for e in entries:
            e.pins -= 1
            assert e.pins >= 0, "released more often than acquired"

    def discard(self, entries) -> None:
        """Drop entries whose rows were never written (their step failed); their blocks are free again."""
        for e in entries:
            if self._entries.get(e.key) is e:
                del self._entries[e.key]
                self._free.extend(e.blocks)

    def clear(self) -> None:
        for e in [e for e in self._entries.values() if e.pins == 0]:
            del self._entries[e.key]
            self._free.extend(e.blocks)

    def stats(self) -> Dict[str, int]:
        used = self.num_blocks - len(self._free)
        return {"passage_cache_entries": len(self._entries), "passage_cache_bytes": used * self.block_bytes,
                "passage_cache_capacity_bytes": self.num_blocks * self.block_bytes,
                "passage_cache_hits": self.hits, "passage_cache_misses": self.misses,
                "passage_cache_evictions": self.evictions}
