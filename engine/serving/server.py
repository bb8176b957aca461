"""The HTTP server: the rerank and embedding APIs clients already speak, over one loaded model.

Routes: the compatibility map ``engine.serving.compat.ROUTES`` (Cohere/Jina/TEI/vLLM rerank and score,
OpenAI/Cohere/TEI embeddings, TEI's root routes, health, models), Prometheus metrics and the OpenAPI spec.

The event loop never runs the model: each request runs in a worker thread, so
concurrent requests reach the engine together and share its batches. At most
``max_queue`` requests are admitted at once; beyond that the answer is 429 with
``Retry-After``. A client that disconnects has its remaining batches cancelled.

Errors are ``{"error": {message, type, param}}`` (on TEI's routes TEI's ``{"error", "error_type"}``):
broken JSON 400, a body of the wrong shape or types 422 naming the field, an empty query 400, an unknown
``model`` 404, too many documents or too large a body 413, a full queue 429, a
missing or wrong API key 401, a route of the other task (embeddings from a
reranker) 400 ``unsupported_task``, a response larger than ``max_response_bytes`` 413, a
server shutting down 503. Unknown fields are ignored. What is checked before routing (headers,
Host, API key, Content-Type, body size and deadline) is in gate.py; the connection layer (h11,
header size and deadline) in http.py. Responses are encoded with orjson in a worker thread, so a
large one never stalls the event loop (``/health`` included).
"""
import asyncio
import logging
import math
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import List, Optional

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from engine.core.request import Cancelled
from engine.core.stored_docs import DocRef, UnknownDocument, doc_echo
from engine.prompts.chunking import Chunking, TooManyChunks, chunk_fields
from engine.prompts.inputs import text_part
from engine.prompts.templates import is_blank
from engine.serving.compat import pair_limit, register_routes
from engine.serving.errors import ApiError
from engine.serving.gate import Gate
from engine.serving.metrics import Metrics, MetricsMiddleware
from engine.serving.protocol import (
    ClassifyBody,
    ErrorResponse,
    IndexBody,
    RerankBody,
    error_param,
    error_response,
)
from engine.serving.service import Service, WrongTask

log = logging.getLogger("engine.serving.server")
SHUTDOWN_WAIT_S = 5.0  # after the graceful timeout, how long shutdown waits for engine steps to stop


@dataclass
class ServerConfig:
    served_names: List[str]  # the first is reported; all are accepted as ``model``
    api_key: Optional[str] = None
    max_queue: int = 128  # requests admitted to the model at once
    max_documents: int = 100_000  # per request; more -> 413 (there is no lower batch limit)
    max_pairs: int = 100_000  # /v1/classify: inputs x labels per request (and chunks); more -> 413
    strict_names: bool = True  # False: any ``model`` is accepted (one model, no --served-model-name)
    strict: bool = False  # refuse options the model cannot honour as trained (compat.Compat.check_strict)
    max_body_bytes: int = 8 << 20
    body_timeout_s: float = 30.0  # the whole body not received within this many seconds -> 408
    max_pending_body_bytes: int = 256 << 20  # all bodies being received at once; more -> 503
    max_header_bytes: int = 64 << 10  # a request's headers; more -> 400 (h11) or 431
    header_timeout_s: float = 10.0  # a request head not complete within this many seconds: connection closed
    max_response_bytes: int = 256 << 20  # a response's JSON; larger -> 413
    allowed_hosts: Optional[List[str]] = None  # Host names answered; None: loopback names on loopback, else any
    retry_after_s: int = 1
    created: int = field(default_factory=lambda: int(time.time()))


def served_names(model: str, name: Optional[str]) -> List[str]:
    """``--served-model-name`` (comma-separated aliases), then the model as given and its folder name."""
    names = [n.strip() for n in (name or "").split(",") if n.strip()] + [model, Path(model).name]
    return list(dict.fromkeys(n for n in names if n))


