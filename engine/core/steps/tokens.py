"""Per-token hidden states (TEI's ``/embed_all``): every token's final state, not a pooled vector.

A ``TokenStatesRequest`` holds tokenized sequences; a step packs waiting sequences under the token
budget (at least one), runs the whole model (every row of the last layer, never the last rows
alone) and reads each token's state as the model's pooling head sees it: the final norm applied
(decoders, as last-token pooling applies it to its one row), or the encoder's output as it is
(BERT-like embedders, whose pooling reads those rows). The states are not normalized.
"""
import time
from collections import deque
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from engine.core.request import Request, pair_items
from engine.core.steps.base import StepKind
from engine.sequence import Seq


class TokenStatesRequest(Request):
    """Sequences whose per-token states are wanted: result ``[len_i, H]`` float32 per sequence."""

    counts_prefix_tokens = True

    def __init__(self, seqs: Sequence[Seq], priority: int = 0, cancel=None):
        super().__init__(priority, cancel)
        self.n = len(seqs)
        for k, s in enumerate(seqs):
            if s.cost == 0:
                raise ValueError(f"input {k} is empty after tokenization")
            if s.prefix is not None or s.passage is not None or s.multimodal:
                raise ValueError("per-token states take plain token sequences (no shared prefix, passage or image)")
            s.index = k
        self.pending = deque(seqs)
        self.states: List[Optional[np.ndarray]] = [None] * self.n
        self.remaining = self.n
        self.stats["sequences"] = self.n
        if self.n == 0:
            self.done.set()

    def deliver(self, index: int, states: np.ndarray) -> None:
        self.states[index] = states
        self.remaining -= 1
        if self.remaining == 0:
            self.done.set()

    def result(self) -> List[np.ndarray]:
        return list(self.states)


@dataclass
class TokenStatesStep:
    items: List[Tuple[TokenStatesRequest, Seq]]


def token_states(runner, hidden, residual, ctx) -> torch.Tensor:
    """``[T, H]`` float32: each row as the model's pooling head reads it."""
    from engine.models.heads import LastTokenPooling, PoolingHead

    head = runner.head
    if isinstance(head, PoolingHead):  # encoders: the last layer's output is the state
        return hidden.float()
    if isinstance(head, LastTokenPooling):  # decoders: the final norm, applied to every row
        ctx.last_index = torch.arange(hidden.shape[0], device=hidden.device)
        return head(hidden, residual, ctx, runner.model)[1]
    raise ValueError("per-token states need an embedding model (its pooling head); this model scores pairs")


class TokenStatesKind(StepKind):
    name = "tokens"

    def schedule(self, sched, live) -> Optional[TokenStatesStep]:
        budget, used, batch = sched.max_batch_tokens, 0, []
        for r in live:
            if not isinstance(r, TokenStatesRequest) or r.done.is_set():
                continue
            while r.pending and (not batch or used + r.pending[0].cost <= budget):
                s = r.pending.popleft()
                batch.append((r, s))
                used += s.cost
            if used >= budget:
                break
        return TokenStatesStep(batch) if batch else None

    def run(self, runner, step: TokenStatesStep):
        t0 = time.perf_counter()
        model = runner.model
        seqs = [s for _, s in step.items]
        ids, ctx = model.plan(seqs, runner.device)
        hidden, residual = runner.forward(ids, ctx)
        t1 = time.perf_counter()
        states = token_states(runner, hidden, residual, ctx).cpu().numpy()
        return states, t1 - t0, time.perf_counter() - t1

    def finish(self, sched, step: TokenStatesStep, out) -> None:
        states, forward_s, head_s = out
        tokens = sum(s.cost for _, s in step.items)
        sched.peak_batch_tokens = max(sched.peak_batch_tokens, tokens)
        sched.totals["batches"] += 1
        sched.totals["tokens_computed"] += tokens
        for r, seqs in pair_items(step.items):
            n_tok = sum(s.cost for s in seqs)
            r.stats["tokens_computed"] += n_tok
            r.stats["prompt_tokens"] += n_tok
            r.stats["batches"] += 1
            r.stats["forward_s"] += forward_s * n_tok / tokens
            r.stats["head_s"] += head_s * n_tok / tokens
        start = 0
        for r, s in step.items:
            end = start + s.cost
            if not r.done.is_set():
                r.deliver(s.index, np.ascontiguousarray(states[start:end]))
            start = end
