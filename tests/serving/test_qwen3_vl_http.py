"""Qwen3-VL over HTTP: the image shapes vLLM, SGLang and OpenAI clients send; bad images are 400s."""
import base64
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from engine.serving.service import Service
from tiny_qwen3_vl import sample_images, tiny_qwen3_vl

ATOL = 1e-5


@pytest.fixture(scope="module")
def images():
    return sample_images()


def uri(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_part(img):
    return {"type": "image_url", "image_url": {"url": uri(img)}}


@pytest.fixture(scope="module")
def vl_rerank(tmp_path_factory, qwen3_backend, start_server):
    # max_images=32: what `rerank-engine serve` sets by default (EngineConfig's default is no cap, as in Python)
    service = Service(str(tiny_qwen3_vl(tmp_path_factory, qwen3_backend, "Qwen3-VL-Reranker-tiny")), device="cpu",
                      max_images=32)
    return service, start_server(service, "tiny-vl-reranker")


@pytest.fixture(scope="module")
def vl_embed(tmp_path_factory, qwen3_backend, start_server):
    service = Service(str(tiny_qwen3_vl(tmp_path_factory, qwen3_backend, "Qwen3-VL-Embedding-tiny")), device="cpu",
                      allow_url_images=True, max_images=3)
    return service, start_server(service, "tiny-vl-embedder")


def test_vllm_content_documents_rerank_on_every_route(vl_rerank, images):
    service, server = vl_rerank
    docs = [{"content": [image_part(images["100x70"]), {"type": "text", "text": "a caption"}]}, "plain text",
            {"content": [{"type": "text", "text": "only text parts"}]}, {"text": "cohere shape"}]
    py_docs = [{"image": images["100x70"], "text": "a caption"}, "plain text", "only text parts", "cohere shape"]
    want = {r["index"]: r["score"] for r in service.reranker.rank("what is shown", py_docs)}
    with server.client() as c:
        for route in ("/v1/rerank", "/rerank"):
            r = c.post(route, json={"query": "what is shown", "documents": docs, "return_documents": True})
            assert r.status_code == 200, r.text
            got = r.json()["results"]
            np.testing.assert_allclose([x["relevance_score"] for x in got], [want[x["index"]] for x in got],
                                       atol=ATOL, rtol=0)
            echoed = {x["index"]: x["document"]["text"] for x in got}
            assert echoed == {0: "a caption", 1: "plain text", 2: "only text parts", 3: "cohere shape"}
        # vLLM's query as content, and /v1/score with a content text_2
        q = {"content": [image_part(images["square"]), {"type": "text", "text": "like this"}]}
        r = c.post("/v1/rerank", json={"query": q, "documents": docs[:2]})
        assert r.status_code == 200, r.text
        py_q = {"image": images["square"], "text": "like this"}
        want_q = {x["index"]: x["score"] for x in service.reranker.rank(py_q, py_docs[:2])}
        for x in r.json()["results"]:
            assert abs(x["relevance_score"] - want_q[x["index"]]) <= ATOL
        r = c.post("/v1/score", json={"text_1": "what is shown", "text_2": docs})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose([x["score"] for x in r.json()["data"]], [want[i] for i in range(4)], atol=ATOL)
        r = c.post("/v1/score", json={"text_1": q, "text_2": docs[0]})
        assert r.status_code == 200, r.text


def test_sglang_list_of_parts_documents_and_instruct(vl_rerank, images):
    service, server = vl_rerank
    docs = [[image_part(images["gray"]), {"type": "text", "text": "gray noise"}], [{"type": "text", "text": "words"}]]
    instr = "Find the matching picture"
    want = {r["index"]: r["score"] for r in service.reranker.rank(
        "noise", [{"image": images["gray"], "text": "gray noise"}, "words"], instruction=instr)}
    with server.client() as c:
        r = c.post("/v1/rerank", json={"query": "noise", "documents": docs, "instruct": instr})
    assert r.status_code == 200, r.text
    for x in r.json()["results"]:
        assert abs(x["relevance_score"] - want[x["index"]]) <= ATOL


def test_bad_images_are_400_naming_the_document_and_the_server_serves_on(vl_rerank, images):
    _, server = vl_rerank
    good = {"content": [image_part(images["square"])]}
    bad = [
        ({"content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]},
         "documents[1] image 0 could not be decoded"),
        ({"content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]},
         "--allow-url-images"),
        ({"content": [{"type": "image_url", "image_url": {"url": uri(images["square"].resize((1, 300)))}}]},
         "aspect ratio"),
        ([{"type": "video_url", "video_url": {"url": "x"}}], "part 0"),
    ]
    with server.client() as c:
        for doc, message in bad:
            r = c.post("/v1/rerank", json={"query": "q", "documents": [good, doc]})
            assert 400 <= r.status_code < 500, r.text
            assert message in r.json()["error"]["message"] or message in r.text
        r = c.post("/v1/rerank", json={"query": "q", "documents": [good] * 33})
        assert r.status_code == 400 and "more than 32 images" in r.json()["error"]["message"]
        assert c.post("/v1/rerank", json={"query": "q", "documents": [good, "text"]}).status_code == 200


def test_text_model_refuses_image_documents(rerank_server, images):
    with rerank_server.client() as c:
        r = c.post("/v1/rerank", json={"query": "q", "documents": ["a", {"content": [image_part(images["square"])]}]})
        assert r.status_code == 400 and "documents[1] holds an image" in r.json()["error"]["message"]
        r = c.post("/v1/rerank", json={"query": "q", "documents": [[{"type": "text", "text": "text parts"}]]})
        assert r.status_code == 200  # text-only parts are text


def test_openai_messages_with_image_parts(vl_embed, images):
    from openai import OpenAI
    from openai.types import CreateEmbeddingResponse

    service, server = vl_embed
    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    body = {"model": "tiny-vl-embedder", "messages": [
        {"role": "system", "content": "Find matching pictures"},
        {"role": "user", "content": [image_part(images["rgba"]), {"type": "text", "text": "a page"}]}]}
    got = client.post("/embeddings", body=body, cast_to=CreateEmbeddingResponse)
    want = service.embedder.embed([{"image": images["rgba"], "text": "a page"}], instruction="Find matching pictures")
    np.testing.assert_allclose(got.data[0].embedding, want[0], atol=ATOL)
    text = client.embeddings.create(model="tiny-vl-embedder", input=["plain text"], dimensions=16)
    np.testing.assert_allclose(text.data[0].embedding, service.embedder.embed(["plain text"], dimensions=16)[0],
                               atol=ATOL)


class _PNG(BaseHTTPRequestHandler):
    body = b""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)


def test_url_images_when_allowed(vl_embed, images):
    service, server = vl_embed
    buf = io.BytesIO()
    images["100x70"].save(buf, format="PNG")
    _PNG.body = buf.getvalue()
    http = ThreadingHTTPServer(("127.0.0.1", 0), _PNG)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{http.server_address[1]}/page.png"
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
        with server.client() as c:
            r = c.post("/v1/embeddings", json={"messages": messages})
            assert r.status_code == 200, r.text
            want = service.embedder.embed([{"image": images["100x70"]}])[0]
            np.testing.assert_allclose(r.json()["data"][0]["embedding"], want, atol=ATOL)
            four = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}] * 4}]
            r = c.post("/v1/embeddings", json={"messages": four})
            assert r.status_code == 400 and "more than 3 images" in r.json()["error"]["message"]
            assert c.post("/v1/embeddings", json={"input": "x", "messages": messages}).status_code == 422
    finally:
        http.shutdown()


