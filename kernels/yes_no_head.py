"""Fused yes/no head of LLM rerankers.

score_i = sigmoid(norm(h[last_i]) . w) with w = W[yes] - W[no] folded in fp32
at load time. Only the rows named by last_index are normalised; no
vocabulary-sized logits exist. The dot and the sigmoid are fp32, since the
sigmoid saturates to 1.0 in bf16.
"""
from typing import Optional, Tuple

import torch

from ._dispatch import use_triton


def yes_no_head_ref(
    hidden: torch.Tensor,  # [T, H] (pre-final-norm residual stream, or its last layer output)
    last_index: torch.Tensor,  # [n] int
    norm_weight: torch.Tensor,  # [H]
    w: torch.Tensor,  # [H] fp32
    eps: float,
    residual: Optional[torch.Tensor] = None,  # [T, H] added to hidden before the norm
    offset: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    x = hidden[last_index]
    if residual is not None:
        x = x + residual[last_index]
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xf = xf * (norm_weight.float() + offset)
    logit = xf @ w
    return logit, torch.sigmoid(logit)


def yes_no_head(hidden, last_index, norm_weight, w, eps, residual=None, offset=0.0):
    """Returns fp32 ``(logit [n], score [n])`` for the rows ``last_index``."""
    if use_triton(hidden):
        return yes_no_head_triton(hidden, last_index, norm_weight, w, eps, residual=residual, offset=offset)
    return yes_no_head_ref(hidden, last_index, norm_weight, w, eps, residual=residual, offset=offset)
