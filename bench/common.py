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
