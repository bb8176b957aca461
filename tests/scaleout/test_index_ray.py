"""rerank-engine index over Ray Data: two actors encode, the driver writes; the store equals a local
index job's, entry for entry."""
import json

import numpy as np
import pytest

from ray_helpers import skip_without_ray

skip_without_ray()
pytestmark = pytest.mark.ray

from engine import EngineConfig  # noqa: E402
from engine.core.store import PassageStore  # noqa: E402
from engine.scaleout.index_job import run_index  # noqa: E402
from kalm_tiny import build_kalm  # noqa: E402
from textgen import random_text  # noqa: E402


def test_index_on_ray_equals_the_local_job(ray_cluster, tmp_path, rng):
    path = tmp_path / "KaLM-Reranker-tiny"
    build_kalm(path, seed=3)
    docs = {f"d{i}": random_text(rng, rng.randint(3, 30)) for i in range(30)}
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in docs.items())
                                      + json.dumps({"id": "bad", "text": ""}) + "\n")
    config = EngineConfig(model=str(path), device="cpu", max_batch_tokens=128)
    local = run_index(str(tmp_path / "c.jsonl"), str(tmp_path / "local"), progress=False, config=config)
    ray = run_index(str(tmp_path / "c.jsonl"), str(tmp_path / "ray"), progress=False, config=config,
                    ray_address=ray_cluster.address, concurrency=2)
    assert ray.encoded == local.encoded == 30 and ray.errors == local.errors == 1
    a, b = PassageStore(tmp_path / "local"), PassageStore(tmp_path / "ray")
    ra, rb = a.lookup(docs), b.lookup(docs)
    assert set(ra) == set(rb) == set(docs) and b.verify() == []
    for k in docs:
        assert ra[k].tokens == rb[k].tokens
        np.testing.assert_allclose(ra[k].read().numpy(), rb[k].read().numpy(), atol=1e-5)
    a.close()
    b.close()
