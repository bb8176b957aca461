#!/usr/bin/env python
"""Ahead-of-time compile of every Triton kernel for NVIDIA sm_90 and sm_80, on CPUs only.

No GPU and no driver are needed; the CI runs this on 2 cores in a few minutes.

1. Record: each op's real host wrapper (the ``*_triton`` functions of kernels/) runs
   on ``meta`` tensors (shapes, strides, dtypes, storage offsets; no storage) at the
   shapes of the model families we serve, in bf16 and fp16. The config pickers
   (``*_config(..., device)``) are told the device is CUDA, and
   ``JITFunction.run`` records ``(kernel, grid, args, kwargs)`` instead of
   launching, so block sizes, warps and stages are the ones a GPU run picks.
2. Specialise: each launch goes through the binder of Triton's JIT
   (``create_function_from_signature`` + ``JITFunction._pack_args``), with a
   backend built for the target instead of the active driver: the same
   signature (i32 / i64 by value, pointer dtypes), constexprs (ints equal to 1
   included) and attributes (divisibility by 16 of ints and pointers) as
   ``JITFunction.run`` computes on that GPU.
3. Compile: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
   (sm_90 builds as sm_90a) with the ptxas bundled in the Triton wheel, as a JIT
   launch does. Identical specialisations compile once; a pool of 2 processes
   compiles them. Registers and spills come from the ptxas ``-v`` log
   (``knobs.nvidia.dump_ptxas_log``), shared memory, warps and stages from the
   compiled kernel's metadata.

Hard failures (exit status 1 unless listed in KNOWN_ISSUES or --allow):
  wrapper   the host wrapper raised on the case's meta tensors (nothing was launched);
  compile   the compile raised (Triton or ptxas error);
  smem      shared memory above the per-block limit (sm_90: 232,448 B, sm_80: 166,912 B);
  regs      more than 255 registers, or registers x threads above 65,536 (launch fails);
  grid      a grid dimension over its CUDA limit (x < 2^31, y and z <= 65,535);
  int64     a scalar integer argument >= 2^31 in magnitude (a stride or offset that needs
            int64: i32 at ordinary sizes, so the JIT compiles an i64 variant of the kernel
            for it, or truncates it where the parameter is annotated tl.int32).
  spill_limit  spills (the larger of stores / loads) above SPILL_LIMIT: any on sm_90, over 256 B on
            sm_80 (registers stay within the 255 a thread can have, at every family's shape).
The "stress" batch (1,024 sequences x 8,192 tokens) exercises grid and int64; it is
compiled too, since the divisibility of its sizes is a specialisation of its own.
Spills within the limit are reported (status SPILL) and fail only with --strict-spills.

    python -m kernels.aot                      # both archs, table, exit 1 on a new failure
    python -m kernels.aot --arch 90 --json out.json
"""
import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

KERNELS = Path(__file__).resolve().parent

ARCHS = (90, 80)
DTYPES = ("bfloat16", "float16")
SMEM_LIMIT = {90: 232_448, 80: 166_912}  # bytes per block (opt-in maximum)
MAX_REGS = 255  # per thread
REGS_PER_BLOCK = 65_536
GRID_LIMIT = (2**31 - 1, 65_535, 65_535)
SPILL_LIMIT = {90: 0, 80: 256}  # bytes of spill stores or loads a kernel may have
HARD = ("wrapper", "compile", "smem", "regs", "grid", "int64", "spill_limit")

# Known defects, tracked here so that CI stays green while they are open: a row whose
# every hard problem matches an entry prints as KNOWN FAIL (spills as "SPILL (known)").
# kernel: the @triton.jit function; kind: one of HARD or "spill"; arch: None for both;
# when: constexpr values the launch must have (all of them); up_to: the measured bytes
# (shared memory, or the larger of spill stores / loads) at which the entry was taken, so
# that growing past it is a new failure. Nothing here is fixed by this script.
KNOWN_ISSUES = [
    # None open. (The delta-rule prepare and scan spills and D128 attention's 24 B with a prefix on sm_80
    # were restructured away or are within SPILL_LIMIT; bench/RESULTS.md has the tables before and after.)
]


# -- Model families (the real shapes we serve) ----------------------------------------------------

