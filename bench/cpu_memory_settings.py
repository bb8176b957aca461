"""All-MiniLM-L6-v2 embedding throughput on CPU under the engine's memory settings (engine/models/memory.py,
cpu_linear.bucket_rows), one setting per process: best of 3 passes over 1,000 random texts of 5-120 words.

    PYTHONPATH=. LABEL=engine python bench/cpu_memory_settings.py
    PYTHONPATH=. EXACT=1 LABEL=exact-rows python bench/cpu_memory_settings.py   # GEMMs at exact row counts
    PYTHONPATH=. MALLOC_MMAP_THRESHOLD_=131072 LABEL=mmap-128k python bench/cpu_memory_settings.py
    PYTHONPATH=. VARY=1 LABEL=engine python bench/cpu_memory_settings.py   # new texts every pass

The same 1,000 texts in every pass make the same batches, whose GEMM primitives oneDNN has cached after
the first; ``VARY=1`` embeds 1,000 new texts in each pass (new batch sizes, as real traffic brings).
Point PYTHONPATH at another checkout to measure it with this script, alternating runs on a loaded machine.
Also printed: texts per CPU-second of the process (user + system, page faults included), which another
process's load disturbs far less than wall time; with ``OMP_NUM_THREADS=1`` it is the throughput of one core.
"""
import os
import random
import time

from engine import Embedder

WORDS = ("the capital of china is beijing a city river model search query document passage relevant answer "
         "engine fast text embedding rank score batch token long short north south ancient modern").split()


def random_text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


if os.environ.get("EXACT"):
    from engine.models import cpu_linear
    cpu_linear.bucket_rows = lambda n: n
rng = random.Random(0)
texts = [random_text(rng, rng.randint(5, 120)) for _ in range(1000)]
passes = [[random_text(rng, rng.randint(5, 120)) for _ in range(1000)] for _ in range(3)] if os.environ.get("VARY") \
    else [texts] * 3
emb = Embedder()
emb.embed(texts[:64])
best = best_cpu = 0
for batch in passes:
    t, c = time.perf_counter(), time.process_time()
    emb.embed(batch)
    best = max(best, 1000 / (time.perf_counter() - t))
    best_cpu = max(best_cpu, 1000 / (time.process_time() - c))
print(os.environ.get("LABEL"), round(best, 1), "texts/s", round(best_cpu, 1), "texts/CPU-s")
