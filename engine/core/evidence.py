"""Prism-Reranker's contribution and evidence: greedy decoding through the engine loop.

Scoring needs no decoding. On request, ``Reranker.rank(return_evidence=True)`` scores and
decodes from one prefill per document (``Generator.score_and_decode``): one
``ScoredGenerateRequest`` whose prefill gives each document's yes/no score and the K/V (and
DeltaNet states) its answer continues from; only the documents the ranking will return with a
score of at least the threshold go on decoding (``evidence_selector``), the others' caches are
dropped at once. ``Generator.evidence`` decodes given documents from a prefill of their own (the
path that prefills a scored document twice). The generated text is parsed into its tagged parts
here.
"""
import re
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from engine.core.request import merge_stats
from engine.prompts.chunking import aggregate
from engine.core.steps.generate import GenerateRequest, ScoredGenerateRequest
from engine.sequence import Seqs

EVIDENCE_TAGS = ("contribution", "evidence")
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def parse_evidence(text: str) -> Dict[str, Optional[str]]:
    """``{contribution, evidence}`` from the generated text; a missing or unclosed
    (truncated) tag gives None."""
    out = {}
    for tag in EVIDENCE_TAGS:
        m = re.search(rf"<{tag}>(.*?)</{tag}>", text, flags=re.S)
        out[tag] = m.group(1).strip() if m else None
    return out


def evidence_selector(to_scores: Callable[[np.ndarray, np.ndarray], np.ndarray], threshold: float,
                      min_score: Optional[float] = None, top_n: Optional[int] = None):
    """``select`` of a ScoredGenerateRequest: True for the scored documents that ``rank`` may return
    (``top_n``, ``min_score``) with a score of at least ``threshold``, judged on the scores known so
    far. ``to_scores(logits, scores)``: the scores the ranking reads (calibrated, raw or as given).
    A document ruled out stays out: more scores only add documents ranked above it."""

    def select(logits: np.ndarray, scores: np.ndarray) -> np.ndarray:
        known = ~np.isnan(logits)
        idx = np.flatnonzero(known)
        s = np.asarray(to_scores(logits[idx], scores[idx]), dtype=np.float64)
        ok = s >= threshold
        if min_score is not None:
            ok &= s >= min_score
        if top_n is not None and top_n < len(logits):
            # rank's order: by score, ties by index (a stable sort); a document is in the top n while
            # fewer than n known documents come before it
            order = np.lexsort((idx, -s))
            rank = np.empty(len(idx), dtype=np.int64)
            rank[order] = np.arange(len(idx))
            ok &= rank < top_n
        out = np.zeros(len(logits), dtype=bool)
        out[idx] = ok
        return out

    return select


def chunk_selector(to_scores: Callable[[np.ndarray, np.ndarray], np.ndarray], owners: Sequence[int], how: str,
                   threshold: float, min_score: Optional[float] = None, top_n: Optional[int] = None):
    """``select`` over the chunks of chunked documents (``owners[c]``: chunk c's document, ``how``: the
    aggregate): True for a scored chunk that may still be the deciding chunk (``chunk`` of the result,
    engine.prompts.chunking.aggregate) of a document ``rank`` returns with a score of at least
    ``threshold``. A document's score is judged once it is known (its best chunk so far for max, its
    first chunk for first, all its chunks for mean); until then its best chunk stays in."""
    per: List[List[int]] = [[] for _ in range(max(owners) + 1 if len(owners) else 0)]
    for c, d in enumerate(owners):
        per[d].append(c)
    docs = np.arange(len(per))

    def select(logits: np.ndarray, scores: np.ndarray) -> np.ndarray:
        known = ~np.isnan(logits)
        idx = np.flatnonzero(known)
        s = np.full(len(logits), np.nan)
        s[idx] = np.asarray(to_scores(logits[idx], scores[idx]), dtype=np.float64)
        lower = np.full(len(per), -np.inf)  # a bound under each document's final score (its score once known)
        cand = {}  # document -> (its deciding chunk among the scored ones, its score or None while unknown)
        for d, cs in enumerate(per):
            ks = [c for c in cs if known[c]]
            if not ks or (how == "first" and not known[cs[0]]):
                continue
            value, best = aggregate([float(s[c]) for c in ks], how)
            if how == "mean" and len(ks) < len(cs):
                cand[d] = (ks[best], None)
                continue
            lower[d] = value
            cand[d] = (ks[best], value)
        out = np.zeros(len(logits), dtype=bool)
        for d, (c, v) in cand.items():
            if v is not None:
                if v < threshold or (min_score is not None and v < min_score):
                    continue
                # rank's order: by score, ties by index; out once n documents come before it
                if top_n is not None and int(((lower > v) | ((lower == v) & (docs < d))).sum()) >= top_n:
                    continue
            out[c] = True
        return out

    return select


