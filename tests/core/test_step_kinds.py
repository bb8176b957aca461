"""A new kind of work is local: a step kind written here, outside the engine's files, runs through the
engine loop (scheduled, run on the engine thread, handed back), and its failures stay its own."""
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine import Reranker
from engine.core.request import Request
from engine.core.steps.base import StepKind
from engine.sequence import Seq


class HiddenSumRequest(Request):
    """Toy work: for each token sequence, the sum of the model's last hidden states (fp32)."""

    def __init__(self, token_ids, boom: bool = False):
        super().__init__()
        self.seqs = [Seq(list(t)) for t in token_ids]
        self.waiting, self.boom = True, boom
        self.sums = None

    def result(self):
        return self.sums


class HiddenSumKind(StepKind):
    name = "hidden-sum"

    def __init__(self):
        self.threads = set()
        self.steps = 0

    def schedule(self, sched, live):
        for r in live:  # one request per step, the highest priority first
            if isinstance(r, HiddenSumRequest) and r.waiting:
                r.waiting = False
                return SimpleNamespace(request=r, items=[(r, s) for s in r.seqs])
        return None

    def run(self, runner, step):
        self.threads.add(threading.get_ident())
        if step.request.boom:
            raise RuntimeError("toy kind exploded")
        ids, ctx = runner.model.plan([s for _, s in step.items], runner.device)
        hidden, _ = runner.model(ids, ctx)
        cu = ctx.cu_seqlens.tolist()
        return [float(hidden[a:b].float().sum()) for a, b in zip(cu[:-1], cu[1:])]

    def finish(self, sched, step, out):
        self.steps += 1
        sched.totals["batches"] += 1
        step.request.sums = np.asarray(out, dtype=np.float64)
        step.request.done.set()


@pytest.fixture(scope="module")
def engine_with_toy(make_qwen3):
    rr = Reranker(str(make_qwen3()), device="cpu")
    kind = HiddenSumKind()
    rr.engine.scheduler.add_kind(kind)
    return rr, kind


def _direct_sum(rr, ids):
    """The same quantity computed outside the loop, one sequence alone."""
    model = rr.engine.runner.model
    with torch.inference_mode():
        x, ctx = model.plan([Seq(list(ids))], rr.engine.device)
        hidden, _ = model(x, ctx)
    return float(hidden.float().sum())


def test_a_toy_step_kind_runs_through_the_loop(engine_with_toy):
    rr, kind = engine_with_toy
    tok = rr.engine.tokenizer
    texts = ["a short one", "a somewhat longer sequence of words here", "x"]
    ids = [tok.encode(t) for t in texts]
    batches = rr.engine.scheduler.totals["batches"]
    got = rr.engine.submit(HiddenSumRequest(ids)).wait()
    assert kind.steps == 1 and rr.engine.scheduler.totals["batches"] == batches + 1
    assert kind.threads == {rr.engine._thread.ident}  # on the engine thread, not the caller's
    # Packed with its neighbours, each sequence gets what it gets alone (fp32 on CPU).
    want = [_direct_sum(rr, i) for i in ids]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # The built-in kinds still take their turns beside it.
    assert len(rr.rank("a query", ["doc one", "doc two"])) == 2


def test_a_failing_toy_step_fails_only_its_request(engine_with_toy):
    rr, kind = engine_with_toy
    tok = rr.engine.tokenizer
    bad = rr.engine.submit(HiddenSumRequest([tok.encode("anything")], boom=True))
    with pytest.raises(RuntimeError, match="toy kind exploded"):
        bad.wait()
    good = rr.engine.submit(HiddenSumRequest([tok.encode("fine")]))
    assert good.wait().shape == (1,)
    assert len(rr.rank("q", ["d"])) == 1
