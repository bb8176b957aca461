"""The scheduler: decides the engine loop's next step. It never runs the model.

Every step is one packed model call of one kind, chosen on the engine thread:
  PrefixStep   shared prefixes (system + instruction + query) not cached yet, each
               computed once and kept in the PrefixCache;
  ScoreStep    sequences of score/embed requests under the token budget: each request
               first gets a fair share (priority, then arrival order), then the rest is
               filled in the same order; each chunk runs longest first;
  PassageStep  KaLM pairs: their passages are pinned in the PassageCache (the missing
               ones allocated there and encoded by this step), then decoded;
  PrefillStep  prompts of generating requests, admitted while the decode batch's KV
               cache fits its byte budget;
  DecodeStep   one token for every running sequence of every generating request:
               continuous batching of decode.
Prefixes come first (they unblock the rest); the other kinds take turns, so a long
decode does not starve scoring, nor scoring the decode. A request's result never
depends on the other sequences of its batch.
"""
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from engine.core.cache import PassageCache, PassageEntry, PrefixCache, PrefixKV
from engine.core.request import (Cancelled, GenerateRequest, PassageRequest, Request, ScoreRequest, pair_items)
from engine.sequence import Seq

log = logging.getLogger("engine")


@dataclass
class PrefixStep:
    keys: List[Tuple[int, ...]]
    requests: Dict[Tuple[int, ...], List[Request]]


@dataclass
class ScoreStep:
    items: List[Tuple[ScoreRequest, Seq]]
    prefixes: List[PrefixKV]  # distinct prefixes of the batch
    prefix_index: Optional[List[int]]  # per sequence: its prefix in ``prefixes``, -1 for none
    schedule_s: float = 0.0

    @property
    def seqs(self) -> List[Seq]:
        return [s for _, s in self.items]


@dataclass
class PassageStep:
    items: List[Tuple[PassageRequest, Seq]]  # decoder prompts to score (none for index requests)
    index_items: List[Tuple[PassageRequest, Seq]]  # passages to encode only
    entries: Dict[bytes, PassageEntry]  # pinned for this step, by passage key
    encode: List[Tuple[bytes, List[int], int]]  # (key, encoder ids, ratio) of the passages this step encodes
    keys: List[bytes]  # per scored item: its passage key


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


