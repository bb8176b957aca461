"""Caches of computed states, keyed by the tokens that produced them.

PrefixCache keeps the per-layer K/V of shared query prefixes (system +
instruction + query) so that every document of a request, and later requests
with the same prefix, attend to them without recomputing them. Entries are
LRU-evicted under a byte budget; hits, misses and evictions are counted.
"""
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Hashable, Optional, Tuple

import torch


@dataclass
class PrefixKV:
    k: torch.Tensor  # [layers, P, Hkv, D]
    v: torch.Tensor  # [layers, P, Hkv, D]

    @property
    def num_tokens(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: "OrderedDict[Hashable, PrefixKV]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def get(self, key: Hashable) -> Optional[PrefixKV]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: Hashable, entry: PrefixKV) -> None:
        with self._lock:
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
        with self._lock:
            return {"prefix_cache_entries": len(self._entries), "prefix_cache_bytes": self._bytes,
                    "prefix_cache_hits": self.hits, "prefix_cache_misses": self.misses,
                    "prefix_cache_evictions": self.evictions}
