"""Heads: what a model's last hidden states become (a relevance score or an embedding).

Heads read only the rows they need (the last token of each sequence) and apply
the model's final norm to those rows alone.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from engine.context import BatchContext
from engine.tokenizer import token_id
from engine.weights import WeightError, read_rows


# Heads take (hidden [T, H], residual [T, H] or None, ctx, model) and return fp32 [n] or [n, H].
# A builder gets (config dict, tokenizer, checkpoint index) and returns the head module.


def build_yes_no_head(config: dict, tokenizer, index) -> "YesNoHead":
    """Fold the LM head's yes/no rows (or the tied embedding's) into one fp32 vector."""
    yes, no = token_id(tokenizer, "yes"), token_id(tokenizer, "no")
    name = next((n for n in ("lm_head.weight", "model.lm_head.weight") if n in index), None)
    if name is None:
        if not config.get("tie_word_embeddings", False):
            raise WeightError("missing tensor lm_head.weight (tie_word_embeddings is false)")
        name = next(n for n in ("model.embed_tokens.weight", "embed_tokens.weight") if n in index)
    rows = read_rows(index[name], name, [yes, no])  # two rows, not the vocabulary
    return YesNoHead(rows[0], rows[1])


class YesNoHead(nn.Module):
    """score = sigmoid(norm(h_last) . (W[yes] - W[no])), all fp32.

    Equal to softmax([l_no, l_yes])[1] of the full LM head (vLLM's
    ``from_2_way_softmax``), without computing the vocabulary.
    """

    def __init__(self, w_yes: torch.Tensor, w_no: torch.Tensor):
        super().__init__()
        self.register_buffer("w", (w_yes.float() - w_no.float()).contiguous())  # [H] fp32

    def forward(self, hidden, residual, ctx: BatchContext, model) -> torch.Tensor:
        norm = model.norm
        logit, score = kernels.yes_no_head(
            hidden, ctx.last_index, norm.weight, self.w, norm.eps, residual=residual, offset=norm.offset,
        )
        return score  # [n] fp32


class LastTokenPooling(nn.Module):
    """The final-normed hidden state of each sequence's last token, in fp32."""

    def forward(self, hidden, residual, ctx: BatchContext, model) -> torch.Tensor:
        norm = model.norm
        x = hidden[ctx.last_index]
        res = residual[ctx.last_index] if residual is not None else None
        out, _ = kernels.rms_norm(x, norm.weight, norm.eps, residual=res, offset=norm.offset)
        return out.float()  # [n, H]


def matryoshka(emb: torch.Tensor, dimensions: Optional[int], normalize: bool = True) -> torch.Tensor:
    """Truncate to ``dimensions`` first, then L2-normalise (Matryoshka order)."""
    if dimensions is not None:
        if not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions <= 0:
            raise ValueError(f"dimensions must be a positive integer, got {dimensions!r}")
        if dimensions > emb.shape[-1]:
            raise ValueError(f"dimensions={dimensions} is larger than the embedding size {emb.shape[-1]}")
        emb = emb[..., :dimensions]
    return F.normalize(emb, p=2, dim=-1) if normalize else emb


HEAD_BUILDERS = {
    "yes_no": build_yes_no_head,
    "last_token": lambda config, tokenizer, index: LastTokenPooling(),
}
