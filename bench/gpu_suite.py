#!/usr/bin/env python
"""One GPU session's worth of kernel checks (at most about 8 minutes on an H100/H200).

0. the compile check: kernels/aot.py --arch 90 (every kernel, every served
   shape; shared memory, registers, spills, grid and int64 limits);
1. correctness of every Triton kernel in bf16 and fp16 against its torch
   reference on the GPU (relative error ||out - ref|| / ||ref||; the attention
   reference runs on fp32 copies of the same inputs);
2. timings (triton.testing.do_bench, median) at the rerank-1k shapes (1024
   documents of 64-448 tokens behind a 64-token shared prefix, Qwen3-0.6B:
   Hq 16, Hkv 8, D 128, hidden 1024) and at 8 x 4096 (H 16, D 128, causal and
   bidirectional) against torch SDPA, a sweep of attention tile configs, and
   the yes/no head against full-vocabulary logits;
3. end to end, as subprocesses (failures are recorded, not fatal), within the
   time left of --budget-s: rerank-1k and the 100-document p50 latency for
   Qwen3-Reranker-0.6B (eager and compile=True), Qwen3-Reranker-4B and XLM-R large
   (eager and compile=True), as bench/RESULTS.md's GPU table, and Qwen3-Embedding-0.6B;
4. a table last, and everything as JSON in $OUT/gpu_suite.json (or --json).

Exit status: 1 if any correctness check failed, 2 without CUDA, else 0.
"""
import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench" / "kernels")]

TOL = {"bfloat16": 1e-2, "float16": 3e-3, "float32": 1e-4}
DEV = "cuda"
# Problem sizes (module-level so that a CPU smoke run of this script can shrink them).
SIZES = dict(rerank_docs=1024, rerank_lo=64, rerank_hi=448, prefix=64, long_batch=8, long_len=4096, long_heads=16,
             n_check=1000, ragged_extra=24)
