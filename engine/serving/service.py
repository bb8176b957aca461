"""The model behind the server and the CLI: one loaded engine answering rank, score and embed calls.

Calls are synchronous and safe to make from many threads at once; the server
runs each request in a worker thread, so concurrent requests reach the engine
loop together and share its batches. An embed-task model serves rerank too (by
cosine, as ``Reranker`` over an embedding model does), from the same weights.

Long texts are always truncated, never rejected: to the model's context by the
template, or, at a token boundary, to ``max_tokens_per_doc`` or from the left end
(TEI ``truncation_direction``); engine.prompts.truncation decides both. Texts are
cut by characters before any tokenizer sees them, so a huge document costs memory
for the part that is used only. Usage counts (``prompt_tokens``) are the engine's
own: the tokens of every sequence as the model sees it, shared prefix included.
"""
from typing import List, Optional, Sequence, Tuple

import numpy as np

from engine.api import Embedder, Reranker
from engine.classifier import Classifier
from engine.config import EngineConfig
from engine.core import stored_docs
from engine.core.request import Cancelled
from engine.prompts.truncation import TokenBudget


class WrongTask(ValueError):
    """The request needs the other kind of model (e.g. embeddings from a reranker)."""


class Service:
    """``Service(model, config=EngineConfig(...), warmup=True, **options)``: ``options`` are fields of
    EngineConfig (as Reranker's keyword arguments), over ``config``."""

    def __init__(self, model=None, config: Optional[EngineConfig] = None, warmup: bool = True, **options):
        self.config = EngineConfig.build(config, model=model, **options)
        self.reranker = Reranker(config=self.config)
        self.engine = self.reranker.engine
        self.task = self.engine.task
        self.embedder = Embedder.from_engine(self.engine) if self.task == "embed" else None
        self.classifier = Classifier(reranker=self.reranker)
        tpl = self.engine.template
        # Models that take images (Qwen3-VL): queries and documents may be lists of parts with images
        # (the engine set their limits from the config).
        self.multimodal = tpl.multimodal
        self.max_length = int(tpl.max_length)  # encoders cap it at their positions
        self.budget = TokenBudget(tpl, self.engine.tokenizer, self.task)
        if warmup:
            self.reranker.rank("warm up", ["warm up"])
            if self.embedder is not None:
                self.embedder.embed(["warm up"])

    @property
    def dimension(self) -> Optional[int]:
        return self.embedder.dimension if self.embedder is not None else None

    def stats(self) -> dict:
        """Cumulative engine figures: per-request sums (tokens_computed, tokens_saved, forward_s), with
        engine-wide counts (batches, active requests, peak batch tokens) from the scheduler."""
        out = dict(self.reranker.stats)
        out.update(self.reranker.cache_stats())
        if self.embedder is not None:
            for k, v in list(self.embedder.stats.items()):
                out[k] = out.get(k, 0) + v
        sched = self.engine.scheduler
        # Engine-wide counts, updated as each batch finishes (per-request sums arrive only when a request
        # ends, and a shared batch would count once per request in it); a cancelled request stops adding.
        out["batches"] = sched.totals["batches"]
        out["tokens_computed"] = sched.totals["tokens_computed"]
        out["tokens_saved"] = sched.totals["tokens_saved"]
        out["peak_batch_tokens"] = sched.peak_batch_tokens
        out["active_requests"] = sched.queue_depth()
        return out

    # Calls

    def rank(self, query: str, documents: Sequence[str], top_n: Optional[int] = None,
             instruction: Optional[str] = None, max_tokens_per_doc: Optional[int] = None, left: bool = False,
             raw_scores: bool = False, cancel=None, min_score: Optional[float] = None,
             **generate) -> Tuple[List[dict], int]:
        """(``[{index, score}]`` sorted by score, prompt tokens).

        ``raw_scores`` (TEI): the exact logit before the activation; a cosine is already raw.
        """
        if not documents:
            return [], 0
        docs = stored_docs.fit_documents(self.budget, self.reranker, documents, query, instruction,
                                         max_tokens_per_doc, left)  # documents given by id pass as they are
        call: dict = {}
        ranked = self.reranker.rank(query, docs, top_n=top_n, instruction=instruction, return_documents=False,
                                    cancel=cancel, raw_scores=raw_scores, min_score=min_score, stats=call,
                                    **generate)  # return_evidence, evidence_threshold, max_new_tokens
        return ranked, int(call.get("prompt_tokens", 0))

    def score(self, queries: Sequence[str], documents: Sequence[str], instruction: Optional[str] = None,
              cancel=None, raw_scores: bool = False, chunking=None) -> Tuple[List[float], int]:
        """(scores of the pairs in order, or their exact logits with ``raw_scores``; prompt tokens).
        With ``chunking``: ``{score, chunk[, chunks]}`` per pair instead of scores."""
        if not queries:
            return [], 0
        stored_docs.check_by_id(self.reranker, documents)
        call: dict = {}
        if chunking is not None:
            out = self.reranker.score_chunks(list(zip(queries, documents)), chunking, instruction=instruction,
                                             cancel=cancel, raw_scores=raw_scores, stats=call)
            return out, int(call.get("prompt_tokens", 0))
        scores = self.reranker.predict(list(zip(queries, documents)), instruction=instruction, cancel=cancel,
                                       raw_scores=raw_scores, stats=call)
        return scores, int(call.get("prompt_tokens", 0))

    def embed(self, texts: Sequence[str], dimensions: Optional[int] = None, normalize: bool = True,
              instruction: Optional[str] = None, max_tokens: Optional[int] = None, left: bool = False,
              cancel=None, is_query: Optional[bool] = None, ids: bool = False) -> Tuple[np.ndarray, int]:
        """(``[n, d]`` float32 embeddings, prompt tokens); ``instruction`` embeds the texts as queries
        (``is_query``, default: whether an instruction is given). ``ids``: the inputs are token ids,
        embedded as given (``Embedder.embed_ids``)."""
        if self.embedder is None:
            raise WrongTask(f"this server hosts a {self.task} model; embeddings need an embedding model "
                            f"(serve one with --task embed)")
        if dimensions is not None and dimensions > self.dimension:
            raise ValueError(f"dimensions={dimensions} is larger than the embedding size {self.dimension}")
        call: dict = {}
        if ids:
            emb = self.embedder.embed_ids(texts, dimensions=dimensions, instruction=instruction,
                                          is_query=instruction is not None if is_query is None else is_query,
                                          normalize=normalize, max_tokens=max_tokens, left=left, cancel=cancel,
                                          stats=call)
            return emb, int(call.get("prompt_tokens", 0))
        cut = self.budget.texts(texts, instruction, max_tokens, left)
        emb = self.embedder.embed(cut, dimensions=dimensions, instruction=instruction,
                                  is_query=instruction is not None if is_query is None else is_query,
                                  normalize=normalize, cancel=cancel, stats=call)
        return emb, int(call.get("prompt_tokens", 0))

    def token_states(self, inputs: Sequence, ids: bool = False, instruction: Optional[str] = None,
                     max_tokens: Optional[int] = None, left: bool = False, cancel=None) -> Tuple[List[np.ndarray], int]:
        """(every token's final state ``[len_i, H]`` per input, prompt tokens): TEI's ``/embed_all``;
        ``max_tokens``/``left`` cut each input as ``embed`` does."""
        if self.embedder is None:
            raise WrongTask(f"this server hosts a {self.task} model; per-token embeddings need an embedding "
                            f"model (serve one with --task embed)")
        call: dict = {}
        if ids:
            given = {"ids": inputs, "max_tokens": max_tokens, "left": left}
        else:
            given = {"texts": self.budget.texts(inputs, instruction, max_tokens, left)}
        out = self.embedder.token_states(**given, instruction=instruction, is_query=instruction is not None,
                                         cancel=cancel, stats=call)
        return out, int(call.get("prompt_tokens", 0))

    def classify(self, texts: Sequence[str], labels, multi_label: bool = False, threshold: Optional[float] = None,
                 instruction: Optional[str] = None, cancel=None) -> Tuple[List[dict], int]:
        """(``[{index, label, scores}]``, prompt tokens): every text against every label description."""
        stats: dict = {}
        out = self.classifier.classify(texts, labels, instruction=instruction, multi_label=multi_label,
                                       threshold=threshold, stats=stats, cancel=cancel)
        return out, int(stats.get("prompt_tokens", 0))

    def index(self, documents: Sequence[str], compression_ratio: Optional[int] = None,
              cancel=None) -> Tuple[dict, int]:
        """Pre-encode passages into the passage cache (KaLM-Reranker): (counts, prompt tokens)."""
        if cancel is not None and cancel.is_set():
            raise Cancelled("request cancelled")
        call: dict = {}
        out = self.reranker.index(documents, compression_ratio=compression_ratio, stats=call)
        return out, int(call.get("prompt_tokens", 0))
