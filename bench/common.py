"""Shared bench helpers: the repository on sys.path, timing, the machine's name.

Texts, tokenizers and random-weight checkpoints are in checkpoints.py; the model cards'
reference code in references.py.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # engine/ and kernels/ when a script runs as python bench/<script>.py


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def latency_ms(fn, device: str, reps: int) -> dict:
    """p50 / p99 / mean milliseconds of ``fn(rep)`` over ``reps`` calls (after one warm-up call)."""
    fn(-1)
    times = []
    for rep in range(reps):
        times.append(timed(lambda: fn(rep), device)[1] * 1e3)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return {"p50_ms": pick(0.5), "p99_ms": pick(0.99), "mean_ms": sum(times) / len(times), "reps": reps}


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"


def write_json(path, obj) -> None:
    """Write ``obj`` to ``path`` (if given) atomically: the e2e scripts call it after every variant, so a run
    cut short (bench/gpu_suite.py's limits) keeps the variants it finished."""
    if not path:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def gemm_peak(precision: str, m: int = 2048, k: int = 1536, n: int = 1536, reps: int = 20) -> float:
    """This machine's best GEMM rate for ``precision`` ("float32", "bfloat16", "int8"), GFLOP/s (GOP/s for
    int8), at torch's thread count: the best of ``reps`` calls of one large oneDNN GEMM on a weight packed
    once (the call our CPU linears make), the "peak" the benchmarks' achieved rates are measured against.
    None where oneDNN's ops are missing."""
    x = torch.randn(m, k)
    w = torch.randn(n, k)
    if precision == "int8":
        if not hasattr(torch.ops.onednn, "qlinear_prepack"):
            return None
        packed = torch.ops.onednn.qlinear_prepack(torch.randint(-127, 128, (n, k), dtype=torch.int8), None)
        u = torch.randint(0, 256, (m, k), dtype=torch.uint8)
        ones, zeros = torch.ones(n), torch.zeros(n, dtype=torch.long)
        fn = lambda: torch.ops.onednn.qlinear_pointwise(u, 1.0, 0, packed, ones, zeros, None, 1.0, 0,  # noqa: E731
                                                        torch.float32, "none", [], "")
    else:
        if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            return None
        dt = torch.bfloat16 if precision == "bfloat16" else torch.float32
        x, w = x.to(dt), w.to(dt)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        fn = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")  # noqa: E731
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best / 1e9


def encoder_flops(config: dict, lengths) -> float:
    """FLOPs of a BERT-style encoder's forward over sequences of ``lengths`` tokens: every linear layer
    (Q, K, V, O, the FFN's two) and attention's two products (scores and the weighted sum, over the whole
    sequence); embeddings, norms and activations are not counted."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    linear = 2 * (4 * h * h + 2 * h * inter)
    return float(layers * sum(n * linear + 4 * n * n * h for n in lengths))
