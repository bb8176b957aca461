import pytest
import torch
from kernel_workloads import (
    QWEN3_0_6B, attention_flops, attention_inputs, padded_sdpa_inputs, rerank_lengths, requires_cuda, sdpa,
)

from kernels.attention import varlen_attention_triton

pytestmark = requires_cuda


@pytest.mark.parametrize("use_desc", [False, True], ids=["ptr", "tma"])
def test_rerank_1k_shared_prefix(bench_pair, use_desc):
    # 1024 documents of 64-448 tokens behind one 64-token prefix, Qwen3-0.6B heads.
    hq, hkv, d = QWEN3_0_6B["n_heads"], QWEN3_0_6B["n_kv_heads"], QWEN3_0_6B["head_dim"]
    lens = rerank_lengths(1024)
    args, extra = attention_inputs(lens, lens, hq, hkv, d, torch.bfloat16, "cuda", [64], [0] * len(lens))
    scale = d**-0.5
    flops = attention_flops(lens, lens, hq, d, True, [64] * len(lens))
    pq, pk, pv = padded_sdpa_inputs([64 + n for n in lens], hq, hkv, d, torch.bfloat16, "cuda")
    bench_pair(f"attn rerank-1k prefix {'tma' if use_desc else 'ptr'} (vs padded SDPA)",
               lambda: varlen_attention_triton(*args, causal=True, scale=scale, **extra, use_desc=use_desc,
                                               max_seqlen_q=max(lens), max_seqlen_k=max(lens)),
               lambda: sdpa(pq, pk, pv, True), flops=flops)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("use_desc", [False, True], ids=["ptr", "tma"])
def test_long_8x4096(bench_pair, causal, use_desc):
    b, seqlen, h, d = 8, 4096, 16, 128
    lens = [seqlen] * b
    args, _ = attention_inputs(lens, lens, h, h, d, torch.bfloat16, "cuda")
    q, k, v = (t.view(b, seqlen, h, d).transpose(1, 2).contiguous() for t in args[:3])
    flops = 4 * b * h * seqlen * seqlen * d // (2 if causal else 1)
    bench_pair(f"attn 8x4096 h16 d128 {'causal' if causal else 'bidir'} {'tma' if use_desc else 'ptr'}",
               lambda: varlen_attention_triton(*args, causal=causal, scale=d**-0.5, use_desc=use_desc,
                                               max_seqlen_q=seqlen, max_seqlen_k=seqlen),
               lambda: sdpa(q, k, v, causal), flops=flops)
