"""The public Python API: Reranker and Embedder (sentence-transformers-like)."""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from engine.config import EngineConfig
from engine.core import stored_docs
from engine.core.cache import PassageCache
from engine.core.calibration import Calibration
from engine.core.engine import Engine
from engine.core.passages import check_ratio
from engine.core.request import merge_stats
from engine.core.steps.passage import PassageRequest
from engine.core.steps.score import ScoreRequest
from engine.models.heads import YesNoHead, matryoshka
from engine.prompts.chunking import Chunking, check_room, collect, expand
from engine.prompts.templates import check_texts, is_blank
from engine.sequence import Seq, Seqs

# Embed requests of at most this many texts are tokenized on the caller's thread (no round trip
# through the tokenizer thread; bench/cpu_embed.py's one-text latency).
EAGER_TEXTS = 16


def _multimodal(engine: Engine) -> bool:
    return engine.template.multimodal


def _inputs(engine: Engine, items, what: str, counted=None) -> list:
    """Text inputs checked as strings; for models that take images (Qwen3-VL), any input shape of
    engine.prompts.inputs (dicts, lists of parts, vLLM content) with its images loaded."""
    if not _multimodal(engine):
        return check_texts(items, what)
    from engine.prompts.inputs import normalize_inputs

    if isinstance(items, (str, dict)):
        raise TypeError(f"{what} must be a list of inputs, not a single {type(items).__name__}")
    return normalize_inputs(list(items), what, engine.template.image_options, counted)



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

    def __init__(self, model=None, task: Optional[str] = None, device=None, dtype=None,
                 max_length: Optional[int] = None, max_batch_tokens: Optional[int] = None,
                 share_prefix: Optional[bool] = None, template: Optional[str] = None,
                 template_prefix: Optional[str] = None, template_suffix: Optional[str] = None,
                 label_tokens: Optional[Sequence[str]] = None, passage_cache_bytes: Optional[int] = None,
                 cache_cross_kv: Optional[bool] = None, compile: Optional[bool] = None,
                 quantize: Optional[str] = None, passage_store=None, config: Optional[EngineConfig] = None,
                 calibration: Optional[str] = None):
        # Every option is a field of EngineConfig, where its default and meaning are written down;
        # a keyword argument left at None keeps the value of ``config`` (or the default).
        # ``model=None`` (and no config.model): the bundled all-MiniLM-L6-v2, ranking by cosine.
        self.config = EngineConfig.build(
            config, model=model, task=task, device=device, dtype=dtype, max_length=max_length,
            max_batch_tokens=max_batch_tokens, share_prefix=share_prefix, template=template,
            template_prefix=template_prefix, template_suffix=template_suffix, label_tokens=label_tokens,
            passage_cache_bytes=passage_cache_bytes, cache_cross_kv=cache_cross_kv, compile=compile,
            quantize=quantize, passage_store=passage_store, calibration=calibration)
        self.engine = Engine(self.config, task_default="rerank")
        self.share_prefix = self.config.share_prefix
        # scores become calibrated probabilities (engine/core/calibration.py); refused if fitted for another model
        self.calibration = Calibration.load(self.config.calibration, self.engine.folder) \
            if self.config.calibration else None
        self._generator = None  # engine.core.evidence.Generator, built on the first return_evidence call
        # return_evidence scores and decodes from one prefill per document; False: the documents are
        # scored, then those above the threshold prefilled again to decode (the comparison path)
        self._evidence_one_prefill = True
        self.stats: Dict[str, float] = {}  # cumulative over calls; pass stats={} to a call for its own

    @property
    def task(self) -> str:
        return self.engine.task

    @property
    def is_encoder_decoder(self) -> bool:
        return self.engine.model.is_encoder_decoder

    def _submit(self, req, stats: Optional[dict]):
        """Run a request on the engine loop; its counters go to ``stats`` and the cumulative ones."""
        return self._wait(self.engine.submit(req), stats)

    def _wait(self, req, stats: Optional[dict]):
        try:
            return req.wait()
        finally:
            merge_stats(self.stats, req.stats)
            merge_stats(stats, req.stats)

    def index(self, documents: Sequence[str], compression_ratio: Optional[int] = None,
              stats: Optional[dict] = None) -> dict:
        """Pre-encode a corpus into the passage cache (KaLM-Reranker): later ``rank``/``predict``
        calls over these documents at the same ``compression_ratio`` run no encoder work."""
        if not self.is_encoder_decoder:
            raise ValueError(f"index() needs an encoder-decoder reranker (KaLM-Reranker); "
                             f"{self.engine.arch} is not one")
        ratio = check_ratio(compression_ratio)
        docs = list(dict.fromkeys(check_texts(documents, "documents")))
        seqs = Seqs(Seq([], passage=ids) for ids in self.engine.template.encode_documents(docs))
        req = PassageRequest(seqs, self._passage_keys(seqs, ratio), ratio, index_only=True)
        self._submit(req, stats)
        return {"passages": len(docs), "encoded": req.stats["passages_encoded"],
                "already_cached": req.stats["passage_cache_hits"]}

    def _passage_keys(self, seqs, ratio: int) -> List[bytes]:
        return [PassageCache.passage_key(self.engine.model_id, ratio, s.passage) for s in seqs]

    def cache_stats(self) -> dict:
        """Counters of the prefix cache, and of the passage cache for KaLM-Reranker; ``truncated_inputs``:
        the inputs cut to max_length so far, by every caller of this engine."""
        out = self.engine.prefix_cache.stats()
        if self.engine.passage_cache is not None:
            out.update(self.engine.passage_cache.stats())
        out["truncated_inputs"] = getattr(self.engine.tokenizer, "truncated", 0)
        return out

    def _scores(self, queries: List[str], docs: List[str], instruction: Optional[str], cancel=None,
                raw_scores: bool = False, stats: Optional[dict] = None, compression_ratio: Optional[int] = None,
                priority: int = 0) -> np.ndarray:
        """Scores of the pairs in order; ``raw_scores``: the exact logits (cosines for bi-encoders)."""
        if getattr(self, "calibration", None) is not None and not raw_scores:
            return self.calibration(self._scores(queries, docs, instruction, cancel, True, stats,
                                                 compression_ratio=compression_ratio, priority=priority))
        eng, tpl = self.engine, self.engine.template
        if self.is_encoder_decoder:  # KaLM-Reranker: cached passage encodings + decoder (engine/core/passages.py)
            ratio = stored_docs.request_ratio(eng.passage_store, compression_ratio)
            seqs, stored = stored_docs.pair_seqs(eng, queries, docs, instruction, ratio)  # documents by id: the store
            req = PassageRequest(seqs, self._passage_keys(seqs, ratio), ratio, priority=priority, cancel=cancel,
                                 stored=stored)
            scores = self._submit(req, stats)
            return req.logits if raw_scores else scores
        if compression_ratio is not None:
            raise ValueError("compression_ratio applies to encoder-decoder rerankers (KaLM-Reranker) only")
        if eng.task == "embed":  # bi-encoder: cosine of query and document embeddings
            # Each distinct text is embedded once (a classification's label descriptions, once per call).
            uq, ud = list(dict.fromkeys(queries)), list(dict.fromkeys(docs))
            rq = ScoreRequest(len(uq), lambda s, e: tpl.encode(uq[s:e], is_query=True, instruction=instruction),
                              cancel=cancel, priority=priority)
            rd = ScoreRequest(len(ud), lambda s, e: tpl.encode(ud[s:e]), cancel=cancel, priority=priority)
            eng.submit(rq), eng.submit(rd)
            # numpy on the caller's side: see heads.matryoshka
            q = matryoshka(np.asarray(self._wait(rq, stats), dtype=np.float32), None)
            d = matryoshka(np.asarray(self._wait(rd, stats), dtype=np.float32), None)
            qpos, dpos = {x: i for i, x in enumerate(uq)}, {x: i for i, x in enumerate(ud)}
            rows, cols = np.array([qpos[x] for x in queries]), np.array([dpos[x] for x in docs])
            return (q[rows] * d[cols]).sum(-1)
        scores, logits = self._pair_scores(queries, docs, instruction, cancel, stats, priority)
        return logits if raw_scores else scores

    def _pair_scores(self, queries: List[str], docs: List[str], instruction: Optional[str], cancel=None,
                     stats: Optional[dict] = None, priority: int = 0):
        """Score pairs on the engine loop: one request per distinct query, all in flight together.

        With prefix sharing, each query's head (system + instruction + query) is computed once
        and its documents attend to its cached K/V; otherwise every pair is a full sequence.
        Returns (scores [n], logits [n]).
        """
        eng, tpl = self.engine, self.engine.template
        groups: Dict[str, List[int]] = {}
        for i, q in enumerate(queries):
            groups.setdefault(q, []).append(i)
        pending = []
        for q, idx in groups.items():
            gdocs = [docs[i] for i in idx]
            head = tpl.encode_head(q, instruction) if self.share_prefix and tpl.supports_prefix else None
            if head is not None:
                req = ScoreRequest(len(idx), lambda s, e, h=head, d=gdocs: tpl.encode_tails(h, d[s:e]),
                                   prefix=head, cancel=cancel, priority=priority)
            else:
                req = ScoreRequest(len(idx), lambda s, e, q=q, d=gdocs: tpl.encode([q] * (e - s), d[s:e], instruction),
                                   cancel=cancel, priority=priority)
            pending.append((idx, eng.submit(req)))
        scores = np.zeros(len(queries), dtype=np.float32)
        logits = np.zeros(len(queries), dtype=np.float32)
        for idx, req in pending:
            scores[idx] = self._wait(req, stats)
            logits[idx] = req.logits
        return scores, logits

    def predict(self, pairs: Sequence[Tuple[str, str]], instruction: Optional[str] = None, cancel=None,
                raw_scores: bool = False, stats: Optional[dict] = None,
                compression_ratio: Optional[int] = None, priority: int = 0) -> List[float]:
        """Scores of (query, document) pairs, in order (CrossEncoder.predict style).

        ``raw_scores``: cross-encoders return logits without their activation (TEI's flag);
        KaLM-Reranker returns the margins l_yes - l_no.
        ``stats``: a dict that receives this call's counters (tokens computed and saved by
        prefix sharing, batches, seconds per stage).
        ``compression_ratio``: KaLM-Reranker's Matryoshka pooling ratio r (1, 2, 4, 8, 16 or
        32; default 4): the decoder reads one mean vector per r passage tokens.
        """
        if isinstance(pairs, tuple) and len(pairs) == 2 and all(isinstance(p, str) for p in pairs):
            pairs = [pairs]
        queries, docs = [], []
        mm, counted = _multimodal(self.engine), [0]
        for i, p in enumerate(pairs):
            if not isinstance(p, (tuple, list)) or len(p) != 2:
                raise TypeError(f"pairs[{i}] must be a (query, document) pair")
            if mm:
                from engine.prompts.inputs import normalize_input

                opts = self.engine.template.image_options
                queries.append(normalize_input(p[0], f"pairs[{i}] query", opts, counted))
                docs.append(normalize_input(p[1], f"pairs[{i}] document", opts, counted))
                continue
            by_id = isinstance(p[1], (dict, stored_docs.DocRef))  # KaLM-Reranker: {"id", "text"?}
            if self.is_encoder_decoder and isinstance(p[0], str) and by_id:
                queries.append(p[0])
                docs.append(stored_docs.check_documents([p[1]], f"pairs[{i}] document")[0])
                continue
            if not isinstance(p[0], str) or not isinstance(p[1], str):
                raise TypeError(f"pairs[{i}] must hold two strings, got ({type(p[0]).__name__}, {type(p[1]).__name__})")
            queries.append(p[0])
            docs.append(p[1])
        if not queries:
            return []
        return [float(s) for s in self._scores(queries, docs, instruction, cancel, raw_scores, stats,
                                               compression_ratio=compression_ratio, priority=priority)]

    def rank(self, query: str, documents: Sequence[str], top_n: Optional[int] = None,
             instruction: Optional[str] = None, return_documents: bool = True, cancel=None,
             raw_scores: bool = False, stats: Optional[dict] = None,
             min_score: Optional[float] = None, return_evidence: bool = False, evidence_threshold: float = 0.5,
             max_new_tokens: int = 512, compression_ratio: Optional[int] = None, priority: int = 0,
             chunking: Optional[dict] = None) -> List[dict]:
        """Documents sorted by relevance: ``[{index, score, document}]``.

        ``chunking``: ``{"tokens": 256, "overlap": 32, "aggregate": "max"|"mean"|"first",
        "return_chunks": False}`` scores each document by its chunks (engine/prompts/chunking.py):
        each is scored as the text ``document[start:end]``, batched and sharing the query prefix
        like documents; every result gains ``chunk`` ``{start, end, score}`` (the deciding chunk,
        character offsets into the document as given) and, with ``return_chunks``, ``chunks``.

        ``min_score`` drops results scoring below it (after ``top_n``), for calibrated models.

        ``return_evidence`` (generative yes/no rerankers, e.g. Prism-Reranker): the returned
        documents scoring at least ``evidence_threshold`` are decoded greedily together (at
        most ``max_new_tokens`` each, stopping at ``<|im_end|>``) and every result gains
        ``contribution`` and ``evidence`` (the tags' text; None when not decoded, or when
        a tag is missing or cut off) and ``raw_output`` (the generated text, or None). Each document
        is prefilled once: its scoring forward also keeps the K/V it decodes from. With ``chunking``,
        the answer is decoded from the deciding chunk (``chunk``).

        ``cancel``: an optional ``threading.Event``; once set, remaining batches are
        skipped and ``engine.core.request.Cancelled`` is raised. ``stats`` and ``compression_ratio``:
        as in ``predict``. ``priority``: requests waiting for the engine run higher first
        (default 0; ties in arrival order). Models that take images (Qwen3-VL) take, for the
        query and each document, a string, a dict ``{"text", "image"}`` or a list of parts
        (``{"type": "text", "text"}``, ``{"type": "image_url", "image_url": {"url"}}``); results
        carry the documents as given.
        """
        given = documents
        if _multimodal(self.engine):  # query and documents: strings, {text, image} dicts or lists of parts
            from engine.prompts.inputs import normalize_input

            counted = [0]
            query = normalize_input(query, "query", self.engine.template.image_options, counted)
            docs = _inputs(self.engine, documents, "documents", counted)
            given = list(documents)
        elif not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        elif is_blank(query):  # as the HTTP API refuses it: an empty query ranks nothing meaningful
            raise ValueError("query must not be empty")
        elif self.is_encoder_decoder:  # KaLM-Reranker: strings or {"id", "text"?} (a passage store)
            if not isinstance(documents, (str, dict)):
                documents = list(documents)  # once: a generator is read here only
            docs = stored_docs.check_documents(documents, "documents")
            given = list(documents)
        else:
            docs = given = check_texts(documents, "documents")
        top_n = _check_top_n(top_n)
        if min_score is not None and (not isinstance(min_score, (int, float)) or isinstance(min_score, bool)):
            raise TypeError(f"min_score must be a number, got {type(min_score).__name__}")
        if return_evidence:
            self._check_evidence_args(evidence_threshold, max_new_tokens)
        if not docs:
            return []
        spec, chunk_fields, answers = Chunking.parse(chunking), None, None
        if spec is not None:
            evidence = dict(threshold=evidence_threshold, max_new_tokens=max_new_tokens, top_n=top_n,
                            min_score=min_score) if return_evidence and self._evidence_one_prefill else None
            scores, chunk_fields, answers = self._chunked([query] * len(docs), docs, instruction, spec, cancel,
                                                          raw_scores, stats, compression_ratio, priority, evidence)
        elif return_evidence and self._evidence_one_prefill and not _multimodal(self.engine):
            scores, answers = self._score_and_decode(query, docs, instruction, raw_scores, top_n, min_score,
                                                     evidence_threshold, max_new_tokens, stats, cancel, priority)
        else:
            scores = self._scores([query] * len(docs), docs, instruction, cancel, raw_scores, stats,
                                  compression_ratio=compression_ratio, priority=priority)
        order = sorted(range(len(docs)), key=lambda i: -scores[i])[:top_n]
        if min_score is not None:
            order = [i for i in order if scores[i] >= min_score]
        out = []
        for i in order:
            r = {"index": i, "score": float(scores[i])}
            if return_documents:
                r["document"] = given[i]
            if chunk_fields is not None:
                r.update(chunk_fields[i])
            out.append(r)
        if return_evidence and answers is not None:
            self._attach_answers(out, answers, evidence_threshold, stats)
        elif return_evidence:
            self._attach_evidence(query, docs, out, instruction, evidence_threshold, max_new_tokens, stats, cancel)
        return out

    def _chunked(self, queries, docs, instruction, spec, cancel=None, raw_scores=False, stats=None,
                 compression_ratio=None, priority=0, evidence=None):
        """(aggregated scores, per-pair ``chunk``/``chunks`` fields, answers) of pairs whose documents are
        chunked by ``spec``: every chunk is a pair of its own, so chunks batch and share the query prefix.
        ``evidence`` (rank's threshold, max_new_tokens, top_n, min_score; one query): each returned
        document's deciding chunk is decoded from its scoring prefill; answers per document, else None."""
        tpl = self.engine.template
        for q in dict.fromkeys(queries):  # each query (and the template) must leave room for a chunk
            if self.engine.task == "embed":
                overhead = len(tpl.encode([""]).ids[0])
            else:
                overhead = len(tpl.encode([q], [""], instruction).ids[0])
            check_room(spec, overhead, int(tpl.max_length))
        texts, owners, spans = expand(tpl.tokenizer, docs, spec)
        if evidence is None:
            scores = self._scores([queries[d] for d in owners], texts, instruction, cancel, raw_scores, stats,
                                  compression_ratio=compression_ratio, priority=priority)
            return (*collect(len(docs), scores, owners, spans, spec), None)
        from engine.core.evidence import chunk_selector

        threshold, max_new_tokens = evidence["threshold"], evidence["max_new_tokens"]
        scores, answers = self._score_and_decode(
            queries[0], texts, instruction, raw_scores, None, None, threshold, max_new_tokens, stats, cancel, priority,
            select=lambda to_scores: chunk_selector(to_scores, owners, spec.aggregate, threshold,
                                                    evidence["min_score"], evidence["top_n"]))
        doc_scores, fields = collect(len(docs), scores, owners, spans, spec)
        chunk_of = {(owners[c], spans[c]): c for c in range(len(texts))}
        picked = [answers[chunk_of[(d, (f["chunk"]["start"], f["chunk"]["end"]))]] for d, f in enumerate(fields)]
        return doc_scores, fields, picked

    def score_chunks(self, pairs: Sequence[Tuple[str, str]], chunking, instruction: Optional[str] = None,
                     cancel=None, raw_scores: bool = False, stats: Optional[dict] = None,
                     compression_ratio: Optional[int] = None, priority: int = 0) -> List[dict]:
        """``predict`` with each document scored by its chunks (``chunking`` as in ``rank``): per pair
        ``{score, chunk}`` (and ``chunks``)."""
        spec = Chunking.parse(chunking)
        queries, docs = [p[0] for p in pairs], check_texts([p[1] for p in pairs], "documents")
        if not docs:
            return []
        scores, fields, _ = self._chunked(queries, docs, instruction, spec, cancel, raw_scores, stats,
                                          compression_ratio, priority)
        return [{"score": float(s), **f} for s, f in zip(scores, fields)]

    def _check_evidence_args(self, threshold, max_new_tokens) -> None:
        eng = self.engine
        if eng.task != "rerank" or not isinstance(eng.head, YesNoHead) or not eng.model.supports_decode:
            raise ValueError(f"return_evidence needs a generative yes/no reranker (Prism-Reranker, Qwen3-Reranker); "
                             f"{eng.arch} ({eng.task}) is not one")
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
            raise TypeError(f"evidence_threshold must be a number, got {type(threshold).__name__}")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")

    def _score_and_decode(self, query, docs, instruction, raw_scores, top_n, min_score, threshold, max_new_tokens,
                          stats, cancel, priority, select=None):
        """(scores, answers): every document scored and, from the same prefill, the ones ``rank`` returns
        with a score of at least ``threshold`` decoded (engine.core.evidence.Generator.score_and_decode).
        ``select(to_scores)``: another selector of the documents to decode (chunks: their deciding ones)."""
        from engine.core.evidence import Generator, evidence_selector

        if self._generator is None:
            self._generator = Generator(self.engine)
        calibration = None if raw_scores else self.calibration

        def to_scores(logits, scores):  # as _scores gives them
            return logits if raw_scores else calibration(logits) if calibration is not None else scores

        select = evidence_selector(to_scores, threshold, min_score, top_n) if select is None else select(to_scores)
        call: dict = {}
        try:
            logits, scores, answers = self._generator.score_and_decode(
                self.engine.template, query, docs, select, instruction, max_new_tokens, self.share_prefix,
                cancel=cancel, stats=call, priority=priority)
        finally:
            merge_stats(self.stats, call)
            merge_stats(stats, call)
        return to_scores(logits, scores), answers

    def _attach_answers(self, results, answers, threshold, stats) -> None:
        """The decoded answers of the results scoring at least ``threshold`` (the others: None)."""
        chosen = [r for r in results if r["score"] >= threshold]
        for r in results:
            r.update(contribution=None, evidence=None, raw_output=None)
        for r in chosen:
            a = answers[r["index"]]
            if a is None:  # never: the selector keeps every document the ranking returns above the threshold
                raise RuntimeError(f"document {r['index']} was ranked above the evidence threshold but not decoded")
            r.update(contribution=a["contribution"], evidence=a["evidence"], raw_output=a["raw_output"])
        counts = {"evidence_decoded": len(chosen),
                  "evidence_tokens": sum(answers[r["index"]]["tokens"] for r in chosen)}
        merge_stats(self.stats, counts)
        merge_stats(stats, counts)

    def _attach_evidence(self, query, docs, results, instruction, threshold, max_new_tokens, stats,
                         cancel=None) -> None:
        """Decode the results scoring at least ``threshold`` (one request) and add their parsed answers."""
        from engine.core.evidence import Generator

        if self._generator is None:
            self._generator = Generator(self.engine)
        chosen = [r for r in results if r["score"] >= threshold]
        call: dict = {}
        texts = [docs[r["index"]][r["chunk"]["start"]:r["chunk"]["end"]] if "chunk" in r else docs[r["index"]]
                 for r in chosen]  # chunked: the deciding chunk, the text the score came from
        answers = self._generator.evidence(self.engine.template, query, texts,
                                           instruction, max_new_tokens, self.share_prefix, cancel=cancel,
                                           stats=call) if chosen else []
        for r in results:
            r.update(contribution=None, evidence=None, raw_output=None)
        for r, a in zip(chosen, answers):
            r.update(contribution=a["contribution"], evidence=a["evidence"], raw_output=a["raw_output"])
        counts = {"evidence_decoded": len(chosen), "evidence_tokens": sum(a["tokens"] for a in answers),
                  "decode_steps": call.get("decode_steps", 0),
                  "tokens_computed": call.get("tokens_computed", 0)}  # the second prefill and the decode
        merge_stats(self.stats, counts)
        merge_stats(stats, counts)


