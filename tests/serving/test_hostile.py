"""A hostile client on loopback: what it sends, over real HTTP, and what the server must still do.

Raw sockets where httpx would refuse to misbehave (huge or unfinished headers, dripped bodies,
pipelining); each test also checks that the server keeps answering others.
"""
import json
import logging
import socket
import threading
import time

import numpy as np
import pytest

from engine import Reranker
from engine.core.request import Cancelled
from engine.serving.server import ServerConfig, served_names
from server_helpers import RERANK_NAME, LiveServer


def raw(server, data: bytes, timeout: float = 15.0, linger: float = 0.0) -> bytes:
    """Send ``data`` on a new connection and read until the server closes it (or ``timeout``)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading (and answered, or closed): read what it sent
        if linger:
            time.sleep(linger)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        return out


def post(path: str, body: dict, host: str = "127.0.0.1", extra: bytes = b"") -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n").encode() + extra + b"\r\n" + data


def healthy(server) -> bool:
    with server.client(timeout=10) as c:
        return c.get("/health").status_code == 200


@pytest.fixture(scope="module")
def tight(start_server, rerank_service):
    """A rerank server with small limits, so that the tests reach them fast."""
    return start_server(rerank_service, "tight", max_header_bytes=16 << 10, header_timeout_s=1.0,
                        body_timeout_s=1.5, max_body_bytes=1 << 20, max_pending_body_bytes=300_000)


# 2. Large responses: bounded, encoded off the event loop


def test_response_size_is_bounded(start_server, embed_service):
    server = start_server(embed_service, "small-responses", max_response_bytes=50_000)
    d = embed_service.dimension
    with server.client() as c:
        # Refused before any work: the answer cannot fit, whatever the numbers.
        r = c.post("/embed", json={"inputs": ["a"] * (50_000 // (8 * d) + 1)})
        assert r.status_code == 413 and "--max-response-mb" in r.json()["error"], r.text  # TEI's error body
        r = c.post("/v1/embeddings", json={"input": ["a"] * (50_000 // (8 * d) + 1)})
        assert r.status_code == 413, r.text
        # Within the early estimate, over the limit once encoded: refused too, as it is encoded.
        n = 50_000 // (8 * d) - 1
        r = c.post("/embed", json={"inputs": ["word"] * n})
        assert len(json.dumps(embed_service.embed(["word"] * n)[0].tolist())) > 50_000  # the case is real
        assert r.status_code == 413, r.text
        # Within it: the numbers are the engine's float32 values exactly.
        texts = ["alpha beta", "gamma"]
        r = c.post("/embed", json={"inputs": texts})
        assert r.status_code == 200, r.text
        assert np.array_equal(np.asarray(r.json(), dtype=np.float32), embed_service.embed(texts)[0])
        assert healthy(server)


def test_health_answers_while_a_large_response_is_built(start_server, embed_service):
    server = start_server(embed_service, "big-responses")
    done = threading.Event()
    result = {}

    def big():
        with server.client() as c:
            result["r"] = c.post("/v1/embeddings", json={"input": [f"text {i}" for i in range(3000)]})
        done.set()

    t = threading.Thread(target=big)
    t.start()
    answered_meanwhile = 0
    with server.client(timeout=10) as c:
        while not done.is_set():
            assert c.get("/health").status_code == 200
            answered_meanwhile += not done.is_set()
    t.join()
    assert result["r"].status_code == 200 and len(result["r"].json()["data"]) == 3000
    assert answered_meanwhile > 0


# 3. Headers: capped, and a deadline for the request head


def test_huge_header_is_refused_and_others_are_served(tight):
    # Past 16 KiB of unfinished head the server answers 400 and closes (the rest is never read; the client
    # may see a reset before the answer).
    out = raw(tight, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (4 << 20) + b"\r\n\r\n")
    assert out == b"" or out.startswith(b"HTTP/1.1 400"), out[:200]
    out = raw(tight, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (40 << 10))
    assert out.startswith(b"HTTP/1.1 400"), out[:200]
    # Many headers that each fit a read but together pass the cap: 431 from the gate.
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 1000) for i in range(20))
    out = raw(tight, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n" + many + b"\r\n", timeout=5)
    assert out.startswith(b"HTTP/1.1 431"), out[:200]
    assert healthy(tight)


def test_unfinished_request_head_is_closed(tight):
    start = time.monotonic()
    out = raw(tight, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ", timeout=15)
    assert out == b"" and time.monotonic() - start < 10  # closed by the server (header_timeout_s=1), not by us
    # The deadline holds for the next request on a kept-alive connection too.
    start = time.monotonic()
    out = raw(tight, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /health HTTP/1.1\r\nHost: 1", timeout=15)
    assert out.count(b"HTTP/1.1 200") == 1 and time.monotonic() - start < 10
    assert healthy(tight)


# 4. --graceful-timeout bounds shutdown


def test_shutdown_cancels_work_in_flight_and_answers_503(rerank_service, monkeypatch):
    started, stopped = [], []

    def stuck(*args, cancel, **kwargs):  # engine work that only a cancel ends
        started.append(1)
        cancel.wait(60)
        stopped.append(cancel.is_set())
        raise Cancelled()

    monkeypatch.setattr(rerank_service, "rank", stuck)
    config = ServerConfig(served_names=served_names(str(rerank_service.engine.folder), "shutdown"))
    server = LiveServer(rerank_service, config, graceful_timeout_s=1).start()
    answers = []

    def client():
        with server.client() as c:
            answers.append(c.post("/v1/rerank", json={"query": "q", "documents": ["a"]}))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(started) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    begin = time.monotonic()
    server.stop()
    took = time.monotonic() - begin
    for t in threads:
        t.join(10)
    assert not server.thread.is_alive() and took < 1 + 5
    assert [a.status_code for a in answers] == [503] * 3
    assert all("shutting down" in a.json()["error"]["message"] for a in answers)
    assert stopped == [True] * 3  # the engine work was cancelled, not run to its end


# 5. --body-timeout is one deadline; bodies in flight are bounded together


def test_dripped_body_meets_one_deadline(tight):
    with socket.create_connection(("127.0.0.1", tight.port), timeout=15) as s:
        s.sendall(b"POST /v1/rerank HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n")
        start, out = time.monotonic(), b""
        s.settimeout(0.4)
        while time.monotonic() - start < 12 and not out:
            try:
                s.sendall(b" ")  # one byte per 0.4 s: each chunk well within the deadline
                out = s.recv(65536)
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
    assert out.startswith(b"HTTP/1.1 408"), out[:200]
    assert time.monotonic() - start < 8  # body_timeout_s=1.5 for the whole body
    assert healthy(tight)


def test_bodies_being_received_are_bounded_together(tight):
    head = (b"POST /v1/rerank HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 900000\r\n\r\n")
    holders = []
    try:
        for _ in range(2):  # 2 x 120 kB held: within the 300 kB bound
            s = socket.create_connection(("127.0.0.1", tight.port), timeout=10)
            s.sendall(head + b" " * 120_000)
            holders.append(s)
        time.sleep(0.3)
        out = raw(tight, head + b" " * 120_000, timeout=5)  # the third passes it
        assert out.startswith(b"HTTP/1.1 503") and b"retry-after" in out.lower().split(b"\r\n\r\n")[0], out[:300]
    finally:
        for s in holders:
            s.close()
    time.sleep(0.3)
    with tight.client() as c:  # released: a normal request passes
        assert c.post("/v1/rerank", json={"query": "q", "documents": ["a"]}).status_code == 200


# 6. Browsers and DNS rebinding


def test_json_routes_need_a_json_content_type(rerank_server):
    body = json.dumps({"query": "q", "documents": ["a", "b"]})
    with rerank_server.client() as c:
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            r = c.post("/v1/rerank", content=body, headers={"content-type": ctype} if ctype else {})
            if ctype is None:
                assert "content-type" not in r.request.headers
            assert r.status_code == 415, (ctype, r.text)
            assert "application/json" in r.json()["error"]["message"]
        for ctype in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
            assert c.post("/v1/rerank", content=body, headers={"content-type": ctype}).status_code == 200


def test_loopback_server_answers_only_loopback_host_names(rerank_server, start_server, rerank_service):
    with rerank_server.client() as c:
        for path in ("/v1/models", "/metrics", "/health"):
            r = c.get(path, headers={"Host": "attacker.example"})
            assert r.status_code == 421 and "--allowed-hosts" in r.json()["error"]["message"], r.text
        for host in ("localhost", f"localhost:{rerank_server.port}", "127.0.0.1", "[::1]:80"):
            assert c.get("/v1/models", headers={"Host": host}).status_code == 200, host
    listed = start_server(rerank_service, "listed", allowed_hosts=["api.example"])
    with listed.client() as c:
        assert c.get("/v1/models", headers={"Host": "api.example:8000"}).status_code == 200
        assert c.get("/v1/models", headers={"Host": "other.example"}).status_code == 421
    anyhost = start_server(rerank_service, "any-host", allowed_hosts=["*"])
    with anyhost.client() as c:
        assert c.get("/v1/models", headers={"Host": "attacker.example"}).status_code == 200


def test_no_redirect_echoes_the_host(rerank_server):
    with rerank_server.client(follow_redirects=False) as c:
        r = c.post("/v1/rerank/", json={"query": "q", "documents": ["a"]})
        assert r.status_code == 404 and "location" not in r.headers


# 7. Pipelining


def test_bad_pipelined_request_keeps_the_good_ones_before_it(rerank_server):
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(level=logging.DEBUG)
    logging.getLogger("uvicorn.error").addHandler(handler)
    try:
        good = post("/v1/rerank", {"query": "q", "documents": ["a", "b"]})
        out = raw(rerank_server, good * 4 + b"NOT HTTP AT ALL\r\n\r\n", timeout=20)
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
    assert out.count(b"HTTP/1.1 200") == 4 and out.count(b'"relevance_score"') == 8, out[:500]
    assert out.count(b"HTTP/1.1 400") == 1
    protocol = [r for r in records if "Invalid HTTP request" in r.getMessage()]
    assert protocol and all(r.levelno == logging.WARNING for r in protocol)
    assert not [r for r in records if r.levelno >= logging.ERROR]
    assert healthy(rerank_server)


# 8. Validation gaps


@pytest.mark.parametrize("query", ["", " ", "\u200b", "\u200b\u200d\ufeff", "\u0301\u0301", "\u0000"])
def test_blank_queries_are_refused_everywhere(rerank_server, rerank_service, query):
    with rerank_server.client() as c:
        r = c.post("/v1/rerank", json={"query": query, "documents": ["a"]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "query", r.text
        r = c.post("/v1/score", json={"text_1": query, "text_2": [""]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "text_1", r.text
        r = c.post("/v1/score", json={"text_1": [query, "q"], "text_2": ["a", "b"]})
        assert r.status_code == 400 and "text_1[0]" in r.json()["error"]["message"], r.text
    with pytest.raises(ValueError, match="query must not be empty"):
        Reranker.rank(rerank_service.reranker, query, ["a"])


def test_a_real_query_with_marks_passes(rerank_server):
    with rerank_server.client() as c:
        assert c.post("/v1/rerank", json={"query": "e\u0301", "documents": ["a"]}).status_code == 200
        assert c.post("/v1/score", json={"text_1": "q", "text_2": [""]}).status_code == 200  # documents may be empty


def test_duplicate_authorization_headers_are_refused(start_server, rerank_service):
    keyed = start_server(rerank_service, RERANK_NAME + "-dup", api_key="sekret-key")
    with keyed.client() as c:
        good = ("Authorization", "Bearer sekret-key")
        r = c.post("/v1/rerank", json={"query": "q", "documents": ["a"]}, headers=[good, good])
        assert r.status_code == 400 and "Authorization" in r.json()["error"]["message"], r.text
        r = c.post("/v1/rerank", json={"query": "q", "documents": ["a"]},
                   headers=[("Authorization", "Bearer wrong"), good])
        assert r.status_code == 400
        assert c.post("/v1/rerank", json={"query": "q", "documents": ["a"]}, headers=[good]).status_code == 200



def test_schema_says_what_the_server_does(rerank_server, embed_server, embed_service):
    with rerank_server.client() as c:
        spec = c.get("/openapi.json").json()
        schemas = spec["components"]["schemas"]
        assert "/v1/index" not in spec["paths"]  # not a KaLM-Reranker: the route answers 400
        assert c.post("/v1/index", json={"documents": ["a"]}).status_code == 400
        assert {"required": ["texts"]} in schemas["RerankBody"]["oneOf"]
        r = c.post("/v1/rerank", json={"query": "q", "documents": ["a"], "texts": ["a"]})
        assert r.status_code == 422, r.text
        parts = next(o for o in schemas["RerankBody"]["properties"]["query"]["anyOf"] if o.get("type") == "array")
        assert {"type": "string"} in parts["items"]["anyOf"]  # a bare string is a text part
        r = c.post("/v1/rerank", json={"query": ["a ", {"type": "text", "text": "query"}], "documents": ["a"]})
        assert r.status_code == 200, r.text
    with embed_server.client() as c:
        schemas = c.get("/openapi.json").json()["components"]["schemas"]
        assert {"required": ["messages"]} in schemas["EmbeddingsBody"]["oneOf"]
        assert c.post("/v1/embeddings", json={}).status_code == 422
        for name in ("EmbedBody", "EmbeddingsBody"):
            dims = schemas[name]["properties"]["dimensions"]
            assert any(o.get("maximum") == embed_service.dimension for o in dims.get("anyOf", [dims])), dims
        r = c.post("/embed", json={"inputs": ["a"], "dimensions": embed_service.dimension + 1})
        assert r.status_code == 400 and "dimensions" in r.json()["error"], r.text  # TEI's error body
