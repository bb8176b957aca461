"""Malformed requests get their documented status and a JSON error naming the field; the server keeps serving.

Documented choices: unknown fields are ignored (clients send provider-specific
extras); broken JSON, bad UTF-8 and unparseable bodies are 400; well-formed JSON
of the wrong shape or type is 422; an empty query is 400; an empty document
list is 200 with no results; too many documents or too large a body is 413.
"""
import json
import threading

import numpy as np
import pytest

from server_helpers import EMBED_NAME, RERANK_NAME

JSON = {"content-type": "application/json"}


def raw(data: bytes) -> dict:
    return {"content": data, "headers": JSON}


def js(body) -> dict:
    return {"json": body}


def ok(**extra):
    return {"query": "what is the capital of china?", "documents": ["beijing", "a river"], **extra}


# (id, server, method, path, request kwargs, status, error param or None)
CASES = [
    ("broken-json", "rerank", "POST", "/v1/rerank", raw(b'{"query": "q", "documents": ['), 400, None),
    ("not-utf8", "rerank", "POST", "/v1/rerank", raw(b'{"query": "q\xff\xfe", "documents": ["a"]}'), 400, None),
    ("lone-surrogate", "rerank", "POST", "/v1/rerank", raw(b'{"query": "q", "documents": ["ok", "\\ud800"]}'), 422,
     "documents[1]"),
    ("too-deep", "rerank", "POST", "/v1/rerank", raw(b"[" * 100_000 + b"]" * 100_000), 400, None),
    ("empty-body", "rerank", "POST", "/v1/rerank", raw(b""), 422, None),
    ("body-is-a-list", "rerank", "POST", "/v1/rerank", js([ok()]), 422, None),
    ("missing-query", "rerank", "POST", "/v1/rerank", js({"documents": ["a"]}), 422, "query"),
    ("query-not-string", "rerank", "POST", "/v2/rerank", js(ok(query=123)), 422, "query"),
    ("empty-query", "rerank", "POST", "/v1/rerank", js(ok(query="")), 400, "query"),
    ("blank-query", "rerank", "POST", "/rerank", js(ok(query="  \n ")), 400, "query"),
    ("documents-a-string", "rerank", "POST", "/v1/rerank", js(ok(documents="beijing")), 422, "documents"),
    ("null-document", "rerank", "POST", "/v1/rerank", js(ok(documents=["a", None])), 422, "documents[1]"),
    ("number-document", "rerank", "POST", "/v1/rerank", js(ok(documents=[5])), 422, "documents[0]"),
    ("document-without-text", "rerank", "POST", "/v1/rerank", js(ok(documents=[{"title": "x"}])), 422, "documents[0]"),
    ("no-documents", "rerank", "POST", "/v1/rerank", js({"query": "q"}), 422, "documents"),
    ("documents-and-texts", "rerank", "POST", "/rerank", js(ok(texts=["a"])), 422, "texts"),
    ("negative-top-n", "rerank", "POST", "/v1/rerank", js(ok(top_n=-1)), 422, "top_n"),
    ("negative-top-n", "rerank", "POST", "/v1/rerank", js(ok(top_n=-1)), 422, "top_n"),  # 0 is all (vLLM)
    ("top-n-not-int", "rerank", "POST", "/v1/rerank", js(ok(top_n="three")), 422, "top_n"),
    ("zero-max-tokens", "rerank", "POST", "/v1/rerank", js(ok(max_tokens_per_doc=0)), 422, "max_tokens_per_doc"),
    ("bad-return-documents", "rerank", "POST", "/v1/rerank", js(ok(return_documents="maybe")), 422, "return_documents"),
    ("bad-direction", "rerank", "POST", "/rerank", js({"query": "q", "texts": ["a"], "truncation_direction": "up"}),
     422, "truncation_direction"),
    ("unknown-model", "rerank", "POST", "/v1/rerank", js(ok(model="rerank-english-v3.0")), 404, "model"),
    # Strict types: no bool/string coercion, no NaN/Infinity literals.
    ("top-n-bool", "rerank", "POST", "/v1/rerank", js(ok(top_n=True)), 422, "top_n"),
    ("top-n-string", "rerank", "POST", "/v1/rerank", js(ok(top_n="2")), 422, "top_n"),
    ("return-documents-string", "rerank", "POST", "/v1/rerank", js(ok(return_documents="yes")), 422,
     "return_documents"),
    ("nan-literal", "rerank", "POST", "/v1/rerank", raw(b'{"query": "q", "documents": ["a"], "min_score": NaN}'), 422,
     "min_score"),
    ("infinity-literal", "rerank", "POST", "/v1/classify",
     raw(b'{"input": ["a"], "labels": ["x"], "threshold": Infinity}'), 422, "threshold"),
    ("body-over-8mb", "rerank", "POST", "/v1/rerank", raw(json.dumps(ok(documents=["x" * (10 << 20)])).encode()),
     413, None),
    ("wrong-method", "rerank", "GET", "/v1/rerank", {}, 405, None),
    ("unknown-route", "rerank", "POST", "/v9/rerank", js(ok()), 404, None),
    ("score-missing-text-2", "rerank", "POST", "/v1/score", js({"text_1": "q"}), 422, "text_2"),
    ("score-text-not-string", "rerank", "POST", "/v1/score", js({"text_1": "q", "text_2": ["a", 1]}), 422, "text_2[1]"),
    ("embeddings-from-reranker", "rerank", "POST", "/v1/embeddings", js({"input": "x"}), 400, None),
    ("bad-encoding-format", "embed", "POST", "/v1/embeddings", js({"input": "x", "encoding_format": "hex"}), 422,
     "encoding_format"),
    ("token-id-input", "embed", "POST", "/v1/embeddings", js({"input": [[1, 10**9]]}), 400, "input[0]"),
    ("dimensions-too-large", "embed", "POST", "/embed", js({"inputs": ["x"], "dimensions": 1000}), 400, "dimensions"),
    ("zero-dimensions", "embed", "POST", "/v1/embeddings", js({"input": "x", "dimensions": 0}), 422, "dimensions"),
    ("embed-missing-inputs", "embed", "POST", "/embed", js({"input": "x"}), 422, "inputs"),
    ("embeddings-unknown-model", "embed", "POST", "/v1/embeddings", js({"input": "x", "model": "text-embedding-3"}),
     404, "model"),
    ("too-many-documents", "small", "POST", "/v1/rerank", js(ok(documents=["d"] * 6)), 413, "documents"),
    ("too-many-inputs", "small", "POST", "/v1/score", js({"text_1": "q", "text_2": ["d"] * 6}), 413, "text_2"),
]