class Generator:
    """Greedy decoding through an engine's loop (causal LMs: Qwen3, Qwen3.5)."""

    def __init__(self, engine):
        if not engine.runner.model.supports_decode:
            raise ValueError(f"{engine.arch} is not a causal LM; it cannot generate")
        self.engine = engine
        vocab = engine.tokenizer.get_vocab()
        self.stop_ids = [vocab[t] for t in STOP_TOKENS if t in vocab]

    def generate(self, tails: Sequence[List[int]], head: Optional[List[int]] = None, max_new_tokens: int = 512,
                 stop_ids: Optional[Sequence[int]] = None, cancel=None, stats: Optional[dict] = None,
                 priority: int = 0) -> List[List[int]]:
        """Greedy continuations of ``head + tail`` for each tail (the stop token included when reached).

        With ``head``, its K/V and states come from (or go to) the engine's PrefixCache.
        """
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if not tails:
            return []
        seqs = Seqs.of([list(t) for t in tails], prefix=tuple(head) if head else None)
        req = GenerateRequest(seqs, max_new_tokens, self.stop_ids if stop_ids is None else stop_ids, head,
                              priority=priority, cancel=cancel)
        try:
            return self.engine.submit(req).wait()
        finally:
            merge_stats(stats, req.stats)

    def score_and_decode(self, template, query: str, docs: Sequence[str], select, instruction: Optional[str] = None,
                         max_new_tokens: int = 512, share_prefix: bool = True, cancel=None,
                         stats: Optional[dict] = None, priority: int = 0):
        """Score every document and decode, from the same prefill, those ``select`` keeps (see
        ScoredGenerateRequest): ``(logits [n], scores [n], answers)``, ``answers[i]`` as in ``evidence``
        for a decoded document, None for the others."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        head = template.encode_head(query, instruction) if share_prefix and template.supports_prefix else None
        if head is not None:
            seqs = template.encode_tails(head, list(docs))
        else:
            seqs = template.encode([query] * len(docs), list(docs), instruction)
        req = ScoredGenerateRequest(seqs, max_new_tokens, self.stop_ids, select, head, priority=priority,
                                    cancel=cancel)
        try:
            logits, scores, outputs = self.engine.submit(req).wait()
        finally:
            merge_stats(stats, req.stats)
        answers = [self.answer(ids) if ids else None for ids in outputs]
        return logits, scores, answers

    def answer(self, ids: List[int]) -> Dict[str, object]:
        """``{raw_output, contribution, evidence, tokens}`` of a generated sequence (the stop token
        is not part of the text)."""
        body = ids[:-1] if ids and ids[-1] in self.stop_ids else ids
        text = self.engine.tokenizer.decode(body, skip_special_tokens=False)
        return {"raw_output": text, **parse_evidence(text), "tokens": len(ids)}

    def evidence(self, template, query: str, docs: Sequence[str], instruction: Optional[str] = None,
                 max_new_tokens: int = 512, share_prefix: bool = True, cancel=None,
                 stats: Optional[dict] = None) -> List[Dict[str, object]]:
        """Decode each document's answer; ``[{raw_output, contribution, evidence, tokens}]``."""
        head = template.encode_head(query, instruction) if share_prefix and template.supports_prefix else None
        if head is not None:
            tails = template.encode_tails(head, list(docs)).ids
        else:
            tails = template.encode([query] * len(docs), list(docs), instruction).ids
        return [self.answer(ids) for ids in self.generate(tails, head, max_new_tokens, cancel=cancel, stats=stats)]
