"""Evidence generation: greedy decoding equals transformers generate, threshold selection, tag parsing."""
import numpy as np
import pytest
import torch

from textgen import random_text
from engine import Reranker
from engine.core.evidence import Generator, parse_evidence
from tiny_qwen3_5 import make_qwen3_5

QUERY = "what is the capital of china?"


@pytest.fixture(scope="module")
def prism35(tmp_path_factory):
    from transformers import Qwen3_5ForCausalLM

    folder = make_qwen3_5(tmp_path_factory.mktemp("evidence"), seed=1)
    return Reranker(str(folder), device="cpu"), Qwen3_5ForCausalLM.from_pretrained(str(folder)).eval()


@pytest.fixture(scope="module")
def prism3(make_qwen3):
    from transformers import Qwen3ForCausalLM

    folder = make_qwen3(name="Prism-Qwen3-Reranker-tiny")
    return Reranker(str(folder), device="cpu", share_prefix=False), Qwen3ForCausalLM.from_pretrained(str(folder)).eval()


def reference_greedy(model, prompts, max_new_tokens, eos):
    """transformers generate(do_sample=False), one unpadded prompt at a time."""
    out = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
                               eos_token_id=eos, pad_token_id=eos[0])
            out.append(y[0, x.shape[1]:].tolist())
    return out


def prompts_of(rr, docs):
    """(head or None, tails, whole prompts) as the Reranker decodes them."""
    tpl = rr.engine.template
    head = tpl.encode_head(QUERY) if rr.share_prefix else None
    tails = tpl.encode_tails(head, docs).ids if head else tpl.encode([QUERY] * len(docs), docs).ids
    return head, tails, [(head or []) + t for t in tails]


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3"])
def test_greedy_equals_transformers_generate(family, prism35, prism3, rng):
    rr, hf = prism35 if family == "qwen3_5" else prism3
    docs = ["Beijing is the capital of China.", "a", random_text(rng, 40), random_text(rng, 9)]
    head, tails, prompts = prompts_of(rr, docs)
    gen = Generator(rr.engine)
    got = gen.generate(tails, head, max_new_tokens=10)  # all documents in one batch
    want = reference_greedy(hf, prompts, 10, gen.stop_ids)
    assert got == want


def test_stops_at_the_stop_token(prism35, rng):
    rr, hf = prism35
    docs = [random_text(rng, n) for n in (3, 30, 12)]
    head, tails, prompts = prompts_of(rr, docs)
    gen = Generator(rr.engine)
    free = gen.generate(tails, head, max_new_tokens=8)
    stop = [free[0][3]]  # make doc 0's 4th token a stop token: doc 0 ends there, the others go on
    got = gen.generate(tails, head, max_new_tokens=8, stop_ids=stop)
    assert got[0] == free[0][: free[0].index(stop[0]) + 1]
    assert got == reference_greedy(hf, prompts, 8, stop)


def test_decoding_through_triton_kernels(prism35, monkeypatch):
    """One-token DeltaNet steps in the Triton kernels (interpreter): 16-token chunks, per-sequence states."""
    rr, _ = prism35
    tpl, gen = rr.engine.template, Generator(rr.engine)
    head = tpl.encode_head(QUERY, "Judge.")  # a short prefix keeps the interpreter quick
    tails = tpl.encode_tails(head, ["Beijing is the capital.", "a b c"]).ids
    want = gen.generate(tails, head, max_new_tokens=4)
    monkeypatch.setenv("ENGINE_KERNELS", "triton")
    rr.engine.prefix_cache.__init__(rr.engine.prefix_cache.max_bytes)  # the prefix through Triton too
    assert gen.generate(tails, head, max_new_tokens=4) == want


def test_rank_decodes_only_documents_above_threshold(prism35, rng, monkeypatch):
    rr, _ = prism35
    docs = [random_text(rng, n) for n in (1, 4, 9, 15, 22, 30, 41, 60)]
    scores = np.array(rr.predict([(QUERY, d) for d in docs]))
    assert np.std(scores) > 0.02, scores
    threshold = float(np.median(scores))
    decoded = []
    real = Generator.generate

    def spy(self, tails, head=None, max_new_tokens=512, stop_ids=None, **kw):
        decoded.append(len(tails))
        return real(self, tails, head, max_new_tokens, stop_ids, **kw)

    monkeypatch.setattr(Generator, "generate", spy)
    stats = {}
    out = rr.rank(QUERY, docs, return_evidence=True, evidence_threshold=threshold, max_new_tokens=4, stats=stats)
    above = int((scores >= threshold).sum())
    assert 0 < above < len(docs)
    assert decoded == [above] and stats["evidence_decoded"] == above  # one batch, only those
    for r in out:
        assert set(r) >= {"contribution", "evidence", "raw_output"}
        assert (r["raw_output"] is not None) == (r["score"] >= threshold)
    # top_n: only returned documents are decoded
    decoded.clear()
    rr.rank(QUERY, docs, top_n=2, return_evidence=True, evidence_threshold=0.0, max_new_tokens=2)
    assert decoded == [2]
    assert [r["raw_output"] for r in rr.rank(QUERY, docs, return_evidence=True, evidence_threshold=1.01)] == [None] * 8


def test_rank_returns_parsed_tags(prism35, monkeypatch):
    rr, _ = prism35
    tok = rr.engine.tokenizer
    texts = {
        "complete": "yes\n<contribution>Beijing is the capital.</contribution>\n<evidence>China's capital is Beijing.</evidence>",
        "truncated": "yes\n<contribution>Beijing is the capital.</contribution>\n<evidence>China's capit",
    }
    docs = list(texts)
    end = tok.convert_tokens_to_ids("<|im_end|>")

    def fake(self, tails, head=None, max_new_tokens=512, stop_ids=None, **kw):
        # the tail ends with the template suffix; map each back to its document by text
        return [tok.encode(texts["complete" if "complete" in tok.decode(t) else "truncated"],
                           add_special_tokens=False) + [end] for t in tails]

    monkeypatch.setattr(Generator, "generate", fake)
    out = {r["document"]: r for r in rr.rank(QUERY, docs, return_evidence=True, evidence_threshold=0.0)}
    assert out["complete"]["contribution"] == "Beijing is the capital."
    assert out["complete"]["evidence"] == "China's capital is Beijing."
    assert out["complete"]["raw_output"] == texts["complete"]  # the stop token is not part of the text
    assert out["truncated"]["contribution"] == "Beijing is the capital."
    assert out["truncated"]["evidence"] is None and out["truncated"]["raw_output"] == texts["truncated"]


def test_parse_evidence():
    assert parse_evidence("yes\n<contribution> C </contribution>\n<evidence>line 1\nline 2</evidence>") == \
        {"contribution": "C", "evidence": "line 1\nline 2"}
    assert parse_evidence("no") == {"contribution": None, "evidence": None}
    assert parse_evidence("yes\n<evidence>E</evidence>") == {"contribution": None, "evidence": "E"}
    assert parse_evidence("yes\n<contribution>C</contribution>\n<evidence>cut off") == \
        {"contribution": "C", "evidence": None}
    assert parse_evidence("yes\n<contribution>cut") == {"contribution": None, "evidence": None}


def test_return_evidence_needs_a_generative_reranker(make_qwen3):
    emb = Reranker(str(make_qwen3(name="Qwen3-Embedding-tiny", embed_tokenizer=True)), device="cpu")
    with pytest.raises(ValueError, match="return_evidence"):
        emb.rank("q", ["d"], return_evidence=True)
