"""Qwen3 reranker and embedder parity with the model cards' transformers code (fp32, CPU)."""
import numpy as np
import pytest
import torch

from textgen import random_text
from engine import Embedder, Reranker
from reference_qwen3 import Qwen3EmbeddingReference, Qwen3RerankerReference

ATOL = 1e-4


def ragged_docs(rng):
    # From a single token to several hundred, plus an empty document.
    docs = ["", "a", "capital", random_text(rng, 3), random_text(rng, 17), random_text(rng, 64),
            random_text(rng, 129), random_text(rng, 300), "  leading spaces\nand newlines", "北京是中国的首都。 🙂"]
    return docs


def assert_spread(scores):
    # Guards against a degenerate model whose scores all sit at 0.5 (then parity would prove nothing).
    assert np.std(scores) > 0.02, scores


@pytest.mark.parametrize("tie,sharded", [(True, False), (False, False), (True, True), (False, True)])
def test_rerank_scores_match_model_card(make_qwen3, rng, tie, sharded):
    folder = make_qwen3(tie=tie, sharded=sharded)
    if sharded:
        assert (folder / "model.safetensors.index.json").is_file()
    ours = Reranker(str(folder), device="cpu")
    ref = Qwen3RerankerReference(folder)
    query = "what is the capital of china?"
    docs = ragged_docs(rng)
    got = ours.predict([(query, d) for d in docs])
    want = ref.scores([(query, d) for d in docs])
    assert_spread(want)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_rerank_custom_instruction_matches_and_matters(make_qwen3, rng):
    folder = make_qwen3()
    ours, ref = Reranker(str(folder), device="cpu"), Qwen3RerankerReference(folder)
    pairs = [(random_text(rng, 9), random_text(rng, n)) for n in (1, 40, 200)]
    instr = "Given a piece of text, retrieve relevant label descriptions that best match the text"
    got = ours.predict(pairs, instruction=instr)
    np.testing.assert_allclose(got, ref.scores(pairs, instruction=instr), atol=ATOL, rtol=0)
    default = ours.predict(pairs)
    assert np.max(np.abs(np.array(got) - np.array(default))) > 1e-4


def test_rank_sorts_and_truncates_top_n(make_qwen3, rng):
    ours = Reranker(str(make_qwen3()), device="cpu")
    docs = [random_text(rng, n) for n in (5, 50, 12, 80, 3)]
    scores = ours.predict([("query text", d) for d in docs])
    ranked = ours.rank("query text", docs)
    assert [r["index"] for r in ranked] == list(np.argsort(-np.array(scores), kind="stable"))
    assert [r["document"] for r in ranked] == [docs[r["index"]] for r in ranked]
    np.testing.assert_allclose([r["score"] for r in ranked], sorted(scores, reverse=True), atol=1e-6)
    assert len(ours.rank("query text", docs, top_n=2)) == 2


def test_long_pairs_truncated_like_reference(make_qwen3, rng):
    folder = make_qwen3()
    max_length = 120
    ours = Reranker(str(folder), device="cpu", max_length=max_length)
    ref = Qwen3RerankerReference(folder, max_length=max_length)
    pairs = [("a query", random_text(rng, 400)), ("another query", "short")]
    seqs = ours.engine.template.encode([p[0] for p in pairs], [p[1] for p in pairs]).ids
    assert len(seqs[0]) == max_length
    assert seqs[0][-9:] == ours.engine.template.suffix_ids  # the suffix survives truncation
    np.testing.assert_allclose(ours.predict(pairs), ref.scores(pairs), atol=ATOL, rtol=0)


def test_batched_equals_single(make_qwen3, rng):
    ours = Reranker(str(make_qwen3()), device="cpu", max_batch_tokens=600)
    pairs = [(random_text(rng, 5), random_text(rng, rng.randint(1, 150))) for _ in range(12)]
    together = ours.predict(pairs)
    alone = [ours.predict([p])[0] for p in pairs]
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)
    assert ours.stats["batches"] > 12  # the budget forced several packed batches for the 12 pairs


@pytest.mark.parametrize("base_model", [False, True])
def test_embeddings_match_last_token_pooling(make_qwen3, rng, base_model):
    folder = make_qwen3(name="Qwen3-Embedding-tiny", embed_tokenizer=True, base_model=base_model)
    ours = Embedder(str(folder), device="cpu")
    ref = Qwen3EmbeddingReference(folder)
    texts = ["", "hello", random_text(rng, 30), random_text(rng, 250)]
    seqs = ours.engine.template.encode(texts).ids
    assert all(s[-1] == 151643 for s in seqs)  # the tokenizer appends <|endoftext|>
    for dims in (None, 32, 8):
        got = torch.from_numpy(ours.embed(texts, dimensions=dims))
        want = ref.embed(texts, dimensions=dims)
        assert got.shape == want.shape
        cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
        assert cos.min() >= 0.99999, cos
        assert torch.allclose(got.norm(dim=-1), torch.ones(len(texts)), atol=1e-5)


def test_query_instruction_format(make_qwen3):
    folder = make_qwen3(name="Qwen3-Embedding-tiny", embed_tokenizer=True)
    ours = Embedder(str(folder), device="cpu")
    ref = Qwen3EmbeddingReference(folder)
    q = ours.embed(["what is gravity"], is_query=True, instruction="Find physics passages")
    want = ref.embed(["Instruct: Find physics passages\nQuery:what is gravity"])
    assert torch.nn.functional.cosine_similarity(torch.from_numpy(q), want).item() >= 0.99999


def test_reranker_over_embedding_model_ranks_by_cosine(make_qwen3, rng):
    folder = make_qwen3(name="Qwen3-Embedding-tiny", embed_tokenizer=True)
    rr, emb = Reranker(str(folder), device="cpu"), Embedder(str(folder), device="cpu")
    assert rr.task == "embed"
    docs = [random_text(rng, n) for n in (4, 20, 9)]
    q = emb.embed(["the query"], is_query=True)[0]
    d = emb.embed(docs)
    want = d @ q
    got = {r["index"]: r["score"] for r in rr.rank("the query", docs)}
    np.testing.assert_allclose([got[i] for i in range(3)], want, atol=1e-5)
