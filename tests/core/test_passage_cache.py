"""KaLM-Reranker's passage cache: hits skip the encoder, eviction stays correct, ratios never mix,
concurrent requests agree; and the PassageCache pool itself."""
import threading

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from textgen import random_text
from engine import Reranker
from engine.core.cache import PassageCache
from kalm_tiny import KaLMReference, build_kalm


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("kalm") / "KaLM-Reranker-tiny"
    model = build_kalm(path, seed=3)
    return path, KaLMReference(model, AutoTokenizer.from_pretrained(str(path)))


def _no_encoder(monkeypatch, rr):
    def fail(*a, **k):
        raise AssertionError("the encoder ran on a warm request")

    monkeypatch.setattr(rr.engine.model, "encode", fail)


@pytest.mark.parametrize("cache_kv", [False, True], ids=["states", "cross-kv"])
def test_second_request_hits_and_skips_encoder(folder, rng, monkeypatch, cache_kv):
    path, ref = folder
    rr = Reranker(str(path), device="cpu", cache_cross_kv=cache_kv)
    docs = [random_text(rng, n) for n in (3, 17, 40, 9)] + ["the capital"]
    cold = {}
    first = rr.rank("the river", docs, stats=cold)
    assert cold["passages_encoded"] == 5 and cold["passage_cache_hits"] == 0
    np.testing.assert_allclose(sorted(r["score"] for r in first),
                               sorted(ref.scores([("the river", d) for d in docs])), atol=1e-4)
    _no_encoder(monkeypatch, rr)
    warm = {}
    second = rr.rank("the river", docs, stats=warm)
    assert warm["passages_encoded"] == 0 and warm["encoder_tokens"] == 0 and warm["passage_cache_hits"] == 5
    assert second == first  # identical scores and order
    # A new query over the same passages: decoder work only.
    other = rr.predict([("a different query", d) for d in docs])
    np.testing.assert_allclose(other, ref.scores([("a different query", d) for d in docs]), atol=1e-4)
    s = rr.cache_stats()
    assert s["passage_cache_entries"] == 5 and s["passage_cache_misses"] == 5 and s["passage_cache_hits"] == 10


def test_index_pre_encodes(folder, rng, monkeypatch):
    path, _ = folder
    rr = Reranker(str(path), device="cpu")
    docs = [random_text(rng, n) for n in (5, 25, 50)]
    assert rr.index(docs + docs[:1], compression_ratio=8) == {"passages": 3, "encoded": 3, "already_cached": 0}
    assert rr.index(docs, compression_ratio=8)["already_cached"] == 3
    want = Reranker(str(path), device="cpu").predict([("q", d) for d in docs], compression_ratio=8)
    _no_encoder(monkeypatch, rr)
    np.testing.assert_allclose(rr.predict([("q", d) for d in docs], compression_ratio=8), want, atol=1e-6)


def test_ratios_never_share_entries(folder, rng):
    path, ref = folder
    rr = Reranker(str(path), device="cpu")
    docs = [random_text(rng, n) for n in (6, 30)]
    pairs = [("query", d) for d in docs]
    for i, r in enumerate((4, 8, 1, 4)):
        st = {}
        got = rr.predict(pairs, compression_ratio=r, stats=st)
        warm = i == 3  # only the repeat of r = 4 may find its entries
        assert (st["passage_cache_hits"], st["passages_encoded"]) == ((2, 0) if warm else (0, 2))
        np.testing.assert_allclose(got, ref.scores(pairs, r), atol=1e-4)
    assert rr.cache_stats()["passage_cache_entries"] == 6  # 2 passages x 3 ratios


def test_eviction_under_small_budget_keeps_results_correct(folder, rng):
    path, ref = folder
    # max_length 64 caps passages at 64 tokens, so the pool's floor is 4 blocks of 16 rows:
    # 8 passages of 1-3 blocks each (r = 1) cannot all stay.
    rr = Reranker(str(path), device="cpu", max_length=64, passage_cache_bytes=1)
    assert rr.engine.passage_cache.num_blocks == 4
    docs = [random_text(rng, n) for n in (12, 30, 8, 25, 16, 29, 10, 20)]
    pairs = [("the king", d) for d in docs]
    want = ref.scores(pairs, 1)
    for _ in range(2):
        np.testing.assert_allclose(rr.predict(pairs, compression_ratio=1), want, atol=1e-4)
    s = rr.cache_stats()
    assert s["passage_cache_evictions"] > 0 and s["passage_cache_bytes"] <= s["passage_cache_capacity_bytes"]


def test_concurrent_requests_over_overlapping_passages(folder, rng):
    path, _ = folder
    rr = Reranker(str(path), device="cpu", max_batch_tokens=256)
    docs = [random_text(rng, n) for n in (4, 11, 27, 35, 8, 19)]
    jobs = [(f"query {w}", docs[i : i + 4], r) for i, w in enumerate(("river", "city", "music")) for r in (4, 8)]
    alone = Reranker(str(path), device="cpu")
    want = [alone.predict([(q, d) for d in ds], compression_ratio=r) for q, ds, r in jobs]
    got, errors = [None] * len(jobs), []

    def work(i):
        try:
            for _ in range(2):  # the second pass races warm lookups against cold inserts
                q, ds, r = jobs[i]
                got[i] = rr.predict([(q, d) for d in ds], compression_ratio=r)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-6)
    assert rr.cache_stats()["passage_cache_entries"] == 2 * len(docs)


def test_pool_blocks_lru_and_pins():
    cache = PassageCache(max_bytes=6 * 4 * 8 * 4, block_size=4, block_shape=(4, 8), dtype=torch.float32, device="cpu")
    assert cache.num_blocks == 6
    key = [PassageCache.passage_key("m", 4, [i, i + 1]) for i in range(4)]
    assert PassageCache.passage_key("m", 8, [0, 1]) != key[0] != PassageCache.passage_key("n", 4, [0, 1])
    a = cache.put(key[0], 9)  # 3 blocks, pinned
    b = cache.put(key[1], 8)  # 2 blocks, pinned
    assert len(a.blocks) == 3 and len(b.blocks) == 2 and not set(a.blocks) & set(b.blocks)
    assert cache.put(key[2], 5) is None  # 2 blocks: only 1 free and everything else pinned
    cache.release([a, b])
    assert cache.get(key[0]) is a  # a is now the most recent (and pinned again)
    c = cache.put(key[2], 5)  # evicts b (least recent, unpinned), not pinned a
    assert cache.get(key[1]) is None and cache.evictions == 1 and set(c.blocks) & set(b.blocks)
    cache.pool[c.blocks[0]] = 1.0  # the caller writes its rows
    assert cache.pool.shape == (6, 4, 8) and torch.isfinite(cache.pool).all()
    cache.release([a, c])
    s = cache.stats()
    assert (s["passage_cache_entries"], s["passage_cache_hits"], s["passage_cache_misses"]) == (2, 1, 1)
    assert s["passage_cache_bytes"] == 5 * cache.block_bytes
