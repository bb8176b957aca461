"""The engine loop with results in flight (engine/core/loop.py) decides and answers exactly as the plain loop.

A fake asynchronous runner runs each step on the real CPU runner but hands its output back as not
ready for a few polls, as a GPU step whose results are still being copied would be. The same
workload (plain and prefix-shared scores, embeddings, evidence decoding) then goes through the
plain loop (schedule, run, hand back) and through ``Loop`` with the fake runner: every step,
every result, every request's counters and the order requests complete in must be the same, and
the loop must really have planned steps while another was in flight.
"""
import numpy as np
import pytest
import torch

from engine import Embedder, Reranker
from engine.core.cache import PrefixCache
from engine.core.decode import kv_bytes
from engine.core.loop import Loop
from engine.core.pending import Pending, Readback, resolve
from engine.core.scheduler import Scheduler
from engine.core.steps import default_kinds
from engine.core.steps.generate import GenerateRequest
from engine.core.steps.score import ScoreRequest
from engine.sequence import Seqs
from kernels.host import to_device


class Delayed(Pending):
    """An output that is ready only after ``polls`` calls of ``ready()`` (``result()`` does not wait)."""

    def __init__(self, value, polls: int, log: list, tag):
        self.value, self.polls, self.log, self.tag = value, polls, log, tag

    def ready(self) -> bool:
        self.polls -= 1
        return self.polls < 0

    def result(self):
        self.log.append(("result", self.tag))
        return self.value


class DelayedRunner:
    """The real runner, its outputs handed back late."""

    def __init__(self, runner, polls: int = 3):
        self.runner, self.polls, self.log, self.n = runner, polls, [], 0

    def run(self, step):
        tag = (self.n, step.kind.name)
        self.n += 1
        self.log.append(("run", tag))
        return Delayed(resolve(self.runner.run(step)), self.polls, self.log, tag)


def signature(step, reqs) -> tuple:
    """What a step is, in terms the two runs share: its kind and which sequences of which requests."""
    no = {id(r): i for i, r in enumerate(reqs)}
    if hasattr(step, "items"):
        return step.kind.name, tuple((no[id(r)], s.index) for r, s in step.items)
    if step.kind.name == "prefix":
        return "prefix", tuple(step.keys)
    if step.kind.name == "prefill":
        return "prefill", no[id(step.request)], tuple(step.rows), step.capacity, step.keep
    return "decode", tuple(step.tokens), step.keep, tuple((no[id(r)], i) for r, i in step.rows)


def drive(engine, make_requests, loop_runner=None, max_batch_tokens=96):
    """Run the workload on a fresh scheduler over ``engine``'s runner, on this thread: the plain loop
    when ``loop_runner`` is None, else ``Loop`` over ``loop_runner(runner)``."""
    kv = kv_bytes(engine.runner.model) if engine.runner.model.supports_decode else (0, 0)
    sched = Scheduler(max_batch_tokens, PrefixCache(64 << 20), default_kinds(256 << 20, kv))
    reqs = make_requests()
    steps, completed = [], []
    schedule, postprocess = sched.schedule, sched.postprocess

    def recording_schedule(*a, **k):
        step = schedule(*a, **k)
        if step is not None:
            steps.append(signature(step, reqs))
        return step

    def recording_postprocess(step, out):
        postprocess(step, out)
        completed.extend(i for i, r in enumerate(reqs) if r.done.is_set() and i not in completed)

    sched.schedule, sched.postprocess = recording_schedule, recording_postprocess
    for r in reqs:
        sched.add(r)
    runner = engine.runner
    loop = None
    if loop_runner is not None:
        runner = loop_runner(engine.runner)
        loop = Loop(sched, runner)
    for _ in range(10_000):
        if all(r.done.is_set() for r in reqs) and (loop is None or not loop.in_flight):
            break
        if loop is None:  # the plain loop: schedule, run, hand back
            step = sched.schedule(timeout=0)
            if step is not None:
                with torch.inference_mode():
                    sched.postprocess(step, resolve(runner.run(step)))
        else:
            loop.turn(timeout=0)
    else:
        raise AssertionError("the workload did not finish")
    sched.tokenizer_pool.shutdown()
    assert all(r.error is None for r in reqs), [r.error for r in reqs]
    return reqs, steps, completed, runner


