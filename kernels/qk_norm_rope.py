"""Per-head q/k RMSNorm followed by rotate-half RoPE, on a packed qkv tensor.

qkv is the output of the fused projection, ``[T, (Hq + 2*Hkv) * D]`` laid out
as [q heads | k heads | v heads]. q and k are normalised over head_dim with
their own weights (Qwen3's q_norm/k_norm, applied before RoPE), then rotated
with cos/sin of each token's position. Math in fp32, one cast at the end.
Returns views (q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) of qkv, which is
updated in place.
"""
from typing import Optional, Tuple

import torch

from ._dispatch import use_triton


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[T, head_dim // 2]`` in fp32 for integer ``positions [T]``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    return freqs.cos(), freqs.sin()


def _norm_rope(x, w, cos, sin, eps, apply_norm):
    # x: [T, H, D] fp32; cos/sin: [T, D/2]
    if apply_norm:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.float()
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def qk_norm_rope_ref(
    qkv: torch.Tensor,  # [T, (Hq + 2*Hkv) * D]
    q_weight: Optional[torch.Tensor],  # [D] or None (no q/k norm)
    k_weight: Optional[torch.Tensor],  # [D] or None
    cos: torch.Tensor,  # [T, D/2] fp32
    sin: torch.Tensor,  # [T, D/2] fp32
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
):
    T = qkv.shape[0]
    view = qkv.view(T, num_heads + 2 * num_kv_heads, head_dim)
    q = view[:, :num_heads]
    k = view[:, num_heads : num_heads + num_kv_heads]
    v = view[:, num_heads + num_kv_heads :]
    apply_norm = q_weight is not None
    q.copy_(_norm_rope(q.float(), q_weight, cos, sin, eps, apply_norm))
    k.copy_(_norm_rope(k.float(), k_weight, cos, sin, eps, apply_norm))
    return q, k, v


def qk_norm_rope(qkv, q_weight, k_weight, cos, sin, num_heads, num_kv_heads, head_dim, eps):
    """In-place q/k RMSNorm + RoPE on packed qkv; returns (q, k, v) views."""
    if use_triton(qkv):
        return qk_norm_rope_triton(qkv, q_weight, k_weight, cos, sin, num_heads, num_kv_heads, head_dim, eps)
    return qk_norm_rope_ref(qkv, q_weight, k_weight, cos, sin, num_heads, num_kv_heads, head_dim, eps)
