"""return_evidence over HTTP: the same contribution/evidence/raw_output as the Python API."""
import pytest

from engine import Reranker
from engine.serving.service import Service


@pytest.fixture(scope="module")
def prism_server(start_server, rerank_folder):
    return start_server(Service(str(rerank_folder), device="cpu", template="prism"), "tiny-prism")


def test_rerank_with_evidence_matches_python(prism_server, rerank_folder):
    docs = ["The capital of China is Beijing.", "Gravity attracts bodies.", ""]
    want = Reranker(str(rerank_folder), device="cpu", template="prism").rank(
        "capital of china?", docs, return_evidence=True, evidence_threshold=0.0, max_new_tokens=4)
    with prism_server.client() as c:
        r = c.post("/v1/rerank", json={"query": "capital of china?", "documents": docs, "return_evidence": True,
                                       "evidence_threshold": 0.0, "max_new_tokens": 4})
        assert r.status_code == 200, r.text
        got = r.json()["results"]
        assert [g["index"] for g in got] == [w["index"] for w in want]
        for g, w in zip(got, want):
            assert g["raw_output"] == w["raw_output"] and g["raw_output"] is not None
            assert g["contribution"] == w["contribution"] and g["evidence"] == w["evidence"]
        plain = c.post("/v1/rerank", json={"query": "capital of china?", "documents": docs}).json()["results"]
        assert all("raw_output" not in p for p in plain)
        bad = c.post("/v1/rerank", json={"query": "q", "documents": ["d"], "return_evidence": True,
                                         "max_new_tokens": 0})
        assert bad.status_code == 422


def test_chunked_evidence_over_http_matches_python(prism_server, rerank_folder):
    """chunking with return_evidence: the answer of each returned document is its deciding chunk's, as in
    Python; the usage counts the prompts once, as a plain chunked request does."""
    long = " ".join(["Gravity attracts bodies."] * 12) + " The capital of China is Beijing. " + \
        " ".join(["Rivers run to the sea."] * 12)
    docs = [long, "Beijing.", "Paris is in France."]
    chunking = {"tokens": 24, "overlap": 4}
    want = Reranker(str(rerank_folder), device="cpu", template="prism").rank(
        "capital of china?", docs, return_evidence=True, evidence_threshold=0.0, max_new_tokens=4,
        chunking=chunking)
    body = {"query": "capital of china?", "documents": docs, "chunking": chunking}
    with prism_server.client() as c:
        r = c.post("/v1/rerank", json={**body, "return_evidence": True, "evidence_threshold": 0.0,
                                       "max_new_tokens": 4})
        assert r.status_code == 200, r.text
        got = r.json()
        assert [(g["index"], g["chunk"], g["raw_output"]) for g in got["results"]] == \
            [(w["index"], w["chunk"], w["raw_output"]) for w in want]
        assert all(g["raw_output"] is not None for g in got["results"])
        first = next(g for g in got["results"] if g["index"] == 0)
        assert (first["chunk"]["start"], first["chunk"]["end"]) != (0, len(long))  # a chunk, not the document
        plain = c.post("/v1/rerank", json=body).json()
        assert got["usage"] == plain["usage"]
