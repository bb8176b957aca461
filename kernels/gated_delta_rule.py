"""Gated delta rule (Gated DeltaNet's linear attention) over packed sequences.

Layout (no padding anywhere):
  q, k [T, Hk, Dk], v [T, Hv, Dv] (Hv a multiple of Hk: value head h reads key head
  h // (Hv // Hk)), g (log decay, <= 0) and beta [T, Hv], cu_seqlens [n + 1].
Per sequence and value head, with q and k L2-normalised (``use_qk_l2norm``) and q
scaled by ``scale`` (default Dk^-0.5), all in fp32:
  S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - S_{t-1}^T k_t))^T,   o_t = S_t^T q_t,
with S [Dk, Dv] starting from ``initial_state[state_index[i]]`` (zeros for -1), so a
shared prefix's final state is read in place by all its documents.
``output_final_state`` returns S after each sequence's last token, ``[n, Hv, Dk, Dv]`` fp32.

Chunked form (for prefill). Within a chunk of C tokens, with G = cumsum(g):
  L = strict_tril(beta_i k_i.k_j e^{G_i - G_j}),  T = (I + L)^-1 (blocked: 16 x 16 diagonal blocks
  by forward substitution, merged with 16 x 16 products; see the prepare kernel),
  w = T (beta k e^G),  u = T (beta v),  A = tril(q_i.k_j e^{G_i - G_j}),
and across chunks, in order:
  v' = u - w S,  o = (q e^G) S + A v',  S = e^{G_last} S + (k e^{G_last - G})^T v'.
Every exponent is <= 0. The Triton path runs this as two kernels: a parallel one per
(chunk, head) for T, w, u, A, and a sequential one per (sequence, head, value block)
carrying S in registers. On CPU the same algorithm runs in torch (``_chunked_torch``);
``gated_delta_rule_ref`` is the token-by-token recurrence, the definition above.
"""
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from ._library import engine_op
from ._utils import FLOAT_DTYPES, INDEX_DTYPES, check_tensor, next_pow2, require_triton
from .host import to_device

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference still imports without Triton
    from ._utils import tl_stub as tl, triton_stub as triton

CHUNK = 64


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _prepare(q, k, v, g, beta, scale, use_qk_l2norm):
    """fp32 q (normed, scaled), k (normed), expanded to the value heads."""
    rep = v.shape[1] // k.shape[1]
    q, k = q.float(), k.float()
    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    q = q * (q.shape[-1] ** -0.5 if scale is None else scale)
    if rep > 1:
        q, k = q.repeat_interleave(rep, dim=1), k.repeat_interleave(rep, dim=1)
    return q, k, v.float(), g.float(), beta.float()


def _initial(initial_state, state_index, n, hv, dk, dv, device):
    if initial_state is None:
        return torch.zeros(n, hv, dk, dv, dtype=torch.float32, device=device)
    idx = state_index.long()
    s = initial_state.float().index_select(0, idx.clamp(min=0))
    return torch.where((idx >= 0).view(-1, 1, 1, 1), s, 0.0)


