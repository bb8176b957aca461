"""Ray scale-out on this machine: batch throughput over actors, and Ray Serve's HTTP overhead.

1. ``batch rank`` (Ray Data) over the same pairs with 1 and 2 actors (1 core and 1 torch thread each),
   against one process scoring them with 2 threads, in the same run. Job time includes starting the
   actors and loading the model; "steady" leaves out the time until the first results.
2. HTTP latency (p50/p99) of the same rerank requests at the same client concurrency: the plain
   server (one process) against Ray Serve with one replica on the same cores; the difference is
   Ray's overhead (its proxy and router). Then 2 replicas of 1 core each.

Everything runs on a local Ray instance on 127.0.0.1 (engine.scaleout.local); traffic goes to 127.0.0.1 only.
The default model is the bundled all-MiniLM-L6-v2. On a multi-GPU machine, ``--device cuda`` gives
each actor and replica one GPU, and ``--actors 1 2 4 8`` measures scaling per GPU.

    python bench/ray_scale.py                       # CPU, 2 cores
    python bench/ray_scale.py --pairs 4000 --requests 60
    python bench/ray_scale.py --device cuda --actors 1 2 4 --replicas 1 2 4
"""
import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from checkpoints import words
from common import ROOT, machine


def make_pairs(n: int, docs_per_query: int = 50):
    """Each query with its own documents (no text repeats across queries)."""
    rng = random.Random(0)
    pairs = []
    while len(pairs) < n:
        q = f"{len(pairs)}: " + words(rng, rng.randint(4, 10))
        pairs += [(q, words(rng, rng.randint(20, 60))) for _ in range(docs_per_query)]
    return pairs[:n]


def bench_batch(args, folder):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from engine import Reranker
    from engine.scaleout.data import run_batch

    pairs = make_pairs(args.pairs)
    src = os.path.join(folder, "pairs.parquet")
    pq.write_table(pa.table({"query": [q for q, _ in pairs], "document": [d for _, d in pairs]}), src)
    rows = []
    for n in args.actors:
        gpus = 1 if args.device.startswith("cuda") else 0
        r = run_batch("rank", src, os.path.join(folder, f"out{n}.parquet"), args.model, concurrency=n,
                      batch_size=args.batch_size, num_cpus=1, num_gpus=gpus, threads=1, progress=False,
                      device=args.device)
        rows.append((f"batch rank, {n} actor(s) x 1 thread", r.seconds, r.rows_per_s, r.steady_rows_per_s))
        print(rows[-1], flush=True)
    torch.set_num_threads(args.threads)
    rr = Reranker(args.model, device=args.device)
    rr.predict(pairs[:64])
    t0 = time.perf_counter()
    for i in range(0, len(pairs), args.batch_size):
        rr.predict(pairs[i:i + args.batch_size])
    dt = time.perf_counter() - t0
    rows.append((f"one process, {args.threads} threads (model loaded)", dt, len(pairs) / dt, len(pairs) / dt))
    print(rows[-1], flush=True)
    print(f"\n{len(pairs)} pairs, batch size {args.batch_size}, {machine()}")
    print("| path | job s | pairs/s | steady pairs/s |\n|---|---|---|---|")
    for name, s, rate, steady in rows:
        print(f"| {name} | {s:.1f} | {rate:.0f} | {steady:.0f} |")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 300):
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up")


def load(url: str, requests, clients: int):
    """Each request from ``clients`` threads; -> (latencies in ms, wall seconds)."""
    import httpx

    lat, lock, it = [], threading.Lock(), iter(requests)

    def worker():
        with httpx.Client(timeout=120) as c:
            while True:
                with lock:
                    body = next(it, None)
                if body is None:
                    return
                t0 = time.perf_counter()
                r = c.post(f"{url}/v1/rerank", json=body)
                assert r.status_code == 200, r.text
                with lock:
                    lat.append((time.perf_counter() - t0) * 1000)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return np.array(lat), time.perf_counter() - t0


def bench_http(args):
    from engine.config import EngineConfig
    from engine.scaleout.serve import ReplicaSpec, deploy, deployment_options, shutdown
    from engine.serving.server import ServerConfig

    rng = random.Random(1)
    reqs = [{"query": f"{i}: " + words(rng, 8), "documents": [words(rng, rng.randint(20, 60)) for _ in range(16)]}
            for i in range(args.requests + args.clients)]
    warm, reqs = reqs[:args.clients], reqs[args.clients:]
    rows = []
    port = free_port()
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--port", str(port), "--device", args.device,
           "--log-level", "warning", "--quiet"] + ([args.model] if args.model else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        load(url, warm, args.clients)
        rows.append(("plain server (1 process)", load(url, reqs, args.clients)))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    for n in args.replicas:
        port = free_port()
        cpus = max(1, args.threads // n)
        spec = ReplicaSpec(engine=EngineConfig(model=args.model, device=args.device),
                           server=ServerConfig(served_names=["bench"]), threads=cpus)
        deploy(spec, deployment_options(n, max_queue=128, gpus=args.device.startswith("cuda"), cpus=cpus),
               "127.0.0.1", port)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        load(url, warm, args.clients)
        rows.append((f"Ray Serve, {n} replica(s) x {cpus} thread(s)", load(url, reqs, args.clients)))
        shutdown()
    print(f"\n{len(reqs)} rerank requests of 16 documents, {args.clients} concurrent clients, {machine()}")
    print("| path | p50 ms | p99 ms | requests/s |\n|---|---|---|---|")
    for name, (lat, wall) in rows:
        print(f"| {name} | {np.percentile(lat, 50):.1f} | {np.percentile(lat, 99):.1f} | {len(lat) / wall:.1f} |")
    if len(rows) > 1:
        (plain, _), (ray1, _) = rows[0][1], rows[1][1]
        d50 = np.percentile(ray1, 50) - np.percentile(plain, 50)
        d99 = np.percentile(ray1, 99) - np.percentile(plain, 99)
        print(f"Ray's overhead (1 replica on the same cores - plain): p50 {d50:+.1f} ms, p99 {d99:+.1f} ms")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: the bundled all-MiniLM-L6-v2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pairs", type=int, default=6000)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=2, help="threads of the one-process baselines")
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--skip-batch", action="store_true")
    ap.add_argument("--skip-http", action="store_true")
    args = ap.parse_args()
    from engine.scaleout import local as ray_local

    # Ray puts the driver's script folder and working directory on its workers' path; bench/kernels (the
    # kernel microbenchmarks) would shadow the engine's kernels package there.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    os.chdir(ROOT)
    ray = ray_local.init(None, num_cpus=os.cpu_count())
    try:
        with tempfile.TemporaryDirectory() as folder:
            if not args.skip_batch:
                bench_batch(args, folder)
        if not args.skip_http:
            bench_http(args)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
