"""Prompt templates, tokenized exactly as each model family's reference code does.

The Qwen3-Reranker format (official model card code): prefix and suffix are
tokenized on their own; the formatted pair is tokenized without special tokens
and truncated to ``max_length - len(prefix) - len(suffix)``; the ids are
prefix + pair + suffix.
"""
import logging
import unicodedata
from pathlib import Path
from typing import List, Optional, Sequence

from engine.prompts.truncation import CLIP_CHARS_PER_TOKEN, clip_text, pair_budget
from engine.sequence import Seq, Seqs
from engine.weights import read_json

QWEN3_RERANK_SYSTEM = (
    'Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
    'Note that the answer can only be "yes" or "no".'
)
QWEN3_RERANK_PREFIX = f"<|im_start|>system\n{QWEN3_RERANK_SYSTEM}<|im_end|>\n<|im_start|>user\n"
QWEN3_RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_RERANK_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
QWEN3_EMBED_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


class Template:
    """What every prompt template declares (capabilities are attributes, never probed).

    ``supports_prefix``: ``encode_head``/``encode_tails`` split a pair exactly into a shared
    prefix and a per-document tail (causal LLM rerankers).
    ``needs_model_files``: the constructor takes the model ``folder``, its ``config`` (config.json) and
    ``max_positions`` (the longest input the model's learned positions allow, or None).
    ``multimodal``: inputs may hold images (engine.prompts.inputs); the template has ``image_options``.
    ``default_instruction``: the instruction slot's default, None without a slot.
    """

    supports_prefix = False
    needs_model_files = False
    multimodal = False
    default_instruction: Optional[str] = None
    default_max_length = 8192  # when the caller gives none
    max_length: int = 8192

    def clip(self, texts: Sequence[str], max_tokens: int) -> List[str]:
        """Each text cut by characters before tokenizing (engine.prompts.truncation.clip_text)."""
        return [clip_text(self.tokenizer, t, max_tokens) for t in texts]


_BLANK = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "Me"})  # control, format, spaces, combining marks


def is_blank(text: str) -> bool:
    """Whether a text holds nothing to read: empty, or only whitespace, control characters ("\\u0000"),
    invisible format characters (zero-width space, joiners, BOM) and combining marks with nothing to
    combine with. The one rule for an empty query or text, in Python, the CLI and over HTTP."""
    return all(unicodedata.category(c) in _BLANK for c in text)


def check_texts(texts, what: str) -> List[str]:
    if isinstance(texts, str):
        raise TypeError(f"{what} must be a list of strings, not a single string")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"{what}[{i}] must be a string, got {type(t).__name__}")
    return out


