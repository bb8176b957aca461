"""Varlen attention forward over packed sequences, with an optional shared prefix.

Layout (no padding anywhere):
  q [total_q, Hq, D], k/v [total_k, Hkv, D], Hq a multiple of Hkv (GQA);
  sequence i owns q rows cu_seqlens_q[i]:cu_seqlens_q[i+1] and k/v rows
  cu_seqlens_k[i]:cu_seqlens_k[i+1].
Causal masking is bottom-right aligned: query row r of a sequence with Lq
queries and Lk keys sees its own keys j <= r + (Lk - Lq).

Shared-prefix mode (LLM rerankers): prefix_k/prefix_v [total_p, Hkv, D] hold
one K/V segment per request, rows cu_seqlens_p[j]:cu_seqlens_p[j+1];
prefix_index[i] names the segment sequence i attends to (-1 for none). Every
query sees its whole prefix segment (no mask) and then its own keys as above;
the prefix is read in place, never copied per sequence.

Triton path: one FA2-style forward kernel (online softmax in exp2, fp32
accumulators) driven by a per-batch schedule of (sequence, query block)
slots; see the comment above ``_varlen_attention_kernel``. ``ENGINE_ATTN_TMA=1``
makes it load Q/K/V and store O through tensor descriptors (TMA on Hopper)
instead of pointer loads; bench/gpu_suite.py times both.
"""
import os
import threading
from typing import Optional

import torch
import torch.nn.functional as F

from ._library import engine_op
from ._utils import (FLOAT_DTYPES, INDEX_DTYPES, check_tensor, gqa_pack, interpreted, next_pow2, require_triton,
                     unit_stride_last, ScheduleCache)

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference still imports without Triton
    from ._utils import tl_stub as tl, triton_stub as triton


# Score matrices up to this many elements (per sequence, all heads) take the explicit path below;
# longer causal sequences behind a prefix go through it in query blocks of at most _BLOCK_SCORES.
_SMALL_SCORES = 1 << 23
_BLOCK_SCORES = 1 << 21


def _sdpa(q, k, v, attn_mask=None, **kw):
    """SDPA on [H, L, D] as a batch of one: on CPU, 3-D inputs take the unfused math path (several times
    slower at long lengths), 4-D ones the fused flash kernel."""
    mask = attn_mask[None] if attn_mask is not None else None
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, **kw)[0]


