"""Varlen attention over [own windowed keys ; paged cross keys], one online softmax.

The T5Gemma2 decoder's merged attention (KaLM-Reranker): every decoder token
attends to its own sequence's keys (causal, optionally windowed) and to all of
its passage's cached cross keys, with ONE softmax over both. The cross K/V live
in a paged pool and are read through a block table, never copied per sequence.
Without cross keys the same kernel is the encoder's windowed bidirectional
attention.

Layout (no padding anywhere):
  q [total, Hq, D], k/v [total, Hkv, D], Hq a multiple of Hkv (GQA);
  sequence i owns rows cu_seqlens[i]:cu_seqlens[i+1] of q, k and v.
Own keys: key j is visible to query t (positions within the sequence) iff
  t - window_left < j < t + window_right     (None: unbounded on that side).
  causal: window_right=1; Gemma sliding causal: (W, 1);
  T5Gemma2 encoder sliding: ((W + 1) // 2, W // 2 + 1).
Cross keys (optional): k_cache/v_cache [num_blocks, page, Hkv, D] (any strides);
  sequence i sees cross rows 0..cross_lens[i]-1, row r stored in block
  block_tables[i, r // page] at slot r % page. Every query sees all of them.
"""
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

_UNBOUNDED = 1 << 30  # a window larger than any sequence
_LOG2E = 1.4426950408889634


def _bounds(window_left, window_right):
    return (_UNBOUNDED if window_left is None else int(window_left),
            _UNBOUNDED if window_right is None else int(window_right))


# ----------------------------------------------------------------------------
# Reference (plain torch; also the CPU path)
# ----------------------------------------------------------------------------

