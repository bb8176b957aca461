"""Client compatibility: the routes and body shapes of OpenAI, Cohere, TEI, vLLM and infinity, as one table.

``ROUTES`` is the compatibility map: each entry is a path, its methods, the handler that answers it,
the clients that send it and the fields honoured. ``register_routes`` registers the table, so adding
a shape is one entry (plus a handler only for a new body) and a test; README.md ("Client
compatibility") mirrors it. Where two tools define one path the tool that defined it first wins
(Cohere's body on ``/v1/rerank``, TEI's on ``/rerank`` with ``texts``, TEI's ``/tokenize`` with
``inputs`` and vLLM's with ``prompt``), and the body tells the shapes apart.

Strictness: every field a body declares is honoured or refused with a 4xx naming it.

Token ids as input (OpenAI ``input: [[101, 3231]]``, TEI ``inputs: [101, 3231]``) go to the model as
given, inside the special tokens and prompt of the model's template (engine.prompts.token_ids), so a
document's ids from this model's tokenizer embed exactly as its text. Ids outside the vocabulary are
refused (400). Ids of another tokenizer (tiktoken's, as LangChain's ``OpenAIEmbeddings`` sends by
default) cannot be told apart from this model's; such clients must send text
(``check_embedding_ctx_length=False``).

``--strict`` (``ServerConfig.strict``) also refuses what the model cannot honour as trained
(``Compat.check_strict``, ``model_traits``): shorter ``dimensions`` without Matryoshka training, an
``instruction`` on a model trained without one.

Quantized embeddings (Cohere ``embedding_types``, vLLM ``embed_dtype``), from the float32 vector
after Matryoshka truncation and normalisation: ``int8`` = round(127 * clip(x, -1, 1)) and ``uint8`` =
round(127.5 * (clip(x, -1, 1) + 1)), i.e. the fixed calibration range [-1, 1] of a unit vector's
components (sentence-transformers' ``quantize_embeddings`` with ranges [[-1]*d, [1]*d]);
``ubinary`` = the sign bits (x > 0) packed 8 per byte, most significant first (numpy.packbits);
``binary`` = ubinary - 128 as int8 (Cohere's and sentence-transformers' definition).
"""
import base64
import json
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import numpy as np
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import ConfigDict, Field
from typing_extensions import Annotated

from engine.prompts.chunking import chunk_fields
from engine.prompts.inputs import text_part
from engine.prompts.templates import is_blank
from engine.serving.errors import ApiError
from engine.serving.protocol import (
    ChatMessage,
    ChunkingBody,
    ClassifyResponse,
    Direction,
    EmbeddingsResponse,
    MMInputs,
    PositiveInt,
    RerankResponse,
    ScoreResponse,
    TEIRank,
    Text,
    Texts,
    _Body,
    error_param,
)

TokenIds = List[Annotated[int, Field(ge=0)]]
# Text, a list of texts, one sequence of token ids or a list of them.
TextOrIds = Union[Texts, TokenIds, List[TokenIds]]
EmbedDtype = Literal["float32", "float16", "bfloat16", "int8", "uint8", "binary", "ubinary"]
Endianness = Literal["native", "little", "big"]


# Bodies

