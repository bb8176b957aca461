"""The engine loop: every model call runs on the engine thread, decode steps of concurrent requests share
batches, and raw scores are the exact logits."""
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from engine import Embedder, Reranker
from engine.core.evidence import Generator
from kalm_tiny import build_kalm
from reference_qwen3 import Qwen3RerankerReference
from textgen import random_text
from tiny_qwen3_5 import make_qwen3_5

REPO = Path(__file__).resolve().parents[2]


def record_threads(engine) -> set:
    """Thread ids of every forward of any module of the engine's model or head, from now on."""
    seen = set()

    def hook(module, args):
        seen.add(threading.get_ident())

    for m in list(engine.runner.model.modules()) + list(engine.runner.head.modules()):
        m.register_forward_pre_hook(hook)
    # KaLM's encoder half is called as model.encode, which runs the encoder stack's forward (hooked above).
    return seen


@pytest.fixture(scope="module")
def engines(make_qwen3, tmp_path_factory):
    kalm_path = tmp_path_factory.mktemp("kalm") / "KaLM-Reranker-tiny"
    build_kalm(kalm_path, seed=4)
    prism = make_qwen3_5(tmp_path_factory.mktemp("prism"), seed=2)
    return {
        "rerank": Reranker(str(make_qwen3()), device="cpu"),
        "embed": Embedder(str(make_qwen3(name="Qwen3-Embedding-tiny", embed_tokenizer=True)), device="cpu"),
        "kalm": Reranker(str(kalm_path), device="cpu"),
        "prism": Reranker(str(prism), device="cpu"),
    }


def test_every_model_call_runs_on_the_engine_thread(engines, rng):
    seen = {name: record_threads(obj.engine) for name, obj in engines.items()}
    docs = [random_text(rng, n) for n in (3, 12, 30, 7)]
    callers, errors = set(), []
    start = threading.Barrier(8)

    def work(i):
        callers.add(threading.get_ident())
        start.wait()
        try:
            q = f"query {i} " + random_text(rng, 3)
            kind = i % 4
            if kind == 0:
                assert len(engines["rerank"].rank(q, docs)) == len(docs)
            elif kind == 1:
                assert engines["embed"].embed(docs + [q]).shape[0] == len(docs) + 1
            elif kind == 2:
                engines["kalm"].index(docs[:2])
                assert len(engines["kalm"].predict([(q, d) for d in docs])) == len(docs)
            else:
                out = engines["prism"].rank(q, docs, return_evidence=True, evidence_threshold=0.0, max_new_tokens=3)
                assert all(r["raw_output"] is not None for r in out)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name, obj in engines.items():
        loop = obj.engine._thread
        assert loop is not None and loop.name == "engine"
        assert seen[name] == {loop.ident}, name  # the model ran, and only on its engine thread
        assert not seen[name] & callers


def test_concurrent_evidence_decodes_in_shared_batches(engines, rng):
    rr = engines["prism"]
    gen = Generator(rr.engine)
    tpl = rr.engine.template
    jobs = []
    for i in range(8):
        head = tpl.encode_head(f"question {i}: " + random_text(rng, 4))
        jobs.append((head, tpl.encode_tails(head, [random_text(rng, rng.randint(2, 30)) for _ in range(2)]).ids))
    alone = [gen.generate(tails, head, max_new_tokens=12, stop_ids=[]) for head, tails in jobs]
    before = dict(rr.engine.scheduler.totals)
    got = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def work(i):
        start.wait()
        got[i] = gen.generate(jobs[i][1], jobs[i][0], max_new_tokens=12, stop_ids=[])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == alone  # token for token, whatever shared the batch
    totals = rr.engine.scheduler.totals
    assert totals["peak_decode_requests"] > 1  # rows of several requests in one decode step
    steps = totals["decode_steps"] - before["decode_steps"]
    rows = totals["decode_rows"] - before["decode_rows"]
    assert rows / steps > 2  # more than one request's two rows per step on average


def test_raw_scores_are_exact_logits_at_large_magnitudes(loud_qwen3, rng):
    folder, _, _ = loud_qwen3
    rr = Reranker(str(folder), device="cpu")
    pairs = [("what is the capital of china?", random_text(rng, n)) for n in (1, 5, 12, 30, 60, 90)]
    want = np.array(Qwen3RerankerReference(folder).logits(pairs))
    assert np.abs(want).max() > 30, want  # far beyond where an fp32 sigmoid saturates (about 17)
    got = np.array(rr.predict(pairs, raw_scores=True))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    scores = np.array(rr.predict(pairs))
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-want)), atol=1e-6)
    ranked = rr.rank(pairs[0][0], [d for _, d in pairs], raw_scores=True)
    np.testing.assert_allclose([r["score"] for r in ranked], sorted(want, reverse=True), rtol=1e-4, atol=1e-4)

    # The same logits from the CLI.
    docs = Path(folder.parent / "docs.jsonl")
    docs.write_text("".join(json.dumps(d) + "\n" for _, d in pairs))
    out = subprocess.run([sys.executable, "-m", "engine.cli", "rank", "--model", str(folder), "--device", "cpu",
                          "--query", pairs[0][0], "--documents", str(docs), "--raw-scores"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    cli = {r["index"]: r["relevance_score"] for r in json.loads(out.stdout)["results"]}
    np.testing.assert_allclose([cli[i] for i in range(len(pairs))], want, rtol=1e-4, atol=1e-4)


def test_a_failing_decode_step_fails_its_requests_and_the_loop_goes_on(engines, monkeypatch):
    rr = engines["prism"]
    gen = Generator(rr.engine)
    tpl = rr.engine.template
    head = tpl.encode_head("a question")
    tails = tpl.encode_tails(head, ["one document", "another one"]).ids
    want = gen.generate(tails, head, max_new_tokens=4, stop_ids=[])
    from engine.core.steps.generate import DecodeKind

    decode = next(k for k in rr.engine.scheduler.kinds if isinstance(k, DecodeKind))

    def broken(runner, step):
        raise RuntimeError("device fault")

    monkeypatch.setattr(decode, "run", broken)
    with pytest.raises(RuntimeError, match="device fault"):
        gen.generate(tails, head, max_new_tokens=4, stop_ids=[])
    assert decode.gen.cache is None and not decode.gen.running  # nothing half-kept
    monkeypatch.undo()
    assert gen.generate(tails, head, max_new_tokens=4, stop_ids=[]) == want
    assert len(rr.rank("a question", ["one document"])) == 1
