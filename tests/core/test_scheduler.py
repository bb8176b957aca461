"""Scheduler: exact prefix sharing, token accounting, batch invariance, bounded memory, concurrency."""
import random
import threading

import numpy as np
import pytest

from textgen import random_text
from engine import Reranker
from reference_qwen3 import Qwen3RerankerReference

TRICKY_DOCS = [
    "", "a", "x", " ", "  leading spaces", "\nnewline first", "\n\nblank lines\n", "\tTab", "!bang", "...dots",
    "?", ":colon", "'s contraction", "123 numbers first", "北京是中国的首都。", "東京 is in Japan", "🙂 emoji first",
    "👍🏽", "é café", "\u0301combining accent first", "<|im_end|> special text", "word " * 40,
]


@pytest.fixture(scope="module")
def folder(make_qwen3):
    return make_qwen3()


@pytest.fixture(scope="module")
def shared(folder):
    return Reranker(str(folder), device="cpu")


@pytest.fixture(scope="module")
def unshared(folder):
    return Reranker(str(folder), device="cpu", share_prefix=False)


@pytest.mark.parametrize("query", ["q", "what is the capital of china?", "long " * 200, "  spaced query\n", "北京"])
def test_prefix_split_tokenizes_exactly(shared, query):
    tpl = shared.engine.template
    head = tpl.encode_head(query)
    tails = tpl.encode_tails(head, TRICKY_DOCS).ids
    whole = tpl.encode([query] * len(TRICKY_DOCS), TRICKY_DOCS).ids
    for doc, t, w in zip(TRICKY_DOCS, tails, whole):
        assert head + t == w, repr(doc)


def test_prefix_split_exact_under_truncation(folder):
    rr = Reranker(str(folder), device="cpu", max_length=150)
    tpl = rr.engine.template
    docs = ["word " * 300, "short", "北京" * 200]
    head = tpl.encode_head("a query")
    assert head + tpl.encode_tails(head, docs).ids[0] == tpl.encode(["a query"], docs[:1]).ids[0]
    for d, t, w in zip(docs, tpl.encode_tails(head, docs).ids, tpl.encode(["a query"] * 3, docs).ids):
        assert head + t == w and len(w) <= 150
    # A query that fills the budget cannot be shared: the template says so and the engine falls back.
    assert tpl.encode_head("long " * 400) is None


@pytest.mark.parametrize("query", ["short query", "long " * 150])
def test_shared_prefix_equals_full_pairs_and_reference(folder, shared, unshared, query):
    ref = Qwen3RerankerReference(folder)
    pairs = [(query, d) for d in TRICKY_DOCS]
    a = shared.predict(pairs)
    b = unshared.predict(pairs)
    want = ref.scores(pairs)
    assert np.std(want) > 0.01
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    np.testing.assert_allclose(a, want, atol=1e-4, rtol=0)


def test_token_accounting(shared, unshared):
    tpl = shared.engine.template
    # A shared prefix (template + instruction + query) of exactly 300 tokens.
    query = "word"
    while len(tpl.encode_head(query)) < 300:
        query += " word"
    assert len(tpl.encode_head(query)) == 300
    docs = []
    while len(docs) < 50:
        d = "alpha " * 19 + "beta"
        docs.append(d)
    assert all(len(t) - len(tpl.suffix_ids) == 20 for t in tpl.encode_tails(tpl.encode_head(query), docs).ids)
    shared.engine.prefix_cache.__init__(shared.engine.prefix_cache.max_bytes)  # cold cache
    stats = {}
    shared.rank(query, docs, stats=stats)
    assert stats["tokens_computed"] <= 300 + 50 * 30, stats
    assert stats["tokens_saved"] == 49 * 300, stats
    full = {}
    unshared.rank(query, docs, stats=full)
    assert full["tokens_computed"] == 50 * (300 + 20 + 9)
    assert full["tokens_saved"] == 0
    # The same query again: its prefix comes from the cache, nothing of it is recomputed.
    again = {}
    hits = shared.engine.prefix_cache.hits
    shared.rank(query, docs, stats=again)
    assert shared.engine.prefix_cache.hits == hits + 1
    assert again["tokens_computed"] == 50 * 29 and again["tokens_saved"] == 50 * 300


