"""Prompt templates rendered from text: user templates (Jinja files, format strings) and Querit's.

A ``PromptTemplate`` renders one string per pair from ``query``, ``document`` and
``instruction``, tokenizes it without special tokens (special-token text in the
template still maps to its token), and appends ``end_ids`` (Querit's ``[CLS]``).

Truncation cuts the document, never the template around it: to ``max_length``
tokens in all, ``end_ids`` included.

Shared prefix: the engine finds the split by itself. The text before the document
(less one trailing space, which BPE pre-tokenizers attach to the next word) is the
head; the split is used only when, for probe documents, head tokens + tail tokens
equal the tokens of the whole string. Otherwise every pair is a full sequence (and
a log line says so).
"""
import logging
import string
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from engine.prompts.templates import Template
from engine.prompts.truncation import clip_text
from engine.sequence import Seqs

log = logging.getLogger("engine")

_SENTINEL = "\x00DOCUMENT\x00"
# Documents whose first characters tend to merge with what precedes them: letters, word endings,
# digits, punctuation, whitespace, CJK, combining marks.
_PROBES = ("Hello, world: the river runs past 42 cities.", "s and more", "ing yz", "123 go", "...!?", " spaced",
           "\n\nnewlines", "ßüñ 東京\tend", "\u0301accent", "'s")
FIELDS = ("query", "document", "instruction")

QUERIT_DEFAULT = ("Judge whether the Content meets the requirements based on the Query. "
                  "Query: {query}; Content: {document}")
QUERIT_WITH_INSTRUCTION = "{instruction} Query: {query}; Content: {document}"


def _token_by_name(tokenizer, token: str) -> int:
    if token not in tokenizer.get_vocab():
        raise TemplateError(f"the tokenizer has no {token} token, which this reranker's head reads last")
    return tokenizer.convert_tokens_to_ids(token)


class TemplateError(ValueError):
    """A user template that cannot be used; the message names the file or the placeholder."""