class EmbeddingsBody(_Body):
    """OpenAI ``/v1/embeddings`` (and vLLM's, infinity's): text or token ids; ``input`` or (vLLM)
    ``messages``, one of the two."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["input"]}, {"required": ["messages"]}]})

    model: Optional[str] = None
    input: Optional[TextOrIds] = None
    messages: Optional[List[ChatMessage]] = Field(
        None, description="vLLM chat embeddings: system text is the instruction, user content the one input")
    dimensions: Optional[PositiveInt] = None
    encoding_format: Literal["float", "base64"] = "float"
    embed_dtype: EmbedDtype = Field("float32", description="vLLM: the element type of the vectors")
    endianness: Endianness = Field("native", description="vLLM: byte order of base64 vectors")
    truncate_prompt_tokens: Optional[Annotated[int, Field(ge=-1)]] = Field(
        None, description="vLLM: keep at most this many tokens of each input (-1: the model's context)")
    normalize: bool = True
    instruction: Optional[Text] = None
    user: Optional[str] = None  # OpenAI: an end-user id, for the provider's abuse tracking; not used here


class EmbedBody(_Body):
    """TEI ``/embed``, ``/embed_all``, ``POST /`` on an embedding model."""

    inputs: TextOrIds
    normalize: bool = True
    truncate: Optional[bool] = Field(None, description="false: an input over the model's context is 413")
    truncation_direction: Direction = "right"
    dimensions: Optional[PositiveInt] = None
    prompt_name: Optional[str] = None
    instruction: Optional[Text] = None


class EmbedAllBody(_Body):
    """TEI ``/embed_all``: per-token vectors."""

    inputs: TextOrIds
    truncate: Optional[bool] = Field(None, description="false: an input over the model's context is 413")
    truncation_direction: Direction = "right"
    prompt_name: Optional[str] = None


class PoolingBody(EmbeddingsBody):
    """vLLM ``/pooling``: an embeddings body and the pooling ``task``."""

    task: Optional[Literal["embed", "encode", "token_embed"]] = Field(
        None, description="embed/encode (default): one pooled vector per input; token_embed: one per token")


class SimilarityInputs(_Body):
    source_sentence: Text
    sentences: List[Text]


class TEISimilarityBody(_Body):
    """TEI ``/similarity``: the cosine of ``source_sentence`` with each of ``sentences``."""

    inputs: SimilarityInputs
    normalize: bool = True
    truncate: Optional[bool] = None
    truncation_direction: Direction = "right"
    prompt_name: Optional[str] = None
    parameters: Optional[Dict[str, Any]] = None  # huggingface_hub: {prompt_name, truncate, ...}


class TEIPredictBody(_Body):
    """TEI ``/predict``: a (query, document) pair ``[q, d]`` or a list of pairs, on a reranker."""

    inputs: Union[Text, List[Text], List[List[Text]]]
    raw_scores: bool = False
    truncate: Optional[Literal[True]] = Field(None, description="pairs are always truncated: false is 422")
    truncation_direction: Literal["right", "Right"] = Field(
        "right", description="left truncation is not supported by /predict (422)")


class TEITokenizeBody(_Body):
    """TEI ``/tokenize`` (``inputs``) or vLLM ``/tokenize`` (``prompt``)."""

    inputs: Optional[Texts] = None
    prompt: Optional[Text] = None
    add_special_tokens: bool = True
    prompt_name: Optional[str] = None
    model: Optional[str] = None
    return_token_strs: bool = Field(False, description="vLLM: also answer each token as a string (token_strs)")


class TEIDecodeBody(_Body):
    ids: Union[TokenIds, List[TokenIds]]
    skip_special_tokens: bool = True


class DetokenizeBody(_Body):
    """vLLM ``/detokenize``: token ids back to text (special tokens kept, as vLLM decodes)."""

    model: Optional[str] = None
    tokens: TokenIds


class CohereEmbedBody(_Body):
    """Cohere ``/v1/embed`` and ``/v2/embed``."""

    model: Optional[str] = None
    texts: List[Text]
    input_type: Optional[Literal["search_document", "search_query", "classification", "clustering"]] = None
    embedding_types: Optional[List[Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]]] = None
    truncate: Literal["NONE", "START", "END"] = "END"
    output_dimension: Optional[PositiveInt] = None
    max_tokens: Optional[PositiveInt] = None


class ProviderRerankBody(_Body):
    """The rerank bodies of Voyage (``documents``, ``top_k``, ``truncation``), mixedbread (``input``,
    ``top_k``, ``return_input``, ``rank_fields``), Pinecone (``documents`` as strings or objects,
    ``top_n``, ``rank_fields``, ``parameters.truncate``) and Isaacus (``texts``, ``top_n``)."""

    model: Optional[str] = None
    query: Text
    documents: Optional[List[Union[Text, Dict[str, Any]]]] = None
    input: Optional[List[Union[Text, Dict[str, Any]]]] = None
    texts: Optional[List[Text]] = None
    top_k: Optional[Annotated[int, Field(ge=0)]] = None
    top_n: Optional[Annotated[int, Field(ge=0)]] = None
    return_documents: Optional[bool] = None
    return_input: Optional[bool] = None
    rank_fields: Optional[List[str]] = Field(None, description="one field of the document objects to rank by")
    truncation: Optional[bool] = Field(None, description="Voyage: false refuses (413) a pair over the context")
    parameters: Optional[Dict[str, Any]] = Field(None, description="Pinecone: {truncate: END | NONE}")
    instruction: Optional[Text] = None


# provider: (documents field, top field, return field, default return, results key, score key)
_PROVIDERS = {
    "voyage": ("documents", "top_k", "return_documents", False, "data", "relevance_score"),
    "mixedbread": ("input", "top_k", "return_input", False, "data", "score"),
    "pinecone": ("documents", "top_n", "return_documents", True, "data", "score"),
    "isaacus": ("texts", "top_n", "return_documents", False, "results", "score"),
}


class ScoreBody(_Body):
    """vLLM ``/v1/score``: ``text_1``/``text_2``, ``data_1``/``data_2``, ``queries``/``documents`` or
    ``queries``/``items``: one query against many, or two lists of equal length."""

    model: Optional[str] = None
    text_1: Optional[MMInputs] = None
    text_2: Optional[MMInputs] = None
    data_1: Optional[MMInputs] = None
    data_2: Optional[MMInputs] = None
    queries: Optional[MMInputs] = None
    documents: Optional[MMInputs] = None
    items: Optional[MMInputs] = None
    instruction: Optional[Text] = None
    truncate_prompt_tokens: Optional[Annotated[int, Field(ge=-1)]] = None
    chunking: Optional[ChunkingBody] = None


_SCORE_PAIRS = (("text_1", "text_2"), ("data_1", "data_2"), ("queries", "documents"), ("queries", "items"))


# Encodings

def quantize(emb: np.ndarray, kind: str) -> np.ndarray:
    """float32 ``[n, d]`` -> the quantized type (module docstring: ranges and bit order)."""
    x = np.clip(emb, -1.0, 1.0)
    if kind == "int8":
        return np.round(x * 127.0).astype(np.int8)
    if kind == "uint8":
        return np.round((x + 1.0) * 127.5).astype(np.uint8)
    bits = np.packbits(emb > 0, axis=-1)
    if kind == "ubinary":
        return bits
    if kind == "binary":
        return (bits.astype(np.int16) - 128).astype(np.int8)
    raise ValueError(kind)


def _bf16_bits(emb: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even as torch does."""
    u = np.ascontiguousarray(emb, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def typed(emb: np.ndarray, dtype: str) -> np.ndarray:
    """The vectors as ``dtype``: a float or integer array (bfloat16 as its float32 values)."""
    if dtype == "float32":
        return emb
    if dtype == "float16":
        return emb.astype(np.float16)
    if dtype == "bfloat16":
        return (_bf16_bits(emb).astype(np.uint32) << 16).view(np.float32)
    return quantize(emb, dtype)


def to_base64(emb: np.ndarray, dtype: str, endianness: str = "little") -> List[str]:
    order = {"little": "<", "big": ">", "native": "<" if sys.byteorder == "little" else ">"}[endianness]
    if dtype == "bfloat16":
        arr = _bf16_bits(emb).astype(order + "u2")
    elif dtype in ("float32", "float16"):
        arr = emb.astype(order + ("f4" if dtype == "float32" else "f2"))
    else:
        arr = quantize(emb, dtype)
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in arr]


# TEI's error body on TEI routes

_TEI_ERROR_TYPES = {400: "Validation", 413: "Validation", 422: "Validation", 429: "Overloaded", 499: "Cancelled"}


