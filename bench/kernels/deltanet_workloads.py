"""Gated DeltaNet kernels (Qwen3.5 / Prism-Reranker) in bench/gpu_suite.py: bf16/fp16
correctness of the chunked gated delta rule and the causal conv1d against their torch
references, and timings at the Qwen3.5-0.8B shape (16 value heads of 128, conv channels
6144) on rerank-1k lengths, against the torch chunked path (a subset: it is memory-hungry).
"""
import random

import torch

from kernel_workloads import cu_seqlens, rerank_lengths

QWEN3_5_0_8B = dict(hk=16, hv=16, dk=128, dv=128, conv=6144, width=4)


def _gdr_inputs(lens, dtype, dev, n_states=2, hk=16, hv=16, dk=128, dv=128):
    t = sum(lens)
    q = torch.randn(t, hk, dk, dtype=dtype, device=dev)
    k = torch.randn(t, hk, dk, dtype=dtype, device=dev)
    v = torch.randn(t, hv, dv, dtype=dtype, device=dev)
    g = -torch.rand(t, hv, device=dev) * torch.linspace(0.01, 4.0, hv, device=dev)
    beta = torch.rand(t, hv, dtype=dtype, device=dev)
    init = torch.randn(n_states, hv, dk, dv, device=dev) * 0.5
    index = torch.randint(-1, n_states, (len(lens),), dtype=torch.int32, device=dev)
    return (q, k, v, g, beta, cu_seqlens(lens, dev)), dict(initial_state=init, state_index=index)


def _up(t):
    return t.float() if t.is_floating_point() else t


def check(s, dtype, dev="cuda", prefill=None, decode=64, conv=None, heads=16, dim=128, channels=6144):
    """``prefill``, ``decode`` (a count of 1-token sequences) and ``conv``: sequence lengths (default: ragged
    up to 500 tokens); ``heads``, ``dim``, ``channels``: the shape (default Qwen3.5-0.8B's). gpu_suite.py
    --smoke passes small ones."""
    from kernels.causal_conv1d import causal_conv1d_ref, causal_conv1d_triton
    from kernels.gated_delta_rule import gated_delta_rule_ref, gated_delta_rule_triton

    rng = random.Random(3)
    cases = [("prefill", prefill or [1, 63, 64, 65, 300] + [rng.randint(1, 500) for _ in range(11)]),
             ("decode", [1] * decode)]
    for tag, lens in cases:
        name = f"gated_delta_rule {tag} n={len(lens)} H{heads} D{dim}"
        try:
            args, extra = _gdr_inputs(lens, dtype, dev, hk=heads, hv=heads, dk=dim, dv=dim)
            out, final = gated_delta_rule_triton(*args, output_final_state=True, **extra)
            ref, ref_final = gated_delta_rule_ref(*map(_up, args), output_final_state=True, **extra)
            s.check(name, out, ref, dtype)
            s.check(name + " final state", final, ref_final, dtype)
        except Exception as exc:
            s.fail(f"{name} [{str(dtype).split('.')[-1]}]", exc)
    name = f"causal_conv1d C={channels} K=4 states"
    try:
        lens = conv or [1, 2, 3, 4, 65, 300] + [rng.randint(1, 500) for _ in range(10)]
        x = torch.randn(sum(lens), channels, dtype=dtype, device=dev)
        w = torch.randn(channels, 4, dtype=dtype, device=dev)
        st = torch.randn(2, channels, 3, dtype=dtype, device=dev)
        idx = torch.randint(-1, 2, (len(lens),), dtype=torch.int32, device=dev)
        cu = cu_seqlens(lens, dev)
        out, fin = causal_conv1d_triton(x, w, cu, initial_state=st, state_index=idx, output_final_state=True)
        ref, ref_fin = causal_conv1d_ref(x.float(), w.float(), cu, initial_state=st.float(), state_index=idx,
                                         output_final_state=True)
        s.check(name, out, ref, dtype)
        s.check(name + " final state", fin, ref_fin, dtype)
    except Exception as exc:
        s.fail(f"{name} [{str(dtype).split('.')[-1]}]", exc)


def timings(s, n_docs=1024, baseline_docs=128, dev="cuda", lo=64, hi=448, heads=16, dim=128, channels=6144):
    from kernels.causal_conv1d import causal_conv1d_ref, causal_conv1d_triton
    from kernels.gated_delta_rule import _chunked_torch, chunk_plan, gated_delta_rule_triton

    bf16 = torch.bfloat16
    lens = rerank_lengths(n_docs, lo, hi)
    for n, with_base in ((baseline_docs, True), (n_docs, False)):
        sub = lens[:n]
        args, extra = _gdr_inputs(sub, bf16, dev, n_states=1, hk=heads, hv=heads, dk=dim, dv=dim)
        extra["state_index"].zero_()  # every document starts from the shared prefix's state
        plan = chunk_plan(sub, dev)
        t = sum(sub)
        # chunked form: ~ (4 C^2 (Dk + Dv) / 2 + 4 C Dk Dv) FLOP per chunk-head, counted as 6 matmuls of C x D x D
        flops = 2 * t * heads * (64 * dim * 3 + dim * dim * 3)
        base = None
        if with_base:
            base = s.time(f"gated_delta_rule {n} docs ({t} tok): torch chunked",
                          lambda: _chunked_torch(*args, **extra), flops=flops)
        s.time(f"gated_delta_rule {n} docs ({t} tok): triton", lambda: gated_delta_rule_triton(*args, plan=plan, **extra),
               flops=flops, baseline_ms=base)
    lens = lens[:256]  # the torch reference works in fp32 on [T, C] copies
    t = sum(lens)
    x = torch.randn(t, channels, dtype=bf16, device=dev)
    w = torch.randn(channels, 4, dtype=bf16, device=dev)
    st = torch.randn(1, channels, 3, dtype=bf16, device=dev)
    idx = torch.zeros(len(lens), dtype=torch.int32, device=dev)
    cu = cu_seqlens(lens, dev)
    nbytes = 2 * x.numel() * 2
    base = s.time(f"causal_conv1d T={t} C={channels}: torch", lambda: causal_conv1d_ref(x, w, cu, initial_state=st, state_index=idx),
                  nbytes=nbytes)
    s.time(f"causal_conv1d T={t} C={channels}: triton",
           lambda: causal_conv1d_triton(x, w, cu, initial_state=st, state_index=idx), nbytes=nbytes, baseline_ms=base)
