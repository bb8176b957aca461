"""Chunking long documents: spans of a text, cut where the tokenizer's own splits fall.

A document longer than a chunk is split into spans of at most ``tokens`` tokens, overlapping by
about ``overlap`` tokens. Every cut is both a token boundary of the whole document's encoding and a
pre-tokenizer split (whitespace, punctuation: where the tokenizer itself never merges across), so a
span ``document[start:end]`` tokenizes to the same tokens it had inside the document and each chunk
is scored as exactly that text. A single pre-token longer than a chunk is cut at token boundaries.
Spans are trimmed of surrounding whitespace; every non-space character lies in some span. A
document that fits in one chunk is one span covering it as given, so it scores as unchunked.
"""
import bisect
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

AGGREGATES = ("max", "mean", "first")
_KEYS = ("tokens", "overlap", "aggregate", "return_chunks")


class TooManyChunks(ValueError):
    """A request expanding to more chunks than the server allows (HTTP 413)."""


@dataclass(frozen=True)
class Chunking:
    tokens: int = 256
    overlap: int = 32
    aggregate: str = "max"
    return_chunks: bool = False
    max_chunks: Optional[int] = None  # a server's budget (--max-documents, --max-pairs): more chunks are TooManyChunks
    budget_flag: str = "--max-documents"  # the server option that sets max_chunks (named in the error)

    @classmethod
    def parse(cls, value, what: str = "chunking") -> Optional["Chunking"]:
        """A Chunking from a dict (or a Chunking, or None); ValueError/TypeError naming the field."""
        if value is None or isinstance(value, Chunking):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"{what} must be an object with tokens, overlap, aggregate, return_chunks")
        unknown = sorted(set(value) - set(_KEYS))
        if unknown:
            raise ValueError(f"{what}.{unknown[0]} is not a chunking field (expected one of {', '.join(_KEYS)})")
        tokens = value.get("tokens", cls.tokens)
        overlap = value.get("overlap", cls.overlap)
        for name, v, low in (("tokens", tokens, 1), ("overlap", overlap, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{what}.{name} must be an integer >= {low}, got {v!r}")
        if overlap >= tokens:
            raise ValueError(f"{what}.overlap ({overlap}) must be smaller than {what}.tokens ({tokens})")
        aggregate = value.get("aggregate", cls.aggregate)
        if aggregate not in AGGREGATES:
            raise ValueError(f"{what}.aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
        ret = value.get("return_chunks", cls.return_chunks)
        if not isinstance(ret, bool):
            raise ValueError(f"{what}.return_chunks must be a boolean, got {ret!r}")
        return cls(tokens, overlap, aggregate, ret)


def _boundaries(tokenizer, text: str) -> Tuple[List[int], List[int]]:
    """(cut positions, token starts): character offsets where a chunk may start, and every token's start."""
    enc = tokenizer(text, add_special_tokens=False, truncation=False, return_offsets_mapping=True,
                    return_attention_mask=False)["offset_mapping"]
    starts = sorted({s for s, e in enc if e > s})
    pre = getattr(getattr(tokenizer, "backend_tokenizer", None), "pre_tokenizer", None)
    if pre is not None:
        splits = {s for _, (s, _e) in pre.pre_tokenize_str(text)}
    else:  # no pre-tokenizer: words start after whitespace
        splits = {i for i in range(len(text)) if i == 0 or (text[i - 1].isspace() and not text[i].isspace())}
    cuts = sorted(set(starts) & splits)
    return cuts, starts


def _trim(text: str, start: int, end: int) -> Tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def chunk_spans(tokenizer, text: str, tokens: int, overlap: int = 0) -> List[Tuple[int, int]]:
    """Character spans ``[(start, end)]`` of ``text``, in order, each of at most ``tokens`` tokens."""
    if tokens < 1 or overlap < 0 or overlap >= tokens:
        raise ValueError(f"chunk tokens={tokens}, overlap={overlap}: need tokens >= 1 and 0 <= overlap < tokens")
    cuts, starts = _boundaries(tokenizer, text)
    if len(starts) <= tokens:
        return [(0, len(text))]
    # Units between consecutive cuts; one longer than a chunk is split at its token starts.
    units: List[int] = []
    bounds = cuts + [len(text)] if cuts and cuts[0] == starts[0] else [starts[0]] + cuts + [len(text)]
    for a, b in zip(bounds, bounds[1:]):
        lo, hi = bisect.bisect_left(starts, a), bisect.bisect_left(starts, b)
        if hi - lo > tokens:
            units.extend(starts[lo:hi:tokens])
        else:
            units.append(a)
    units.append(len(text))
    ntok = [bisect.bisect_left(starts, u) for u in units]  # tokens before each unit boundary
    spans: List[Tuple[int, int]] = []
    i, n = 0, len(units) - 1
    while i < n:
        j = i + 1
        while j < n and ntok[j + 1] - ntok[i] <= tokens:
            j += 1
        s, e = _trim(text, units[i], units[j])
        if e > s:
            spans.append((s, e))
        if j >= n:
            break
        k = j
        while k - 1 > i and ntok[j] - ntok[k - 1] <= overlap:
            k -= 1
        i = k
    return spans or [(0, len(text))]


def aggregate(scores: Sequence[float], how: str) -> Tuple[float, int]:
    """(document score, index of the deciding chunk): the best chunk for max and mean, the first for first."""
    best = max(range(len(scores)), key=lambda i: scores[i])
    if how == "max":
        return float(scores[best]), best
    if how == "mean":
        return float(sum(scores) / len(scores)), best
    return float(scores[0]), 0


def expand(tokenizer, documents: Sequence[str], spec: Chunking):
    """(chunk texts, owner document of each, span of each) for ``documents`` chunked by ``spec``."""
    texts, owners, spans = [], [], []
    for d, doc in enumerate(documents):
        if not isinstance(doc, str):
            raise ValueError(f"chunking applies to text documents; documents[{d}] is a {type(doc).__name__}")
        for s, e in chunk_spans(tokenizer, doc, spec.tokens, spec.overlap):
            texts.append(doc[s:e])
            owners.append(d)
            spans.append((s, e))
        if spec.max_chunks is not None and len(texts) > spec.max_chunks:
            raise TooManyChunks(f"the documents expand to more than {spec.max_chunks} chunks, this server's limit "
                                f"per request ({spec.budget_flag}); use larger chunking.tokens or fewer documents")
    return texts, owners, spans


def collect(n: int, scores: Sequence[float], owners: Sequence[int], spans: Sequence[Tuple[int, int]],
            spec: Chunking) -> Tuple[List[float], List[dict]]:
    """Per document: its aggregated score and the result fields ``chunk`` (and ``chunks``)."""
    per: List[List[int]] = [[] for _ in range(n)]
    for c, d in enumerate(owners):
        per[d].append(c)
    out_scores, extra = [], []
    for idx in per:
        score, best = aggregate([float(scores[c]) for c in idx], spec.aggregate)
        entries = [{"start": spans[c][0], "end": spans[c][1], "score": float(scores[c])} for c in idx]
        fields = {"chunk": entries[best]}
        if spec.return_chunks:
            fields["chunks"] = entries
        out_scores.append(score)
        extra.append(fields)
    return out_scores, extra


def check_room(spec: Chunking, overhead: int, max_length: int) -> None:
    """An error when a chunk of ``spec.tokens`` tokens and the query + template do not fit ``max_length``."""
    if spec.tokens + overhead > max_length:
        raise ValueError(f"chunking.tokens={spec.tokens} leaves no room: the query and template take {overhead} "
                         f"tokens and max_length is {max_length} (use at most {max(0, max_length - overhead)})")


def chunk_fields(result: dict) -> dict:
    """The chunking fields of a result (none when it was not chunked)."""
    return {k: result[k] for k in ("chunk", "chunks") if k in result}
