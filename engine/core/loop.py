"""The turns of the engine loop, with one step's results in flight while the next is planned.

Each turn: schedule a step, run it (its kind launches the device work), hand it back. A kind's
``run`` may return a ``Pending`` (engine/core/pending.py: results copied back through a CUDA
event). When its kind ``settles`` the step (names the requests its results will complete), the
loop schedules and launches the next step before it hands this one back, so the host plans step
N+1 while the device runs step N and the device always has the next step queued. Decisions and
results stay those of the plain loop:
- the scheduler treats the requests an in-flight step settles as done (their ``finish`` would
  change nothing else it reads), so it makes the decisions it would make after that ``finish``;
- steps are handed back in the order they ran;
- a kind that does not settle its steps (generation, shared prefixes, passages: their results
  change what the next step is) is a barrier: its step is handed back before the next is scheduled.
On CPU every output is ready when ``run`` returns: each step is handed back at once, in the
order of the plain loop.
When the loop goes idle after work (nothing in flight, nothing queued), and at most every
``memory.TRIM_EVERY_S`` under sustained work, it hands the heap's free pages back to the system
(engine/models/memory.py's ``trim``): off the hot path, so RSS follows what is live.
"""
import logging
import time
from typing import Optional

from engine.core.pending import Pending, resolve
from engine.models import memory

log = logging.getLogger("engine")


class Loop:
    """The engine thread's loop over ``scheduler`` and ``runner`` (anything with ``run(step)``)."""

    def __init__(self, scheduler, runner):
        self.scheduler, self.runner = scheduler, runner
        self._held: Optional[tuple] = None  # (step, pending output, requests it settles)
        self._worked = False  # a step ran since the last memory.trim
        self._trimmed_at = time.monotonic()

    @property
    def in_flight(self) -> bool:
        return self._held is not None

    def turn(self, timeout: float = 1.0) -> None:
        """One step: schedule (waiting up to ``timeout`` when nothing is in flight), run, hand back."""
        sched = self.scheduler
        if self._held is not None and self._held[1].ready():
            self.drain()
        settling = self._held[2] if self._held is not None else ()
        if self._worked and self._held is None:
            idle = getattr(sched, "idle", None)
            if (idle is not None and idle()) or time.monotonic() - self._trimmed_at > memory.TRIM_EVERY_S:
                self._trim()
        try:
            step = sched.schedule(timeout=0 if self._held is not None else timeout, settling=settling)
        except BaseException:  # a scheduling bug must not kill the thread that owns the model
            log.exception("scheduling failed")
            self.drain()
            return
        if step is None:
            self.drain()
            return
        self._worked = True
        try:
            out = self.runner.run(step)
        except Exception as e:  # e.g. out of memory: fail this step's requests only
            self.drain()
            log.exception("engine step %s failed", step.kind.name)
            sched.fail(step, e)
            return
        self.drain()  # the step before, in order
        if isinstance(out, Pending) and not out.ready():
            settles = step.kind.settles(step)
            if settles is not None:
                self._held = (step, out, settles)
                return
        self._finish(step, out)

    def _trim(self) -> None:
        self._worked = False
        self._trimmed_at = time.monotonic()
        memory.trim()

    def drain(self) -> None:
        """Hand back the step in flight, if any (waiting for the device)."""
        if self._held is not None:
            step, out, _ = self._held
            self._held = None
            self._finish(step, out)

    def _finish(self, step, out) -> None:
        sched = self.scheduler
        try:
            out = resolve(out)
        except Exception as e:  # a device error surfaces when the results are read
            log.exception("engine step %s failed", step.kind.name)
            sched.fail(step, e)
            return
        try:
            sched.postprocess(step, out)
        except Exception as e:
            log.exception("handing back the results of a %s step failed", step.kind.name)
            sched.fail(step, e)
