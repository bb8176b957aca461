"""Inputs with images, and the Qwen3-VL reranker's and embedder's prompts (DESIGN.md 2.6).

An input is what a caller gives where a string went before:
  - a string (text);
  - a dict ``{"text": str | [str], "image": source | [source]}``;
  - a list of parts ``[{"type": "text", "text": ...}, {"type": "image_url", "image_url": {"url": ...}}]``
    (also ``{"type": "image", "image": source}``, bare strings as text parts);
  - vLLM's ``{"content": [parts]}``.
An image source is anything engine.images.load_image takes. ``normalize_inputs`` turns
inputs into plain strings (text only) or ``Content`` (texts and preprocessed images),
loading every image up front so that a bad one fails its request with a message naming
the input, before any model work.

Prompts (the official code's, exactly): each side's content is its images, each
``<|vision_start|><|image_pad|>…<|vision_end|>`` with one pad per merged token, then its
texts concatenated; a side with no image and no (or only empty) text is ``NULL``.
"""
import unicodedata
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple, Union

from engine.images import ImageData, ImageError, ImageOptions, preprocess
from engine.sequence import Seq, Seqs
from engine.templates import QWEN3_RERANK_SYSTEM, Template

VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"


@dataclass(eq=False)
class Content:
    """One input holding images: its texts and its preprocessed images, in the order given."""

    texts: List[str] = field(default_factory=list)
    images: List[ImageData] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.texts)


Input = Union[str, Content]


def _is_image(x) -> bool:
    import numpy as np

    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency of the images extra
        return isinstance(x, np.ndarray)
    return isinstance(x, (Image.Image, np.ndarray, bytes, bytearray))


def _parts(parts: Sequence, what: str) -> Tuple[List[str], List[Any]]:
    texts, images = [], []
    for k, p in enumerate(parts):
        where = f"{what} part {k}"
        if isinstance(p, str):
            texts.append(p)
        elif _is_image(p):
            images.append(p)
        elif isinstance(p, dict):
            kind = p.get("type")
            if kind == "text" and isinstance(p.get("text"), str):
                texts.append(p["text"])
            elif kind == "image_url":
                url = p.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise ValueError(f"{where}: an image_url part needs image_url.url (a string)")
                images.append(url)
            elif kind == "image" and p.get("image") is not None:
                images.append(p["image"])
            else:
                raise ValueError(f"{where}: a part must be {{type: text, text}} or {{type: image_url, image_url: "
                                 f"{{url}}}}, got type {kind!r}")
        else:
            raise ValueError(f"{where}: a part must be a string or a dict, got {type(p).__name__}")
    return texts, images


def split_input(x: Any, what: str) -> Tuple[List[str], List[Any]]:
    """(texts, image sources) of any accepted input shape."""
    if isinstance(x, str):
        return [x], []
    if isinstance(x, Content):
        return list(x.texts), list(x.images)
    if isinstance(x, dict):
        if "content" in x:
            content = x["content"]
            return split_input(content, what) if isinstance(content, (str, list)) else _parts([content], what)
        if "type" in x:
            return _parts([x], what)
        if "text" not in x and "image" not in x:
            raise ValueError(f"{what}: a dict input needs 'text' and/or 'image' (or 'content': [parts])")
        text, image = x.get("text"), x.get("image")
        texts = [] if text is None else [text] if isinstance(text, str) else list(text)
        images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        for t in texts:
            if not isinstance(t, str):
                raise ValueError(f"{what}: 'text' must be a string or a list of strings")
        return texts, images
    if isinstance(x, (list, tuple)):
        return _parts(x, what)
    if _is_image(x):
        return [], [x]
    raise ValueError(f"{what} must be a string, a dict {{text, image}} or a list of parts; got {type(x).__name__}")


def normalize_input(x: Any, what: str, opts: ImageOptions, counted: Optional[list] = None) -> Input:
    """One input as a string (text only) or a Content with its images loaded and preprocessed.

    ``counted``: a one-element list holding the images of the request so far (query and
    documents share ``opts.max_images``)."""
    if isinstance(x, str):
        return x
    texts, sources = split_input(x, what)
    if not sources:
        return "".join(texts)
    counted = counted if counted is not None else [0]
    counted[0] += len(sources)
    if opts.max_images is not None and counted[0] > opts.max_images:
        raise ImageError(f"{what}: the request holds more than {opts.max_images} images (--max-images)")
    images = [s if isinstance(s, ImageData) else preprocess(s, opts, f"{what} image {k}")
              for k, s in enumerate(sources)]
    return Content(texts, images)


def normalize_inputs(items: Sequence[Any], what: str, opts: ImageOptions,
                     counted: Optional[list] = None) -> List[Input]:
    """``normalize_input`` of each item, named ``what[i]`` in errors."""
    counted = counted if counted is not None else [0]
    return [normalize_input(x, f"{what}[{i}]", opts, counted) for i, x in enumerate(items)]


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