# (block_m, block_n, num_warps, num_stages) tried for d=128 attention
# (the d=128 default, kernels.attention.attention_config, is (128, 64, 8, 3))
SWEEP = [(128, 128, 8, 3), (128, 64, 4, 3), (128, 32, 4, 4), (64, 64, 4, 3), (128, 64, 8, 4)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-sweep", action="store_true", help="skip the attention tile-config sweep")
    p.add_argument("--skip-e2e", action="store_true", help="do not run bench/e2e_*.py")
    p.add_argument("--e2e-timeout", type=float, default=150.0, help="seconds per end-to-end script (default 150)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="wall-clock budget of the whole suite; end-to-end runs stop when it is spent (default 480)")
    p.add_argument("--skip-aot", action="store_true", help="skip the ahead-of-time compile check")
    p.add_argument("--with-tests", action="store_true",
                   help="also run tests/kernels compiled on the GPU (TRITON_INTERPRET=0; compile-heavy)")
    p.add_argument("--json", default=None, help="results file (default $OUT/gpu_suite.json when $OUT is set)")
    return p.parse_args(argv)


class Suite:
    def __init__(self):
        self.correct, self.timings, self.e2e, self.errors = [], [], [], []
        self.t0 = time.time()

    # -- recording -----------------------------------------------------------------
    def check(self, name, out, ref, dtype):
        from kernel_workloads import rel_err

        name = f"{name} [{str(dtype).split('.')[-1]}]"
        err = rel_err(out, ref)
        tol = TOL[str(dtype).split(".")[-1]]
        ok = err <= tol
        self.correct.append(dict(name=name, rel_err=err, tol=tol, ok=ok))
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: rel err {err:.2e} (tol {tol:.0e})", flush=True)
        return ok

    def fail(self, name, exc):
        msg = "".join(traceback.format_exception_only(type(exc), exc)).strip()[-600:]
        self.correct.append(dict(name=name, rel_err=None, tol=None, ok=False, error=msg))
        print(f"  FAIL {name}: {msg}", flush=True)

    def time(self, name, fn, flops=None, nbytes=None, baseline_ms=None, **info):
        import triton.testing

        try:
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        except Exception as exc:  # a config out of resources must not stop the suite
            msg = "".join(traceback.format_exception_only(type(exc), exc)).strip()[-400:]
            self.timings.append(dict(name=name, error=msg, **info))
            print(f"  ERR  {name}: {msg}", flush=True)
            return None
        row = dict(name=name, ms=ms, **info)
        if flops is not None:
            row["tflops"] = flops / ms / 1e9
        if nbytes is not None:
            row["gbps"] = nbytes / ms / 1e6
        if baseline_ms is not None:
            row["speedup_vs_torch"] = baseline_ms / ms
        self.timings.append(row)
        rate = f" {row['tflops']:.1f} TFLOP/s" if "tflops" in row else (f" {row['gbps']:.0f} GB/s" if "gbps" in row else "")
        ratio = f" x{row['speedup_vs_torch']:.2f} vs torch" if "speedup_vs_torch" in row else ""
        print(f"  {name}: {ms * 1e3:.1f} us{rate}{ratio}", flush=True)
        return ms

    def section(self, title):
        print(f"\n== {title} (t={time.time() - self.t0:.0f}s)", flush=True)


def _empty_cache():
    import torch

    if DEV == "cuda":
        torch.cuda.empty_cache()


def _cfg_kwargs(cfg):
    return {} if cfg is None else dict(zip(("block_m", "block_n", "num_warps", "num_stages"), cfg))


def _upcast(args, extra):
    return ([t.float() if t.is_floating_point() else t for t in args],
            {n: (t.float() if t.is_floating_point() else t) for n, t in extra.items()})


# -- 1. correctness -------------------------------------------------------------------

def check_elementwise(s, dtype):
    import torch

    from kernels.qk_norm_rope import qk_norm_rope_ref, qk_norm_rope_triton, rope_cos_sin
    from kernels.rms_norm import rms_norm_ref, rms_norm_triton
    from kernels.swiglu import swiglu_ref, swiglu_triton
    from kernels.yes_no_head import yes_no_head_ref, yes_no_head_triton

    dev = DEV
    for t, h, offset in ((SIZES["n_check"], 1024, 0.0), (333, 2560, 1.0), (77, 341, 0.0)):
        name = f"rms_norm T={t} H={h} off={offset}"
        try:
            x = torch.randn(t, h, dtype=dtype, device=dev)
            r = torch.randn_like(x)
            w = torch.randn(h, dtype=dtype, device=dev)
            out, res = rms_norm_triton(x, w, 1e-6, residual=r, offset=offset)
            ref, ref_res = rms_norm_ref(x, w, 1e-6, residual=r, offset=offset)
            s.check(name, out, ref, dtype)
            s.check(name + " residual", res, ref_res, dtype)
            s.check(name + " no-res", rms_norm_triton(x, w, 1e-6)[0], rms_norm_ref(x, w, 1e-6)[0], dtype)
        except Exception as exc:
            s.fail(name, exc)
    for t, i in ((777, 3072), (50, 41), (4096, 9728)):
        name = f"swiglu T={t} I={i}"
        try:
            gu = 3 * torch.randn(t, 2 * i, dtype=dtype, device=dev)
            s.check(name, swiglu_triton(gu), swiglu_ref(gu), dtype)
        except Exception as exc:
            s.fail(name, exc)
    for hq, hkv, d, norm in ((16, 8, 128, True), (32, 8, 128, True), (4, 1, 256, True), (12, 12, 64, False)):
        name = f"qk_norm_rope Hq={hq} Hkv={hkv} D={d} norm={norm}"
        try:
            t = SIZES["n_check"]
            qkv = torch.randn(t, (hq + 2 * hkv) * d, dtype=dtype, device=dev)
            cos, sin = rope_cos_sin(torch.randint(0, 32768, (t,), device=dev), d, 1e6)
            qw = torch.randn(d, dtype=dtype, device=dev) if norm else None
            kw = torch.randn(d, dtype=dtype, device=dev) if norm else None
            a, b = qkv.clone(), qkv.clone()
            qk_norm_rope_triton(a, qw, kw, cos, sin, hq, hkv, d, 1e-6)
            qk_norm_rope_ref(b, qw, kw, cos, sin, hq, hkv, d, 1e-6)
            s.check(name, a, b, dtype)
        except Exception as exc:
            s.fail(name, exc)
    for h, res in ((1024, False), (2560, True), (41, True)):
        name = f"yes_no_head H={h} residual={res}"
        try:
            hid = torch.randn(5000, h, dtype=dtype, device=dev)
            r = torch.randn_like(hid) if res else None
            nw = torch.randn(h, dtype=dtype, device=dev)
            w = torch.randn(h, device=dev) / h**0.5
            last = torch.randint(0, 5000, (300,), device=dev)
            logit, score = yes_no_head_triton(hid, last, nw, w, 1e-6, residual=r, offset=1.0)
            ref_logit, ref_score = yes_no_head_ref(hid, last, nw, w, 1e-6, residual=r, offset=1.0)
            s.check(name + " logit", logit, ref_logit, dtype)
            s.check(name + " score", score, ref_score, dtype)
        except Exception as exc:
            s.fail(name, exc)


def _attn_case(s, name, dtype, lens_q, lens_k, hq, hkv, d, causal, prefix=None, **kw):
    from kernel_workloads import attention_inputs

    from kernels.attention import varlen_attention_ref, varlen_attention_triton

    try:
        args, extra = attention_inputs(lens_q, lens_k, hq, hkv, d, dtype, DEV, *(prefix or (None, None)))
        scale = d**-0.5
        out = varlen_attention_triton(*args, causal=causal, scale=scale, **extra, **kw)
        up, up_extra = _upcast(args, extra)
        ref = varlen_attention_ref(*up, causal=causal, scale=scale, **up_extra)
        return s.check(name, out, ref, dtype)
    except Exception as exc:
        s.fail(f"{name} [{str(dtype).split('.')[-1]}]", exc)
        return False


def check_attention(s, dtype):
    import random

    rng = random.Random(1)
    ragged = [1, 2, 17, 127, 129, 448, 64, 300] + [rng.randint(1, 500) for _ in range(SIZES["ragged_extra"])]
    seg_index = [rng.choice([-1, 0, 1, 2]) for _ in ragged]
    prefix = ([64, 1, 130], seg_index)
    for use_desc in (False, True):
        tag = "tma" if use_desc else "ptr"
        _attn_case(s, f"attn {tag} causal prefix Hq16 Hkv8 D128", dtype, ragged, ragged, 16, 8, 128, True, prefix,
                   use_desc=use_desc)
        _attn_case(s, f"attn {tag} bidir Hq12 Hkv12 D64", dtype, ragged, ragged, 12, 12, 64, False,
                   use_desc=use_desc)
        _attn_case(s, f"attn {tag} causal prefix Hq4 Hkv1 D256", dtype, ragged[:12], ragged[:12], 4, 1, 256, True,
                   ([40], [0] * 12), use_desc=use_desc)
    _attn_case(s, "attn bidir Hq12 Hkv12 D32", dtype, ragged, ragged, 12, 12, 32, False)
    _attn_case(s, "attn causal Lk>Lq Hq32 Hkv8 D128", dtype, ragged[:10], [n + 37 for n in ragged[:10]], 32, 8, 128, True)
    _attn_case(s, "attn causal odd D80", dtype, ragged[:10], ragged[:10], 8, 2, 80, True)


# -- KaLM-Reranker paged cross-attention (kernels/paged_attention.py): checks + timings --------
# Nano shape: Hq 4, Hkv 1, D 256. Decoder: ~75-token prompts, causal (window 512 on sliding
# layers) + cross rows of the passage (r = 4) read through shuffled block tables of a
# [blocks, layers, 2, 16, Hkv, D] pool. Encoder: passages of 64-452 tokens, bidirectional,
# sliding window 512 -> visible offsets (-257, 256).
PAGED_CONFIGS = [(64, 32, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2), (32, 32, 4, 3)]


def _paged_inputs(lens, cross, dtype, hq=4, hkv=1, d=256, page=16, layers=18):
    import math
    import random

    import torch

    qkv = torch.randn(sum(lens), hq + 2 * hkv, d, dtype=dtype, device=DEV)
    cu = torch.tensor([0] + list(lens), device=DEV).cumsum(0).to(torch.int32)
    if cross is None:
        return (qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:], cu), {}
    need = [max(1, math.ceil(n / page)) for n in cross]
    pool = torch.randn(sum(need) + 7, layers, 2, page, hkv, d, dtype=dtype, device=DEV)
    perm = random.Random(0).sample(range(pool.shape[0]), sum(need))
    table, off = torch.zeros(len(cross), max(need), dtype=torch.int32), 0
    for i, nb in enumerate(need):
        table[i, :nb] = torch.tensor(perm[off:off + nb], dtype=torch.int32)
        off += nb
    extra = dict(k_cache=pool[:, 5, 0], v_cache=pool[:, 5, 1], block_tables=table.to(DEV),
                 cross_lens=torch.tensor(cross, dtype=torch.int32, device=DEV))
    return (qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:], cu), extra


