"""Generation (Prism-Reranker's evidence): prompts prefilled, then decoded one token per step in a
batch shared by every generating request (continuous batching; engine/core/decode.py runs the
model side: the decode cache, prefill and one decode step).

A ``ScoredGenerateRequest`` scores and generates from one prefill: the forward that captures a
prompt's K/V and states also gives its yes/no score (the head at its last position), exactly as
scoring computes it. Only the prompts its ``select`` keeps join the decode batch; the others'
captured K/V are dropped with the step. Rows that later scores rule out (``top_n``) leave the
batch at the next step.
"""
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, List, Optional, Sequence, Tuple

import numpy as np
import torch

from engine.core.cache import PrefixKV
from engine.core.decode import DecodeCache, build_cache, decode_step, load_lm_head, next_tokens, prefill, \
    prefill_forward
from engine.core.request import Cancelled, Request, pair_items
from engine.core.steps.base import StepKind
from engine.sequence import Seq, Seqs
from kernels.host import to_device


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


class ScoredGenerateRequest(GenerateRequest):
    """Score every prompt with the yes/no head and greedily continue, from the same prefill, those that
    ``select`` keeps.

    ``select(logits, scores)``: the raw logits and scores ``[n]`` known so far (NaN where not
    computed yet) -> a bool ``[n]``, True where a computed prompt may still need its continuation. It
    is called on the engine thread after each prefill, so its answer for a prompt may turn False
    once others are scored (it must never turn True again). Result: ``(logits, scores, outputs)``;
    a prompt never decoded has an empty output.
    """

    counts_prefix_tokens = True  # it is the scoring request: its shared prefix is computed for it

    def __init__(self, seqs: Seqs, max_new_tokens: int, stop_ids: Sequence[int],
                 select: Callable[[np.ndarray, np.ndarray], np.ndarray], prefix: Optional[Sequence[int]] = None,
                 priority: int = 0, cancel: Optional[threading.Event] = None):
        super().__init__(seqs, max_new_tokens, stop_ids, prefix, priority, cancel)
        self.select = select
        self.logits = np.full(len(self.seqs), np.nan, dtype=np.float32)
        self.scores = np.full(len(self.seqs), np.nan, dtype=np.float32)
        self.dropped = np.zeros(len(self.seqs), dtype=bool)
        self.stats.update(decoded=0)

    def wanted(self, rows: List[int], logits: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Which of ``rows`` (scored now: ``logits``, ``scores``) ``select`` keeps; changes nothing."""
        lg, sc = self.logits.copy(), self.scores.copy()
        lg[rows], sc[rows] = logits, scores
        return np.asarray(self.select(lg, sc), dtype=bool)[rows]

    def finished(self, i: int) -> bool:
        return bool(self.dropped[i]) or super().finished(i)

    def append(self, i: int, token: int) -> bool:
        if self.dropped[i]:  # ruled out while its token was being computed
            return True
        return super().append(i, token)

    def drop(self, i: int) -> None:
        """Sequence ``i`` needs no (more) tokens: it counts as finished, its row leaves the batch."""
        if self.finished(i):
            return
        self.dropped[i] = True
        self.remaining -= 1
        if self.remaining == 0:
            self.done.set()

    def scored(self, rows: List[int], logits: np.ndarray, scores: np.ndarray) -> None:
        """Record a prefill's scores."""
        self.logits[rows], self.scores[rows] = logits, scores

    def prune(self, rows: List[int], kept: np.ndarray) -> None:
        """Drop a prefill's rows not kept, and the running ones ``select`` now rules out."""
        for i, k in zip(rows, kept):
            if not k:
                self.drop(i)
        still = np.asarray(self.select(self.logits, self.scores), dtype=bool)
        for i in np.flatnonzero(~np.isnan(self.scores) & ~still):
            self.drop(int(i))

    def result(self):
        return self.logits, self.scores, self.outputs


@dataclass
class PrefillStep:
    request: GenerateRequest
    rows: List[int]  # sequence indices of the request
    seqs: List[Seq]
    prefix: Optional[PrefixKV]
    capacity: int  # KV slots per row of the decode cache after this step
    keep: Optional[List[int]]  # rows of the running decode cache to keep first (None: all)


@dataclass
class DecodeStep:
    tokens: List[int]  # last token of each kept row
    keep: Optional[List[int]]  # rows of the running decode cache to keep first (None: all)
    rows: List[Tuple[GenerateRequest, int]] = field(default_factory=list)


class Generation:
    """The running decode batch, shared by the prefill and decode kinds: its rows on the scheduler's
    side and its KV cache on the device (both touched on the engine thread only)."""

    def __init__(self, decode_bytes: int, kv_bytes: Tuple[int, int]):
        self.decode_bytes = decode_bytes
        self.kv_bytes = kv_bytes  # (per cached token, per sequence) of the decode cache
        self.running: List[Tuple[GenerateRequest, int]] = []  # rows of the decode cache, in order
        self.next_tokens: List[int] = []
        self.capacity = 0  # KV slots per row of the decode cache
        self.cache: Optional[DecodeCache] = None  # the rows' K/V and states on the device
        self._lm_head: Optional[torch.Tensor] = None

    def lm_head(self, runner) -> torch.Tensor:
        if self._lm_head is None:
            self._lm_head = load_lm_head(runner.model, runner.folder)
        return self._lm_head

    def alive_rows(self) -> List[int]:
        return [i for i, (r, k) in enumerate(self.running) if not r.done.is_set() and not r.cancelled
                and not r.finished(k)]

    def compact(self) -> Optional[List[int]]:
        """Drop finished and cancelled rows from the running list; the device cache keeps ``keep``."""
        alive = self.alive_rows()
        for r, _ in self.running:
            if not r.done.is_set() and r.cancelled:
                r.fail(Cancelled("request cancelled"))
        if len(alive) == len(self.running):
            return None
        self.running = [self.running[i] for i in alive]
        self.next_tokens = [self.next_tokens[i] for i in alive]
        if not self.running:
            self.capacity = 0
        return alive

    def keep(self, keep: Optional[List[int]], device) -> None:
        if keep is None or self.cache is None:
            return
        if not keep:
            self.cache = None
        else:
            self.cache.keep(to_device(keep, torch.int64, device))

    def take_tokens(self, rows, tokens: List[int]) -> None:
        self.next_tokens = list(tokens)
        for (r, i), t in zip(rows, tokens):
            if not r.done.is_set():
                r.append(i, int(t))

    def reset(self) -> list:
        """The decode batch is lost (a step failed): every running row goes; returns their requests."""
        reqs = [r for r, _ in self.running]
        self.running, self.next_tokens, self.capacity, self.cache = [], [], 0, None
        return reqs


class PrefillKind(StepKind):
    """Prompts of generating requests, admitted while the decode batch's KV cache fits its budget."""

    name = "prefill"

    def __init__(self, gen: Generation):
        self.gen = gen

    def schedule(self, sched, live) -> Optional[PrefillStep]:
        gen = self.gen
        per_token, per_seq = gen.kv_bytes
        n_run = len(gen.alive_rows())
        for r in live:
            if not isinstance(r, GenerateRequest) or not r.waiting or (r.prefix_key and r.prefix is None):
                continue
            rows, tokens, cap = [], 0, (gen.capacity if n_run else 0)
            for i in r.waiting:
                c = max(cap, r.capacity(i))
                fits = (n_run + len(rows) + 1) * (c * per_token + per_seq) <= gen.decode_bytes
                if not fits and (rows or n_run):  # one row always fits an empty cache
                    break
                if rows and tokens + r.seqs[i].cost > sched.max_batch_tokens:
                    break
                rows.append(i)
                tokens += r.seqs[i].cost
                cap = c
            if not rows:
                continue
            for _ in rows:
                r.waiting.popleft()
            keep = gen.compact()
            return PrefillStep(r, rows, [r.seqs[i] for i in rows], r.prefix, cap, keep)
        return None

    def run(self, runner, step: PrefillStep):
        """Prefill the step's prompts and add their rows to the running decode cache: first tokens. A
        scored request's prompts also get their yes/no scores, and only those it keeps join the cache:
        ``(first tokens of the kept, logits, scores, kept, (forward s, head s))``."""
        gen, model, device = self.gen, runner.model, runner.device
        gen.keep(step.keep, device)
        if not isinstance(step.request, ScoredGenerateRequest):
            first, cache = prefill(model, gen.lm_head(runner), step.seqs, step.prefix, step.capacity, device)
            gen.cache = cache if gen.cache is None else gen.cache.extend(cache)
            return first.tolist()
        # The scoring forward (the last layer for the last rows alone where the head reads no more),
        # capturing the K/V and states decoding continues from.
        t0 = time.perf_counter()
        hidden, residual, ctx = prefill_forward(model, step.seqs, step.prefix, device, runner.last_only)
        t1 = time.perf_counter()
        logit, score = runner.head(hidden, residual, ctx, model)
        logit, score = logit.float().cpu().numpy(), score.float().cpu().numpy()
        seconds = (t1 - t0, time.perf_counter() - t1)
        kept = step.request.wanted(step.rows, logit, score)
        rows = [k for k in range(len(step.seqs)) if kept[k]]
        first: List[int] = []
        if rows:
            index = to_device(rows, torch.int64, device)
            first = next_tokens(model, gen.lm_head(runner), hidden, residual, ctx.last_index[index]).tolist()
            cache = build_cache(ctx, step.prefix, step.capacity, device, rows)
            gen.cache = cache if gen.cache is None else gen.cache.extend(cache)
        return first, logit, score, kept, seconds

    def finish(self, sched, step: PrefillStep, out) -> None:
        gen, r = self.gen, step.request
        scored = isinstance(r, ScoredGenerateRequest)
        rows = step.rows
        if scored:
            first, logits, scores, kept, (forward_s, head_s) = out
            r.stats["forward_s"] += forward_s
            r.stats["head_s"] += head_s
            rows = [i for i, k in zip(step.rows, kept) if k]
        else:
            first = out
        if rows:
            gen.capacity = step.capacity
        gen.running.extend((r, i) for i in rows)
        gen.next_tokens.extend(int(t) for t in first)
        tokens = sum(s.cost for s in step.seqs)
        r.stats["prefill_tokens"] += tokens
        r.stats["tokens_computed"] += tokens
        r.stats["batches"] += 1
        sched.totals["batches"] += 1
        sched.totals["tokens_computed"] += tokens
        if scored:  # counted as scoring counts them (engine/core/steps/score.py)
            saved = r.prefix.num_tokens * len(step.seqs) if r.prefix is not None else 0
            r.stats["tokens_saved"] += saved
            r.stats["prompt_tokens"] += sum(len(s.token_ids) for s in step.seqs) + saved
            sched.totals["tokens_saved"] += saved
            sched.peak_batch_tokens = max(sched.peak_batch_tokens, tokens)
            r.scored(step.rows, logits, scores)
            r.stats["decoded"] += len(rows)
        for i, t in zip(rows, first):
            if not r.done.is_set():
                r.append(i, int(t))
        if scored and not r.done.is_set():
            r.prune(step.rows, kept)

    def fail(self, sched, step: PrefillStep, err):
        # The decode cache may be half-extended: every running row goes with it.
        return [step.request] + self.gen.reset()


class DecodeKind(StepKind):
    """One token for every running row of every generating request: continuous batching of decode."""

    name = "decode"

    def __init__(self, gen: Generation):
        self.gen = gen

    def busy(self) -> bool:
        return bool(self.gen.running)

    def schedule(self, sched, live) -> Optional[DecodeStep]:
        gen = self.gen
        if not gen.running:
            return None
        keep = gen.compact()
        if not gen.running:  # everything finished: free the cache
            return DecodeStep([], keep=[])
        return DecodeStep(list(gen.next_tokens), keep, list(gen.running))

    def run(self, runner, step: DecodeStep) -> List[int]:
        """One token for every running row: next tokens, in row order."""
        gen = self.gen
        gen.keep(step.keep, runner.device)
        if not step.tokens:
            return []
        tokens = to_device(step.tokens, torch.int64, runner.device)
        return decode_step(runner.model, gen.lm_head(runner), gen.cache, tokens).tolist()

    def finish(self, sched, step: DecodeStep, tokens: List[int]) -> None:
        if not step.rows:
            return
        totals = sched.totals
        totals["decode_steps"] += 1
        totals["decode_rows"] += len(step.rows)
        totals["peak_decode_rows"] = max(totals["peak_decode_rows"], len(step.rows))
        reqs = {id(r) for r, _ in step.rows}
        totals["peak_decode_requests"] = max(totals["peak_decode_requests"], len(reqs))
        totals["tokens_computed"] += len(step.rows)  # one token of every row through the model
        for r, rows in pair_items([(r, None) for r, _ in step.rows]):
            r.stats["decode_steps"] += 1
            r.stats["tokens_computed"] += len(rows)
        self.gen.take_tokens(step.rows, tokens)

    def fail(self, sched, step: DecodeStep, err):
        return self.gen.reset()


def generation_kinds(decode_bytes: int, kv_bytes: Tuple[int, int]) -> List[StepKind]:
    """Decode first, then prefill, over one shared running batch."""
    gen = Generation(decode_bytes, kv_bytes)
    return [DecodeKind(gen), PrefillKind(gen)]
