"""Continuous batching: requests become padding-free batches under a token budget.

Every call (a rerank of one query, a list of texts to embed) is a Request of n
sequences, tokenized lazily in chunks on a tokenizer thread, so a request with
100,000 documents runs in bounded memory and tokenization overlaps the model.
One engine thread owns the model and packs batches from all active requests:
  1. compute the shared prefixes (system + instruction + query) that are not
     cached yet, once per request, keeping their K/V in the PrefixCache;
  2. fill the token budget, first giving each request a fair share (in
     priority, then arrival order), then filling the rest in the same order;
     each request's chunk is sorted longest first, so similar lengths travel
     together;
  3. run the batch and scatter results back to their requests.
A pair's result never depends on the other sequences in its batch.
"""
import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Deque, List, Optional, Tuple

import numpy as np

from engine.templates import Encodings

log = logging.getLogger("engine")


class Cancelled(RuntimeError):
    """The caller cancelled the request (e.g. its HTTP client went away)."""


class Request:
    """n sequences to run; ``encode(start, end) -> Encodings`` tokenizes a slice of them.

    With ``head`` (token ids of a shared prefix), every sequence continues after it:
    its positions start at len(head) and it attends to the head's cached K/V.
    """

    _arrival = itertools.count()

    def __init__(self, n: int, encode: Callable[[int, int], Encodings], head: Optional[List[int]] = None,
                 priority: int = 0, cancel: Optional[threading.Event] = None, chunk_size: int = 1024):
        self.n = n
        self.encode = encode
        self.head = head
        self.priority = priority
        self.cancel = cancel
        self.chunk_size = chunk_size
        self.arrival = next(Request._arrival)
        self.prefix = None  # engine.cache.PrefixKV once computed or found
        self.results: Optional[np.ndarray] = None
        self.remaining = n
        self.error: Optional[BaseException] = None
        self.done = threading.Event()
        self.next_start = 0
        self.pending: Deque[Tuple[int, List[int], Optional[List[int]]]] = deque()
        self.future = None  # the next chunk, tokenizing on the tokenizer thread
        self.stats = {"sequences": n, "tokens_computed": 0, "tokens_saved": 0, "batches": 0,
                      "tokenize_s": 0.0, "schedule_s": 0.0, "forward_s": 0.0, "head_s": 0.0}
        if n == 0:
            self.done.set()

    def sort_key(self):
        return (-self.priority, self.arrival)

    def _encode_chunk(self, start: int, end: int):
        t0 = time.perf_counter()
        enc = self.encode(start, end)
        self.stats["tokenize_s"] += time.perf_counter() - t0
        if len(enc) != end - start:
            raise ValueError(f"encoder returned {len(enc)} sequences for {end - start} inputs")
        items = []
        for k, ids in enumerate(enc.ids):
            if len(ids) == 0:
                raise ValueError(f"input {start + k} is empty after tokenization")
            items.append((start + k, ids, None if enc.token_types is None else enc.token_types[k]))
        items.sort(key=lambda it: -len(it[1]))  # longest first within the chunk
        return items

    def prefetch(self, pool: ThreadPoolExecutor) -> None:
        if self.future is None and self.next_start < self.n:
            s, e = self.next_start, min(self.n, self.next_start + self.chunk_size)
            self.next_start = e
            self.future = pool.submit(self._encode_chunk, s, e)

    def refill(self, pool: ThreadPoolExecutor) -> None:
        """Make sure some tokenized items are pending (waiting for the tokenizer if needed)."""
        if not self.pending:
            self.prefetch(pool)
            if self.future is not None:
                fut, self.future = self.future, None
                self.pending.extend(fut.result())
        self.prefetch(pool)  # overlap the next chunk with the model

    def deliver(self, index: int, value: np.ndarray) -> None:
        if self.results is None:
            self.results = np.zeros((self.n,) + value.shape, dtype=np.float32)
        self.results[index] = value
        self.remaining -= 1
        if self.remaining == 0:
            self.done.set()

    def fail(self, err: BaseException) -> None:
        if not self.done.is_set():
            self.error = err
            self.done.set()

    def wait(self) -> np.ndarray:
        self.done.wait()
        if self.error is not None:
            raise self.error
        if self.results is None:
            return np.zeros((0,), dtype=np.float32)
        return self.results


