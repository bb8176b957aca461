"""Truncation and token budgets: every decision of how much of a text the model reads.

Three cuts, one module:
  - ``clip_text``: a character cut before any tokenizer sees a long text, that keeps exactly the
    tokens the tokenizer's own truncation would keep (a huge document costs memory only for the
    part that is used);
  - the templates' right truncation to ``max_length``: each family's reference code decides what
    is cut (the pair after the prompt, the query before the document, special tokens kept); the
    templates call ``pair_budget`` and ``clip_text`` here;
  - ``TokenBudget``: what a caller asks for on top (``max_tokens_per_doc``, TEI's
    ``truncation_direction="left"``), cut at a token boundary within the room the template leaves.
"""
from typing import List, Optional, Sequence

# Clipping long texts by characters before the tokenizer sees them. A 7 MB document tokenized whole,
# with offsets, costs about 1.2 GB that the allocator never returns; truncation inside the tokenizer
# happens only after the whole text is encoded. A cut that leaves at least CLIP_MARGIN_TOKENS tokens and
# CLIP_MARGIN_CHARS characters beyond the last kept token changes none of the kept tokens: pre-tokens end
# at whitespace and punctuation, and BPE merges act within a few symbols of the cut.
CLIP_MARGIN_TOKENS = 16
CLIP_MARGIN_CHARS = 256
CLIP_CHARS_PER_TOKEN = 8  # the first guess; the cut doubles until it holds enough tokens


def clip_text(tokenizer, text: str, max_tokens: int, from_end: bool = False) -> str:
    """``text`` cut by characters to a part whose first (or, ``from_end``, last) ``max_tokens``
    tokens are exactly those of the whole text. Short texts come back unchanged, untokenized."""
    need = max(1, int(max_tokens)) + CLIP_MARGIN_TOKENS
    bound = need * CLIP_CHARS_PER_TOKEN + CLIP_MARGIN_CHARS
    while bound < len(text):
        cut = text[-bound:] if from_end else text[:bound]
        offsets = tokenizer(cut, add_special_tokens=False, truncation=False, return_offsets_mapping=True,
                            return_attention_mask=False)["offset_mapping"]
        if len(offsets) >= need:
            if from_end:
                safe = offsets[len(offsets) - need][0] >= CLIP_MARGIN_CHARS
            else:
                safe = offsets[need - 1][1] <= len(cut) - CLIP_MARGIN_CHARS
            if safe:
                return cut
        bound *= 2
    return text


def pair_budget(max_length: int, prefix_ids: Sequence[int], suffix_ids: Sequence[int]) -> int:
    """Tokens left for a pair between a template's fixed prefix and suffix; an error when none are."""
    budget = int(max_length) - len(prefix_ids) - len(suffix_ids)
    if budget <= 0:
        raise ValueError(f"max_length={max_length} leaves no room for the pair after the template")
    return budget


class TokenBudget:
    """The caller's cuts of one engine's inputs: at most ``limit`` tokens per text, from either end.

    Right truncation of what does not fit the model is the template's (it happens anyway); cutting
    from the left has to happen before the template, to the room it leaves for the text. Counting
    and cutting use a private copy of the Rust tokenizer that is never reconfigured (the engine's is
    reconfigured per call, under its lock, on the tokenizer thread)."""

    def __init__(self, template, tokenizer, task: str):
        from tokenizers import Tokenizer

        from engine.prompts.inputs import text_part

        self._text_part = text_part
        self.tokenizer, self.task = tokenizer, task
        self.max_length = int(template.max_length)  # encoders cap it at their positions
        self.cutter = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.cutter.no_truncation()
        self.cutter.no_padding()
        # What the template adds around a text: (query side, per document).
        if task == "embed":
            self.overhead = (len(template.encode([""], is_query=True).ids[0]), len(template.encode([""]).ids[0]))
        else:
            self.overhead = (len(template.encode([""], [""]).ids[0]), 0)

    def count(self, text) -> int:
        """Tokens of an input's text part (images are the template's)."""
        text = clip_text(self.tokenizer, self._text_part(text), self.max_length)
        return len(self.cutter.encode(text, add_special_tokens=False).ids)

    def fit(self, texts: Sequence, limit: Optional[int], left: bool) -> List:
        """Each text cut to at most ``limit`` tokens (keeping its end when ``left``)."""
        if limit is None:
            return list(texts)
        out = []
        for t in texts:
            if not isinstance(t, str):  # an input with images is truncated by the template
                out.append(t)
                continue
            t = clip_text(self.tokenizer, t, limit, from_end=left)
            e = self.cutter.encode(t, add_special_tokens=False)
            n = len(e.ids)
            if n > limit:
                t = t[e.offsets[n - limit][0]:] if left else t[:e.offsets[limit - 1][1]]
            out.append(t)
        return out

    def limit(self, overhead: int, max_tokens: Optional[int], left: bool) -> Optional[int]:
        room = max(1, self.max_length - overhead) if left else None
        if max_tokens is None:
            return room
        return max_tokens if room is None else min(max_tokens, room)

    def documents(self, documents: Sequence, query, instruction: Optional[str], max_tokens: Optional[int],
                  left: bool) -> List:
        """Rerank documents cut for ``query``: the template with the query and no document is the overhead."""
        overhead = 0
        if left:
            if self.task == "embed":
                overhead = self.overhead[1]
            else:
                overhead = self.overhead[0] + self.count(query) + (self.count(instruction) if instruction else 0)
        return self.fit(documents, self.limit(overhead, max_tokens, left), left)

    def texts(self, texts: Sequence, instruction: Optional[str], max_tokens: Optional[int], left: bool) -> List:
        """Texts to embed (as queries when ``instruction`` is given)."""
        overhead = 0
        if left:
            overhead = self.overhead[1] if instruction is None else self.overhead[0] + self.count(instruction)
        return self.fit(texts, self.limit(overhead, max_tokens, left), left)