def _paged_workload(n, decoder):
    import random

    rng = random.Random(3)
    docs = [rng.randint(64, 448) + 4 for _ in range(n)]  # "<Document>: " + 64-448 tokens
    if decoder:
        return [rng.randint(70, 80) for _ in range(n)], [-(-x // 4) for x in docs]
    return docs, None


def paged_attention_suite(s):
    import torch
    import torch.nn.functional as F

    from kernels.paged_attention import paged_attention_ref, paged_attention_triton

    windows = {"decoder": ((512, 1), (None, 1)), "encoder": ((256, 257), (None, None))}
    for dtype in (torch.bfloat16, torch.float16):
        for kind, n in (("decoder", 200), ("encoder", 40)):
            lens, cross = _paged_workload(n, kind == "decoder")
            for left, right in windows[kind]:
                name = f"paged attn {kind} window ({left}, {right})"
                try:
                    args, extra = _paged_inputs(lens, cross, dtype)
                    out = paged_attention_triton(*args, scale=256**-0.5, window_left=left, window_right=right, **extra)
                    up, up_extra = _upcast(args, extra)
                    ref = paged_attention_ref(*up, scale=256**-0.5, window_left=left, window_right=right, **up_extra)
                    s.check(name, out, ref, dtype)
                except Exception as exc:
                    s.fail(f"{name} [{str(dtype).split('.')[-1]}]", exc)
    bf16 = torch.bfloat16
    for kind, (left, right) in (("decoder", (512, 1)), ("encoder", (256, 257))):
        lens, cross = _paged_workload(SIZES["rerank_docs"], kind == "decoder")
        cross_or0 = cross or [0] * len(lens)
        visible = sum(min(t + right, n) - max(t - left + 1, 0) + c for n, c in zip(lens, cross_or0) for t in range(n))
        flops = 4 * 4 * 256 * visible
        args, extra = _paged_inputs(lens, cross, bf16)
        # Baseline: padded SDPA over [own ; cross] keys already gathered contiguous (as transformers runs it).
        b, lq, lc = len(lens), max(lens), max(cross_or0)
        q = torch.randn(b, 4, lq, 256, dtype=bf16, device=DEV)
        kv = torch.randn(b, 1, lq + lc, 256, dtype=bf16, device=DEV)
        pos = torch.arange(lq, device=DEV)
        dist = pos[:, None] - pos[None, :]
        own = (dist < (left or 1 << 30)) & (dist > -(right or 1 << 30))
        mask = torch.cat((own.expand(b, lq, lq), torch.ones(b, lq, lc, dtype=torch.bool, device=DEV)), 2)[:, None]
        t_sdpa = s.time(f"rerank-1k paged attn {kind}: padded SDPA", functools.partial(
            F.scaled_dot_product_attention, q, kv, kv, attn_mask=mask, enable_gqa=True), flops=flops, shape=kind)
        del q, kv, mask
        for c in [None] + PAGED_CONFIGS:
            kw = {} if c is None else dict(zip(("block_m", "block_n", "num_warps", "num_stages"), c))
            s.time(f"rerank-1k paged attn {kind} triton {c or 'default'}", functools.partial(
                paged_attention_triton, *args, scale=256**-0.5, window_left=left, window_right=right,
                max_seqlen=max(lens), **extra, **kw), flops=flops, baseline_ms=t_sdpa, shape=kind, config=c)
        del args, extra
        _empty_cache()


# -- 2. timings -----------------------------------------------------------------------
# One function per problem, so that its device buffers are freed when it returns.

def time_rerank_attention(s, sweep):
    import torch

    from kernel_workloads import QWEN3_0_6B, attention_flops, attention_inputs, padded_sdpa_inputs, rerank_lengths, sdpa

    from kernels.attention import varlen_attention_ref, varlen_attention_triton

    bf16, cfg = torch.bfloat16, QWEN3_0_6B
    hq, hkv, d = cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"]
    # rerank-1k: 1024 docs of 64-448 tokens + one shared 64-token prefix
    lens = rerank_lengths(SIZES["rerank_docs"], SIZES["rerank_lo"], SIZES["rerank_hi"])
    n_p = SIZES["prefix"]
    flops = attention_flops(lens, lens, hq, d, True, [n_p] * len(lens))
    pq, pk, pv = padded_sdpa_inputs([n_p + n for n in lens], hq, hkv, d, bf16, DEV)
    t_sdpa = s.time("rerank-1k attn: padded SDPA (prefix recomputed)", functools.partial(sdpa, pq, pk, pv, True),
                    flops=flops, shape="rerank-1k")
    del pq, pk, pv
    _empty_cache()

    args, extra = attention_inputs(lens, lens, hq, hkv, d, bf16, DEV, [n_p], [0] * len(lens))
    call = functools.partial(varlen_attention_triton, *args, causal=True, scale=d**-0.5, **extra,
                             max_seqlen_q=max(lens), max_seqlen_k=max(lens))
    try:  # the timed problem itself must be right
        up, up_extra = _upcast(args, extra)
        s.check("rerank-1k attn output", call(), varlen_attention_ref(*up, causal=True, scale=d**-0.5, **up_extra), bf16)
        del up, up_extra
    except Exception as exc:
        s.fail("rerank-1k attn output", exc)
    for use_desc in (False, True):
        for c in [None] + (SWEEP if sweep else []):
            s.time(f"rerank-1k attn triton {'tma' if use_desc else 'ptr'} {c or 'default'}",
                   functools.partial(call, use_desc=use_desc, **_cfg_kwargs(c)),
                   flops=flops, baseline_ms=t_sdpa, shape="rerank-1k", use_desc=use_desc, config=c)


def time_long_attention(s, sweep):
    import torch

    from kernel_workloads import attention_inputs, sdpa

    from kernels.attention import varlen_attention_triton

    bf16, d = torch.bfloat16, 128
    b, n, h = SIZES["long_batch"], SIZES["long_len"], SIZES["long_heads"]
    args, _ = attention_inputs([n] * b, [n] * b, h, h, d, bf16, DEV)
    q4, k4, v4 = (t.view(b, n, h, d).transpose(1, 2).contiguous() for t in args[:3])
    for causal in (True, False):
        tag = "causal" if causal else "bidir"
        flops = 4 * b * h * n * n * d // (2 if causal else 1)
        t_ref = s.time(f"{b}x{n} {tag}: SDPA", functools.partial(sdpa, q4, k4, v4, causal), flops=flops,
                       shape=f"{b}x{n}-{tag}")
        call = functools.partial(varlen_attention_triton, *args, causal=causal, scale=d**-0.5,
                                 max_seqlen_q=n, max_seqlen_k=n)
        try:
            ref = sdpa(q4, k4, v4, causal).transpose(1, 2).reshape(b * n, h, d)
            s.check(f"{b}x{n} {tag} attn output vs SDPA", call(), ref, bf16)
        except Exception as exc:
            s.fail(f"{b}x{n} {tag} attn output", exc)
        for use_desc in (False, True):
            for c in [None] + (SWEEP if sweep and causal else []):
                s.time(f"{b}x{n} {tag} triton {'tma' if use_desc else 'ptr'} {c or 'default'}",
                       functools.partial(call, use_desc=use_desc, **_cfg_kwargs(c)),
                       flops=flops, baseline_ms=t_ref, shape=f"{b}x{n}-{tag}", use_desc=use_desc, config=c)


def check_sweep(s):
    # Every swept tile config must be right too (small ragged problem, shared prefix, GQA 2).
    import random

    import torch

    rng = random.Random(2)
    ragged = [1, 17, 129, 448] + [rng.randint(1, 500) for _ in range(12)]
    for c in SWEEP:
        for use_desc in (False, True):
            _attn_case(s, f"attn sweep cfg {c} {'tma' if use_desc else 'ptr'}", torch.bfloat16, ragged, ragged,
                       16, 8, 128, True, ([64], [0] * len(ragged)), use_desc=use_desc, **_cfg_kwargs(c))


def _rerank_tokens():
    from kernel_workloads import rerank_lengths

    return rerank_lengths(SIZES["rerank_docs"], SIZES["rerank_lo"], SIZES["rerank_hi"])


def time_rms_norm(s, tokens, hidden):
    import torch

    from kernels.rms_norm import rms_norm_ref, rms_norm_triton

    x = torch.randn(tokens, hidden, dtype=torch.bfloat16, device=DEV)
    r = torch.randn_like(x)
    w = torch.randn(hidden, dtype=torch.bfloat16, device=DEV)
    nbytes = 4 * x.numel() * 2  # read x, r; write out, x + r
    t_ref = s.time(f"rms_norm+res T={tokens} H={hidden}: torch",
                   functools.partial(rms_norm_ref, x, w, 1e-6, residual=r), nbytes=nbytes)
    s.time(f"rms_norm+res T={tokens} H={hidden}: triton",
           functools.partial(rms_norm_triton, x, w, 1e-6, residual=r), nbytes=nbytes, baseline_ms=t_ref)


def time_swiglu(s, tokens, inter):
    import torch

    from kernels.swiglu import swiglu_ref, swiglu_triton

    gate_up = torch.randn(tokens, 2 * inter, dtype=torch.bfloat16, device=DEV)
    nbytes = 3 * tokens * inter * 2
    t_ref = s.time(f"swiglu T={tokens} I={inter}: torch", functools.partial(swiglu_ref, gate_up), nbytes=nbytes)
    s.time(f"swiglu T={tokens} I={inter}: triton", functools.partial(swiglu_triton, gate_up), nbytes=nbytes,
           baseline_ms=t_ref)


def time_qk_norm_rope(s, tokens, hq, hkv, d):
    import torch

    from kernels.qk_norm_rope import qk_norm_rope_ref, qk_norm_rope_triton, rope_cos_sin

    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, dtype=torch.bfloat16, device=DEV)
    cos, sin = rope_cos_sin(torch.arange(tokens, device=DEV) % 512, d, 1e6)
    qw = torch.randn(d, dtype=torch.bfloat16, device=DEV)
    kw = torch.randn(d, dtype=torch.bfloat16, device=DEV)
    nbytes = 2 * tokens * (hq + hkv) * d * 2 + 2 * cos.numel() * 4  # q, k read + written in place
    op_args = (qkv, qw, kw, cos, sin, hq, hkv, d, 1e-6)
    t_ref = s.time(f"qk_norm_rope T={tokens}: torch", functools.partial(qk_norm_rope_ref, *op_args), nbytes=nbytes)
    s.time(f"qk_norm_rope T={tokens}: triton", functools.partial(qk_norm_rope_triton, *op_args), nbytes=nbytes,
           baseline_ms=t_ref)


def time_yes_no_head(s, lens, hidden, vocab):
    import torch

    from kernel_workloads import NO_ID, YES_ID, cu_seqlens, yes_no_full_vocab

    from kernels.yes_no_head import yes_no_head_triton

    bf16 = torch.bfloat16
    cu = cu_seqlens(lens, DEV)
    states = torch.randn(int(cu[-1]), hidden, dtype=bf16, device=DEV)
    last = (cu[1:] - 1).long()
    norm_w = torch.randn(hidden, dtype=bf16, device=DEV)
    lm_head = torch.randn(vocab, hidden, dtype=bf16, device=DEV) / hidden**0.5
    w = lm_head[YES_ID].float() - lm_head[NO_ID].float()
    full = functools.partial(yes_no_full_vocab, states, last, norm_w, lm_head, 1e-6)
    fused = functools.partial(yes_no_head_triton, states, last, norm_w, w, 1e-6)
    t_ref = s.time(f"yes/no head n={len(lens)}: full-vocab logits ({vocab})", full)
    s.time(f"yes/no head n={len(lens)}: triton fused", fused, baseline_ms=t_ref)
    try:  # same scores as the full-vocabulary path (which rounds the normed rows to bf16)
        s.check("yes/no head vs full-vocab score", fused()[1], full()[1], bf16)
    except Exception as exc:
        s.fail("yes/no head vs full-vocab score", exc)


def time_elementwise(s):
    from kernel_workloads import QWEN3_0_6B as cfg

    lens = _rerank_tokens()
    tokens = sum(lens)  # the rerank-1k packed batch
    for fn, fn_args in ((time_rms_norm, (tokens, cfg["hidden"])),
                        (time_swiglu, (tokens, cfg["intermediate"])),
                        (time_qk_norm_rope, (tokens, cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"])),
                        (time_yes_no_head, (lens, cfg["hidden"], cfg["vocab"]))):
        fn(s, *fn_args)
        _empty_cache()


# -- 3. end to end --------------------------------------------------------------------

# (script, arguments): the GPU table's rows, most important first (the budget may cut the tail).
E2E = [
    ("e2e_rerank.py", ["--shape", "0.6B", "--compile", "both", "--latency-docs", "100"]),
    ("e2e_crossencoder.py", ["--family", "xlmr", "--compile", "both", "--latency-docs", "100"]),
    ("e2e_rerank.py", ["--shape", "4B", "--docs", "256", "--latency-docs", "100", "--latency-reps", "5"]),
    ("e2e_embed.py", ["--shape", "0.6B"]),
]


def _subprocess_row(row, argv, timeout, out_json=None):
    t0 = time.time()
    try:
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if out_json and os.path.exists(out_json):
            with open(out_json) as f:
                row["results"] = json.load(f)
        row.update(status="ok" if proc.returncode == 0 else "failed", rc=proc.returncode,
                   stdout_tail=proc.stdout[-3000:], stderr_tail=proc.stderr[-3000:])
    except subprocess.TimeoutExpired as exc:
        tail = exc.stdout or b""  # bytes even with text=True
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        row.update(status="timeout", stdout_tail=tail[-3000:])
    except Exception as exc:
        row.update(status="error", error=repr(exc))
    row["wall_s"] = time.time() - t0
    print(f"  {row['cmd']}: {row['status']} ({row['wall_s']:.0f}s)", flush=True)
    if row.get("stdout_tail"):
        print("    " + "\n    ".join(row["stdout_tail"].strip().splitlines()[-12:]), flush=True)
    return row


def run_aot(s, timeout=150.0):
    """The ahead-of-time compile check for sm_90 first: a kernel that cannot compile or launch at a
    served shape shows here before any timing."""
    with tempfile.TemporaryDirectory() as tmp:
        out_json = os.path.join(tmp, "aot.json")
        argv = [sys.executable, "-m", "kernels.aot", "--arch", "90", "--json", out_json,
                "--jobs", str(max(2, min(16, os.cpu_count() or 2)))]
        row = _subprocess_row(dict(script="aot_compile.py", cmd="python -m kernels.aot --arch 90"),
                              argv, timeout, out_json)
    if row["status"] != "ok":
        s.fail("aot compile check", RuntimeError(row.get("stdout_tail", row.get("error", ""))[-500:]))
    row.pop("results", None)  # the full table is long; its summary is in the stdout tail
    s.e2e.append(row)


def run_e2e(s, timeout, deadline):
    for script, argv in E2E:
        path = ROOT / "bench" / script
        row = dict(script=script, cmd=f"python bench/{script} " + " ".join(argv))
        left = deadline - time.time()
        if not path.exists():
            row.update(status="absent")
        elif left < 30:
            row.update(status="skipped (suite budget spent)")
            print(f"  {row['cmd']}: {row['status']}", flush=True)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                out_json = os.path.join(tmp, "e2e.json")
                _subprocess_row(row, [sys.executable, str(path), *argv, "--json", out_json],
                                min(timeout, left), out_json)
        s.e2e.append(row)


def run_tests(s):
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/kernels", "-q", "-x", "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    ok = proc.returncode == 0
    s.correct.append(dict(name="pytest tests/kernels (compiled)", ok=ok, rel_err=None, tol=None,
                          tail=proc.stdout[-2000:]))
    print(f"  {'ok' if ok else 'FAIL'}: {proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]}")


# -- 4. report ------------------------------------------------------------------------

def e2e_table(rows):
    """The GPU table: pairs/s on rerank-1k (ours eager / compiled / transformers) and the
    p50 of one request (100 documents), from the end-to-end scripts' JSON."""
    def rate(r):
        return f"{r['pairs_per_s']:,.0f}" if r else "-"

    def p50(r):
        return f"{r['latency']['p50_ms']:.0f} ms" if r and "latency" in r else "-"

    out = ["| shape | transformers, model card | transformers, sorted (+ last token) | ours eager | "
           "ours compile | ratio (best ours / best ref) | 100-doc p50: ours eager / compile / ref |",
           "|---|---|---|---|---|---|---|"]
    for e in rows:
        res = e.get("results")
        if not res or "ours" not in res:
            continue
        ours = res["ours"]
        eager = next((v for k, v in ours.items() if not k.endswith("compile")), None)
        comp = next((v for k, v in ours.items() if k.endswith("compile")), None)
        card = res.get("transformers, model-card code")
        sorted_ = res.get("transformers, sorted + last token only") or res.get("reference")
        refs = [r["pairs_per_s"] for r in (card, sorted_) if r]
        best = max([r["pairs_per_s"] for r in (eager, comp) if r] or [0])
        ratio = f"{best / max(refs):.2f}x" if refs and best else "-"
        shape = res.get("shape") or f"{res.get('family')} ({res.get('layers')} layers)"
        ref_lat = p50(sorted_) if sorted_ and "latency" in sorted_ else p50(card)
        out.append(f"| {e['script']} {shape} | {rate(card)} | {rate(sorted_)} | {rate(eager)} | {rate(comp)} | "
                   f"{ratio} | {p50(eager)} / {p50(comp)} / {ref_lat} |")
    return out if len(out) > 2 else []


def report(s, meta, path):
    n_bad = sum(not c["ok"] for c in s.correct)
    print("\n" + "=" * 100)
    print(f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {time.time() - s.t0:.0f}s")
    print(f"correctness: {len(s.correct) - n_bad}/{len(s.correct)} passed")
    for c in s.correct:
        if not c["ok"]:
            print(f"  FAIL {c['name']}: {c.get('error') or c.get('rel_err')}")
    print(f"{'timing':<62} {'us':>10} {'TFLOP/s':>9} {'GB/s':>8} {'vs torch':>9}")
    for t in s.timings:
        if "error" in t:
            print(f"{t['name'][:62]:<62} {'error':>10}")
            continue
        tf = f"{t['tflops']:.1f}" if "tflops" in t else ""
        gb = f"{t['gbps']:.0f}" if "gbps" in t else ""
        sp = f"x{t['speedup_vs_torch']:.2f}" if "speedup_vs_torch" in t else ""
        print(f"{t['name'][:62]:<62} {t['ms'] * 1e3:>10.1f} {tf:>9} {gb:>8} {sp:>9}")
    for e in s.e2e:
        print(f"e2e {e['script']:<20} {e['status']}" + (f" {e['wall_s']:.0f}s" if "wall_s" in e else ""))
    for line in e2e_table(s.e2e):
        print(line)
    if path:
        with open(path, "w") as f:
            json.dump(dict(meta=meta, correctness=s.correct, timings=s.timings, e2e=s.e2e,
                           wall_s=time.time() - s.t0), f, indent=1, default=str)
        print(f"results: {path}")
    return n_bad


def main(argv=None):
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("gpu_suite.py runs compiled kernels: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("gpu_suite.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    meta = dict(device=f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)",
                torch=torch.__version__, triton=triton.__version__, sweep=SWEEP, argv=sys.argv[1:])
    out_dir = os.environ.get("OUT")
    path = args.json or (os.path.join(out_dir, "gpu_suite.json") if out_dir else None)
    s = Suite()
    deadline = s.t0 + args.budget_s
    if not args.skip_aot:
        s.section("compile check (ahead of time, sm_90)")
        run_aot(s)
    try:
        for dtype in (torch.bfloat16, torch.float16):
            s.section(f"correctness {dtype}")
            check_elementwise(s, dtype)
            check_attention(s, dtype)
        if args.with_tests:
            s.section("pytest tests/kernels compiled")
            run_tests(s)
        s.section("timings: attention")
        time_rerank_attention(s, sweep=not args.no_sweep)
        _empty_cache()
        time_long_attention(s, sweep=not args.no_sweep)
        _empty_cache()
        if not args.no_sweep:
            check_sweep(s)
        s.section("timings: elementwise and head")
        time_elementwise(s)
        s.section("paged cross-attention (KaLM-Reranker): correctness and timings")
        paged_attention_suite(s)
        _empty_cache()
        import deltanet_workloads  # Gated DeltaNet kernels (Qwen3.5 / Prism-Reranker)

        s.section("Gated DeltaNet: correctness and timings")
        for dtype in (torch.bfloat16, torch.float16):
            deltanet_workloads.check(s, dtype)
        deltanet_workloads.timings(s)
    except Exception as exc:  # keep what we have; an unexpected crash counts as a failure
        s.fail("suite crashed", exc)
        traceback.print_exc()
    if not args.skip_e2e:
        s.section("end to end")
        run_e2e(s, args.e2e_timeout, deadline)
    n_bad = report(s, meta, path)
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
