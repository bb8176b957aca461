"""KaLM-Reranker's on-disk passage store: parity with the reference, cold and warm; a fresh process
ranking a whole corpus by id with no encoder work; SIGKILL mid-job and resume; torn entries never
served; refusals of another model, ratio or layout; readers beside readers and beside a writer."""
import json
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from textgen import random_text
from engine import EngineConfig, Reranker
from engine.core.store import PassageStore, StoreError
from engine.core.stored_docs import UnknownDocument
from engine.scaleout.index_job import CRASH_ENV, run_index
from kalm_tiny import KaLMReference, build_kalm

ROOT = Path(__file__).resolve().parents[2]
QUERY = "the capital of china"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("kalm-store") / "KaLM-Reranker-tiny"
    model = build_kalm(path, seed=3)
    return path, KaLMReference(model, AutoTokenizer.from_pretrained(str(path)))


def corpus(path: Path, n: int, seed: int = 0, start: int = 0) -> dict:
    import random

    rng = random.Random(seed)
    docs = {f"doc-{i}": random_text(rng, rng.randint(3, 40)) for i in range(start, start + n)}
    with open(path, "w") as f:
        for k, v in docs.items():
            f.write(json.dumps({"id": k, "text": v}) + "\n")
    return docs


def index(folder, src, store, ratio=4, cache_kv=False, **kw):
    config = EngineConfig(model=str(folder), device="cpu", cache_cross_kv=cache_kv)
    return run_index(str(src), str(store), compression_ratio=ratio, progress=False, config=config, **kw)


def by_index(results, n):
    got = {r["index"]: r["score"] for r in results}
    return [got[i] for i in range(n)]


@pytest.mark.parametrize("cache_kv", [False, True], ids=["states", "cross-kv"])
@pytest.mark.parametrize("ratio", [1, 4])
def test_store_parity_cold_and_warm(folder, tmp_path, ratio, cache_kv):
    path, ref = folder
    docs = corpus(tmp_path / "c.jsonl", 9)
    report = index(path, tmp_path / "c.jsonl", tmp_path / "s", ratio=ratio, cache_kv=cache_kv)
    assert report.encoded == 9 and report.errors == 0
    assert report.store["entries"] == 9 and report.store["layout"] == ("cross_kv" if cache_kv else "states")
    rr = Reranker(str(path), device="cpu", passage_store=str(tmp_path / "s"), cache_cross_kv=cache_kv)
    want = ref.scores([(QUERY, d) for d in docs.values()], ratio=ratio)
    cold = {}
    first = rr.rank(QUERY, [{"id": k} for k in docs], stats=cold)
    assert cold["passages_encoded"] == 0 and cold["encoder_tokens"] == 0 and cold["store_reads"] == 9
    np.testing.assert_allclose(by_index(first, 9), want, atol=1e-4)
    assert first[0]["document"] == {"id": first[0]["document"]["id"]}
    warm = {}
    second = rr.rank(QUERY, [{"id": k} for k in docs], stats=warm)  # the pool in front of the store
    assert warm["passages_encoded"] == 0 and warm["store_reads"] == 0 and warm["passage_cache_hits"] == 9
    assert second == first
    # predict by id, a mix of ids and texts, and an id with its (same) text
    mixed = [{"id": "doc-0"}, docs["doc-1"], {"id": "doc-2", "text": docs["doc-2"]}]
    np.testing.assert_allclose(rr.predict([("another query", d) for d in mixed]),
                               ref.scores([("another query", docs[f"doc-{i}"]) for i in range(3)], ratio=ratio),
                               atol=1e-4)