def test_cli_rank_reads_image_documents(vl_rerank, images, tmp_path, capsys):
    import json

    from engine.cli import main

    service, _ = vl_rerank
    path = tmp_path / "page.png"
    images["100x70"].save(path)
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"image": str(path), "text": "a caption"}) + "\n" + json.dumps("plain text") + "\n")
    assert main(["rank", "--model", str(service.engine.folder), "--device", "cpu", "--query", "what is shown",
                 "--documents", str(docs)]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    got = {r["index"]: (r["relevance_score"], r["document"]["text"]) for r in results}
    py_docs = [{"image": images["100x70"], "text": "a caption"}, "plain text"]
    want = {r["index"]: r["score"] for r in service.reranker.rank("what is shown", py_docs)}
    assert {i: t for i, (_, t) in got.items()} == {0: "a caption", 1: "plain text"}
    np.testing.assert_allclose([got[i][0] for i in range(2)], [want[i] for i in range(2)], atol=ATOL)


def test_bad_images_fail_alone_among_concurrent_requests(vl_rerank, images):
    from concurrent.futures import ThreadPoolExecutor

    _, server = vl_rerank
    good = {"content": [image_part(images["square"]), {"type": "text", "text": "ok"}]}
    bad = {"content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}
    bodies = [{"query": f"q{i}", "documents": [good, "text"] + ([bad] if i % 3 == 0 else [])} for i in range(9)]
    with server.client() as c, ThreadPoolExecutor(9) as pool:
        codes = list(pool.map(lambda b: c.post("/v1/rerank", json=b).status_code, bodies))
    assert codes == [400 if i % 3 == 0 else 200 for i in range(9)]
