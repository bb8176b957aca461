"""Encoder-decoder pairs (KaLM-Reranker): passages encoded once into the paged PassageCache, prompts
decoded against them (engine/core/passages.py holds the encoding).

Each PassageStep pins its passages in the pool (the missing ones allocated there and encoded
by this step), then runs the decoder on its prompts; decoder tokens, newly encoded tokens and
pinned blocks stay within their budgets.
"""
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Tuple

import numpy as np

from engine.core.cache import PassageEntry
from engine.core.passages import encode_passages
from engine.core.pending import Readback
from engine.core.request import Request, pair_items
from engine.core.store import CorruptEntry, load_rows
from engine.core.steps.base import StepKind, step_requests
from engine.sequence import Seq, Seqs

log = logging.getLogger("engine.store")


class PassageRequest(Request):
    """Encoder-decoder pairs: ``seqs[i]`` is a decoder prompt whose ``passage`` is cached under
    ``keys[i]``. Results: ``scores`` and ``logits`` ``[n]``. ``index_only``: encode and cache the
    passages, score nothing."""

    def __init__(self, seqs: Seqs, keys: List[bytes], ratio: int, index_only: bool = False, priority: int = 0,
                 cancel: Optional[threading.Event] = None, stored: Optional[list] = None):
        super().__init__(priority, cancel)
        self.seqs, self.keys, self.ratio, self.index_only = list(seqs), keys, ratio, index_only
        # Per sequence: its passage's entry in the on-disk store (engine/core/store.py), or None.
        # A miss in the pool reads the entry instead of encoding it.
        self.stored = stored
        for i, s in enumerate(self.seqs):
            s.index = i
        self.pending: Deque[int] = deque(range(len(self.seqs)))
        self.scores = np.zeros(len(self.seqs), dtype=np.float32)
        self.logits = np.zeros(len(self.seqs), dtype=np.float32)
        self.remaining = len(self.seqs)
        self.stats.update(sequences=len(self.seqs), passages_encoded=0, passage_cache_hits=0, encoder_tokens=0,
                          decoder_tokens=0, encode_s=0.0, store_reads=0, store_errors=0)
        if not self.seqs:
            self.done.set()

    def finish_items(self, n: int) -> None:
        self.remaining -= n
        if self.remaining == 0:
            self.done.set()

    def result(self) -> np.ndarray:
        return self.scores


@dataclass
class PassageStep:
    items: List[Tuple[PassageRequest, Seq]]  # decoder prompts to score (none for index requests)
    index_items: List[Tuple[PassageRequest, Seq]]  # passages to encode only
    entries: Dict[bytes, PassageEntry]  # pinned for this step, by passage key
    encode: List[Tuple[bytes, List[int], int]]  # (key, encoder ids, ratio) of the passages this step encodes
    keys: List[bytes]  # per scored item: its passage key
    load: List[Tuple[bytes, object]] = field(default_factory=list)  # (key, stored rows) read from the store


def _read_stored(ref, req: PassageRequest):
    """The stored rows of ``ref``, or None (counted, logged) when the entry is damaged: then the passage
    is encoded from its stored tokens instead, and the damaged bytes are never served."""
    try:
        return ref.read()
    except CorruptEntry as e:
        req.stats["store_errors"] += 1
        log.warning("passage store: %s; encoding it instead", e)
        return None


class PassageKind(StepKind):
    name = "passage"

    def schedule(self, sched, live) -> Optional[PassageStep]:
        live = [r for r in live if isinstance(r, PassageRequest) and r.pending]
        if not live:
            return None
        cache, budget = sched.passage_cache, sched.max_batch_tokens
        step = PassageStep([], [], {}, [], [])
        dec_tokens = enc_tokens = blocks = 0
        for r in live:
            while r.pending:
                s = r.seqs[r.pending[0]]
                key = r.keys[s.index]
                rows = -(-len(s.passage) // r.ratio)  # pooled vectors of the passage
                known = key in step.entries
                need = 0 if known else cache.blocks_for(rows)
                ref = r.stored[s.index] if r.stored is not None else None
                new_enc = 0 if known or cache.contains(key) or ref is not None else len(s.passage)
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
                        loaded = _read_stored(ref, r) if ref is not None else None
                        if loaded is not None:
                            step.load.append((key, loaded))
                            r.stats["store_reads"] += 1
                        else:
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

    def run(self, runner, step: PassageStep):
        """Encode the step's missing passages into the pool, then decode its prompts against their
        cached passages: (logits [n], scores [n], encode s, forward s), or None with nothing to score."""
        t0 = time.perf_counter()
        if step.load:
            load_rows(runner.passage_cache, [step.entries[k] for k, _ in step.load], [x for _, x in step.load],
                      runner.cache_kv)
        if step.encode:
            todo = [(step.entries[k], ids, r) for k, ids, r in step.encode]
            encode_passages(runner.model, runner.passage_cache, todo, runner.device, cache_kv=runner.cache_kv)
        t1 = time.perf_counter()
        if not step.items:
            return None
        seqs = [s for _, s in step.items]
        ids, ctx = runner.model.plan(seqs, runner.device, passages=[step.entries[k] for k in step.keys],
                                     passage_cache=runner.passage_cache, cache_kv=runner.cache_kv)
        hidden, residual = runner.forward(ids, ctx)
        logit, score = runner.head(hidden, residual, ctx, runner.model)

        def host(out):  # forward_s: until the results are on the host
            return out[0].numpy(), out[1].numpy(), t1 - t0, time.perf_counter() - t1

        return Readback([logit.float(), score.float()], host)

    def finish(self, sched, step: PassageStep, out) -> None:
        sched.passage_cache.release(step.entries.values())
        sched.totals["batches"] += 1
        if out is not None:
            logits, scores, encode_s, forward_s = out
        for r, seqs in pair_items(step.index_items):
            r.stats["prompt_tokens"] += sum(s.prompt_tokens for s in seqs)
            r.finish_items(len(seqs))
        if not step.items:
            return
        sched.totals["tokens_computed"] += sum(s.cost for _, s in step.items)
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

    def fail(self, sched, step: PassageStep, err):
        # Their rows were never written: nobody may find them.
        new = {k for k, _, _ in step.encode} | {k for k, _ in step.load}
        sched.passage_cache.discard([step.entries[k] for k in new])
        sched.passage_cache.release([e for k, e in step.entries.items() if k not in new])
        return step_requests(step) + [r for r, _ in step.index_items]
