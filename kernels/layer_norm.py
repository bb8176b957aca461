"""LayerNorm with an optional fused residual add (BERT / XLM-R post-norm).

out = LayerNorm(x + residual) * weight + bias, statistics in fp32, the sum rounded
to x's dtype first (as ``F.layer_norm(dense(x) + residual)`` does). CPU: the C++
kernel (csrc/) when built; CUDA: the reference (cuBLAS epilogues and ATen's own
kernel; a Triton kernel has not been measured to pay there).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from ._library import engine_op


def layer_norm_ref(
    x: torch.Tensor,  # [T, H]
    residual: Optional[torch.Tensor],  # [T, H] or None
    weight: torch.Tensor,  # [H]
    bias: torch.Tensor,  # [H]
    eps: float,
) -> torch.Tensor:
    if residual is not None:
        x = x + residual
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


layer_norm_op = engine_op(
    "layer_norm", layer_norm_ref, layer_norm_ref,
    lambda x, residual, weight, bias, eps: torch.empty_like(x),
    cpu=lambda ext, x, residual, weight, bias, eps: ext.layer_norm(x, residual, weight, bias, eps))


def layer_norm(x, weight, bias, eps, residual=None):
    """``LayerNorm(x [+ residual])`` (``torch.ops.engine.layer_norm``)."""
    return layer_norm_op(x, residual, weight, bias, float(eps))
