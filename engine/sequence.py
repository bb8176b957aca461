"""Typed sequences: what a template makes of an input, and what the scheduler budgets.

One ``Seq`` per sequence the model runs. Templates produce them; the scheduler
packs them under a token budget by ``cost``; a model's ``plan`` turns a batch of
them into its batch context. Nothing downstream reads anonymous tuples.
"""
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple


@dataclass(eq=False)
class Seq:
    token_ids: List[int]
    token_types: Optional[List[int]] = None  # BERT-style segment ids, one per token
    # The shared prefix this sequence continues (its token ids, which are also its cache key):
    # its positions start after the prefix and it attends to the prefix's cached K/V.
    prefix: Optional[Tuple[int, ...]] = None
    # KaLM-Reranker: the encoder token ids of the passage whose cached encoding it reads.
    passage: Optional[List[int]] = None
    # Images (engine.prompts.images.ImageData, in token order) for the families that take them.
    multimodal: Optional[Tuple[Any, ...]] = None
    index: int = 0  # position within its request

    @property
    def cost(self) -> int:
        """Tokens this sequence adds to a packed batch (the prefix and the passage are cached); an
        image adds its patches, which the vision tower runs before the language model."""
        if self.multimodal:
            return len(self.token_ids) + sum(im.num_patches for im in self.multimodal)
        return len(self.token_ids)

    @property
    def prompt_tokens(self) -> int:
        """Tokens of the whole input as the reference would see it: usage accounting."""
        prefix = len(self.prefix) if self.prefix else 0
        passage = len(self.passage) if self.passage else 0
        return len(self.token_ids) + prefix + passage


class Seqs(list):
    """A template's output: a list of ``Seq`` with column views for callers that want plain ids."""

    @property
    def ids(self) -> List[List[int]]:
        return [s.token_ids for s in self]

    @property
    def token_types(self) -> Optional[List[List[int]]]:
        if not self or self[0].token_types is None:
            return None
        return [s.token_types for s in self]

    @classmethod
    def of(cls, ids: List[List[int]], token_types: Optional[List[List[int]]] = None, **common) -> "Seqs":
        types = token_types if token_types is not None else [None] * len(ids)
        return cls(Seq(list(i), None if t is None else list(t), **common) for i, t in zip(ids, types))
