"""CLI start-up time: ``rerank-engine --help`` / ``--version``, and a ``rank`` of 10 documents with the
bundled all-MiniLM-L6-v2, end to end (a new process each time, as a user runs it).

    python bench/cli_startup.py            # median of 5 runs each
"""
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine


def timed(argv, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "engine.cli", *argv], cwd=ROOT, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    docs = Path(tempfile.mkdtemp()) / "docs.jsonl"
    docs.write_text("".join(json.dumps(f"document {i} about the river and the city") + "\n" for i in range(10)))
    print(f"machine: {machine()}")
    for name, argv in (("--help", ["--help"]), ("--version", ["--version"]),
                       ("rank, 10 documents, bundled model", ["rank", "--query", "where is the river?",
                                                              "--documents", str(docs), "--quiet"])):
        print(f"{name:40s} {timed(argv, runs):6.2f} s (median of {runs})")


if __name__ == "__main__":
    main()
