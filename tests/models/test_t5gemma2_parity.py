"""KaLM-Reranker (T5Gemma2) parity with transformers' encoder -> pooling -> decoder path (fp32, CPU)."""
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from textgen import random_text
from engine import Reranker
from kalm_tiny import KaLMReference, build_kalm

ATOL = 1e-4
# Two shapes: GQA 2 with an odd window (encoder sees 4 left / 3 right), and GQA 4 with an even one.
SHAPES = {
    "w7-gqa2": dict(sliding_window=7, layers=3, heads=4, kv_heads=2),
    "w6-gqa4": dict(sliding_window=6, layers=4, heads=4, kv_heads=1, query_pre_attn_scalar=16, seed=1),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def kalm(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("kalm") / f"KaLM-Reranker-tiny-{request.param}"
    model = build_kalm(folder, **SHAPES[request.param])
    ref = KaLMReference(model, AutoTokenizer.from_pretrained(str(folder)))
    return Reranker(str(folder), device="cpu"), ref


def ragged_docs(rng):
    # Lengths (in encoder tokens, "<Document>: " adds 4) below, at and past every ratio, not
    # multiples of them, longer than the windows; one with the end-of-image token.
    return ["", "a", random_text(rng, 3), random_text(rng, 14), random_text(rng, 29),
            random_text(rng, 60), "gravity attracts <end_of_image> bodies toward one another"]


def assert_spread(scores):
    # A degenerate model whose scores all sit together would prove nothing.
    assert np.std(scores) > 0.02, scores


@pytest.mark.parametrize("ratio", [1, 4, 32])
def test_scores_match_transformers(kalm, rng, ratio):
    ours, ref = kalm
    docs = ragged_docs(rng)
    pairs = [("what is the capital of china?", d) for d in docs] + [("gravity", d) for d in docs[2:5]]
    want = ref.scores(pairs, ratio)
    assert_spread(want)
    got = ours.predict(pairs, compression_ratio=ratio)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_default_ratio_is_4_and_rank_sorts(kalm, rng):
    ours, ref = kalm
    docs = [random_text(rng, n) for n in (5, 40, 12, 23)]
    ranked = ours.rank("the river city", docs)
    want = ref.scores([("the river city", d) for d in docs], 4)
    assert [r["index"] for r in ranked] == list(np.argsort(-np.array(want), kind="stable"))
    np.testing.assert_allclose([r["score"] for r in ranked], sorted(want, reverse=True), atol=ATOL)
    assert [r["document"] for r in ranked] == [docs[r["index"]] for r in ranked]


def test_custom_instruction_matches_and_matters(kalm, rng):
    ours, ref = kalm
    pairs = [(random_text(rng, 6), random_text(rng, n)) for n in (2, 20, 45)]
    instr = "Given a piece of text, retrieve relevant label descriptions that best match the text"
    got = ours.predict(pairs, instruction=instr)
    np.testing.assert_allclose(got, ref.scores(pairs, 4, instruction=instr), atol=ATOL, rtol=0)
    assert np.max(np.abs(np.array(got) - np.array(ours.predict(pairs)))) > 1e-4


def test_truncation_of_query_and_document(kalm, rng):
    ours, ref = kalm
    tpl = ours.engine.template
    long_doc = random_text(rng, 1100)  # a token per word: cut at 1024
    assert len(tpl.encode_documents([long_doc])[0]) == 1024
    long_query = random_text(rng, 600)  # the query alone is cut to 512 tokens first
    short = tpl.tokenizer.decode(tpl.tokenizer(long_query, add_special_tokens=False)["input_ids"][:512])
    assert tpl.encode_query(long_query) == tpl.encode_query(short)
    pairs = [(long_query, long_doc), ("a query", long_doc)]
    np.testing.assert_allclose(ours.predict(pairs), ref.scores([(short, long_doc), ("a query", long_doc)]),
                               atol=ATOL, rtol=0)


def test_batched_equals_single(kalm, rng):
    ours, _ = kalm
    pairs = [(random_text(rng, 3), random_text(rng, rng.randint(1, 40))) for _ in range(9)]
    small = Reranker(str(ours.engine.folder), device="cpu", max_batch_tokens=150)  # about two prompts per batch
    together = small.predict(pairs)
    assert small.stats["batches"] > 4
    alone = [ours.predict([p])[0] for p in pairs]
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)


def test_checkpoint_loads_text_only(kalm):
    ours, _ = kalm
    from engine.weights import checkpoint_index

    names = set(checkpoint_index(ours.engine.folder))
    vision = {n for n in names if ".vision_tower." in n or ".multi_modal_projector." in n}
    assert vision and not vision & ours.engine.runner.loaded  # present in the file, skipped without error
    assert "model.encoder.embed_tokens.eoi_embedding" in ours.engine.runner.loaded
    assert ours.engine.model.decoder.embed_tokens is ours.engine.model.encoder.embed_tokens  # tied


def test_bad_ratio_and_wrong_model_errors(kalm):
    ours, _ = kalm
    for bad in (3, 0, 64, 4.0, True):
        with pytest.raises(ValueError, match="compression_ratio"):
            ours.predict([("q", "d")], compression_ratio=bad)


def test_bf16_close_to_fp32(kalm, rng):
    # Low precision runs the same path (fp32 head and pooling); scores stay near fp32's.
    ours, _ = kalm
    pairs = [("the capital", random_text(rng, n)) for n in (3, 30)]
    low = Reranker(str(ours.engine.folder), device="cpu", dtype="bfloat16")
    np.testing.assert_allclose(low.predict(pairs), ours.predict(pairs), atol=0.05)
    assert torch.tensor(low.predict(pairs)).dtype == torch.float32


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="runs Triton kernels on CPU tensors, which needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("cache_kv", [False, True], ids=["states", "cross-kv"])
def test_parity_through_triton_kernels(tmp_path, monkeypatch, cache_kv):
    # The GPU path (paged attention, q/k norm + RoPE, norms, yes/no head in Triton), in the interpreter.
    model = build_kalm(tmp_path / "KaLM-Reranker-tiny", layers=2, sliding_window=5, kv_heads=1, seed=2)
    ref = KaLMReference(model, AutoTokenizer.from_pretrained(str(tmp_path / "KaLM-Reranker-tiny")))
    monkeypatch.setenv("ENGINE_KERNELS", "triton")
    ours = Reranker(str(tmp_path / "KaLM-Reranker-tiny"), device="cpu", cache_cross_kv=cache_kv)
    pairs = [("the capital of china", "beijing is the capital city of china"), ("gravity", "a")]
    for _ in range(2):  # cold, then warm
        np.testing.assert_allclose(ours.predict(pairs), ref.scores(pairs, 4), atol=ATOL, rtol=0)


def test_raw_scores_are_margins(kalm, rng):
    ours, ref = kalm
    pairs = [("the capital", random_text(rng, n)) for n in (4, 33)]
    got = ours.predict(pairs, raw_scores=True, compression_ratio=8)
    np.testing.assert_allclose(got, ref.margins(pairs, 8).numpy(), atol=1e-4, rtol=0)


@pytest.mark.skipif(not __import__("os").environ.get("KALM_NANO_PATH"),
                    reason="set KALM_NANO_PATH to a local KaLM-Reranker-V1-Nano folder")
def test_published_nano_margins():
    # The model card: bf16, r = 4 gives margins [8.78125, -14.1875]; fp32 on CPU lands near them.
    ours = Reranker(__import__("os").environ["KALM_NANO_PATH"], device="cpu")
    docs = ["The capital of China is Beijing.", "Gravity attracts bodies toward one another."]
    got = ours.predict([("What is the capital of China?", d) for d in docs], raw_scores=True)
    np.testing.assert_allclose(got, [8.78125, -14.1875], atol=0.25)
