"""Requests: what a caller hands the engine loop, and where the loop leaves the answers.

A caller thread builds a request, submits it and waits on it. Everything else,
from picking its sequences into steps to delivering results, happens on the
engine thread. Three kinds:
  ScoreRequest     n sequences scored (relevance) or embedded, tokenized lazily in
                   chunks on the tokenizer thread, optionally behind a shared prefix;
  PassageRequest   encoder-decoder pairs (KaLM-Reranker): each prompt reads its
                   passage's cached encoding; with ``index_only`` the passages are
                   only encoded into the cache;
  GenerateRequest  greedy continuations of prompts (Prism-Reranker's evidence),
                   prefilled and then decoded one token per step in a batch shared
                   with every other generating request.
"""
import itertools
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Deque, List, Optional, Sequence, Tuple

import numpy as np

from engine.sequence import Seq, Seqs


_STATS_LOCK = threading.Lock()


def merge_stats(into: Optional[dict], stats: dict) -> None:
    """Add a request's counters into a dict that caller threads may share (a Reranker's cumulative ``stats``)."""
    if into is None:
        return
    with _STATS_LOCK:
        for k, v in stats.items():
            into[k] = into.get(k, 0) + v


class Cancelled(RuntimeError):
    """The caller cancelled the request (e.g. its HTTP client went away)."""


class Request:
    _arrival = itertools.count()

    def __init__(self, priority: int = 0, cancel: Optional[threading.Event] = None):
        self.priority = priority
        self.cancel = cancel
        self.arrival = next(Request._arrival)
        self.error: Optional[BaseException] = None
        self.done = threading.Event()
        self.stats = {"tokens_computed": 0, "tokens_saved": 0, "prompt_tokens": 0, "batches": 0,
                      "tokenize_s": 0.0, "schedule_s": 0.0, "forward_s": 0.0, "head_s": 0.0}

    def sort_key(self):
        return (-self.priority, self.arrival)

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def fail(self, err: BaseException) -> None:
        if not self.done.is_set():
            self.error = err
            self.done.set()

    def wait(self):
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result()

    def result(self):
        raise NotImplementedError


class ScoreRequest(Request):
    """n sequences; ``encode(start, end) -> Seqs`` tokenizes a slice of them.

    With ``prefix`` (token ids of a shared prefix), every sequence continues after it:
    its positions start at len(prefix) and it attends to the prefix's cached K/V.
    Results: ``scores`` ``[n]`` (or ``[n, H]`` embeddings) and ``logits`` ``[n]`` for heads
    that have one.
    """

    def __init__(self, n: int, encode: Callable[[int, int], Seqs], prefix: Optional[Sequence[int]] = None,
                 priority: int = 0, cancel: Optional[threading.Event] = None, chunk_size: int = 1024,
                 eager: bool = False):
        super().__init__(priority, cancel)
        self.n = n
        self.encode = encode
        self.prefix_key = tuple(prefix) if prefix else None
        self.prefix = None  # engine.core.cache.PrefixKV once computed or found
        self.chunk_size = chunk_size
        self.scores: Optional[np.ndarray] = None
        self.logits: Optional[np.ndarray] = None
        self.remaining = n
        self.next_start = 0
        self.pending: Deque[Seq] = deque()
        self.future = None  # the next chunk, tokenizing on the tokenizer thread
        self.stats["sequences"] = n
        if n == 0:
            self.done.set()
        elif eager:
            # A small request tokenizes here, on the caller's thread: the engine loop then runs it
            # without a round trip through the tokenizer thread (one hand-off each way in all).
            self.pending.extend(self._encode_chunk(0, n))
            self.next_start = n

    def _encode_chunk(self, start: int, end: int) -> List[Seq]:
        t0 = time.perf_counter()
        seqs = list(self.encode(start, end))
        self.stats["tokenize_s"] += time.perf_counter() - t0
        if len(seqs) != end - start:
            raise ValueError(f"encoder returned {len(seqs)} sequences for {end - start} inputs")
        for k, s in enumerate(seqs):
            if s.cost == 0:
                raise ValueError(f"input {start + k} is empty after tokenization")
            if s.prefix != self.prefix_key:
                raise ValueError(f"input {start + k} continues another prefix than its request's")
            s.index = start + k
        seqs.sort(key=lambda s: -s.cost)  # longest first within the chunk
        return seqs

    def prefetch(self, pool: ThreadPoolExecutor) -> None:
        if self.future is None and self.next_start < self.n:
            s, e = self.next_start, min(self.n, self.next_start + self.chunk_size)
            self.next_start = e
            self.future = pool.submit(self._encode_chunk, s, e)

    def refill(self, pool: ThreadPoolExecutor) -> None:
        """Make sure some tokenized sequences are pending (waiting for the tokenizer if needed)."""
        if not self.pending:
            self.prefetch(pool)
            if self.future is not None:
                fut, self.future = self.future, None
                self.pending.extend(fut.result())
        self.prefetch(pool)  # overlap the next chunk with the model

    def deliver(self, index: int, logit: Optional[float], value: np.ndarray) -> None:
        if self.scores is None:
            self.scores = np.zeros((self.n,) + value.shape, dtype=np.float32)
            if logit is not None:
                self.logits = np.zeros(self.n, dtype=np.float32)
        self.scores[index] = value
        if logit is not None:
            self.logits[index] = logit
        self.remaining -= 1
        if self.remaining == 0:
            self.done.set()

    def result(self) -> np.ndarray:
        return np.zeros((0,), dtype=np.float32) if self.scores is None else self.scores