class Qwen3RerankTemplate(Template):
    """``<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {doc}`` in Qwen's chat layout."""

    default_instruction = QWEN3_RERANK_INSTRUCTION

    def __init__(self, tokenizer, max_length: int = 8192):
        self.tokenizer = tokenizer
        self.prefix_ids = tokenizer.encode(QWEN3_RERANK_PREFIX, add_special_tokens=False)
        self.suffix_ids = tokenizer.encode(QWEN3_RERANK_SUFFIX, add_special_tokens=False)
        self.max_length = max_length
        self.pair_budget = pair_budget(max_length, self.prefix_ids, self.suffix_ids)

    @staticmethod
    def format_pair(query: str, doc: str, instruction: str) -> str:
        return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"

    def encode(self, queries: Sequence[str], docs: Sequence[str], instruction: Optional[str] = None) -> Seqs:
        instruction = self.default_instruction if instruction is None else instruction
        texts = self.clip([self.format_pair(q, d, instruction) for q, d in zip(queries, docs)], self.pair_budget)
        if not texts:
            return Seqs()
        pair_ids = self.tokenizer(
            texts, add_special_tokens=False, truncation=True, max_length=self.pair_budget,
            return_attention_mask=False,
        )["input_ids"]
        return Seqs.of([self.prefix_ids + ids + self.suffix_ids for ids in pair_ids])

    # Shared-prefix split. Everything up to "<Document>:" is the same for every document of a
    # query; the document part starts with the space before the document. Qwen's pre-tokenizer
    # always ends a pre-token at ">:" followed by a space, and NFC cannot compose across ": ",
    # so head tokens + document tokens == tokens of the whole string (tests check this).
    supports_prefix = True

    def encode_head(self, query: str, instruction: Optional[str] = None) -> Optional[List[int]]:
        """Template prefix + ``<Instruct>…<Document>:`` ids, or None if truncation would cut into them."""
        instruction = self.default_instruction if instruction is None else instruction
        head = self.format_pair(query, "", instruction)[:-1]  # drop the space before the document
        head = clip_text(self.tokenizer, head, self.pair_budget)  # longer than the budget: no sharing anyway
        ids = self.tokenizer(head, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        if len(ids) >= self.pair_budget or getattr(self.tokenizer, "truncation_side", "right") != "right":
            return None
        return self.prefix_ids + ids

    def encode_tails(self, head: List[int], docs: Sequence[str]) -> Seqs:
        """`` {doc}`` + suffix ids for each document, truncated as the whole pair would be."""
        if not docs:
            return Seqs()
        budget = self.pair_budget - (len(head) - len(self.prefix_ids))
        ids = self.tokenizer(self.clip([" " + d for d in docs], budget), add_special_tokens=False, truncation=True,
                             max_length=budget, return_attention_mask=False)["input_ids"]
        return Seqs.of([x + self.suffix_ids for x in ids], prefix=tuple(head))


class Qwen3EmbedTemplate(Template):
    """Queries as ``Instruct: {task}\\nQuery:{query}`` (no space); documents as-is.

    The tokenizer's own post-processor appends ``<|endoftext|>``, whose hidden
    state is the embedding.
    """

    default_instruction = QWEN3_EMBED_INSTRUCTION

    def __init__(self, tokenizer, max_length: int = 8192):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def format_query(self, query: str, instruction: Optional[str]) -> str:
        instruction = self.default_instruction if instruction is None else instruction
        return f"Instruct: {instruction}\nQuery:{query}"

    def encode(self, texts: Sequence[str], is_query: bool = False, instruction: Optional[str] = None) -> Seqs:
        if is_query:
            texts = [self.format_query(t, instruction) for t in texts]
        elif instruction is not None:
            raise ValueError("instruction applies to queries only: pass is_query=True")
        if not texts:
            return Seqs()
        return Seqs.of(self.tokenizer(
            self.clip(texts, self.max_length), add_special_tokens=True, truncation=True, max_length=self.max_length,
            return_attention_mask=False,
        )["input_ids"])


# --- BERT / XLM-RoBERTa (bidirectional encoders) ---------------------------------------------
# These templates read the model folder (sentence-transformers files) and config: the
# engine passes ``folder``, ``config`` and ``max_positions`` to template classes that set ``needs_model_files``.

def _encoder_max_length(tokenizer, max_length: int, max_positions: Optional[int]) -> int:
    """The caller's max_length, capped by the learned positions and the tokenizer's model_max_length."""
    limit = int(max_length)
    if max_positions is not None:
        limit = min(limit, int(max_positions))
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < 1_000_000:
        limit = min(limit, model_max)
    return limit


def _uses_token_types(tokenizer, config: Optional[dict]) -> bool:
    # Feed segment ids exactly when transformers would: the tokenizer returns them and the
    # model has more than one segment (XLM-R has type_vocab_size 1 and no token_type_ids).
    return "token_type_ids" in tokenizer.model_input_names and (config or {}).get("type_vocab_size", 2) > 1


class CrossEncoderTemplate(Template):
    """``[CLS] q [SEP] d [SEP]`` (token types 0/1) or ``<s> q </s></s> d </s>``, as the tokenizer's
    post-processor lays out pairs.

    Truncation as sentence-transformers' CrossEncoder (the reference for the
    ms-marco BERT cross-encoders): ``longest_first`` to ``max_length``, i.e.
    the longer of query and document loses tokens first. An instruction, if
    given, is prepended to the query text.
    """

    needs_model_files = True
    supports_prefix = False  # bidirectional: the query attends to the document

    def __init__(self, tokenizer, max_length: int = 8192, folder=None, config: Optional[dict] = None,
                 max_positions: Optional[int] = None):
        self.tokenizer = tokenizer
        self.max_length = _encoder_max_length(tokenizer, max_length, max_positions)
        self.token_types = _uses_token_types(tokenizer, config)
        self.num_special = tokenizer.num_special_tokens_to_add(pair=True)
        if self.max_length <= self.num_special:
            raise ValueError(f"max_length={self.max_length} leaves no room for a pair")

    def encode(self, queries: Sequence[str], docs: Sequence[str], instruction: Optional[str] = None) -> Seqs:
        if instruction is not None:
            queries = [instruction + q for q in queries]
        if not queries:
            return Seqs()
        enc = self.tokenizer(list(queries), self._clip_docs(queries, docs), truncation="longest_first",
                             max_length=self.max_length,
                             return_attention_mask=False, return_token_type_ids=self.token_types)
        return Seqs.of(enc["input_ids"], enc["token_type_ids"] if self.token_types else None)


    def _clip_docs(self, queries: Sequence[str], docs: Sequence[str]) -> List[str]:
        # longest_first cuts the longer side: a document clipped to more tokens than max_length is
        # still the longer side, and keeps its first tokens, whenever its query is shorter than max_length.
        short: dict = {}
        out = []
        for q, d in zip(queries, docs):
            if len(d) > self.max_length * CLIP_CHARS_PER_TOKEN:  # may need clipping: check the query once
                if q not in short:
                    ids = self.tokenizer(clip_text(self.tokenizer, q, self.max_length), add_special_tokens=False,
                                         return_attention_mask=False)["input_ids"]
                    short[q] = len(ids) < self.max_length
                d = clip_text(self.tokenizer, d, self.max_length) if short[q] else d
            out.append(d)
        return out


class XLMRobertaPairTemplate(CrossEncoderTemplate):
    """``<s> q </s></s> d </s>`` with FlagEmbedding's truncation (the reference for bge-reranker):
    the query is cut to ``max_length * 3 // 4`` tokens, then the document to what is left."""

    def __init__(self, tokenizer, max_length: int = 8192, folder=None, config: Optional[dict] = None,
                 max_positions: Optional[int] = None):
        super().__init__(tokenizer, max_length, folder, config, max_positions)
        self.layout = _pair_layout(tokenizer)

    def encode(self, queries: Sequence[str], docs: Sequence[str], instruction: Optional[str] = None) -> Seqs:
        if instruction is not None:
            queries = [instruction + q for q in queries]
        if not queries:
            return Seqs()
        tok = self.tokenizer
        q_cap = min(self.max_length * 3 // 4, self.max_length - self.num_special)
        uniq = list(dict.fromkeys(queries))  # rank(): one query, many documents
        q_ids = dict(zip(uniq, tok(self.clip(uniq, q_cap), add_special_tokens=False, truncation=True, max_length=q_cap,
                                   return_attention_mask=False)["input_ids"]))
        d_ids = tok(self.clip(docs, self.max_length), add_special_tokens=False, truncation=True, max_length=self.max_length,
                    return_attention_mask=False)["input_ids"]
        (pre, mid, post), (t_pre, t_q, t_mid, t_d, t_post) = self.layout
        ids, types = [], []
        for q, d in zip(queries, d_ids):
            q = q_ids[q]
            d = d[: self.max_length - self.num_special - len(q)]
            ids.append(pre + q + mid + d + post)
            if self.token_types:
                types.append(t_pre + [t_q] * len(q) + t_mid + [t_d] * len(d) + t_post)
        return Seqs.of(ids, types if self.token_types else None)


def _pair_layout(tokenizer):
    """The special tokens around the two sequences of a pair, read off the tokenizer's own
    post-processor: ((prefix, middle, suffix) ids, (their segment ids, query and document segment))."""
    a = tokenizer("hello", add_special_tokens=False)["input_ids"]
    b = tokenizer("world", add_special_tokens=False)["input_ids"]
    enc = tokenizer("hello", "world", return_token_type_ids=True, return_attention_mask=False)
    ids, tt = enc["input_ids"], enc["token_type_ids"]
    special = set(tokenizer.all_special_ids)
    for i in range(len(ids) - len(a) + 1):
        if ids[i : i + len(a)] != a or not set(ids[:i]) <= special:
            continue
        for j in range(i + len(a), len(ids) - len(b) + 1):
            if ids[j : j + len(b)] == b and set(ids[i + len(a) : j] + ids[j + len(b):]) <= special:
                k = j + len(b)
                return ((ids[:i], ids[i + len(a) : j], ids[k:]),
                        (tt[:i], tt[i], tt[i + len(a) : j], tt[j], tt[k:]))
    raise ValueError(f"cannot read the pair layout off this tokenizer (got {ids})")


class SentenceTransformerEmbedTemplate(Template):
    """Texts as sentence-transformers encodes them for BERT-like embedders.

    ``max_seq_length`` from ``sentence_bert_config.json`` (capped by the
    caller's max_length and the model's positions); prompts from
    ``config_sentence_transformers.json`` are prepended (``query`` for queries,
    ``document``/``passage``/``corpus`` for documents, else the default prompt).
    An ``instruction`` replaces the query prompt, prepended verbatim as
    sentence-transformers' ``prompt=`` is: on a model trained without prompts
    (all-MiniLM-L6-v2) it only shifts the query's embedding, so a warning says so.
    """

    needs_model_files = True
    supports_prefix = False
    _warned_instruction = False

    def __init__(self, tokenizer, max_length: int = 8192, folder=None, config: Optional[dict] = None,
                 max_positions: Optional[int] = None):
        self.tokenizer = tokenizer
        folder = Path(folder) if folder is not None else None
        st = _read_json_if(folder, "sentence_bert_config.json")
        if st.get("max_seq_length"):
            max_length = min(max_length, int(st["max_seq_length"]))
        self.lowercase = bool(st.get("do_lower_case", False))
        self.max_length = _encoder_max_length(tokenizer, max_length, max_positions)
        cst = _read_json_if(folder, "config_sentence_transformers.json")
        prompts = cst.get("prompts") or {}
        default = prompts.get(cst.get("default_prompt_name") or "", "")
        self.query_prompt = prompts.get("query", default)
        self.document_prompt = next((prompts[k] for k in ("document", "passage", "corpus") if k in prompts), default)

    def encode(self, texts: Sequence[str], is_query: bool = False, instruction: Optional[str] = None) -> Seqs:
        if instruction is not None and not is_query:
            raise ValueError("instruction applies to queries only: pass is_query=True")
        prompt = (self.query_prompt if instruction is None else instruction) if is_query else self.document_prompt
        if instruction and not self.query_prompt and not self._warned_instruction:
            self._warned_instruction = True
            logging.getLogger("engine").warning(
                "this embedding model was trained without instructions: the instruction is prepended to the query "
                "text as it is, which changes its embedding and the scores (leave it out unless that is wanted)")
        texts = [prompt + t for t in texts]
        if self.lowercase:
            texts = [t.lower() for t in texts]
        if not texts:
            return Seqs()
        return Seqs.of(self.tokenizer(self.clip(texts, self.max_length), truncation=True, max_length=self.max_length,
                                        return_attention_mask=False)["input_ids"])


def _read_json_if(folder: Optional[Path], name: str) -> dict:
    if folder is None or not (folder / name).is_file():
        return {}
    return read_json(folder / name)


# --- Prism-Reranker (Qwen3.5; Prism-Qwen3-Reranker-4B-exp on Qwen3) --------------------------
# From the authors' model card draft: the system line keeps its trailing space and has
# no "Note that" sentence; the instruction asks for the verdict and, on "yes", tagged evidence.
PRISM_SYSTEM = "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
PRISM_PREFIX = f"<|im_start|>system\n{PRISM_SYSTEM}<|im_end|>\n<|im_start|>user\n"
PRISM_INSTRUCTION = (
    'Judge if the document is relevant to the query. Reply "yes" or "no".\n'
    'On "yes", also emit:\n'
    "<contribution>One sentence covering every core point the document contributes to the query, "
    "without elaboration.</contribution>\n"
    "<evidence>Self-contained rewrite of the query-relevant content. Rules:\n"
    "- Faithful: rephrase only; add or infer nothing.\n"
    "- Self-contained: evidence alone must fully answer the query.\n"
    "- Concise: drop query-irrelevant background.\n"
    "- Verbatim (no translation): proper nouns, terms, abbreviations, numbers, dates, code, URLs.\n"
    "- Output language: multilingual doc -> query's language; else doc's language.</evidence>"
)


class PrismRerankTemplate(Qwen3RerankTemplate):
    """Prism-Reranker: Qwen3-Reranker's layout and suffix with Prism's system line and instruction.

    The score is sigmoid(l_yes - l_no) at the first generated position (the yes/no
    head). On "yes" the model goes on with ``\\n<contribution>…</contribution>\\n
    <evidence>…</evidence><|im_end|>``, which engine/core/decode.py decodes on request.
    ``instruction=`` replaces PRISM_INSTRUCTION per call; the prefix split is Qwen3's.
    """

    default_instruction = PRISM_INSTRUCTION

    def __init__(self, tokenizer, max_length: int = 8192):
        super().__init__(tokenizer, max_length)
        self.prefix_ids = tokenizer.encode(PRISM_PREFIX, add_special_tokens=False)
        self.pair_budget = pair_budget(max_length, self.prefix_ids, self.suffix_ids)


# --- KaLM-Reranker-V1 (T5Gemma2 encoder-decoder; model card template) ------------------------

KALM_INSTRUCTION = "Given a query, retrieve documents that answer the query."
KALM_DECODER_PROMPT = ("<bos><start_of_turn>user\n{system}\n\n<Instruct>: {instruction}\n<Query>: {query}"
                       "<end_of_turn>\n<start_of_turn>model\n\n\n\n")


class KaLMRerankTemplate(Template):
    """Passage and query go to different halves of the model.

    Encoder: ``<Document>: {document}``, no special tokens, cut at 1024 tokens (or
    max_length if smaller). Decoder: the chat prompt above with Qwen3-Reranker's system
    line; the query alone is cut to 512 tokens first (decoded back to text, so the
    prompt is always tokenized whole, as the reference formats it).
    """

    default_instruction = KALM_INSTRUCTION
    supports_prefix = False
    query_max_tokens = 512
    document_max_tokens = 1024

    def __init__(self, tokenizer, max_length: int = 8192):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.document_max_length = min(int(max_length), self.document_max_tokens)

    def encode_documents(self, docs: Sequence[str]) -> List[List[int]]:
        if not docs:
            return []
        texts = self.clip([f"<Document>: {d}" for d in docs], self.document_max_length)
        return self.tokenizer(texts, add_special_tokens=False, truncation=True,
                              max_length=self.document_max_length, return_attention_mask=False)["input_ids"]

    def format_query(self, query: str, instruction: Optional[str] = None) -> str:
        query = clip_text(self.tokenizer, query, self.query_max_tokens)
        ids = self.tokenizer(query, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        if len(ids) > self.query_max_tokens:
            query = self.tokenizer.decode(ids[: self.query_max_tokens], skip_special_tokens=False,
                                          clean_up_tokenization_spaces=False)
        instruction = self.default_instruction if instruction is None else instruction
        return KALM_DECODER_PROMPT.format(system=QWEN3_RERANK_SYSTEM, instruction=instruction, query=query)

    def encode_query(self, query: str, instruction: Optional[str] = None) -> List[int]:
        """Decoder prompt ids (``<bos>`` comes from the text, not from the tokenizer)."""
        return self.tokenizer(self.format_query(query, instruction), add_special_tokens=False,
                              return_attention_mask=False)["input_ids"]

    def encode(self, queries: Sequence[str], docs: Sequence[str], instruction: Optional[str] = None) -> Seqs:
        """One sequence per pair: the decoder prompt, reading its passage's cached encoding."""
        d_ids = self.encode_documents(list(docs))
        prompts = {q: self.encode_query(q, instruction) for q in dict.fromkeys(queries)}
        return Seqs(Seq(prompts[q], passage=d) for q, d in zip(queries, d_ids))
