"""Requests: what a caller hands the engine loop, and where the loop leaves the answers.

A caller thread builds a request, submits it and waits on it. Everything else,
from picking its sequences into steps to delivering results, happens on the
engine thread. Each kind of request lives with the step kind that serves it
(engine/core/steps/): ScoreRequest (score.py), PassageRequest (passage.py),
GenerateRequest (generate.py). This module holds what they share.
"""
import itertools
import threading
from typing import Optional, Sequence, Tuple

from engine.sequence import Seq

_STATS_LOCK = threading.Lock()


def merge_stats(into: Optional[dict], stats: dict) -> None:
    """Add a request's counters into a dict that caller threads may share (a Reranker's cumulative ``stats``)."""
    if into is None:
        return
    with _STATS_LOCK:
        for k, v in stats.items():
            into[k] = into.get(k, 0) + v


class Cancelled(RuntimeError):
    """The caller cancelled the request (e.g. its HTTP client went away)."""


class Request:
    _arrival = itertools.count()
    # Whether the tokens of a shared prefix computed for this request count in its stats (scoring
    # requests: yes; a generating request's prefix was counted when its documents were scored).
    counts_prefix_tokens = False

    def __init__(self, priority: int = 0, cancel: Optional[threading.Event] = None):
        self.priority = priority
        self.cancel = cancel
        self.arrival = next(Request._arrival)
        self.error: Optional[BaseException] = None
        self.done = threading.Event()
        self.stats = {"tokens_computed": 0, "tokens_saved": 0, "prompt_tokens": 0, "batches": 0,
                      "tokenize_s": 0.0, "schedule_s": 0.0, "forward_s": 0.0, "head_s": 0.0}

    def sort_key(self):
        return (-self.priority, self.arrival)

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def fail(self, err: BaseException) -> None:
        if not self.done.is_set():
            self.error = err
            self.done.set()

    def wait(self):
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result()

    def result(self):
        raise NotImplementedError


def pair_items(items: Sequence[Tuple[Request, Seq]]):
    """Group a step's (request, sequence) items by request, in first-seen order."""
    groups = {}
    for r, s in items:
        groups.setdefault(id(r), (r, []))[1].append(s)
    return list(groups.values())
