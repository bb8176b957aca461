"""``StepKind``: what every kind of engine work provides to the loop.

The loop asks each kind in turn for a step (``schedule``), runs the one it gets
(``run``; it may return a ``Pending``, engine/core/pending.py) and hands its output back
(``finish``). A kind that raises in ``run`` or ``finish`` gets ``fail``: it names the
requests that fail with it and drops whatever state the step left half-made; the engine
and every other request go on. All of them run on the engine thread only.
"""
from typing import Iterable, List, Optional


class StepKind:
    name = "step"
    # A kind with ``first`` runs before any other whenever it has work (shared prefixes: they
    # unblock the requests waiting on them); the others take turns, so none starves another.
    first = False

    def busy(self) -> bool:
        """Work of its own beyond the waiting requests (the running decode batch): the loop must not sleep."""
        return False

    def schedule(self, sched, live: List) -> Optional[object]:
        """The next step of this kind from ``live`` (the waiting requests, by priority then arrival),
        or None. ``sched``: the Scheduler (budgets, caches, counters, the tokenizer pool)."""
        raise NotImplementedError

    def run(self, runner, step):
        """Execute the step on ``runner`` (the model, its head, the device); returns its output."""
        raise NotImplementedError

    def settles(self, step) -> Optional[list]:
        """The requests ``step``'s ``finish`` will complete, when nothing else it changes is read by
        ``schedule``: the loop may then plan the next step while this one's results are still on
        the way (engine/core/loop.py). None (the default): the next step waits for its ``finish``."""
        return None

    def finish(self, sched, step, out) -> None:
        """Hand the output back to the step's requests and count it."""
        raise NotImplementedError

    def fail(self, sched, step, err: BaseException) -> Iterable:
        """The requests that fail with ``step`` (its own, by default); drop its half-made state."""
        return step_requests(step)


def step_requests(step) -> list:
    """The distinct requests of a step's ``items`` ((request, sequence) pairs)."""
    return list({id(r): r for r, _ in getattr(step, "items", [])}.values())