# Odd but valid: served.
VALID = [
    ("unknown-fields-ignored", "/v1/rerank", ok(rank_fields=["text"], priority=3, foo={"bar": 1}), 200),
    ("empty-documents", "/v1/rerank", ok(documents=[]), 200),
    ("huge-top-n", "/v1/rerank", ok(top_n=10**30), 200),
    ("empty-string-document", "/v1/rerank", ok(documents=[""]), 200),
    # A form body (curl -d without -H) is refused: that is what a web page's cross-site form sends.
    ("form-content-type", "/v1/rerank", None, 415),
]


@pytest.fixture(scope="module")
def servers(rerank_server, embed_server, start_server, rerank_service):
    small = start_server(rerank_service, "small-limits", max_documents=5)
    return {"rerank": rerank_server, "embed": embed_server, "small": small}


@pytest.mark.parametrize("case_id,server,method,path,kwargs,status,param", CASES, ids=[c[0] for c in CASES])
def test_malformed_request(servers, case_id, server, method, path, kwargs, status, param):
    with servers[server].client() as c:
        r = c.request(method, path, **kwargs)
        assert r.status_code == status, r.text
        if path == "/embed":  # a TEI route: TEI's error body, naming the field
            err = r.json()
            assert set(err) == {"error", "error_type"} and param in err["error"], err
        else:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param"} and err["message"]
            assert err["param"] == param, err
        # ... and the server keeps answering
        assert c.post("/v1/rerank", json=ok()).status_code == 200