def test_batch_invariance(folder):
    rr = Reranker(str(folder), device="cpu", max_batch_tokens=2048)
    rng = random.Random(7)
    queries = [random_text(rng, rng.randint(1, 30)) for _ in range(5)]
    pairs = [(rng.choice(queries), random_text(rng, rng.randint(0, 120))) for _ in range(100)]
    rng.shuffle(pairs)
    together = rr.predict(pairs)
    alone = [rr.predict([p])[0] for p in pairs]
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)
    rev = rr.predict(pairs[::-1])[::-1]
    np.testing.assert_allclose(together, rev, atol=1e-5, rtol=0)


def test_bounded_memory_on_a_huge_request(folder):
    budget = 4096
    rr = Reranker(str(folder), device="cpu", max_batch_tokens=budget)
    rng = random.Random(3)
    docs = [random_text(rng, rng.randint(1, 4)) for _ in range(20000)]
    chunks = []
    tpl = rr.engine.template
    real = tpl.encode_tails

    def spy(head, d):
        chunks.append(len(d))
        return real(head, d)

    tpl.encode_tails = spy
    try:
        stats = {}
        out = rr.rank("a query", docs, top_n=5, stats=stats)
    finally:
        tpl.encode_tails = real
    assert len(out) == 5
    sched = rr.engine.scheduler
    assert 0 < sched.peak_batch_tokens <= budget
    assert max(chunks) <= 1024 and sum(chunks) == 20000  # tokenized lazily, chunk by chunk
    assert stats["batches"] >= 20000 * 10 // budget


def test_concurrent_requests_get_their_own_results(shared):
    rng = random.Random(11)
    jobs = [(random_text(rng, rng.randint(1, 20)), [random_text(rng, rng.randint(0, 60)) for _ in range(rng.randint(1, 12))])
            for _ in range(8)]
    want = [shared.rank(q, d) for q, d in jobs]
    got = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def work(i):
        start.wait()
        got[i] = shared.rank(*jobs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want):
        assert [r["index"] for r in g] == [r["index"] for r in w]
        np.testing.assert_allclose([r["score"] for r in g], [r["score"] for r in w], atol=1e-5)


def test_cancel_and_errors_do_not_stop_the_engine(shared):
    ev = threading.Event()
    ev.set()
    from engine.core.request import Cancelled

    with pytest.raises(Cancelled):
        shared.rank("q", ["a", "b"], cancel=ev)
    assert len(shared.rank("q", ["a", "b"])) == 2  # the engine keeps serving


def test_a_failing_request_does_not_fail_its_neighbours(shared):
    from engine.core.steps.score import ScoreRequest
    from engine.sequence import Seqs

    eng = shared.engine

    def bad(s, e):
        raise ValueError("tokenizer exploded")

    good_enc = eng.template.encode(["q"] * 3, ["a", "b", "c"])
    r_bad = eng.submit(ScoreRequest(3, bad))
    r_good = eng.submit(ScoreRequest(3, lambda s, e: Seqs.of(good_enc.ids[s:e])))
    with pytest.raises(ValueError, match="exploded"):
        r_bad.wait()
    assert r_good.wait().shape == (3,)


def test_priority_orders_waiting_requests(shared):
    """A later, higher-priority request is packed before earlier waiting ones."""
    from engine.core.request import Request
    from engine.core.steps.score import ScoreKind, ScoreRequest
    from engine.sequence import Seqs

    tpl = shared.engine.template
    enc = tpl.encode(["q"], ["doc"])
    reqs = [ScoreRequest(1, lambda s, e: Seqs.of(enc.ids[s:e]), priority=p) for p in (0, 0, 5)]
    sched = shared.engine.scheduler
    sched.max_batch_tokens, budget = len(enc.ids[0]), sched.max_batch_tokens  # room for one sequence
    try:
        step = ScoreKind().schedule(sched, sorted(reqs, key=Request.sort_key))
    finally:
        sched.max_batch_tokens = budget
    assert [r for r, _ in step.items] == [reqs[2]]
    got = shared.rank("q", ["a", "b"], priority=3)
    assert len(got) == 2
