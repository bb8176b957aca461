"""Request and response bodies of the HTTP server, in the shapes existing clients send.

One request model per endpoint family (Cohere/Jina and TEI rerank share one,
told apart by ``texts``). Unknown fields are ignored, not rejected: clients
send provider-specific extras (``rank_fields``, ``priority``, ``user``, a
``model`` to TEI) and must keep working. Texts are normalised on the way in:
a document ``{"text": ...}`` becomes its text, and a single string where a
list is allowed becomes a list of one.
"""
import json
import re
from typing import Any, Dict, List, Literal, Optional

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
)
from typing_extensions import Annotated


def _doc_text(v: Any) -> Any:
    if isinstance(v, dict) and "text" in v:
        return v["text"]  # still validated as a string below
    if isinstance(v, dict):
        raise ValueError("a document object needs a 'text' field")
    return v


_SURROGATE = re.compile("[\ud800-\udfff]")


def _unicode(v: str) -> str:
    # A scan, not v.encode(): a 20 MB document must not be copied to be checked.
    if _SURROGATE.search(v):
        raise ValueError("not valid Unicode text: it holds a lone surrogate (an unpaired \\ud800-\\udfff escape)")
    return v


def _labels(v: Any) -> Any:
    """Labels as engine.classifier.normalize_labels takes them, every name and description valid text:
    the request's LabelSet, checked here once for the whole request."""
    from engine.classifier import normalize_labels

    try:
        labels = normalize_labels(v)
    except TypeError as e:
        raise ValueError(str(e)) from None
    for t in labels.names + labels.descriptions:
        _unicode(t)
    return labels


def _one_or_many(v: Any) -> Any:
    return [v] if isinstance(v, (str, dict)) else v


_PART_TYPES = ("text", "image_url")


def _parts(parts: list) -> Any:
    """vLLM/SGLang/OpenAI content parts, checked; text-only parts become their joined text."""
    texts, has_image = [], False
    for k, p in enumerate(parts):
        if isinstance(p, str):
            texts.append(_unicode(p))
            continue
        if not isinstance(p, dict) or p.get("type") not in _PART_TYPES:
            raise ValueError(f"part {k} must be {{type: text, text}} or {{type: image_url, image_url: {{url}}}}")
        if p["type"] == "text":
            if not isinstance(p.get("text"), str):
                raise ValueError(f"part {k}: a text part needs a string 'text'")
            texts.append(_unicode(p["text"]))
        else:
            url = p.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise ValueError(f"part {k}: an image_url part needs image_url.url (a string)")
            has_image = True
    return parts if has_image else "".join(texts)


def _doc_ref(v: dict) -> Any:
    from engine.core.stored_docs import DocRef

    pid, text = v["id"], v.get("text")
    if not isinstance(pid, str) or not pid:
        raise ValueError("'id' must be a non-empty string")
    if text is not None:
        if not isinstance(text, str):
            raise ValueError("'text' must be a string")
        _unicode(text)
    return DocRef(pid, text)


def _mm_input(v: Any) -> Any:
    """A query or document: a string, ``{"text"}``, vLLM's ``{"content": str | [parts]}`` or a list of
    parts (SGLang). Text-only inputs reach the handler as their string; inputs with images as a list
    of parts."""
    if isinstance(v, dict) and "content" in v:
        v = v["content"]
    elif isinstance(v, dict) and "id" in v:  # KaLM-Reranker with a passage store: a document by id
        return _doc_ref(v)
    elif isinstance(v, dict):
        v = _doc_text(v)
        if not isinstance(v, str):
            raise ValueError("'text' must be a string")
    if isinstance(v, str):
        return _unicode(v)
    if isinstance(v, list):
        return _parts(v)
    raise ValueError("must be a string, {text}, {content: [parts]} or a list of parts")


_STRINGS = {"type": "array", "items": {"type": "string"}}