QWEN3 = {
    "Qwen3-0.6B": dict(hidden=1024, heads=16, kv_heads=8, head_dim=128, inter=3072),
    "Qwen3-4B": dict(hidden=2560, heads=32, kv_heads=8, head_dim=128, inter=9728),
    "Qwen3-8B": dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, inter=12288),
}
BERT = {  # cross-encoders / embedders: bidirectional attention; norms and GELU stay in torch
    "MiniLM-L6": dict(hidden=384, heads=12),
    "XLM-R-large": dict(hidden=1024, heads=16),
}
T5GEMMA2 = {  # KaLM-Reranker: encoder windows, decoder [own ; paged cross] attention
    "T5Gemma2-270M": dict(hidden=640, heads=4, kv_heads=1, head_dim=256, window=512, layers=18),
    "T5Gemma2-1B": dict(hidden=1152, heads=4, kv_heads=1, head_dim=256, window=512, layers=26),
}
# Qwen3.5 (Prism-Reranker): gated attention (head_dim 256, partial rotary 64, done in torch)
# and Gated DeltaNet layers (key heads 16 of 128, value heads of 128, conv width 4).
# Attention head counts and MLP widths past 0.8B are our reading of the configs; only the
# GQA ratio (head packing) and the widths' powers of two change what compiles.
QWEN3_5 = {
    "Qwen3.5-0.8B": dict(hidden=1024, heads=8, kv_heads=2, head_dim=256, inter=3584, v_heads=16),
    "Qwen3.5-2B": dict(hidden=2048, heads=8, kv_heads=2, head_dim=256, inter=6144, v_heads=16),
    "Qwen3.5-4B": dict(hidden=2560, heads=16, kv_heads=4, head_dim=256, inter=9216, v_heads=32),
    "Qwen3.5-9B": dict(hidden=4096, heads=16, kv_heads=4, head_dim=256, inter=12288, v_heads=32),
}
LINEAR = dict(k_heads=16, k_dim=128, v_dim=128, conv=4)

# Qwen3-VL: the text model is Qwen3's layers (M-RoPE is a per-token cos/sin table: the same kernels);
# the vision tower runs q/k RoPE without norms and bidirectional attention per image (head_dim 64; 72
# on 8B, not a power of two), with "sequence lengths" of patches per image.
QWEN3_VL = {
    "Qwen3-VL-2B-text": dict(hidden=2048, heads=16, kv_heads=8, head_dim=128, inter=6144),
    "Qwen3-VL-8B-text": dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, inter=12288),
}
QWEN3_VL_VISION = {
    "Qwen3-VL-2B-vision": dict(hidden=1024, heads=16),
    "Qwen3-VL-8B-vision": dict(hidden=1152, heads=16),
}

# Batches (sequence lengths). prefill: ragged, T = 3673 (no multiple of 16); short: every
# sequence <= 32 tokens (delta-rule chunk 32); decode: one token each (chunk 16); stress:
# the grid / int32 check, 1,024 x 8,192 tokens (T = 2^23).
BATCHES = {
    "prefill": [5, 64, 200, 333, 1024, 2047],
    "short": [7, 19, 32, 31, 30],
    "decode": [1] * 64,
    "stress": [8192] * 1024,
}
PREFIX = 64  # tokens of the shared prefix (prefix K/V, prefix states)
PAGE = 16  # rows per block of KaLM's passage pool (engine/core/passages.py)
PASSAGE = 512  # cross rows per decoder prompt


# -- Recording launches ----------------------------------------------------------------------------

def _meta(*shape, dtype):
    import torch

    return torch.empty(shape, dtype=dtype, device="meta")


