"""Inputs, torch baselines and work counts shared by the kernel microbenchmarks
(bench/kernels/test_bench_*.py) and bench/gpu_suite.py.

Shapes are Qwen3-Reranker-0.6B's; "rerank-1k" is one request of 1024 documents
of 64-448 tokens behind a 64-token shared prefix.
"""
import random

import pytest
import torch
import torch.nn.functional as F

QWEN3_0_6B = dict(hidden=1024, n_heads=16, n_kv_heads=8, head_dim=128, intermediate=3072, vocab=151669, eps=1e-6)
YES_ID, NO_ID = 9693, 2152  # Qwen3 vocabulary; only used to pick two rows of a random LM head here

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need a CUDA GPU")


def rerank_lengths(n_seqs: int = 1024, lo: int = 64, hi: int = 448, seed: int = 0):
    rng = random.Random(seed)
    return [rng.randint(lo, hi) for _ in range(n_seqs)]


def cu_seqlens(lens, device):
    return torch.tensor([0] + list(lens), device=device).cumsum(0).to(torch.int32)


def attention_inputs(lens_q, lens_k, hq, hkv, d, dtype, device, prefix_lens=None, prefix_index=None):
    """Packed varlen attention inputs as (args tuple, prefix kwargs)."""
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    q = torch.randn(int(cu_q[-1]), hq, d, dtype=dtype, device=device)
    k = torch.randn(int(cu_k[-1]), hkv, d, dtype=dtype, device=device)
    v = torch.randn_like(k)
    extra = {}
    if prefix_lens is not None:
        cu_p = cu_seqlens(prefix_lens, device)
        extra = dict(
            prefix_k=torch.randn(int(cu_p[-1]), hkv, d, dtype=dtype, device=device),
            prefix_v=torch.randn(int(cu_p[-1]), hkv, d, dtype=dtype, device=device),
            cu_seqlens_p=cu_p,
            prefix_index=torch.tensor(prefix_index, dtype=torch.int32, device=device),
        )
    return (q, k, v, cu_q, cu_k), extra


def attention_flops(lens_q, lens_k, hq, d, causal, prefix_len_per_seq=None):
    """Useful FLOPs (2 matmuls x 2 FLOP per MAC) over the (query, key) pairs that are visible."""
    pairs = 0
    for i, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        lp = prefix_len_per_seq[i] if prefix_len_per_seq is not None else 0
        if causal:
            diag = lk - lq
            own = sum(max(0, min(lk, r + diag + 1)) for r in range(lq))
        else:
            own = lq * lk
        pairs += own + lq * lp
    return 4 * pairs * hq * d


def padded_sdpa_inputs(total_lens, hq, hkv, d, dtype, device):
    """Right-padded [B, H, Lmax, D] q/k/v for torch SDPA: what a padded batch
    (every document scored with its whole prompt, no prefix sharing) runs.
    K/V heads are expanded up front so that SDPA takes its flash path."""
    b, lmax = len(total_lens), max(total_lens)
    q = torch.randn(b, hq, lmax, d, dtype=dtype, device=device)
    k = torch.randn(b, hkv, lmax, d, dtype=dtype, device=device).repeat_interleave(hq // hkv, dim=1)
    v = torch.randn_like(k)
    return q, k, v


def sdpa(q, k, v, causal):
    # With right padding and a causal mask, pad keys never reach a real query.
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def yes_no_full_vocab(hidden, last_index, norm_weight, lm_head, eps, yes_id=YES_ID, no_id=NO_ID):
    """The unfused baseline: norm the last rows, full-vocabulary logits, then slice."""
    x = hidden[last_index].float()
    x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()).to(hidden.dtype)
    logits = F.linear(x, lm_head)  # [n, vocab]
    logit = logits[:, yes_id].float() - logits[:, no_id].float()
    return logit, torch.sigmoid(logit)


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in fp64; inf when out has NaN or inf."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