# Text the tokenizer can take: JSON can escape a lone surrogate, UTF-8 cannot hold one.
Text = Annotated[str, AfterValidator(_unicode)]

# A document is a string or {"text": string, ...}; it reaches the handler as the string.
Document = Annotated[str, BeforeValidator(_doc_text), AfterValidator(_unicode), WithJsonSchema({"anyOf": [
    {"type": "string"},
    {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
]})]
# A string or a list of strings; it reaches the handler as a list.
Texts = Annotated[List[Text], BeforeValidator(_one_or_many),
                  WithJsonSchema({"anyOf": [{"type": "string"}, _STRINGS]})]
_PART_SCHEMA = {"type": "object", "properties": {"type": {"enum": list(_PART_TYPES)}, "text": {"type": "string"},
                                                 "image_url": {"type": "object",
                                                               "properties": {"url": {"type": "string"}}}},
                "required": ["type"]}
_PART_ITEM = {"anyOf": [{"type": "string"}, _PART_SCHEMA]}  # a bare string is a text part
_MM_SCHEMA = {"anyOf": [
    {"type": "string"},
    {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    {"type": "object", "properties": {"content": {"anyOf": [{"type": "string"},
                                                            {"type": "array", "items": _PART_ITEM}]}},
     "required": ["content"]},
    {"type": "array", "items": _PART_ITEM},
]}
# A query or document of a model that takes images (Qwen3-VL); for text models, its text.
MMInput = Annotated[Any, BeforeValidator(_mm_input), WithJsonSchema(_MM_SCHEMA)]
# A query: as MMInput; as a string it must hold a non-whitespace character (``pattern`` applies to strings only).
MMQuery = Annotated[Any, BeforeValidator(_mm_input), WithJsonSchema({**_MM_SCHEMA, "pattern": "\\S"})]
MMInputs = Annotated[List[MMInput], BeforeValidator(_one_or_many),
                     WithJsonSchema({"anyOf": [_MM_SCHEMA, {"type": "array", "items": _MM_SCHEMA}]})]
PositiveInt = Annotated[int, Field(ge=1)]
Direction = Literal["right", "left", "Right", "Left"]


class _Body(BaseModel):
    # strict: no bool/string coercions (top_n: true, top_n: "2", return_documents: "yes" are 422);
    # allow_inf_nan=False: the NaN/Infinity literals Python's JSON parser accepts are 422 too.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class ChunkingBody(BaseModel):
    """Score each document by its chunks: at most ``tokens`` tokens each, overlapping by ``overlap``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    tokens: PositiveInt = 256
    overlap: Annotated[int, Field(ge=0)] = 32
    aggregate: Literal["max", "mean", "first"] = "max"
    return_chunks: bool = False

    @field_validator("overlap")
    @classmethod
    def _overlap_below_tokens(cls, v, info):
        tokens = info.data.get("tokens")
        if tokens is not None and v >= tokens:
            raise ValueError(f"overlap ({v}) must be smaller than tokens ({tokens})")
        return v


class RerankBody(_Body):
    """Cohere v1/v2 and Jina rerank; TEI rerank when ``texts`` is given instead of ``documents``."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["documents"]}, {"required": ["texts"]}]})

    model: Optional[str] = None
    query: MMQuery = Field(description="must hold a visible character or an image (else 400): whitespace, "
                                       "control, zero-width and lone combining characters do not count")
    documents: Optional[List[MMInput]] = None
    texts: Optional[List[Text]] = Field(None, description="TEI shape: answer [{index, score, text?}]")
    top_n: Optional[Annotated[int, Field(ge=0)]] = Field(None, description="0: all (vLLM)")
    top_k: Optional[Annotated[int, Field(ge=0)]] = Field(None, description="alias of top_n")
    return_documents: bool = False
    max_tokens_per_doc: Optional[PositiveInt] = None
    truncate_prompt_tokens: Optional[Annotated[int, Field(ge=-1)]] = Field(
        None, description="vLLM: each pair's prompt at most this many tokens, the document cut (-1: the context)")
    instruction: Optional[Text] = None
    instruct: Optional[Text] = Field(None, description="SGLang's name for instruction")
    min_score: Optional[float] = Field(None, description="drop results scoring below this (after top_n)")
    # Encoder-decoder rerankers (KaLM-Reranker): Matryoshka pooling ratio r of the passage encodings
    compression_ratio: Optional[Literal[1, 2, 4, 8, 16, 32]] = None
    # Generative rerankers (Prism-Reranker): contribution + evidence for documents scoring >= evidence_threshold
    return_evidence: bool = False
    evidence_threshold: float = 0.5
    max_new_tokens: PositiveInt = 512
    chunking: Optional[ChunkingBody] = None
    # TEI
    return_text: bool = False
    raw_scores: bool = False
    truncate: Optional[bool] = Field(None, description="TEI: false refuses (413) a pair over the model's context")
    truncation_direction: Direction = "right"


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: MMInput


class IndexBody(_Body):
    """Pre-encode passages into the passage cache (KaLM-Reranker) ahead of queries."""

    model: Optional[str] = None
    documents: List[Document]
    compression_ratio: Optional[Literal[1, 2, 4, 8, 16, 32]] = None


class ClassifyBody(_Body):
    """Zero-shot classification: each input text against every label (its description as the document)."""

    model: Optional[str] = None
    input: Texts
    labels: Annotated[Any, AfterValidator(_labels)] = Field(
        description="a non-empty list of distinct label names, or a non-empty {name: description} mapping",
        json_schema_extra={"anyOf": [{**_STRINGS, "minItems": 1, "uniqueItems": True},
                                     {"type": "object", "minProperties": 1,
                                      "additionalProperties": {"type": "string"}}]})
    multi_label: bool = False
    threshold: Optional[float] = None
    instruction: Optional[Text] = None


# Responses: documented for the OpenAPI spec; the handlers build plain dicts.

class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: Optional[RerankDocument] = None
    contribution: Optional[str] = Field(None, description="with return_evidence: the <contribution> text")
    evidence: Optional[str] = Field(None, description="with return_evidence: the <evidence> text")
    raw_output: Optional[str] = Field(None, description="with return_evidence: the generated text")


class RerankResponse(BaseModel):
    id: str
    model: str
    results: List[RerankResult]
    usage: Usage


class TEIRank(BaseModel):
    index: int
    score: float
    text: Optional[str] = None


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    model: str
    data: List[ScoreData]
    usage: Usage


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Any = Field(description="list of floats, or base64 of little-endian float32")


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: List[EmbeddingData]
    model: str
    usage: Usage


class ClassifyData(BaseModel):
    index: int
    label: Any = Field(description="the best label (null below threshold), or a list when multi_label")
    scores: Dict[str, float]


class ClassifyResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: List[ClassifyData]
    usage: Usage


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 408: "request_timeout", 413: "request_too_large",
               422: "invalid_request_error",
               429: "rate_limit_error", 499: "client_closed_request", 415: "unsupported_media_type",
               421: "misdirected_request", 431: "request_too_large", 503: "service_unavailable"}


def error_body(message: str, type: str, param: Optional[str] = None) -> Dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param}}


def error_response(status: int, message: str, param: Optional[str] = None, type: Optional[str] = None,
                   headers: Optional[Dict[str, str]] = None):
    """``{"error": {message, type, param}}`` as a response (an ASGI app)."""
    from starlette.responses import Response

    # ensure_ascii: an error may echo client text, which need not be encodable UTF-8 (lone surrogates).
    body = json.dumps(error_body(message, type or ERROR_TYPES.get(status, "server_error"), param))
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def error_param(loc) -> Optional[str]:
    """A pydantic error location as the client wrote the field: ``("body", "documents", 2)`` -> ``documents[2]``."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None
