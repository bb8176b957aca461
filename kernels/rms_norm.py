"""RMSNorm with an optional fused residual add.

out = norm(x + residual) * (offset + weight), computed in fp32 and cast back to
x's dtype. offset is 0 for Qwen3 (``x * w``) and 1 for Gemma/Qwen3.5
(``x * (1 + w)``). When ``residual`` is given, the sum is returned too, so a
decoder layer runs ``h, res = rms_norm(h, w, eps, residual=res)``.
"""
from typing import Optional, Tuple

import torch

from ._dispatch import use_triton


def rms_norm_ref(
    x: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [H]
    eps: float,
    residual: Optional[torch.Tensor] = None,  # [T, H]
    offset: float = 0.0,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if residual is not None:
        x = x + residual
        residual = x
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = (xf * (weight.float() + offset)).to(x.dtype)
    return out, residual


def rms_norm(x, weight, eps, residual=None, offset=0.0):
    """Fused (residual add +) RMSNorm; returns ``(out, x + residual or None)``."""
    if use_triton(x):
        return rms_norm_triton(x, weight, eps, residual=residual, offset=offset)
    return rms_norm_ref(x, weight, eps, residual=residual, offset=offset)
