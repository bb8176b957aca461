"""Generation (Prism-Reranker's evidence): prompts prefilled, then decoded one token per step in a
batch shared by every generating request (continuous batching; engine/core/decode.py runs the
model side: the decode cache, prefill and one decode step).
"""
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, List, Optional, Sequence, Tuple

import torch

from engine.core.cache import PrefixKV
from engine.core.decode import DecodeCache, decode_step, load_lm_head, prefill
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

    def run(self, runner, step: PrefillStep) -> List[int]:
        """Prefill the step's prompts and add their rows to the running decode cache; first tokens."""
        gen = self.gen
        gen.keep(step.keep, runner.device)
        first, cache = prefill(runner.model, gen.lm_head(runner), step.seqs, step.prefix, step.capacity,
                               runner.device)
        gen.cache = cache if gen.cache is None else gen.cache.extend(cache)
        return first.tolist()

    def finish(self, sched, step: PrefillStep, first: List[int]) -> None:
        gen, r = self.gen, step.request
        gen.capacity = step.capacity
        gen.running.extend((r, i) for i in step.rows)
        gen.next_tokens.extend(int(t) for t in first)
        tokens = sum(s.cost for s in step.seqs)
        r.stats["prefill_tokens"] += tokens
        r.stats["tokens_computed"] += tokens
        r.stats["batches"] += 1
        sched.totals["batches"] += 1
        sched.totals["tokens_computed"] += tokens
        for i, t in zip(step.rows, first):
            if not r.done.is_set():
                r.append(i, int(t))

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
        for r, _ in pair_items([(r, None) for r, _ in step.rows]):
            r.stats["decode_steps"] += 1
        self.gen.take_tokens(step.rows, tokens)

    def fail(self, sched, step: DecodeStep, err):
        return self.gen.reset()


def generation_kinds(decode_bytes: int, kv_bytes: Tuple[int, int]) -> List[StepKind]:
    """Decode first, then prefill, over one shared running batch."""
    gen = Generation(decode_bytes, kv_bytes)
    return [DecodeKind(gen), PrefillKind(gen)]