def paged_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, *, scale: float,
    window_left: Optional[int] = None, window_right: Optional[int] = None,
    k_cache: Optional[torch.Tensor] = None, v_cache: Optional[torch.Tensor] = None,
    block_tables: Optional[torch.Tensor] = None, cross_lens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
) -> torch.Tensor:
    # Sequences of equal length run as one padded SDPA call (cross keys padded to the
    # group's longest and masked), so a rerank batch of identical decoder prompts is a
    # handful of calls rather than one per sequence. Windows wider than the sequence need
    # no mask (SDPA's own causal flag, or none), and a lone sequence is a view, not a copy.
    left, right = _bounds(window_left, window_right)
    out = torch.empty_like(q)
    cu = cu_seqlens.tolist()
    n = len(cu) - 1
    has_cross = block_tables is not None
    c_lens = cross_lens.tolist() if has_cross else [0] * n
    page = k_cache.shape[1] if has_cross else 1
    groups = {}
    for i in range(n):
        if cu[i + 1] > cu[i]:
            groups.setdefault(cu[i + 1] - cu[i], []).append(i)
    hq, d = q.shape[1], q.shape[2]
    gqa = hq != k.shape[1]
    for length, seqs in groups.items():
        pos = torch.arange(length, device=q.device)
        unbounded = left >= length and right >= length
        causal = left >= length and right == 1
        own_mask = None
        if has_cross or not (unbounded or causal):
            dist = pos[:, None] - pos[None, :]
            own_mask = (dist < left) & (dist > -right)  # [L, L]
        step = max(1, (1 << 25) // max(1, hq * length * (length + max(c_lens[i] for i in seqs))))
        for g in range(0, len(seqs), step):
            idx = seqs[g : g + step]
            if len(idx) == 1:
                sl = slice(cu[idx[0]], cu[idx[0]] + length)
                qi, ki, vi = q[sl][None], k[sl][None], v[sl][None]  # [1, L, H, D] views
            else:
                rows = torch.tensor([cu[i] for i in idx], device=q.device)[:, None] + pos[None, :]  # [B, L]
                qi, ki, vi = q[rows], k[rows], v[rows]  # [B, L, H, D]
            mask = None if own_mask is None else own_mask.expand(len(idx), length, length)
            if has_cross:
                c_max = max(c_lens[i] for i in idx)
                r = torch.arange(c_max, device=q.device)
                lens = torch.tensor([c_lens[i] for i in idx], device=q.device)
                ok = r[None, :] < lens[:, None]  # [B, C]
                bt = block_tables[torch.tensor(idx, device=q.device)].long()
                blk = torch.gather(bt, 1, (r // page).clamp(max=bt.shape[1] - 1).expand(len(idx), -1))
                keep = ok[:, :, None, None]  # rows past a passage's end are never read (may hold anything)
                blk = torch.where(ok, blk, 0)
                ki = torch.cat((ki, torch.where(keep, k_cache[blk, r % page], 0)), dim=1)
                vi = torch.cat((vi, torch.where(keep, v_cache[blk, r % page], 0)), dim=1)
                mask = torch.cat((mask, ok[:, None, :].expand(-1, length, -1)), dim=2)
            o = F.scaled_dot_product_attention(
                qi.transpose(1, 2), ki.transpose(1, 2), vi.transpose(1, 2),
                attn_mask=None if mask is None else mask[:, None], is_causal=mask is None and causal and not unbounded,
                scale=scale, enable_gqa=gqa,
            ).transpose(1, 2)  # [B, L, H, D]
            if len(idx) == 1:
                out[sl] = o[0]
            else:
                out[rows.reshape(-1)] = o.reshape(-1, hq, d)
    return out


# ----------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------
# Program p takes slot p // n_groups of a schedule of (sequence, query block),
# heaviest first, and query heads [h0, h0 + PACK) with h0 = (p % n_groups) * PACK:
# the PACK heads share one KV head, so each K/V tile serves them all. Row r of
# a block is token t0 + r // PACK, head h0 + r % PACK. Two key ranges stream
# through one online softmax: own keys inside the window, then the cross rows,
# gathered page by page through the block table.

@triton.jit
def _online_softmax_step(acc, l_i, m_i, qk, v, INPUT_PRECISION: tl.constexpr):
    # qk: [BLOCK_M, BLOCK_N] scaled by log2(e), -inf where masked.
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: avoid (-inf) - (-inf)
    p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
    return acc, l_i, m_new


# The block-table width follows the batch, and the windows differ between layers of one model:
# one binary for all of them.
@triton.jit(do_not_specialize=["stride_bt", "window_left", "window_right"])
def _paged_attention_kernel(
    Q, K, V, O, KC, VC, BT, CLEN, CU, SCHED,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch, stride_bt,
    qk_scale, n_groups, window_left, window_right,
    HEAD_DIM: tl.constexpr,
    GQA: tl.constexpr,  # Hq // Hkv
    PACK: tl.constexpr,  # query heads per block (a power of two dividing GQA)
    HAS_CROSS: tl.constexpr,
    PAGE: tl.constexpr,  # rows per cache block
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    BLOCK_T: tl.constexpr = BLOCK_M // PACK
    slot = tl.program_id(0) // n_groups
    h0 = (tl.program_id(0) % n_groups) * PACK
    seq = tl.load(SCHED + 2 * slot)
    if seq < 0:  # padding slot of the schedule
        return
    t0 = tl.load(SCHED + 2 * slot + 1) * BLOCK_T
    kv_head = h0 // GQA
    start = tl.load(CU + seq).to(tl.int32)
    n = tl.load(CU + seq + 1).to(tl.int32) - start

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_tok = t0 + offs_m // PACK
    row_head = h0 + offs_m % PACK
    row_mask = (row_tok < n)[:, None] & d_ok[None, :]
    base = start.to(tl.int64)  # int64: packed batches can pass 2**31 elements
    q = tl.load(Q + base * stride_qt + row_tok[:, None] * stride_qt + row_head[:, None] * stride_qh
                + offs_d[None, :], mask=row_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Own keys: rows t0..t_end see keys in (t0 - window_left, t_end + window_right).
    t_end = tl.minimum(t0 + BLOCK_T, n) - 1
    lo = (tl.maximum(t0 - window_left + 1, 0) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(t_end + window_right, n)
    k_base = K + base * stride_kt + kv_head * stride_kh
    v_base = V + base * stride_vt + kv_head * stride_vh
    for s in tl.range(lo, hi, BLOCK_N):
        cols = s + offs_n
        kv_mask = (cols < n)[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
        dist = row_tok[:, None] - cols[None, :]
        valid = (cols < n)[None, :] & (dist < window_left) & (dist > -window_right)
        qk = tl.where(valid, qk * qk_scale, float("-inf"))
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, qk, v, INPUT_PRECISION)

    if HAS_CROSS:
        # Cross rows: all visible; rows past cross_lens[seq] are never loaded.
        n_c = tl.load(CLEN + seq).to(tl.int32)
        bt = BT + seq.to(tl.int64) * stride_bt
        for s in tl.range(0, n_c, BLOCK_N):
            cols = s + offs_n
            c_ok = cols < n_c
            blk = tl.load(bt + cols // PAGE, mask=c_ok, other=0).to(tl.int64)
            c_mask = c_ok[:, None] & d_ok[None, :]
            k_rows = KC + blk * stride_kcb + (cols % PAGE) * stride_kct + kv_head * stride_kch
            k = tl.load(k_rows[:, None] + offs_d[None, :], mask=c_mask, other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
            qk = tl.where(c_ok[None, :], qk * qk_scale, float("-inf"))
            v_rows = VC + blk * stride_vcb + (cols % PAGE) * stride_vct + kv_head * stride_vch
            v = tl.load(v_rows[:, None] + offs_d[None, :], mask=c_mask, other=0.0)
            acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, qk, v, INPUT_PRECISION)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # padding rows only: every real query sees itself
    out = (acc / l_i[:, None]).to(O.dtype.element_ty)
    tl.store(O + base * stride_ot + row_tok[:, None] * stride_ot + row_head[:, None] * stride_oh + offs_d[None, :],
             out, mask=row_mask)


# ----------------------------------------------------------------------------
# Host side: schedule (once per batch, shared by all layers) and launch
# ----------------------------------------------------------------------------

def build_schedule(cu_seqlens, cross_lens, block_t: int, n_slots: int) -> torch.Tensor:
    """int32 ``[n_slots, 2]`` of (sequence, query block), most keys first; (-1, 0) pads.

    Device ops only (no host sync); the caller bounds ``n_slots`` from host-known sizes.
    """
    cu = cu_seqlens.long()
    n = cu.numel() - 1
    lens = cu[1:] - cu[:-1]
    n_blocks = (lens + block_t - 1) // block_t
    ends = torch.cumsum(n_blocks, 0)
    slot = torch.arange(n_slots, device=cu.device)
    seq = torch.searchsorted(ends, slot, right=True)
    valid = seq < n
    seq = seq.clamp(max=max(n - 1, 0))
    blk = slot - (ends - n_blocks)[seq]
    work = lens[seq] + (cross_lens.long()[seq] if cross_lens is not None else 0)
    order = torch.sort(torch.where(valid, work, -1), descending=True, stable=True).indices
    return torch.stack((torch.where(valid, seq, -1)[order], blk[order]), dim=1).to(torch.int32).contiguous()


_SCHEDULES = ScheduleCache()


def paged_attention_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tile sizes (hand-picked; bench/gpu_suite.py times them on a GPU)."""
    if interpreted() or device.type != "cuda":
        return dict(block_m=32, block_n=16, num_warps=4, num_stages=1)
    if head_dim <= 64:
        cfg = dict(block_m=128, block_n=64, num_warps=4, num_stages=3)
    elif head_dim <= 128:
        cfg = dict(block_m=128, block_n=64, num_warps=8, num_stages=3)
    else:  # d=256 (Gemma): keep the fp32 accumulator in registers
        cfg = dict(block_m=64, block_n=32, num_warps=8, num_stages=2)
    if dtype == torch.float32:
        cfg.update(block_n=max(16, cfg["block_n"] // 2), num_stages=2)
    return cfg


def paged_attention_triton(
    q, k, v, cu_seqlens, *, scale: float, window_left: Optional[int] = None, window_right: Optional[int] = None,
    k_cache=None, v_cache=None, block_tables=None, cross_lens=None, max_seqlen: Optional[int] = None,
    block_m: Optional[int] = None, block_n: Optional[int] = None, pack: Optional[int] = None,
    num_warps: Optional[int] = None, num_stages: Optional[int] = None,
):
    """Triton paged attention (see the module docstring). No host sync; the schedule is
    built on the device once per batch. Keyword tuning arguments are for tests/benchmarks."""
    require_triton()
    check_tensor(q, "q", ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor(k, "k", ndim=3, dtypes=(q.dtype,), device=q.device)
    check_tensor(v, "v", ndim=3, dtypes=(q.dtype,), device=q.device)
    check_tensor(cu_seqlens, "cu_seqlens", ndim=1, dtypes=INDEX_DTYPES, device=q.device)
    total, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    if k.shape != v.shape or k.shape[0] != total or k.shape[2] != head_dim:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [{total}, Hkv, {head_dim}]")
    if n_kv_heads == 0 or n_heads % n_kv_heads:
        raise ValueError(f"Hq={n_heads} must be a multiple of Hkv={n_kv_heads}")
    left, right = _bounds(window_left, window_right)
    if left < 1 or right < 1:
        raise ValueError("window_left and window_right must be >= 1 (a query always sees itself)")
    n_seqs = cu_seqlens.numel() - 1
    has_cross = block_tables is not None
    if has_cross:
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            check_tensor(t, name, ndim=4, dtypes=(q.dtype,), device=q.device)
            if tuple(t.shape[2:]) != (n_kv_heads, head_dim):
                raise ValueError(f"{name} must be [num_blocks, page, {n_kv_heads}, {head_dim}], got {tuple(t.shape)}")
        if k_cache.shape[:2] != v_cache.shape[:2]:
            raise ValueError("k_cache and v_cache must have the same blocks and page size")
        check_tensor(block_tables, "block_tables", ndim=2, dtypes=INDEX_DTYPES, device=q.device)
        check_tensor(cross_lens, "cross_lens", ndim=1, dtypes=INDEX_DTYPES, device=q.device)
        if block_tables.shape[0] != n_seqs or cross_lens.numel() != n_seqs:
            raise ValueError("block_tables and cross_lens need one row per sequence")

    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if total == 0 or n_seqs <= 0 or n_heads == 0:
        return out
    q, k, v = (unit_stride_last(t) for t in (q, k, v))
    if has_cross:
        k_cache, v_cache = unit_stride_last(k_cache), unit_stride_last(v_cache)
        block_tables = unit_stride_last(block_tables)
        cross_lens = cross_lens.contiguous()
    cu = cu_seqlens.contiguous()

    cfg = paged_attention_config(head_dim, q.dtype, q.device)
    block_m = block_m or cfg["block_m"]
    block_n = block_n or cfg["block_n"]
    group = n_heads // n_kv_heads
    pack = pack or gqa_pack(group, block_m)
    if group % pack or block_m % pack or next_pow2(pack) != pack:
        raise ValueError(f"pack={pack} must be a power of two dividing Hq/Hkv={group} and block_m={block_m}")
    block_t = block_m // pack
    n_slots = triton.cdiv(total, block_t) + n_seqs
    if max_seqlen is not None:
        n_slots = min(n_slots, n_seqs * triton.cdiv(max(int(max_seqlen), 1), block_t))
    sched = _SCHEDULES.get((cu, cross_lens if has_cross else None), (block_t, n_slots),
                           lambda: build_schedule(cu, cross_lens if has_cross else None, block_t, n_slots))
    # Without cross keys the cache arguments are never read; a one-row stand-in keeps their strides small
    # (k.unsqueeze(0) has stride(0) = T x row stride, past 2^31 on long batches: an int64 kernel variant).
    kc, vc = (k_cache, v_cache) if has_cross else (k[:1].unsqueeze(0), v[:1].unsqueeze(0))
    bt, cl = (block_tables, cross_lens) if has_cross else (cu.unsqueeze(0), cu)
    n_groups = n_heads // pack
    _paged_attention_kernel[(n_slots * n_groups,)](
        q, k, v, out, kc, vc, bt, cl, cu, sched,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2), bt.stride(0),
        float(scale) * _LOG2E, n_groups, left, right,
        HEAD_DIM=head_dim, GQA=group, PACK=pack, HAS_CROSS=has_cross, PAGE=int(kc.shape[1]) if has_cross else 1,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, next_pow2(head_dim)),
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
    )
    return out


def _paged_attention_schema(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float,
    window_left: Optional[int] = None, window_right: Optional[int] = None,
    k_cache: Optional[torch.Tensor] = None, v_cache: Optional[torch.Tensor] = None,
    block_tables: Optional[torch.Tensor] = None, cross_lens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
) -> torch.Tensor: ...


paged_attention_op = engine_op(
    "paged_attention", paged_attention_ref, lambda **kw: paged_attention_triton(**kw),
    lambda q, **kw: torch.empty_like(q), schema=_paged_attention_schema)


def paged_attention(
    q, k, v, cu_seqlens, *, scale, window_left=None, window_right=None,
    k_cache=None, v_cache=None, block_tables=None, cross_lens=None, max_seqlen=None,
):
    """Packed attention over own (windowed) keys and paged cross keys (``torch.ops.engine.paged_attention``)."""
    return paged_attention_op(
        q, k, v, cu_seqlens, scale=float(scale),
        window_left=None if window_left is None else int(window_left),
        window_right=None if window_right is None else int(window_right),
        k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, cross_lens=cross_lens,
        max_seqlen=max_seqlen,
    )