def test_fresh_process_ranks_every_id_with_no_encoder_work(folder, tmp_path):
    path, _ = folder
    docs = corpus(tmp_path / "c.jsonl", 600, seed=1)
    cli = subprocess.run([sys.executable, "-m", "engine.cli", "index", str(path), "--device", "cpu", "--input",
                          str(tmp_path / "c.jsonl"), "--store", str(tmp_path / "s")],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert cli.returncode == 0, cli.stderr
    assert "600 passages encoded" in cli.stderr and "600 entries" in cli.stderr
    script = (
        "import json, sys\n"
        "from engine import Reranker\n"
        f"rr = Reranker({str(path)!r}, device='cpu', passage_store={str(tmp_path / 's')!r})\n"
        "ids = json.loads(sys.argv[1])\n"
        "stats = {}\n"
        "out = rr.rank('the river', [{'id': i} for i in ids], stats=stats)\n"
        "print(json.dumps({'n': len(out), 'ids': sorted(r['document']['id'] for r in out), 'stats': stats}))\n")
    run = subprocess.run([sys.executable, "-c", script, json.dumps(list(docs))], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["n"] == 600 and out["ids"] == sorted(docs)
    assert out["stats"]["passages_encoded"] == 0 and out["stats"]["store_reads"] == 600


def test_sigkill_mid_job_then_resume(folder, tmp_path):
    path, ref = folder
    docs = corpus(tmp_path / "c.jsonl", 60, seed=2)
    store = tmp_path / "s"
    cmd = [sys.executable, "-m", "engine.cli", "index", str(path), "--device", "cpu", "--max-batch-tokens", "64",
           "--input", str(tmp_path / "c.jsonl"), "--store", str(store), "--quiet"]
    killed = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env={**os.environ, CRASH_ENV: "4"})
    assert killed.returncode == -9, killed.stderr  # SIGKILL, between a batch's bytes and its commit
    part, distinct = _count(store)
    assert 0 < part < 60 and part == distinct
    orphan = sum(p.stat().st_size for p in store.glob("shard-*.bin"))
    reader = PassageStore(store)
    assert orphan > reader.stats()["data_bytes"]  # the killed batch's bytes are on disk, unreferenced
    reader.close()
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"{60 - part} passages encoded" in again.stderr and f"{part} already stored" in again.stderr
    assert _count(store) == (60, 60)  # every id once
    reader = PassageStore(store)
    assert reader.verify() == []  # every checksum holds
    reader.close()
    rr = Reranker(str(path), device="cpu", passage_store=str(store))
    stats = {}
    got = by_index(rr.rank(QUERY, [{"id": k} for k in docs], stats=stats), 60)
    assert stats["passages_encoded"] == 0
    np.testing.assert_allclose(got, ref.scores([(QUERY, d) for d in docs.values()]), atol=1e-4)
    # A third run has nothing to do.
    assert index(path, tmp_path / "c.jsonl", store).encoded == 0


def test_torn_entry_is_never_served(folder, tmp_path):
    path, ref = folder
    docs = corpus(tmp_path / "c.jsonl", 12, seed=3)
    store = tmp_path / "s"
    index(path, tmp_path / "c.jsonl", store)
    shard = next(store.glob("shard-*.bin"))
    os.truncate(shard, shard.stat().st_size - 10)  # the last entry loses its tail
    reader = PassageStore(store)
    torn = reader.verify()
    assert len(torn) == 1
    reader.close()
    rr = Reranker(str(path), device="cpu", passage_store=str(store))
    stats = {}
    got = by_index(rr.rank(QUERY, [{"id": k} for k in docs], stats=stats), 12)
    # Detected on read: encoded from its stored tokens instead, the damaged bytes never reach a score.
    assert stats["store_errors"] == 1 and stats["passages_encoded"] == 1 and stats["store_reads"] == 11
    np.testing.assert_allclose(got, ref.scores([(QUERY, d) for d in docs.values()]), atol=1e-4)
    # index --verify encodes it again; the id stays once.
    report = index(path, tmp_path / "c.jsonl", store, ratio=None, verify=True)
    assert report.repaired == 1 and report.encoded == 1
    reader = PassageStore(store)
    assert reader.verify() == [] and _count(store) == (12, 12)
    reader.close()


def test_bad_rows_go_to_the_errors_file(folder, tmp_path):
    path, _ = folder
    rows = [{"id": "a", "text": "the river"}, {"id": "b", "text": ""}, {"id": "c", "text": 3},
            {"id": "a", "text": "another text"}, {"id": "a", "text": "the river"}, {"text": "no id"}, "x",
            {"id": 7, "text": "an integer id"}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    report = index(path, tmp_path / "c.jsonl", tmp_path / "s")
    assert report.encoded == 2 and report.duplicates == 1 and report.errors == 6
    errors = [json.loads(x) for x in Path(report.errors_path).read_text().splitlines()]
    reasons = {(e["row"], e["id"]): e["reason"] for e in errors}
    assert reasons[(1, "b")] == "text is empty" and "string" in reasons[(2, "c")]
    assert "different text" in reasons[(3, "a")] and "id" in reasons[(5, None)]
    assert "object" in reasons[(6, None)] and "not JSON" in reasons[(8, None)]
    # Against the store: the same id with another text is refused, the stored one kept.
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "a", "text": "changed"}) + "\n")
    again = index(path, tmp_path / "d.jsonl", tmp_path / "s", ratio=None)
    assert again.encoded == 0 and again.errors == 1


