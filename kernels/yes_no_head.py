"""Fused yes/no head of LLM rerankers.

score_i = sigmoid(norm(h[last_i]) . w) with w = W[yes] - W[no] folded in fp32
at load time. Only the rows named by last_index are normalised; no
vocabulary-sized logits exist. The dot and the sigmoid are fp32, since the
sigmoid saturates to 1.0 in bf16.
"""
from typing import Optional, Tuple

import torch

from ._library import engine_op
from ._utils import FLOAT_DTYPES, INDEX_DTYPES, check_tensor, require_triton, row_block, warps_for

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference still imports without Triton
    from ._utils import tl_stub as tl, triton_stub as triton


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


@triton.jit(do_not_specialize=["n_tokens"])  # batch-dependent: one binary for every batch
def _yes_no_head_kernel(
    H, R, IDX, NW, W, LOGIT, SCORE,
    n_tokens, n_cols,
    stride_h, stride_r,
    eps, offset,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,  # >= hidden, power of two
):
    # One program per scored sequence: gather its row, norm, dot, sigmoid.
    pid = tl.program_id(0)
    row = tl.load(IDX + pid).to(tl.int64)
    row = tl.where(row < 0, row + n_tokens, row)  # python-style negative index
    # An index outside [-T, T) reads nothing and scores NaN (a host-side check would sync the device).
    valid = (row >= 0) & (row < n_tokens)
    row = tl.where(valid, row, 0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(H + row * stride_h + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(H.dtype.element_ty)  # as the residual stream stores it
    x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    nw = tl.load(NW + cols, mask=mask, other=0.0).to(tl.float32) + offset
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    logit = tl.sum((x * rstd) * nw * w, axis=0)
    logit = tl.where(valid, logit, float("nan"))
    tl.store(LOGIT + pid, logit)
    tl.store(SCORE + pid, tl.sigmoid(logit))


def yes_no_head_triton(
    hidden: torch.Tensor,  # [T, H]
    last_index: torch.Tensor,  # [n] int
    norm_weight: torch.Tensor,  # [H]
    w: torch.Tensor,  # [H] fp32, W[yes] - W[no]
    eps: float,
    residual: Optional[torch.Tensor] = None,  # [T, H]
    offset: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton fused gather + RMSNorm + dot + sigmoid; returns fp32 ``(logit [n], score [n])``."""
    require_triton()
    check_tensor(hidden, "hidden", ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(last_index, "last_index", ndim=1, dtypes=INDEX_DTYPES, device=hidden.device)
    check_tensor(norm_weight, "norm_weight", ndim=1, dtypes=FLOAT_DTYPES, device=hidden.device)
    check_tensor(w, "w", ndim=1, dtypes=FLOAT_DTYPES, device=hidden.device)
    n_tokens, n_cols = hidden.shape
    if norm_weight.shape[0] != n_cols or w.shape[0] != n_cols:
        raise ValueError(f"norm_weight {tuple(norm_weight.shape)} and w {tuple(w.shape)} must be [{n_cols}]")
    if residual is not None:
        check_tensor(residual, "residual", dtypes=(hidden.dtype,), device=hidden.device)
        if residual.shape != hidden.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != hidden shape {tuple(hidden.shape)}")
    n = last_index.shape[0]
    logit = torch.empty(n, dtype=torch.float32, device=hidden.device)
    score = torch.empty(n, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return logit, score
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    if residual is not None and residual.stride(1) != 1:
        residual = residual.contiguous()
    block_n = row_block(n_cols)
    _yes_no_head_kernel[(n,)](
        hidden, residual if residual is not None else hidden, last_index.contiguous(),
        norm_weight.contiguous(), w.contiguous(), logit, score,
        n_tokens, n_cols, hidden.stride(0), residual.stride(0) if residual is not None else 0,
        float(eps), float(offset),
        HAS_RESIDUAL=residual is not None, BLOCK_N=block_n, num_warps=min(8, warps_for(block_n)),
    )
    return logit, score


def _yes_no_head_fake(hidden, last_index, norm_weight, w, eps, residual=None, offset=0.0):
    n = last_index.shape[0]
    return hidden.new_empty((n,), dtype=torch.float32), hidden.new_empty((n,), dtype=torch.float32)


yes_no_head_op = engine_op(
    "yes_no_head", yes_no_head_ref, lambda **kw: yes_no_head_triton(**kw),
    _yes_no_head_fake)


def yes_no_head(hidden, last_index, norm_weight, w, eps, residual=None, offset=0.0):
    """Returns fp32 ``(logit [n], score [n])`` for the rows ``last_index`` (``torch.ops.engine.yes_no_head``)."""
    return yes_no_head_op(hidden, last_index, norm_weight, w, float(eps), residual, float(offset))
