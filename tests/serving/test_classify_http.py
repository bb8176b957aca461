"""/v1/classify and min_score over HTTP, and the classify CLI, against the Python API."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from engine import Classifier, Reranker
from server_helpers import RERANK_NAME

LABELS = {"sports": "This text is about sports.", "politics": "This text is about politics.",
          "food": "This text is about food."}
TEXTS = ["The team won the final.", "", "Parliament passed the budget."]


@pytest.fixture(scope="module")
def py_classifier(rerank_folder):
    return Classifier(str(rerank_folder), device="cpu")


def test_classify_matches_python(rerank_server, py_classifier):
    want = py_classifier.classify(TEXTS, LABELS)
    with rerank_server.client() as c:
        r = c.post("/v1/classify", json={"model": RERANK_NAME, "input": TEXTS, "labels": LABELS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["label"] for d in body["data"]] == [w["label"] for w in want]
    for d, w in zip(body["data"], want):
        np.testing.assert_allclose([d["scores"][k] for k in LABELS], [w["scores"][k] for k in LABELS], atol=1e-5)
    assert body["usage"]["prompt_tokens"] > 0


def test_classify_multi_label_and_plain_names(rerank_server):
    with rerank_server.client() as c:
        r = c.post("/v1/classify", json={"input": "a text", "labels": ["x", "y"], "multi_label": True,
                                         "threshold": 0.0})
    assert r.status_code == 200, r.text
    assert sorted(r.json()["data"][0]["label"]) == ["x", "y"]


@pytest.mark.parametrize("labels,match", [([], "must not be empty"), (["a", "a"], "duplicate"),
                                          (["a", 1], r"labels\[1\]"), ({"a": 3}, "description"), ("a", "not a string"),
                                          (5, "list of strings"), (None, "list of strings"),
                                          ({"\ud800": "sports"}, "lone surrogate"), (["\ud800", "b"], "lone surrogate"),
                                          ({"a": "\ud800"}, "lone surrogate")])
def test_classify_bad_labels(rerank_server, labels, match):
    """Labels are validated with the body (422 naming them), never a 500; the connection stays usable."""
    with rerank_server.client() as c:
        # Sent as ASCII JSON, so that lone surrogates travel as \ud800 escapes.
        r = c.post("/v1/classify", content=json.dumps({"input": ["t"], "labels": labels}),
                   headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["param"] == "labels"
        assert re.search(match, r.json()["error"]["message"])
        assert c.get("/health").status_code == 200


def test_min_score_filters(rerank_server, rerank_folder):
    rr = Reranker(str(rerank_folder), device="cpu")
    docs = ["apple pie", "the capital of china", "gravity", "a b c"]
    full = rr.rank("query", docs)
    cut = sorted(r["score"] for r in full)[1]
    with rerank_server.client() as c:
        r = c.post("/v1/rerank", json={"query": "query", "documents": docs, "min_score": cut})
    assert r.status_code == 200, r.text
    got = [x["index"] for x in r.json()["results"]]
    assert got == [x["index"] for x in full if x["score"] >= cut] and len(got) == 3


def test_classify_cli(rerank_folder, tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(LABELS))
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(t) for t in TEXTS) + "\n")
    out = subprocess.run([sys.executable, "-m", "engine.cli", "classify", "--model", str(rerank_folder),
                          "--device", "cpu", "--labels", str(labels), "--input", str(inp)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert all(set(r["scores"]) == set(LABELS) for r in rows)
