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
import torch.nn.functional as F

from ._library import engine_op
from ._utils import FLOAT_DTYPES, check_tensor, next_pow2, require_triton, warps_for

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference still imports without Triton
    from ._utils import tl_stub as tl, triton_stub as triton


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[T, head_dim // 2]`` in fp32 for integer ``positions [T]``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    return freqs.cos(), freqs.sin()


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
    # q and k heads side by side are one [T, Hq + Hkv, D] view: norm and rotate them in one pass.
    qk = view[:, : num_heads + num_kv_heads]
    x = qk.float()
    if q_weight is not None:
        w = torch.cat((q_weight.float().expand(num_heads, head_dim), k_weight.float().expand(num_kv_heads, head_dim)))
        x = F.rms_norm(x, (head_dim,), None, eps) * w  # x * rsqrt(mean(x^2) + eps), one fused pass
    half = head_dim // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    o1 = (x1 * c).addcmul_(x2, s, value=-1.0)  # both halves before writing: x may alias qkv
    o2 = (x2 * c).addcmul_(x1, s)
    qk[..., :half].copy_(o1)
    qk[..., half:].copy_(o2)
    return q, k, v


@triton.jit
def _norm_rope_heads(
    row_ptr, w_ptr, cos, sin, n_heads, head_dim, half, eps,
    APPLY_NORM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # One token's ``n_heads`` heads starting at row_ptr, as two [BLOCK_H, BLOCK_HALF]
    # halves (rotate-half pairs element i with i + D/2).
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    mask = (heads < n_heads)[:, None] & (dims < half)[None, :]
    ptr1 = row_ptr + heads[:, None] * head_dim + dims[None, :]
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr1 + half, mask=mask, other=0.0).to(tl.float32)
    if APPLY_NORM:
        rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / head_dim + eps)
        w1 = tl.load(w_ptr + dims, mask=dims < half, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + half + dims, mask=dims < half, other=0.0).to(tl.float32)
        x1 = x1 * rstd[:, None] * w1[None, :]
        x2 = x2 * rstd[:, None] * w2[None, :]
    c = cos[None, :]
    s = sin[None, :]
    out_ty = row_ptr.dtype.element_ty
    tl.store(ptr1, (x1 * c - x2 * s).to(out_ty), mask=mask)
    tl.store(ptr1 + half, (x2 * c + x1 * s).to(out_ty), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(
    QKV, QW, KW, COS, SIN,
    stride_t, stride_cos, stride_sin,
    num_heads, num_kv_heads, head_dim, eps,
    APPLY_NORM: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # One program per token: its q heads then its k heads; v is untouched.
    tok = tl.program_id(0).to(tl.int64)
    half = head_dim // 2
    dims = tl.arange(0, BLOCK_HALF)
    cos = tl.load(COS + tok * stride_cos + dims, mask=dims < half, other=0.0).to(tl.float32)
    sin = tl.load(SIN + tok * stride_sin + dims, mask=dims < half, other=0.0).to(tl.float32)
    row = QKV + tok * stride_t
    _norm_rope_heads(row, QW, cos, sin, num_heads, head_dim, half, eps,
                     APPLY_NORM, BLOCK_HQ, BLOCK_HALF)
    _norm_rope_heads(row + num_heads * head_dim, KW, cos, sin, num_kv_heads, head_dim, half, eps,
                     APPLY_NORM, BLOCK_HK, BLOCK_HALF)


def qk_norm_rope_triton(
    qkv: torch.Tensor,  # [T, (Hq + 2*Hkv) * D], updated in place
    q_weight: Optional[torch.Tensor],  # [D] or None (no q/k norm)
    k_weight: Optional[torch.Tensor],  # [D] or None
    cos: torch.Tensor,  # [T, D/2] fp32
    sin: torch.Tensor,  # [T, D/2] fp32
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
):
    """Triton in-place q/k RMSNorm + RoPE on packed qkv; returns (q, k, v) views."""
    require_triton()
    check_tensor(qkv, "qkv", ndim=2, dtypes=FLOAT_DTYPES)
    T = qkv.shape[0]
    width = (num_heads + 2 * num_kv_heads) * head_dim
    if qkv.shape[1] != width:
        raise ValueError(f"qkv has {qkv.shape[1]} columns, expected (Hq + 2*Hkv) * D = {width}")
    if head_dim % 2:
        raise ValueError(f"rotate-half RoPE needs an even head_dim, got {head_dim}")
    if qkv.stride(1) != 1:
        raise ValueError("qkv must have unit stride along its last dim (it is updated in place)")
    if (q_weight is None) != (k_weight is None):
        raise ValueError("pass both q_weight and k_weight, or neither")
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(t, name, ndim=2, device=qkv.device)
        if tuple(t.shape) != (T, head_dim // 2):
            raise ValueError(f"{name} must be [T, D/2] = {(T, head_dim // 2)}, got {tuple(t.shape)}")
    cos = cos if cos.stride(1) == 1 else cos.contiguous()
    sin = sin if sin.stride(1) == 1 else sin.contiguous()
    apply_norm = q_weight is not None
    if apply_norm:
        for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
            check_tensor(w, name, ndim=1, dtypes=FLOAT_DTYPES, device=qkv.device)
            if w.shape[0] != head_dim:
                raise ValueError(f"{name} must have head_dim={head_dim} elements, got {w.shape[0]}")
        q_weight, k_weight = q_weight.contiguous(), k_weight.contiguous()

    if T > 0:
        block_half = next_pow2(head_dim // 2)
        block_hq, block_hk = next_pow2(num_heads), next_pow2(num_kv_heads)
        _qk_norm_rope_kernel[(T,)](
            qkv, q_weight if apply_norm else cos, k_weight if apply_norm else cos, cos, sin,
            qkv.stride(0), cos.stride(0), sin.stride(0),
            num_heads, num_kv_heads, head_dim, float(eps),
            APPLY_NORM=apply_norm, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half,
            num_warps=warps_for(2 * block_hq * block_half),
        )
    view = qkv.view(T, num_heads + 2 * num_kv_heads, head_dim)
    return view[:, :num_heads], view[:, num_heads : num_heads + num_kv_heads], view[:, num_heads + num_kv_heads :]


def _qk_norm_rope_ref(qkv: torch.Tensor, q_weight: Optional[torch.Tensor], k_weight: Optional[torch.Tensor],
                      cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                      eps: float) -> None:
    qk_norm_rope_ref(qkv, q_weight, k_weight, cos, sin, num_heads, num_kv_heads, head_dim, eps)


def _qk_norm_rope_triton(qkv, q_weight, k_weight, cos, sin, num_heads, num_kv_heads, head_dim, eps) -> None:
    qk_norm_rope_triton(qkv, q_weight, k_weight, cos, sin, num_heads, num_kv_heads, head_dim, eps)


qk_norm_rope_op = engine_op("qk_norm_rope_", _qk_norm_rope_ref, _qk_norm_rope_triton,
                            lambda **kw: None, mutates_args=("qkv",))


def qk_norm_rope(qkv, q_weight, k_weight, cos, sin, num_heads, num_kv_heads, head_dim, eps):
    """In-place q/k RMSNorm + RoPE on packed qkv (``torch.ops.engine.qk_norm_rope_``); returns (q, k, v) views."""
    qk_norm_rope_op(qkv, q_weight, k_weight, cos, sin, int(num_heads), int(num_kv_heads), int(head_dim), float(eps))
    view = qkv.view(qkv.shape[0], num_heads + 2 * num_kv_heads, head_dim)
    return view[:, :num_heads], view[:, num_heads : num_heads + num_kv_heads], view[:, num_heads + num_kv_heads :]