def tei_error(status: int, message: str, error_type: Optional[str] = None, headers=None) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type or _TEI_ERROR_TYPES.get(status, "Backend")},
                        status_code=status, headers=headers)


class TEIRoute(APIRoute):
    """A route answering errors in TEI's shape, ``{"error": str, "error_type": str}``."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                errors = exc.errors()
                if any(e.get("type") == "json_invalid" for e in errors):
                    return tei_error(400, "invalid JSON")
                parts = [f"{error_param(e['loc']) or 'body'}: {e['msg']}" for e in errors[:5]]
                return tei_error(422, "; ".join(parts))
            except ApiError as exc:
                return tei_error(exc.status, exc.message, "Empty" if exc.type == "empty" else None, exc.headers)

        return route


# Handlers

class Compat:
    """The compatibility handlers, over a ``Server`` (its admission, model checks and engine calls)."""

    def __init__(self, server):
        self.server = server
        self.service = server.service

    def _error(self, *args, **kwargs):
        return ApiError(*args, **kwargs)

    def inputs_of(self, inputs, param: str) -> Tuple[list, bool]:
        """Text, texts, token ids or lists of them -> (a list of texts or of id sequences, whether ids).
        Ids go to the model as given (engine.prompts.token_ids); ids outside the vocabulary are 400."""
        if isinstance(inputs, str):
            return [inputs], False
        if not inputs or isinstance(inputs[0], str):
            return list(inputs), False
        seqs = [inputs] if isinstance(inputs[0], int) else inputs
        vocab = len(self.service.engine.tokenizer)
        for i, ids in enumerate(seqs):
            bad = next((t for t in ids if t >= vocab), None)
            if bad is not None:
                raise self._error(400, f"{param}[{i}] holds token id {bad}, outside this model's vocabulary "
                                       f"of {vocab}", f"{param}[{i}]")
        if self.service.multimodal:
            raise self._error(400, f"{param}: token ids are not supported by this model (it takes text and "
                                   f"images); send text", param)
        return [list(ids) for ids in seqs], True

    def check_strict(self, value, field: str):
        """``--strict``: refuse an option the model cannot honour as trained (400 naming it): shorter
        ``dimensions`` without Matryoshka training, an ``instruction`` on a model trained without one."""
        if value is None or not getattr(self.server.config, "strict", False):
            return
        matryoshka, instructed = model_traits(self.service)
        if field in ("dimensions", "output_dimension") and not matryoshka and value != self.service.dimension:
            raise self._error(400, f"{field}: this model was not trained for shorter (Matryoshka) embeddings, and "
                                   f"the server runs --strict; leave {field} out", field)
        if field == "instruction" and not instructed:
            raise self._error(400, "instruction: this model was trained without instructions, and the server runs "
                                   "--strict; leave instruction out", field)

    def _max_tokens(self, truncate_prompt_tokens: Optional[int]) -> Optional[int]:
        if truncate_prompt_tokens is None or truncate_prompt_tokens == -1:
            return None
        if truncate_prompt_tokens == 0:
            raise self._error(400, "truncate_prompt_tokens must be -1 (the model's context) or at least 1",
                              "truncate_prompt_tokens")
        return truncate_prompt_tokens

    # OpenAI / vLLM / infinity

    def _embedding_inputs(self, body: "EmbeddingsBody") -> Tuple[list, Optional[str], bool]:
        """(inputs, instruction, whether the inputs are token ids) of an OpenAI/vLLM embeddings body."""
        instruction = body.instruction
        if (body.input is None) == (body.messages is None):
            raise self._error(422, "give either input or messages", "input")
        if body.messages is None:
            inputs, ids = self.inputs_of(body.input, "input")
            return inputs, instruction, ids
        # vLLM chat embeddings: one input from the conversation
        system = [text_part(m.content) for m in body.messages if m.role == "system"]
        parts = []
        for m in body.messages:
            if m.role != "system":
                parts += [m.content] if isinstance(m.content, str) else list(m.content)
        instruction = "\n".join(system) if system else instruction
        inputs = [parts if any(not isinstance(p, str) for p in parts) else "".join(parts)]
        self.server.check_text_only(inputs, "messages")
        return inputs, instruction, False

    async def _embedding_vectors(self, body: "EmbeddingsBody", request: Request):
        """(served name, the vectors as the body asks: base64 strings or a typed array, prompt tokens)."""
        server = self.server
        name = server.check_model(body.model)
        inputs, instruction, ids = self._embedding_inputs(body)
        if body.encoding_format == "float" and body.endianness != "native":
            raise self._error(400, "endianness applies to encoding_format=base64 only", "endianness")
        self.check_strict(body.dimensions, "dimensions")
        self.check_strict(instruction, "instruction")
        base64_out = body.encoding_format == "base64"
        emb, tokens = await server._embed(request, inputs, body.dimensions, instruction=instruction,
                                          normalize=body.normalize, ids=ids,
                                          max_tokens=self._max_tokens(body.truncate_prompt_tokens),
                                          **({"bytes_per_number": 16 / 3} if base64_out else {}))
        if base64_out:
            return name, to_base64(emb, body.embed_dtype, body.endianness), tokens
        return name, np.ascontiguousarray(typed(emb, body.embed_dtype)), tokens

    async def embeddings(self, body: EmbeddingsBody, request: Request):
        name, vectors, tokens = await self._embedding_vectors(body, request)
        return await self.server.respond({"object": "list", "model": name,
                                          "data": [{"object": "embedding", "index": i, "embedding": v}
                                                   for i, v in enumerate(vectors)],
                                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def pooling(self, body: "PoolingBody", request: Request):
        """vLLM ``/pooling``: ``task`` embed (or encode) gives each input's pooled vector, token_embed
        every token's vector (Matryoshka ``dimensions`` then ``normalize`` per token)."""
        if body.task == "token_embed":
            name = self.server.check_model(body.model)
            inputs, instruction, ids = self._embedding_inputs(body)
            if body.encoding_format != "float" or body.embed_dtype != "float32" or body.endianness != "native":
                field = "encoding_format" if body.encoding_format != "float" else \
                    "embed_dtype" if body.embed_dtype != "float32" else "endianness"
                raise self._error(400, f"{field} is not supported with task=token_embed (float32 JSON only)", field)
            self.check_strict(body.dimensions, "dimensions")
            states, tokens = await self._token_states(request, inputs, ids, instruction,
                                                      self._max_tokens(body.truncate_prompt_tokens), False, "input")
            if body.dimensions is not None and body.dimensions > self.service.dimension:
                raise self._error(400, f"dimensions={body.dimensions} is larger than the embedding size "
                                       f"{self.service.dimension}", "dimensions")
            from engine.models.heads import matryoshka

            vectors = [np.ascontiguousarray(matryoshka(x, body.dimensions, normalize=body.normalize), np.float32)
                       for x in states]
        else:
            name, vectors, tokens = await self._embedding_vectors(body, request)
        return await self.server.respond({"id": f"pool-{uuid.uuid4().hex}", "object": "list",
                                          "created": int(time.time()), "model": name,
                                          "data": [{"index": i, "object": "pooling", "data": v}
                                                   for i, v in enumerate(vectors)],
                                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def _token_states(self, request: Request, inputs, ids: bool, instruction, max_tokens, left, param):
        server = self.server
        server.check_count(len(inputs), param)
        if self.service.embedder is None:
            raise self._error(400, f"this server hosts a {self.service.task} model; per-token embeddings need an "
                                   f"embedding model (serve one with --task embed)", type="unsupported_task")
        # the response's size, before any work: every token's vector (texts counted by their own tokens)
        overhead = self.service.budget.overhead[1 if instruction is None else 0]
        n = sum(len(x) if ids else self.service.budget.count(x) for x in inputs) + overhead * len(inputs)
        server.check_response_size(n * self.service.dimension)
        return await server.call(request, "embed_all", self.service.token_states, inputs, ids=ids,
                                 instruction=instruction, max_tokens=max_tokens, left=left)

    async def score(self, body: ScoreBody, request: Request):
        server = self.server
        name = server.check_model(body.model)
        given = [f for f in ("text_1", "text_2", "data_1", "data_2", "queries", "documents", "items")
                 if getattr(body, f) is not None]
        pair = next((p for p in _SCORE_PAIRS if set(given) == set(p)), None)
        if pair is None and len(given) == 1:
            other = next(b if a == given[0] else a for a, b in _SCORE_PAIRS if given[0] in (a, b))
            raise self._error(422, f"{other} is required with {given[0]}", other)
        if pair is None:
            raise self._error(422, "give one pair of text_1/text_2, data_1/data_2, queries/documents or "
                                   f"queries/items (got {', '.join(given) or 'none'})", given[0] if given else "text_1")
        a, b = pair
        q, d = getattr(body, a), getattr(body, b)
        for i, t in enumerate(q):  # as rerank refuses an empty query
            if isinstance(t, str) and is_blank(t):
                raise self._error(400, f"{a} must not be empty" if len(q) == 1 else f"{a}[{i}] must not be empty", a)
        if len(q) == 1 and len(d) != 1:
            q = q * len(d)
        if len(q) != len(d):
            raise self._error(400, f"{a} has {len(q)} texts and {b} {len(d)}: give one {a}, "
                                   f"or lists of equal length", b)
        server.check_count(len(d), b)
        if body.truncate_prompt_tokens is not None:  # each pair's prompt at most that long: documents cut
            d = [self.service.budget.fit([doc], pair_limit(self.service, qq, [], body.instruction, None,
                                                           body.truncate_prompt_tokens, None, b), False)[0]
                 for qq, doc in zip(q, d)]
        server.check_text_only(q[:1], a)
        server.check_text_only(d, b)
        if body.chunking is not None:  # long documents scored by their chunks (engine.prompts.chunking)
            got, tokens = await server.call(request, "score", self.service.score, q, d, instruction=body.instruction,
                                            chunking=server.chunking(body.chunking))
            data = [{"index": i, "object": "score", "score": g["score"], **chunk_fields(g)} for i, g in enumerate(got)]
        else:
            scores, tokens = await server.call(request, "score", self.service.score, q, d,
                                               instruction=body.instruction)
            data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]
        return await server.respond({"id": f"score-{uuid.uuid4().hex}", "object": "list",
                                     "created": int(time.time()), "model": name, "data": data,
                                     "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def models(self):
        out = await self.server.models()
        for m in out["data"]:
            m["stats"] = {}  # infinity: per-model stats (none kept per model here; /metrics has the figures)
        return out

    async def health(self):
        return {"status": "ok", "unix": time.time()}  # infinity's liveness carries the server's clock

    # TEI

    def _tei_prompt(self, prompt_name: Optional[str]) -> Optional[str]:
        if prompt_name is None:
            return None
        if prompt_name == "query":
            return self.service.engine.template.default_instruction
        raise self._error(422, f"prompt_name {prompt_name!r} is not known to this model (it has 'query')",
                          "prompt_name")

    def check_fits(self, texts, truncate: Optional[bool], instruction: Optional[str], param: str = "inputs",
                   ids: bool = False, status: int = 413):
        """TEI ``truncate: false``: an input longer than the model's context is refused (413), not cut."""
        if truncate is not False or self.service.task != "embed":
            return
        budget = self.service.budget
        overhead = budget.overhead[1] if instruction is None else budget.overhead[0] + budget.count(instruction)
        for i, t in enumerate(texts):
            n = (len(t) if ids else budget.count(t)) + overhead
            if n > self.service.max_length:
                raise self._error(status, f"{param}[{i}] must have less than {self.service.max_length} tokens "
                                          f"with truncate={'NONE' if status == 400 else 'false'}. Given: {n}", param)

    async def tei_embed(self, body: EmbedBody, request: Request):
        texts, ids = self.inputs_of(body.inputs, "inputs")
        if not texts:
            raise self._error(400, "Batch is empty", "inputs", type="empty")
        instruction = body.instruction if body.instruction is not None else self._tei_prompt(body.prompt_name)
        self.check_fits(texts, body.truncate, instruction, ids=ids)
        self.check_strict(body.dimensions, "dimensions")
        self.check_strict(body.instruction, "instruction")
        emb, _ = await self.server._embed(request, texts, body.dimensions, normalize=body.normalize,
                                          instruction=instruction, ids=ids,
                                          left=body.truncation_direction.lower() == "left")
        return await self.server.respond(np.ascontiguousarray(emb))

    async def tei_embed_all(self, body: EmbedAllBody, request: Request):
        """TEI ``/embed_all``: every token's final hidden state, ``[inputs][tokens][hidden]``, not normalized."""
        texts, ids = self.inputs_of(body.inputs, "inputs")
        if not texts:
            raise self._error(400, "Batch is empty", "inputs", type="empty")
        instruction = self._tei_prompt(body.prompt_name)
        self.check_fits(texts, body.truncate, instruction, ids=ids)
        states, _ = await self._token_states(request, texts, ids, instruction, None,
                                             body.truncation_direction.lower() == "left", "inputs")
        return await self.server.respond(states)

    async def tei_similarity(self, body: TEISimilarityBody, request: Request):
        params = dict(body.parameters or {})
        prompt_name = params.pop("prompt_name", body.prompt_name)
        truncate = params.pop("truncate", body.truncate)
        direction = params.pop("truncation_direction", body.truncation_direction)
        if direction not in ("right", "left", "Right", "Left"):
            raise self._error(422, "truncation_direction must be right or left", "truncation_direction")
        if params:
            raise self._error(422, f"parameters.{min(params)} is not supported by /similarity",
                              f"parameters.{min(params)}")
        sents = body.inputs.sentences
        if not sents:
            raise self._error(400, "Batch is empty", "inputs.sentences", type="empty")
        instruction = self._tei_prompt(prompt_name)
        self.check_fits([body.inputs.source_sentence] + list(sents), truncate, instruction, "inputs.sentences")
        emb, _ = await self.server._embed(request, [body.inputs.source_sentence] + list(sents), None,
                                          instruction=instruction, left=direction.lower() == "left")
        return JSONResponse([float(s) for s in emb[1:] @ emb[0]])

    async def tei_root(self, request: Request):
        """TEI ``POST /``: embed on an embedding model (similarity for ``{source_sentence, sentences}``),
        rerank (``query`` + ``texts``) on a reranker."""
        from engine.serving.protocol import RerankBody

        try:
            raw = json.loads(await request.body())
        except ValueError as e:  # also a body that is not UTF-8
            raise self._error(400, f"invalid JSON: {e}") from None
        if self.service.task == "embed":
            if isinstance(raw, dict) and isinstance(raw.get("inputs"), dict):
                return await self.tei_similarity(_validate(TEISimilarityBody, raw), request)
            return await self.tei_embed(_validate(EmbedBody, flatten_parameters(raw)), request)
        body = _validate(RerankBody, raw)
        if body.texts is None:
            raise self._error(422, "POST / on a reranker takes TEI's rerank body {query, texts}", "texts")
        return await self.server.rerank(body, request)

    async def tei_predict(self, body: TEIPredictBody, request: Request):
        if self.service.task != "rerank":
            raise self._error(400, f"/predict scores (query, document) pairs with a reranker; this server hosts a "
                                   f"{self.service.task} model", "inputs", type="unsupported_task")
        x = body.inputs
        single = isinstance(x, list) and len(x) == 2 and all(isinstance(t, str) for t in x)
        pairs = [x] if single else x
        if isinstance(x, str) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise self._error(422, "a reranker's /predict takes pairs [query, document]: [q, d] or [[q, d], ...]",
                              "inputs")
        if not pairs:
            raise self._error(400, "Batch is empty", "inputs", type="empty")
        self.server.check_count(len(pairs), "inputs")
        scores, _ = await self.server.call(request, "predict", self.service.score, [p[0] for p in pairs],
                                           [p[1] for p in pairs], raw_scores=body.raw_scores)
        out = [[{"score": float(s), "label": "LABEL_0"}] for s in scores]
        return JSONResponse(out[0] if single else out)

    async def tei_info(self):
        tpl = self.service.engine.template
        kind = ({"embedding": {"pooling": "last_token" if tpl.default_instruction else "mean"}}
                if self.service.task == "embed" else {"reranker": {"id2label": {"0": "LABEL_0"}}})
        cfg = self.server.config
        return {"model_id": self.server.name, "model_sha": None, "model_dtype": "float32",
                "model_type": kind, "max_concurrent_requests": cfg.max_queue,
                "max_input_length": self.service.max_length, "max_batch_tokens": 16384,
                "max_batch_requests": None, "max_client_batch_size": cfg.max_documents,
                "tokenization_workers": 1, "version": "0.1.0", "auto_truncate": True}

    async def tokenize(self, body: TEITokenizeBody, request: Request):
        tok = self.service.engine.tokenizer
        if (body.inputs is None) == (body.prompt is None):
            raise self._error(422, "give inputs (TEI) or prompt (vLLM)", "inputs")
        if body.prompt is not None:  # vLLM
            self.server.check_model(body.model)
            ids = tok(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
            out = {"tokens": ids, "count": len(ids), "max_model_len": self.service.max_length}
            if body.return_token_strs:
                out["token_strs"] = tok.convert_ids_to_tokens(ids)
            return out
        if body.return_token_strs:
            raise self._error(422, "return_token_strs is vLLM's (with prompt); TEI's tokens carry their text",
                              "return_token_strs")
        if body.prompt_name is not None:
            raise self._error(422, "prompt_name is not supported by /tokenize", "prompt_name")
        if not body.inputs:
            raise self._error(400, "Batch is empty", "inputs", type="empty")
        special = set(tok.all_special_ids)
        out = []
        for text in body.inputs:
            enc = tok(text, add_special_tokens=body.add_special_tokens, return_offsets_mapping=True)
            toks = []
            for t, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]):
                sp = t in special
                toks.append({"id": t, "text": tok.convert_ids_to_tokens(t) if sp else text[s:e], "special": sp,
                             "start": None if sp else s, "stop": None if sp else e})
            out.append(toks)
        return out

    async def tei_decode(self, body: TEIDecodeBody, request: Request):
        seqs = body.ids if body.ids and isinstance(body.ids[0], list) else [body.ids]
        if not body.ids:
            raise self._error(400, "Batch is empty", "ids", type="empty")
        vocab = len(self.service.engine.tokenizer)
        for i, s in enumerate(seqs):
            if any(t >= vocab for t in s):
                raise self._error(400, f"ids[{i}] holds an id outside this model's vocabulary of {vocab}", "ids")
        tok = self.service.engine.tokenizer
        return [tok.decode(s, skip_special_tokens=body.skip_special_tokens) for s in seqs]

    async def detokenize(self, body: DetokenizeBody, request: Request):
        self.server.check_model(body.model)
        vocab = len(self.service.engine.tokenizer)
        bad = next((t for t in body.tokens if t >= vocab), None)
        if bad is not None:
            raise self._error(400, f"tokens holds token id {bad}, outside this model's vocabulary of {vocab}", "tokens")
        return {"prompt": self.service.engine.tokenizer.decode(body.tokens)}

    # Cohere

    async def cohere_embed(self, body: CohereEmbedBody, request: Request, v2: bool = False):
        name = self.server.check_model(body.model)
        if body.output_dimension is not None and self.service.dimension is not None \
                and body.output_dimension > self.service.dimension:
            raise self._error(400, f"output_dimension={body.output_dimension} is larger than the embedding size "
                                   f"{self.service.dimension}", "output_dimension")
        self.check_strict(body.output_dimension, "output_dimension")
        types = body.embedding_types or ["float"]
        if len(set(types)) != len(types):
            raise self._error(422, "embedding_types lists a type twice", "embedding_types")
        # search_query: the model's query format (its default instruction); the other types: documents.
        is_query = body.input_type == "search_query"
        instruction = self.service.engine.template.default_instruction if is_query else None
        if body.truncate == "NONE":  # Cohere: a text over the model's context is an error, not cut
            self.check_fits(body.texts, False, instruction, "texts", status=400)
        if not body.texts:
            emb, tokens = np.zeros((0, body.output_dimension or self.service.dimension or 0), np.float32), 0
        else:
            emb, tokens = await self.server._embed(request, body.texts, body.output_dimension,
                                                   instruction=instruction, is_query=is_query,
                                                   max_tokens=body.max_tokens, left=body.truncate == "START")
        by_type = {}
        for t in types:
            if t == "float":
                by_type[t] = emb.tolist()
            elif t == "base64":
                by_type[t] = to_base64(emb, "float32", "little")
            else:
                by_type[t] = quantize(emb, t).tolist()
        meta = {"api_version": {"version": "2" if v2 else "1"}, "billed_units": {"input_tokens": tokens}}
        out: Dict[str, Any] = {"id": str(uuid.uuid4()), "texts": body.texts, "meta": meta}
        if v2:
            out["embeddings"] = by_type
        elif body.embedding_types is None:
            out.update(response_type="embeddings_floats", embeddings=by_type["float"])
        else:
            out.update(response_type="embeddings_by_type", embeddings=by_type)
        out["model"] = name
        return JSONResponse(out)

    async def cohere_embed_v2(self, body: CohereEmbedBody, request: Request):
        return await self.cohere_embed(body, request, v2=True)

    # Other rerank APIs (each in its own response shape)

    async def provider_rerank(self, body: ProviderRerankBody, request: Request, provider: str):
        docs_field, top_field, return_field, return_default, results_key, score_key = _PROVIDERS[provider]
        server = self.server
        name = server.check_model(body.model)
        if is_blank(body.query):
            raise self._error(400, "query must not be empty", "query")
        raw = getattr(body, docs_field)
        if raw is None:
            raise self._error(422, f"{docs_field} is required", docs_field)
        fields = body.rank_fields or ["text"]
        if len(fields) != 1:
            raise self._error(400, "rank_fields: one field is supported (the text to rank)", "rank_fields")
        docs = []
        for i, d in enumerate(raw):
            if isinstance(d, dict):
                d = d.get(fields[0])
                if not isinstance(d, str):
                    raise self._error(422, f"{docs_field}[{i}] needs a string field {fields[0]!r}",
                                      f"{docs_field}[{i}]")
            docs.append(d)
        truncate = body.truncation
        if body.parameters is not None:
            params = dict(body.parameters)
            mode = params.pop("truncate", "END")
            if mode not in ("END", "NONE") or params:
                bad = "truncate" if mode not in ("END", "NONE") else min(params)
                raise self._error(400, f"parameters.{bad} is not supported (parameters takes truncate: END or NONE)",
                                  f"parameters.{bad}")
            truncate = mode != "NONE"
        server.check_count(len(docs), docs_field)
        top = getattr(body, top_field)
        ret = getattr(body, return_field)
        ret = return_default if ret is None else ret
        max_tokens = pair_limit(self.service, body.query, docs, body.instruction, truncate, None, None, docs_field)
        ranked, tokens = await server.call(request, "rerank", self.service.rank, body.query, docs, top_n=top or None,
                                           instruction=body.instruction, max_tokens_per_doc=max_tokens)
        results = []
        for r in ranked:
            item: Dict[str, Any] = {"index": r["index"], score_key: r["score"]}
            if ret and provider != "isaacus":
                echo = raw[r["index"]]  # as given: a string, or the document object
                item["document" if provider != "mixedbread" else "input"] = \
                    {"text": echo} if provider == "pinecone" and isinstance(echo, str) else echo
            if provider == "mixedbread":
                item["object"] = "rank_result"
            results.append(item)
        usage = {"voyage": {"total_tokens": tokens}, "mixedbread": {"prompt_tokens": tokens, "total_tokens": tokens},
                 "pinecone": {"rerank_units": 1}, "isaacus": {"input_tokens": tokens}}[provider]
        out: Dict[str, Any] = {results_key: results, "model": name, "usage": usage}
        if provider in ("voyage", "mixedbread"):
            out["object"] = "list"
        if provider == "mixedbread":
            out.update(top_k=top, return_input=ret)
        return await server.respond(out)

    async def voyage_rerank(self, body: ProviderRerankBody, request: Request):
        return await self.provider_rerank(body, request, "voyage")

    async def mixedbread_rerank(self, body: ProviderRerankBody, request: Request):
        return await self.provider_rerank(body, request, "mixedbread")

    async def pinecone_rerank(self, body: ProviderRerankBody, request: Request):
        return await self.provider_rerank(body, request, "pinecone")

    async def isaacus_rerank(self, body: ProviderRerankBody, request: Request):
        return await self.provider_rerank(body, request, "isaacus")


def pair_limit(service, query, docs, instruction: Optional[str], truncate: Optional[bool],
               truncate_prompt_tokens: Optional[int], max_tokens_per_doc: Optional[int], param: str) -> Optional[int]:
    """The tokens each document may keep in a (query, document) prompt: ``max_tokens_per_doc`` within
    vLLM's ``truncate_prompt_tokens`` (the whole prompt at most that long: the query and the prompt are
    kept, the document cut; -1: the model's context); with TEI's ``truncate: false`` a pair over the
    model's context is 413 instead of cut. Texts are counted by their own tokens."""
    if truncate is not False and truncate_prompt_tokens is None:
        return max_tokens_per_doc
    budget = service.budget
    # the template without texts holds the default instruction; a given one takes its place
    default = service.engine.template.default_instruction
    swap = budget.count(instruction) - (budget.count(default) if default else 0) if instruction is not None else 0
    head = budget.overhead[0] + budget.count(query) + swap
    per_doc = budget.overhead[1] if service.task == "embed" else head  # embed: each text is its own prompt
    if truncate is False:
        if service.task == "embed" and head > service.max_length:
            raise ApiError(413, f"query must have less than {service.max_length} tokens with truncate=false. "
                                f"Given: {head}", "query")
        for i, d in enumerate(docs):
            if isinstance(d, str):
                n = per_doc + budget.count(d)
                if n > service.max_length:
                    raise ApiError(413, f"{param}[{i}] must have less than {service.max_length} tokens with "
                                        f"truncate=false. Given: {n}", param)
    if truncate_prompt_tokens is None or truncate_prompt_tokens == -1:
        return max_tokens_per_doc
    if truncate_prompt_tokens == 0:
        raise ApiError(400, "truncate_prompt_tokens must be -1 (the model's context) or at least 1",
                       "truncate_prompt_tokens")
    room = truncate_prompt_tokens - per_doc
    if room < 1 or (service.task == "embed" and head > truncate_prompt_tokens):
        raise ApiError(400, f"truncate_prompt_tokens={truncate_prompt_tokens} leaves no room for the document: the "
                            f"query and the prompt take {per_doc if service.task != 'embed' else head} tokens",
                       "truncate_prompt_tokens")
    return room if max_tokens_per_doc is None else min(room, max_tokens_per_doc)


def model_traits(service) -> Tuple[bool, bool]:
    """(Matryoshka-trained, instruction-trained) as the model declares them: Qwen3-Embedding's template
    (both, per its model card), a sentence-transformers query prompt (instructions), and a model card
    (README.md) naming Matryoshka (sentence-transformers cards tag ``loss:MatryoshkaLoss``)."""
    tpl = service.engine.template
    instructed = tpl.default_instruction is not None or bool(getattr(tpl, "query_prompt", ""))
    matryoshka = tpl.default_instruction is not None and service.task == "embed"  # the Qwen3-Embedding family
    card = Path(service.engine.folder) / "README.md"
    if not matryoshka and card.is_file():
        with open(card, encoding="utf-8", errors="replace") as f:
            matryoshka = "matryoshka" in f.read(1 << 20).lower()
    return matryoshka, instructed


def flatten_parameters(raw: Any) -> Any:
    """huggingface_hub sends TEI options under ``parameters``; TEI reads them at the top level."""
    if isinstance(raw, dict) and isinstance(raw.get("parameters"), dict):
        raw = {**{k: v for k, v in raw.items() if k != "parameters"}, **raw["parameters"]}
    return raw


def _validate(model, raw):
    from pydantic import ValidationError

    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body",) + tuple(err["loc"])} for err in e.errors()])


# The compatibility map

@dataclass(frozen=True)
class Route:
    path: str
    handler: str  # a method of Compat ("compat.x") or of Server ("server.x")
    clients: str
    fields: str
    methods: Tuple[str, ...] = ("POST",)
    tei: bool = False  # errors in TEI's shape
    response: Any = None  # the 200 body's model, for the OpenAPI spec

    @property
    def summary(self) -> str:
        return self.clients


_OPENAI_EMB = ("input (text, texts, token ids, lists of token ids), model, dimensions, encoding_format, "
               "embed_dtype, endianness, truncate_prompt_tokens, normalize, messages, instruction")
_RERANK = ("query, documents (Cohere/Jina) or texts (TEI), top_n/top_k, return_documents, max_tokens_per_doc, "
           "truncate_prompt_tokens, instruction, raw_scores, return_text, truncate, truncation_direction")
_SCORE = "text_1/text_2, data_1/data_2, queries/documents, queries/items, instruction, truncate_prompt_tokens"
_TEI_EMB = "inputs (text, texts, token ids), normalize, dimensions, truncate, truncation_direction, prompt_name"
_COHERE_EMB = "texts, input_type, embedding_types, truncate (END/START/NONE), output_dimension, max_tokens"

_RR = Union[RerankResponse, List[TEIRank]]

ROUTES: List[Route] = [
    Route("/v1/rerank", "server.rerank", "Cohere v1, Jina, rerankers, LangChain/LlamaIndex/Haystack Cohere", _RERANK,
          response=_RR),
    Route("/v2/rerank", "server.rerank", "Cohere v2", _RERANK, response=_RR),
    Route("/rerank", "server.rerank", "TEI (texts), infinity/vLLM (documents)", _RERANK, response=_RR),
    Route("/v1/reranking", "compat.mixedbread_rerank", "mixedbread, rerankers (mixedbread.ai)",
          "query, input (texts or objects), rank_fields, top_k, return_input, instruction"),
    Route("/v1/rerankings", "compat.isaacus_rerank", "Isaacus, rerankers (isaacus)",
          "query, texts, top_n, instruction"),
    Route("/voyage/v1/rerank", "compat.voyage_rerank", "Voyage, rerankers (voyage): its path is Cohere's here",
          "query, documents, top_k, return_documents, truncation, instruction"),
    Route("/pinecone/rerank", "compat.pinecone_rerank", "Pinecone, rerankers (pinecone): its path is TEI's here",
          "query, documents (texts or objects), rank_fields, top_n, return_documents, parameters.truncate, "
          "instruction"),
    Route("/v1/score", "compat.score", "vLLM", _SCORE, response=ScoreResponse),
    Route("/score", "compat.score", "vLLM", _SCORE, response=ScoreResponse),
    Route("/v1/embeddings", "compat.embeddings", "OpenAI, vLLM, infinity, LangChain OpenAIEmbeddings", _OPENAI_EMB,
          response=EmbeddingsResponse),
    Route("/embeddings", "compat.embeddings", "infinity, TEI (OpenAI body)", _OPENAI_EMB, response=EmbeddingsResponse),
    Route("/pooling", "compat.pooling", "vLLM (pooling: embed, token_embed)", _OPENAI_EMB + ", task"),
    Route("/v1/embed", "compat.cohere_embed", "Cohere v1, LangChain CohereEmbeddings", _COHERE_EMB),
    Route("/v2/embed", "compat.cohere_embed_v2", "Cohere v2", _COHERE_EMB),
    Route("/embed", "compat.tei_embed", "TEI, huggingface_hub, LlamaIndex TextEmbeddingsInference", _TEI_EMB,
          tei=True, response=List[List[float]]),
    Route("/embed_all", "compat.tei_embed_all", "TEI (per-token vectors)",
          "inputs (text, texts, token ids), truncate, truncation_direction, prompt_name", tei=True,
          response=List[List[List[float]]]),
    Route("/", "compat.tei_root", "TEI: huggingface_hub InferenceClient(base_url), Haystack HuggingFaceAPI",
          "an embed body (or {source_sentence, sentences}) on an embedding model, {query, texts} on a reranker",
          tei=True),
    Route("/invocations", "compat.tei_root", "TEI on SageMaker", "as POST /", tei=True),
    Route("/similarity", "compat.tei_similarity", "TEI, huggingface_hub sentence_similarity",
          "inputs {source_sentence, sentences}, truncation_direction, prompt_name", tei=True),
    Route("/tokenize", "compat.tokenize", "TEI (inputs), vLLM (prompt)",
          "inputs, add_special_tokens (TEI); prompt, add_special_tokens, return_token_strs, model (vLLM)", tei=True),
    Route("/detokenize", "compat.detokenize", "vLLM", "tokens, model"),
    Route("/predict", "compat.tei_predict", "TEI (a reranker as a one-label classifier)",
          "inputs ([q, d] or a list of pairs), raw_scores, truncate", tei=True),
    Route("/decode", "compat.tei_decode", "TEI", "ids, skip_special_tokens", tei=True),
    Route("/info", "compat.tei_info", "TEI", "", ("GET",), tei=True),
    Route("/", "compat.tei_info", "TEI", "", ("GET",), tei=True),
    Route("/v1/index", "server.index", "rerank-engine (KaLM passage cache)", "documents, compression_ratio"),
    Route("/v1/classify", "server.classify", "rerank-engine", "input, labels, multi_label, threshold, instruction",
          response=ClassifyResponse),
    Route("/v1/models", "compat.models", "OpenAI, vLLM, infinity (stats)", "", ("GET",)),
    Route("/models", "compat.models", "infinity, vLLM", "", ("GET",)),
    Route("/health", "compat.health", "all (liveness, no API key; infinity's unix time)", "", ("GET", "HEAD")),
]


def register_routes(app, server) -> Compat:
    """Register every entry of ``ROUTES`` on ``app`` over ``server``."""
    compat = Compat(server)
    for r in ROUTES:
        owner, attr = r.handler.split(".")
        fn = getattr(compat if owner == "compat" else server, attr)
        app.router.add_api_route(r.path, fn, methods=list(r.methods), summary=r.summary,
                                 description=f"Fields: {r.fields}" if r.fields else None,
                                 route_class_override=TEIRoute if r.tei else None,
                                 responses={200: {"model": r.response}} if r.response is not None else None)
    return compat


def markdown_table() -> str:
    """The compatibility map as the README's table."""
    rows = ["| Route | Methods | Clients | Fields |", "|---|---|---|---|"]
    for r in ROUTES:
        rows.append(f"| `{r.path}` | {', '.join(r.methods)} | {r.clients} | {r.fields or '-'} |")
    return "\n".join(rows)
