"""Load test of the HTTP server: N concurrent clients, against the same work through the Python API.

A ``rerank-engine serve`` subprocess gets a bounded number of rerank requests
(each its own query and documents) from ``--clients`` concurrent clients, for
at most ``--max-seconds``. Then the same requests go through ``Reranker.rank``
in this process from the same number of threads. Prints requests/s, pairs/s,
p50/p99 latency for both, and the server's overhead as a ratio.

The default model is a tiny random Qwen3 reranker (real Qwen vocabulary) built
in a temp dir, so it runs offline on CPU; on so small a model the ratio is an
upper bound on the server's overhead, since the model's share of the time is
smallest. Client threads share the machine with the server.

    python bench/serve_load.py                         # tiny model, CPU
    python bench/serve_load.py --shape cpu --clients 32 --requests 512
    python bench/serve_load.py --url http://127.0.0.1:8000 --model-name NAME   # an already running server
"""
import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from checkpoints import QWEN3_SHAPES, build_qwen3_folder, words
from common import ROOT, machine


def make_requests(args):
    rng = random.Random(0)
    return [(f"{i}: " + words(rng, rng.randint(4, 16)),
             [words(rng, rng.randint(args.min_words, args.max_words)) for _ in range(args.docs)])
            for i in range(args.requests)]


def drive(requests, clients: int, max_seconds: float, call):
    """Run ``call(query, docs)`` for each request from ``clients`` threads; -> (latencies, wall s, done)."""
    latencies, lock = [], threading.Lock()
    next_i = iter(range(len(requests)))
    deadline = time.perf_counter() + max_seconds

    def worker():
        while time.perf_counter() < deadline:
            with lock:
                i = next(next_i, None)
            if i is None:
                return
            t0 = time.perf_counter()
            call(*requests[i])
            with lock:
                latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(worker) for _ in range(clients)]:
            f.result()
    return latencies, time.perf_counter() - t0


def summary(name, latencies, wall, docs):
    n = len(latencies)
    out = {"requests": n, "seconds": wall, "requests_per_s": n / wall, "pairs_per_s": n * docs / wall,
           "p50_ms": 1e3 * float(np.percentile(latencies, 50)), "p99_ms": 1e3 * float(np.percentile(latencies, 99))}
    print(f"{name:>10}: {out['requests_per_s']:8.1f} req/s  {out['pairs_per_s']:9.1f} pairs/s  "
          f"p50 {out['p50_ms']:7.1f} ms  p99 {out['p99_ms']:7.1f} ms  ({n} requests in {wall:.2f} s)")
    return out


def start_server(folder, args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "engine.cli", "serve", str(folder), "--port", str(port), "--log-level", "warning",
           "--max-queue", str(max(64, 2 * args.clients)), "--served-model-name", "bench"]
    if args.device:
        cmd += ["--device", args.device]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    import httpx

    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not come up")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=sorted(QWEN3_SHAPES))
    ap.add_argument("--device", default=None)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=256, help="total requests (bounded count)")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="stop sending after this long (bounded time)")
    ap.add_argument("--docs", type=int, default=32, help="documents per request")
    ap.add_argument("--min-words", type=int, default=20)
    ap.add_argument("--max-words", type=int, default=120)
    ap.add_argument("--url", default=None, help="bench a running server instead (no in-process figure)")
    ap.add_argument("--model-name", default="bench")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args()

    import httpx
    import torch

    requests = make_requests(args)
    results = {"machine": machine(), "shape": args.shape, "clients": args.clients, "docs": args.docs}
    folder, proc, url = None, None, args.url
    if url is None:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        folder = build_qwen3_folder(args.shape, "Qwen3-Reranker-serve-bench", device, dtype)
        proc, url = start_server(folder, args)
    print(f"machine: {machine()}  shape: {args.shape}  clients: {args.clients}  "
          f"requests: {args.requests} x {args.docs} documents")

    local = threading.local()

    def http_call(query, docs):
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, timeout=300)
        r = local.client.post("/v1/rerank", json={"model": args.model_name, "query": query, "documents": docs})
        r.raise_for_status()

    try:
        http_call(*requests[0])  # warm-up
        results["server"] = summary("server", *drive(requests, args.clients, args.max_seconds, http_call), args.docs)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)

    if folder is not None:
        from engine import Reranker

        rr = Reranker(str(folder), device=args.device)
        rr.rank(*requests[0])  # warm-up
        results["python"] = summary("python", *drive(requests, args.clients, args.max_seconds,
                                                     lambda q, d: rr.rank(q, d)), args.docs)
        s, p = results["server"], results["python"]
        results["overhead"] = p["pairs_per_s"] / s["pairs_per_s"]
        print(f"server overhead: {results['overhead']:.2f}x the Python API's time for the same work "
              f"(p50 {s['p50_ms'] / p['p50_ms']:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
