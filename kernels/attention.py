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
"""
from typing import Optional

import torch
import torch.nn.functional as F

from ._dispatch import use_triton


def varlen_attention_ref(
    q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal: bool, scale: float,
    prefix_k=None, prefix_v=None, cu_seqlens_p=None, prefix_index=None,
    max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
):
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
        mask = None
        if causal:
            rows = torch.arange(lq, device=q.device)[:, None]
            cols = torch.arange(lk, device=q.device)[None, :]
            own = cols <= rows + (lk - lq)
            mask = torch.cat((torch.ones(lq, lp, dtype=torch.bool, device=q.device), own), dim=1)
        # SDPA wants [H, L, D]; GQA handled by enable_gqa.
        o = F.scaled_dot_product_attention(
            qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1),
            attn_mask=mask, scale=scale, enable_gqa=qi.shape[1] != ki.shape[1],
        )
        out[cq[i] : cq[i + 1]] = o.transpose(0, 1)
    return out


def varlen_attention(
    q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal, scale,
    prefix_k=None, prefix_v=None, cu_seqlens_p=None, prefix_index=None,
    max_seqlen_q=None, max_seqlen_k=None,
):
    """Packed varlen attention forward; see the module docstring for layout."""
    if use_triton(q):
        return varlen_attention_triton(
            q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale,
            prefix_k=prefix_k, prefix_v=prefix_v, cu_seqlens_p=cu_seqlens_p, prefix_index=prefix_index,
            max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        )
    return varlen_attention_ref(
        q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale,
        prefix_k=prefix_k, prefix_v=prefix_v, cu_seqlens_p=cu_seqlens_p, prefix_index=prefix_index,
    )
