"""The model behind the server and the CLI: one loaded runner answering rank, score and embed calls.

Calls are synchronous and safe to make from many threads at once; the server
runs each request in a worker thread, so concurrent requests reach the engine
together and can share its batches. An embed-task model serves rerank too (by
cosine, as ``Reranker`` over an embedding model does), from the same weights.

Long texts are always truncated, never rejected: to the model's context by the
template, or here, at a token boundary, to ``max_tokens_per_doc`` or from the
left end (TEI ``truncation_direction``). Usage counts (``prompt_tokens``) come
from a private copy of the tokenizer plus the template's fixed overhead, and may
differ from the engine's exact count by a token or two per text.
"""
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
from tokenizers import Tokenizer

from engine.api import Embedder, Reranker
from engine.classifier import Classifier, normalize_labels
from engine.runner import Cancelled


class WrongTask(ValueError):
    """The request needs the other kind of model (e.g. embeddings from a reranker)."""


class Service:
    def __init__(self, model, task: Optional[str] = None, device=None, dtype=None, max_length: int = 8192,
                 max_batch_tokens: Optional[int] = None, warmup: bool = True, template: Optional[str] = None):
        self.reranker = Reranker(model, task=task, device=device, dtype=dtype, max_length=max_length,
                                 max_batch_tokens=max_batch_tokens, template=template)
        self.runner = self.reranker.runner
        self.task = self.runner.task
        self.embedder = Embedder.from_runner(self.runner) if self.task == "embed" else None
        self.classifier = Classifier(reranker=self.reranker)
        tpl = self.runner.template
        self.max_length = int(getattr(tpl, "max_length", max_length))  # encoders cap it at their positions
        # Token accounting and cutting use a private copy of the Rust tokenizer that is never
        # reconfigured: the engine's own tokenizer is reconfigured per call (truncation budgets) on
        # its threads, and touching it from request threads at the same time fails.
        self.counter = Tokenizer.from_str(self.runner.tokenizer.backend_tokenizer.to_str())
        self.counter.no_truncation()
        self.counter.no_padding()
        # What the template adds around the texts, measured once here: [query-side, per document].
        if self.task == "embed":
            self._overhead = (len(tpl.encode([""], is_query=True).ids[0]), len(tpl.encode([""]).ids[0]))
        else:
            self._overhead = (len(tpl.encode([""], [""]).ids[0]), 0)
        self._default_instruction = getattr(tpl, "default_instruction", None) or ""
        if warmup:
            self.reranker.rank("warm up", ["warm up"])
            if self.embedder is not None:
                self.embedder.embed(["warm up"])

    @property
    def dimension(self) -> Optional[int]:
        return self.embedder.dimension if self.embedder is not None else None

    def stats(self) -> dict:
        """Cumulative engine figures: per-request sums (tokens_computed, tokens_saved, forward_s), with
        engine-wide counts (batches, active requests, peak batch tokens) from the scheduler when there is one."""
        out = dict(self.reranker.stats)
        out.update(self.reranker.cache_stats())
        if self.embedder is not None:
            for k, v in list(self.embedder.stats.items()):
                out[k] = out.get(k, 0) + v
        sched = getattr(self.runner, "scheduler", None)
        if sched is not None:
            # Per-request "batches" counts a shared batch once per request in it; the scheduler's is the real count.
            out["batches"] = getattr(sched, "totals", {}).get("batches", out.get("batches", 0))
            out["peak_batch_tokens"] = getattr(sched, "peak_batch_tokens", 0)
            if hasattr(sched, "queue_depth"):
                out["active_requests"] = sched.queue_depth()
        return out

    def _encode(self, texts: Sequence[str]):
        # One text at a time: encode_batch would wake the Rust thread pool, whose spinning threads
        # take CPU from the model on small machines; counting is cheap enough serially.
        return [self.counter.encode(t, add_special_tokens=False) for t in texts]

    def _count(self, texts: Sequence[str]) -> List[int]:
        return [len(e.ids) for e in self._encode(texts)]

    def _query_tokens(self, queries: Sequence[str], instruction: Optional[str]) -> List[int]:
        """Tokens of the template with each query and no document (rerank), or of each formatted query (embed).

        Counted as template overhead + the query's own tokens, which can differ from the model's
        exact count by a token or two where the pieces meet.
        """
        extra = 0
        if instruction is not None:
            extra = self._count([instruction])[0] - (self._count([self._default_instruction])[0]
                                                     if self._default_instruction else 0)
        return [self._overhead[0] + n + extra for n in self._count(queries)]

    def _fit(self, texts: Sequence[str], limit: Optional[int], left: bool) -> Tuple[List[str], List[int]]:
        """Each text cut to at most ``limit`` tokens (keeping its end when ``left``), and its token count."""
        encs = self._encode(texts)
        out, lens = [], []
        for t, e in zip(texts, encs):
            n = len(e.ids)
            if limit is not None and n > limit:
                t = t[e.offsets[n - limit][0]:] if left else t[:e.offsets[limit - 1][1]]
                n = limit
            out.append(t)
            lens.append(n)
        return out, lens

    def _limit(self, overhead: int, max_tokens: Optional[int], left: bool) -> Optional[int]:
        # Right truncation of what does not fit is the template's job; cutting from the left has to
        # happen here, to the room the template leaves for the text.
        room = max(1, self.max_length - overhead) if left else None
        if max_tokens is None:
            return room
        return max_tokens if room is None else min(max_tokens, room)

    # Calls

    def rank(self, query: str, documents: Sequence[str], top_n: Optional[int] = None,
             instruction: Optional[str] = None, max_tokens_per_doc: Optional[int] = None, left: bool = False,
             raw_scores: bool = False, cancel=None, min_score: Optional[float] = None,
             **generate) -> Tuple[List[dict], int]:
        """(``[{index, score}]`` sorted by score, prompt tokens).

        ``raw_scores`` (TEI): the logit before the activation; a cosine is already raw.
        """
        if not documents:
            return [], 0
        q = self._query_tokens([query], instruction)[0]
        per_doc = self._overhead[1] if self.task == "embed" else q
        docs, lens = self._fit(documents, self._limit(per_doc, max_tokens_per_doc, left), left)
        head_raw = hasattr(self.runner.head, "postprocess")  # cross-encoder heads give raw logits themselves
        ranked = self.reranker.rank(query, docs, top_n=top_n, instruction=instruction, return_documents=False,
                                    cancel=cancel, raw_scores=raw_scores and head_raw, min_score=min_score,
                                    **generate)  # return_evidence, evidence_threshold, max_new_tokens
        if raw_scores and not head_raw and self.task != "embed":
            for r in ranked:  # yes/no head: score = sigmoid(logit)
                s = min(max(r["score"], 1e-45), 1.0 - 2 ** -53)
                r["score"] = math.log(s) - math.log1p(-s)
        tokens = sum(min(per_doc + n, self.max_length) for n in lens)
        return ranked, tokens + (q if self.task == "embed" else 0)

    def score(self, queries: Sequence[str], documents: Sequence[str], instruction: Optional[str] = None,
              cancel=None) -> Tuple[List[float], int]:
        """(scores of the pairs in order, prompt tokens)."""
        if not queries:
            return [], 0
        uniq = list(dict.fromkeys(queries))
        q = dict(zip(uniq, self._query_tokens(uniq, instruction)))
        lens = self._count(documents)
        scores = self.reranker.predict(list(zip(queries, documents)), instruction=instruction, cancel=cancel)
        if self.task == "embed":
            tokens = sum(q.values()) + sum(min(self._overhead[1] + n, self.max_length) for n in lens)
        else:
            tokens = sum(min(q[x] + n, self.max_length) for x, n in zip(queries, lens))
        return scores, tokens

    def embed(self, texts: Sequence[str], dimensions: Optional[int] = None, normalize: bool = True,
              instruction: Optional[str] = None, max_tokens: Optional[int] = None, left: bool = False,
              cancel=None) -> Tuple[np.ndarray, int]:
        """(``[n, d]`` float32 embeddings, prompt tokens); ``instruction`` embeds the texts as queries."""
        if self.embedder is None:
            raise WrongTask(f"this server hosts a {self.task} model; embeddings need an embedding model "
                            f"(serve one with --task embed)")
        if dimensions is not None and dimensions > self.dimension:
            raise ValueError(f"dimensions={dimensions} is larger than the embedding size {self.dimension}")
        overhead = self._overhead[1] if instruction is None else self._query_tokens([""], instruction)[0]
        cut, lens = self._fit(texts, self._limit(overhead, max_tokens, left), left)
        emb = self.embedder.embed(cut, dimensions=dimensions, instruction=instruction,
                                  is_query=instruction is not None, normalize=normalize, cancel=cancel)
        return emb, sum(min(overhead + n, self.max_length) for n in lens)

    def classify(self, texts: Sequence[str], labels, multi_label: bool = False, threshold: Optional[float] = None,
                 instruction: Optional[str] = None, cancel=None) -> Tuple[List[dict], int]:
        """(``[{index, label, scores}]``, prompt tokens): every text against every label description."""
        names, descs = normalize_labels(labels)
        stats: dict = {}
        out = self.classifier.classify(texts, labels, instruction=instruction, multi_label=multi_label,
                                       threshold=threshold, stats=stats, cancel=cancel)
        tokens = int(stats.get("tokens_computed", 0) + stats.get("tokens_saved", 0))
        return out, tokens

    def index(self, documents: Sequence[str], compression_ratio: Optional[int] = None,
              cancel=None) -> Tuple[dict, int]:
        """Pre-encode passages into the passage cache (KaLM-Reranker): (counts, prompt tokens)."""
        if cancel is not None and cancel.is_set():
            raise Cancelled("request cancelled")
        out = self.reranker.index(documents, compression_ratio=compression_ratio)
        return out, sum(self._count(documents))
