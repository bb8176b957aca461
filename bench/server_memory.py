"""Server RSS under /embed traffic of varying sizes (the memory bound of the CPU path).

Starts ``rerank-engine serve MODEL`` in a subprocess, sends REQUESTS /embed requests of 1..MAX_INPUTS
inputs of 1..MAX_WORDS words (a fixed seed), and prints VmRSS after every 10th and VmHWM at the end, from
/proc/PID/status. Run it with PYTHONPATH at two checkouts to compare them in the same run:

    python bench/server_memory.py [MODEL] [--requests 300] [--max-inputs 300] [--max-words 40]
"""
import argparse
import os
import random
import subprocess
import sys
import tempfile
import time

import httpx

WORDS = ("the quick brown fox jumps over a lazy dog while rain falls on quiet streets of an old town "
         "and markets open early selling bread fish apples cheese wine olives").split()


def status(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) // 1024  # MiB
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model, env=None, log_path=None, extra=()):
    port = free_port()
    log = open(log_path or tempfile.mktemp(suffix=".log"), "w")
    args = [sys.executable, "-m", "engine.cli", "serve", *([model] if model else []), "--device", "cpu",
            "--port", str(port), "--log-level", "warning", *extra]
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env or os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, open(log.name).read()
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.2)


def traffic(url: str, pid: int, requests: int, max_inputs: int, seed: int = 0, max_words: int = 40):
    """Send the requests; the RSS (MiB) after each."""
    rng = random.Random(seed)
    trace = []
    with httpx.Client(base_url=url, timeout=300) as c:
        for _ in range(requests):
            n = rng.randint(1, max_inputs)
            texts = [" ".join(rng.choices(WORDS, k=rng.randint(1, max_words))) for _ in range(n)]
            r = c.post("/embed", json={"inputs": texts})
            assert r.status_code == 200, r.text
            trace.append(status(pid)["VmRSS"])
    return trace


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None, help="default: the bundled all-MiniLM-L6-v2")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--max-inputs", type=int, default=300)
    ap.add_argument("--max-words", type=int, default=40)
    args = ap.parse_args()
    proc, url = start(args.model)
    try:
        before = status(proc.pid)["VmRSS"]
        t0 = time.time()
        trace = traffic(url, proc.pid, args.requests, args.max_inputs, max_words=args.max_words)
        hwm = status(proc.pid)["VmHWM"]
        print(f"start {before} MiB; every 10th request: {trace[9::10]}; half {trace[len(trace) // 2 - 1]} "
              f"end {trace[-1]} VmHWM {hwm} MiB; {time.time() - t0:.0f} s")
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