class PassageRequest(Request):
    """Encoder-decoder pairs: ``seqs[i]`` is a decoder prompt whose ``passage`` is cached under
    ``keys[i]``. Results: ``scores`` and ``logits`` ``[n]``. ``index_only``: encode and cache the
    passages, score nothing."""

    def __init__(self, seqs: Seqs, keys: List[bytes], ratio: int, index_only: bool = False, priority: int = 0,
                 cancel: Optional[threading.Event] = None):
        super().__init__(priority, cancel)
        self.seqs, self.keys, self.ratio, self.index_only = list(seqs), keys, ratio, index_only
        for i, s in enumerate(self.seqs):
            s.index = i
        self.pending: Deque[int] = deque(range(len(self.seqs)))
        self.scores = np.zeros(len(self.seqs), dtype=np.float32)
        self.logits = np.zeros(len(self.seqs), dtype=np.float32)
        self.remaining = len(self.seqs)
        self.stats.update(sequences=len(self.seqs), passages_encoded=0, passage_cache_hits=0, encoder_tokens=0,
                          decoder_tokens=0, encode_s=0.0)
        if not self.seqs:
            self.done.set()

    def finish_items(self, n: int) -> None:
        self.remaining -= n
        if self.remaining == 0:
            self.done.set()

    def result(self) -> np.ndarray:
        return self.scores


class GenerateRequest(Request):
    """Greedy continuations of ``seqs`` (each behind ``prefix`` when given), at most
    ``max_new_tokens`` each, stopping after a token of ``stop_ids``."""

    def __init__(self, seqs: Seqs, max_new_tokens: int, stop_ids: Sequence[int], prefix: Optional[Sequence[int]] = None,
                 priority: int = 0, cancel: Optional[threading.Event] = None):
        super().__init__(priority, cancel)
        self.seqs = list(seqs)
        self.prefix_key = tuple(prefix) if prefix else None
        self.prefix = None
        self.max_new_tokens = max_new_tokens
        self.stop_ids = frozenset(int(t) for t in stop_ids)
        # Longest prompts first: similar lengths prefill (and then decode) together.
        self.waiting: Deque[int] = deque(sorted(range(len(self.seqs)), key=lambda i: -self.seqs[i].cost))
        self.outputs: List[List[int]] = [[] for _ in self.seqs]
        self.remaining = len(self.seqs)
        self.stats.update(sequences=len(self.seqs), prefill_tokens=0, decode_steps=0, generated_tokens=0)
        if not self.seqs:
            self.done.set()

    def capacity(self, i: int) -> int:
        """KV slots sequence ``i`` needs: prefix + prompt + every token it may generate."""
        return (len(self.prefix_key) if self.prefix_key else 0) + self.seqs[i].cost + self.max_new_tokens

    def finished(self, i: int) -> bool:
        """Sequence ``i`` has reached a stop token or ``max_new_tokens``."""
        out = self.outputs[i]
        return bool(out) and (out[-1] in self.stop_ids or len(out) >= self.max_new_tokens)

    def append(self, i: int, token: int) -> bool:
        """Record a generated token; True when sequence ``i`` is finished."""
        self.outputs[i].append(token)
        self.stats["generated_tokens"] += 1
        if self.finished(i):
            self.remaining -= 1
            if self.remaining == 0:
                self.done.set()
            return True
        return False

    def result(self) -> List[List[int]]:
        return self.outputs


def pair_items(items: Sequence[Tuple[Request, Seq]]):
    """Group a step's (request, sequence) items by request, in first-seen order."""
    groups = {}
    for r, s in items:
        groups.setdefault(id(r), (r, []))[1].append(s)
    return list(groups.values())