class Scheduler:
    def __init__(self, max_batch_tokens: int, prefix_cache: PrefixCache, passage_cache: Optional[PassageCache] = None,
                 decode_bytes: int = 2 << 30, kv_bytes: Tuple[int, int] = (0, 0)):
        self.max_batch_tokens = max_batch_tokens
        self.prefix_cache, self.passage_cache = prefix_cache, passage_cache
        self.decode_bytes = decode_bytes
        self.kv_bytes = kv_bytes  # (per cached token, per sequence) of the decode cache
        self._cond = threading.Condition()
        self._active: List[Request] = []
        self.tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
        self.running: List[Tuple[GenerateRequest, int]] = []  # rows of the runner's decode cache, in order
        self.next_tokens: List[int] = []
        self.capacity = 0  # KV slots per row of the decode cache
        self._turn = 0
        self.peak_batch_tokens = 0
        self.totals = {"requests": 0, "batches": 0, "tokens_computed": 0, "tokens_saved": 0, "decode_steps": 0,
                       "decode_rows": 0, "peak_decode_rows": 0, "peak_decode_requests": 0}

    # -- caller threads -----------------------------------------------------------------------
    def add(self, req: Request) -> None:
        with self._cond:
            self._active.append(req)
            self.totals["requests"] += 1
            self._cond.notify()

    def wake(self) -> None:
        """Wake a ``schedule`` call that is waiting for work (the engine is stopping)."""
        with self._cond:
            self._cond.notify_all()

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._active)

    # -- engine thread --------------------------------------------------------------------------
    def schedule(self, timeout: Optional[float] = None):
        """The next step, or None when there is nothing to do (after waiting up to ``timeout``)."""
        with self._cond:
            if not self._active and not self.running:
                self._cond.wait(timeout)
            reqs = sorted(self._active, key=Request.sort_key)
        live = []
        for r in reqs:
            if not r.done.is_set() and r.cancelled:
                r.fail(Cancelled("request cancelled"))
            if not r.done.is_set():
                live.append(r)
        with self._cond:
            self._active = [r for r in self._active if not r.done.is_set()]
        step = self._prefix_step(live)
        if step is not None:
            return step
        kinds = (self._decode_step, self._prefill_step, self._passage_step, self._score_step)
        for k in range(len(kinds)):
            i = (self._turn + k) % len(kinds)
            step = kinds[i](live)
            if step is not None:
                self._turn = i + 1
                return step
        if live:  # requests waiting on something else (none today): do not spin
            with self._cond:
                self._cond.wait(0.005)
        return None

    def postprocess(self, step, out) -> None:
        {PrefixStep: self._done_prefix, ScoreStep: self._done_score, PassageStep: self._done_passage,
         PrefillStep: self._done_prefill, DecodeStep: self._done_decode}[type(step)](step, out)

    def fail(self, step, err: BaseException) -> None:
        """The step raised: fail the requests it served (never the engine)."""
        if isinstance(step, PrefixStep):
            reqs = [r for rs in step.requests.values() for r in rs]
        elif isinstance(step, ScoreStep):
            reqs = [r for r, _ in step.items]
        elif isinstance(step, PassageStep):
            reqs = [r for r, _ in step.items + step.index_items]
            new = {k for k, _, _ in step.encode}  # their rows were never written: nobody may find them
            self.passage_cache.discard([step.entries[k] for k in new])
            self.passage_cache.release([e for k, e in step.entries.items() if k not in new])
        elif isinstance(step, PrefillStep):  # the runner's decode cache is lost: every running row with it
            reqs = [step.request] + [r for r, _ in self.running]
            self._reset_decode()
        else:
            reqs = [r for r, _ in self.running]
            self._reset_decode()
        for r in {id(r): r for r in reqs}.values():
            r.fail(err)

    # -- prefixes -------------------------------------------------------------------------------
    def _prefix_step(self, live: List[Request]) -> Optional[PrefixStep]:
        todo: Dict[Tuple[int, ...], List[Request]] = {}
        for r in live:
            if isinstance(r, (ScoreRequest, GenerateRequest)) and r.prefix_key and r.prefix is None:
                if r.prefix_key not in todo:
                    hit = self.prefix_cache.get(r.prefix_key)
                    if hit is not None:
                        r.prefix = hit
                        continue
                todo.setdefault(r.prefix_key, []).append(r)
        if not todo:
            return None
        # Prefixes alone exceed the budget only for huge queries; take them in budget-sized groups.
        keys, tokens = [], 0
        for key in todo:
            if keys and tokens + len(key) > self.max_batch_tokens:
                break
            keys.append(key)
            tokens += len(key)
        return PrefixStep(keys, {k: todo[k] for k in keys})

    def _done_prefix(self, step: PrefixStep, entries: List[PrefixKV]) -> None:
        tokens = sum(len(k) for k in step.keys)
        for key, entry in zip(step.keys, entries):
            self.prefix_cache.put(key, entry)
            for i, r in enumerate(step.requests[key]):
                r.prefix = entry
                if i == 0 and isinstance(r, ScoreRequest):
                    # tokens_saved counts the prefix tokens each document read instead of computing,
                    # less the prefix tokens computed once: tokens without sharing - tokens computed.
                    r.stats["tokens_computed"] += len(key)
                    r.stats["tokens_saved"] -= len(key)
        self.totals["tokens_computed"] += tokens
        self.totals["tokens_saved"] -= tokens
        self.totals["batches"] += 1

    # -- scoring and embedding ------------------------------------------------------------------
    def _score_step(self, live: List[Request]) -> Optional[ScoreStep]:
        live = [r for r in live if isinstance(r, ScoreRequest) and (r.prefix_key is None or r.prefix is not None)]
        if not live:
            return None
        t0 = time.perf_counter()
        budget, used, batch = self.max_batch_tokens, 0, []
        share = max(1, budget // len(live))
        for fair in (True, False):
            for r in live:
                if r.done.is_set() or not self._refill(r):
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
                    if not r.pending and not self._refill(r):
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

    def _refill(self, r: ScoreRequest) -> bool:
        """Tokenized sequences pending for ``r``; False when its input failed (only it fails)."""
        try:
            r.refill(self.tokenizer_pool)
            return True
        except Exception as e:
            r.fail(e)
            return False

    def _done_score(self, step: ScoreStep, out) -> None:
        logits, values, forward_s, head_s = out
        tokens = sum(s.cost for s in step.seqs)
        self.peak_batch_tokens = max(self.peak_batch_tokens, tokens)
        self.totals["batches"] += 1
        self.totals["tokens_computed"] += tokens
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
            self.totals["tokens_saved"] += saved
        for k, (r, s) in enumerate(step.items):
            if not r.done.is_set():
                r.deliver(s.index, None if logits is None else float(logits[k]), values[k])

    # -- encoder-decoder pairs (KaLM-Reranker) --------------------------------------------------
    def _passage_step(self, live: List[Request]) -> Optional[PassageStep]:
        live = [r for r in live if isinstance(r, PassageRequest) and r.pending]
        if not live:
            return None
        cache, budget = self.passage_cache, self.max_batch_tokens
        step = PassageStep([], [], {}, [], [])
        dec_tokens = enc_tokens = blocks = 0
        for r in live:
            while r.pending:
                s = r.seqs[r.pending[0]]
                key = r.keys[s.index]
                rows = -(-len(s.passage) // r.ratio)  # pooled vectors of the passage
                known = key in step.entries
                need = 0 if known else cache.blocks_for(rows)
                new_enc = 0 if known or cache.contains(key) else len(s.passage)
                # Decoder tokens, newly encoded tokens and pinned blocks stay within their budgets; the
                # first item always fits (the pool holds at least one longest passage).
                if (step.items or step.index_items) and (
                        dec_tokens + s.cost > budget or blocks + need > cache.num_blocks
                        or (new_enc and enc_tokens + new_enc > budget)):
                    return step
                r.pending.popleft()
                if not known:
                    e = cache.get(key)
                    if e is None:
                        e = cache.put(key, rows)
                        if e is None:
                            raise RuntimeError("passage cache has no room for one step's passages (planning bug)")
                        step.encode.append((key, s.passage, r.ratio))
                        r.stats["passages_encoded"] += 1
                        r.stats["encoder_tokens"] += len(s.passage)
                    else:
                        r.stats["passage_cache_hits"] += 1
                    step.entries[key] = e
                blocks += need
                enc_tokens += new_enc
                if r.index_only:
                    step.index_items.append((r, s))
                else:
                    step.items.append((r, s))
                    step.keys.append(key)
                    dec_tokens += s.cost
        return step

    def _done_passage(self, step: PassageStep, out) -> None:
        self.passage_cache.release(step.entries.values())
        self.totals["batches"] += 1
        if out is not None:
            logits, scores, encode_s, forward_s = out
        for r, seqs in pair_items(step.index_items):
            r.stats["prompt_tokens"] += sum(s.prompt_tokens for s in seqs)
            r.finish_items(len(seqs))
        if not step.items:
            return
        self.totals["tokens_computed"] += sum(s.cost for _, s in step.items)
        for k, (r, s) in enumerate(step.items):
            r.scores[s.index], r.logits[s.index] = scores[k], logits[k]
        for r, seqs in pair_items(step.items):
            r.stats["decoder_tokens"] += sum(s.cost for s in seqs)
            r.stats["tokens_computed"] += sum(s.cost for s in seqs)
            r.stats["prompt_tokens"] += sum(s.prompt_tokens for s in seqs)
            r.stats["batches"] += 1
            r.stats["forward_s"] += forward_s
            r.stats["encode_s"] += encode_s
            r.finish_items(len(seqs))

    # -- generation: prefill, then continuous batching of decode --------------------------------
    def _alive_rows(self) -> List[int]:
        return [i for i, (r, _) in enumerate(self.running) if not r.done.is_set() and not r.cancelled
                and not r.finished(self.running[i][1])]

    def _compact(self) -> Optional[List[int]]:
        """Drop finished and cancelled rows from the running list; the runner's cache keeps ``keep``."""
        alive = self._alive_rows()
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

    def _decode_step(self, live: List[Request]) -> Optional[DecodeStep]:
        if not self.running:
            return None
        keep = self._compact()
        if not self.running:  # everything finished: let the runner free its cache
            return DecodeStep([], keep=[])
        return DecodeStep(list(self.next_tokens), keep, list(self.running))

    def _done_decode(self, step: DecodeStep, tokens: List[int]) -> None:
        if not step.rows:
            return
        self.totals["decode_steps"] += 1
        self.totals["decode_rows"] += len(step.rows)
        self.totals["peak_decode_rows"] = max(self.totals["peak_decode_rows"], len(step.rows))
        reqs = {id(r) for r, _ in step.rows}
        self.totals["peak_decode_requests"] = max(self.totals["peak_decode_requests"], len(reqs))
        for r, _ in pair_items([(r, None) for r, _ in step.rows]):
            r.stats["decode_steps"] += 1
        self._take_tokens(step.rows, tokens)

    def _take_tokens(self, rows, tokens: List[int]) -> None:
        self.next_tokens = list(tokens)
        for (r, i), t in zip(rows, tokens):
            if not r.done.is_set():
                r.append(i, int(t))

    def _prefill_step(self, live: List[Request]) -> Optional[PrefillStep]:
        per_token, per_seq = self.kv_bytes
        n_run = len(self._alive_rows())
        for r in live:
            if not isinstance(r, GenerateRequest) or not r.waiting or (r.prefix_key and r.prefix is None):
                continue
            rows, tokens, cap = [], 0, (self.capacity if n_run else 0)
            for i in r.waiting:
                c = max(cap, r.capacity(i))
                fits = (n_run + len(rows) + 1) * (c * per_token + per_seq) <= self.decode_bytes
                if not fits and (rows or n_run):  # one row always fits an empty cache
                    break
                if rows and tokens + r.seqs[i].cost > self.max_batch_tokens:
                    break
                rows.append(i)
                tokens += r.seqs[i].cost
                cap = c
            if not rows:
                continue
            for _ in rows:
                r.waiting.popleft()
            keep = self._compact()
            return PrefillStep(r, rows, [r.seqs[i] for i in rows], r.prefix, cap, keep)
        return None

    def _done_prefill(self, step: PrefillStep, first: List[int]) -> None:
        r = step.request
        self.capacity = step.capacity
        self.running.extend((r, i) for i in step.rows)
        self.next_tokens.extend(int(t) for t in first)
        tokens = sum(s.cost for s in step.seqs)
        r.stats["prefill_tokens"] += tokens
        r.stats["tokens_computed"] += tokens
        r.stats["batches"] += 1
        self.totals["batches"] += 1
        self.totals["tokens_computed"] += tokens
        for i, t in zip(step.rows, first):
            if not r.done.is_set():
                r.append(i, int(t))

    def _reset_decode(self) -> None:
        self.running, self.next_tokens, self.capacity = [], [], 0




