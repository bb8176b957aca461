"""Documents given by id (KaLM-Reranker with a passage store): checking them and turning the pairs
of a request into decoder prompts over stored or freshly tokenized passages.

A document is a string, or ``{"id": ..., "text": ...}`` with ``text`` optional. An id found in the
store is scored from its stored encoding (its tokens come from the store too; no encoder work); a
stored id given with a different text is scored from that text. An id the store lacks is scored
from its text when given, and is otherwise an ``UnknownDocument`` error naming it.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from engine.core.passages import check_ratio
from engine.core.store import text_digest
from engine.sequence import Seq, Seqs


class UnknownDocument(KeyError):
    """Documents given by id only whose ids are not in the passage store."""

    def __init__(self, ids: Sequence[str], where: str):
        self.ids = list(ids)
        shown = ", ".join(repr(i) for i in self.ids[:10])
        if len(self.ids) > 10:
            shown += f" and {len(self.ids) - 10} more"
        super().__init__(f"unknown document id(s) {shown}: not in the passage store {where}")

    def __str__(self) -> str:
        return self.args[0]


@dataclass(frozen=True)
class DocRef:
    """A document given by id, with its text when the caller sent one."""

    id: str
    text: Optional[str] = None


def check_documents(documents, what: str = "documents") -> list:
    """Strings stay strings; ``{"id", "text"?}`` dicts become DocRefs. Anything else is a TypeError naming it."""
    if isinstance(documents, (str, dict)):
        raise TypeError(f"{what} must be a list of strings or {{'id', 'text'}} objects, not a single "
                        f"{type(documents).__name__}")
    out = []
    for i, d in enumerate(documents):
        if isinstance(d, str):
            out.append(d)
        elif isinstance(d, DocRef):
            out.append(d)
        elif isinstance(d, dict):
            extra = sorted(set(d) - {"id", "text"})
            if extra:
                raise TypeError(f"{what}[{i}]: unknown field(s) {', '.join(extra)}; a document is {{'id', 'text'}}")
            pid, text = d.get("id"), d.get("text")
            if pid is None:
                if not isinstance(text, str):
                    raise TypeError(f"{what}[{i}] needs an 'id' or a 'text' string")
                out.append(text)
                continue
            if not isinstance(pid, str) or not pid:
                raise TypeError(f"{what}[{i}].id must be a non-empty string, got {pid!r}")
            if text is not None and not isinstance(text, str):
                raise TypeError(f"{what}[{i}].text must be a string, got {type(text).__name__}")
            out.append(DocRef(pid, text))
        else:
            raise TypeError(f"{what}[{i}] must be a string or an {{'id', 'text'}} object, got {type(d).__name__}")
    return out


def has_refs(docs) -> bool:
    return any(isinstance(d, DocRef) for d in docs)


def request_ratio(store, compression_ratio) -> int:
    """The request's ratio: the store's by default; another one cannot read the store."""
    if store is None:
        return check_ratio(compression_ratio)
    if compression_ratio is None:
        return store.ratio
    return check_ratio(compression_ratio)


def pair_seqs(engine, queries: Sequence[str], docs: Sequence, instruction: Optional[str],
              ratio: int) -> Tuple[Seqs, Optional[List]]:
    """(decoder prompts with their passages' tokens, per pair its StoredRef or None) of KaLM pairs."""
    tpl, store = engine.template, getattr(engine, "passage_store", None)
    refs = {d.id for d in docs if isinstance(d, DocRef)}
    if refs and store is None:
        raise ValueError("documents given by id need a passage store (passage_store=DIR / --passage-store DIR)")
    found = store.lookup(refs) if refs else {}
    if refs and ratio != store.ratio:
        raise ValueError(f"compression_ratio {ratio} cannot read the passage store at {store.folder}, which holds "
                         f"ratio {store.ratio}")
    digests = store.text_digests(d.id for d in docs if isinstance(d, DocRef) and d.text is not None) if refs else {}
    missing = [d.id for d in docs if isinstance(d, DocRef) and d.id not in found and d.text is None]
    if missing:
        raise UnknownDocument(list(dict.fromkeys(missing)), str(store.folder))
    stored: List = [None] * len(docs)
    texts, text_at = [], []
    for i, d in enumerate(docs):
        if isinstance(d, DocRef):
            ref = found.get(d.id)
            if ref is not None and (d.text is None or digests.get(d.id) == text_digest(d.text)):
                stored[i] = ref
                continue
            d = d.text
        texts.append(d)
        text_at.append(i)
    tokens: List = [None] * len(docs)
    for i, ids in zip(text_at, tpl.encode_documents(texts)):
        tokens[i] = ids
    for i, ref in enumerate(stored):
        if ref is not None:
            tokens[i] = ref.tokens
    prompts = {q: tpl.encode_query(q, instruction) for q in dict.fromkeys(queries)}
    seqs = Seqs(Seq(prompts[q], passage=t) for q, t in zip(queries, tokens))
    return seqs, (stored if any(r is not None for r in stored) else None)


def doc_echo(d):
    """A document as a response echoes it: ``{"text"}``, or ``{"id", "text"?}`` for one given by id."""
    if isinstance(d, DocRef):
        return {"id": d.id, **({"text": d.text} if d.text is not None else {})}
    from engine.prompts.inputs import text_part

    return {"text": text_part(d)}


def check_by_id(reranker, documents) -> None:
    """Documents given by id need an encoder-decoder reranker with a passage store (a ValueError naming it)."""
    if not has_refs(documents):
        return
    if not reranker.is_encoder_decoder or reranker.engine.passage_store is None:
        raise ValueError("documents given by id need a KaLM-Reranker served with a passage store (--passage-store)")


def fit_documents(budget, reranker, documents, query, instruction, max_tokens, left) -> list:
    """``budget.documents`` (engine.prompts.truncation.TokenBudget) over the documents given as text;
    those given by id pass as they are (their stored passages were cut at index time)."""
    check_by_id(reranker, documents)
    at = [i for i, d in enumerate(documents) if not isinstance(d, DocRef)]
    if len(at) == len(documents):
        return budget.documents(documents, query, instruction, max_tokens, left)
    out = list(documents)
    for i, d in zip(at, budget.documents([documents[i] for i in at], query, instruction, max_tokens, left)):
        out[i] = d
    return out
