"""RMSNorm with an optional fused residual add.

out = norm(x + residual) * (offset + weight), computed in fp32 and cast back to
x's dtype. offset is 0 for Qwen3 (``x * w``) and 1 for Gemma/Qwen3.5
(``x * (1 + w)``). When ``residual`` is given, the sum is returned too, so a
decoder layer runs ``h, res = rms_norm(h, w, eps, residual=res)``.
"""
from typing import Optional, Tuple

import torch

from ._library import engine_op
from ._utils import FLOAT_DTYPES, check_tensor, require_triton, row_block, rows_per_program, unit_stride_last, warps_for

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference still imports without Triton
    from ._utils import tl_stub as tl, triton_stub as triton


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


@triton.jit(do_not_specialize=["n_rows"])  # batch-dependent: one binary for every batch
def _rms_norm_kernel(
    X, R, W, Y, S,  # x, residual, weight, out, x + residual (out)
    n_rows, n_cols,
    stride_x, stride_r, stride_y, stride_s,
    eps, offset,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # >= n_cols, power of two
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows = rows.to(tl.int64)[:, None]  # T * H can pass 2**31

    x = tl.load(X + rows * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows * stride_r + cols[None, :], mask=mask, other=0.0)
        # Round the sum to the storage dtype first: the norm must see exactly
        # the residual stream that the next layer reads back.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + rows * stride_s + cols[None, :], x, mask=mask)
    x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32) + offset
    y = (x * rstd[:, None]) * w[None, :]
    tl.store(Y + rows * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


def rms_norm_triton(
    x: torch.Tensor,  # [..., H]
    weight: torch.Tensor,  # [H]
    eps: float,
    residual: Optional[torch.Tensor] = None,  # same shape and dtype as x
    offset: float = 0.0,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Triton RMSNorm; returns ``(out, x + residual)`` (second is None without residual)."""
    require_triton()
    check_tensor(x, "x", dtypes=FLOAT_DTYPES)
    check_tensor(weight, "weight", ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
    hidden = x.shape[-1]
    if weight.shape[0] != hidden:
        raise ValueError(f"weight has {weight.shape[0]} elements, x has hidden size {hidden}")
    if residual is not None:
        check_tensor(residual, "residual", dtypes=(x.dtype,), device=x.device)
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")

    x2 = unit_stride_last(x.reshape(-1, hidden))
    n_rows = x2.shape[0]
    out = torch.empty((n_rows, hidden), dtype=x.dtype, device=x.device)
    res_out = r2 = None
    if residual is not None:
        r2 = unit_stride_last(residual.reshape(-1, hidden))
        res_out = torch.empty_like(out)
    if n_rows > 0 and hidden > 0:
        block_n = row_block(hidden)
        block_m = rows_per_program(block_n)
        has_res = residual is not None
        _rms_norm_kernel[(triton.cdiv(n_rows, block_m),)](
            x2, r2 if has_res else x2, unit_stride_last(weight), out, res_out if has_res else out,
            n_rows, hidden,
            x2.stride(0), r2.stride(0) if has_res else 0, out.stride(0), out.stride(0),
            float(eps), float(offset),
            HAS_RESIDUAL=has_res, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=warps_for(block_m * block_n),
        )
    out = out.view(x.shape)
    return out, (res_out.view(x.shape) if res_out is not None else None)


def _rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    return rms_norm_ref(x, weight, eps, offset=offset)[0]


def _rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    return rms_norm_triton(x, weight, eps, offset=offset)[0]


def _add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                      offset: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_ref(x, weight, eps, residual=residual, offset=offset)


def _add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                         offset: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_triton(x, weight, eps, residual=residual, offset=offset)


def _rms_norm_cpu(ext, x, weight, eps, offset=0.0):
    return ext.rms_norm(x, None, weight, eps, offset)[0]


def _add_rms_norm_cpu(ext, x, residual, weight, eps, offset=0.0):
    out, res = ext.rms_norm(x, residual, weight, eps, offset)
    return out, res


rms_norm_op = engine_op("rms_norm", _rms_norm_ref, _rms_norm_triton,
                        lambda x, weight, eps, offset=0.0: torch.empty_like(x), cpu=_rms_norm_cpu)
add_rms_norm_op = engine_op("add_rms_norm", _add_rms_norm_ref, _add_rms_norm_triton,
                            lambda x, residual, weight, eps, offset=0.0: (torch.empty_like(x), torch.empty_like(x)),
                            cpu=_add_rms_norm_cpu)


def rms_norm(x, weight, eps, residual=None, offset=0.0):
    """Fused (residual add +) RMSNorm; returns ``(out, x + residual or None)``.

    ``torch.ops.engine.rms_norm`` without a residual, ``torch.ops.engine.add_rms_norm`` with one.
    """
    if residual is None:
        return rms_norm_op(x, weight, float(eps), float(offset)), None
    return add_rms_norm_op(x, residual, weight, float(eps), float(offset))
