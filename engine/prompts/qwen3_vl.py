"""The Qwen3-VL reranker's and embedder's prompts (the official code's, exactly).

Each side's content is its images, each ``<|vision_start|><|image_pad|>…<|vision_end|>``
with one pad per merged token, then its texts concatenated; a side with no image and no
(or only empty) text is ``NULL``. Truncation keeps every special token (an image is never cut).
"""
import unicodedata
from typing import List, Optional, Sequence, Tuple

from engine.prompts.images import ImageData, ImageOptions
from engine.prompts.inputs import IMAGE_PAD, VISION_END, VISION_START, Input
from engine.prompts.templates import QWEN3_RERANK_SYSTEM, Template
from engine.sequence import Seq, Seqs


def _content(x: Input, clip=lambda t: t) -> Tuple[str, Tuple[ImageData, ...]]:
    """The prompt text of one side (images, then texts; ``NULL`` when empty) and its images.
    ``clip`` cuts a long text by characters before tokenization (only tokens past max_length go)."""
    if isinstance(x, str):
        return (clip(x) or "NULL"), ()
    if not x.images and not x.text:
        return "NULL", ()
    pads = "".join(VISION_START + IMAGE_PAD * im.num_tokens + VISION_END for im in x.images)
    return pads + clip(x.text), tuple(x.images)


def _special_ids(tokenizer) -> frozenset:
    ids = set(tokenizer.all_special_ids)
    for t in (VISION_START, VISION_END, IMAGE_PAD, "<|video_pad|>"):
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and i >= 0:
            ids.add(i)
    return frozenset(ids)


def keep_special(ids: List[int], max_length: int, special: frozenset) -> List[int]:
    """The official truncation: every special token kept, and the first text tokens that fit."""
    if len(ids) <= max_length:
        return ids
    keep = max_length - sum(1 for t in ids if t in special)
    out, kept = [], 0
    for t in ids:
        if t in special:
            out.append(t)
        elif kept < keep:
            out.append(t)
            kept += 1
    return out


VL_RERANK_PREFIX = f"<|im_start|>system\n{QWEN3_RERANK_SYSTEM}<|im_end|>\n<|im_start|>user\n"
VL_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"  # 5 tokens, never truncated
VL_RERANK_INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."
VL_EMBED_INSTRUCTION = "Represent the user's input."


class _VLTemplate(Template):
    multimodal = True  # inputs may be Content (normalize_inputs); image options live here

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.image_options = ImageOptions()
        self.special = _special_ids(tokenizer)

    def _clip(self, text: str) -> str:
        return self.clip([text], self.max_length)[0]

    def _ids(self, texts: List[str]) -> List[List[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]


class Qwen3VLRerankTemplate(_VLTemplate):
    """``<Instruct>: {instruction}<Query>:{query}\\n<Document>:{document}`` in Qwen's chat layout,
    no ``<think>`` block; truncation keeps special tokens and the last 5 tokens (the official code).

    Shared prefix (a text-only query): the head ends at ``\\n<Document`` and each tail starts
    with ``>:``. ``<Document`` is a whole pre-token and NFC cannot compose across ``t>``, so
    head + tail tokens equal the whole string's whatever the document starts with (tested)."""

    supports_prefix = True
    default_instruction = VL_RERANK_INSTRUCTION
    default_max_length = 10240

    def _pair(self, q: Input, d: Input, instruction: Optional[str]):
        instruction = self.default_instruction if instruction is None else instruction
        qs, qi = _content(q, self._clip)
        ds, di = _content(d, self._clip)
        return f"{VL_RERANK_PREFIX}<Instruct>: {instruction}<Query>:{qs}\n<Document>:{ds}{VL_SUFFIX}", qi + di

    def _truncate(self, ids: List[int]) -> List[int]:
        return keep_special(ids[:-5], self.max_length, self.special) + ids[-5:]

    def encode(self, queries: Sequence[Input], docs: Sequence[Input], instruction: Optional[str] = None) -> Seqs:
        pairs = [self._pair(q, d, instruction) for q, d in zip(queries, docs)]
        ids = self._ids([p for p, _ in pairs])
        return Seqs(Seq(self._truncate(x), multimodal=im or None) for x, (_, im) in zip(ids, pairs))

    def encode_head(self, query: Input, instruction: Optional[str] = None) -> Optional[List[int]]:
        """Ids up to ``\\n<Document``, or None when the query holds images (no sharing)."""
        if not isinstance(query, str) and query.images:
            return None
        instruction = self.default_instruction if instruction is None else instruction
        qs, _ = _content(query, self._clip)
        head = self._ids([f"{VL_RERANK_PREFIX}<Instruct>: {instruction}<Query>:{qs}\n<Document"])[0]
        if len(head) >= self.max_length:
            return None  # truncation would cut into the query: score whole pairs
        return head

    def encode_tails(self, head: List[int], docs: Sequence[Input]) -> Seqs:
        """``>:{document}`` + suffix ids per document, truncated as the whole pair would be."""
        contents = [_content(d, self._clip) for d in docs]
        ids = self._ids([f">:{s}{VL_SUFFIX}" for s, _ in contents])
        out = Seqs()
        for x, (_, im) in zip(ids, contents):
            whole = self._truncate(list(head) + x)
            if whole[:len(head)] != list(head):  # the special tokens alone leave no room for the query's text
                n = sum(i.num_tokens for i in im)
                raise ValueError(f"a document's images take {n} tokens, more than max_length={self.max_length} "
                                 f"leaves beside the query")
            out.append(Seq(whole[len(head):], prefix=tuple(head), multimodal=im or None))
        return out


def embed_instruction(instruction: Optional[str]) -> str:
    """Stripped, with a final period when it does not end in punctuation (the official code)."""
    if instruction:
        instruction = instruction.strip()
        if instruction and not unicodedata.category(instruction[-1]).startswith("P"):
            instruction += "."
    return instruction or VL_EMBED_INSTRUCTION


class Qwen3VLEmbedTemplate(_VLTemplate):
    """``system: {instruction}``, ``user: {images}{text}``, then the assistant turn; the last token
    (the final newline) is pooled. Right truncation to max_length, never inside an image."""

    default_instruction = VL_EMBED_INSTRUCTION
    default_max_length = 8192

    def encode(self, texts: Sequence[Input], is_query: bool = False, instruction: Optional[str] = None) -> Seqs:
        system = embed_instruction(instruction)
        contents = [_content(x, self._clip) for x in texts]
        prompts = [f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{s}{VL_SUFFIX}" for s, _ in contents]
        out = Seqs()
        pad = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        for x, (_, im) in zip(self._ids(prompts), contents):
            if len(x) > self.max_length:
                if im and pad in x[self.max_length:]:
                    n = sum(i.num_tokens for i in im)
                    raise ValueError(f"an input's images take {n} tokens, more than fit in max_length="
                                     f"{self.max_length} with its prompt: truncation would cut into an image")
                x = x[:self.max_length]
            out.append(Seq(x, multimodal=im or None))
        return out
