"""Token ids as input: ids a client tokenized itself go to the model as given, inside the special
tokens and prompt that the model's template puts around a text.

The template's scaffolding is read off the template itself, so every text template gets it without
code of its own: ``encode("")`` is head + tail, and a probe text whose tokens cannot merge with its
neighbours (a digit) is head + its ids + tail. The ids of a text are then embedded as
``head + ids + tail``: for a document (Qwen3-Embedding: the text then ``<|endoftext|>``; BERT:
``[CLS] text [SEP]``) that is exactly the text path when the ids are the tokenizer's own encoding
of the text (``add_special_tokens=False``). For a query the instruction's tokens come first and the
ids follow unchanged; the text path tokenizes instruction and query as one string, which can merge
tokens at the seam (Qwen's ``Query:`` + ``what`` is ``Query`` ``:what``), so the two may differ there.

Over the model's context the ids are cut (their end kept with ``left``), as the template cuts a text.
"""
from typing import List, Optional, Sequence, Tuple

from engine.sequence import Seqs

_PROBES = ("1", "a", " a")


def scaffold(template, is_query: bool = False, instruction: Optional[str] = None) -> Tuple[List[int], List[int]]:
    """(head, tail): the ids the template puts before and after a text's own ids."""
    if getattr(template, "multimodal", False):
        raise ValueError("token ids as input are not supported by this model (it takes text and images): send text")
    empty = template.encode([""], is_query=is_query, instruction=instruction).ids[0]
    tok = template.tokenizer
    for probe in _PROBES:
        mid = tok(probe, add_special_tokens=False)["input_ids"]
        got = template.encode([probe], is_query=is_query, instruction=instruction).ids[0]
        for h in range(len(empty) + 1):
            head, tail = empty[:h], empty[h:]
            if got == head + mid + tail:
                return list(head), list(tail)
    raise ValueError("token ids as input are not supported by this model's template: send text")


def encode_ids(template, seqs: Sequence[Sequence[int]], is_query: bool = False, instruction: Optional[str] = None,
               max_tokens: Optional[int] = None, left: bool = False) -> Seqs:
    """Each sequence of ids (at most ``max_tokens`` of them, its end kept with ``left``) inside the
    template's head and tail, cut to the model's context."""
    head, tail = scaffold(template, is_query, instruction)
    room = max(0, int(template.max_length) - len(head) - len(tail))
    limit = room if max_tokens is None else min(room, max_tokens)
    out = []
    for ids in seqs:
        ids = list(ids)
        if len(ids) > limit:
            ids = ids[len(ids) - limit:] if left else ids[:limit]
        out.append(head + ids + tail)
    return Seqs.of(out)
