"""The engine loop behind HTTP: exact raw scores, and memory bounded on huge documents."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from engine.serving.service import Service
from reference_qwen3 import QWEN3_JINJA, Qwen3RerankerReference
from server_helpers import free_port, random_text, wait_until_healthy

REPO = Path(__file__).resolve().parents[2]


def test_tei_raw_scores_are_exact_logits(start_server, loud_qwen3, rng):
    folder, _, _ = loud_qwen3
    server = start_server(Service(str(folder), device="cpu"), "loud")
    query = "what is the capital of china?"
    docs = [random_text(rng, n) for n in (2, 9, 25, 70)]
    want = np.array(Qwen3RerankerReference(folder).logits([(query, d) for d in docs]))
    assert np.abs(want).max() > 30, want
    with server.client() as c:
        raw = c.post("/rerank", json={"query": query, "texts": docs, "raw_scores": True}).json()
        plain = c.post("/rerank", json={"query": query, "texts": docs}).json()
    got = {r["index"]: r["score"] for r in raw}
    np.testing.assert_allclose([got[i] for i in range(len(docs))], want, rtol=1e-4, atol=1e-4)
    sig = {r["index"]: r["score"] for r in plain}
    np.testing.assert_allclose([sig[i] for i in range(len(docs))], 1 / (1 + np.exp(-want)), atol=1e-6)


def _peak_rss(pid: int) -> int:
    """Peak resident set (VmHWM) of a process, in bytes, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc (Linux only)")
def test_a_20_mb_document_leaves_memory_bounded(tmp_path, rerank_folder):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "w+")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", str(rerank_folder), "--device", "cpu",
                             "--port", str(port), "--max-body-mb", "64"], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        wait_until_healthy(proc, url, tmp_path / "serve.log", timeout=120)
        small = {"query": "where is the river?", "documents": ["the river runs past the city"] * 4}
        assert httpx.post(f"{url}/v1/rerank", json=small, timeout=60).status_code == 200  # warm
        before = _peak_rss(proc.pid)
        words = "the river runs past the mountain city and on toward the ocean "
        doc = (words * (20_000_000 // len(words) + 1))[:20_000_000]
        body = {"query": "where does the river run?", "documents": [doc, "a short one"]}
        r = httpx.post(f"{url}/v1/rerank", json=body, timeout=300)
        assert r.status_code == 200, r.text
        assert len(r.json()["results"]) == 2
        grown = _peak_rss(proc.pid) - before
        assert grown < 200 << 20, f"peak RSS grew by {grown / 2**20:.0f} MiB"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_serve_with_a_user_template(start_server, rerank_folder, rerank_server, tmp_path, rng):
    """``serve MODEL --template my.jinja``: the CLI's options reach the service, and a user template that
    reproduces the built-in one serves the same scores."""
    from engine.cli import _parser

    jinja = tmp_path / "my.jinja"
    jinja.write_text(QWEN3_JINJA)
    args = _parser().parse_args(["serve", str(rerank_folder), "--template", str(jinja), "--label-tokens", "yes,no"])
    assert args.template == str(jinja) and args.label_tokens == ("yes", "no")
    server = start_server(Service(str(rerank_folder), device="cpu", template=args.template,
                                  label_tokens=args.label_tokens), "user-template")
    query, docs = "where is the river?", [random_text(rng, n) for n in (3, 20, 50)]
    with server.client() as c:
        got = c.post("/v1/rerank", json={"query": query, "documents": docs}).json()["results"]
    with rerank_server.client() as c:
        want = c.post("/v1/rerank", json={"query": query, "documents": docs}).json()["results"]
    assert [r["index"] for r in got] == [r["index"] for r in want]
    np.testing.assert_allclose([r["relevance_score"] for r in got], [r["relevance_score"] for r in want], atol=1e-6)
