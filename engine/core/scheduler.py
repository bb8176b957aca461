"""The scheduler: decides the engine loop's next step. It never runs the model.

Every step is one packed model call of one kind (engine/core/steps/), chosen on the
engine thread. Kinds marked ``first`` (shared prefixes: they unblock the rest) go before
the others whenever they have work; the others take turns, so a long decode does not
starve scoring, nor scoring the decode. The scheduler owns what the kinds share: the
waiting requests, the token budget, the caches, the tokenizer thread and the counters.
A request's result never depends on the other sequences of its batch.
"""
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Collection, List, Optional, Sequence

from engine.core.cache import PassageCache, PrefixCache
from engine.core.request import Cancelled, Request
from engine.core.steps.base import StepKind

log = logging.getLogger("engine")


class Scheduler:
    def __init__(self, max_batch_tokens: int, prefix_cache: PrefixCache, kinds: Sequence[StepKind],
                 passage_cache: Optional[PassageCache] = None):
        self.max_batch_tokens = max_batch_tokens
        self.prefix_cache, self.passage_cache = prefix_cache, passage_cache
        self.kinds: List[StepKind] = list(kinds)
        self._cond = threading.Condition()
        self._active: List[Request] = []
        self.tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
        self._turn = 0
        self.peak_batch_tokens = 0
        self.totals = {"requests": 0, "batches": 0, "tokens_computed": 0, "tokens_saved": 0, "decode_steps": 0,
                       "decode_rows": 0, "peak_decode_rows": 0, "peak_decode_requests": 0}

    # -- caller threads -----------------------------------------------------------------------
    def add(self, req: Request) -> None:
        with self._cond:
            self._active.append(req)
            self.totals["requests"] += 1
            self._cond.notify()

    def add_kind(self, kind: StepKind) -> None:
        """Run a new kind of work from now on (it takes its turn after the kinds already here)."""
        with self._cond:
            self.kinds = self.kinds + [kind]  # a new list: the engine thread may be reading the old one

    def wake(self) -> None:
        """Wake a ``schedule`` call that is waiting for work (the engine is stopping)."""
        with self._cond:
            self._cond.notify_all()

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._active)

    # -- engine thread --------------------------------------------------------------------------
    def idle(self) -> bool:
        """Nothing queued and no kind busy: the loop is about to wait."""
        with self._cond:
            return not self._active and not any(k.busy() for k in self.kinds)

    def schedule(self, timeout: Optional[float] = None, settling: Collection[Request] = ()):
        """The next step (its ``kind`` set), or None when there is nothing to do (after waiting up to
        ``timeout``). ``settling``: requests a step in flight will complete; they count as done."""
        kinds = self.kinds
        settled = {id(r) for r in settling}
        with self._cond:
            if not self._active and not any(k.busy() for k in kinds):
                self._cond.wait(timeout)
            reqs = sorted(self._active, key=Request.sort_key)
        live = []
        for r in reqs:
            if id(r) in settled:
                continue
            if not r.done.is_set() and r.cancelled:
                r.fail(Cancelled("request cancelled"))
            if not r.done.is_set():
                live.append(r)
        with self._cond:
            self._active = [r for r in self._active if not r.done.is_set()]
        for kind in kinds:
            if kind.first:
                step = kind.schedule(self, live)
                if step is not None:
                    step.kind = kind
                    return step
        turns = [k for k in kinds if not k.first]
        for n in range(len(turns)):
            i = (self._turn + n) % len(turns)
            step = turns[i].schedule(self, live)
            if step is not None:
                self._turn = i + 1
                step.kind = turns[i]
                return step
        if live and timeout != 0:  # requests waiting on something else (none today): do not spin
            with self._cond:
                self._cond.wait(0.005)
        return None

    def postprocess(self, step, out) -> None:
        step.kind.finish(self, step, out)

    def fail(self, step, err: BaseException) -> None:
        """The step raised: fail the requests it served (never the engine)."""
        for r in {id(r): r for r in step.kind.fail(self, step, err)}.values():
            r.fail(err)
