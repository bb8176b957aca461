"""Concurrent clients, backpressure (429) and cancellation of work whose client went away."""
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from engine.core.request import Cancelled
from server_helpers import RERANK_NAME, random_text


def _metric(server, name: str) -> float:
    with server.client() as c:
        for line in c.get("/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_32_concurrent_clients_match_alone(rerank_server):
    rng = random.Random(32)
    bodies = [{"model": RERANK_NAME, "query": f"query {i}: " + random_text(rng, rng.randint(2, 12)),
               "documents": [random_text(rng, rng.randint(1, 90)) for _ in range(rng.randint(1, 10))],
               "top_n": rng.choice([None, 3])} for i in range(32)]
    with rerank_server.client() as c:
        alone = [c.post("/v1/rerank", json=b).json() for b in bodies]
    batches_before = _metric(rerank_server, "rerank_engine_batches_total")
    barrier = threading.Barrier(32)

    def client(body):
        with rerank_server.client() as c:  # one connection per client
            barrier.wait()
            return c.post("/v1/rerank", json=body)

    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(client, bodies))
    batches = _metric(rerank_server, "rerank_engine_batches_total") - batches_before
    for a, t in zip(alone, together):
        assert t.status_code == 200, t.text
        t = t.json()
        assert [r["index"] for r in t["results"]] == [r["index"] for r in a["results"]]
        np.testing.assert_allclose([r["relevance_score"] for r in t["results"]],
                                   [r["relevance_score"] for r in a["results"]], atol=1e-5, rtol=0)
        assert t["usage"] == a["usage"]
    # The requests reached the engine together and shared its batches (one each would be 32).
    assert batches < 32, f"32 concurrent requests ran in {batches:.0f} engine batches"


class GatedService:
    """The real service, except that rank() waits for ``release`` (or for its cancel event)."""

    def __init__(self, service):
        self._service = service
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)
        self.cancelled = threading.Event()

    def __getattr__(self, name):
        return getattr(self._service, name)

    def rank(self, *args, cancel=None, **kwargs):
        self.entered.release()
        while not self.release.is_set():
            if cancel is not None and cancel.is_set():
                self.cancelled.set()
                raise Cancelled("request cancelled")
            time.sleep(0.01)
        return self._service.rank(*args, cancel=cancel, **kwargs)


def test_backpressure_429_when_the_queue_is_full(start_server, rerank_service):
    gated = GatedService(rerank_service)
    server = start_server(gated, "gated", max_queue=2)
    body = {"query": "q", "documents": ["a", "b"]}
    with ThreadPoolExecutor(2) as pool:
        accepted = [pool.submit(lambda: server.client().post("/v1/rerank", json=body)) for _ in range(2)]
        for _ in range(2):
            assert gated.entered.acquire(timeout=30)
        with server.client() as c:
            extra = [c.post("/v1/rerank", json=body) for _ in range(3)]
            assert c.get("/health").status_code == 200  # not a model request: never refused
            assert _metric(server, "rerank_engine_queue_depth") == 2
        gated.release.set()
        done = [f.result(timeout=60) for f in accepted]
    for r in extra:
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
    assert [r.status_code for r in done] == [200, 200]
    assert _metric(server, "rerank_engine_rejected_total") == 3
    with server.client() as c:  # the queue drained: accepted again
        assert c.post("/v1/rerank", json=body).status_code == 200


def test_client_disconnect_cancels_the_work(start_server, rerank_service):
    gated = GatedService(rerank_service)
    server = start_server(gated, "cancel-me")
    with pytest.raises(httpx.ReadTimeout):
        with server.client(timeout=httpx.Timeout(30, read=0.5)) as c:
            c.post("/v1/rerank", json={"query": "q", "documents": ["a"]})
    assert gated.cancelled.wait(timeout=10), "the engine call never saw its cancel event"
    deadline = time.monotonic() + 10
    while _metric(server, "rerank_engine_cancelled_total") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert _metric(server, "rerank_engine_queue_depth") == 0


def test_real_engine_cancellation_stops_early(rerank_service):
    # The server passes its cancel event straight to the engine; a set event stops the work.
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        rerank_service.rank("q", ["doc"] * 50, cancel=cancel)
