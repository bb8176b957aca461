"""Ray Serve: 2 replicas of the bundled model behind Serve's HTTP proxy on 127.0.0.1.

The real cohere and openai clients get the single-process engine's scores; a
killed replica is replaced while requests keep succeeding; the engine's 429
still reaches clients; shutdown leaves no replica behind.
"""
import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from ray_helpers import free_port, ray_processes, skip_without_ray

skip_without_ray()
pytestmark = pytest.mark.ray

import httpx  # noqa: E402

from engine.config import EngineConfig  # noqa: E402
from engine.scaleout.serve import APP_NAME, ReplicaSpec, deploy, deployment_options, shutdown  # noqa: E402
from engine.serving.server import ServerConfig  # noqa: E402
from engine.serving.service import Service  # noqa: E402

NAME = "minilm"
MAX_QUEUE = 2  # per replica: small, so the 429 test needs few requests
QUERY = "what is the capital of china?"
DOCS = ["Beijing is the capital of China.", "Gravity attracts bodies toward one another.",
        "The Great Wall is in northern China.", "Paris is the capital of France.", "北京是中国的首都。"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def reference():
    """The single-process engine on the same model."""
    return Service(None, device="cpu", warmup=False)


@pytest.fixture(scope="module")
def served(ray_cluster):
    port = free_port()
    spec = ReplicaSpec(engine=EngineConfig(device="cpu"), server=ServerConfig(served_names=[NAME], max_queue=MAX_QUEUE),
                       threads=1)
    deploy(spec, deployment_options(2, max_queue=MAX_QUEUE, cpus=1), "127.0.0.1", port, address=ray_cluster.address)
    url = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    yield url
    shutdown()


def replica_states():
    from ray import serve

    return serve.status().applications[APP_NAME].deployments["engine"].replica_states


def cohere_rerank(url, docs=DOCS, top_n=3):
    import cohere

    res = cohere.ClientV2(api_key="unused", base_url=url, timeout=60).rerank(model=NAME, query=QUERY, documents=docs,
                                                                             top_n=top_n)
    return [(r.index, r.relevance_score) for r in res.results]


def openai_embed(url, texts=DOCS):
    import openai

    res = openai.OpenAI(api_key="unused", base_url=f"{url}/v1", timeout=60).embeddings.create(model=NAME, input=texts)
    return np.array([d.embedding for d in sorted(res.data, key=lambda d: d.index)], dtype=np.float32)


def check_rerank(got, reference, docs=DOCS, top_n=3):
    want = reference.rank(QUERY, docs, top_n=top_n)[0]
    assert [i for i, _ in got] == [r["index"] for r in want]
    np.testing.assert_allclose([s for _, s in got], [r["score"] for r in want], atol=ATOL, rtol=0)


def check_embed(got, reference, texts=DOCS):
    np.testing.assert_allclose(got, reference.embed(texts)[0], atol=ATOL, rtol=0)


def test_two_replicas_on_two_nodes(served):
    assert replica_states() == {"RUNNING": 2}
    replicas = ray_processes("ray::ServeReplica")
    assert len(replicas) == 2
    assert len({p.parent().pid for p in replicas}) == 2  # each started by its own node's raylet


def test_cohere_rerank_equals_single_process(served, reference):
    check_rerank(cohere_rerank(served), reference)


def test_openai_embeddings_equal_single_process(served, reference):
    check_embed(openai_embed(served), reference)


def test_backpressure_429_through_ray(served):
    """More concurrent requests than the replicas admit: the excess gets the engine's 429 with Retry-After."""
    docs = [" ".join(["a long document about the capital cities of the world"] * 30)] * 64
    n = 12
    statuses, bodies = [None] * n, [None] * n
    barrier = threading.Barrier(n)

    def send(i):
        barrier.wait()
        r = httpx.post(f"{served}/v1/rerank", json={"query": QUERY, "documents": docs}, timeout=120)
        statuses[i], bodies[i] = r.status_code, (r.text, r.headers.get("retry-after"))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert set(statuses) == {200, 429}, list(zip(statuses, [b[0][:200] for b in bodies]))
    assert statuses.count(200) >= 2
    for status, (body, retry_after) in zip(statuses, bodies):
        if status == 429:
            error = json.loads(body)["error"]
            assert error["type"] and "busy" in error["message"] and retry_after == "1"


def test_killed_replica_is_replaced_while_requests_succeed(served, reference):
    before = ray_processes("ray::ServeReplica")
    assert len(before) == 2
    results, errors, stop = [], [], threading.Event()

    def traffic():  # sequential requests through the real clients (their default retries on 5xx)
        while not stop.is_set():
            try:
                results.append(("embed", openai_embed(served)))
                results.append(("rerank", cohere_rerank(served)))
            except Exception as e:  # noqa: BLE001 (every failure is reported below)
                errors.append(repr(e))

    t = threading.Thread(target=traffic)
    t.start()
    time.sleep(1.0)
    victim = before[0]
    os.kill(victim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:  # Serve notices the death and starts a new replica
        now = {p.pid for p in ray_processes("ray::ServeReplica")}
        if victim.pid not in now and len(now) == 2 and replica_states() == {"RUNNING": 2}:
            break
        assert time.monotonic() < deadline, f"the replica was not replaced: {replica_states()}"
        time.sleep(0.5)
    during = len(results)
    time.sleep(1.0)
    stop.set()
    t.join(timeout=120)
    assert not errors, errors
    assert during >= 2 and len(results) > during  # requests ran while the replica was down and after
    for kind, got in results:
        if kind == "embed":
            check_embed(got, reference)
        else:
            check_rerank(got, reference)
    # After: both replicas answer (the new one included)
    for _ in range(4):
        check_rerank(cohere_rerank(served), reference)
        check_embed(openai_embed(served), reference)


def test_clean_shutdown(served):
    shutdown()
    deadline = time.monotonic() + 60
    while ray_processes("ray::ServeReplica") or ray_processes("ray::ProxyActor"):
        assert time.monotonic() < deadline, "replicas or the proxy outlived serve.shutdown()"
        time.sleep(0.5)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{served}/health", timeout=5)