class Scheduler:
    def __init__(self, runner, max_batch_tokens: int):
        self.runner = runner
        self.max_batch_tokens = max_batch_tokens
        self._cond = threading.Condition()
        self._active: List[Request] = []
        self._thread: Optional[threading.Thread] = None
        self._tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
        self.peak_batch_tokens = 0
        self.totals = {"requests": 0, "batches": 0, "tokens_computed": 0, "tokens_saved": 0}

    # -- client side -------------------------------------------------------
    def submit(self, req: Request) -> Request:
        if req.n == 0:
            return req
        with self._cond:
            self._active.append(req)
            self.totals["requests"] += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
                self._thread.start()
            self._cond.notify()
        return req

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._active)

    # -- engine thread -----------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._active:
                    self._cond.wait()
                reqs = sorted(self._active, key=Request.sort_key)
            try:
                self._step(reqs)
            except BaseException as e:  # never let one bad batch stop the engine
                log.exception("engine step failed")
                for r in reqs:
                    r.fail(e)
            with self._cond:
                self._active = [r for r in self._active if not r.done.is_set()]

    def _step(self, reqs: List[Request]) -> None:
        live = []
        for r in reqs:
            if r.cancel is not None and r.cancel.is_set():
                r.fail(Cancelled("request cancelled"))
            elif not r.done.is_set():
                live.append(r)
        if not live:
            return
        need_prefix = [r for r in live if r.head is not None and r.prefix is None]
        if need_prefix:
            try:
                self._compute_prefixes(need_prefix)
            except Exception as e:  # fail the requests that needed these prefixes, keep serving
                log.exception("prefix computation failed")
                for r in need_prefix:
                    r.fail(e)
        live = [r for r in live if not r.done.is_set()]
        t0 = time.perf_counter()
        batch = self._pack(live)
        sched_s = time.perf_counter() - t0
        if not batch:
            return
        try:
            self._run(batch, sched_s)
        except Exception as e:  # e.g. out of memory: fail this batch's requests only
            log.exception("batch failed")
            for r in {id(b[0]): b[0] for b in batch}.values():
                r.fail(e)

    def _compute_prefixes(self, reqs: List[Request]) -> None:
        # tokens_saved counts, per document, the prefix tokens it read instead of computing,
        # less the prefix tokens computed once: tokens without sharing - tokens computed.
        cache = self.runner.prefix_cache
        todo = {}
        for r in reqs:
            key = tuple(r.head)
            hit = cache.get(key)
            if hit is not None:
                r.prefix = hit
            else:
                todo.setdefault(key, []).append(r)
        if not todo:
            return
        keys = list(todo)
        # Prefixes alone can exceed the budget only for huge queries; run them in budget-sized groups.
        group, tokens = [], 0
        for key in keys + [None]:
            if key is not None and (not group or tokens + len(key) <= self.max_batch_tokens):
                group.append(key)
                tokens += len(key)
                continue
            t0 = time.perf_counter()
            entries = self.runner.compute_prefixes([list(k) for k in group])
            dt = time.perf_counter() - t0
            for k, entry in zip(group, entries):
                cache.put(k, entry)
                for i, r in enumerate(todo[k]):
                    r.prefix = entry
                    if i == 0:  # its documents read the prefix; once is not a saving
                        r.stats["tokens_computed"] += len(k)
                        r.stats["tokens_saved"] -= len(k)
                        r.stats["forward_s"] += dt
            self.totals["tokens_computed"] += tokens
            self.totals["tokens_saved"] -= tokens
            self.totals["batches"] += 1
            if key is not None:
                group, tokens = [key], len(key)

    def _pack(self, live: List[Request]):
        if not live:
            return []
        budget = self.max_batch_tokens
        batch = []  # (request, index, ids, token_types)
        used = 0
        share = max(1, budget // len(live))
        for fair in (True, False):
            for r in live:
                if r.done.is_set():
                    continue
                taken = 0
                try:
                    r.refill(self._tokenizer_pool)
                except Exception as e:  # a bad input fails its own request only
                    r.fail(e)
                    continue
                while r.pending:
                    ids = r.pending[0][1]
                    n = len(ids)
                    if batch and used + n > budget:
                        break
                    if fair and taken > 0 and taken + n > share:
                        break
                    idx, ids, tt = r.pending.popleft()
                    batch.append((r, idx, ids, tt))
                    used += n
                    taken += n
                    if not r.pending:
                        try:
                            r.refill(self._tokenizer_pool)
                        except Exception as e:
                            r.fail(e)
                            batch = [b for b in batch if b[0] is not r]
                            used = sum(len(b[2]) for b in batch)
                            break
                if used >= budget:
                    return batch
        return batch

    def _run(self, batch, sched_s: float) -> None:
        prefixes, pindex, seen = [], [], {}
        for r, _, _, _ in batch:
            if r.prefix is None:
                pindex.append(-1)
                continue
            key = id(r.prefix)
            if key not in seen:
                seen[key] = len(prefixes)
                prefixes.append(r.prefix)
            pindex.append(seen[key])
        seqs = [ids for _, _, ids, _ in batch]
        types = None
        if any(tt is not None for _, _, _, tt in batch):
            types = [tt if tt is not None else [0] * len(ids) for _, _, ids, tt in batch]
        out, fwd_s, head_s = self.runner.run_batch(seqs, types, prefixes or None, pindex if prefixes else None)
        tokens = sum(len(s) for s in seqs)
        self.peak_batch_tokens = max(self.peak_batch_tokens, tokens)
        self.totals["batches"] += 1
        self.totals["tokens_computed"] += tokens
        reqs = {}
        for k, (r, idx, ids, _) in enumerate(batch):
            reqs.setdefault(id(r), [r, 0, 0])
            reqs[id(r)][1] += len(ids)
            if r.prefix is not None:
                reqs[id(r)][2] += r.prefix.num_tokens
            r.deliver(idx, out[k])
        for r, n_tok, saved in reqs.values():
            share = n_tok / tokens
            r.stats["tokens_computed"] += n_tok
            r.stats["tokens_saved"] += saved
            r.stats["batches"] += 1
            r.stats["schedule_s"] += sched_s * share
            r.stats["forward_s"] += fwd_s * share
            r.stats["head_s"] += head_s * share
            self.totals["tokens_saved"] += saved