def gated_delta_rule_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    cu_seqlens: torch.Tensor, *, scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None, state_index: Optional[torch.Tensor] = None,
    output_final_state: bool = False, use_qk_l2norm: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The recurrence token by token (all sequences step together; shorter ones drop out)."""
    q, k, vf, g, beta = _prepare(q, k, v, g, beta, scale, use_qk_l2norm)
    cu = cu_seqlens.long().tolist()
    n, (hv, dv), dk = len(cu) - 1, v.shape[1:], q.shape[-1]
    state = _initial(initial_state, state_index, n, hv, dk, dv, v.device)
    out = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    lens = [cu[i + 1] - cu[i] for i in range(n)]
    for t in range(max(lens, default=0)):
        seqs = [i for i in range(n) if lens[i] > t]
        rows = torch.tensor([cu[i] + t for i in seqs], device=v.device)
        sel = torch.tensor(seqs, device=v.device)
        s = state[sel] * g[rows].exp()[..., None, None]  # [m, Hv, Dk, Dv]
        kt, qt = k[rows], q[rows]  # [m, Hv, Dk]
        delta = (vf[rows] - (s * kt[..., None]).sum(-2)) * beta[rows][..., None]  # [m, Hv, Dv]
        s = s + kt[..., None] * delta[..., None, :]
        out[rows] = (s * qt[..., None]).sum(-2)
        state[sel] = s
    return out.to(v.dtype), (state if output_final_state else None)


class ChunkPlan(NamedTuple):
    chunks: torch.Tensor  # [n_chunks, 2] int32: first token, number of tokens
    chunk: int  # tokens per chunk


def pick_chunk(max_seqlen: int) -> int:
    """64 tokens per chunk, fewer (down to 16) when every sequence is shorter (decoding)."""
    return min(CHUNK, max(16, next_pow2(int(max_seqlen))))


def chunk_plan(seq_lens: Sequence[int], device=None, chunk: Optional[int] = None) -> ChunkPlan:
    """Every chunk of every sequence, built on the host from the sequence lengths.

    Once per batch (no device sync), shared by all linear-attention layers.
    """
    chunk = chunk or pick_chunk(max(seq_lens, default=1))
    rows: List[Tuple[int, int]] = []
    off = 0
    for n in seq_lens:
        for s in range(0, n, chunk):
            rows.append((off + s, min(chunk, n - s)))
        off += n
    return ChunkPlan(to_device(rows, torch.int32, device).reshape(-1, 2), chunk)


def _chunked_torch(q, k, v, g, beta, cu_seqlens, *, scale=None, initial_state=None, state_index=None,
                   output_final_state=False, use_qk_l2norm=True, chunk=CHUNK):
    """The chunked algorithm in torch, batched over all chunks of all sequences (the CPU path).

    Sequences are ordered by chunk count, longest first, and chunks laid out by position
    (all first chunks, then all second ones, ...), so step j of the scan reads contiguous
    slices: its chunks and the states of the first m_j sequences.
    """
    q, k, vf, g, beta = _prepare(q, k, v, g, beta, scale, use_qk_l2norm)
    cu = cu_seqlens.long().tolist()
    n, (hv, dv), dk, dev = len(cu) - 1, v.shape[1:], q.shape[-1], v.device
    lens = [cu[i + 1] - cu[i] for i in range(n)]
    counts = [(x + chunk - 1) // chunk for x in lens]
    order = sorted(range(n), key=lambda i: -counts[i])
    steps = []  # (first chunk row, number of sequences) per position j
    starts, sizes = [], []
    for j in range(counts[order[0]] if n else 0):
        seqs = [i for i in order if counts[i] > j]
        steps.append((len(starts), len(seqs)))
        starts += [cu[i] + j * chunk for i in seqs]
        sizes += [min(chunk, lens[i] - j * chunk) for i in seqs]
    order_t = torch.tensor(order, dtype=torch.long, device=dev)
    state = _initial(initial_state, None if state_index is None else state_index.long()[order_t], n, hv, dk, dv, dev)
    out = torch.empty(v.shape, dtype=torch.float32, device=dev)
    nc = len(starts)
    if nc == 0:
        return out.to(v.dtype), (state if output_final_state else None)
    ar = torch.arange(chunk, device=dev)
    size_t = torch.tensor(sizes, device=dev)
    valid = ar[None, :] < size_t[:, None]  # [nc, C]
    idx = torch.where(valid, torch.tensor(starts, device=dev)[:, None] + ar[None, :], 0)

    def gather(x):  # [T, H, ...] -> [nc, H, C, ...]; rows past a chunk's end hold junk
        return x[idx].transpose(1, 2).contiguous()

    qc, kc, vc = gather(q), gather(k), gather(vf)
    # Past a chunk's end: beta = 0 (no update) and g = 0 (every exponent stays <= 0).
    gc, bc = gather(g) * valid[:, None, :], gather(beta) * valid[:, None, :]
    G = gc.cumsum(-1)  # [nc, H, C]
    above = torch.ones(chunk, chunk, dtype=torch.bool, device=dev).triu(1)
    # In-place passes over the [nc, H, C, C] tiles: they dominate this path's time.
    decay = (G[..., :, None] - G[..., None, :]).masked_fill_(above, float("-inf")).exp_()  # [nc, H, C, C]
    lower = (kc @ kc.transpose(-1, -2)).mul_(decay).mul_(bc[..., :, None])  # the solve ignores the upper part
    rhs = torch.cat([kc * (bc * G.exp())[..., None], vc * bc[..., None]], dim=-1)
    w, u = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True).split([dk, dv], dim=-1)
    attn = (qc @ kc.transpose(-1, -2)).mul_(decay)
    q_dec = qc * G.exp()[..., None]
    g_last = G.gather(-1, (size_t - 1).view(nc, 1, 1).expand(nc, hv, 1))  # [nc, H, 1]
    k_dec = kc * ((g_last - G).exp() * valid[:, None, :])[..., None]
    o = torch.empty(nc, hv, chunk, dv, device=dev)
    for first, m in steps:
        c = slice(first, first + m)
        s = state[:m]
        v_new = u[c] - w[c] @ s
        o[c] = q_dec[c] @ s + attn[c] @ v_new
        state[:m] = s * g_last[c].exp()[..., None] + k_dec[c].transpose(-1, -2) @ v_new
    out[idx[valid]] = o.transpose(1, 2)[valid]
    final = None
    if output_final_state:
        final = torch.empty_like(state)
        final[order_t] = state
    return out.to(v.dtype), final


# ----------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------

@triton.jit
def _load_qk(ptr, rows, n_valid, offs_d, stride_t, DK: tl.constexpr, L2NORM: tl.constexpr):
    m = (rows < n_valid)[:, None] & (offs_d < DK)[None, :]
    x = tl.load(ptr + rows[:, None].to(tl.int64) * stride_t + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
    if L2NORM:
        x = x * tl.rsqrt(tl.sum(x * x, axis=1) + 1e-6)[:, None]
    return x


@triton.jit
def _gdr_get16(A, start, n_valid, blk_i, blk_j, h, stride_at, stride_ah):
    """Block (i, j), 16 x 16, of the chunk's [BT, BT] tile of A (rows past the chunk's end read 0)."""
    r = tl.arange(0, 16)
    rows = blk_i * 16 + r
    return tl.load(A + (start + rows.to(tl.int64))[:, None] * stride_at + h * stride_ah + (blk_j * 16 + r)[None, :],
                   mask=(rows < n_valid)[:, None], other=0.0).to(tl.float32)


@triton.jit
def _gdr_put16(A, start, n_valid, blk_i, blk_j, h, t, stride_at, stride_ah):
    """``t`` into block (i, j) of the chunk's tile of A."""
    r = tl.arange(0, 16)
    rows = blk_i * 16 + r
    tl.store(A + (start + rows.to(tl.int64))[:, None] * stride_at + h * stride_ah + (blk_j * 16 + r)[None, :],
             t.to(A.dtype.element_ty), mask=(rows < n_valid)[:, None])


