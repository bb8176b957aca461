"""``rerank-engine serve --replicas`` end to end: joins the cluster, answers, and stops cleanly on SIGTERM."""
import signal
import subprocess
import sys
import time

import pytest

from ray_helpers import free_port, ray_processes, skip_without_ray

skip_without_ray()
pytestmark = pytest.mark.ray

import httpx  # noqa: E402


def test_serve_replicas_cli(ray_cluster, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--replicas", "1", "--ray-address",
                                 ray_cluster.address, "--port", str(port), "--device", "cpu",
                                 "--served-model-name", "minilm"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        models = httpx.get(f"{url}/v1/models", timeout=30).json()
        assert models["data"][0]["id"] == "minilm"
        r = httpx.post(f"{url}/v1/rerank", json={"model": "minilm", "query": "capital of China?",
                                                  "documents": ["Gravity.", "Beijing is the capital of China."]},
                       timeout=60)
        assert r.status_code == 200 and r.json()["results"][0]["index"] == 1
        wrong = httpx.post(f"{url}/v1/rerank", json={"model": "other", "query": "q", "documents": ["d"]}, timeout=60)
        assert wrong.status_code == 404  # --served-model-name reached the replica's app
        assert len(ray_processes("ray::ServeReplica")) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    assert code == 0, log.read_text()[-3000:]
    assert "shutting down the replicas" in log.read_text()
    deadline = time.monotonic() + 60
    while ray_processes("ray::ServeReplica"):
        assert time.monotonic() < deadline, "the replica outlived the CLI"
        time.sleep(0.5)
