"""Prism-Reranker's contribution and evidence: greedy decoding through the engine loop.

Scoring needs no decoding. On request, ``Reranker.rank(return_evidence=True)`` hands the
documents that pass a score threshold to a ``Generator``, which submits one
``GenerateRequest``; the engine loop prefills and decodes it (engine.core.decode) and the
generated text is parsed into its tagged parts here.
"""
import re
from typing import Dict, List, Optional, Sequence

from engine.core.request import merge_stats
from engine.core.steps.generate import GenerateRequest
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

    def evidence(self, template, query: str, docs: Sequence[str], instruction: Optional[str] = None,
                 max_new_tokens: int = 512, share_prefix: bool = True, cancel=None,
                 stats: Optional[dict] = None) -> List[Dict[str, object]]:
        """Decode each document's answer; ``[{raw_output, contribution, evidence, tokens}]``."""
        head = template.encode_head(query, instruction) if share_prefix and template.supports_prefix else None
        if head is not None:
            tails = template.encode_tails(head, list(docs)).ids
        else:
            tails = template.encode([query] * len(docs), list(docs), instruction).ids
        seqs = self.generate(tails, head, max_new_tokens, cancel=cancel, stats=stats)
        stop = set(self.stop_ids)
        out = []
        for ids in seqs:
            body = ids[:-1] if ids and ids[-1] in stop else ids
            text = self.engine.tokenizer.decode(body, skip_special_tokens=False)
            out.append({"raw_output": text, **parse_evidence(text), "tokens": len(ids)})
        return out