def counters(r) -> dict:
    return {k: v for k, v in r.stats.items() if not k.endswith("_s")}


def check_same(engine, make_requests):
    want, want_steps, want_order, _ = drive(engine, make_requests)
    got, got_steps, got_order, fake = drive(engine, make_requests, DelayedRunner)
    assert got_steps == want_steps
    assert got_order == want_order
    for a, b in zip(got, want):
        assert counters(a) == counters(b)
        ra, rb = a.result(), b.result()
        if isinstance(rb, np.ndarray):
            assert np.array_equal(ra, rb)
            if getattr(b, "logits", None) is not None:
                assert np.array_equal(a.logits, b.logits)
        else:
            assert ra == rb
    # Steps are handed back in the order they ran, and the next step ran while a scoring step was in flight;
    # a step of another kind was always handed back before the next one ran.
    results = [tag for what, tag in fake.log if what == "result"]
    assert results == sorted(results)
    overlapped = 0
    held = None
    for what, tag in fake.log:
        if what == "run":
            if held is not None:
                assert held[1] == "score", f"step {tag} ran while {held} (a barrier) was not handed back"
                overlapped += 1
            held = tag
        elif tag == held:
            held = None
    assert overlapped > 0
    return got


def ids(rng, n, lo=3, hi=40):
    return [rng.integers(10, 5000, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def score_request(seqs, prefix=None, chunk_size=1024):
    prefix = tuple(prefix) if prefix else None
    return ScoreRequest(len(seqs), lambda s, e: Seqs.of(seqs[s:e], prefix=prefix), prefix=prefix,
                        chunk_size=chunk_size)


@pytest.fixture(scope="module")
def prism(make_qwen3):
    return Reranker(str(make_qwen3(name="Prism-Qwen3-Reranker-tiny")), device="cpu").engine


@pytest.fixture(scope="module")
def embedder(make_qwen3):
    return Embedder(str(make_qwen3(name="Qwen3-Embedding-tiny", embed_tokenizer=True)), device="cpu").engine


def test_scores_prefixes_and_decoding_interleaved_match_the_plain_loop(prism):
    rng = np.random.default_rng(7)
    head_a, head_b = ids(rng, 1, 20, 30)[0], ids(rng, 1, 10, 20)[0]
    docs = [ids(rng, k) for k in (9, 3, 14, 5, 7)]
    prompts = [ids(rng, 3, 4, 12), ids(rng, 2, 4, 12)]
    eos = [int(prism.tokenizer.eos_token_id or 0)]

    def workload():
        return [score_request(docs[0]),  # spans several steps
                score_request(docs[1], prefix=head_a),
                GenerateRequest(Seqs.of(prompts[0], prefix=tuple(head_a)), 6, eos, prefix=head_a),
                score_request(docs[2], prefix=head_b, chunk_size=4),  # tokenized in chunks on the tokenizer thread
                GenerateRequest(Seqs.of(prompts[1]), 4, eos),
                score_request(docs[3]),
                score_request(docs[4], prefix=head_a)]

    got = check_same(prism, workload)
    assert got[2].result() and all(len(o) >= 1 for o in got[2].result())


def test_embeddings_in_many_steps_match_the_plain_loop(embedder):
    rng = np.random.default_rng(8)
    docs = [ids(rng, k) for k in (11, 1, 6, 8)]
    got = check_same(embedder, lambda: [score_request(d) for d in docs])
    assert got[0].result().ndim == 2 and got[0].result().shape[0] == 11  # [n, H] embeddings


def test_readback_and_metadata_copies_on_cpu_are_plain_tensors():
    value = torch.arange(6, dtype=torch.float32).view(2, 3)
    rb = Readback([value, None], lambda host: (host[0].numpy(), host[1]))
    assert rb.ready()
    out, none = rb.result()
    assert none is None and np.array_equal(out, value.numpy())
    t = to_device([[1, 2], [3, 4]], torch.int32, torch.device("cpu"))
    assert t.dtype == torch.int32 and t.device.type == "cpu" and t.tolist() == [[1, 2], [3, 4]]
    assert not t.is_pinned()  # nothing is pinned for a CPU device
    assert to_device(torch.tensor([1.5]), torch.float64, None).dtype == torch.float64