@pytest.mark.parametrize("case_id,path,body,status", VALID, ids=[c[0] for c in VALID])
def test_odd_but_valid_request(rerank_server, case_id, path, body, status):
    with rerank_server.client() as c:
        if body is None:
            r = c.post(path, content=json.dumps(ok()).encode(),
                       headers={"content-type": "application/x-www-form-urlencoded"})
        else:
            r = c.post(path, json=body)
    assert r.status_code == status, r.text
    if case_id == "empty-documents":
        assert r.json()["results"] == []


def test_bad_requests_do_not_disturb_one_in_flight(rerank_server):
    docs = [f"document number {i} about the river and the mountain city " * (1 + i % 7) for i in range(400)]
    body = {"model": RERANK_NAME, "query": "which river?", "documents": docs, "top_n": 20}
    with rerank_server.client() as c:
        alone = c.post("/v1/rerank", json=body).json()
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", rerank_server.client().post("/v1/rerank", json=body)))
    t.start()
    with rerank_server.client() as c:
        for _, server, method, path, kwargs, _, _ in CASES:
            if server == "rerank":
                c.request(method, path, **kwargs)
    t.join(timeout=120)
    got = result["r"].json()
    assert [x["index"] for x in got["results"]] == [x["index"] for x in alone["results"]]
    np.testing.assert_allclose([x["relevance_score"] for x in got["results"]],
                               [x["relevance_score"] for x in alone["results"]], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def keyed(start_server, rerank_service):
    return start_server(rerank_service, RERANK_NAME, api_key="sekret-key")


@pytest.mark.parametrize("method,path", [("POST", "/v1/rerank"), ("POST", "/v2/rerank"), ("POST", "/rerank"),
                                         ("POST", "/v1/score"), ("POST", "/embed"), ("POST", "/v1/embeddings"),
                                         ("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/openapi.json")])
def test_auth_required(keyed, method, path):
    body = {"json": ok()} if method == "POST" else {}
    with keyed.client() as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret-key"},
                        {"Authorization": "Bearer sekret-keyX"}, {"Authorization": "Basic sekret-key"}):
            r = c.request(method, path, headers=headers, **body)
            assert r.status_code == 401, (headers, r.text)
            assert r.json()["error"]["type"] == "authentication_error"
            assert r.headers["www-authenticate"] == "Bearer"
        for scheme in ("Bearer", "bearer"):  # the scheme is case-insensitive (RFC 7235)
            r = c.request(method, path, headers={"Authorization": f"{scheme} sekret-key"}, **body)
            assert r.status_code != 401, r.text


def test_health_needs_no_key(keyed):
    with keyed.client() as c:
        assert c.get("/health").status_code == 200
        head = c.head("/health")  # load balancers and uptime checks probe with HEAD
        assert head.status_code == 200 and head.content == b""


def test_clients_send_the_key(keyed):
    import cohere
    import openai

    res = cohere.ClientV2(api_key="sekret-key", base_url=keyed.url).rerank(model=RERANK_NAME, query="q",
                                                                          documents=["a", "b"])
    assert len(res.results) == 2
    with pytest.raises(cohere.errors.UnauthorizedError):
        cohere.ClientV2(api_key="nope", base_url=keyed.url).rerank(model=RERANK_NAME, query="q", documents=["a"])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="nope", base_url=f"{keyed.url}/v1", max_retries=0).embeddings.create(
            model=EMBED_NAME, input="x")