def _finite(result) -> bool:
    """No NaN or Inf anywhere in a handler's result (JSON cannot carry them)."""
    if isinstance(result, float):
        return math.isfinite(result)
    if isinstance(result, np.ndarray):
        return bool(np.isfinite(result).all()) if result.dtype.kind == "f" else True
    if isinstance(result, dict):
        return all(_finite(v) for v in result.values())
    if isinstance(result, (list, tuple)):
        return all(_finite(v) for v in result)
    return True


JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
CHUNK_ITEMS = 256  # a long list is encoded this many items at a time, so the encoder never holds the GIL long
JSON_BYTES_PER_NUMBER = 8  # the least an embedding's number takes in JSON ("-0.01234,"), for the early check


class TooLarge(Exception):
    pass


def _fragments(x, budget: list, depth: int = 0):
    """``x`` with its long lists (top level or one dict level down) encoded piecewise into orjson
    Fragments; ``budget[0]``: bytes left before the response is too large."""
    if isinstance(x, dict) and depth < 2:
        return {k: _fragments(v, budget, depth + 1) for k, v in x.items()}
    if isinstance(x, (list, np.ndarray)) and len(x) > CHUNK_ITEMS:
        parts = []
        for i in range(0, len(x), CHUNK_ITEMS):
            part = orjson.dumps(x[i:i + CHUNK_ITEMS], option=JSON_OPTIONS)[1:-1]
            budget[0] -= len(part) + 1
            if budget[0] < 0:
                raise TooLarge
            parts.append(part)
        return orjson.Fragment(b"[" + b",".join(parts) + b"]")
    return x


def encode_json(content, max_bytes: int) -> bytes:
    """``content`` (dicts, lists, numbers, strings, C-contiguous numpy arrays) as JSON bytes; raises
    ``TooLarge`` past ``max_bytes``, stopping as soon as the pieces encoded so far pass it."""
    body = orjson.dumps(_fragments(content, [max_bytes]), option=JSON_OPTIONS)
    if len(body) > max_bytes:
        raise TooLarge
    return body


