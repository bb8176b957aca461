"""Run as a script (no TRITON_INTERPRET): compile kernels at indices past 2^31 and report, per
pointer argument, whether every address built from it is computed in int64 (TTIR for sm_90).

Prints one JSON object: {case: {"pointer": ..., "widths": [offset types of its first addptr]}}.
Used by test_int64_offsets.py; the toy cases are the check's own controls.
"""
import json
import os
import re
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import aot  # noqa: E402


@triton.jit
def _toy_i32(FINAL, stride, BLOCK: tl.constexpr):
    n = tl.program_id(0)
    tl.store(FINAL + n * stride + tl.arange(0, BLOCK), tl.zeros((BLOCK,), tl.float32))


@triton.jit
def _toy_i64(FINAL, stride, BLOCK: tl.constexpr):
    n = tl.program_id(0)
    tl.store(FINAL + n.to(tl.int64) * stride + tl.arange(0, BLOCK), tl.zeros((BLOCK,), tl.float32))


def offset_widths(ttir: str, pointer: str):
    """Integer widths of the offsets added to ``%pointer`` (directly, or to its splat)."""
    names = {pointer}
    widths = []
    for line in ttir.splitlines():
        m = re.match(r"\s*(%[\w.]+) = tt\.splat (%[\w.]+) ", line)
        if m and m.group(2) in names:
            names.add(m.group(1))
            continue
        m = re.match(r"\s*%[\w.]+ = tt\.addptr (%[\w.]+), %[\w.]+ : [^,]+, (.+?) loc", line)
        if m and m.group(1) in names:
            widths.append(re.search(r"i(\d+)>?$", m.group(2).strip()).group(1))
    return widths


def compile_ttir(fn, args, kwargs, arch=90):
    bound, options, signature, constexprs, attrs = aot.specialize(fn, args, kwargs, arch)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                            options=options.__dict__)
    return kernel.asm["ttir"]


def recorded(thunk, name):
    sink = []
    with aot.recording(90, sink):
        thunk()
    return next((fn, args, kwargs) for fn, _, args, kwargs in sink if fn.fn.__name__ == name)


def main():
    from kernels.causal_conv1d import causal_conv1d_triton
    from kernels.gated_delta_rule import ChunkPlan, gated_delta_rule_triton

    meta = dict(device="meta")
    out = {}
    fin = torch.empty(1, dtype=torch.float32, **meta)
    for name, fn in (("toy i32", _toy_i32), ("toy i64", _toy_i64)):
        out[name] = offset_widths(compile_ttir(fn, (fin, 1 << 20), dict(BLOCK=16)),
                                  "%FINAL")

    # conv1d final state: 100,000 one-token sequences x 8,192 channels x (K-1 = 3): n * stride_f0 > 2^31
    n, c = 100_000, 8192
    x = torch.empty(n, c, dtype=torch.bfloat16, **meta)
    w = torch.empty(c, 4, dtype=torch.bfloat16, **meta)
    cu = torch.empty(n + 1, dtype=torch.int32, **meta)
    seq_of = torch.empty(n, dtype=torch.int32, **meta)
    fn, args, kwargs = recorded(lambda: causal_conv1d_triton(x, w, cu, output_final_state=True, seq_of=seq_of),
                                "_conv_final_state_kernel")
    assert n * c * 3 >= 1 << 31
    out["conv1d final state"] = offset_widths(compile_ttir(fn, args, kwargs), "%FINAL")

    # delta rule final state: 8,193 one-token sequences x [16, 128, 128]: n * stride_f0 > 2^31
    n, hk, hv, d = 8193, 16, 16, 128
    q = torch.empty(n, hk, d, dtype=torch.bfloat16, **meta)
    v = torch.empty(n, hv, d, dtype=torch.bfloat16, **meta)
    g = torch.empty(n, hv, dtype=torch.float32, **meta)
    cu = torch.empty(n + 1, dtype=torch.int32, **meta)
    plan = ChunkPlan(torch.empty(n, 2, dtype=torch.int32, **meta), 16)
    fn, args, kwargs = recorded(lambda: gated_delta_rule_triton(q, q, v, g, g, cu, plan=plan, output_final_state=True),
                                "_gdr_chunk_scan_kernel")
    assert n * hv * d * d >= 1 << 31
    out["delta rule final state"] = offset_widths(compile_ttir(fn, args, kwargs), "%FINAL")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
