"""``chunking`` over HTTP: /v1/rerank (Cohere/Jina), /rerank (TEI) and /v1/score give the Python API's chunks."""
import random

import numpy as np
import pytest

from engine import Reranker
from textgen import random_text

QUERY = "capital of china"
CHUNKING = {"tokens": 32, "overlap": 4, "return_chunks": True}


@pytest.fixture(scope="module")
def docs():
    rng = random.Random(7)
    return [random_text(rng, 60) + " The capital of China is Beijing. " + random_text(rng, 30), "Short."]


@pytest.fixture(scope="module")
def chunk_server(start_server, rerank_service):
    return start_server(rerank_service, "tiny-chunks", max_documents=6)


def test_rerank_and_score_with_chunking_match_python(chunk_server, rerank_folder, docs):
    want = Reranker(str(rerank_folder), device="cpu").rank(QUERY, docs, chunking=CHUNKING)
    with chunk_server.client() as c:
        r = c.post("/v1/rerank", json={"query": QUERY, "documents": docs, "chunking": CHUNKING})
        assert r.status_code == 200, r.text
        got = r.json()["results"]
        assert [g["index"] for g in got] == [w["index"] for w in want]
        for g, w in zip(got, want):
            assert g["relevance_score"] == pytest.approx(w["score"], abs=1e-5)
            assert g["chunk"]["start"] == w["chunk"]["start"] and g["chunk"]["end"] == w["chunk"]["end"]
            assert [(x["start"], x["end"]) for x in g["chunks"]] == [(x["start"], x["end"]) for x in w["chunks"]]
        tei = c.post("/rerank", json={"query": QUERY, "texts": docs, "chunking": {"tokens": 32, "overlap": 4}})
        assert tei.status_code == 200, tei.text
        assert [(t["index"], t["chunk"]["start"], t["chunk"]["end"]) for t in tei.json()] == \
            [(w["index"], w["chunk"]["start"], w["chunk"]["end"]) for w in want]
        assert all("chunks" not in t for t in tei.json())
        score = c.post("/v1/score", json={"text_1": QUERY, "text_2": docs, "chunking": CHUNKING})
        assert score.status_code == 200, score.text
        by = {w["index"]: w for w in want}
        for d in score.json()["data"]:
            assert d["score"] == pytest.approx(by[d["index"]]["score"], abs=1e-5)
            assert d["chunk"]["end"] == by[d["index"]]["chunk"]["end"]
        plain = c.post("/v1/rerank", json={"query": QUERY, "documents": docs}).json()["results"]
        assert all("chunk" not in p for p in plain)


def test_bad_chunking_is_422_naming_the_field_and_budgets_count_chunks(chunk_server, docs):
    with chunk_server.client() as c:
        for bad, field in (({"tokens": 0}, "tokens"), ({"tokens": 8, "overlap": 8}, "overlap"),
                           ({"aggregate": "sum"}, "aggregate"), ({"size": 3}, "size"),
                           ({"tokens": "32"}, "tokens"), (32, "chunking")):
            r = c.post("/v1/rerank", json={"query": QUERY, "documents": docs, "chunking": bad})
            assert r.status_code == 422, (bad, r.text)
            assert field in r.text, (bad, r.text)
        # Two documents are within --max-documents 6, their 8-token chunks are not.
        r = c.post("/v1/rerank", json={"query": QUERY, "documents": docs, "chunking": {"tokens": 8, "overlap": 0}})
        assert r.status_code == 413, r.text
        assert "chunks" in r.json()["error"]["message"] if "error" in r.json() else "chunks" in r.text
        assert "--max-documents" in r.text, r.text
        # A chunk with no room next to the query is a clear 400; the server keeps serving.
        r = c.post("/v1/rerank", json={"query": QUERY, "documents": docs, "chunking": {"tokens": 100000}})
        assert r.status_code == 400 and "chunking.tokens" in r.text, r.text
        assert c.post("/v1/rerank", json={"query": QUERY, "documents": docs}).status_code == 200


def test_max_pairs_counts_chunks_on_every_chunking_route(start_server, rerank_service, docs):
    """--max-pairs bounds the (query, chunk) pairs a request expands to, as --max-documents does."""
    server = start_server(rerank_service, "tiny-pair-budget", max_documents=100, max_pairs=6)
    few, many = {"tokens": 32, "overlap": 4}, {"tokens": 8, "overlap": 0}  # within 6 chunks, and more than 6
    bodies = {"/v1/rerank": lambda ch: {"query": QUERY, "documents": docs, "chunking": ch},
              "/rerank": lambda ch: {"query": QUERY, "texts": docs, "chunking": ch},
              "/v1/score": lambda ch: {"text_1": QUERY, "text_2": docs, "chunking": ch}}
    with server.client() as c:
        for path, body in bodies.items():
            r = c.post(path, json=body(many))
            assert r.status_code == 413, (path, r.text)
            assert "--max-pairs" in r.text and "chunks" in r.text, (path, r.text)
            ok = c.post(path, json=body(few))
            assert ok.status_code == 200, (path, ok.text)
        # documents alone stay far below both limits: unchunked, the same request is served
        assert c.post("/v1/rerank", json={"query": QUERY, "documents": docs}).status_code == 200


def test_calibrated_server_answers_calibrated_probabilities(start_server, rerank_folder, tmp_path_factory, docs):
    from engine.core.calibration import Calibration, model_identity
    from engine.serving.service import Service

    path = tmp_path_factory.mktemp("cal") / "m.calibration.json"
    Calibration("platt", {"a": 2.0, "b": -1.0}, model_identity(rerank_folder)).save(path)
    server = start_server(Service(str(rerank_folder), device="cpu", calibration=str(path)), "tiny-calibrated")
    logits = Reranker(str(rerank_folder), device="cpu").predict([(QUERY, d) for d in docs], raw_scores=True)
    want = 1.0 / (1.0 + np.exp(-(2.0 * np.asarray(logits) - 1.0)))
    with server.client() as c:
        got = c.post("/v1/rerank", json={"query": QUERY, "documents": docs}).json()["results"]
        np.testing.assert_allclose([g["relevance_score"] for g in sorted(got, key=lambda g: g["index"])], want,
                                   atol=1e-5)
        raw = c.post("/rerank", json={"query": QUERY, "texts": docs, "raw_scores": True}).json()
        np.testing.assert_allclose([r["score"] for r in sorted(raw, key=lambda r: r["index"])], logits, atol=1e-5)
        cut = float(want.max())
        kept = c.post("/v1/rerank", json={"query": QUERY, "documents": docs, "min_score": cut}).json()["results"]
        assert [k["index"] for k in kept] == [int(np.argmax(want))]


def test_cohere_client_passes_chunking_and_reads_chunks(chunk_server, rerank_folder, docs):
    cohere = pytest.importorskip("cohere")  # in the test extra; skipped where the SDK is not installed
    want = Reranker(str(rerank_folder), device="cpu").rank(QUERY, docs, chunking=CHUNKING)
    co = cohere.ClientV2(api_key="unused", base_url=chunk_server.url)
    res = co.rerank(model="tiny-chunks", query=QUERY, documents=docs,
                    request_options={"additional_body_parameters": {"chunking": CHUNKING}})
    assert [r.index for r in res.results] == [w["index"] for w in want]
    for r, w in zip(res.results, want):
        assert r.relevance_score == pytest.approx(w["score"], abs=1e-5)
        chunk = getattr(r, "chunk", None) or (r.model_extra or {}).get("chunk")
        assert chunk is not None and chunk["start"] == w["chunk"]["start"] and chunk["end"] == w["chunk"]["end"]