def test_refusals(folder, tmp_path):
    path, _ = folder
    corpus(tmp_path / "c.jsonl", 5)
    store = str(tmp_path / "s")
    index(path, tmp_path / "c.jsonl", store, ratio=4)
    other = tmp_path / "other" / "KaLM-Reranker-tiny"
    build_kalm(other, seed=4)  # same config and shapes, other weights
    with pytest.raises(StoreError, match="another model"):
        Reranker(str(other), device="cpu", passage_store=store)
    with pytest.raises(StoreError, match="layout"):
        Reranker(str(path), device="cpu", passage_store=store, cache_cross_kv=True)
    with pytest.raises(StoreError, match="ratio 4, not 8"):
        index(path, tmp_path / "c.jsonl", store, ratio=8)
    with pytest.raises(StoreError, match="no passage store"):
        Reranker(str(path), device="cpu", passage_store=str(tmp_path / "missing"))
    rr = Reranker(str(path), device="cpu", passage_store=store)
    with pytest.raises(KeyError, match="'nope'") as e:
        rr.rank(QUERY, [{"id": "doc-0"}, {"id": "nope"}])
    assert isinstance(e.value, UnknownDocument) and "not in the passage store" in str(e.value)
    with pytest.raises(ValueError, match="ratio 4"):
        rr.rank(QUERY, [{"id": "doc-0"}], compression_ratio=8)
    assert len(rr.rank(QUERY, [{"id": "doc-0"}, {"id": "nope", "text": "given its text"}])) == 2
    # {"text"} objects and a generator of documents: as strings
    texts = ["the river", "a city"]
    plain = rr.rank(QUERY, texts)
    assert rr.rank(QUERY, ({"text": t} for t in texts), return_documents=False) == \
        [{k: v for k, v in r.items() if k != "document"} for r in plain]
    with pytest.raises(TypeError, match=r"documents\[0\]"):
        rr.rank(QUERY, [{"id": "doc-0", "url": "x"}])
    with pytest.raises(ValueError, match="passage store"):
        Reranker(str(path), device="cpu").rank(QUERY, [{"id": "doc-0"}])


def test_readers_beside_readers_and_a_writer(folder, tmp_path):
    path, ref = folder
    docs = corpus(tmp_path / "c.jsonl", 10, seed=5)
    store = tmp_path / "s"
    index(path, tmp_path / "c.jsonl", store)
    more = corpus(tmp_path / "more.jsonl", 40, seed=6, start=10)
    a = Reranker(str(path), device="cpu", passage_store=str(store))
    b = Reranker(str(path), device="cpu", passage_store=str(store))
    want = ref.scores([(QUERY, d) for d in docs.values()])
    writer = subprocess.Popen([sys.executable, "-m", "engine.cli", "index", str(path), "--device", "cpu",
                               "--max-batch-tokens", "64", "--input", str(tmp_path / "more.jsonl"), "--store",
                               str(store), "--quiet"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    seen, errors = set(), []

    def read(rr):
        try:
            while writer.poll() is None:
                stats = {}
                got = by_index(rr.rank(QUERY, [{"id": k} for k in docs], stats=stats), 10)
                np.testing.assert_allclose(got, want, atol=1e-4)
                assert stats["passages_encoded"] == 0
                refs = rr.engine.passage_store.lookup(more)  # what the writer has committed so far
                for r in refs.values():
                    r.read()  # every committed entry reads whole, checksum verified
                seen.update(refs)
                rr.engine.passage_cache.clear()  # read through again next time
        except BaseException as e:  # noqa: BLE001 - reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=read, args=(rr,)) for rr in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert writer.wait(timeout=600) == 0, writer.stderr.read()
    assert not errors, errors
    stats = {}
    got = a.rank(QUERY, [{"id": k} for k in more], stats=stats)
    assert len(got) == 40 and stats["passages_encoded"] == 0
    assert _count(store) == (50, 50)


def _count(store):
    db = sqlite3.connect(str(Path(store) / "store.sqlite"))
    try:
        return db.execute("SELECT COUNT(*), COUNT(DISTINCT id) FROM passages").fetchone()
    finally:
        db.close()
