"""The public Python API: Reranker and Embedder (sentence-transformers-like)."""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from engine.heads import matryoshka
from engine.runner import ModelRunner
from engine.templates import check_texts


def _check_top_n(top_n):
    if top_n is None:
        return None
    if not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1:
        raise ValueError(f"top_n must be a positive integer or None, got {top_n!r}")
    return top_n


class Reranker:
    """Score query-document pairs.

    ``Reranker(model)`` takes a local folder or a hub id. LLM rerankers score
    with their yes/no head; an embedding model ranks by cosine similarity of
    query and document embeddings.
    """

    def __init__(self, model, task: Optional[str] = None, device=None, dtype=None, max_length: int = 8192,
                 max_batch_tokens: Optional[int] = None):
        self.runner = ModelRunner(model, task=task, task_default="rerank", device=device, dtype=dtype,
                                  max_length=max_length, max_batch_tokens=max_batch_tokens)
        self.stats: Dict[str, float] = {}

    @property
    def task(self) -> str:
        return self.runner.task

    def _scores(self, queries: List[str], docs: List[str], instruction: Optional[str], cancel=None) -> np.ndarray:
        run, tpl = self.runner.run, self.runner.template
        if self.runner.task == "embed":
            uq = list(dict.fromkeys(queries))
            q = matryoshka(run(tpl.encode(uq, is_query=True, instruction=instruction), self.stats, cancel), None)
            d = matryoshka(run(tpl.encode(docs), self.stats, cancel), None)
            pos = {x: i for i, x in enumerate(uq)}
            rows = torch.tensor([pos[x] for x in queries])
            return (q[rows] * d).sum(-1).numpy()
        return run(tpl.encode(queries, docs, instruction), self.stats, cancel).numpy()

    def predict(self, pairs: Sequence[Tuple[str, str]], instruction: Optional[str] = None, cancel=None) -> List[float]:
        """Scores of (query, document) pairs, in order (CrossEncoder.predict style)."""
        if isinstance(pairs, tuple) and len(pairs) == 2 and all(isinstance(p, str) for p in pairs):
            pairs = [pairs]
        queries, docs = [], []
        for i, p in enumerate(pairs):
            if not isinstance(p, (tuple, list)) or len(p) != 2:
                raise TypeError(f"pairs[{i}] must be a (query, document) pair")
            if not isinstance(p[0], str) or not isinstance(p[1], str):
                raise TypeError(f"pairs[{i}] must hold two strings, got ({type(p[0]).__name__}, {type(p[1]).__name__})")
            queries.append(p[0])
            docs.append(p[1])
        if not queries:
            return []
        return [float(s) for s in self._scores(queries, docs, instruction, cancel)]

    def rank(self, query: str, documents: Sequence[str], top_n: Optional[int] = None,
             instruction: Optional[str] = None, return_documents: bool = True, cancel=None) -> List[dict]:
        """Documents sorted by relevance: ``[{index, score, document}]``.

        ``cancel``: an optional ``threading.Event``; once set, remaining batches are
        skipped and ``engine.runner.Cancelled`` is raised.
        """
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        docs = check_texts(documents, "documents")
        top_n = _check_top_n(top_n)
        if not docs:
            return []
        scores = self._scores([query] * len(docs), docs, instruction, cancel)
        order = sorted(range(len(docs)), key=lambda i: -scores[i])[:top_n]
        out = []
        for i in order:
            r = {"index": i, "score": float(scores[i])}
            if return_documents:
                r["document"] = docs[i]
            out.append(r)
        return out


class Embedder:
    """Embed texts: last-token pooling (Qwen3-Embedding), L2-normalised, Matryoshka ``dimensions``."""

    def __init__(self, model, task: Optional[str] = None, device=None, dtype=None, max_length: int = 8192,
                 max_batch_tokens: Optional[int] = None):
        self.runner = ModelRunner(model, task=task or None, task_default="embed", device=device, dtype=dtype,
                                  max_length=max_length, max_batch_tokens=max_batch_tokens)
        if self.runner.task != "embed":
            raise ValueError(f"{model} was loaded as a {self.runner.task} model; Embedder needs task='embed'")
        self.stats: Dict[str, float] = {}

    @property
    def dimension(self) -> int:
        return int(self.runner.config.hidden_size)

    def embed(self, texts: Union[str, Sequence[str]], dimensions: Optional[int] = None,
              instruction: Optional[str] = None, is_query: bool = False, normalize: bool = True,
              cancel=None) -> np.ndarray:
        """``[n, d]`` float32 embeddings (a single string gives ``[1, d]``)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = check_texts(texts, "texts")
        if dimensions is not None:
            matryoshka(torch.zeros(1, self.dimension), dimensions)  # validates before any work
        if not texts:
            return np.zeros((0, dimensions or self.dimension), dtype=np.float32)
        seqs = self.runner.template.encode(texts, is_query=is_query, instruction=instruction)
        emb = self.runner.run(seqs, self.stats, cancel)
        return matryoshka(emb, dimensions, normalize=normalize).numpy().astype(np.float32)