class Server:
    """Routes and admission for one ``Service``."""

    def __init__(self, service: Service, config: ServerConfig):
        self.service, self.config = service, config
        self.metrics = Metrics(service.stats)
        self.pool = ThreadPoolExecutor(max_workers=config.max_queue, thread_name_prefix="engine-worker")
        self.in_flight = 0  # touched only on the event loop
        self.cancels: "set[threading.Event]" = set()  # of the requests in flight

    @property
    def name(self) -> str:
        return self.config.served_names[0]

    def check_model(self, model: Optional[str]) -> str:
        """The name a response carries: the alias the client asked for, else the first served name.

        Without --served-model-name any name is accepted (as TEI does: clients send the name their tool
        defaults to, e.g. "rerank-v3.5") and responses carry the served name; with it, names are strict."""
        names = self.config.served_names
        if model is not None and model in names:
            return model
        if self.config.strict_names and model is not None:
            served = ", ".join(repr(n) for n in names)
            raise ApiError(404, f"model {model!r} is not served here; this server serves {served}", "model")
        return self.name

    def check_text_only(self, items, param: str):
        """Inputs with images (lists of parts) need a model that takes them."""
        if self.service.multimodal:
            return
        for i, x in enumerate(items):
            if not isinstance(x, (str, DocRef)):
                raise ApiError(400, f"{param}[{i}] holds an image; this server's model takes text only",
                               f"{param}[{i}]")

    def check_count(self, n: int, param: str):
        if n > self.config.max_documents:
            raise ApiError(413, f"{n} {param} is more than this server's limit of {self.config.max_documents} "
                                f"per request (--max-documents)", param)

    def chunking(self, body) -> Chunking:
        """A request's ``chunking`` object: every chunk is a (query, chunk) pair, counted against
        --max-documents and --max-pairs (the smaller is the request's budget; past it, 413)."""
        limit, flag = min((self.config.max_documents, "--max-documents"), (self.config.max_pairs, "--max-pairs"))
        return Chunking(body.tokens, body.overlap, body.aggregate, body.return_chunks, max_chunks=limit,
                        budget_flag=flag)

    async def call(self, request: Request, endpoint: str, fn, *args, **kwargs):
        """Run ``fn(*args, cancel=event, **kwargs)`` in a worker thread; cancel it if the client leaves."""
        if self.in_flight >= self.config.max_queue:
            self.metrics.rejected.inc()
            raise ApiError(429, f"server busy: {self.in_flight} requests in flight (--max-queue); retry later",
                           headers={"Retry-After": str(self.config.retry_after_s)})
        self.in_flight += 1
        self.metrics.queue_depth.set(self.in_flight)
        cancel = threading.Event()
        self.cancels.add(cancel)
        watcher = asyncio.ensure_future(self._watch(request, cancel))
        try:
            loop = asyncio.get_running_loop()
            result, tokens = await loop.run_in_executor(self.pool, partial(fn, *args, cancel=cancel, **kwargs))
        except Cancelled:
            self.metrics.cancelled.inc()
            raise ApiError(499, "the client closed the request")
        except asyncio.CancelledError:
            # uvicorn cancels the requests still in flight past --graceful-timeout: stop the engine work
            # at its next step, and answer the client (the task goes on just long enough to send it).
            cancel.set()
            self.metrics.cancelled.inc()
            raise ApiError(503, "the server is shutting down; retry on another replica or later",
                           headers={"Retry-After": str(self.config.retry_after_s)})
        except TooManyChunks as e:
            raise ApiError(413, str(e), "chunking")
        except WrongTask as e:
            raise ApiError(400, str(e), type="unsupported_task")
        except UnknownDocument as e:  # a document given by id that the passage store lacks
            raise ApiError(404, str(e), "documents")
        except (ValueError, UnicodeError) as e:  # the engine's checks of the input
            raise ApiError(400, str(e))
        finally:
            watcher.cancel()
            self.cancels.discard(cancel)
            self.in_flight -= 1
            self.metrics.queue_depth.set(self.in_flight)
        if not _finite(result):
            raise ApiError(500, "the model produced a non-finite score or embedding (NaN or Inf): its weights or "
                                "the input are broken", type="server_error")
        self.metrics.request_tokens.labels(endpoint).observe(tokens)
        return result, tokens

    async def respond(self, content) -> Response:
        """``content`` as a JSON response, encoded off the event loop; larger than max_response_bytes: 413."""
        loop = asyncio.get_running_loop()
        try:
            body = await loop.run_in_executor(self.pool, encode_json, content, self.config.max_response_bytes)
        except TooLarge:
            raise ApiError(413, f"the response would be larger than this server's limit of "
                                f"{self.config.max_response_bytes} bytes (--max-response-mb): ask for fewer "
                                f"inputs, fewer dimensions or encoding_format=base64")
        return Response(body, media_type="application/json")

    def check_response_size(self, numbers: int, bytes_per_number: float = JSON_BYTES_PER_NUMBER):
        """Refuse before any work a response that cannot fit max_response_bytes."""
        if numbers * bytes_per_number > self.config.max_response_bytes:
            raise ApiError(413, f"the response ({numbers} numbers) would be larger than this server's limit of "
                                f"{self.config.max_response_bytes} bytes (--max-response-mb): ask for fewer "
                                f"inputs, fewer dimensions or encoding_format=base64")

    @staticmethod
    async def _watch(request: Request, cancel: threading.Event):
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                cancel.set()
                return

    # Handlers

    async def rerank(self, body: RerankBody, request: Request):
        name = self.check_model(body.model)
        if isinstance(body.query, str) and is_blank(body.query):
            raise ApiError(400, "query must not be empty", "query")
        if body.texts is not None and body.documents is not None:
            raise ApiError(422, "give either documents (Cohere/Jina) or texts (TEI), not both", "texts")
        tei = body.texts is not None
        docs = body.texts if tei else body.documents
        if docs is None:
            raise ApiError(422, "documents is required", "documents")
        self.check_count(len(docs), "texts" if tei else "documents")
        self.check_text_only([body.query], "query")
        self.check_text_only(docs, "documents")
        top_n = body.top_n if body.top_n is not None else body.top_k
        top_n = top_n or None  # vLLM: top_n 0 means all
        instruction = body.instruction if body.instruction is not None else body.instruct
        # vLLM truncate_prompt_tokens, TEI truncate: false (413 for a pair over the context)
        max_tokens_per_doc = pair_limit(self.service, body.query, docs, instruction, body.truncate,
                                        body.truncate_prompt_tokens, body.max_tokens_per_doc,
                                        "texts" if tei else "documents")
        ranked, tokens = await self.call(
            request, "rerank", self.service.rank, body.query, docs, top_n=top_n, instruction=instruction,
            max_tokens_per_doc=max_tokens_per_doc, left=body.truncation_direction.lower() == "left",
            raw_scores=tei and body.raw_scores, min_score=body.min_score,
            **({"compression_ratio": body.compression_ratio} if body.compression_ratio is not None else {}),
            **({"return_evidence": True, "evidence_threshold": body.evidence_threshold,
                "max_new_tokens": body.max_new_tokens} if body.return_evidence else {}),
            **({"chunking": self.chunking(body.chunking)} if body.chunking is not None else {}))
        if tei:
            out = []
            for r in ranked:
                item = {"index": r["index"], "score": r["score"]}
                if body.return_text:
                    item["text"] = text_part(docs[r["index"]])
                item.update(chunk_fields(r))
                out.append(item)
            return await self.respond(out)
        results = []
        for r in ranked:
            item = {"index": r["index"], "relevance_score": r["score"]}
            if body.return_documents:
                item["document"] = doc_echo(docs[r["index"]])  # an image document: its text part
            if body.return_evidence:
                for key in ("contribution", "evidence", "raw_output"):
                    item[key] = r.get(key)
            item.update(chunk_fields(r))
            results.append(item)
        return await self.respond({"id": str(uuid.uuid4()), "model": name, "results": results,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def _embed(self, request: Request, texts, dimensions, bytes_per_number=JSON_BYTES_PER_NUMBER, **kwargs):
        self.check_count(len(texts), "input")
        if self.service.embedder is None:  # refuse before queueing
            raise ApiError(400, f"this server hosts a {self.service.task} model; embeddings need an embedding "
                                f"model (serve one with --task embed)", type="unsupported_task")
        if dimensions is not None and dimensions > self.service.dimension:
            raise ApiError(400, f"dimensions={dimensions} is larger than the embedding size "
                                f"{self.service.dimension}", "dimensions")
        self.check_response_size(len(texts) * (dimensions or self.service.dimension), bytes_per_number)
        return await self.call(request, "embed", self.service.embed, texts, dimensions=dimensions, **kwargs)

    async def index(self, body: IndexBody, request: Request):
        name = self.check_model(body.model)
        self.check_count(len(body.documents), "documents")
        out, tokens = await self.call(request, "index", self.service.index, body.documents,
                                      compression_ratio=body.compression_ratio)
        return await self.respond({"object": "index", "model": name, **out,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def classify(self, body: ClassifyBody, request: Request):
        name = self.check_model(body.model)
        self.check_count(len(body.input), "input")
        pairs = len(body.input) * len(body.labels.names)  # a LabelSet: checked once, with the body
        if pairs > self.config.max_pairs:
            raise ApiError(413, f"{len(body.input)} inputs x {pairs // len(body.input)} labels = {pairs} pairs is more "
                                f"than this server's limit of {self.config.max_pairs} per request (--max-pairs)",
                           "labels")
        data, tokens = await self.call(request, "classify", self.service.classify, body.input, body.labels,
                                       multi_label=body.multi_label, threshold=body.threshold,
                                       instruction=body.instruction)
        return await self.respond({"object": "list", "model": name, "data": data,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def models(self):
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.config.created,
                                            "owned_by": "rerank-engine", "task": self.service.task,
                                            "max_model_len": self.service.max_length}]}

    async def metrics_text(self):
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)


def _validation_error(request: Request, exc: RequestValidationError):
    errors = exc.errors()
    bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if bad_json is not None:
        return error_response(400, f"invalid JSON: {bad_json.get('ctx', {}).get('error', 'decode error')} "
                           f"at position {bad_json['loc'][-1]}")
    parts = [f"{error_param(e['loc']) or 'body'}: {e['msg']}" for e in errors[:5]]
    return error_response(422, "; ".join(parts), error_param(errors[0]["loc"]) if errors else None)


def _http_error(request: Request, exc: HTTPException):
    return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


def _api_error(request: Request, exc: ApiError):
    return error_response(exc.status, exc.message, exc.param, exc.type, exc.headers)


def _server_error(request: Request, exc: Exception):
    log.error("unhandled error on %s", request.url.path, exc_info=exc)  # not in an except block: pass exc
    return error_response(500, f"internal error: {type(exc).__name__}")


def _schema_limits(app: FastAPI, service: Service) -> None:
    """The OpenAPI spec with this model's own limits: ``dimensions`` at most its embedding size."""
    build = app.openapi

    def openapi():
        if app.openapi_schema is None:
            spec = build()
            schemas = spec.get("components", {}).get("schemas", {})
            for name in ("EmbedBody", "EmbeddingsBody"):
                dims = schemas.get(name, {}).get("properties", {}).get("dimensions")
                if dims is not None and service.embedder is not None:
                    for option in dims.get("anyOf", [dims]):
                        if option.get("type") == "integer":
                            option["maximum"] = service.dimension
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi


def create_app(service: Service, config: ServerConfig) -> FastAPI:
    """The ASGI app; run it with uvicorn (``rerank-engine serve``)."""
    server = Server(service, config)

    @asynccontextmanager
    async def lifespan(app):
        log.info("API key %s", "required on every route but /health" if config.api_key
                 else "not required (no --api-key)")
        yield
        # Past the graceful timeout uvicorn cancels the requests in flight: each sets its cancel event and
        # answers 503 (Server.call). Set any left here too; the engine stops them at its next step.
        for cancel in list(server.cancels):
            cancel.set()
        await asyncio.sleep(0.05)  # let the cancelled requests send their 503
        try:  # off the loop, bounded: a step already running is not interrupted, only waited for a while
            await asyncio.wait_for(asyncio.to_thread(server.pool.shutdown, wait=True), SHUTDOWN_WAIT_S)
        except asyncio.TimeoutError:
            log.warning("engine work still running %g s after shutdown began; exiting anyway", SHUTDOWN_WAIT_S)

    errors = {code: {"model": ErrorResponse} for code in (400, 401, 404, 408, 413, 415, 421, 422, 429, 503)}
    app = FastAPI(title="rerank-engine", version="0.1.0", lifespan=lifespan, responses=errors)
    app.router.redirect_slashes = False  # no redirect (it would echo the Host header): "/v1/rerank/" is 404
    app.state.server = server
    register_routes(app, server)  # engine.serving.compat.ROUTES: the compatibility map
    for route in app.routes:  # /v1/index: listed in the spec only where it works (KaLM-Reranker)
        if getattr(route, "path", None) == "/v1/index":
            route.include_in_schema = bool(getattr(service.reranker, "is_encoder_decoder", False))
    app.add_api_route("/metrics", server.metrics_text, methods=["GET"], summary="Prometheus metrics",
                      response_class=Response,
                      responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                       "description": "Prometheus text exposition format"}})
    _schema_limits(app, service)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(Exception, _server_error)
    app.add_middleware(Gate, api_key=config.api_key, max_body_bytes=config.max_body_bytes,
                       body_timeout_s=config.body_timeout_s, max_header_bytes=config.max_header_bytes,
                       max_pending_body_bytes=config.max_pending_body_bytes, allowed_hosts=config.allowed_hosts,
                       retry_after_s=config.retry_after_s)
    app.add_middleware(MetricsMiddleware, metrics=server.metrics, paths=[r.path for r in app.routes])
    return app
