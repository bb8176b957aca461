"""Hardening: bounded classification work, lenient model names without --served-model-name, broken
weights refused at load, non-finite results never sent as JSON."""
import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from engine import Classifier, Reranker
from engine.weights import WeightError
from server_helpers import RERANK_NAME


def test_classify_pairs_are_bounded(start_server, rerank_service):
    server = start_server(rerank_service, "few-pairs", max_pairs=10)
    with server.client() as c:
        r = c.post("/v1/classify", json={"input": ["a", "b", "c"], "labels": ["w", "x", "y", "z"]})
        assert r.status_code == 413, r.text
        assert "12 pairs" in r.json()["error"]["message"] and "--max-pairs" in r.json()["error"]["message"]
        assert c.post("/v1/classify", json={"input": ["a", "b"], "labels": ["w", "x", "y"]}).status_code == 200


def test_bi_encoder_embeds_each_label_once(embed_service):
    clf = Classifier(reranker=embed_service.reranker)
    texts = ["the team won the final", "parliament passed the law", "a new phone", "rain tomorrow"]
    labels = {"sports": "about sports", "politics": "about politics", "tech": "about technology"}
    stats = {}
    out = clf.classify(texts, labels, stats=stats)
    assert len(out) == 4
    assert stats["sequences"] == len(texts) + len(labels)  # not texts x labels


def test_any_model_name_without_served_model_name(start_server, rerank_service):
    server = start_server(rerank_service, "lenient", strict_names=False)
    with server.client() as c:
        for name in ("rerank-v3.5", "rerank-english-v3.0", "Qwen3-Reranker-0.6B"):
            r = c.post("/v1/rerank", json={"model": name, "query": "q", "documents": ["a", "b"]})
            assert r.status_code == 200, r.text
            assert r.json()["model"] == "lenient"  # the served name, whatever was asked
    strict = start_server(rerank_service, RERANK_NAME + "-strict")
    with strict.client() as c:
        assert c.post("/v1/rerank", json={"model": "rerank-v3.5", "query": "q", "documents": ["a"]}).status_code == 404


def test_non_finite_weights_are_refused_at_load(make_qwen3, tmp_path):
    src = make_qwen3()
    folder = tmp_path / "Qwen3-Reranker-broken"
    folder.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    w = tensors["model.layers.1.mlp.down_proj.weight"].clone()
    w[3, 5] = float("nan")
    tensors["model.layers.1.mlp.down_proj.weight"] = w
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightError, match=r"model.layers.1.mlp.down_proj.weight in model.safetensors holds 1 NaN"):
        Reranker(str(folder), device="cpu")


def test_non_finite_results_are_an_error_not_invalid_json(start_server, rerank_service, monkeypatch):
    server = start_server(rerank_service, "nan-guard")
    real = rerank_service.reranker.rank

    def nan_rank(*args, **kwargs):
        out = real(*args, **kwargs)
        out[0]["score"] = float("nan")
        return out

    monkeypatch.setattr(rerank_service.reranker, "rank", nan_rank)
    with server.client() as c:
        r = c.post("/v1/rerank", json={"query": "q", "documents": ["a", "b"]})
        assert r.status_code == 500 and "non-finite" in r.json()["error"]["message"]
        monkeypatch.undo()
        assert c.post("/v1/rerank", json={"query": "q", "documents": ["a"]}).status_code == 200
    assert np.isfinite(real("q", ["a"])[0]["score"])


def test_schema_says_what_the_server_enforces(rerank_server, embed_server):
    with rerank_server.client() as c:
        spec = c.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert schemas["RerankBody"]["properties"]["query"]["pattern"] == "\\S"
    labels = schemas["ClassifyBody"]["properties"]["labels"]["anyOf"]
    assert labels[0]["minItems"] == 1 and labels[1]["minProperties"] == 1
    assert "equal length" in schemas["ScoreBody"]["description"]
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    with embed_server.client() as c:
        r = c.post("/embed", json={"inputs": ["x"], "truncate": 0})  # an int is not a bool
        assert r.status_code == 422 and "truncate" in r.json()["error"]  # TEI's error body


def test_unhandled_errors_are_500_with_their_traceback_logged(start_server, rerank_service, monkeypatch, caplog):
    server = start_server(rerank_service, "boom")

    def boom(*args, **kwargs):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(rerank_service, "rank", boom)
    with caplog.at_level("ERROR", logger="engine.serving.server"), server.client() as c:
        r = c.post("/v1/rerank", json={"query": "q", "documents": ["a"]})
    assert r.status_code == 500 and "RuntimeError" in r.json()["error"]["message"]
    record = next(x for x in caplog.records if "unhandled error" in x.getMessage())
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError  # not "NoneType: None"


def test_engine_counters_move_with_batches(rerank_service):
    before = rerank_service.stats()["tokens_computed"]
    rerank_service.rank("a query about rivers", ["the river runs", "a city"])
    assert rerank_service.stats()["tokens_computed"] == rerank_service.engine.scheduler.totals["tokens_computed"]
    assert rerank_service.stats()["tokens_computed"] > before
