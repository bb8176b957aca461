"""CPU microbenchmark: the C++ varlen attention (csrc/) against SDPA on the same sequences as one
dense batch (no padding: every sequence has the same length), q/k/v as views of a packed qkv.

    python -m pytest bench/kernels/test_bench_cpu_attention.py -s

pytest-benchmark times the C++ kernel; the printed line adds SDPA's median and both GFLOP/s.
Skips when the extension is not built (ENGINE_CSRC=0, no compiler).
"""
import time

import pytest
import torch

from kernels import _csrc

CASES = [(52, 80, 12, 32), (76, 1, 12, 32), (272, 16, 12, 32), (272, 16, 16, 64), (1000, 4, 12, 32)]


def _median_s(fn, reps=20):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


@pytest.mark.parametrize("length,seqs,heads,dim", CASES, ids=[f"{n}x{L}-H{h}-D{d}" for L, n, h, d in CASES])
def test_cpu_attention(benchmark, length, seqs, heads, dim):
    ext = _csrc.module()
    if ext is None:
        pytest.skip("the C++ CPU kernels are not built")
    torch.manual_seed(0)
    T = length * seqs
    q, k, v = torch.randn(T, 3, heads, dim).unbind(1)
    cu = torch.arange(0, T + 1, length, dtype=torch.int32)
    ours = lambda: ext.varlen_attention(q, k, v, cu, cu, False, dim ** -0.5, None, None, None, None)  # noqa: E731
    dense = [t.view(seqs, length, heads, dim).transpose(1, 2) for t in (q, k, v)]
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(*dense)  # noqa: E731
    torch.testing.assert_close(ours().view(seqs, length, heads, dim).transpose(1, 2), sdpa(), atol=1e-5, rtol=1e-4)
    benchmark.pedantic(ours, rounds=20, warmup_rounds=2)
    flops = 4 * seqs * length * length * heads * dim
    t_ours, t_sdpa = _median_s(ours), _median_s(sdpa)
    print(f"\n{seqs} x {length} tokens, {heads} heads x {dim}: ours {t_ours * 1e3:.2f} ms "
          f"({flops / t_ours / 1e9:.0f} GFLOP/s), SDPA dense {t_sdpa * 1e3:.2f} ms ({flops / t_sdpa / 1e9:.0f} GFLOP/s), "
          f"SDPA/ours {t_sdpa / t_ours:.2f}x")
