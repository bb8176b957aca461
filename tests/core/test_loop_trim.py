"""The engine loop hands the heap's free pages back (engine/models/memory.py's ``trim``) when it goes idle
after work, and at most every ``memory.TRIM_EVERY_S`` under sustained work; never in the middle of it."""
import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.core.loop import Loop
from engine.models import memory

REPO = Path(__file__).resolve().parents[2]


class Kind:
    name = "fake"

    @staticmethod
    def settles(step):
        return None


class Step:
    kind = Kind()


class Scheduler:
    """Hands out ``n`` steps; ``idle`` once they are all out (``busy``: never idle)."""

    def __init__(self, n: int, busy: bool = False):
        self.left, self.busy, self.done = n, busy, 0

    def idle(self) -> bool:
        return not self.busy and self.left == 0

    def schedule(self, timeout=None, settling=()):
        if self.left == 0:
            return None
        self.left -= 1
        return Step()

    def postprocess(self, step, out):
        self.done += 1

    def fail(self, step, e):
        raise AssertionError(e)


class Runner:
    def run(self, step):
        return "out"


@pytest.fixture
def trims(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "trim", lambda: calls.append(1))
    return calls


def test_trims_once_when_it_goes_idle_after_work(trims):
    sched = Scheduler(3)
    loop = Loop(sched, Runner())
    for _ in range(3):
        loop.turn(timeout=0)
    assert sched.done == 3 and trims == []  # not while steps were queued
    loop.turn(timeout=0)
    assert trims == [1]  # idle after work: once
    for _ in range(5):
        loop.turn(timeout=0)
    assert trims == [1]  # idle without work since: nothing to hand back
    sched.left = 1
    loop.turn(timeout=0)
    loop.turn(timeout=0)
    assert trims == [1, 1]


def test_trims_under_sustained_work_at_most_every_period(trims, monkeypatch):
    sched = Scheduler(1000, busy=True)
    loop = Loop(sched, Runner())
    for _ in range(10):
        loop.turn(timeout=0)
    assert trims == []  # the period (seconds) has not passed
    monkeypatch.setattr(memory, "TRIM_EVERY_S", 0.0)
    loop.turn(timeout=0)
    loop.turn(timeout=0)
    assert trims == [1, 1]


PROBE = r"""
import ctypes
from engine.models import memory

def rss():
    return next(int(l.split()[1]) >> 10 for l in open("/proc/self/status") if l.startswith("VmRSS"))

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
memory.tune()
blocks = [libc.malloc(64 << 10) for _ in range(2000)]  # 125 MiB of heap (below the mmap threshold)
for b in blocks:
    ctypes.memset(b, 1, 64 << 10)
full = rss()
for b in blocks[:-1]:  # the last block pins the heap's top: glibc's own trimming returns nothing
    libc.free(b)
freed = rss()
memory.trim()
print(full, freed, rss())
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists() or not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"),
                    reason="glibc's malloc_trim, RSS from /proc (Linux with glibc)")
def test_trim_hands_freed_heap_holes_back():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    full, freed, trimmed = map(int, out.stdout.split())
    assert freed - trimmed >= 100, out.stdout  # the 125 MiB freed under the pinned top came back