def format_renderer(fmt: str, source: str = "the template") -> Callable[[str, str, str], str]:
    """``fmt`` with ``{query}``, ``{document}`` and ``{instruction}`` fields (``{{``/``}}`` for braces)."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(fmt) if f is not None]
    except ValueError as e:
        raise TemplateError(f"{source}: {e}") from None
    bad = sorted({n for n in names if n not in FIELDS})
    if bad:
        raise TemplateError(f"{source}: unknown placeholder {{{bad[0]}}}; use {{query}}, {{document}}, {{instruction}}")
    if names.count("document") != 1:
        raise TemplateError(f"{source} must hold {{document}} exactly once "
                            f"(it holds it {names.count('document')} times)")
    return lambda query, document, instruction: fmt.format(query=query, document=document, instruction=instruction)


def jinja_renderer(path: Path) -> Callable[[str, str, str], str]:
    """A Jinja template file (as vLLM's ``--chat-template`` for rerankers), rendered in a sandbox."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise TemplateError(f"cannot read the template file {path}: {e}") from None
    env = ImmutableSandboxedEnvironment(keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    try:
        tpl = env.from_string(text)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"{path}, line {e.lineno}: Jinja syntax error: {e.message}") from None

    def render(query: str, document: str, instruction: str) -> str:
        try:
            return tpl.render(query=query, document=document, instruction=instruction)
        except jinja2.TemplateError as e:
            raise TemplateError(f"{path}: cannot render: {e}") from None

    rendered = render("q", _SENTINEL, "i")
    if rendered.count(_SENTINEL) != 1:
        raise TemplateError(f"{path} must place {{{{ document }}}} exactly once "
                            f"(it appears {rendered.count(_SENTINEL)} times when rendered)")
    return render


class _Head(list):
    """Head token ids, with the text that starts every tail (``gap``) and the text after the document."""

    def __init__(self, ids: List[int], gap: str, after: str):
        super().__init__(ids)
        self.gap, self.after = gap, after


class PromptTemplate(Template):
    supports_prefix = True

    def __init__(self, tokenizer, render: Callable[[str, str, str], str], max_length: int = 8192,
                 default_instruction: str = "", end_token: Optional[str] = None, source: str = "template",
                 render_with_instruction: Optional[Callable[[str, str, str], str]] = None):
        self.tokenizer = tokenizer
        self.render, self.render_with_instruction = render, render_with_instruction or render
        self.max_length = int(max_length)
        self.default_instruction = default_instruction
        self.end_ids = [] if end_token is None else [_token_by_name(tokenizer, end_token)]
        self.source = source
        self.budget = self.max_length - len(self.end_ids)  # tokens before end_ids
        if self.budget <= 0:
            raise ValueError(f"max_length={max_length} leaves no room for the pair")
        self._warned = False

    def _ids(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]

    def _parts(self, query: str, instruction: Optional[str]) -> Tuple[str, str]:
        """(text before the document, text after it)."""
        if instruction is None:
            text = self.render(query, _SENTINEL, self.default_instruction)
        else:
            text = self.render_with_instruction(query, _SENTINEL, instruction)
        before, after = text.split(_SENTINEL)
        return before, after

    def _split(self, before: str, after: str) -> Optional[Tuple[List[int], str]]:
        """(head ids, the gap text that starts every tail), or None when the split is not exact."""
        cut = len(before) - 1 if before.endswith(" ") else len(before)
        head = self._ids(clip_text(self.tokenizer, before[:cut], self.budget))
        gap = before[cut:]
        if len(head) >= self.budget:
            return None
        for probe in _PROBES:
            if self._ids(before + probe + after) != head + self._ids(gap + probe + after):
                if not self._warned:
                    log.info("%s: the tokens before the document change with the document; "
                             "no prefix sharing for it", self.source)
                    self._warned = True
                return None
        return head, gap

    def _tail(self, head_len: int, gap: str, doc: str, after: str) -> List[int]:
        """Tokens after the head: the document, cut to what the budget leaves, then the rest, then end_ids."""
        avail = self.budget - head_len
        text = clip_text(self.tokenizer, gap + doc, avail)
        if not after:  # the document is last: the string is cut on the right
            return self._ids(text)[:avail] + self.end_ids
        if len(text) == len(gap + doc):
            whole = self._ids(text + after)
            if len(whole) <= avail:
                return whole + self.end_ids
        after_ids = self._ids(after)
        room = max(0, avail - len(after_ids))
        return (self._ids(text)[:room] + after_ids)[:avail] + self.end_ids

    def encode_head(self, query: str, instruction: Optional[str] = None) -> Optional[List[int]]:
        before, after = self._parts(query, instruction)
        split = self._split(before, after)
        if split is None:
            return None
        head, gap = split
        return _Head(head, gap, after)

    def encode_tails(self, head: List[int], docs: Sequence[str]) -> Seqs:
        """Tails after ``head``, which must be what ``encode_head`` returned (it carries the text around
        the document, which may depend on the query, e.g. a query placed after the document)."""
        if not isinstance(head, _Head):
            raise TypeError("encode_tails needs the head returned by this template's encode_head")
        return Seqs.of([self._tail(len(head), head.gap, d, head.after) for d in docs], prefix=tuple(head))

    def encode(self, queries: Sequence[str], docs: Sequence[str], instruction: Optional[str] = None) -> Seqs:
        out, parts = [], {}
        for q, d in zip(queries, docs):
            if q not in parts:
                before, after = self._parts(q, instruction)
                parts[q] = (before, after, self._split(before, after))
            before, after, split = parts[q]
            if split is not None:  # the same tokens as the shared-prefix path, by construction
                head, gap = split
                out.append(head + self._tail(len(head), gap, d, after))
            else:
                out.append(self._tail(0, before, d, after))
        return Seqs.of(out)


def user_template(template: str, prefix: str = "", suffix: str = "", head: str = "yes_no") -> dict:
    """PromptTemplate arguments of a user's ``template``: a Jinja file, or a format string between
    literal ``prefix`` and ``suffix`` text. A 2-way head reads the ``[CLS]`` appended last."""
    from engine.prompts.templates import QWEN3_RERANK_INSTRUCTION

    path = Path(template)
    if len(template) < 4096 and "\n" not in template and path.is_file():
        if prefix or suffix:
            raise TemplateError("template_prefix/template_suffix go with a format-string template, not a file")
        render, source = jinja_renderer(path), str(path)
    elif "{" in template:
        fmt = prefix.replace("{", "{{").replace("}", "}}") + template + suffix.replace("{", "{{").replace("}", "}}")
        render, source = format_renderer(fmt, "the format-string template"), "the format-string template"
    else:
        raise TemplateError(f"template {template!r} is not a built-in name, an existing file or a format "
                            f"string with {{document}}")
    return {"render": render, "source": source, "default_instruction": QWEN3_RERANK_INSTRUCTION,
            "end_token": "[CLS]" if head == "two_way" else None}


class QueritTemplate(PromptTemplate):
    """Querit-Reranker: ``Judge whether the Content meets the requirements based on the Query.
    Query: {query}; Content: {doc}`` (or ``{instruction} Query: {query}; Content: {doc}``), no chat
    template, no special tokens, cut on the right to max_length - 1, then the tokenizer's ``[CLS]``."""

    default_max_length = 4096

    def __init__(self, tokenizer, max_length: int = 4096):
        super().__init__(tokenizer, format_renderer(QUERIT_DEFAULT, "Querit's template"), max_length,
                         default_instruction="", end_token="[CLS]", source="Querit's template",
                         render_with_instruction=format_renderer(QUERIT_WITH_INSTRUCTION, "Querit's template"))
