"""Scoring and embedding: n sequences through one packed forward and the model's head.

Each ScoreStep fills the token budget: every waiting request first gets a fair share
(priority, then arrival order), then the rest is filled in the same order; each chunk runs
longest first. A request's result never depends on the other sequences of its batch.
"""
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Deque, List, Optional, Sequence, Tuple

import numpy as np
import torch

from engine.core.cache import PrefixKV
from engine.core.pending import Readback
from engine.core.request import Request, pair_items
from engine.core.steps.base import StepKind, step_requests
from engine.sequence import Seq, Seqs


class ScoreRequest(Request):
    """n sequences; ``encode(start, end) -> Seqs`` tokenizes a slice of them.

    With ``prefix`` (token ids of a shared prefix), every sequence continues after it:
    its positions start at len(prefix) and it attends to the prefix's cached K/V.
    Results: ``scores`` ``[n]`` (or ``[n, H]`` embeddings) and ``logits`` ``[n]`` for heads
    that have one.
    """

    counts_prefix_tokens = True

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


@dataclass
class ScoreStep:
    items: List[Tuple[ScoreRequest, Seq]]
    prefixes: List[PrefixKV]  # distinct prefixes of the batch
    prefix_index: Optional[List[int]]  # per sequence: its prefix in ``prefixes``, -1 for none
    schedule_s: float = 0.0

    @property
    def seqs(self) -> List[Seq]:
        return [s for _, s in self.items]


def _refill(sched, r: ScoreRequest) -> bool:
    """Tokenized sequences pending for ``r``; False when its input failed (only it fails)."""
    try:
        r.refill(sched.tokenizer_pool)
        return True
    except Exception as e:
        r.fail(e)
        return False


class ScoreKind(StepKind):
    name = "score"

    def schedule(self, sched, live) -> Optional[ScoreStep]:
        live = [r for r in live if isinstance(r, ScoreRequest) and (r.prefix_key is None or r.prefix is not None)]
        if not live:
            return None
        t0 = time.perf_counter()
        budget, used, batch = sched.max_batch_tokens, 0, []
        share = max(1, budget // len(live))
        for fair in (True, False):
            for r in live:
                if r.done.is_set() or not _refill(sched, r):
                    continue
                taken = 0
                while r.pending:
                    n = r.pending[0].cost
                    if batch and used + n > budget:
                        break
                    if fair and taken > 0 and taken + n > share:
                        break
                    batch.append((r, r.pending.popleft()))
                    used += n
                    taken += n
                    if not r.pending and not _refill(sched, r):
                        break
                if used >= budget:
                    break
            if used >= budget:
                break
        batch = [b for b in batch if not b[0].done.is_set()]  # a request whose next chunk failed to tokenize
        if not batch:
            return None
        prefixes, index, seen = [], [], {}
        for r, _ in batch:
            if r.prefix is None:
                index.append(-1)
                continue
            if id(r.prefix) not in seen:
                seen[id(r.prefix)] = len(prefixes)
                prefixes.append(r.prefix)
            index.append(seen[id(r.prefix)])
        return ScoreStep(batch, prefixes, index if prefixes else None, time.perf_counter() - t0)

    def run(self, runner, step: ScoreStep):
        """One packed forward + head: (logits [n] or None, scores [n] / embeddings [n, H], fwd s, head s)."""
        t0 = time.perf_counter()
        model, device = runner.model, runner.device
        ids, ctx = model.plan(step.seqs, device, step.prefixes or None, step.prefix_index)
        if runner.last_only:
            ctx.last_only = True
            ctx.cu_last = torch.arange(ctx.num_seqs + 1, dtype=torch.int32, device=device)
        hidden, residual = runner.forward(ids, ctx)
        if ctx.last_only:  # the model returned the last rows only
            ctx.last_index = torch.arange(ctx.num_seqs, device=device)
        t1 = time.perf_counter()
        logit, value = runner.head(hidden, residual, ctx, model)

        def host(out):  # head_s: until the results are on the host
            value, logit = out[0].numpy(), None if out[1] is None else out[1].numpy()
            return logit, value, t1 - t0, time.perf_counter() - t1

        return Readback([value.float(), None if logit is None else logit.float()], host)

    def settles(self, step: ScoreStep) -> list:
        """The requests whose last sequences this step scores (their ``deliver`` completes them)."""
        n = Counter(id(r) for r, _ in step.items)
        return [r for r in step_requests(step) if not r.done.is_set() and r.remaining == n[id(r)]]

    def finish(self, sched, step: ScoreStep, out) -> None:
        logits, values, forward_s, head_s = out
        tokens = sum(s.cost for s in step.seqs)
        sched.peak_batch_tokens = max(sched.peak_batch_tokens, tokens)
        sched.totals["batches"] += 1
        sched.totals["tokens_computed"] += tokens
        for r, seqs in pair_items(step.items):
            n_tok = sum(s.cost for s in seqs)
            saved = r.prefix.num_tokens * len(seqs) if r.prefix is not None else 0
            share = n_tok / tokens
            r.stats["tokens_computed"] += n_tok
            r.stats["tokens_saved"] += saved
            r.stats["prompt_tokens"] += sum(len(s.token_ids) for s in seqs) + saved  # image patches are not tokens
            r.stats["batches"] += 1
            r.stats["schedule_s"] += step.schedule_s * share
            r.stats["forward_s"] += forward_s * share
            r.stats["head_s"] += head_s * share
            sched.totals["tokens_saved"] += saved
        for k, (r, s) in enumerate(step.items):
            if not r.done.is_set():
                r.deliver(s.index, None if logits is None else float(logits[k]), values[k])
