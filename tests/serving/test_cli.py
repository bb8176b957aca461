"""``rerank-engine``: offline rank and embed over JSONL files, and ``serve`` in a subprocess shut down by SIGTERM."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from engine import Embedder, Reranker
from engine.cli import CHUNK, main, read_jsonl
from server_helpers import free_port, wait_until_healthy

REPO = Path(__file__).resolve().parents[2]


def write_jsonl(path: Path, items) -> Path:
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items), encoding="utf-8")
    return path


def test_read_jsonl_accepts_strings_and_text_objects(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", ["a", {"text": "b", "id": 7}, "北京"])
    assert read_jsonl(str(f)) == ["a", "b", "北京"]
    bad = write_jsonl(tmp_path / "bad.jsonl", ["a", {"title": "no text"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_jsonl(str(bad))


def test_rank_prints_sorted_json(tmp_path, capsys, rerank_folder):
    docs = ["beijing is the capital", {"text": "a river in the mountain"}, "gravity attracts bodies", ""]
    f = write_jsonl(tmp_path / "docs.jsonl", docs)
    query = "what is the capital of china?"
    assert main(["rank", "--model", str(rerank_folder), "--device", "cpu", "--query", query,
                 "--documents", str(f), "--top-n", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    texts = read_jsonl(str(f))
    want = Reranker(str(rerank_folder), device="cpu").rank(query, texts, top_n=3)
    assert [r["index"] for r in out["results"]] == [w["index"] for w in want]
    np.testing.assert_allclose([r["relevance_score"] for r in out["results"]], [w["score"] for w in want], atol=1e-5)
    assert [r["document"]["text"] for r in out["results"]] == [texts[w["index"]] for w in want]


@pytest.mark.parametrize("suffix", [".npy", ".jsonl"])
def test_embed_writes_npy_or_jsonl_in_chunks(tmp_path, capsys, embed_folder, suffix):
    texts = [f"text number {i} about rivers" for i in range(CHUNK + 13)]  # more than one chunk: progress bar
    f = write_jsonl(tmp_path / "in.jsonl", texts)
    out = tmp_path / f"out{suffix}"
    assert main(["embed", "--model", str(embed_folder), "--device", "cpu", "--input", str(f),
                 "--output", str(out), "--dimensions", "32"]) == 0
    got = np.load(out) if suffix == ".npy" else np.array([json.loads(x) for x in out.read_text().splitlines()])
    assert got.shape == (len(texts), 32)
    want = Embedder(str(embed_folder), device="cpu").embed(texts, dimensions=32)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert "embed" in capsys.readouterr().err  # the tqdm bar


# `serve` in a subprocess: rank() is slowed so that a request is in flight when SIGTERM arrives.
SLOW_SERVE = """
import sys, time
from engine.serving.service import Service
rank = Service.rank
def slow_rank(self, *args, **kwargs):
    time.sleep(2.0)
    return rank(self, *args, **kwargs)
Service.rank = slow_rank
from engine.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_serve_finishes_in_flight_requests_on_sigterm(tmp_path, rerank_folder):
    port = free_port()
    url, key = f"http://127.0.0.1:{port}", "cli-key"
    log = open(tmp_path / "serve.log", "w+")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SERVE, "serve", str(rerank_folder), "--device", "cpu",
                             "--port", str(port), "--api-key", key, "--served-model-name", "cli-model,alias",
                             "--max-queue", "4"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    headers = {"Authorization": f"Bearer {key}"}
    try:
        wait_until_healthy(proc, url, tmp_path / "serve.log", timeout=90)
        deadline = time.monotonic() + 90
        assert httpx.get(f"{url}/v1/models", headers=headers).json()["data"][0]["id"] == "cli-model"
        result = {}
        body = {"model": "alias", "query": "q", "documents": ["a", "b", "c"]}
        t = threading.Thread(target=lambda: result.setdefault(
            "r", httpx.post(f"{url}/v1/rerank", json=body, headers=headers, timeout=60)))
        t.start()
        while "rerank_engine_queue_depth 1.0" not in httpx.get(f"{url}/metrics", headers=headers).text:
            assert t.is_alive() and time.monotonic() < deadline, "the request never got in flight"
            time.sleep(0.05)  # wait until the request is inside its 2 s engine call
        proc.send_signal(signal.SIGTERM)
        t.join(timeout=60)
        assert result["r"].status_code == 200, result["r"].text
        assert len(result["r"].json()["results"]) == 3
        # A clean exit 0 (uvicorn re-raises SIGTERM after its graceful shutdown; our handler takes it).
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert "Waiting for connections to close" in (tmp_path / "serve.log").read_text()


def test_serve_stalled_client_gets_408_and_sigterm_still_exits(tmp_path, rerank_folder):
    """A client that sends fewer body bytes than its Content-Length gets 408 after --body-timeout, and holds
    neither the server nor its shutdown; an empty API key is refused and a key file is read."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    empty = subprocess.run([sys.executable, "-m", "engine.cli", "serve", str(rerank_folder), "--api-key", ""],
                           cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                           timeout=120)
    assert empty.returncode != 0 and "API key is empty" in empty.stderr
    key_file = tmp_path / "key"
    key_file.write_text("file-key\n")
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", str(rerank_folder), "--device", "cpu",
                             "--port", str(port), "--body-timeout", "2", "--graceful-timeout", "5",
                             "--api-key-file", str(key_file)],
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_healthy(proc, url, tmp_path / "serve.log", timeout=120)
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer file-key"}).status_code == 200
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"POST /v1/rerank HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer file-key\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"query\": ")
            t0 = time.monotonic()
            reply = sock.recv(4096)
            assert reply.startswith(b"HTTP/1.1 408"), reply
            assert time.monotonic() - t0 < 20
        stalled = socket.create_connection(("127.0.0.1", port), timeout=30)  # stalls again, through SIGTERM
        stalled.sendall(b"POST /v1/rerank HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer file-key\r\n"
                        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        stalled.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert "API key required" in (tmp_path / "serve.log").read_text()
