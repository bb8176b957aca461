"""Prompt templates, tokenized exactly as each model family's reference code does.

The Qwen3-Reranker format (official model card code): prefix and suffix are
tokenized on their own; the formatted pair is tokenized without special tokens
and truncated to ``max_length - len(prefix) - len(suffix)``; the ids are
prefix + pair + suffix.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence

QWEN3_RERANK_SYSTEM = (
    'Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
    'Note that the answer can only be "yes" or "no".'
)
QWEN3_RERANK_PREFIX = f"<|im_start|>system\n{QWEN3_RERANK_SYSTEM}<|im_end|>\n<|im_start|>user\n"
QWEN3_RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_RERANK_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
QWEN3_EMBED_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


@dataclass
class Encodings:
    """Token ids per sequence, and segment ids for models that use them (BERT pairs)."""

    ids: List[List[int]]
    token_types: Optional[List[List[int]]] = None

    def __len__(self) -> int:
        return len(self.ids)


def check_texts(texts, what: str) -> List[str]:
    if isinstance(texts, str):
        raise TypeError(f"{what} must be a list of strings, not a single string")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"{what}[{i}] must be a string, got {type(t).__name__}")
    return out


class Qwen3RerankTemplate:
    """``<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {doc}`` in Qwen's chat layout."""

    default_instruction = QWEN3_RERANK_INSTRUCTION

    def __init__(self, tokenizer, max_length: int = 8192):
        self.tokenizer = tokenizer
        self.prefix_ids = tokenizer.encode(QWEN3_RERANK_PREFIX, add_special_tokens=False)
        self.suffix_ids = tokenizer.encode(QWEN3_RERANK_SUFFIX, add_special_tokens=False)
        self.max_length = max_length
        self.pair_budget = max_length - len(self.prefix_ids) - len(self.suffix_ids)
        if self.pair_budget <= 0:
            raise ValueError(f"max_length={max_length} leaves no room for the pair after the template")

    @staticmethod
    def format_pair(query: str, doc: str, instruction: str) -> str:
        return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"

    def encode(self, queries: Sequence[str], docs: Sequence[str], instruction: Optional[str] = None) -> Encodings:
        instruction = self.default_instruction if instruction is None else instruction
        texts = [self.format_pair(q, d, instruction) for q, d in zip(queries, docs)]
        if not texts:
            return Encodings([])
        pair_ids = self.tokenizer(
            texts, add_special_tokens=False, truncation=True, max_length=self.pair_budget,
            return_attention_mask=False,
        )["input_ids"]
        return Encodings([self.prefix_ids + ids + self.suffix_ids for ids in pair_ids])


class Qwen3EmbedTemplate:
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

    def encode(self, texts: Sequence[str], is_query: bool = False, instruction: Optional[str] = None) -> Encodings:
        if is_query:
            texts = [self.format_query(t, instruction) for t in texts]
        elif instruction is not None:
            raise ValueError("instruction applies to queries only: pass is_query=True")
        if not texts:
            return Encodings([])
        return Encodings(self.tokenizer(
            list(texts), add_special_tokens=True, truncation=True, max_length=self.max_length,
            return_attention_mask=False,
        )["input_ids"])
