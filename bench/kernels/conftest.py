"""Kernel microbenchmarks: each Triton kernel against its torch baseline.

Run on a CUDA machine: ``python -m pytest bench/kernels`` (add
``--benchmark-json=out.json`` to keep pytest-benchmark's numbers). Every test
skips without CUDA. A table of medians, throughput and ratios is printed last.
"""
import sys
from pathlib import Path

import pytest
import torch

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

_ROWS = []


def _median_ms(fn):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


@pytest.fixture
def bench_pair(benchmark):
    """Time ``triton_fn`` against ``torch_fn``; give flops or bytes for a rate.

    do_bench (CUDA events, median) gives the numbers and the ratio; the triton
    call also goes through pytest-benchmark (synchronised) for its own table.
    """

    def run(name, triton_fn, torch_fn, flops=None, nbytes=None):
        t_tri, t_ref = _median_ms(triton_fn), _median_ms(torch_fn)

        def rate(ms):
            if flops is not None:
                return f"{flops / ms / 1e9:8.1f} TFLOP/s"
            return f"{nbytes / ms / 1e6:8.1f} GB/s" if nbytes is not None else ""

        row = f"{name:<44} triton {t_tri * 1e3:9.1f} us {rate(t_tri)} | torch {t_ref * 1e3:9.1f} us {rate(t_ref)} | x{t_ref / t_tri:5.2f}"
        _ROWS.append(row)
        print("\n" + row)
        benchmark.extra_info.update(name=name, triton_ms=t_tri, torch_ms=t_ref, speedup=t_ref / t_tri)

        def synced():
            triton_fn()
            torch.cuda.synchronize()

        benchmark.pedantic(synced, rounds=20, iterations=3, warmup_rounds=2)

    return run


def pytest_terminal_summary(terminalreporter):
    if _ROWS:
        terminalreporter.section("kernel vs torch (median, do_bench)")
        for row in _ROWS:
            terminalreporter.write_line(row)