def qwen3_ops(c, lens, dt):
    """(op, thunk) pairs of a Qwen3 reranker / embedder batch, as engine/models/qwen3.py calls them."""
    import torch

    from kernels.attention import varlen_attention_triton
    from kernels.qk_norm_rope import qk_norm_rope_triton
    from kernels.rms_norm import rms_norm_triton
    from kernels.swiglu import swiglu_triton
    from kernels.yes_no_head import yes_no_head_triton

    f32, i32 = torch.float32, torch.int32
    t, n, h, d = sum(lens), len(lens), c["hidden"], c["head_dim"]
    hq, hkv = c["heads"], c["kv_heads"]
    x, w = _meta(t, h, dtype=dt), _meta(h, dtype=dt)
    qkv = _meta(t, (hq + 2 * hkv) * d, dtype=dt)
    view = qkv.view(t, hq + 2 * hkv, d)  # q, k, v: views of the fused projection, as qk_norm_rope returns
    q, k, v = view[:, :hq], view[:, hq : hq + hkv], view[:, hq + hkv :]
    cu = _meta(n + 1, dtype=i32)
    prefix = dict(prefix_k=_meta(PREFIX, hkv, d, dtype=dt), prefix_v=_meta(PREFIX, hkv, d, dtype=dt),
                  cu_seqlens_p=_meta(2, dtype=i32), prefix_index=_meta(n, dtype=i32))
    attn = dict(causal=True, scale=d ** -0.5)
    yield "rms_norm", lambda: rms_norm_triton(x, w, 1e-6)
    yield "rms_norm+residual", lambda: rms_norm_triton(x, w, 1e-6, residual=_meta(t, h, dtype=dt))
    yield "rms_norm last rows", lambda: rms_norm_triton(_meta(n, h, dtype=dt), w, 1e-6, residual=_meta(n, h, dtype=dt))
    yield "qk_norm_rope", lambda: qk_norm_rope_triton(qkv, _meta(d, dtype=dt), _meta(d, dtype=dt),
                                                      _meta(t, d // 2, dtype=f32), _meta(t, d // 2, dtype=f32),
                                                      hq, hkv, d, 1e-6)
    yield "attention causal", lambda: varlen_attention_triton(q, k, v, cu, cu, **attn)
    yield "attention causal+prefix", lambda: varlen_attention_triton(q, k, v, cu, cu, **attn, **prefix)
    yield "attention last token+prefix", lambda: varlen_attention_triton(
        _meta(n, hq, d, dtype=dt), k, v, _meta(n + 1, dtype=i32), cu, **attn, **prefix)
    yield "attention causal+prefix TMA", lambda: varlen_attention_triton(q, k, v, cu, cu, **attn, **prefix,
                                                                         use_desc=True)
    yield "swiglu", lambda: swiglu_triton(_meta(t, 2 * c["inter"], dtype=dt))
    yield "yes_no_head", lambda: yes_no_head_triton(_meta(n, h, dtype=dt), _meta(n, dtype=torch.int64), w,
                                                    _meta(h, dtype=f32), 1e-6, residual=_meta(n, h, dtype=dt))


def bert_ops(c, lens, dt):
    """MiniLM / XLM-R: bidirectional attention on the unbound [T, 3, nh, hd] projection (engine/models/bert.py)."""
    import torch

    from kernels.attention import varlen_attention_triton

    t, n, h, nh = sum(lens), len(lens), c["hidden"], c["heads"]
    q, k, v = _meta(t, 3 * h, dtype=dt).view(t, 3, nh, h // nh).unbind(1)
    cu = _meta(n + 1, dtype=torch.int32)
    yield "attention bidirectional", lambda: varlen_attention_triton(q, k, v, cu, cu, causal=False,
                                                                     scale=(h // nh) ** -0.5)


def t5gemma2_ops(c, lens, dt):
    """KaLM-Reranker (T5Gemma2): encoder windows, decoder own + paged cross keys (engine/models/t5gemma2.py)."""
    import torch

    from kernels.paged_attention import paged_attention_triton
    from kernels.qk_norm_rope import qk_norm_rope_triton
    from kernels.rms_norm import rms_norm_triton
    from kernels.yes_no_head import yes_no_head_triton

    f32, i32 = torch.float32, torch.int32
    t, n, h, d = sum(lens), len(lens), c["hidden"], c["head_dim"]
    hq, hkv, win = c["heads"], c["kv_heads"], c["window"]
    x, w = _meta(t, h, dtype=dt), _meta(h, dtype=dt)
    qkv = _meta(t, (hq + 2 * hkv) * d, dtype=dt)
    view = qkv.view(t, hq + 2 * hkv, d)
    q, k, v = view[:, :hq], view[:, hq : hq + hkv], view[:, hq + hkv :]
    cu = _meta(n + 1, dtype=i32)
    own = dict(scale=256 ** -0.5, max_seqlen=max(lens))
    # Cross K/V, "cache_kv" mode: the pool [blocks, layers, 2, page, Hkv, D], read in place.
    width = -(-PASSAGE // PAGE)
    pool = _meta(n * width + 8, c["layers"], 2, PAGE, hkv, d, dtype=dt)
    tables = dict(block_tables=_meta(n, width, dtype=i32), cross_lens=_meta(n, dtype=i32))
    pooled = dict(k_cache=pool[:, 3, 0], v_cache=pool[:, 3, 1], **tables)

    def states_mode(left, right):
        # Cross K/V projected per batch from pooled encoder states: k_norm(k) (a norm over
        # D of a strided view), v a view of the projection.
        nb = n * width
        kv = _meta(nb * PAGE, 2, hkv, d, dtype=dt)
        k_c, _ = rms_norm_triton(kv[:, 0], _meta(d, dtype=dt), 1e-6, offset=1.0)
        paged_attention_triton(q, k, v, cu, window_left=left, window_right=right, **own,
                               k_cache=k_c.view(nb, PAGE, hkv, d), v_cache=kv[:, 1].view(nb, PAGE, hkv, d), **tables)

    yield "rms_norm", lambda: rms_norm_triton(x, w, 1e-6, offset=1.0)
    yield "rms_norm+residual", lambda: rms_norm_triton(x, w, 1e-6, residual=_meta(t, h, dtype=dt), offset=1.0)
    yield "qk_norm_rope", lambda: qk_norm_rope_triton(qkv, _meta(d, dtype=f32), _meta(d, dtype=f32),
                                                      _meta(t, d // 2, dtype=f32), _meta(t, d // 2, dtype=f32),
                                                      hq, hkv, d, 1e-6)
    yield "encoder sliding", lambda: paged_attention_triton(q, k, v, cu, window_left=(win + 1) // 2,
                                                            window_right=win // 2 + 1, **own)
    yield "encoder full", lambda: paged_attention_triton(q, k, v, cu, **own)
    yield "decoder sliding+cross", lambda: paged_attention_triton(q, k, v, cu, window_left=win, window_right=1,
                                                                  **own, **pooled)
    yield "decoder full+cross", lambda: paged_attention_triton(q, k, v, cu, window_right=1, **own, **pooled)
    yield "decoder full+cross (states)", lambda: states_mode(None, 1)
    yield "yes_no_head", lambda: yes_no_head_triton(x, _meta(n, dtype=torch.int64), w, _meta(h, dtype=f32), 1e-6,
                                                    residual=_meta(t, h, dtype=dt), offset=1.0)


def qwen3_5_ops(c, lens, dt):
    """Prism-Reranker (Qwen3.5): gated attention and Gated DeltaNet layers (engine/models/qwen3_5.py)."""
    import torch

    from kernels.attention import varlen_attention_triton
    from kernels.causal_conv1d import causal_conv1d_triton
    from kernels.gated_delta_rule import chunk_plan, gated_delta_rule_triton
    from kernels.rms_norm import rms_norm_triton
    from kernels.swiglu import swiglu_triton
    from kernels.yes_no_head import yes_no_head_triton

    f32, i32 = torch.float32, torch.int32
    t, n, h, d = sum(lens), len(lens), c["hidden"], c["head_dim"]
    hq, hkv = c["heads"], c["kv_heads"]
    x, w = _meta(t, h, dtype=dt), _meta(h, dtype=dt)
    cu = _meta(n + 1, dtype=i32)
    # Gated attention: q, k come out of the partial RoPE (new tensors), v is a view of the projection.
    proj = _meta(t, hq * d * 2 + 2 * hkv * d, dtype=dt)
    q, k = _meta(t, hq, d, dtype=dt), _meta(t, hkv, d, dtype=dt)
    v = proj[:, hq * d * 2 + hkv * d :].view(t, hkv, d)
    prefix = dict(prefix_k=_meta(PREFIX, hkv, d, dtype=dt), prefix_v=_meta(PREFIX, hkv, d, dtype=dt),
                  cu_seqlens_p=_meta(2, dtype=i32), prefix_index=_meta(n, dtype=i32))
    attn = dict(causal=True, scale=d ** -0.5)
    # Gated DeltaNet: in_proj -> [qkv | z | b | a]; conv over qkv; q, k, v views of its output.
    lin = {**LINEAR, **c}  # a family may set its own linear-attention sizes (kernels/warmup.py does)
    hk, hv, dk, dv, width = lin["k_heads"], c["v_heads"], lin["k_dim"], lin["v_dim"], lin["conv"]
    key_dim, value_dim = hk * dk, hv * dv
    conv_dim = 2 * key_dim + value_dim
    mixed_in = _meta(t, conv_dim + value_dim + 2 * hv, dtype=dt)[:, :conv_dim]
    conv_w = _meta(conv_dim, 1, width, dtype=dt).view(conv_dim, -1)
    seq_of = _meta(t, dtype=i32)
    mixed = _meta(t, conv_dim, dtype=dt)
    gq = mixed[:, :key_dim].view(t, hk, dk)
    gk = mixed[:, key_dim : 2 * key_dim].view(t, hk, dk)
    gv = mixed[:, 2 * key_dim :].view(t, hv, dv)
    g, beta = _meta(t, hv, dtype=f32), _meta(t, hv, dtype=f32)
    plan = chunk_plan(lens, "meta")
    index = _meta(n, dtype=i32)
    # +state: a shared prefix's state read in place; +final: a prefix being captured;
    # +state+final: a decoding step (one state per sequence).
    conv_prefix = dict(initial_state=_meta(1, conv_dim, width - 1, dtype=dt), state_index=index)
    conv_decode = dict(initial_state=_meta(n, conv_dim, width - 1, dtype=dt), state_index=index,
                       output_final_state=True)
    gdr_prefix = dict(initial_state=_meta(1, hv, dk, dv, dtype=f32), state_index=index)
    gdr_decode = dict(initial_state=_meta(n, hv, dk, dv, dtype=f32), state_index=index, output_final_state=True)

    yield "rms_norm", lambda: rms_norm_triton(x, w, 1e-6, offset=1.0)
    yield "rms_norm+residual", lambda: rms_norm_triton(x, w, 1e-6, residual=_meta(t, h, dtype=dt), offset=1.0)
    yield "attention causal", lambda: varlen_attention_triton(q, k, v, cu, cu, **attn)
    yield "attention causal+prefix", lambda: varlen_attention_triton(q, k, v, cu, cu, **attn, **prefix)
    yield "attention causal+prefix TMA", lambda: varlen_attention_triton(q, k, v, cu, cu, **attn, **prefix,
                                                                         use_desc=True)
    yield "swiglu", lambda: swiglu_triton(_meta(t, 2 * c["inter"], dtype=dt))
    yield "conv1d", lambda: causal_conv1d_triton(mixed_in, conv_w, cu, seq_of=seq_of)
    yield "conv1d +state", lambda: causal_conv1d_triton(mixed_in, conv_w, cu, seq_of=seq_of, **conv_prefix)
    yield "conv1d +final", lambda: causal_conv1d_triton(mixed_in, conv_w, cu, seq_of=seq_of,
                                                               output_final_state=True)
    yield "conv1d +state+final", lambda: causal_conv1d_triton(mixed_in, conv_w, cu, seq_of=seq_of, **conv_decode)
    yield "delta rule", lambda: gated_delta_rule_triton(gq, gk, gv, g, beta, cu, plan=plan)
    yield "delta rule +state", lambda: gated_delta_rule_triton(gq, gk, gv, g, beta, cu, plan=plan, **gdr_prefix)
    yield "delta rule +final", lambda: gated_delta_rule_triton(gq, gk, gv, g, beta, cu, plan=plan,
                                                               output_final_state=True)
    yield "delta rule +state+final", lambda: gated_delta_rule_triton(gq, gk, gv, g, beta, cu, plan=plan, **gdr_decode)
    yield "yes_no_head", lambda: yes_no_head_triton(x, _meta(n, dtype=torch.int64), w, _meta(h, dtype=f32), 1e-6,
                                                    residual=_meta(t, h, dtype=dt), offset=1.0)


def qwen3_vl_vision_ops(c, lens, dt):
    """Qwen3-VL vision blocks (engine/models/qwen3_vl.py): 2D RoPE on q/k, no norms; attention per image."""
    import torch

    from kernels.attention import varlen_attention_triton
    from kernels.qk_norm_rope import qk_norm_rope_triton

    t, n, h, nh = sum(lens), len(lens), c["hidden"], c["heads"]
    d = h // nh
    qkv = _meta(t, 3 * h, dtype=dt)
    view = qkv.view(t, 3 * nh, d)
    q, k, v = view[:, :nh], view[:, nh : 2 * nh], view[:, 2 * nh :]
    cu = _meta(n + 1, dtype=torch.int32)
    yield "vision q/k rope", lambda: qk_norm_rope_triton(qkv, None, None, _meta(t, d // 2, dtype=torch.float32),
                                                         _meta(t, d // 2, dtype=torch.float32), nh, nh, d, 0.0)
    yield "vision attention", lambda: varlen_attention_triton(q, k, v, cu, cu, causal=False, scale=d ** -0.5)


FAMILIES = [(QWEN3, qwen3_ops), (BERT, bert_ops), (T5GEMMA2, t5gemma2_ops), (QWEN3_5, qwen3_5_ops),
            (QWEN3_VL, qwen3_ops), (QWEN3_VL_VISION, qwen3_vl_vision_ops)]


@contextlib.contextmanager
def recording(arch: int, sink: list):
    """Within: kernel launches append (fn, grid, args, kwargs) to ``sink`` instead of running, and
    the config pickers of kernels/ (``*_config(..., device)``) see a CUDA device of capability ``arch``."""
    import inspect

    import torch
    from triton.runtime.jit import JITFunction

    saved = []

    def patch(owner, name, value):
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def record(self, *args, grid, warmup, **kwargs):
        sink.append((self, grid, args, kwargs))

    def on_cuda(picker):
        params = list(inspect.signature(picker).parameters)
        at = params.index("device")

        def wrapped(*args, **kwargs):
            args = list(args)
            if "device" in kwargs:
                kwargs["device"] = torch.device("cuda")
            elif len(args) > at:
                args[at] = torch.device("cuda")
            return picker(*args, **kwargs)

        return wrapped

    try:
        patch(JITFunction, "run", record)
        patch(torch.cuda, "get_device_capability", lambda device=None: divmod(arch, 10))
        for module in _kernel_modules():
            for name, obj in list(vars(module).items()):
                if name.endswith("_config") and inspect.isfunction(obj) and \
                        "device" in inspect.signature(obj).parameters:
                    patch(module, name, on_cuda(obj))
        yield sink
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def _kernel_modules():
    import importlib

    return [importlib.import_module(f"kernels.{p.stem}") for p in sorted(KERNELS.glob("*.py"))
            if not p.stem.startswith("__")]


def record_launches(arch: int, dtypes=DTYPES, families=None):
    """Every launch of every case: dicts of family, op, batch, dtype and the raw launch."""
    import torch

    from kernels._dispatch import interpreted

    if interpreted():
        raise RuntimeError("TRITON_INTERPRET=1: the kernels are interpreted, not compiled; run this in a process "
                           "without it (python -m kernels.aot)")
    launches = []
    for table, ops in FAMILIES:
        for family, cfg in table.items():
            if families and not any(f.lower() in family.lower() for f in families):
                continue
            for dtype in dtypes:
                for batch, lens in BATCHES.items():
                    for op, thunk in ops(cfg, lens, getattr(torch, dtype)):
                        sink = []
                        try:
                            with recording(arch, sink):
                                thunk()
                        except Exception as exc:  # the wrapper itself failed on these shapes: a row too
                            launches.append(dict(family=family, op=op, batch=batch, dtype=dtype,
                                                 error=f"{type(exc).__name__}: {exc}"[:500]))
                            continue
                        for fn, grid, args, kwargs in sink:
                            launches.append(dict(family=family, op=op, batch=batch, dtype=dtype, fn=fn, grid=grid,
                                                 args=args, kwargs=kwargs))
    return launches


# -- Specialising as JITFunction.run does ----------------------------------------------------------

_BINDERS = {}


def specialize(fn, args, kwargs, arch: int):
    """(bound args, options, signature, constexprs, attrs) of a launch on ``sm_<arch>``: the code
    of ``JITFunction.run`` up to the compile, with a backend made for the target."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    key = (id(fn), arch)
    if key not in _BINDERS:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        _BINDERS[key] = (fn, backend, create_function_from_signature(fn.signature, fn.params, backend))
    _, backend, binder = _BINDERS[key]
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    return bound, options, signature, constexprs, attrs


# -- Compiling (in worker processes) ----------------------------------------------------------------

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _init_worker():
    os.environ.pop("TRITON_INTERPRET", None)
    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v's log
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas, and its log


def compile_job(job):
    """Compile one specialisation; returns its resources (or the error) as a dict."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name, signature, constexprs, attrs, options, arch = job
    fn = getattr(importlib.import_module(module), name)
    log = io.StringIO()
    t0 = time.time()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                    options=options)
    except Exception as exc:  # a Triton or ptxas error is a result, not a crash
        msg = f"{type(exc).__name__}: {exc}".strip()
        return dict(error=msg[:1500], seconds=time.time() - t0)
    text = log.getvalue()
    regs = _PTXAS_REGS.search(text)
    spills = _PTXAS_SPILLS.search(text)
    md = kernel.metadata
    return dict(
        regs=int(regs.group(1)) if regs else None,
        stack=int(spills.group(1)) if spills else None,
        spill_stores=int(spills.group(2)) if spills else None,
        spill_loads=int(spills.group(3)) if spills else None,
        smem=int(md.shared), warps=int(md.num_warps), stages=int(md.num_stages), seconds=time.time() - t0,
    )


# -- Checks ----------------------------------------------------------------------------------------

def _launch_problems(grid, bound, signature):
    """Grid limits and int32 scalars of one launch (independent of the compile)."""
    problems = []
    dims = tuple(grid) + (1,) * (3 - len(grid))
    for axis, (size, limit) in enumerate(zip(dims, GRID_LIMIT)):
        if size > limit:
            problems.append(("grid", f"grid {'xyz'[axis]} = {size:,} > {limit:,}", size))
    for name, value in bound.items():
        if signature.get(name) == "constexpr" or isinstance(value, bool) or not isinstance(value, int):
            continue
        if not -2**31 <= value < 2**31:  # i32 at ordinary sizes; here the JIT passes it as i64 (or truncates
            # it, where the parameter is annotated tl.int32)
            problems.append(("int64", f"{name} = {value:,} needs int64 (signature {signature[name]})", value))
    return problems


def _compile_problems(res, arch):
    """(kind, message, measured value) of one compile's result on ``sm_<arch>``."""
    if "error" in res:
        return [("compile", res["error"].splitlines()[0][:300] if res["error"] else "error", None)]
    problems = []
    if res["smem"] > SMEM_LIMIT[arch]:
        problems.append(("smem", f"shared memory {res['smem']:,} B > {SMEM_LIMIT[arch]:,} B", res["smem"]))
    regs = res["regs"]
    if regs is None:
        problems.append(("compile", "no register count in the ptxas log", None))
    else:
        if regs > MAX_REGS:
            problems.append(("regs", f"{regs} registers > {MAX_REGS}", regs))
        per_warp = -(-regs * 32 // 256) * 256  # registers are allocated per warp, 256 at a time
        if per_warp * res["warps"] > REGS_PER_BLOCK:
            problems.append(("regs", f"{regs} registers x {res['warps'] * 32} threads > {REGS_PER_BLOCK:,}", regs))
    if res.get("spill_stores") or res.get("spill_loads"):
        worst = max(res["spill_stores"], res["spill_loads"])
        problems.append(("spill", f"spills {res['spill_stores']} B stores / {res['spill_loads']} B loads", worst))
        if worst > SPILL_LIMIT[arch]:
            problems.append(("spill_limit", f"spills {worst} B > {SPILL_LIMIT[arch]} B allowed on sm_{arch}", worst))
    return problems


def _known(kernel, arch, kind, value, constexprs, known):
    """The reason of the first entry of ``known`` covering this problem, else None."""
    for entry in known:
        if entry["kernel"] == kernel and entry["kind"] == kind and entry.get("arch") in (None, arch) and \
                all(constexprs.get(k) == v for k, v in entry.get("when", {}).items()) and \
                (entry.get("up_to") is None or value is None or value <= entry["up_to"]):
            return entry.get("reason", "allowed")
    return None


def run_check(archs=ARCHS, dtypes=DTYPES, families=None, jobs=2, allow=(), strict_spills=False, log=print):
    """Record, specialise, compile and check; returns (rows, summary). One row per launch and arch."""
    import multiprocessing

    t0 = time.time()
    known = list(KNOWN_ISSUES) + list(allow)
    pending, rows = {}, []
    for arch in archs:
        launches = record_launches(arch, dtypes, families)
        for launch in launches:
            if "error" in launch:
                rows.append(dict(launch, kernel=f"({launch['op']})", arch=arch, grid=[], key=None, constexprs={},
                                 launch_problems=[("wrapper", launch.pop("error"), None)]))
                continue
            fn = launch.pop("fn")
            bound, options, signature, constexprs, attrs = specialize(fn, launch.pop("args"), launch.pop("kwargs"),
                                                                      arch)
            name = fn.fn.__name__
            job = (fn.module, name, signature, constexprs, attrs, options.__dict__, arch)
            key = repr((job[:2], sorted(signature.items()), sorted(constexprs.items(), key=repr),
                        sorted(attrs.items(), key=repr), sorted(options.__dict__.items(), key=repr), arch))
            pending.setdefault(key, job)
            grid = launch.pop("grid")
            rows.append(dict(launch, kernel=name, arch=arch, grid=list(grid), key=key,
                             constexprs={fn.arg_names[path[0]]: v for path, v in constexprs.items() if len(path) == 1},
                             launch_problems=_launch_problems(grid, bound, signature)))
    t_record = time.time() - t0
    log(f"{len(rows)} launches recorded in {t_record:.1f}s; {len(pending)} distinct compiles on {jobs} processes")

    results = {}
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker) as pool:
        # The heavy kernels (attention, delta rule) first, so that the two workers finish together.
        heavy = sorted(pending, key=lambda k: not any(s in pending[k][1] for s in ("attention", "gdr")))
        futures = {key: pool.submit(compile_job, pending[key]) for key in heavy}
        for key, fut in futures.items():
            results[key] = fut.result()
            if "error" in results[key]:
                log(f"  compile error: {pending[key][1]} sm_{pending[key][-1]}: {results[key]['error'][:200]}")
    t_compile = time.time() - t0 - t_record

    for row in rows:
        key = row.pop("key")
        res = results[key] if key else dict(seconds=0.0)
        row.update({k: res.get(k) for k in ("regs", "spill_stores", "spill_loads", "stack", "smem", "warps",
                                            "stages")})
        row["compile_seconds"] = round(res["seconds"], 2)
        problems = (_compile_problems(res, row["arch"]) if key else []) + row.pop("launch_problems")
        row["problems"], row["known"] = [], []
        hard_new = hard_known = spill_new = 0
        for kind, msg, value in problems:
            reason = _known(row["kernel"], row["arch"], kind, value, row["constexprs"], known)
            row["problems"].append(f"{kind}: {msg}")
            if reason:
                row["known"].append(f"{kind}: {reason}")
            if kind == "spill":
                spill_new += reason is None
            elif reason:
                hard_known += 1
            else:
                hard_new += 1
        fails = hard_new or (strict_spills and spill_new)
        spilled = any(p.startswith("spill") for p in row["problems"])
        row["status"] = "FAIL" if fails else "KNOWN FAIL" if hard_known else \
            ("SPILL" + (" (known)" if not spill_new else "")) if spilled else "ok"
    compiled = {(r["kernel"], r["arch"]) for r in rows if r["smem"] is not None}
    max_grid = {}
    for r in rows:
        if r["grid"]:
            g = list(r["grid"]) + [1] * (3 - len(r["grid"]))
            max_grid[r["kernel"]] = [max(a, b) for a, b in zip(max_grid.get(r["kernel"], g), g)]
    summary = dict(
        launches=len(rows), compiles=len(pending), seconds=round(time.time() - t0, 1),
        record_seconds=round(t_record, 1), compile_seconds=round(t_compile, 1),
        compile_cpu_seconds=round(sum(r["seconds"] for r in results.values()), 1),
        failed=sum(r["status"] == "FAIL" for r in rows), known_failed=sum(r["status"] == "KNOWN FAIL" for r in rows),
        spilled=sum(any(p.startswith("spill") for p in r["problems"]) for r in rows),
        compiled={k: sorted(a for kk, a in compiled if kk == k) for k in sorted({k for k, _ in compiled})},
        max_grid=max_grid,
    )
    return rows, summary


# -- Report ----------------------------------------------------------------------------------------

def _families(names):
    """'Qwen3-0.6B', 'Qwen3-4B', 'MiniLM-L6' -> 'Qwen3-0.6B/4B, MiniLM-L6'."""
    groups = {}
    for name in dict.fromkeys(names):
        base, _, size = name.rpartition("-")
        groups.setdefault(base, []).append(size)
    return ", ".join(f"{base}-{'/'.join(sizes)}" for base, sizes in groups.items())


def _compress(names, width):
    """``names`` joined, cut to about ``width`` characters with a count of the rest (the first always kept)."""
    names = list(dict.fromkeys(names))
    text = ", ".join(names)
    if len(text) <= width:
        return text
    kept = names[:1]
    for name in names[1:]:
        if len(", ".join(kept + [name])) + 6 > width:
            break
        kept.append(name)
    return ", ".join(kept) + f" +{len(names) - len(kept)}"


def table(rows, width=90):
    """One line per (kernel, compile, status); the family/shape column lists the launches it covers
    (families, then op/batch), and each problem follows on a line of its own."""
    groups = {}
    for r in rows:
        key = (r["kernel"], r["dtype"], r["arch"], r["regs"], (r["spill_stores"], r["spill_loads"]), r["smem"],
               r["warps"], r["stages"], r["status"], tuple(r["problems"]),
               tuple(sorted(r["constexprs"].items(), key=repr)))
        groups.setdefault(key, []).append(r)
    head = ("kernel", "family/shape", "dtype", "arch", "regs", "spill B", "smem B", "warps", "stages", "status")
    order = {"FAIL": 0, "KNOWN FAIL": 1, "SPILL": 2, "SPILL (known)": 3, "ok": 4}
    lines = []  # (cells, problem notes)
    for key, grp in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2], order[kv[0][8]])):
        kernel, dtype, arch, regs, spill, smem, warps, stages, status, problems, _ = key
        fams = _families(r["family"] for r in grp)
        ops = {}
        for r in grp:
            ops.setdefault(r["op"], []).append(r["batch"])
        ops = _compress([op if len(set(b)) == len(BATCHES) else f"{op} ({', '.join(dict.fromkeys(b))})"
                         for op, b in ops.items()], max(24, width - len(fams) - 2))
        spill_b = "-" if spill[0] is None else f"{spill[0]}/{spill[1]}" if any(spill) else "0"
        cells = (kernel.lstrip("_"), f"{fams}: {ops}", _SHORT[dtype], f"sm_{arch}", "-" if regs is None else str(regs),
                 spill_b, "-" if smem is None else f"{smem:,}", str(warps or "-"), str(stages or "-"), status)
        known = dict(k.split(": ", 1) for k in grp[0]["known"])
        notes = [p + (f"  [known: {known[p.split(':', 1)[0]]}]" if p.split(":", 1)[0] in known else "")
                 for p in problems]
        lines.append((cells, notes))
    widths = [max([len(h)] + [len(cells[i]) for cells, _ in lines]) for i, h in enumerate(head)]

    def fmt(cells):  # text columns left, numbers right
        return " | ".join(c.ljust(w) if i in (0, 1, 2, 9) else c.rjust(w)
                          for i, (c, w) in enumerate(zip(cells, widths)))

    out = [fmt(head), "-+-".join("-" * w for w in widths)]
    for cells, notes in lines:
        out.append(fmt(cells))
        out.extend(" " * (widths[0] + 3) + "-> " + note for note in notes)
    return "\n".join(out)


_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS, help="targets (default 90 80)")
    p.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    p.add_argument("--family", nargs="+", default=None, help="only families whose name contains one of these")
    p.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    p.add_argument("--allow", action="append", default=[], metavar="KERNEL:KIND[:ARCH]",
                   help="treat this failure as known (repeatable); KIND one of " + ", ".join(HARD + ("spill",)))
    p.add_argument("--strict-spills", action="store_true", help="a spill not in KNOWN_ISSUES fails the check")
    p.add_argument("--json", default=None, help="write rows and summary to this file")
    return p.parse_args(argv)


def _allow_entry(text):
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[1] not in HARD + ("spill",):
        raise SystemExit(f"--allow {text!r}: expected KERNEL:KIND[:ARCH] with KIND in {HARD + ('spill',)}")
    return dict(kernel=parts[0], kind=parts[1], arch=int(parts[2]) if len(parts) == 3 else None,
                reason="allowed on the command line")


def main(argv=None):
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # Under the interpreter, @triton.jit makes interpreted functions: nothing would compile.
        raise SystemExit("kernels.aot compiles for real GPUs: run it with TRITON_INTERPRET unset")
    allow = [_allow_entry(a) for a in args.allow]
    rows, summary = run_check(args.arch, args.dtype, args.family, args.jobs, allow, args.strict_spills)
    print()
    print(table(rows))
    print()
    for status in ("FAIL", "KNOWN FAIL"):
        bad = {}
        for r in rows:
            if r["status"] == status:
                for p in r["problems"]:
                    if not p.startswith("spill"):
                        bad.setdefault((r["kernel"], r["arch"], p), []).append(f"{r['family']} {r['op']}/{r['batch']}")
        for (kernel, arch, p), where in sorted(bad.items()):
            print(f"{status}: {kernel} sm_{arch}: {p}  ({_compress(where, 90)})")
    spills = {}
    for r in rows:
        if any(p.startswith("spill") for p in r["problems"]):
            worst = max(r["spill_stores"], r["spill_loads"])
            known = any(k.startswith("spill") for k in r["known"])
            entry = spills.setdefault((r["kernel"], r["arch"], known), [worst, worst, set()])
            entry[0], entry[1] = min(entry[0], worst), max(entry[1], worst)
            entry[2].add(r["op"])
    for (kernel, arch, known), (lo, hi, ops) in sorted(spills.items()):
        print(f"SPILL{' (known)' if known else ''}: {kernel} sm_{arch}: {lo}-{hi} B  ({', '.join(sorted(ops))})")
    print("largest grid per kernel (x, y, z):",
          ", ".join(f"{k.lstrip('_')} {tuple(g)}" for k, g in sorted(summary["max_grid"].items())))
    print(f"\n{summary['launches']} launches, {summary['compiles']} compiles in {summary['seconds']}s "
          f"(record {summary['record_seconds']}s, compile {summary['compile_seconds']}s wall / "
          f"{summary['compile_cpu_seconds']}s in workers): {summary['failed']} FAIL, "
          f"{summary['known_failed']} KNOWN FAIL, {summary['spilled']} launches with spills")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, summary=summary), indent=1, default=str))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