def _attend_small(q, k, v, scale, causal, lp):
    """softmax(q k^T) v for one sequence with explicit fp32 scores; returns [Lq, Hq, D].

    On CPU this beats SDPA at rerank lengths: query heads sharing a KV head are
    stacked into one matmul (no K/V repeat) and the causal mask is a single
    masked_fill. q [Hq, Lq, D], k/v [Hkv, Lp + Lk, D]; own keys are causal,
    bottom-right aligned, after lp prefix keys that every query sees.
    """
    hq, lq, d = q.shape
    hkv, lk = k.shape[0], k.shape[1]
    rep = hq // hkv
    qg = q.reshape(hkv, rep * lq, d).float() * scale  # query head g * rep + r reads KV head g
    s = torch.matmul(qg, k.float().transpose(1, 2))  # [Hkv, rep * Lq, Lp + Lk]
    if causal:
        rows = torch.arange(lq, device=q.device)[:, None]
        cols = torch.arange(lk - lp, device=q.device)[None, :]
        hidden = cols > rows + (lk - lp - lq)  # own keys a query must not see
        s.view(hkv, rep, lq, lk)[..., lp:].masked_fill_(hidden, float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = torch.matmul(p, v.float()).view(hq, lq, d)
    return o.transpose(0, 1).to(q.dtype)


def _attend_blocks(q, k, v, scale, lp):
    """Causal attention over [prefix ; own] keys (bottom-right aligned) in blocks of queries, so that
    the fp32 scores of a block stay within _BLOCK_SCORES elements whatever the length; [Lq, Hq, D].
    A block of queries ending at own row r1 sees the prefix and own keys up to r1: the same
    bottom-right alignment as the whole."""
    hq, lq, _ = q.shape
    lk = k.shape[1]
    offset = lk - lq  # prefix keys, plus own keys before the first query
    rows = max(1, min(_SMALL_SCORES, _BLOCK_SCORES) // (hq * lk))
    out = q.new_empty(lq, hq, q.shape[2])
    for r0 in range(0, lq, rows):
        r1 = min(lq, r0 + rows)
        out[r0:r1] = _attend_small(q[:, r0:r1], k[:, : offset + r1], v[:, : offset + r1], scale, True, lp)
    return out


def varlen_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    *, causal: bool, scale: float,
    prefix_k: Optional[torch.Tensor] = None, prefix_v: Optional[torch.Tensor] = None,
    cu_seqlens_p: Optional[torch.Tensor] = None, prefix_index: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
) -> torch.Tensor:
    out = torch.empty_like(q)
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    cp = cu_seqlens_p.tolist() if cu_seqlens_p is not None else None
    pidx = prefix_index.tolist() if prefix_index is not None else None
    for i in range(len(cq) - 1):
        qi = q[cq[i] : cq[i + 1]]
        ki = k[ck[i] : ck[i + 1]]
        vi = v[ck[i] : ck[i + 1]]
        lq, lk = qi.shape[0], ki.shape[0]
        if lq == 0:
            continue
        lp = 0
        if pidx is not None and pidx[i] >= 0:
            j = pidx[i]
            ki = torch.cat((prefix_k[cp[j] : cp[j + 1]], ki))
            vi = torch.cat((prefix_v[cp[j] : cp[j + 1]], vi))
            lp = cp[j + 1] - cp[j]
        # SDPA wants [H, L, D]; GQA handled by enable_gqa.
        qt, kt, vt = qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1)
        gqa = qi.shape[1] != ki.shape[1]
        if (not causal or lk >= lq) and qi.shape[1] * lq * (lp + lk) <= _SMALL_SCORES:
            out[cq[i] : cq[i + 1]] = _attend_small(qt, kt, vt, scale, causal, lp)
            continue
        if causal and lp == 0 and lq == lk:  # the common case: SDPA's own causal kernel
            o = _sdpa(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
        elif causal and lk >= lq:  # [prefix ; own] keys, causal aligned bottom-right: query blocks
            out[cq[i] : cq[i + 1]] = _attend_blocks(qt, kt, vt, scale, lp)
            continue
        elif not causal:  # SDPA's fused kernel: no score matrix in memory
            o = _sdpa(qt, kt, vt, scale=scale, enable_gqa=gqa)
        else:
            mask = None
            if causal:  # fewer own keys than queries: rows that see no key come out as 0
                rows = torch.arange(lq, device=q.device)[:, None]
                cols = torch.arange(lk, device=q.device)[None, :]
                own = cols <= rows + (lk - lq)
                mask = torch.cat((torch.ones(lq, lp, dtype=torch.bool, device=q.device), own), dim=1)
            o = _sdpa(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=gqa)
        out[cq[i] : cq[i + 1]] = o.transpose(0, 1)
    return out


# ----------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------
# Program p takes slot p // n_groups of a schedule of (sequence, query block)
# pairs, heaviest blocks first, and head group p % n_groups: PACK query heads
# that share one KV head.
# A block holds BLOCK_M rows = BLOCK_T tokens x PACK heads (row r is token
# r // PACK, head r % PACK), so each K/V tile serves PACK heads at once.
# Each program streams up to four key ranges through one online softmax:
#   prefix full blocks (no mask) -> prefix tail (key bound)
#   -> own full blocks (no mask) -> own diagonal / tail blocks (causal + bound).

_LOG2E = 1.4426950408889634


@triton.jit
def _load_kv(src, start_n, n_keys, stride_t, offs_n, offs_d,
             MASK: tl.constexpr, USE_DESC: tl.constexpr, EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    # One [BLOCK_N, BLOCK_D] K or V tile of a segment. With a descriptor the
    # segment's own shape bounds the load (rows past n_keys read as zeros).
    if USE_DESC:
        tile = src.load([start_n, 0])
    else:
        ptrs = src + (start_n + offs_n)[:, None] * stride_t + offs_d[None, :]
        if MASK:
            tile = tl.load(ptrs, mask=((start_n + offs_n) < n_keys)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        elif EVEN_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    return tile


@triton.jit
def _attn_segment(
    acc, l_i, m_i, q,
    k_src, v_src, stride_kt, stride_vt,
    lo, hi, n_keys, row_tok, diag, qk_scale,
    offs_n, offs_d,
    MASK: tl.constexpr,  # 0: none, 1: keys < n_keys, 2: that and causal (key <= token + diag)
    USE_DESC: tl.constexpr, EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    for start_n in tl.range(lo, hi, BLOCK_N):
        k = _load_kv(k_src, start_n, n_keys, stride_kt, offs_n, offs_d, MASK, USE_DESC, EVEN_D, HEAD_DIM)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
        if MASK == 0:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            m_use = m_new
        else:
            cols = start_n + offs_n
            valid = (cols < n_keys)[None, :]
            if MASK == 2:
                valid = valid & (cols[None, :] <= row_tok[:, None] + diag)
            qk = tl.where(valid, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # A row may see no key of this block yet: keep exp2 away from (-inf) - (-inf).
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv(v_src, start_n, n_keys, stride_vt, offs_n, offs_d, MASK, USE_DESC, EVEN_D, HEAD_DIM)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _varlen_attention_kernel(
    Q, K, V, O, PK, PV,
    CU_Q, CU_K, CU_P, PIDX, SCHED,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_pkt, stride_pkh, stride_pvt, stride_pvh,
    qk_scale, n_groups,
    HEAD_DIM: tl.constexpr,
    GQA: tl.constexpr,  # Hq // Hkv
    PACK: tl.constexpr,  # query heads per block (a power of two dividing GQA)
    CAUSAL: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
    USE_DESC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    BLOCK_T: tl.constexpr = BLOCK_M // PACK
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    # Head groups vary fastest, so every head of the heaviest blocks starts first.
    slot = tl.program_id(0) // n_groups
    h0 = (tl.program_id(0) % n_groups) * PACK
    seq = tl.load(SCHED + 2 * slot)
    if seq < 0:  # padding slot of the schedule
        return
    t0 = tl.load(SCHED + 2 * slot + 1) * BLOCK_T
    kv_head = h0 // GQA

    q_start = tl.load(CU_Q + seq).to(tl.int32)
    n_q = tl.load(CU_Q + seq + 1).to(tl.int32) - q_start
    k_start = tl.load(CU_K + seq).to(tl.int32)
    n_k = tl.load(CU_K + seq + 1).to(tl.int32) - k_start

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_tok = t0 + offs_m // PACK  # token of each row, within the sequence
    row_head = h0 + offs_m % PACK

    # int64 bases: packed batches can exceed 2**31 elements.
    q_base = Q + q_start.to(tl.int64) * stride_qt
    o_base = O + q_start.to(tl.int64) * stride_ot
    k_base = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    row_mask = (row_tok < n_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    if USE_DESC:
        q_desc = tl.make_tensor_descriptor(q_base + h0 * stride_qh, shape=[n_q, PACK, HEAD_DIM],
                                           strides=[stride_qt, stride_qh, 1], block_shape=[BLOCK_T, PACK, BLOCK_D])
        q = tl.reshape(q_desc.load([t0, 0, 0]), [BLOCK_M, BLOCK_D])
        k_src = tl.make_tensor_descriptor(k_base, shape=[tl.maximum(n_k, 1), HEAD_DIM], strides=[stride_kt, 1],
                                          block_shape=[BLOCK_N, BLOCK_D])
        v_src = tl.make_tensor_descriptor(v_base, shape=[tl.maximum(n_k, 1), HEAD_DIM], strides=[stride_vt, 1],
                                          block_shape=[BLOCK_N, BLOCK_D])
    else:
        q = tl.load(q_base + row_tok[:, None] * stride_qt + row_head[:, None] * stride_qh + offs_d[None, :],
                    mask=row_mask, other=0.0)
        k_src = k_base
        v_src = v_base

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if HAS_PREFIX:
        seg = tl.load(PIDX + seq).to(tl.int32)
        has_p = seg >= 0
        seg = tl.maximum(seg, 0)
        p_start = tl.load(CU_P + seg, mask=has_p, other=0).to(tl.int32)
        n_p = tl.load(CU_P + seg + 1, mask=has_p, other=0).to(tl.int32) - p_start
        pk_base = PK + p_start.to(tl.int64) * stride_pkt + kv_head * stride_pkh
        pv_base = PV + p_start.to(tl.int64) * stride_pvt + kv_head * stride_pvh
        if USE_DESC:
            pk_src = tl.make_tensor_descriptor(pk_base, shape=[tl.maximum(n_p, 1), HEAD_DIM], strides=[stride_pkt, 1],
                                               block_shape=[BLOCK_N, BLOCK_D])
            pv_src = tl.make_tensor_descriptor(pv_base, shape=[tl.maximum(n_p, 1), HEAD_DIM], strides=[stride_pvt, 1],
                                               block_shape=[BLOCK_N, BLOCK_D])
        else:
            pk_src = pk_base
            pv_src = pv_base
        # The whole prefix is visible to every query: only its tail block needs a bound.
        p_full = (n_p // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _attn_segment(acc, l_i, m_i, q, pk_src, pv_src, stride_pkt, stride_pvt,
                                      0, p_full, n_p, row_tok, 0, qk_scale, offs_n, offs_d,
                                      0, USE_DESC, EVEN_D, HEAD_DIM, BLOCK_N, INPUT_PRECISION)
        acc, l_i, m_i = _attn_segment(acc, l_i, m_i, q, pk_src, pv_src, stride_pkt, stride_pvt,
                                      p_full, n_p, n_p, row_tok, 0, qk_scale, offs_n, offs_d,
                                      1, USE_DESC, EVEN_D, HEAD_DIM, BLOCK_N, INPUT_PRECISION)

    if CAUSAL:
        # Bottom-right aligned: token t sees own keys j <= t + diag. Keys below
        # the first token's bound are visible to every row: no mask there.
        diag = n_k - n_q
        full = (tl.minimum(tl.maximum(t0 + diag + 1, 0), n_k) // BLOCK_N) * BLOCK_N
        hi = tl.maximum(tl.minimum(t0 + BLOCK_T, n_q) + diag, 0)
        acc, l_i, m_i = _attn_segment(acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt,
                                      0, full, n_k, row_tok, diag, qk_scale, offs_n, offs_d,
                                      0, USE_DESC, EVEN_D, HEAD_DIM, BLOCK_N, INPUT_PRECISION)
        acc, l_i, m_i = _attn_segment(acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt,
                                      full, hi, n_k, row_tok, diag, qk_scale, offs_n, offs_d,
                                      2, USE_DESC, EVEN_D, HEAD_DIM, BLOCK_N, INPUT_PRECISION)
    else:
        full = (n_k // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _attn_segment(acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt,
                                      0, full, n_k, row_tok, 0, qk_scale, offs_n, offs_d,
                                      0, USE_DESC, EVEN_D, HEAD_DIM, BLOCK_N, INPUT_PRECISION)
        acc, l_i, m_i = _attn_segment(acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt,
                                      full, n_k, n_k, row_tok, 0, qk_scale, offs_n, offs_d,
                                      1, USE_DESC, EVEN_D, HEAD_DIM, BLOCK_N, INPUT_PRECISION)

    # Rows that saw no key at all (only possible when Lk < Lq) give 0, as SDPA does.
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = (acc / l_i[:, None]).to(O.dtype.element_ty)
    if USE_DESC:
        o_desc = tl.make_tensor_descriptor(o_base + h0 * stride_oh, shape=[n_q, PACK, HEAD_DIM],
                                           strides=[stride_ot, stride_oh, 1], block_shape=[BLOCK_T, PACK, BLOCK_D])
        o_desc.store([t0, 0, 0], tl.reshape(out, [BLOCK_T, PACK, BLOCK_D]))
    else:
        tl.store(o_base + row_tok[:, None] * stride_ot + row_head[:, None] * stride_oh + offs_d[None, :],
                 out, mask=row_mask)


# ----------------------------------------------------------------------------
# Host side: schedule (per batch) and launch (per layer)
# ----------------------------------------------------------------------------

def build_schedule(cu_seqlens_q, cu_seqlens_k, block_t: int, n_slots: int, causal: bool,
                   cu_seqlens_p=None, prefix_index=None) -> torch.Tensor:
    """Map program slots to (sequence, query block), heaviest blocks first.

    Returns int32 ``[n_slots, 2]``; slots past the real blocks hold (-1, 0) and
    exit at once. Built with device ops only (no host sync), so the caller
    bounds ``n_slots`` from host-known sizes. A block's weight is the number
    of keys it visits (prefix + own keys, causal bound included), so long
    sequences and their late blocks start first.
    """
    dev = cu_seqlens_q.device
    n = cu_seqlens_q.numel() - 1
    cu_q, cu_k = cu_seqlens_q.long(), cu_seqlens_k.long()
    len_q = cu_q[1:] - cu_q[:-1]
    len_k = cu_k[1:] - cu_k[:-1]
    n_blocks = (len_q + block_t - 1) // block_t
    ends = torch.cumsum(n_blocks, 0)
    slot = torch.arange(n_slots, device=dev)
    seq = torch.searchsorted(ends, slot, right=True)
    valid = seq < n
    seq = seq.clamp(max=max(n - 1, 0))
    blk = slot - (ends - n_blocks)[seq]
    keys = len_k[seq]
    if causal:
        bound = (blk + 1) * block_t + keys - len_q[seq]  # keys seen by the block's last row, +1
        keys = torch.minimum(bound, keys).clamp(min=0)
    if prefix_index is not None:
        seg = prefix_index.long()
        cu_p = cu_seqlens_p.long()
        len_p = torch.where(seg >= 0, cu_p[(seg + 1).clamp(min=0, max=cu_p.numel() - 1)] - cu_p[seg.clamp(min=0)], 0)
        keys = keys + len_p[seq]
    work = torch.where(valid, keys, -1)
    order = torch.sort(work, descending=True, stable=True).indices
    sched = torch.stack((torch.where(valid, seq, -1)[order], blk[order]), dim=1)
    return sched.to(torch.int32).contiguous()


_SCHEDULES = ScheduleCache()
_ALLOCATOR = threading.local()  # Triton keeps its allocator in a ContextVar: one per thread
USE_DESC_DEFAULT = os.environ.get("ENGINE_ATTN_TMA", "0") == "1"


def _ensure_allocator():
    # Device-side tensor descriptors need global scratch memory on the GPU. triton.set_allocator sets a
    # ContextVar, which a new thread does not inherit: every engine thread must set its own.
    if not getattr(_ALLOCATOR, "set", False):
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, device="cuda", dtype=torch.int8))
        _ALLOCATOR.set = True


def attention_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Block sizes, warps and stages (hand-picked leads; bench/gpu_suite.py sweeps them on a GPU)."""
    if interpreted() or device.type != "cuda":
        return dict(block_m=32, block_n=32, num_warps=4, num_stages=1)
    block_d = next_pow2(head_dim)
    if block_d <= 64:  # 4 warps spill on sm_80 (XLM-R, D 64; kernels/aot.py), 8 do not
        sm80 = torch.cuda.get_device_capability(device)[0] < 9
        cfg = dict(block_m=128, block_n=64, num_warps=8 if sm80 else 4, num_stages=3)
    elif block_d <= 128:
        cfg = dict(block_m=128, block_n=64, num_warps=8, num_stages=3)
        if head_dim < block_d and torch.cuda.get_device_capability(device)[0] < 9:
            # A padded head (Qwen3-VL-8B vision, D 72) spills 88 B on sm_80 at this tile; 64 x 32
            # with 4 warps is the one spill-free config of kernels/aot.py's sweep (not timed).
            cfg = dict(block_m=64, block_n=32, num_warps=4, num_stages=3)
    else:  # d=256: the fp32 accumulator alone is 64 registers per thread at 8 warps
        cfg = dict(block_m=64, block_n=32, num_warps=8, num_stages=2)
    if dtype == torch.float32:  # twice the shared memory per K/V tile
        cfg.update(block_n=max(16, cfg["block_n"] // 2), num_stages=2)
    return cfg


def _desc_ok(*tensors) -> bool:
    # TMA needs 16-byte aligned bases and 16-byte multiple leading strides.
    for t in tensors:
        if t is None:
            continue
        es = t.element_size()
        if t.data_ptr() % 16 or any((s * es) % 16 for s in t.stride()[:-1]):
            return False
    return True


def varlen_attention_triton(
    q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal: bool, scale: float,
    prefix_k=None, prefix_v=None, cu_seqlens_p=None, prefix_index=None,
    max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
    block_m: Optional[int] = None, block_n: Optional[int] = None, pack: Optional[int] = None,
    num_warps: Optional[int] = None, num_stages: Optional[int] = None, use_desc: Optional[bool] = None,
):
    """Triton varlen attention (FA2-style online softmax); see the module docstring.

    No host sync: the grid is bounded by ``cdiv(total_q, BLOCK_T) + n_seqs``
    from host-known sizes and the schedule is built by device ops, once per
    batch (cached across layers), so ``max_seqlen_q/k`` are accepted for the
    common signature but not needed. Without ``prefix_index`` the prefix
    arguments are ignored, as in the reference. The keyword-only tuning
    arguments (tiles, head packing, warps, stages, tensor descriptors)
    override the defaults for benchmarks and tests.
    """
    require_triton()
    check_tensor(q, "q", ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor(k, "k", ndim=3, dtypes=(q.dtype,), device=q.device)
    check_tensor(v, "v", ndim=3, dtypes=(q.dtype,), device=q.device)
    total_q, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    if k.shape != v.shape or k.shape[2] != head_dim:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [total_k, Hkv, {head_dim}]")
    if n_kv_heads == 0 or n_heads % n_kv_heads:
        raise ValueError(f"Hq={n_heads} must be a multiple of Hkv={n_kv_heads}")
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(t, name, ndim=1, dtypes=INDEX_DTYPES, device=q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError("cu_seqlens_q and cu_seqlens_k must have the same length")
    has_prefix = prefix_index is not None
    if has_prefix:
        if prefix_k is None or prefix_v is None or cu_seqlens_p is None:
            raise ValueError("prefix_index needs prefix_k, prefix_v and cu_seqlens_p")
        check_tensor(prefix_k, "prefix_k", ndim=3, dtypes=(q.dtype,), device=q.device)
        check_tensor(prefix_v, "prefix_v", ndim=3, dtypes=(q.dtype,), device=q.device)
        check_tensor(cu_seqlens_p, "cu_seqlens_p", ndim=1, dtypes=INDEX_DTYPES, device=q.device)
        check_tensor(prefix_index, "prefix_index", ndim=1, dtypes=INDEX_DTYPES, device=q.device)
        if prefix_k.shape != prefix_v.shape or tuple(prefix_k.shape[1:]) != (n_kv_heads, head_dim):
            raise ValueError(f"prefix_k/prefix_v must be [total_p, {n_kv_heads}, {head_dim}]")
        if prefix_index.numel() != cu_seqlens_q.numel() - 1:
            raise ValueError("prefix_index needs one entry per sequence")
        if cu_seqlens_p.numel() < 1:
            raise ValueError("cu_seqlens_p must hold at least [0]")

    out = torch.empty((total_q, n_heads, head_dim), dtype=q.dtype, device=q.device)
    n_seqs = cu_seqlens_q.numel() - 1
    if total_q == 0 or n_seqs <= 0 or n_heads == 0:
        return out

    q, k, v = (unit_stride_last(t) for t in (q, k, v))
    if has_prefix:
        prefix_k, prefix_v = unit_stride_last(prefix_k), unit_stride_last(prefix_v)
    cu_q, cu_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()

    cfg = attention_config(head_dim, q.dtype, q.device)
    block_m = block_m or cfg["block_m"]
    block_n = block_n or cfg["block_n"]
    group = n_heads // n_kv_heads
    pack = pack or gqa_pack(group, block_m)
    if group % pack or block_m % pack or next_pow2(pack) != pack:
        raise ValueError(f"pack={pack} must be a power of two dividing Hq/Hkv={group} and block_m={block_m}")
    block_t = block_m // pack
    block_d = max(16, next_pow2(head_dim))
    if use_desc is None:
        use_desc = USE_DESC_DEFAULT
    use_desc = bool(use_desc) and block_d == head_dim and _desc_ok(q, k, v, out, prefix_k, prefix_v)
    if use_desc and q.is_cuda:
        _ensure_allocator()

    # sum_i cdiv(Lq_i, BLOCK_T) <= cdiv(total_q, BLOCK_T) + n_seqs: a grid bound from
    # host-known sizes, always valid, so neither a sync nor max_seqlen is needed.
    n_slots = triton.cdiv(total_q, block_t) + n_seqs
    meta = (cu_q, cu_k, cu_seqlens_p if has_prefix else None, prefix_index if has_prefix else None)
    sched = _SCHEDULES.get(
        meta, (block_t, n_slots, bool(causal)),
        lambda: build_schedule(cu_q, cu_k, block_t, n_slots, causal,
                               cu_seqlens_p if has_prefix else None, prefix_index if has_prefix else None),
    )
    pk, pv = (prefix_k, prefix_v) if has_prefix else (k, v)
    n_groups = n_heads // pack
    grid = (n_slots * n_groups,)
    _varlen_attention_kernel[grid](
        q, k, v, out, pk, pv,
        cu_q, cu_k, cu_seqlens_p.contiguous() if has_prefix else cu_q,
        prefix_index.contiguous() if has_prefix else cu_q, sched,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), pk.stride(0), pk.stride(1), pv.stride(0), pv.stride(1),
        float(scale) * _LOG2E, n_groups,
        HEAD_DIM=head_dim, GQA=group, PACK=pack, CAUSAL=bool(causal), HAS_PREFIX=has_prefix,
        USE_DESC=use_desc, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
    )
    return out


def _varlen_attention_schema(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    causal: bool, scale: float, prefix_k: Optional[torch.Tensor] = None, prefix_v: Optional[torch.Tensor] = None,
    cu_seqlens_p: Optional[torch.Tensor] = None, prefix_index: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
) -> torch.Tensor: ...


def varlen_attention_cpu(ext, q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, prefix_k=None, prefix_v=None,
                         cu_seqlens_p=None, prefix_index=None, max_seqlen_q=None, max_seqlen_k=None):
    """The C++ kernel (csrc/engine_cpu.cpp): all sequences in one call, parallel over (sequence, KV head,
    query block), online softmax in fp32; the prefix is read in place."""
    if prefix_index is None:
        prefix_k = prefix_v = cu_seqlens_p = None
    return ext.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale,
                                prefix_k, prefix_v, cu_seqlens_p, prefix_index)


varlen_attention_op = engine_op(
    "varlen_attention", varlen_attention_ref, lambda **kw: varlen_attention_triton(**kw),
    lambda q, **kw: torch.empty_like(q), schema=_varlen_attention_schema, cpu=varlen_attention_cpu)


def varlen_attention(
    q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal, scale,
    prefix_k=None, prefix_v=None, cu_seqlens_p=None, prefix_index=None,
    max_seqlen_q=None, max_seqlen_k=None,
):
    """Packed varlen attention forward (``torch.ops.engine.varlen_attention``); see the module docstring."""
    return varlen_attention_op(
        q, k, v, cu_seqlens_q, cu_seqlens_k, causal=bool(causal), scale=float(scale),
        prefix_k=prefix_k, prefix_v=prefix_v, cu_seqlens_p=cu_seqlens_p, prefix_index=prefix_index,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
    )
