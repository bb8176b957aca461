"""KaLM-Reranker over HTTP: /v1/index pre-encodes, compression_ratio passes through, cache counters in /metrics."""
import numpy as np
import pytest

from engine import Reranker
from engine.serving.service import Service
from kalm_tiny import build_kalm

DOCS = ["The capital of China is Beijing.", "Gravity attracts bodies toward one another.", "a", ""]


@pytest.fixture(scope="module")
def kalm_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("kalm-http") / "KaLM-Reranker-tiny"
    build_kalm(path, seed=5)
    return path


@pytest.fixture(scope="module")
def kalm_server(start_server, kalm_folder):
    return start_server(Service(str(kalm_folder), device="cpu"), "tiny-kalm")


def counter(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "_total "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_index_then_rank_hits_the_cache(kalm_server, kalm_folder):
    want = {r["index"]: r["score"] for r in Reranker(str(kalm_folder), device="cpu").rank(
        "capital of china", DOCS, compression_ratio=2)}
    with kalm_server.client() as c:
        r = c.post("/v1/index", json={"documents": DOCS, "compression_ratio": 2})
        assert r.status_code == 200, r.text
        assert r.json()["passages"] == len(DOCS)
        hits = counter(c.get("/metrics").text, "rerank_engine_passage_cache_hits")
        r = c.post("/v1/rerank", json={"query": "capital of china", "documents": DOCS, "compression_ratio": 2})
        assert r.status_code == 200, r.text
        got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        np.testing.assert_allclose([got[i] for i in range(len(DOCS))], [want[i] for i in range(len(DOCS))], atol=1e-5)
        assert counter(c.get("/metrics").text, "rerank_engine_passage_cache_hits") >= hits + len(set(DOCS))
        bad = c.post("/v1/rerank", json={"query": "q", "documents": ["d"], "compression_ratio": 3})
        assert bad.status_code == 422


def test_index_on_a_decoder_only_reranker_is_a_clear_400(rerank_server):
    with rerank_server.client() as c:
        r = c.post("/v1/index", json={"documents": ["x"]})
        assert r.status_code == 400 and "KaLM" in r.json()["error"]["message"]
