"""Evidence generation: greedy decoding equals transformers generate, threshold selection, tag parsing, and
scoring + decoding from one prefill per document equal to scoring, then prefilling again to decode."""
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
def prism3_shared(make_qwen3):
    return Reranker(str(make_qwen3(name="Prism-Qwen3-Reranker-tiny")), device="cpu")


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
    """The two-prefill path (kept for comparison): scored, then the chosen documents prefilled again."""
    rr, _ = prism35
    monkeypatch.setattr(rr, "_evidence_one_prefill", False)
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
    monkeypatch.setattr(rr, "_evidence_one_prefill", False)  # the answers come from Generator.generate
    tok = rr.engine.tokenizer
    texts = {
        "complete": "yes\n<contribution>Beijing is the capital.</contribution>\n"
                    "<evidence>China's capital is Beijing.</evidence>",
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


def count_rows(rr):
    """(calls, hook handle): every forward of the model, as (token rows, decoding?)."""
    calls = []

    def hook(module, args):
        ids, ctx = args[0], args[1]
        calls.append((int(ids.numel()), ctx.cache is not None))

    return calls, rr.engine.runner.model.register_forward_pre_hook(hook)


def rank_counted(rr, docs, **kw):
    """rank(return_evidence=True) from a cold prefix cache: (results, stats, prefill rows, decode rows)."""
    rr.engine.prefix_cache.__init__(rr.engine.prefix_cache.max_bytes)
    calls, handle = count_rows(rr)
    stats = {}
    try:
        out = rr.rank(QUERY, docs, return_evidence=True, max_new_tokens=4, stats=stats, **kw)
    finally:
        handle.remove()
    return out, stats, sum(n for n, dec in calls if not dec), sum(n for n, dec in calls if dec)


def answers_of(out):
    return [(r["index"], r["raw_output"], r["contribution"], r["evidence"]) for r in out]


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3", "qwen3_shared"])
def test_evidence_from_one_prefill_equals_two_prefills(family, prism35, prism3, prism3_shared, rng, monkeypatch):
    """Each document's tokens go through the model once (a hook counts the rows); scores and answers are
    those of scoring, then prefilling the chosen documents again; stats count every row computed."""
    rr = {"qwen3_5": prism35[0], "qwen3": prism3[0], "qwen3_shared": prism3_shared}[family]
    docs = [random_text(rng, n) for n in (3, 9, 17, 30, 44, 60)]
    threshold = float(np.median(rr.predict([(QUERY, d) for d in docs])))
    head, tails, _ = prompts_of(rr, docs)
    assert (head is not None) == (family != "qwen3")
    once = len(head or []) + sum(len(t) for t in tails)  # the prefix once and every document's tail

    new, stats, prefill_rows, decode_rows = rank_counted(rr, docs, evidence_threshold=threshold)
    decoded = [r["index"] for r in new if r["raw_output"] is not None]
    assert 0 < len(decoded) < len(docs) and decoded == [r["index"] for r in new if r["score"] >= threshold]
    assert prefill_rows == once
    # the first token of each answer comes from the prefill, every later one from a decode row
    assert decode_rows == stats["evidence_tokens"] - stats["evidence_decoded"] > 0
    assert stats["tokens_computed"] == prefill_rows + decode_rows

    monkeypatch.setattr(rr, "_evidence_one_prefill", False)
    old, old_stats, old_prefill, old_decode = rank_counted(rr, docs, evidence_threshold=threshold)
    assert old_prefill == once + sum(len(tails[i]) for i in decoded)  # the chosen documents twice
    assert old_stats["tokens_computed"] == old_prefill + old_decode > stats["tokens_computed"]
    assert answers_of(new) == answers_of(old)
    assert [r["score"] for r in new] == [r["score"] for r in old]  # the same forward per document


def test_one_prefill_follows_top_n_min_score_and_raw_scores(prism3_shared, rng, monkeypatch):
    """Only what the ranking returns above the threshold is reported decoded; rows that later scores push
    out of the top n stop decoding; with raw_scores the threshold applies to the logits."""
    rr = prism3_shared
    docs = [random_text(rng, n) for n in (2, 5, 8, 13, 21, 34, 40, 11)]
    scores = np.array(rr.predict([(QUERY, d) for d in docs]))
    cases = [dict(evidence_threshold=0.0, top_n=2), dict(evidence_threshold=0.0, min_score=float(np.median(scores))),
             dict(evidence_threshold=0.0, top_n=3, raw_scores=True),
             dict(evidence_threshold=float(np.log(np.median(scores) / (1 - np.median(scores)))), raw_scores=True)]
    got = [rank_counted(rr, docs, **kw) for kw in cases]
    monkeypatch.setattr(rr, "_evidence_one_prefill", False)
    want = [rank_counted(rr, docs, **kw)[0] for kw in cases]
    for kw, (new, stats, _, _), old in zip(cases, got, want):
        assert answers_of(new) == answers_of(old), kw
        assert [r["score"] for r in new] == [r["score"] for r in old], kw
        threshold = kw["evidence_threshold"]
        assert stats["evidence_decoded"] == sum(r["score"] >= threshold for r in new) > 0, kw
        assert all((r["raw_output"] is not None) == (r["score"] >= threshold) for r in new), kw
    assert got[0][1]["evidence_decoded"] == 2 and len(got[0][0]) == 2
    # nothing above the threshold: every row is dropped after its prefill, nothing is decoded
    none, stats, _, decode_rows = rank_counted(rr, docs, evidence_threshold=1.01)
    assert [r["raw_output"] for r in none] == [None] * len(docs) and decode_rows == 0 == stats["evidence_decoded"]


def test_one_prefill_rows_pushed_out_of_top_n_stop_decoding(prism3_shared, rng, monkeypatch):
    """Prefills of a few documents each: rows start decoding before every score is known, and leave the
    batch once top_n others score above them; the answers are still those of the two-prefill path."""
    rr = prism3_shared
    docs = [random_text(rng, n) for n in (30, 28, 26, 24, 22, 20, 18, 16, 14, 12)]  # longest first
    monkeypatch.setattr(rr.engine.scheduler, "max_batch_tokens", 60)  # about two documents per prefill
    new, stats, prefill_rows, _ = rank_counted(rr, docs, evidence_threshold=0.0, top_n=2)
    assert stats["batches"] > 3 and stats["decoded"] > stats["evidence_decoded"] == 2, stats
    monkeypatch.setattr(rr, "_evidence_one_prefill", False)
    old = rank_counted(rr, docs, evidence_threshold=0.0, top_n=2)[0]
    assert answers_of(new) == answers_of(old) and [r["score"] for r in new] == [r["score"] for r in old]


def test_one_prefill_threshold_applies_to_calibrated_scores(prism3_shared, rng, monkeypatch):
    from engine.core.calibration import Calibration, model_identity

    rr = prism3_shared
    docs = [random_text(rng, n) for n in (3, 7, 19, 26, 33)]
    cal = Calibration("platt", {"a": 2.0, "b": -1.0}, model_identity(rr.engine.folder))
    monkeypatch.setattr(rr, "calibration", cal)
    logits = np.array(rr.predict([(QUERY, d) for d in docs], raw_scores=True))
    threshold = float(np.median(cal(logits)))
    new, stats, _, _ = rank_counted(rr, docs, evidence_threshold=threshold, top_n=4)
    monkeypatch.setattr(rr, "_evidence_one_prefill", False)
    old = rank_counted(rr, docs, evidence_threshold=threshold, top_n=4)[0]
    assert answers_of(new) == answers_of(old) and [r["score"] for r in new] == [r["score"] for r in old]
    np.testing.assert_allclose(sorted(r["score"] for r in new), sorted(cal(logits))[1:], rtol=0, atol=1e-6)
    assert stats["evidence_decoded"] == sum(r["score"] >= threshold for r in new) > 0


def test_one_prefill_admission_waits_for_the_decode_cache(prism35, rng, monkeypatch):
    """A decode cache that holds one row: documents are admitted one at a time, the answers unchanged."""
    rr, _ = prism35
    docs = [random_text(rng, n) for n in (4, 12, 25)]
    want, _, _, _ = rank_counted(rr, docs, evidence_threshold=0.0)
    gen = next(k.gen for k in rr.engine.scheduler.kinds if k.name == "prefill")
    monkeypatch.setattr(gen, "decode_bytes", 1)  # one row always fits an empty cache, two never do
    monkeypatch.setitem(rr.engine.scheduler.totals, "peak_decode_rows", 0)
    got, stats, prefill_rows, _ = rank_counted(rr, docs, evidence_threshold=0.0)
    assert rr.engine.scheduler.totals["peak_decode_rows"] == 1
    assert answers_of(got) == answers_of(want) and [r["score"] for r in got] == [r["score"] for r in want]
    head, tails, _ = prompts_of(rr, docs)
    assert prefill_rows == len(head) + sum(len(t) for t in tails)


@pytest.mark.parametrize("how", ["max", "mean", "first"])
def test_chunked_evidence_decodes_the_deciding_chunk_from_its_prefill(how, prism3_shared, rng, monkeypatch):
    """With chunking, a returned document's answer is decoded from its deciding chunk (``chunk``), the
    text its score came from, out of that chunk's scoring prefill; every chunk goes through once."""
    rr = prism3_shared
    docs = [random_text(rng, 50) + " Beijing is the capital of China. " + random_text(rng, 20), random_text(rng, 6),
            random_text(rng, 70), random_text(rng, 30)]
    chunking = {"tokens": 24, "overlap": 4, "aggregate": how, "return_chunks": True}
    plain = rr.rank(QUERY, docs, chunking=chunking)
    threshold = float(np.median([r["score"] for r in plain]))
    tpl = rr.engine.template
    head = tpl.encode_head(QUERY)
    texts = [docs[r["index"]][c["start"]:c["end"]]
             for r in sorted(plain, key=lambda r: r["index"]) for c in r["chunks"]]
    assert len(texts) > 2 * len(docs)
    once = len(head) + sum(len(t) for t in tpl.encode_tails(head, texts).ids)
    cases = [dict(evidence_threshold=threshold), dict(evidence_threshold=0.0, top_n=2)]
    got = [rank_counted(rr, docs, chunking=chunking, **kw) for kw in cases]
    monkeypatch.setattr(rr, "_evidence_one_prefill", False)
    want = [rank_counted(rr, docs, chunking=chunking, **kw)[0] for kw in cases]
    gen = Generator(rr.engine)
    for kw, (new, stats, prefill_rows, _), old in zip(cases, got, want):
        assert prefill_rows == once, kw
        assert [(r["index"], r["score"], r["chunk"]) for r in new] == \
            [(r["index"], r["score"], r["chunk"]) for r in old], kw
        assert answers_of(new) == answers_of(old), kw
        chosen = [r for r in new if r["score"] >= kw["evidence_threshold"]]
        assert 0 < len(chosen) == stats["evidence_decoded"] and all(r["raw_output"] is not None for r in chosen)
        direct = gen.evidence(tpl, QUERY, [docs[r["index"]][r["chunk"]["start"]:r["chunk"]["end"]] for r in chosen],
                              max_new_tokens=4)
        assert [r["raw_output"] for r in chosen] == [a["raw_output"] for a in direct], kw


def test_concurrent_one_prefill_requests_share_the_decode_batch(prism3_shared, rng):
    """Evidence requests of several callers decode in one batch; each answer is what it is alone."""
    import threading

    rr = prism3_shared
    jobs = [(f"question {i}: " + random_text(rng, 4), [random_text(rng, rng.randint(2, 30)) for _ in range(3)])
            for i in range(6)]

    def call(q, docs):
        return answers_of(rr.rank(q, docs, return_evidence=True, evidence_threshold=0.0, max_new_tokens=12))

    alone = [call(*job) for job in jobs]
    totals = rr.engine.scheduler.totals
    before = dict(totals)
    got = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def work(i):
        start.wait()
        got[i] = call(*jobs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == alone
    assert totals["peak_decode_requests"] > 1  # rows of several requests in one decode step
    assert (totals["decode_rows"] - before["decode_rows"]) / (totals["decode_steps"] - before["decode_steps"]) > 3


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
