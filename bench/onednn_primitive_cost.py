"""What a new GEMM row count costs a packed CPU linear (engine/models/cpu_linear.py) against what padding its
input to the bucket costs: per shape, ms of a cached GEMM, of the first GEMM at 10 new row counts (oneDNN
creates and caches a primitive for each) and of those row counts again, and of one padding copy.

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/onednn_primitive_cost.py
"""
import time

import torch

from engine.models.cpu_linear import PackedLinear, bucket_rows
from engine.models.layers import Linear


def ms(fn, reps: int = 10) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


torch.manual_seed(0)
op = torch.ops.mkldnn._linear_pointwise
for k, n in ((384, 1536), (1536, 384), (384, 384)):
    lin = Linear(k, n, bias=True)
    with torch.no_grad():
        lin.weight.normal_()
        lin.bias.normal_()
    p = PackedLinear(lin)
    for rows in (200, 1000, 3000):
        x = torch.randn(rows, k)
        op(x, p._weight, p._bias, "none", [], "")
        cached = ms(lambda: op(x, p._weight, p._bias, "none", [], ""))
        new = [torch.randn(rows + d, k) for d in range(1, 11)]
        first = sum(ms(lambda: op(xx, p._weight, p._bias, "none", [], ""), 1) for xx in new) / 10
        again = sum(ms(lambda: op(xx, p._weight, p._bias, "none", [], ""), 1) for xx in new) / 10
        m = bucket_rows(rows + 7)

        def pad():
            xx = x.new_empty(m, k)
            xx[:rows] = x
            xx[rows:] = 0

        print(f"{k}->{n} at {rows} rows: cached {cached:.2f} ms, new row count {first:.2f}, again {again:.2f} "
              f"(creation ~{first - again:.2f}), padding copy {ms(pad):.3f}")
