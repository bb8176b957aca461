"""KaLM-Reranker served from a passage store: documents by id in /v1/rerank and /v1/score, scored with
no encoder work; an unknown id is a 404 naming it, and the server keeps serving."""
import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from engine import EngineConfig
from engine.scaleout.index_job import run_index
from engine.serving.service import Service
from kalm_tiny import KaLMReference, build_kalm

DOCS = {"cn": "The capital of China is Beijing.", "g": "Gravity attracts bodies toward one another.", "r": "a river"}
QUERY = "capital of china"


@pytest.fixture(scope="module")
def stored(tmp_path_factory, start_server):
    tmp = tmp_path_factory.mktemp("kalm-store-http")
    path = tmp / "KaLM-Reranker-tiny"
    model = build_kalm(path, seed=5)
    (tmp / "c.jsonl").write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in DOCS.items()))
    run_index(str(tmp / "c.jsonl"), str(tmp / "s"), compression_ratio=4, progress=False,
              config=EngineConfig(model=str(path), device="cpu"))
    server = start_server(Service(str(path), device="cpu", passage_store=str(tmp / "s")), "tiny-kalm")
    return server, KaLMReference(model, AutoTokenizer.from_pretrained(str(path)))


def test_rerank_and_score_by_id(stored):
    server, ref = stored
    want = ref.scores([(QUERY, d) for d in DOCS.values()])
    with server.client() as c:
        r = c.post("/v1/rerank", json={"query": QUERY, "documents": [{"id": k} for k in DOCS],
                                       "return_documents": True})
        assert r.status_code == 200, r.text
        res = r.json()["results"]
        got = {x["index"]: x["relevance_score"] for x in res}
        np.testing.assert_allclose([got[i] for i in range(3)], want, atol=1e-4)
        assert {x["document"]["id"] for x in res} == set(DOCS)
        assert server.service.engine.passage_store is not None
        # ids, an id with its text and plain text, mixed
        r = c.post("/v1/score", json={"text_1": QUERY, "text_2": [{"id": "cn"}, {"id": "g", "text": DOCS["g"]},
                                                                   DOCS["r"]]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose([x["score"] for x in r.json()["data"]], want, atol=1e-4)


def test_unknown_id_is_404_and_the_server_keeps_serving(stored):
    server, _ = stored
    with server.client() as c:
        r = c.post("/v1/rerank", json={"query": QUERY, "documents": [{"id": "cn"}, {"id": "missing-7"}]})
        assert r.status_code == 404, r.text
        assert "missing-7" in r.json()["error"]["message"]
        r = c.post("/v1/score", json={"text_1": QUERY, "text_2": [{"id": "missing-8"}]})
        assert r.status_code == 404 and "missing-8" in r.json()["error"]["message"]
        r = c.post("/v1/rerank", json={"query": QUERY, "documents": [{"id": 3}]})
        assert r.status_code == 422, r.text
        r = c.post("/v1/rerank", json={"query": QUERY, "documents": [{"id": "cn"}]})
        assert r.status_code == 200, r.text


def test_ids_on_a_server_without_a_store_are_a_clear_400(rerank_server):
    with rerank_server.client() as c:
        r = c.post("/v1/rerank", json={"query": "q", "documents": [{"id": "a"}]})
        assert r.status_code == 400 and "passage store" in r.json()["error"]["message"]
