"""Causal depthwise conv1d over packed sequences (Gated DeltaNet's short convolution).

Layout (no padding anywhere):
  x [T, C] (tokens of all sequences, channels last; row stride free),
  weight [C, K], cu_seqlens [n + 1];
  out[t, c] = act(sum_j weight[c, j] * x[t - (K - 1) + j, c]), where rows before the
  start of t's sequence come from that sequence's initial state, or are zeros.
Conv state (as transformers and causal-conv1d keep it): the last K - 1 inputs of a
sequence, oldest first, ``[C, K - 1]``. ``initial_state [S, C, K - 1]`` holds S states
and ``state_index [n]`` picks sequence i's (-1: zeros), so a shared prefix's state is
read in place by all its documents. ``output_final_state`` returns ``[n, C, K - 1]``.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._library import engine_op
from ._utils import FLOAT_DTYPES, INDEX_DTYPES, check_tensor, next_pow2, require_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference still imports without Triton
    from ._utils import tl_stub as tl, triton_stub as triton


def _source_rows(cu: torch.Tensor, seq_of: torch.Tensor, pos: torch.Tensor, width: int, n_tokens: int,
                 state_index: Optional[torch.Tensor]):
    """Rows of [x ; initial states flattened ; a zero row] read at sequence position ``pos`` (may be < 0)."""
    start = cu[seq_of]
    row = start + pos
    if state_index is None:
        return torch.where(pos >= 0, row, torch.full_like(row, -1))  # -1: the zero row
    slot = state_index.long()[seq_of]
    from_state = n_tokens + slot * width + (pos + width)  # column pos + (K - 1) of its state
    from_state = torch.where(slot >= 0, from_state, torch.full_like(row, -1))
    return torch.where(pos >= 0, row, from_state)


def causal_conv1d_ref(
    x: torch.Tensor,  # [T, C]
    weight: torch.Tensor,  # [C, K]
    cu_seqlens: torch.Tensor,  # [n + 1]
    bias: Optional[torch.Tensor] = None,  # [C]
    initial_state: Optional[torch.Tensor] = None,  # [S, C, K - 1]
    state_index: Optional[torch.Tensor] = None,  # [n], -1: no state
    activation: Optional[str] = "silu",
    output_final_state: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    # Gather formulation, vectorised over all tokens: one [T, C] gather per tap.
    n_tok, chans = x.shape
    width = weight.shape[1] - 1
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    n = lens.numel()
    seq_of = torch.repeat_interleave(torch.arange(n, device=x.device), lens, output_size=n_tok)
    pos = torch.arange(n_tok, device=x.device) - cu[seq_of]
    parts = [x.float()]
    if initial_state is not None:
        parts.append(initial_state.float().transpose(1, 2).reshape(-1, chans))  # [S * (K-1), C]
    else:
        state_index = None
    parts.append(x.new_zeros(1, chans, dtype=torch.float32))
    src = torch.cat(parts)
    w = weight.float()
    out = torch.zeros(n_tok, chans, dtype=torch.float32, device=x.device) if bias is None else \
        bias.float().expand(n_tok, chans).clone()
    for j in range(width + 1):
        out += src[_source_rows(cu, seq_of, pos - width + j, width, n_tok, state_index)] * w[:, j]
    if activation == "silu":
        out = F.silu(out)
    final = None
    if output_final_state:
        seqs = torch.arange(n, device=x.device).repeat_interleave(width)
        tail = lens.repeat_interleave(width) - width + torch.arange(width, device=x.device).repeat(n)
        rows = _source_rows(cu, seqs, tail, width, n_tok, state_index)
        final = src[rows].view(n, width, chans).transpose(1, 2).to(x.dtype).contiguous()  # [n, C, K - 1]
    return out.to(x.dtype), final


@triton.jit(do_not_specialize=["n_tokens"])  # batch-dependent: one binary for every batch
def _causal_conv1d_kernel(
    X, W, B, OUT, CU, SEQ_OF, STATE, STATE_INDEX,
    n_tokens, n_chans,
    stride_xt, stride_wc, stride_ot, stride_s0, stride_s1, stride_s2,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, SILU: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One [BLOCK_T tokens, BLOCK_C channels] tile; each token knows its sequence.
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    t_mask = offs_t < n_tokens
    c_mask = offs_c < n_chans
    seq = tl.load(SEQ_OF + offs_t, mask=t_mask, other=0)
    pos = offs_t - tl.load(CU + seq, mask=t_mask, other=0)
    if HAS_STATE:
        slot = tl.load(STATE_INDEX + seq, mask=t_mask, other=-1).to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(B + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    rows = offs_t.to(tl.int64)
    for j in tl.static_range(K):
        back = K - 1 - j
        src_pos = pos - back
        inside = src_pos >= 0
        m = (t_mask & inside)[:, None] & c_mask[None, :]
        xv = tl.load(X + (rows - back)[:, None] * stride_xt + offs_c[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_STATE:
            ms = (t_mask & (src_pos < 0) & (slot >= 0))[:, None] & c_mask[None, :]
            col = src_pos + (K - 1)
            sv = tl.load(STATE + slot[:, None] * stride_s0 + offs_c[None, :] * stride_s1 + col[:, None] * stride_s2,
                         mask=ms, other=0.0).to(tl.float32)
            xv = xv + sv  # disjoint masks: one of the two is zero
        wj = tl.load(W + offs_c * stride_wc + j, mask=c_mask, other=0.0).to(tl.float32)
        acc += xv * wj[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(OUT + rows[:, None] * stride_ot + offs_c[None, :], acc.to(OUT.dtype.element_ty),
             mask=t_mask[:, None] & c_mask[None, :])


@triton.jit
def _conv_final_state_kernel(
    X, CU, STATE, STATE_INDEX, FINAL,
    n_chans,
    stride_xt, stride_s0, stride_s1, stride_s2, stride_f0, stride_f1,
    K: tl.constexpr, HAS_STATE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Sequence n's last K - 1 inputs (reaching into its initial state when shorter).
    n = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < n_chans
    start = tl.load(CU + n).to(tl.int64)
    length = tl.load(CU + n + 1).to(tl.int64) - start
    if HAS_STATE:
        slot = tl.load(STATE_INDEX + n).to(tl.int64)
    for i in tl.static_range(K - 1):
        src_pos = length - (K - 1) + i
        val = tl.load(X + (start + src_pos) * stride_xt + offs_c, mask=c_mask & (src_pos >= 0), other=0.0)
        if HAS_STATE:
            sv = tl.load(STATE + slot * stride_s0 + offs_c * stride_s1 + (src_pos + K - 1) * stride_s2,
                         mask=c_mask & (src_pos < 0) & (slot >= 0), other=0.0)
            val = val + sv.to(val.dtype)
        # n * stride_f0 in int64: it passes 2^31 for large batches of wide channels
        tl.store(FINAL + n.to(tl.int64) * stride_f0 + offs_c * stride_f1 + i, val.to(FINAL.dtype.element_ty),
                 mask=c_mask)


def causal_conv1d_triton(x, weight, cu_seqlens, bias=None, initial_state=None, state_index=None,
                         activation: Optional[str] = "silu", output_final_state: bool = False,
                         seq_of: Optional[torch.Tensor] = None):
    """Triton causal depthwise conv1d over packed sequences; see the module docstring.

    ``seq_of [T]`` (int32, each token's sequence) may be passed in when it is
    shared by several layers; it is derived from ``cu_seqlens`` otherwise.
    """
    require_triton()
    check_tensor(x, "x", ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(weight, "weight", ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
    check_tensor(cu_seqlens, "cu_seqlens", ndim=1, dtypes=INDEX_DTYPES, device=x.device)
    n_tok, chans = x.shape
    if weight.shape[0] != chans:
        raise ValueError(f"weight {tuple(weight.shape)} must be [C={chans}, K]")
    k = weight.shape[1]
    if k < 2:
        raise ValueError("the kernel width must be at least 2")
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
    if bias is not None:
        check_tensor(bias, "bias", ndim=1, device=x.device)
    has_state = initial_state is not None
    if has_state:
        check_tensor(initial_state, "initial_state", ndim=3, dtypes=FLOAT_DTYPES, device=x.device)
        if tuple(initial_state.shape[1:]) != (chans, k - 1):
            raise ValueError(f"initial_state {tuple(initial_state.shape)} must be [S, {chans}, {k - 1}]")
        if state_index is None:
            raise ValueError("initial_state needs state_index (one slot per sequence, -1 for none)")
        check_tensor(state_index, "state_index", ndim=1, dtypes=INDEX_DTYPES, device=x.device)
        if state_index.numel() != cu_seqlens.numel() - 1:
            raise ValueError("state_index needs one entry per sequence")
    if x.stride(1) != 1:
        x = x.contiguous()
    weight = weight.contiguous()
    n = cu_seqlens.numel() - 1
    out = torch.empty((n_tok, chans), dtype=x.dtype, device=x.device)
    final = torch.empty((n, chans, k - 1), dtype=x.dtype, device=x.device) if output_final_state else None
    if n <= 0 or chans == 0:
        return out, final
    cu = cu_seqlens.contiguous()
    state = initial_state if has_state else x
    sidx = state_index.contiguous() if has_state else cu
    s_strides = (state.stride(0), state.stride(1), state.stride(2)) if has_state else (0, 0, 0)
    block_c = min(128, max(16, next_pow2(chans)))
    if n_tok > 0:
        if seq_of is None:
            lens = (cu[1:] - cu[:-1]).long()
            seq_of = torch.repeat_interleave(torch.arange(n, device=x.device, dtype=torch.int32), lens,
                                             output_size=n_tok)
        block_t = 32
        _causal_conv1d_kernel[(triton.cdiv(n_tok, block_t), triton.cdiv(chans, block_c))](
            x, weight, bias if bias is not None else weight, out, cu, seq_of, state, sidx,
            n_tok, chans, x.stride(0), weight.stride(0), out.stride(0), *s_strides,
            K=k, HAS_BIAS=bias is not None, HAS_STATE=has_state, SILU=activation == "silu",
            # 8 warps with an initial state: 4 spill 40 B on sm_90 (kernels/aot.py); 8 spill none.
            BLOCK_T=block_t, BLOCK_C=block_c, num_warps=8 if has_state else 4,
        )
    if output_final_state:
        _conv_final_state_kernel[(n, triton.cdiv(chans, block_c))](
            x, cu, state, sidx, final, chans, x.stride(0), *s_strides, final.stride(0), final.stride(1),
            K=k, HAS_STATE=has_state, BLOCK_C=block_c, num_warps=1,
        )
    return out, final


def _conv_op_ref(x: torch.Tensor, weight: torch.Tensor, cu_seqlens: torch.Tensor,
                 bias: Optional[torch.Tensor] = None, initial_state: Optional[torch.Tensor] = None,
                 state_index: Optional[torch.Tensor] = None, activation: Optional[str] = "silu",
                 output_final_state: bool = False, seq_of: Optional[torch.Tensor] = None,
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    out, final = causal_conv1d_ref(x, weight, cu_seqlens, bias, initial_state, state_index, activation,
                                   output_final_state)
    return out, (final if final is not None else x.new_empty((0,)))


def _conv_op_triton(x, weight, cu_seqlens, bias=None, initial_state=None, state_index=None,
                    activation="silu", output_final_state=False, seq_of=None):
    out, final = causal_conv1d_triton(x, weight, cu_seqlens, bias, initial_state, state_index, activation,
                                      output_final_state, seq_of)
    return out, (final if final is not None else x.new_empty((0,)))


def _conv_op_fake(x, weight, cu_seqlens, bias=None, initial_state=None, state_index=None,
                  activation="silu", output_final_state=False, seq_of=None):
    shape = (cu_seqlens.shape[0] - 1, x.shape[1], weight.shape[1] - 1) if output_final_state else (0,)
    return torch.empty_like(x), x.new_empty(shape)


causal_conv1d_op = engine_op("causal_conv1d", _conv_op_ref, _conv_op_triton, _conv_op_fake)


def causal_conv1d(x, weight, cu_seqlens, bias=None, initial_state=None, state_index=None,
                  activation: Optional[str] = "silu", output_final_state: bool = False, seq_of=None):
    """Causal depthwise conv1d (+ SiLU) over packed sequences (``torch.ops.engine.causal_conv1d``);
    returns ``(out [T, C], final state [n, C, K-1] or None)``."""
    out, final = causal_conv1d_op(x, weight, cu_seqlens, bias, initial_state, state_index, activation,
                                  bool(output_final_state), seq_of)
    return out, (final if output_final_state else None)