@triton.jit
def _gdr_inv16(lower):
    """(I + L)^-1 of a strictly lower 16 x 16 block: forward substitution, T_i = e_i - sum_{j<i} L_ij T_j."""
    r = tl.arange(0, 16)
    t = tl.where(r[:, None] == r[None, :], 1.0, 0.0)
    for i in tl.static_range(1, 16):
        l_i = tl.sum(tl.where(r[:, None] == i, lower, 0.0), axis=0)  # row i of L, indexed by j
        new = tl.sum(l_i[:, None] * t, axis=0)  # sum_j L_ij T_j
        t = tl.where(r[:, None] == i, t - new[None, :], t)
    return t


@triton.jit
def _gdr_mm16(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _gdr_chunk_prepare_kernel(
    Q, K, V, G, BETA, PLAN, W, U, A, GC,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_gt, stride_bt,
    stride_wt, stride_wh, stride_ut, stride_uh, stride_at, stride_ah, stride_gct,
    scale,
    GROUP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, L2NORM: tl.constexpr,
    BT: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, PREC_STATE: tl.constexpr,
    PREC_OUT: tl.constexpr,
):
    # One chunk of one value head: T = (I + L)^-1, then w = T (beta k e^G), u = T (beta v), A and G,
    # token-aligned rows. Three phases meet in the chunk's [BT, BT] tile of A (the program's own rows,
    # in L1 / L2), so that no phase holds another's tiles in registers:
    #   1. L = strict_tril(beta_i k_i.k_j e^{G_i - G_j}) as one [BT, BT] product, into the tile;
    #   2. the blocked solve on 16 x 16 blocks: each diagonal block of (I + L) inverted by forward
    #      substitution (15 steps; the blocks independent), then T_ij = -T_ii sum_{j<=m<i} L_im T_mj
    #      (i > j) with fp32 16 x 16 products, each T block in place of L's (zeros above the diagonal);
    #   3. w and u as [BT, BT] x [BT, D] products with T, and A over the tile.
    pid, h = tl.program_id(0), tl.program_id(1)
    start = tl.load(PLAN + 2 * pid).to(tl.int64)
    n_valid = tl.load(PLAN + 2 * pid + 1)
    rows = tl.arange(0, BT)
    r_mask = rows < n_valid
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    kh = h // GROUP
    trow = (start + rows.to(tl.int64))[:, None]
    a_ptrs = A + trow * stride_at + h * stride_ah + rows[None, :]
    g = tl.load(G + (start + rows) * stride_gt + h, mask=r_mask, other=0.0).to(tl.float32)
    b = tl.load(BETA + (start + rows) * stride_bt + h, mask=r_mask, other=0.0).to(tl.float32)
    gcum = tl.cumsum(g, 0)

    # 1. L
    k = _load_qk(K + start * stride_kt + kh * stride_kh, rows, n_valid, offs_dk, stride_kt, DK, L2NORM)
    below = rows[:, None] > rows[None, :]
    kk = tl.dot(k, tl.trans(k), input_precision=PREC_STATE)
    lower = tl.where(below, kk * tl.exp(tl.where(below, gcum[:, None] - gcum[None, :], 0.0)) * b[:, None], 0.0)
    tl.store(a_ptrs, lower.to(A.dtype.element_ty), mask=r_mask[:, None])
    tl.debug_barrier()  # L is written before any thread reads its blocks

    # 2a. The diagonal blocks, independent of one another (their substitutions interleave).
    t00 = _gdr_inv16(_gdr_get16(A, start, n_valid, 0, 0, h, stride_at, stride_ah))
    if BT >= 32:
        t11 = _gdr_inv16(_gdr_get16(A, start, n_valid, 1, 1, h, stride_at, stride_ah))
    if BT == 64:
        t22 = _gdr_inv16(_gdr_get16(A, start, n_valid, 2, 2, h, stride_at, stride_ah))
        t33 = _gdr_inv16(_gdr_get16(A, start, n_valid, 3, 3, h, stride_at, stride_ah))
    tl.debug_barrier()  # L_ii is read before T_ii takes its place
    _gdr_put16(A, start, n_valid, 0, 0, h, t00, stride_at, stride_ah)
    if BT >= 32:
        _gdr_put16(A, start, n_valid, 1, 1, h, t11, stride_at, stride_ah)
    if BT == 64:
        _gdr_put16(A, start, n_valid, 2, 2, h, t22, stride_at, stride_ah)
        _gdr_put16(A, start, n_valid, 3, 3, h, t33, stride_at, stride_ah)
    tl.debug_barrier()
    # 2b. Row by row of blocks, T_ij = -T_ii sum_{j<=m<i} L_im T_mj: a row reads its own L blocks and
    # the T blocks of the rows above, all from the tile, so that few 16 x 16 blocks are live at once.
    if BT >= 32:
        t10 = -_gdr_mm16(_gdr_get16(A, start, n_valid, 1, 1, h, stride_at, stride_ah),
                         _gdr_mm16(_gdr_get16(A, start, n_valid, 1, 0, h, stride_at, stride_ah),
                                   _gdr_get16(A, start, n_valid, 0, 0, h, stride_at, stride_ah)))
        tl.debug_barrier()
        _gdr_put16(A, start, n_valid, 1, 0, h, t10, stride_at, stride_ah)
        tl.debug_barrier()
    if BT == 64:
        l20 = _gdr_get16(A, start, n_valid, 2, 0, h, stride_at, stride_ah)
        l21 = _gdr_get16(A, start, n_valid, 2, 1, h, stride_at, stride_ah)
        acc0 = _gdr_mm16(l20, _gdr_get16(A, start, n_valid, 0, 0, h, stride_at, stride_ah))
        acc0 += _gdr_mm16(l21, _gdr_get16(A, start, n_valid, 1, 0, h, stride_at, stride_ah))
        acc1 = _gdr_mm16(l21, _gdr_get16(A, start, n_valid, 1, 1, h, stride_at, stride_ah))
        t22 = _gdr_get16(A, start, n_valid, 2, 2, h, stride_at, stride_ah)
        t20 = -_gdr_mm16(t22, acc0)
        t21 = -_gdr_mm16(t22, acc1)
        tl.debug_barrier()
        _gdr_put16(A, start, n_valid, 2, 0, h, t20, stride_at, stride_ah)
        _gdr_put16(A, start, n_valid, 2, 1, h, t21, stride_at, stride_ah)
        tl.debug_barrier()
        l30 = _gdr_get16(A, start, n_valid, 3, 0, h, stride_at, stride_ah)
        l31 = _gdr_get16(A, start, n_valid, 3, 1, h, stride_at, stride_ah)
        l32 = _gdr_get16(A, start, n_valid, 3, 2, h, stride_at, stride_ah)
        t33 = _gdr_get16(A, start, n_valid, 3, 3, h, stride_at, stride_ah)
        acc0 = _gdr_mm16(l30, _gdr_get16(A, start, n_valid, 0, 0, h, stride_at, stride_ah))
        acc0 += _gdr_mm16(l31, _gdr_get16(A, start, n_valid, 1, 0, h, stride_at, stride_ah))
        acc0 += _gdr_mm16(l32, _gdr_get16(A, start, n_valid, 2, 0, h, stride_at, stride_ah))
        t30 = -_gdr_mm16(t33, acc0)
        acc1 = _gdr_mm16(l31, _gdr_get16(A, start, n_valid, 1, 1, h, stride_at, stride_ah))
        acc1 += _gdr_mm16(l32, _gdr_get16(A, start, n_valid, 2, 1, h, stride_at, stride_ah))
        t31 = -_gdr_mm16(t33, acc1)
        t32 = -_gdr_mm16(t33, _gdr_mm16(l32, _gdr_get16(A, start, n_valid, 2, 2, h, stride_at, stride_ah)))
        tl.debug_barrier()
        _gdr_put16(A, start, n_valid, 3, 0, h, t30, stride_at, stride_ah)
        _gdr_put16(A, start, n_valid, 3, 1, h, t31, stride_at, stride_ah)
        _gdr_put16(A, start, n_valid, 3, 2, h, t32, stride_at, stride_ah)
    tl.debug_barrier()  # T is written (zeros above the diagonal: L's) before any thread reads the tile

    # 3. A, w, u: T read once into registers; k, q and v reloaded (L1 / L2), each tile dead once used.
    tinv = tl.load(a_ptrs, mask=r_mask[:, None], other=0.0).to(tl.float32)
    tl.debug_barrier()  # every thread has read T before A overwrites it
    k = _load_qk(K + start * stride_kt + kh * stride_kh, rows, n_valid, offs_dk, stride_kt, DK, L2NORM)
    w = tl.dot(tinv, k * (b * tl.exp(gcum))[:, None], input_precision=PREC_STATE)
    tl.store(W + trow * stride_wt + h * stride_wh + offs_dk[None, :], w.to(W.dtype.element_ty),
             mask=r_mask[:, None] & (offs_dk < DK)[None, :])
    q = _load_qk(Q + start * stride_qt + kh * stride_qh, rows, n_valid, offs_dk, stride_qt, DK, L2NORM) * scale
    causal = rows[:, None] >= rows[None, :]
    attn = tl.dot(q, tl.trans(k), input_precision=PREC_OUT)
    attn = tl.where(causal, attn * tl.exp(tl.where(causal, gcum[:, None] - gcum[None, :], 0.0)), 0.0)
    tl.store(a_ptrs, attn.to(A.dtype.element_ty), mask=r_mask[:, None])
    tl.debug_barrier()  # a fence for the schedulers: v's load is not hoisted to where k and q live
    v = tl.load(V + trow * stride_vt + h * stride_vh + offs_dv[None, :],
                mask=r_mask[:, None] & (offs_dv < DV)[None, :], other=0.0).to(tl.float32)
    u = tl.dot(tinv, v * b[:, None], input_precision=PREC_STATE)
    tl.store(U + trow * stride_ut + h * stride_uh + offs_dv[None, :], u.to(U.dtype.element_ty),
             mask=r_mask[:, None] & (offs_dv < DV)[None, :])
    tl.store(GC + (start + rows) * stride_gct + h, gcum, mask=r_mask)


@triton.jit
def _gdr_chunk_scan_kernel(
    Q, K, W, U, A, GC, O, CU, STATE, STATE_INDEX, FINAL,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_wt, stride_wh, stride_ut, stride_uh,
    stride_at, stride_ah, stride_gct, stride_ot, stride_oh,
    stride_s0, stride_s1, stride_s2, stride_f0, stride_f1, stride_f2,
    scale,
    GROUP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, L2NORM: tl.constexpr,
    HAS_STATE: tl.constexpr, STORE_FINAL: tl.constexpr,
    BT: tl.constexpr, BLOCK_DK: tl.constexpr, BV: tl.constexpr, PREC_STATE: tl.constexpr,
    PREC_OUT: tl.constexpr,
):
    # One sequence x value head x BV value columns; S [Dk, BV] lives in registers
    # (the columns of S evolve independently, so value blocks split the work).
    n, h, pv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(CU + n).to(tl.int64)
    eos = tl.load(CU + n + 1).to(tl.int64)
    rows = tl.arange(0, BT)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_v = pv * BV + tl.arange(0, BV)
    dk_mask = offs_dk < DK
    v_mask = offs_v < DV
    kh = h // GROUP
    s = tl.zeros((BLOCK_DK, BV), dtype=tl.float32)
    if HAS_STATE:
        slot = tl.load(STATE_INDEX + n).to(tl.int64)
        s = tl.load(STATE + slot * stride_s0 + h * stride_s1 + offs_dk[:, None] * stride_s2 + offs_v[None, :],
                    mask=(slot >= 0) & dk_mask[:, None] & v_mask[None, :], other=0.0)
    for cs in range(bos, eos, BT):
        n_valid = eos - cs
        r_mask = rows < n_valid
        trow = (cs + rows.to(tl.int64))[:, None]
        q = _load_qk(Q + cs * stride_qt + kh * stride_qh, rows, n_valid, offs_dk, stride_qt, DK, L2NORM) * scale
        k = _load_qk(K + cs * stride_kt + kh * stride_kh, rows, n_valid, offs_dk, stride_kt, DK, L2NORM)
        gcum = tl.load(GC + (cs + rows) * stride_gct + h, mask=r_mask, other=0.0)
        g_last = tl.sum(tl.where(rows == tl.minimum(n_valid, BT) - 1, gcum, 0.0), axis=0)
        w = tl.load(W + trow * stride_wt + h * stride_wh + offs_dk[None, :],
                    mask=r_mask[:, None] & dk_mask[None, :], other=0.0).to(tl.float32)
        u = tl.load(U + trow * stride_ut + h * stride_uh + offs_v[None, :],
                    mask=r_mask[:, None] & v_mask[None, :], other=0.0)
        attn = tl.load(A + trow * stride_at + h * stride_ah + rows[None, :], mask=r_mask[:, None],
                       other=0.0).to(tl.float32)
        v_new = u - tl.dot(w, s, input_precision=PREC_STATE)  # [BT, BV]
        o = tl.dot(q * tl.exp(gcum)[:, None], s, input_precision=PREC_OUT)
        o = tl.dot(attn, v_new, o, input_precision=PREC_OUT)
        tl.store(O + trow * stride_ot + h * stride_oh + offs_v[None, :], o.to(O.dtype.element_ty),
                 mask=r_mask[:, None] & v_mask[None, :])
        k_dec = k * tl.exp(g_last - gcum)[:, None]  # rows past the end have k = 0
        s = s * tl.exp(g_last) + tl.dot(tl.trans(k_dec), v_new, input_precision=PREC_STATE)
    if STORE_FINAL:  # n * stride_f0 passes 2^31 at 8,192 sequences of [16, 128, 128]: index in int64
        fin = FINAL + n.to(tl.int64) * stride_f0 + h * stride_f1
        tl.store(fin + offs_dk[:, None] * stride_f2 + offs_v[None, :], s,
                 mask=dk_mask[:, None] & v_mask[None, :])


def deltanet_config(chunk: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Warps, stages and dot precisions of the two kernels (by compile-time resources; not yet timed).

    Stages: Triton's default (3) keeps three chunks' q, k, w, u and attention tiles of the scan in
    shared memory: at chunk 64 that is 287,744 B on sm_90 and 238,592 B on sm_80, over both limits.
    Warps and stages are the spill-free configs of kernels/aot.py where one exists (chunk 64
    scan: sm_90 4 warps x 2 stages, spill-free when scoring; sm_80 8 warps x 1 stage).

    Precision (fp32 operands; bf16/fp16 inputs): every product runs "tf32". bench/deltanet_precision.py
    emulates the GPU's rounding on a CPU (Qwen3.5 head dims, chunk 64): relative to fp64, TF32 gives
    5-7e-4 in the output and about 6e-4 in the final state, flat from 512 to 4,096 tokens (the decay
    contracts the error), against bf16's own 2e-3 rounding of the output. "tf32x3" on the products that
    carry the state (k k^T, w, u, w S, k^T v') brings the state to 3e-7, but it does not fit: the
    prepare kernel then needs 196,608 B of shared memory on sm_80 (limit 166,912) and the scan spills
    up to 1.9 KB (kernels/aot.py). The two precisions stay separate constexprs so a GPU session
    can time the alternative. fp32 inputs run "ieee" throughout.

    Intermediates (``inter_dtype``, the storage of w and A; u is always fp32): fp16 storage would cost
    no accuracy (the emulation: 6.2e-4 output, 6.0e-4 state, the same as fp32 storage, since the scan
    rounds w and A to TF32's 10 mantissa bits anyway; bf16 storage: 4.6e-3 / 2.4e-3, past bf16's own
    rounding), but converting the fp16 tiles in the scan spills up to 1.3 KB on sm_90 (kernels/aot.py), so
    fp32 it is, until a GPU session can time the trade.
    """
    if dtype == torch.float32:
        prec_state = prec_out = "ieee"
    else:
        prec_state = prec_out = "tf32"
    major = torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 9
    scan = {16: (8, 3), 32: (8, 3), 64: (4, 2) if major >= 9 else (8, 1)}[chunk]
    return dict(prepare_warps=8, scan_warps=scan[0], scan_stages=scan[1], prec_state=prec_state,
                prec_out=prec_out, inter_dtype=torch.float32)


def gated_delta_rule_triton(
    q, k, v, g, beta, cu_seqlens, *, scale: Optional[float] = None, initial_state=None, state_index=None,
    output_final_state: bool = False, use_qk_l2norm: bool = True, plan: Optional[ChunkPlan] = None,
):
    """Triton chunked gated delta rule over packed sequences; see the module docstring.

    ``plan``: the batch's :func:`chunk_plan` (built from ``cu_seqlens`` when omitted,
    which syncs with the device); it also fixes the chunk size (16, 32 or 64).
    """
    require_triton()
    check_tensor(q, "q", ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor(k, "k", ndim=3, dtypes=(q.dtype,), device=q.device)
    check_tensor(v, "v", ndim=3, dtypes=(q.dtype,), device=q.device)
    check_tensor(g, "g", ndim=2, dtypes=FLOAT_DTYPES, device=q.device)
    check_tensor(beta, "beta", ndim=2, dtypes=FLOAT_DTYPES, device=q.device)
    check_tensor(cu_seqlens, "cu_seqlens", ndim=1, dtypes=INDEX_DTYPES, device=q.device)
    n_tok, hk, dk = q.shape
    hv, dv = v.shape[1:]
    if k.shape != q.shape or v.shape[0] != n_tok or hv % hk:
        raise ValueError(f"q {tuple(q.shape)} / k {tuple(k.shape)} must be [T, Hk, Dk] and v {tuple(v.shape)} "
                         f"[T, Hv, Dv] with Hv a multiple of Hk")
    if tuple(g.shape) != (n_tok, hv) or tuple(beta.shape) != (n_tok, hv):
        raise ValueError(f"g {tuple(g.shape)} and beta {tuple(beta.shape)} must be [T={n_tok}, Hv={hv}]")
    has_state = initial_state is not None
    if has_state:
        check_tensor(initial_state, "initial_state", ndim=4, dtypes=(torch.float32,), device=q.device)
        if tuple(initial_state.shape[1:]) != (hv, dk, dv):
            raise ValueError(f"initial_state {tuple(initial_state.shape)} must be [S, {hv}, {dk}, {dv}] fp32")
        if state_index is None:
            raise ValueError("initial_state needs state_index (one slot per sequence, -1 for none)")
        check_tensor(state_index, "state_index", ndim=1, dtypes=INDEX_DTYPES, device=q.device)
        if state_index.numel() != cu_seqlens.numel() - 1:
            raise ValueError("state_index needs one entry per sequence")
        if initial_state.stride(3) != 1:
            initial_state = initial_state.contiguous()
    n = cu_seqlens.numel() - 1
    q, k, v, g, beta = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, g, beta))
    out = torch.empty((n_tok, hv, dv), dtype=v.dtype, device=q.device)
    final = torch.empty((n, hv, dk, dv), dtype=torch.float32, device=q.device) if output_final_state else None
    if n <= 0:
        return out, final
    cu = cu_seqlens.contiguous()
    if plan is None:
        c = cu.tolist()
        plan = chunk_plan([c[i + 1] - c[i] for i in range(n)], q.device)
    plan, chunk = plan.chunks, plan.chunk
    if chunk not in (16, 32, 64):
        raise ValueError(f"the plan's chunk must be 16, 32 or 64, got {chunk}")
    scale = dk ** -0.5 if scale is None else float(scale)
    block_dk, block_dv = max(16, next_pow2(dk)), max(16, next_pow2(dv))
    cfg = deltanet_config(chunk, q.dtype, q.device)
    prec = dict(PREC_STATE=cfg["prec_state"], PREC_OUT=cfg["prec_out"])
    small = max(block_dk, block_dv) < 128  # several [C, D] fp32 tiles live at once: 8 warps at D 128
    f32 = dict(dtype=torch.float32, device=q.device)
    # Chunk-local products, token-aligned (row t holds token t's row of its chunk).
    # w and A in cfg["inter_dtype"] (fp16 under bf16 / fp16 inputs: the scan rounds them to TF32's
    # 10 mantissa bits anyway), u in fp32 (its range follows v's, and T's growth; not bounded for fp16).
    inter = dict(dtype=cfg["inter_dtype"], device=q.device)
    w = torch.empty((n_tok, hv, dk), **inter)
    u = torch.empty((n_tok, hv, dv), **f32)
    attn = torch.empty((n_tok, hv, chunk), **inter)
    gc = torch.empty((n_tok, hv), **f32)
    if plan.shape[0] > 0:
        _gdr_chunk_prepare_kernel[(plan.shape[0], hv)](
            q, k, v, g, beta, plan, w, u, attn, gc,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), g.stride(0),
            beta.stride(0), w.stride(0), w.stride(1), u.stride(0), u.stride(1), attn.stride(0), attn.stride(1),
            gc.stride(0), scale,
            GROUP=hv // hk, DK=dk, DV=dv, L2NORM=bool(use_qk_l2norm), BT=chunk, BLOCK_DK=block_dk,
            BLOCK_DV=block_dv, num_warps=4 if small else cfg["prepare_warps"], **prec,
        )
    bv = min(block_dv, 32)
    state = initial_state if has_state else w
    s_strides = (state.stride(0), state.stride(1), state.stride(2)) if has_state else (0, 0, 0)
    sidx = state_index.contiguous() if has_state else cu
    if output_final_state and not has_state:
        # A prefix being captured (a final state from none) runs the state-reading variant with every
        # slot -1, so nothing is read: the no-state variant of it spills on sm_90 (kernels/aot.py), and
        # one variant fewer compiles.
        sidx = torch.full((n,), -1, dtype=torch.int32, device=q.device)
        has_state = True
    fin = final if output_final_state else w
    f_strides = (fin.stride(0), fin.stride(1), fin.stride(2)) if output_final_state else (0, 0, 0)
    _gdr_chunk_scan_kernel[(n, hv, triton.cdiv(dv, bv))](
        q, k, w, u, attn, gc, out, cu, state, sidx, fin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), w.stride(0), w.stride(1), u.stride(0), u.stride(1),
        attn.stride(0), attn.stride(1), gc.stride(0), out.stride(0), out.stride(1), *s_strides, *f_strides,
        scale,
        GROUP=hv // hk, DK=dk, DV=dv, L2NORM=bool(use_qk_l2norm), HAS_STATE=has_state,
        STORE_FINAL=bool(output_final_state), BT=chunk, BLOCK_DK=block_dk, BV=bv, **prec,
        num_warps=4 if small else cfg["scan_warps"], num_stages=cfg["scan_stages"],
    )
    return out, final


def _no_state(out: torch.Tensor, final: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    return out, (final if final is not None else out.new_empty((0,), dtype=torch.float32))


def _gdr_op_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    cu_seqlens: torch.Tensor, scale: Optional[float] = None, initial_state: Optional[torch.Tensor] = None,
    state_index: Optional[torch.Tensor] = None, output_final_state: bool = False, use_qk_l2norm: bool = True,
    max_seqlen: Optional[int] = None, chunks: Optional[torch.Tensor] = None, chunk: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    # The recurrence for one-token steps (decoding), the chunked algorithm otherwise.
    kw = dict(scale=scale, initial_state=initial_state, state_index=state_index,
              output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm)
    if max_seqlen == 1:
        return _no_state(*gated_delta_rule_ref(q, k, v, g, beta, cu_seqlens, **kw))
    return _no_state(*_chunked_torch(q, k, v, g, beta, cu_seqlens, **kw))


def _gdr_op_triton(q, k, v, g, beta, cu_seqlens, scale=None, initial_state=None, state_index=None,
                   output_final_state=False, use_qk_l2norm=True, max_seqlen=None, chunks=None, chunk=0):
    plan = ChunkPlan(chunks, chunk) if chunks is not None else None
    return _no_state(*gated_delta_rule_triton(
        q, k, v, g, beta, cu_seqlens, scale=scale, initial_state=initial_state, state_index=state_index,
        output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm, plan=plan))


def _gdr_op_fake(q, k, v, g, beta, cu_seqlens, output_final_state=False, **kw):
    n, hv, dk, dv = cu_seqlens.shape[0] - 1, v.shape[1], q.shape[2], v.shape[2]
    final = q.new_empty((n, hv, dk, dv) if output_final_state else (0,), dtype=torch.float32)
    return torch.empty_like(v), final


gated_delta_rule_op = engine_op("gated_delta_rule", _gdr_op_ref, _gdr_op_triton, _gdr_op_fake)


def gated_delta_rule(
    q, k, v, g, beta, cu_seqlens, *, scale: Optional[float] = None, initial_state=None, state_index=None,
    output_final_state: bool = False, use_qk_l2norm: bool = True, max_seqlen: Optional[int] = None,
    plan: Optional[ChunkPlan] = None,
):
    """Gated delta rule over packed sequences (``torch.ops.engine.gated_delta_rule``); returns
    ``(o [T, Hv, Dv], final state [n, Hv, Dk, Dv] fp32 or None)``.

    CUDA: the Triton chunked kernels. CPU: the recurrence for one-token steps
    (decoding), the chunked algorithm in torch otherwise.
    """
    out, final = gated_delta_rule_op(
        q, k, v, g, beta, cu_seqlens, scale=None if scale is None else float(scale), initial_state=initial_state,
        state_index=state_index, output_final_state=bool(output_final_state), use_qk_l2norm=bool(use_qk_l2norm),
        max_seqlen=None if max_seqlen is None else int(max_seqlen),
        chunks=plan.chunks if plan is not None else None, chunk=plan.chunk if plan is not None else 0)
    return out, (final if output_final_state else None)