class Embedder:
    """Embed texts: last-token pooling (Qwen3-Embedding), L2-normalised, Matryoshka ``dimensions``."""

    def __init__(self, model=None, task: Optional[str] = None, device=None, dtype=None,
                 max_length: Optional[int] = None, max_batch_tokens: Optional[int] = None,
                 compile: Optional[bool] = None, quantize: Optional[str] = None,
                 config: Optional[EngineConfig] = None):
        # As Reranker: keyword arguments left at None keep ``config``'s values (EngineConfig).
        self.config = EngineConfig.build(config, model=model, task=task, device=device, dtype=dtype,
                                         max_length=max_length, max_batch_tokens=max_batch_tokens, compile=compile,
                                         quantize=quantize)
        self.engine = Engine(self.config, task_default="embed")
        if self.engine.task != "embed":
            raise ValueError(f"{self.config.model or 'the model'} was loaded as a {self.engine.task} model; "
                             f"Embedder needs task='embed'")
        self.stats: Dict[str, float] = {}

    @classmethod
    def from_engine(cls, engine: Engine) -> "Embedder":
        """An Embedder sharing an already loaded embed-task engine (e.g. a Reranker's): no second copy
        of the weights."""
        if engine.task != "embed":
            raise ValueError(f"the engine holds a {engine.task} model; Embedder needs task='embed'")
        self = cls.__new__(cls)
        self.engine, self.config, self.stats = engine, engine.config, {}
        return self

    @property
    def dimension(self) -> int:
        config = self.engine.config_dict
        return int((config.get("text_config") or config)["hidden_size"])  # multimodal: the text decoder's

    def embed(self, texts: Union[str, Sequence[str]], dimensions: Optional[int] = None,
              instruction: Optional[str] = None, is_query: bool = False, normalize: bool = True,
              cancel=None, stats: Optional[dict] = None, chunking: Optional[dict] = None):
        """``[n, d]`` float32 embeddings (a single string gives ``[1, d]``).

        ``chunking`` (``{"tokens", "overlap", "return_chunks"}`` as in ``Reranker.rank``): each text
        is embedded as its chunks, and its embedding is their mean (normalized when ``normalize``);
        with ``return_chunks``, a list of ``{"embedding", "chunks": [{start, end, embedding}]}``.

        Models that take images (Qwen3-VL): each input is a string, a dict ``{"text", "image"}`` or a
        list of parts (one input; a single dict gives ``[1, d]``); ``instruction`` is the system
        prompt (default "Represent the user's input.") for queries and documents alike.
        """
        if isinstance(texts, str) or (isinstance(texts, dict) and _multimodal(self.engine)):
            texts = [texts]
        texts = _inputs(self.engine, texts, "inputs" if _multimodal(self.engine) else "texts")
        if dimensions is not None:
            matryoshka(np.zeros((1, self.dimension), np.float32), dimensions)  # validates before any work
        if not texts:
            return np.zeros((0, dimensions or self.dimension), dtype=np.float32)
        tpl = self.engine.template
        spec = Chunking.parse(chunking)
        if spec is not None:
            return self._embed_chunks(texts, spec, dimensions, instruction, is_query, normalize, cancel, stats)
        # Tokenized lazily, chunk by chunk, on the scheduler's tokenizer thread; a few texts are
        # tokenized here instead (one fixed truncation setting, so calls from any thread agree).
        req = ScoreRequest(len(texts), lambda s, e: tpl.encode(texts[s:e], is_query=is_query, instruction=instruction),
                           cancel=cancel, eager=len(texts) <= EAGER_TEXTS)
        return self._embeddings(req, dimensions, normalize, stats)

    def _embeddings(self, req: ScoreRequest, dimensions, normalize, stats) -> np.ndarray:
        """Run an embedding request: its rows, Matryoshka-truncated (and normalized), its stats merged."""
        try:
            emb = np.asarray(self.engine.submit(req).wait(), dtype=np.float32)
        finally:
            merge_stats(self.stats, req.stats)
            merge_stats(stats, req.stats)
        return np.ascontiguousarray(matryoshka(emb, dimensions, normalize=normalize), dtype=np.float32)

    def _seqs_of_ids(self, ids, is_query, instruction, max_tokens=None, left=False) -> Seqs:
        from engine.prompts.token_ids import encode_ids

        vocab = len(self.engine.tokenizer)
        for i, seq in enumerate(ids):
            bad = next((t for t in seq if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab), None)
            if bad is not None:
                raise ValueError(f"ids[{i}] holds {bad!r}, not a token id of this model's vocabulary of {vocab}")
        return encode_ids(self.engine.template, ids, is_query, instruction, max_tokens, left)

    def embed_ids(self, ids: Sequence[Sequence[int]], dimensions: Optional[int] = None,
                  instruction: Optional[str] = None, is_query: bool = False, normalize: bool = True,
                  max_tokens: Optional[int] = None, left: bool = False, cancel=None, stats: Optional[dict] = None):
        """``[n, d]`` embeddings of token ids as given, inside the template's special tokens and prompt
        (engine.prompts.token_ids): a document's ids from this tokenizer embed as its text does.
        ``max_tokens``: keep at most this many of each sequence's ids (its end with ``left``)."""
        if dimensions is not None:
            matryoshka(np.zeros((1, self.dimension), np.float32), dimensions)
        if not ids:
            return np.zeros((0, dimensions or self.dimension), dtype=np.float32)
        seqs = self._seqs_of_ids(ids, is_query, instruction, max_tokens, left)
        return self._embeddings(ScoreRequest(len(seqs), lambda s, e: seqs[s:e], cancel=cancel, eager=True),
                                dimensions, normalize, stats)

    def token_states(self, texts=None, ids=None, instruction: Optional[str] = None, is_query: bool = False,
                     max_tokens: Optional[int] = None, left: bool = False, cancel=None,
                     stats: Optional[dict] = None) -> List[np.ndarray]:
        """Every token's final hidden state (TEI's ``embed_all``): ``[len_i, H]`` float32 per input, over
        the whole templated sequence (special tokens and prompt included), not normalized. Give
        ``texts`` or token ``ids`` (``max_tokens``/``left``: as ``embed_ids``)."""
        from engine.core.steps.tokens import TokenStatesRequest

        if (texts is None) == (ids is None):
            raise ValueError("give texts or ids")
        if texts is not None:
            texts = check_texts([texts] if isinstance(texts, str) else texts, "texts")
            seqs = self.engine.template.encode(texts, is_query=is_query, instruction=instruction) if texts else []
        else:
            seqs = self._seqs_of_ids(ids, is_query, instruction, max_tokens, left) if ids else []
        req = TokenStatesRequest(list(seqs), cancel=cancel)
        try:
            return self.engine.submit(req).wait()
        finally:
            merge_stats(self.stats, req.stats)
            merge_stats(stats, req.stats)

    def _embed_chunks(self, texts, spec, dimensions, instruction, is_query, normalize, cancel, stats):
        tpl = self.engine.template
        check_room(spec, len(tpl.encode([""], is_query=is_query, instruction=instruction).ids[0]),
                   int(tpl.max_length))
        chunk_texts, owners, spans = expand(tpl.tokenizer, texts, spec)
        emb = self.embed(chunk_texts, dimensions=dimensions, instruction=instruction, is_query=is_query,
                         normalize=normalize, cancel=cancel, stats=stats)
        owners = np.asarray(owners)
        out = np.zeros((len(texts), emb.shape[1]), dtype=np.float32)
        np.add.at(out, owners, emb)
        out /= np.bincount(owners, minlength=len(texts))[:, None]
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        if not spec.return_chunks:
            return out
        per = [[] for _ in texts]
        for c, d in enumerate(owners):
            per[d].append({"start": spans[c][0], "end": spans[c][1], "embedding": emb[c]})
        return [{"embedding": out[i], "chunks": per[i]} for i in range(len(texts))]
