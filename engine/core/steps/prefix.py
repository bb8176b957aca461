"""Shared prefixes (system + instruction + query): each computed once, its K/V kept in the PrefixCache.

Any request with a ``prefix_key`` (a tuple of token ids) and no ``prefix`` yet waits for this
kind: it finds the prefix in the cache or computes it in a PrefixStep, and every one of the
request's sequences then continues after it (positions from len(prefix), attending to its
cached K/V; linear-attention layers start from its final states).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from engine.context import build_context
from engine.core.cache import PrefixKV
from engine.core.steps.base import StepKind


@dataclass
class PrefixStep:
    keys: List[Tuple[int, ...]]
    requests: Dict[Tuple[int, ...], list]


def waiting_for_prefix(r) -> bool:
    return bool(getattr(r, "prefix_key", None)) and r.prefix is None


class PrefixKind(StepKind):
    name = "prefix"
    first = True

    def schedule(self, sched, live) -> Optional[PrefixStep]:
        todo: Dict[Tuple[int, ...], list] = {}
        for r in live:
            if not waiting_for_prefix(r):
                continue
            if r.prefix_key not in todo:
                hit = sched.prefix_cache.get(r.prefix_key)
                if hit is not None:
                    r.prefix = hit
                    continue
            todo.setdefault(r.prefix_key, []).append(r)
        if not todo:
            return None
        # Prefixes alone exceed the budget only for huge queries; take them in budget-sized groups.
        keys, tokens = [], 0
        for key in todo:
            if keys and tokens + len(key) > sched.max_batch_tokens:
                break
            keys.append(key)
            tokens += len(key)
        return PrefixStep(keys, {k: todo[k] for k in keys})

    def run(self, runner, step: PrefixStep) -> List[PrefixKV]:
        """Run the prefixes once and keep each layer's K/V: [layers, P, Hkv, D] per prefix."""
        heads = [list(k) for k in step.keys]
        ids, ctx = build_context(heads, runner.device)
        ctx.capture_kv = []
        ctx.capture_state = []  # linear-attention layers (Qwen3.5): final states per prefix
        runner.model(ids, ctx)
        ks = torch.stack([k for k, _ in ctx.capture_kv])  # [layers, T, Hkv, D]
        vs = torch.stack([v for _, v in ctx.capture_kv])
        convs = torch.stack([c for c, _ in ctx.capture_state]) if ctx.capture_state else None  # [lin, n, C, K-1]
        states = torch.stack([s for _, s in ctx.capture_state]) if ctx.capture_state else None  # [lin, n, Hv, Dk, Dv]
        out, off = [], 0
        for j, h in enumerate(heads):
            out.append(PrefixKV(ks[:, off : off + len(h)].clone(), vs[:, off : off + len(h)].clone(),
                                None if convs is None else convs[:, j].clone(),
                                None if states is None else states[:, j].clone()))
            off += len(h)
        return out

    def finish(self, sched, step: PrefixStep, entries: List[PrefixKV]) -> None:
        tokens = sum(len(k) for k in step.keys)
        for key, entry in zip(step.keys, entries):
            sched.prefix_cache.put(key, entry)
            for i, r in enumerate(step.requests[key]):
                r.prefix = entry
                if i == 0 and r.counts_prefix_tokens:
                    # tokens_saved counts the prefix tokens each document read instead of computing,
                    # less the prefix tokens computed once: tokens without sharing - tokens computed.
                    r.stats["tokens_computed"] += len(key)
                    r.stats["tokens_saved"] -= len(key)
        sched.totals["tokens_computed"] += tokens
        sched.totals["tokens_saved"] -= tokens
        sched.totals["batches"] += 1

    def fail(self, sched, step: PrefixStep, err):
        return [r for rs in step.requests.values() for r in rs]
